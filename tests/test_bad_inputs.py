"""A table of bad inputs across every entry point: each must end with a non-zero exit, one sentence naming the
problem (matched by a regex), no traceback, and an untouched pre-made run directory.

All cases run as subprocesses, a few at a time, in one module fixture (each pays the Python + torch start-up, so
they overlap); every case is then checked by its own parametrized test. Most fail before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import compose_config

pytestmark = pytest.mark.slow  # ~31 subprocesses, most importing torch: ~2.5 min CPU

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 300


def _hash_tree(d: Path) -> dict[str, str]:
    """sha256 of every file under d, except Hydra's job log (run.log), which every invocation appends to."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "run.log"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """One small trained run (checkpoints/step-2, tokenizer/, hf/) and the bad files the cases point at."""

    from train.config import register_configs
    from train.job import train

    d = tmp_path_factory.mktemp("bad_inputs")
    w = {"d": d, "cache": d / "cache", "corpus": d / "corpus.txt", "pre": d / "pre"}
    w["corpus"].write_text(TEXT)
    register_configs()
    cfg = compose_config([*tiny(w), "trainer.max_steps=2",
                                                               "checkpoint.every_n_steps=2", f"run_dir={w['pre']}"])
    train(cfg)
    # a copy whose weights are garbage
    w["corrupt"] = d / "corrupt"
    shutil.copytree(w["pre"], w["corrupt"])
    (w["corrupt"] / "checkpoints" / "step-2" / "model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    # a tokenizer bigger than the pre-made model's vocabulary
    import gpt2

    w["bigtok"] = d / "bigtok"
    tok = gpt2.train_tokenizer(iter([TEXT, " ".join(f"w{i}x{i * 7}" for i in range(3000))]), vocab_size=600)
    tok.save_pretrained(str(w["bigtok"]))
    # bad data files
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 na\xefve r\xe9sum\xe9 \xff\xfe ".encode("latin-1") * 200)
    (d / "notjson.jsonl").write_text("this is plain text, not JSON lines\n" * 50)
    (d / "body.jsonl").write_text("".join(json.dumps({"body": TEXT[:200]}) + "\n" for _ in range(50)))
    rows = [{"text": f"a good line {i}", "label": i % 2} for i in range(40)] + [{"text": "odd", "label": 5}]
    (d / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = "The quick brown fox jumps over the lazy dog."
    rows = [{"id": str(i), "question": "who jumps?", "context": ctx, "answers": {"text": ["fox"], "answer_start": [16]}}
            for i in range(30)]
    rows.append({"id": "bad", "question": "who?", "context": ctx, "answers": {"text": ["zebra"], "answer_start": [500]}})
    (d / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "precious").mkdir()
    (d / "precious" / "notes.txt").write_text("keep me")
    # a user's model folder: an export plus their own files (it looks like an export, but is not only one)
    shutil.copytree(w["pre"] / "hf", d / "mymodel")
    (d / "mymodel" / "NOTES.md").write_text("my evaluation notes")
    shutil.copytree(w["pre"] / "hf", d / "damaged_hf")  # an HF folder whose weights file was cut short
    weights = d / "damaged_hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    w["hashes"] = {k: _hash_tree(w[k]) for k in ("pre",)}
    w["hashes"]["corrupt_ckpt"] = _hash_tree(w["corrupt"] / "checkpoints")
    w["hashes"]["precious"] = _hash_tree(d / "precious")
    w["hashes"]["mymodel"] = _hash_tree(d / "mymodel")
    return w


def tiny(w) -> list[str]:
    return [
        "data=text", f"data.path={w['corpus']}", f"data.cache_dir={w['cache']}", "data.vocab_size=300",
        "data.block_size=16", "data.batch_size=4", "data.val_fraction=0.1",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.n_positions=32",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "sample.max_new_tokens=2", "sample.prompts=[To]",
    ]


def _strategies() -> set[str]:
    return {p.stem for p in (CONF / "strategy").glob("*.yaml")}


# (id, entry point, args(w) -> list[str], regex the message must match)
RUN, EXPORT, GEN, PREP, PLAN, SLURM = ("train/run.py", "train/cli/export.py", "train/cli/generate.py",
                                        "data_pipelines/prepare.py", "launch/plan.py", "launch/slurm.py")


def run(*extra):
    return lambda w: [*tiny(w), f"run_dir={w['d'] / 'new'}", *(e(w) if callable(e) else e for e in extra)]


def lambda_path(name: str):
    return lambda w: f"task.data.path={w['d'] / name}"


def data(kind: str, file: str, *extra):
    return lambda w: [*tiny(w), f"data={kind}", f"data.path={w['d'] / file}", f"run_dir={w['d'] / 'new'}", *extra]


CASES = [
    ("unknown-option", RUN, run("trainer.max_step=5"), r"trainer\.max_step is not a setting.*did you mean "
                                                        r"trainer\.max_steps\?"),
    # Hydra's own message suggests the `+`: the key is still not in the schema, so the run must not start
    ("unknown-option-with-plus", RUN, run("+trainer.max_step=5"), r"trainer\.max_step is not a setting"),
    ("unparsable-override", RUN, run("run_dir=runs/lr=3e-3,bs=8"), r"quote a value .* key='value'"),
    ("wrong-type", RUN, run("trainer.max_steps=abc"), r"max_steps.*abc|abc.*max_steps"),
    ("out-of-range-lr", RUN, run("optim.lr=-1"), r"optim\.lr=-1.* must be"),
    ("out-of-range-val-fraction", RUN, run("data.val_fraction=1.5"), r"data\.val_fraction=1\.5 must be"),
    ("unknown-group-option", RUN, run("model=gpt5"), r"gpt5"),
    ("missing-data-file", RUN, data("text", "nope.txt"), r"nope\.txt"),
    ("empty-data-file", RUN, data("text", "empty.txt"), r"empty\.txt.*(empty|no text|no tokens)|(empty|no text|no tokens).*empty\.txt"),
    ("undecodable-data-file", RUN, data("text", "latin1.txt"), r"latin1\.txt.*(UTF-8|utf-8|decode)"),
    ("wrong-format-jsonl", RUN, data("jsonl", "notjson.jsonl"), r"notjson\.jsonl.*(JSON|json)"),
    ("missing-column-jsonl", RUN, data("jsonl", "body.jsonl"), r"text_column|'text'|\"text\"|column"),
    ("block-size-over-n-positions", RUN, run("data.block_size=64"), r"data\.block_size=64 exceeds"),
    ("vocab-smaller-than-tokenizer", RUN, run("model.vocab_size=100"), r"model\.vocab_size=100 is smaller"),
    ("tokenizer-bigger-than-init-from", RUN,
     lambda w: [*run(f"model.init_from={w['pre'] / 'hf'}", f"data.tokenizer={w['bigtok']}")(w)], r"tokenizer has \d+ tokens"),
    ("checkpoint-of-another-model", RUN, lambda w: run(f"resume={w['pre']}", "model.n_embd=64")(w), r"n_embd=32.*n_embd=64"),
    # resume=auto in a run dir without checkpoints starts fresh (test_train_run.py); a named path must exist
    ("resume-path-missing", RUN, lambda w: run(f"resume={w['d'] / 'no-such-run'}")(w), r"no-such-run does not exist"),
    ("resume-corrupt-safetensors", RUN, lambda w: [*tiny(w), f"run_dir={w['corrupt']}", "resume=auto"],
     r"model\.safetensors.*corrupt"),
    ("fresh-run-into-used-run-dir", RUN, lambda w: [*tiny(w), f"run_dir={w['pre']}"], r"already holds checkpoints"),
    ("init-from-missing", RUN, run("model.init_from=/no/such/model"), r"/no/such/model does not exist"),
    # the damaged file is named, with safetensors' own reason (not "holds no complete checkpoint")
    ("init-from-damaged-hf-folder", RUN, run(lambda w: f"model.init_from={w['d'] / 'damaged_hf'}"),
     r"cannot read .*damaged_hf/model\.safetensors: .*(incomplete|deserializ)"),
    ("too-many-devices", RUN, run("trainer.devices=64"), r"devices"),
    ("flash-on-cpu", RUN, run("attention=flash"), r"flash.*(CUDA|GPU)"),
    ("export-into-non-empty-dir", EXPORT, lambda w: [str(w["pre"]), str(w["d"] / "precious")], r"not empty.*--force"),
    # config.json + model.safetensors are in both, but a checkpoint and a folder with other files are no earlier export
    ("export-into-a-checkpoint", EXPORT, lambda w: [str(w["pre"]), str(w["pre"] / "checkpoints" / "step-2")],
     r"not empty.*--force"),
    ("export-into-a-model-folder", EXPORT, lambda w: [str(w["pre"]), str(w["d"] / "mymodel")], r"not empty.*--force"),
    ("export-corrupt-checkpoint", EXPORT, lambda w: [str(w["corrupt"]), str(w["d"] / "out")], r"corrupt"),
    ("generate-missing-path", GEN, lambda w: [str(w["d"] / "nope"), "--prompt", "x"], r"nope does not exist"),
    ("generate-corrupt-checkpoint", GEN, lambda w: [str(w["corrupt"]), "--prompt", "x"], r"corrupt"),
    ("generate-bad-temperature", GEN, lambda w: [str(w["pre"]), "--temperature", "0"], r"--temperature=0\.0 must be"),
    ("generate-file-as-source", GEN, lambda w: [str(w["d"] / "empty.txt"), "--prompt", "x"], r"empty\.txt is a file"),
    ("export-file-as-source", EXPORT, lambda w: [str(w["d"] / "empty.txt"), str(w["d"] / "out")], r"empty\.txt is a file"),
    ("generate-zero-samples", GEN, lambda w: [str(w["pre"]), "--num-samples", "0"], r"--num-samples=0 must be >= 1"),
    ("prepare-missing-file", PREP, lambda w: ["data=text", f"data.path={w['d'] / 'nope.txt'}",
                                              f"data.cache_dir={w['cache']}"], r"nope\.txt"),
    ("prepare-empty-file", PREP, lambda w: ["data=text", f"data.path={w['d'] / 'empty.txt'}",
                                            f"data.cache_dir={w['cache']}"], r"empty"),
    ("prepare-unknown-key", PREP, lambda w: ["data.blok_size=3"], r"data\.blok_size is not a setting.*did you mean "
                                                                  r"data\.block_size\?"),
    ("prepare-unknown-group-option", PREP, lambda w: ["data=nope"], r"Could not find 'data/nope'; available options"),
    ("plan-unknown-model", PLAN, lambda w: ["model=gpt9"], r"unknown model 'gpt9'"),
    ("plan-bad-number", PLAN, lambda w: ["model=gpt2", "gpus=eight"], r"gpus='eight' is not valid"),
    ("swept-run-dir-under-multirun", RUN, lambda w: ["-m", f"run_dir={w['d'] / 'a'},{w['d'] / 'b'}"],
     r"under -m run_dir is the sweep's root"),
    ("lm-data-override-on-finetune", RUN,
     lambda w: ["task=cls", f"model.init_from={w['pre'] / 'hf'}", "data=jsonl", f"data.path={w['d'] / 'cls.jsonl'}",
                f"run_dir={w['d'] / 'new'}"],
     r"task=cls fine-tunes on task\.data\.\*, not on data\.\*: data=jsonl would leave it .*task\.data\.source=jsonl"),
    ("slurm-bad-nodes", SLURM, lambda w: ["--dry-run", "--nodes", "0", "--", "trainer.max_steps=1"], r"--nodes"),
]
_TASKS = {p.stem for p in (CONF / "task").glob("*.yaml")}
if "cls" in _TASKS:  # engineer I's fine-tuning tasks
    CASES.append(("label-out-of-range", RUN, run("task=cls", "task.data.source=jsonl", "task.data.label_list=[0,1]",
                                                 lambda_path("cls.jsonl")), r"label 5 is out of range"))
if "qa" in _TASKS:
    CASES.append(("qa-answer-outside-context", RUN, run("task=qa", "task.data.source=jsonl", lambda_path("qa.jsonl")),
                  r"answer 'zebra' is not in the context"))
# Muon orthogonalizes whole matrices: the strategies that hand the optimizer shards refuse it before anything is built
CASES += [(f"muon-under-{s}", RUN, run("optim=muon", f"strategy={s}"),
           rf"optim=muon cannot run under strategy={s}: it orthogonalizes whole weight matrices .*use strategy=auto\|ddp")
          for s in ("fsdp", "deepspeed_zero2") if s in _strategies()]
if "deepspeed_zero2" in _strategies():  # DeepSpeed trains on CUDA GPUs and on the CPU, but never in fp64
    CASES.append(("deepspeed-fp64", RUN, run("strategy=deepspeed_zero2", "trainer.precision=64-true"),
                  r"strategy=deepspeed_zero2 cannot train in trainer.precision=64-true"))


# Runs an entry point as `python <script> <args>` does (its folder first on sys.path, __main__) and, at exit, prints
# which of the heavy libraries it had imported by then: the last line of stderr, "imported: lightning torch".
_PROBE = """import atexit, os, runpy, sys
atexit.register(lambda: print("imported:", *sorted({"torch", "lightning"} & set(sys.modules)), file=sys.stderr))
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(sys.argv[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Refused from the config, the file system and the first bytes of a file, before torch (~1 s) and Lightning (~4 s)
# are imported: a wrong path or option gets its sentence at once.
BEFORE_TORCH = {
    "unknown-option", "unknown-option-with-plus", "unparsable-override", "prepare-unknown-group-option",
    "wrong-type", "out-of-range-lr", "out-of-range-val-fraction", "unknown-group-option",
    "missing-data-file", "empty-data-file", "undecodable-data-file", "wrong-format-jsonl", "missing-column-jsonl",
    "block-size-over-n-positions", "checkpoint-of-another-model", "resume-path-missing",
    "resume-corrupt-safetensors", "fresh-run-into-used-run-dir", "init-from-missing", "export-into-non-empty-dir",
    "export-into-a-checkpoint", "export-into-a-model-folder", "export-corrupt-checkpoint", "generate-missing-path",
    "generate-corrupt-checkpoint", "generate-bad-temperature", "generate-zero-samples", "generate-file-as-source",
    "export-file-as-source",
    "prepare-unknown-key", "swept-run-dir-under-multirun", "lm-data-override-on-finetune", "slurm-bad-nodes",
}
# ... and these need torch (is there a CUDA GPU?), but not Lightning
BEFORE_LIGHTNING = BEFORE_TORCH | {"too-many-devices", "flash-on-cpu", "deepspeed-fp64", "plan-unknown-model",
                                   "plan-bad-number", "muon-under-fsdp", "muon-under-deepspeed_zero2"}


def _run_case(w, case) -> subprocess.CompletedProcess:
    _, script, args, _ = case
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "GPT2_FORGE_DEBUG")}
    env["GPT2_FORGE_CACHE"] = str(w["cache"])
    return subprocess.run([sys.executable, "-c", _PROBE, str(ROOT / script), *args(w)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def results(world) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {c[0]: pool.submit(_run_case, world, c) for c in CASES}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_sentence(case, results):
    import re

    name, script, _, pattern = case
    r = results[name]
    err = r.stderr
    assert r.returncode != 0, f"{name}: exit 0\n{r.stdout[-2000:]}"
    assert "Traceback" not in err, f"{name}: traceback\n{err[-3000:]}"
    assert re.search(pattern, err), f"{name}: message does not match {pattern!r}:\n{err[-2000:]}"
    # one `error:` line, the last thing printed (the probe's "imported:" line follows it), not a block of lines
    lines = err.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-2:-1], f"{name}: not one error line\n{err[-2000:]}"


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in BEFORE_LIGHTNING], ids=lambda c: c[0])
def test_early_errors_come_before_the_training_stack_is_imported(case, results):
    """A wrong path, file or option is named at once, not after torch and Lightning have been imported."""
    name = case[0]
    imported = set(results[name].stderr.strip().splitlines()[-1].split()[1:])
    assert "lightning" not in imported, f"{name}: refused only after importing Lightning"
    if name in BEFORE_TORCH:
        assert "torch" not in imported, f"{name}: refused only after importing torch"


def test_existing_outputs_untouched(world, results):
    assert len(CASES) >= 20
    assert _hash_tree(world["pre"]) == world["hashes"]["pre"]
    assert _hash_tree(world["corrupt"] / "checkpoints") == world["hashes"]["corrupt_ckpt"]
    assert _hash_tree(world["d"] / "precious") == world["hashes"]["precious"]
    assert _hash_tree(world["d"] / "mymodel") == world["hashes"]["mymodel"]
    assert not (world["d"] / "out").exists()  # no half export from the failed ones


def test_export_replaces_an_earlier_export_without_force(world, tmp_path):
    """Exporting again into a folder that holds only an earlier export replaces it (no --force needed), keeping the
    eval/ results train/cli/evaluate.py writes into a standalone HF folder; the refusals above cover folders that
    merely contain config.json and model.safetensors."""
    out = tmp_path / "again"
    shutil.copytree(world["pre"] / "hf", out)
    (out / "model.safetensors").write_bytes(b"stale")  # whatever was there is replaced as a whole
    (out / "eval").mkdir()
    (out / "eval" / "2026-01-01_00-00-00.json").write_text('{"results": {}}')
    r = subprocess.run([sys.executable, str(ROOT / "train" / "cli" / "export.py"), str(world["pre"]), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").read_bytes() == (world["pre"] / "hf" / "model.safetensors").read_bytes()
    assert (out / "eval" / "2026-01-01_00-00-00.json").read_text() == '{"results": {}}'

