"""Hugging Face hub ids as `from_pretrained` takes them: `model.init_from=gpt2` / `data.tokenizer=gpt2` (and
`gpt2.*.from_pretrained("gpt2")`) load a hub id through huggingface_hub's cache, even from the repository root, where
this project's own package folder `gpt2/` must not shadow the hub id; what cannot be fetched ends in one sentence.

Nothing here reaches the network: the hub is a local huggingface_hub cache built in tmp (models--gpt2/refs/main +
snapshots/<commit>/ holding a tiny model and tokenizer saved by our save_pretrained), read with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("huggingface_hub")

from gpt2 import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAIN, OTHER = "a" * 40, "b" * 40  # two commits of models--gpt2: refs/main -> MAIN
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 300


def save_snapshot(snap: Path, tok, seed: int) -> None:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(str(snap))
    tok.save_pretrained(str(snap))


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """A huggingface_hub cache holding `gpt2` at two commits (weights of seed 0 on main, seed 1 on OTHER), a corpus,
    and an empty cache (nothing downloaded yet)."""
    d = tmp_path_factory.mktemp("hub")
    cache = d / "hub"
    repo = cache / "models--gpt2"
    tok = train_tokenizer(iter(TEXT.split(". ")), vocab_size=300)
    for commit, seed in ((MAIN, 0), (OTHER, 1)):
        save_snapshot(repo / "snapshots" / commit, tok, seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (d / "corpus.txt").write_text(TEXT)
    (d / "empty").mkdir()
    return {"d": d, "cache": cache, "snap": repo / "snapshots" / MAIN, "corpus": d / "corpus.txt",
            "empty": d / "empty"}


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_from_pretrained_hub_id_is_not_shadowed_by_a_folder_without_model_files(hub, monkeypatch, tmp_path):
    offline = dict(cache_dir=str(hub["cache"]), local_files_only=True)
    monkeypatch.chdir(ROOT)  # ./gpt2 is the package folder: no config.json, no tokenizer files
    assert (ROOT / "gpt2" / "__init__.py").is_file()
    model = GPT2LMHeadModel.from_pretrained("gpt2", **offline)
    assert same_weights(model, GPT2LMHeadModel.from_pretrained(hub["snap"]))
    other = GPT2LMHeadModel.from_pretrained("gpt2", revision=OTHER, **offline)
    assert not same_weights(model, other)  # the revision picks the snapshot
    tok = GPT2TokenizerFast.from_pretrained("gpt2", **offline)
    assert tok.get_vocab() == GPT2TokenizerFast.from_pretrained(hub["snap"]).get_vocab()
    # a folder of that name that does hold a model is read as the local folder it is (as transformers does)
    monkeypatch.chdir(tmp_path)
    other.save_pretrained("gpt2")
    assert same_weights(GPT2LMHeadModel.from_pretrained("gpt2", **offline), other)
    # a hub id the cache lacks: one sentence naming the id, the cache and the fix
    with pytest.raises(FileNotFoundError) as e:
        GPT2LMHeadModel.from_pretrained("openai-community/gpt2-xl", **offline)
    msg = str(e.value)
    assert "'openai-community/gpt2-xl'" in msg and str(hub["cache"]) in msg and "HF_HUB_OFFLINE=1" in msg
    assert "\n" not in msg and msg.count(". ") == 0


def cli(hub, *args: str, script: str = "train/run.py", cache: Path | None = None) -> subprocess.CompletedProcess:
    """`python <script> <args>` from the repository root (cwd), offline, with `cache` (default: the built hub) as
    huggingface_hub's and datasets' only cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HYDRA_FULL_ERROR", "GPT2_FORGE_DEBUG"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hub["d"] / "home"), HF_HUB_CACHE=str(cache or hub["cache"]),
               GPT2_FORGE_CACHE=str(hub["d"] / "forge-cache"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def small(hub, run_dir: Path, *extra: str) -> list[str]:
    return ["data=text", f"data.path={hub['corpus']}", "data.block_size=16", "data.batch_size=4",
            "data.val_fraction=0.1", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "sample.max_new_tokens=2",
            f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def runs(hub) -> dict[str, subprocess.CompletedProcess]:
    """The command lines of the tests below, run a few at a time (each pays Python + torch start-up)."""
    d = hub["d"]
    cases = {
        "init_from": lambda: cli(hub, *small(hub, d / "init", "model.init_from=gpt2")),
        # a revision, and data.tokenizer=gpt2 (the same vocabulary at main): both hub ids resolve from the root
        "init_from_revision": lambda: cli(hub, *small(hub, d / "rev", "model.init_from=gpt2", f"model.revision={OTHER}",
                                                      "data.tokenizer=gpt2", "trainer.max_steps=1")),
        "init_from_missing": lambda: cli(hub, *small(hub, d / "x1", "model.init_from=openai-community/gpt2-xl")),
        "tokenizer_missing": lambda: cli(hub, *small(hub, d / "x2", "data.tokenizer=gpt2"), cache=hub["empty"]),
        "owt": lambda: cli(hub, "experiment=gpt2-owt", "trainer.devices=1", f"run_dir={d / 'owt'}"),
        "prepare_hub": lambda: cli(hub, "data=hub", "data.name=Skylion007/openwebtext", "data.tokenizer=gpt2",
                                   script="data_pipelines/prepare.py"),
        "task_hub": lambda: cli(hub, "task=cls", "task.data.source=hub", "task.data.name=nyu-mll/glue",
                                "task.data.config_name=sst2", "model.init_from=gpt2", f"run_dir={d / 'glue'}"),
        "generate": lambda: cli(hub, "gpt2", "--prompt", "To be", "--max-new-tokens", "4", "--greedy",
                                script="train/cli/generate.py"),
        # evaluate.py on the hub id, with a built-in lm_eval task whose dataset is not in the (empty) datasets cache
        "evaluate_offline": lambda: cli(hub, "gpt2", "--tasks", "lambada_openai", "--limit", "2",
                                        script="train/cli/evaluate.py"),
        # in-training evaluation on a task whose dataset the offline cache lacks: refused before anything trains
        "train_eval_offline": lambda: cli(hub, *small(hub, d / "ev", "eval.tasks=[lambada_openai]",
                                                     "eval.every_n_steps=2")),
        "generate_missing": lambda: cli(hub, "openai-community/gpt2-xl", "--prompt", "x",
                                        script="train/cli/generate.py"),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(f) for k, f in cases.items()}
        return {k: f.result() for k, f in futures.items()}


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_init_from_hub_id_from_the_repository_root(runs, hub):
    r = runs["init_from"]
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = hub["d"] / "init"
    cfg = (run_dir / "config.yaml").read_text()
    assert "init_from: gpt2" in cfg and f"revision: {MAIN}" in cfg  # the commit the run started from
    exported = json.loads((run_dir / "hf" / "config.json").read_text())
    assert (exported["n_embd"], exported["n_layer"]) == (32, 2)  # the cached model's shape, not the default's
    # the tokenizer that came with the hub model (its ids index that embedding table)
    assert (GPT2TokenizerFast.from_pretrained(run_dir / "tokenizer").get_vocab()
            == GPT2TokenizerFast.from_pretrained(hub["snap"]).get_vocab())
    r = runs["init_from_revision"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"revision: {OTHER}" in (hub["d"] / "rev" / "config.yaml").read_text()


def test_init_from_revision_loads_that_commit(runs, hub):
    """Both runs start from the hub weights of their revision: the first step's loss is the snapshot model's own
    loss on the same first batch, which differs between the two commits."""
    first = {n: json.loads((hub["d"] / n / "summary.json").read_text())["first_train_loss"] for n in ("init", "rev")}
    assert first["init"] != first["rev"]


def test_data_tokenizer_hub_id_from_the_repository_root(runs, hub):
    r = runs["init_from_revision"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokenizer: gpt2" in (hub["d"] / "rev" / "config.yaml").read_text()
    assert (GPT2TokenizerFast.from_pretrained(hub["d"] / "rev" / "tokenizer").get_vocab()
            == GPT2TokenizerFast.from_pretrained(hub["snap"]).get_vocab())


def test_hub_id_not_in_the_offline_cache_is_one_sentence(runs, hub):
    line = one_error_line(runs["init_from_missing"])
    assert "model.init_from=openai-community/gpt2-xl" in line and "HF_HUB_OFFLINE=1" in line
    assert str(hub["cache"]) in line
    line = one_error_line(runs["tokenizer_missing"])
    assert "data.tokenizer=gpt2" in line and "holds no tokenizer files" in line and "HF_HUB_OFFLINE=1" in line


def test_task_hub_dataset_offline_is_one_sentence_with_the_cache_advice(runs):
    line = one_error_line(runs["task_hub"])
    assert "hub dataset nyu-mll/glue/sst2" in line and "HF_DATASETS_OFFLINE=1" in line
    assert "task.data.source=jsonl task.data.path=" in line  # the local alternative, in the task's own keys


def test_generate_takes_a_hub_id(runs, hub):
    """train/cli/generate.py gpt2 (from the repository root, where ./gpt2 is the package): the cached hub model's greedy
    continuation, the same as the snapshot folder's; a hub id the cache lacks is one sentence."""
    r = runs["generate"]
    assert r.returncode == 0, r.stderr[-3000:]
    model, tok = GPT2LMHeadModel.from_pretrained(hub["snap"]).eval(), GPT2TokenizerFast.from_pretrained(hub["snap"])
    ids = tok("To be", return_tensors="pt").input_ids
    expected = tok.decode(model.generate(ids, max_new_tokens=4, do_sample=False)[0])
    assert expected in r.stdout, (expected, r.stdout)
    line = one_error_line(runs["generate_missing"])
    assert "openai-community/gpt2-xl" in line and "HF_HUB_OFFLINE=1" in line


def test_evaluate_takes_a_hub_id_and_an_offline_task_dataset_is_one_sentence(runs):
    """The model (the hub id) loads; lm_eval's lambada_openai then needs its dataset, which the offline cache lacks:
    one sentence naming the task, the cache advice and the local-task alternative."""
    line = one_error_line(runs["evaluate_offline"])
    assert "lm_eval task(s) lambada_openai" in line and "HF_DATASETS_OFFLINE=1" in line and "--include-path" in line


def test_in_training_evaluation_without_its_dataset_is_refused_before_training(runs, hub):
    line = one_error_line(runs["train_eval_offline"])
    assert "lm_eval task(s) lambada_openai" in line and "HF_DATASETS_OFFLINE=1" in line
    assert not (hub["d"] / "ev" / "metrics.csv").exists()  # no step was trained (and then lost)


def test_gpt2_owt_recipe_gets_past_the_tokenizer(runs):
    """From the repository root the recipe's data.tokenizer=gpt2 resolves (from the cache); offline it then stops at
    the hub dataset, in one sentence naming it and the fix."""
    line = one_error_line(runs["owt"])
    assert "Skylion007/openwebtext" in line and "HF_DATASETS_OFFLINE" in line and "tokenizer" not in line


def test_prepare_unreachable_hub_dataset_is_one_sentence(runs):
    r = runs["prepare_hub"]
    line = one_error_line(r)
    assert "hub dataset Skylion007/openwebtext" in line and "HF_DATASETS_OFFLINE=1" in line
    assert "data.path=" in line  # the local alternative
