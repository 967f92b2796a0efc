"""train(cfg) end to end on a shrunken default run: the run directory, the loss, the HF export, the CLIs, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import compose_config, corpus_text
from train.callbacks.loggers import read_metrics
from train.config import ConfigError, register_configs
from train.job import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """120 kB of real English: the head of the embedded default corpus (made at run time, tests/helpers.py)."""
    d = tmp_path_factory.mktemp("corpus")
    text = corpus_text(120_000)
    (d / "input.txt").write_text(text)
    return d / "input.txt"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def small(corpus: Path, cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """The default run shrunk to seconds: 2 layers x 64 wide, block 32, batch 8, BPE of 512 tokens."""
    return [
        "data=text", f"data.path={corpus}", f"data.cache_dir={cache_dir}", "data.vocab_size=512",
        "data.block_size=32", "data.batch_size=8", "data.val_fraction=0.1",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.n_positions=64",
        "trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.limit_val_batches=4",
        "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=20", "optim.lr=3e-3", "optim.warmup_steps=5",
        "sample.max_new_tokens=8", f"run_dir={run_dir}", *extra,
    ]


def compose_cfg(overrides: list[str]):
    return compose_config(overrides)


def run_cli(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def trained(corpus, cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    summary = train(compose_cfg(small(corpus, cache_dir, run_dir)))
    return run_dir, summary


def test_run_dir_has_everything_interface_lists(trained):
    run_dir, summary = trained
    for name in ("config.yaml", "metrics.csv", "checkpoints/last", "hf/config.json", "hf/model.safetensors",
                 "hf/tokenizer.json", "hf/generation_config.json", "samples.txt", "plots/loss.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step-40"
    step = run_dir / "checkpoints" / "step-40"
    assert {p.name for p in step.iterdir()} >= {"model.safetensors", "config.json", "training_state.pt"}
    assert (run_dir / "samples.txt").read_text().strip()
    assert "max_steps: 40" in (run_dir / "config.yaml").read_text()
    # the weights get the mode of every other file the run writes (safetensors alone would write 0600)
    umask = os.umask(0)
    os.umask(umask)
    for weights in (step / "model.safetensors", run_dir / "hf" / "model.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~umask == (run_dir / "config.yaml").stat().st_mode & 0o777


def test_loss_falls_and_metrics_are_step_indexed(trained):
    run_dir, summary = trained
    rows = read_metrics(run_dir / "metrics.csv")
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["step", "train/loss", "val/loss", "val/ppl", "lr", "tokens_per_sec", "mfu"]
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    train_loss = [r["train/loss"] for r in rows if r["train/loss"] is not None]
    assert train_loss[-1] < 0.85 * train_loss[0], train_loss  # 40 steps of a 2x64 model: >= 15 % drop
    vals = [r for r in rows if r["val/loss"] is not None]
    assert [int(r["step"]) for r in vals] == [20, 40]
    assert abs(vals[-1]["val/ppl"] - torch.tensor(vals[-1]["val/loss"]).exp().item()) < 1e-3 * vals[-1]["val/ppl"]
    assert all(r["tokens_per_sec"] > 0 for r in rows if r["tokens_per_sec"] is not None)
    assert all(r["mfu"] is None for r in rows)  # CPU: no peak FLOP/s to compare with


def test_hf_export_matches_transformers(trained):
    transformers = pytest.importorskip("transformers")
    import gpt2
    from train.tasks.model import load_checkpoint_model

    run_dir, _ = trained
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(run_dir / "hf")).eval()
    ours = load_checkpoint_model(run_dir / "checkpoints" / "step-40").eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(run_dir / "hf"))
    ids = torch.tensor([tok.encode("To be, or not to be: that is the question")[:32]])
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert gpt2.GPT2TokenizerFast.from_pretrained(str(run_dir / "hf")).encode("To be") == tok.encode("To be")
    gen = json.loads((run_dir / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.config.eos_token_id == tok.eos_token_id


def test_export_and_generate_cli(trained, tmp_path, monkeypatch):
    """Export a run and sample from the export and from a checkpoint; neither command imports Lightning (~3 s of
    each call): Python's own import log (-X importtime) of the three calls names no lightning module."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # what -X importtime prints, on stderr
    run_dir, _ = trained
    out = tmp_path / "export"
    r = run_cli("train/cli/export.py", str(run_dir), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    imported = [r.stderr]
    # (a non-empty target without --force and a missing source are cases of tests/test_bad_inputs.py)
    for src in (out, run_dir / "checkpoints" / "step-40"):
        r = run_cli("train/cli/generate.py", str(src), "--prompt", "To be", "--max-new-tokens", "5", "--greedy")
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith("To be") and len(r.stdout) > len("To be\n")  # prompt + new tokens
        imported.append(r.stderr)
    assert all(re.search(r"^import time:.*\|\s+torch$", log, re.M) for log in imported)  # the log is there ...
    assert not [line for log in imported for line in log.splitlines() if re.search(r"\|\s+lightning", line)]


def test_cli_ends_with_val_perplexity_and_a_line_whose_commands_work(corpus, cache_dir, tmp_path):
    """`python train/run.py`'s last two lines: the losses with the validation perplexity, then what to open and the
    commands to sample from hf/ (run as printed) and to resume for as many steps again (composed as printed)."""
    import shlex

    run_dir = tmp_path / "run"
    r = run_cli("train/run.py", *small(corpus, cache_dir, run_dir, "trainer.max_steps=4", "trainer.val_check_interval=2",
                                       "checkpoint.every_n_steps=2", "model.n_layer=1", "model.n_embd=32"))
    assert r.returncode == 0, r.stderr[-3000:]
    done, last = r.stdout.strip().splitlines()[-2:]
    # Lightning's lines reach the console once, through Hydra's handler (not again through Lightning's own)
    assert (r.stdout + r.stderr).count("`Trainer.fit` stopped: `max_steps=4` reached.") == 1, r.stderr[-3000:]
    val_loss = read_metrics(run_dir / "metrics.csv")[-1]["val/loss"]
    assert done.startswith("done: 4 steps") and f"validation loss {val_loss:.3f} (perplexity " in done, done
    assert f"open {run_dir / 'samples.txt'} and {run_dir / 'plots' / 'loss.png'};" in last, last
    assert (run_dir / "samples.txt").is_file() and (run_dir / "plots" / "loss.png").is_file()
    sample_cmd, train_cmd = (shlex.split(part.split(": ", 1)[1]) for part in last.split("; ")[1:])
    py = os.path.relpath(sys.executable, ROOT)  # the interpreter that ran it, as typed from the repository root
    py = sys.executable if py.startswith("..") else py
    assert sample_cmd[:3] == [py, "train/cli/generate.py", str(run_dir / "hf")], last
    g = run_cli(*sample_cmd[1:], "--max-new-tokens", "3")
    prompt = compose_cfg([]).sample.prompts[0]  # the line suggests the first default prompt
    assert g.returncode == 0 and g.stdout.startswith(prompt), g.stderr[-2000:]
    assert train_cmd[:2] == [py, "train/run.py"] and "resume=auto" in train_cmd and "trainer.max_steps=8" in train_cmd
    # resume: the run's own overrides, continued from its newest checkpoint to the doubled step count (composed here,
    # not run: resume=auto itself is tested in test_train_resume.py)
    again = compose_cfg(train_cmd[2:])
    assert (again.run_dir, again.resume, again.trainer.max_steps) == (str(run_dir), "auto", 8)
    assert (again.model.n_embd, again.data.path) == (32, str(corpus))
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step-4"


def test_a_resumed_runs_last_line_counts_the_steps_this_process_took(tmp_path):
    """After a resume from step 900 to 1800, the 63 s belong to 900 steps, not to 1800."""
    from train.cli.run import outcome_lines

    summary = {"run_dir": str(tmp_path), "global_step": 1800, "resumed_step": 900, "seconds": 63.2,
               "first_train_loss": 8.33, "last_train_loss": 3.9}
    assert outcome_lines(summary, "", [])[0].startswith("done: 900 more steps (900 -> 1800) in 63s, train loss 8.330")
    del summary["resumed_step"]
    assert outcome_lines(summary, "", [])[0].startswith("done: 1800 steps in 63s")
    # one logged loss (a run shorter than trainer.log_every_n_steps) shows no "x -> x" trend
    summary.update(global_step=3, first_train_loss=8.33, last_train_loss=8.33, logged_train_steps=1)
    assert outcome_lines(summary, "", [])[0].startswith("done: 3 steps in 63s, train loss 8.330;")


def test_resuming_at_trainer_max_steps_says_there_is_nothing_to_train(trained, corpus, cache_dir, tmp_path):
    """A resume whose checkpoint already reached trainer.max_steps (a requeue after the final checkpoint, or a
    max_steps not raised) trains no step, leaves the checkpoints as they were, exports the model and says so."""
    import shutil

    from train.cli.run import outcome_lines

    run_dir = tmp_path / "copy"
    shutil.copytree(trained[0], run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    for max_steps in (40, 30):
        s = train(compose_cfg(small(corpus, cache_dir, run_dir, "resume=auto", f"trainer.max_steps={max_steps}")))
        assert s["global_step"] == 40 and s["resumed_step"] == 40 and s["first_train_loss"] is None
        assert outcome_lines(s, "", [])[0] == (f"done: nothing to train: the checkpoint is at step 40, at or past "
                                                f"trainer.max_steps; raise trainer.max_steps to train on; run dir "
                                                f"{run_dir}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert (run_dir / "hf" / "model.safetensors").is_file()
    # train/run.py on a finished run (summary.json written): the line, and the run dir's records left as they are
    records = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "summary.json", "metrics.csv")}
    r = run_cli("train/run.py", *small(corpus, cache_dir, run_dir, "resume=auto", "trainer.max_steps=10"))
    assert r.returncode == 0 and "done: nothing to train: the checkpoint is at step 40" in r.stdout, r.stderr[-2000:]
    assert records == {name: (run_dir / name).read_bytes() for name in records}


def test_the_logged_lr_is_the_lr_its_update_used(corpus, cache_dir, tmp_path):
    """Row s of metrics.csv logs the lr that optimizer step s ran at: lr * (s / (warmup + 1)) in the warm-up (step 1
    runs at lr / (warmup + 1)), the peak at step warmup + 1, then the cosine down to min_lr at the last step (the
    schedule's own formula; reading the lr after Lightning stepped the scheduler logs update s + 1's,
    transformers#35942)."""
    import math

    lr, warmup, steps, floor = 3e-3, 3, 10, 0.1
    train(compose_cfg(small(corpus, cache_dir, tmp_path / "run", f"trainer.max_steps={steps}",
                            "trainer.log_every_n_steps=1", f"optim.warmup_steps={warmup}", f"optim.lr={lr}",
                            f"optim.min_lr_ratio={floor}", "optim.schedule=cosine", "trainer.val_check_interval=10",
                            "checkpoint.every_n_steps=10", "model.n_layer=1")))
    logged = {int(r["step"]): r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["lr"] is not None}
    assert sorted(logged) == list(range(1, steps + 1))

    def used(s: int) -> float:  # update s has taken s - 1 steps before it (LambdaLR's last_epoch)
        k = s - 1
        if k < warmup:
            return lr * (k + 1) / (warmup + 1)
        progress = (k - warmup) / (steps - warmup)
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    for s in (1, 2, warmup, warmup + 1, warmup + 2, steps - 1, steps):
        assert logged[s] == pytest.approx(used(s), rel=1e-6), (s, logged[s], used(s))
    assert logged[1] == pytest.approx(lr / (warmup + 1)) and max(logged.values()) == pytest.approx(lr)
    assert max(logged, key=logged.get) == warmup + 1


def test_the_printed_resume_command_survives_hydra_and_the_shell(tmp_path):
    """A run_dir holding characters Hydra's override grammar reserves (a sweep-style name like lr=3e-3,bs=8, spaces,
    quotes): the printed resume command, split as the shell does, composes back to the same run_dir (hydra#1577)."""
    import shlex

    from train.cli.run import outcome_lines

    for name in ("lr=3e-3,bs=8", "my run", "it's [1]"):
        run_dir = tmp_path / name
        summary = {"run_dir": str(run_dir), "global_step": 4, "seconds": 1.0, "first_train_loss": 8.3,
                   "last_train_loss": 7.9, "samples": str(run_dir / "samples.txt"), "hf_dir": str(run_dir / "hf")}
        last = outcome_lines(summary, "Hi", ["model=tiny", "data.path='a,b.txt'"])[-1]
        train_cmd = shlex.split(last.rsplit(" more steps: ", 1)[1])
        cfg = compose_cfg(train_cmd[2:])
        assert (cfg.run_dir, cfg.resume, cfg.data.path, cfg.trainer.max_steps) == (str(run_dir), "auto", "a,b.txt", 8)


def test_resume_auto_without_checkpoint_starts_fresh_and_says_so(corpus, cache_dir, tmp_path, caplog):
    """resume=auto is the one command a restarting launcher repeats: with nothing to continue it starts at step 0,
    with one log line saying so."""
    run_dir = tmp_path / "empty"
    with caplog.at_level("INFO", logger="train.job"):
        s = train(compose_cfg(small(corpus, cache_dir, run_dir, "resume=auto", "trainer.max_steps=2",
                                    "trainer.val_check_interval=2", "checkpoint.every_n_steps=2")))
    said = [r.getMessage() for r in caplog.records if "starting fresh" in r.getMessage()]
    assert said == [f"resume=auto: no complete checkpoint in {run_dir / 'checkpoints'}; starting fresh"]
    assert s["global_step"] == 2 and "resumed_step" not in s
    assert [int(r["step"]) for r in read_metrics(run_dir / "metrics.csv") if r["train/loss"] is not None][0] == 1


def test_fresh_run_refuses_a_run_dir_with_checkpoints(trained, corpus, cache_dir):
    run_dir, _ = trained
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(compose_cfg(small(corpus, cache_dir, run_dir)))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_init_from_export_fine_tunes(trained, corpus, cache_dir, tmp_path):
    """model.init_from=<hf dir>: starts from those weights (first loss far below a random init's ln V)."""
    run_dir, summary = trained
    s = train(compose_cfg(small(corpus, cache_dir, tmp_path / "ft", f"model.init_from={run_dir / 'hf'}",
                                "trainer.max_steps=5", "checkpoint.every_n_steps=5")))
    assert s["first_train_loss"] < summary["first_train_loss"] - 1.0


@pytest.mark.parametrize("preset", ["fast_dev_run", "overfit_batch", "profile"])
def test_debug_presets_run_on_tiny(preset, corpus, cache_dir, tmp_path):
    extra = [f"debug={preset}"]
    if preset == "overfit_batch":
        extra += ["trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.log_every_n_steps=5"]
    if preset == "profile":
        extra += ["trainer.max_steps=6", "trainer.val_check_interval=6"]
    args = small(corpus, cache_dir, tmp_path / "run", *extra)
    # the preset's own step counts apply unless overridden above
    args = [a for a in args if not (a.startswith("trainer.max_steps=40") or a.startswith("trainer.val_check_interval=20"))]
    s = train(compose_cfg(args))
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    if preset == "fast_dev_run":
        assert s["global_step"] == 1 and not (tmp_path / "run" / "checkpoints").exists()
    if preset == "overfit_batch":
        losses = [r["train/loss"] for r in rows if r["train/loss"] is not None]
        assert losses[-1] < 0.5 * losses[0], losses  # one batch is memorised
    if preset == "profile":
        report = tmp_path / "run" / "fit-profile.txt"
        assert report.is_file() and "training_step" in report.read_text()


def test_cli_bad_inputs_exit_cleanly(tmp_path):
    cases = [
        (["trainer.max_step=5"], "max_step"),
        (["trainer.max_steps=abc"], "max_steps"),
        (["model=gpt5"], "gpt5"),
        (["trainer.max_steps=-3"], "trainer.max_steps"),
        ([f"resume={tmp_path / 'no-such-run'}"], "no-such-run does not exist"),
    ]
    for overrides, needle in cases:
        r = run_cli("train/run.py", f"run_dir={tmp_path / 'x'}", *overrides, timeout=120)
        assert r.returncode == 1, (overrides, r.stderr)
        assert needle in r.stderr, (overrides, r.stderr)
        assert "Traceback" not in r.stderr, (overrides, r.stderr)
        assert not (tmp_path / "x").exists(), overrides  # a refused start leaves no run dir (nor an empty run.log)
