"""LoRA fine-tuning (peft=lora, train/adapters/lora.py) on every head: one short run per task from one small base LM
(an HF folder), shared by the tests below.

- Each run's run_dir/adapter loads in transformers + peft (`PeftModel.from_pretrained(AutoModelFor<Head>(base),
  adapter)`) and gives the logits of its merged export run_dir/hf (tolerance 1e-4 absolute, as the full fine-tuning
  export test); the adapter is not a no-op (its logits differ from the base's).
- Only the adapters and the head train: the optimizer holds state for exactly those, the checkpoints hold exactly
  those and name the base, and the merged export keeps every frozen weight of the base bit for bit.
- The loss falls, and the cls fine-tune beats chance (0.5: two balanced classes) by a margin.
- evaluate / generate load the adapter folder, a LoRA checkpoint and the LoRA run dir as the merged model.
- Bad input gets one sentence (ConfigError).
- A sweep over the adapter rank (`-m peft.r=4,8`) writes one adapter per rank and the sweep summary.
- A LoRA run SIGKILLed after a checkpoint and resumed equals an uninterrupted one (its own small runs).
The ZeRO-3 / FSDP adapters: tests/test_lora_distributed.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import compose_config, corpus_text, tiny_base
from train.job import train

BASE = ["model=tiny", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=5", "guard=off",
        "sample.max_new_tokens=4"]
# task -> (steps, validation interval, extra overrides). cls trains longest: its held-out accuracy must clear chance
# (0.50) by 0.08; measured on the 2-core CPU (seed 1337, this fixture's base): 0.50 / 0.62 / 0.60 at steps 40 / 80 / 120.
TASKS = {
    "lm": (20, 20, []),
    "cls": (120, 40, ["task.data.demo_train_size=1600", "task.data.demo_val_size=300"]),
    "token_cls": (10, 10, ["task.data.demo_train_size=200", "task.data.demo_val_size=40"]),
    "qa": (10, 10, ["task.data.demo_train_size=200", "task.data.demo_val_size=40"]),
    "mc": (10, 10, ["task.data.demo_train_size=200", "task.data.demo_val_size=40"]),
}
HF_CLASS = {"lm": "AutoModelForCausalLM", "cls": "AutoModelForSequenceClassification",
            "token_cls": "AutoModelForTokenClassification", "qa": "AutoModelForQuestionAnswering",
            "mc": "GPT2DoubleHeadsModel"}
OUTPUTS = {"lm": ["logits"], "cls": ["logits"], "token_cls": ["logits"], "qa": ["start_logits", "end_logits"],
           "mc": ["logits", "mc_logits"]}
HEADS = {"lm": [], "cls": ["score"], "token_cls": ["classifier"], "qa": ["qa_outputs"], "mc": ["multiple_choice_head"]}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """{"base": the base LM's HF folder, "corpus", "cache", task: (run_dir, summary)}: a 200-step LM pre-train of the
    tiny model with a 512-token BPE, then one LoRA run (peft=lora's defaults: r=8 on c_attn/c_proj/c_fc) per task
    from its export."""
    from data_pipelines.corpus import build_corpus
    from gpt2.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("lora")
    cache, corpus, tok = root / "cache", root / "corpus.txt", root / "tok"
    corpus.write_text(corpus_text(200_000))
    train_tokenizer(build_corpus()[:200], vocab_size=512).save_pretrained(str(tok))
    lm = ["data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.block_size=64", "data.batch_size=16",
          "trainer.limit_val_batches=1"]
    s = train(compose_config(BASE + lm + [f"run_dir={root / 'base'}", f"data.tokenizer={tok}",
                                          "trainer.max_steps=200", "trainer.val_check_interval=200",
                                          "optim.lr=3e-3", "optim.warmup_steps=10", "checkpoint.every_n_steps=200"]))
    runs = {"base": Path(s["hf_dir"]), "corpus": corpus, "cache": cache, "lm_overrides": lm}
    for task, (steps, val_every, extra) in TASKS.items():
        run_dir = root / task
        task_data = lm if task == "lm" else [f"task.data.cache_dir={cache}"]
        summary = train(compose_config(BASE + task_data + [
            f"task={task}", f"run_dir={run_dir}", f"model.init_from={runs['base']}", "peft=lora",
            "peft.dropout=0.0", f"trainer.max_steps={steps}", f"trainer.val_check_interval={val_every}",
            "optim.lr=3e-3", "optim.warmup_steps=2", f"checkpoint.every_n_steps={steps}", *extra]))
        runs[task] = (run_dir, summary)
    return runs


def _inputs(task: str, vocab: int):
    g = torch.Generator().manual_seed(0)
    if task == "mc":
        ids = torch.randint(0, vocab, (2, 3, 10), generator=g)
        return {"input_ids": ids, "mc_token_ids": torch.full((2, 3), 9)}
    return {"input_ids": torch.randint(0, vocab, (1 if task == "cls" else 2, 10), generator=g)}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_adapter_loads_in_peft_with_the_merged_models_logits(lora_runs, task):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run_dir, s = lora_runs[task]
    base, adapter, hf = lora_runs["base"], run_dir / "adapter", run_dir / "hf"
    assert s["adapter_dir"] == str(adapter) and s["hf_dir"] == str(hf)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve()) and cfg["peft_type"] == "LORA"
    assert sorted(cfg["modules_to_save"] or []) == HEADS[task]
    cls = getattr(transformers, HF_CLASS[task])
    # the base with the head's config (num_labels, id2label, pad_token_id: what a transformers user passes for a head)
    head_cfg = transformers.AutoConfig.from_pretrained(str(hf))
    with_adapter = peft.PeftModel.from_pretrained(cls.from_pretrained(str(base), config=head_cfg, dtype=torch.float32),
                                                  str(adapter))
    merged = cls.from_pretrained(str(hf), dtype=torch.float32)
    plain = cls.from_pretrained(str(base), config=head_cfg, dtype=torch.float32)
    inputs = _inputs(task, plain.config.vocab_size)
    with torch.no_grad():
        a, b, c = (m.eval()(**inputs) for m in (with_adapter, merged, plain))
    for name in OUTPUTS[task]:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-4, msg=f"{task} {name}")
    if task == "lm":  # the adapter changed the model (a head of its own always differs from a fresh one)
        assert (a.logits - c.logits).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("task", ["lm", "cls", "mc"])
def test_only_adapters_and_head_train_and_are_checkpointed(lora_runs, task):
    from safetensors.torch import load_file

    from train.checkpoint.weights import load_weights

    run_dir, s = lora_runs[task]
    steps = TASKS[task][0]
    step = run_dir / "checkpoints" / f"step-{steps}"
    weights = load_weights(step / "model.safetensors")
    # the adapters of 2 blocks x 4 projections (A and B) and the head in full, nothing of the frozen base
    lora = [k for k in weights if ".lora_A." in k or ".lora_B." in k]
    assert len(lora) == 2 * 4 * 2 and all(k.endswith(".default.weight") for k in lora)
    head = sorted({k.split(".")[0] for k in weights if k not in lora})
    assert head == HEADS[task] and all(".modules_to_save.default." in k for k in weights if k not in lora)
    assert not any("base_layer" in k or "original_module" in k or "wte" in k for k in weights)
    meta = json.loads((step / "meta.json").read_text())
    assert meta["peft"]["method"] == "lora" and meta["peft"]["base_model"] == str(lora_runs["base"].resolve())
    # optimizer state: exactly one exp_avg per trained tensor, each of its shape
    state = torch.load(step / "training_state.pt", weights_only=True)["optimizer_states"][0]["state"]
    assert sorted(v["exp_avg"].numel() for v in state.values()) == sorted(t.numel() for t in weights.values())
    # the merged export keeps every frozen weight of the base bit for bit; the adapted projections moved
    base = load_file(str(lora_runs["base"] / "model.safetensors"))
    merged = load_file(str(run_dir / "hf" / "model.safetensors"))
    frozen = [k for k in base if not k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    assert frozen and all(torch.equal(base[k], merged[k]) for k in frozen)
    assert all(not torch.equal(base[k], merged[k]) for k in base if k.endswith("c_attn.weight"))


@pytest.mark.slow
def test_lora_loss_falls_and_cls_beats_chance(lora_runs):
    _, lm = lora_runs["lm"]
    assert lm["last_train_loss"] < lm["first_train_loss"]
    _, cls = lora_runs["cls"]
    assert cls["last_train_loss"] < cls["first_train_loss"]
    assert cls["best"]["metric"] == "val/accuracy" and cls["best"]["value"] > 0.58, cls["best"]


@pytest.mark.slow
def test_generate_and_evaluate_load_an_adapter_folder_and_a_lora_checkpoint(lora_runs):
    """train/cli/generate.py and train/cli/evaluate.py (train.eval.harness.load_model) take the adapter folder (its
    base from adapter_config.json), a LoRA checkpoint and the LoRA run dir: each gives the merged export's logits."""
    from gpt2 import GPT2LMHeadModel
    from train.eval.harness import load_model

    run_dir, _ = lora_runs["lm"]
    ref = GPT2LMHeadModel.from_pretrained(str(run_dir / "hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    for src in (run_dir / "adapter", run_dir / "checkpoints" / f"step-{TASKS['lm'][0]}", run_dir):
        model, tok, _, owner = load_model(src)
        assert owner == run_dir and tok.eos_token_id == ref.config.eos_token_id
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5,
                                       msg=str(src))


@pytest.mark.slow
def test_generate_refuses_a_task_heads_adapter_in_one_sentence(lora_runs, capsys):
    from train.cli.generate import main as generate_main

    assert generate_main([str(lora_runs["cls"][0] / "adapter"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a LoRA adapter (with the fine-tuned task head score), not a language model" \
        in err[0], err


@pytest.mark.slow
def test_bad_lora_inputs_get_one_sentence(lora_runs, tmp_path):
    from train.config import ConfigError
    from train.job import check_inputs

    with pytest.raises(ConfigError, match=r"peft.r=0 must be >= 1"):
        compose_config(["peft=lora", "peft.r=0", f"model.init_from={lora_runs['base']}"])
    with pytest.raises(ConfigError, match=r"model.init_from is unset"):
        compose_config(["peft=lora"])
    # a target module the model does not have: refused before the first step, naming the ones it has
    with pytest.raises(ConfigError, match=r"does not have; use some of \['c_attn', 'c_fc', 'c_proj'"):
        train(compose_config(BASE + lora_runs["lm_overrides"] + [
            f"run_dir={tmp_path / 'bad'}", f"model.init_from={lora_runs['base']}", "peft=lora",
            "peft.target_modules=[q_proj,c_attn]"]))
    # resuming a LoRA run without peft=lora, and a full fine-tune with it
    cls_dir = lora_runs["cls"][0]
    with pytest.raises(ConfigError, match=r"trained with peft=lora and cannot be resumed with peft=none"):
        check_inputs(compose_config(["task=cls", f"run_dir={cls_dir}", "resume=auto",
                                     f"model.init_from={lora_runs['base']}"]))
    with pytest.raises(ConfigError, match=r"peft.r=8 .* not peft.r=4"):
        check_inputs(compose_config(["task=cls", f"run_dir={cls_dir}", "resume=auto", "peft=lora", "peft.r=4",
                                     f"model.init_from={lora_runs['base']}"]))
    base_run = lora_runs["base"].parent
    with pytest.raises(ConfigError, match=r"trained with peft=none and cannot be resumed with peft=lora"):
        check_inputs(compose_config(lora_runs["lm_overrides"] + [f"run_dir={base_run}", "resume=auto", "peft=lora",
                                                                 f"model.init_from={lora_runs['base']}"]))
    # a LoRA checkpoint is no base model
    with pytest.raises(ConfigError, match=r"holds LoRA adapters, not a base model"):
        check_inputs(compose_config(["task=cls", f"run_dir={tmp_path / 'x'}", "peft=lora",
                                     f"model.init_from={cls_dir}"]))


@pytest.mark.slow
def test_sweep_over_the_lora_rank_writes_one_adapter_per_rank_and_a_summary(lora_runs, tmp_path):
    """`python train/run.py -m task=cls peft=lora peft.r=4,8 ...` (Hydra's basic launcher): two job folders, each with
    a PEFT adapter of its own rank and a merged export, and summary.csv with one COMPLETED row per rank."""
    import csv
    import subprocess
    import sys

    root, sweep = Path(__file__).resolve().parents[1], tmp_path / "sweep"
    p = subprocess.run([sys.executable, str(root / "train" / "run.py"), "-m", "task=cls", "peft=lora", "peft.r=4,8",
                        f"model.init_from={lora_runs['base']}", f"run_dir={sweep}",
                        f"task.data.cache_dir={lora_runs['cache']}", "task.data.demo_train_size=64",
                        "task.data.demo_val_size=16", "trainer.max_steps=3", "trainer.val_check_interval=3",
                        "checkpoint.every_n_steps=3", *BASE],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted((int(r["peft.r"]), r["status"], r["global_step"]) for r in rows) == [
        (4, "COMPLETED", "3"), (8, "COMPLETED", "3")]
    for job in ("0", "1"):
        overrides = json.loads((sweep / job / "sweep_job.json").read_text())["overrides"]
        adapter = json.loads((sweep / job / "adapter" / "adapter_config.json").read_text())
        assert f"peft.r={adapter['r']}" in overrides and (sweep / job / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_lora_sigkill_then_resume_auto_matches_uninterrupted(tmp_path):
    """A LoRA run SIGKILLed the moment its step-12 checkpoint appears, continued with resume=auto, logs the same losses
    as an uninterrupted one and ends with bit-identical adapters (the pattern of tests/test_train_resume.py)."""
    import subprocess
    import sys

    from helpers import sigkill_when
    from train.callbacks.loggers import read_metrics
    from train.checkpoint.weights import load_weights

    root = Path(__file__).resolve().parents[1]
    base, corpus, cache = tiny_base(tmp_path / "base"), tmp_path / "corpus.txt", tmp_path / "cache"
    corpus.write_text(corpus_text(60_000))
    steps = 20

    def args(run_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, str(root / "train" / "run.py"), "data=text", f"data.path={corpus}",
                f"data.cache_dir={cache}", "data.block_size=32", "data.batch_size=4", f"model.init_from={base}",
                "model.dropout=0.1", "peft=lora", "peft.r=4", "peft.dropout=0.1",  # dropout: the same masks again
                f"trainer.max_steps={steps}", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
                "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=4",
                "optim.lr=1e-2", "sample.max_new_tokens=2", f"run_dir={run_dir}", *extra]

    from data_pipelines import LMDataModule

    LMDataModule(compose_config(args(tmp_path / "x")[2:]).data).prepare_data()  # the token cache, once
    ref = subprocess.Popen(args(tmp_path / "ref"), cwd=root, stdout=open(tmp_path / "ref.log", "w"),
                           stderr=subprocess.STDOUT)
    victim_dir = tmp_path / "victim"
    victim = subprocess.Popen(args(victim_dir), cwd=root, stdout=open(tmp_path / "victim.log", "w"),
                              stderr=subprocess.STDOUT)

    def last() -> int:
        try:
            return int((victim_dir / "checkpoints" / "last").read_text().strip().split("-")[1])
        except (FileNotFoundError, IndexError, ValueError):
            return -1

    try:
        sigkill_when(victim, lambda: last() >= 12, tmp_path / "victim.log", "a step-12 checkpoint")
        assert ref.wait(timeout=400) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
    killed_at = last()
    assert 12 <= killed_at < steps
    resumed = subprocess.run(args(victim_dir, "resume=auto"), cwd=root, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_rows = {int(r["step"]): r for r in read_metrics(tmp_path / "ref" / "metrics.csv")}
    run_rows = {int(r["step"]): r for r in read_metrics(victim_dir / "metrics.csv")}
    assert sorted(run_rows) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        for key in ("train/loss", "val/loss", "lr"):
            assert run_rows[step][key] == ref_rows[step][key], (step, key)
    a = load_weights(tmp_path / "ref" / "checkpoints" / f"step-{steps}" / "model.safetensors")
    b = load_weights(victim_dir / "checkpoints" / f"step-{steps}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and len(a) == 2 * 4 * 2
    from safetensors.torch import load_file

    x = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(victim_dir / "adapter" / "adapter_model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
