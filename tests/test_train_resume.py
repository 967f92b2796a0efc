"""Exact resume: a run SIGKILLed the moment its step-20 checkpoint (a checkpoint and a validation step) appears,
then continued with resume=auto, logs the same losses as an uninterrupted run (CPU, fixed seed, dropout on) and
ends with bit-identical weights.

Tolerance: exact. metrics.csv stores each value with 8 significant digits and the test requires the written strings
to be equal; the final weights are compared with torch.equal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import compose_config, corpus_text, sigkill_when
from train.callbacks.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 60


def overrides(corpus: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=512",
        "data.block_size=32", "data.batch_size=8", "data.val_fraction=0.1",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.n_positions=64",
        "model.dropout=0.1",  # dropout on: the resumed run must draw the same masks
        f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=4", "checkpoint.keep_last=2", "sample.max_new_tokens=4",
        f"run_dir={run_dir}", *extra,
    ]


def launch(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train" / "run.py"), *args], cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def last_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "last").read_text().strip().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return -1


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_uninterrupted(tmp_path):
    corpus = tmp_path / "input.txt"
    corpus.write_text(corpus_text(120_000))
    cache = tmp_path / "cache"
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "victim"

    # tokenize once up front, so the two concurrent runs below only read the cache

    from data_pipelines import LMDataModule
    from train.config import register_configs

    register_configs()
    cfg = compose_config(overrides(corpus, cache, ref_dir))
    LMDataModule(cfg.data).prepare_data()

    ref = launch(overrides(corpus, cache, ref_dir), tmp_path / "ref.log")
    victim = launch(overrides(corpus, cache, run_dir), tmp_path / "victim.log")
    try:
        # step 20 both checkpoints (every 4) and validates (every 10): step-20 is published only after its train row
        # and its val row are on disk, so a kill the instant it appears loses neither
        sigkill_when(victim, lambda: last_step(run_dir) >= 20, tmp_path / "victim.log", "a step-20 checkpoint")
        assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
    killed_at = last_step(run_dir)
    assert 20 <= killed_at < MAX_STEPS, "the victim must die mid-run"
    assert not (run_dir / "hf").exists()

    resumed = subprocess.run([sys.executable, str(ROOT / "train" / "run.py"),
                              *overrides(corpus, cache, run_dir, "resume=auto")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step-{killed_at}" in resumed.stdout + resumed.stderr  # "Restoring states from ..."
    # the outcome line counts the steps this process took, not the run's total, and their losses
    done = next(line for line in resumed.stdout.splitlines() if line.startswith("done: "))
    assert done.startswith(f"done: {MAX_STEPS - killed_at} more steps ({killed_at} -> {MAX_STEPS}) in "), done
    first_loss = next(r["train/loss"] for r in read_metrics(run_dir / "metrics.csv") if r["step"] == killed_at + 1)
    assert f"train loss {first_loss:.3f} -> " in done, done

    ref_text = (ref_dir / "metrics.csv").read_text().splitlines()
    run_text = (run_dir / "metrics.csv").read_text().splitlines()
    ref_rows = {int(r["step"]): r for r in read_metrics(ref_dir / "metrics.csv")}
    run_rows = {int(r["step"]): r for r in read_metrics(run_dir / "metrics.csv")}
    # every step logged exactly once, rows from before the kill kept, those after it re-done
    assert [int(line.split(",")[0]) for line in run_text[1:]] == list(range(1, MAX_STEPS + 1))
    assert run_text[0] == ref_text[0]
    after = [s for s in range(killed_at + 1, MAX_STEPS + 1)]
    assert len(after) >= 4
    for step in range(1, MAX_STEPS + 1):
        for key in ("train/loss", "val/loss", "lr"):
            assert run_rows[step][key] == ref_rows[step][key], (step, key, run_rows[step], ref_rows[step])
    # the logged strings themselves (8 significant digits) are identical for the loss / lr columns
    strip = lambda line: line.split(",")[:5]  # noqa: E731 - step, train/loss, val/loss, val/ppl, lr
    assert [strip(x) for x in run_text[1:]] == [strip(x) for x in ref_text[1:]]

    a = load_file(str(ref_dir / "checkpoints" / f"step-{MAX_STEPS}" / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / f"step-{MAX_STEPS}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # keep_last=2 kept the newest two; the checkpoint resumed from was protected from retention
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert f"step-{MAX_STEPS}" in kept and f"step-{killed_at}" in kept
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
