"""Crash safety: SIGKILL during a checkpoint write and during the export, and a full disk during a save.

The kills hit real `train/run.py` subprocesses. To kill *inside* a write, the victim runs through a small wrapper
(written by this test, not product code) that makes one step's checkpoint write - or the export - pause after its
first file, so the kill lands while the `step-N.tmp-<pid>` (or `.hf.tmp-<pid>`) folder is half written.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_resume import launch, overrides

from helpers import compose_config, corpus_text, sigkill_when
from train.checkpoint import io as ck_io
from train.checkpoint import layout as ck
from train.checkpoint import weights as ck_weights
from train.callbacks.loggers import read_metrics
from train.config import register_configs
from train.job import train

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 24
register_configs()

# Runs train/run.py's Hydra main with one step's checkpoint write (or the export) paused after its first file.
WRAPPER = r'''
import os, sys, time
import train.checkpoint.io as ck_io
import train.checkpoint.export as ex

pause_step, marker = os.environ["PAUSE_AT"], os.environ["PAUSE_MARKER"]
orig_save_weights, orig_gen = ck_io.save_weights, ex.generation_config

def save_weights(sd, path):
    orig_save_weights(sd, path)
    if path.parent.name.startswith(f"step-{pause_step}.tmp-"):
        open(marker, "w").close()
        time.sleep(120)

def generation_config(*a, **k):
    if pause_step == "export":
        open(marker, "w").close()
        time.sleep(120)
    return orig_gen(*a, **k)

ck_io.save_weights, ex.generation_config = save_weights, generation_config
import runpy
import train
run_py = os.path.join(os.path.dirname(train.__file__), "run.py")
sys.argv = [run_py, *sys.argv[1:]]
runpy.run_path(run_py, run_name="__main__")  # as a script, so Hydra finds ../conf next to it
'''


def args(corpus: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    base = [a for a in overrides(corpus, cache, run_dir) if not a.startswith("trainer.max_steps=")]
    return [*base, f"trainer.max_steps={MAX_STEPS}", *extra]


def launch_paused(tmp_path: Path, run_args: list[str], pause_at: str, log: Path) -> tuple[subprocess.Popen, Path]:
    wrapper = tmp_path / "paused_run.py"
    wrapper.write_text(WRAPPER)
    marker = tmp_path / f"paused-{pause_at}"
    env = dict(os.environ, PAUSE_AT=pause_at, PAUSE_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, str(wrapper), *run_args], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, marker


def run_plain(run_args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train" / "run.py"), *run_args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def corpus(tmp_path) -> Path:
    f = tmp_path / "input.txt"
    f.write_text(corpus_text(120_000))
    return f


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_and_export_then_resume_matches(tmp_path, corpus):
    cache, ref_dir, run_dir = tmp_path / "cache", tmp_path / "ref", tmp_path / "victim"
    from data_pipelines import LMDataModule

    cfg = compose_config(args(corpus, cache, ref_dir))
    LMDataModule(cfg.data).prepare_data()  # tokenize once; both runs below only read the cache

    ref = launch(args(corpus, cache, ref_dir), tmp_path / "ref.log")
    victim, marker = launch_paused(tmp_path, args(corpus, cache, run_dir), "12", tmp_path / "victim.log")
    try:
        sigkill_when(victim, marker.exists, tmp_path / "victim.log", "the paused step-12 write")
        assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
    partial = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-12.tmp-")]
    assert partial and (partial[0] / ck.WEIGHTS_NAME).is_file()  # killed in the middle of the write
    # the partial folder is never taken: the newest complete checkpoint is step-8, and it loads
    assert ck.latest_checkpoint(run_dir).name == "step-8"
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step-8"
    ck_io.DirCheckpointIO().load_checkpoint(ck.step_dir(run_dir, 8))

    # resume=auto continues from step-8; this time it is killed in the middle of the final export
    resumed, marker = launch_paused(tmp_path, args(corpus, cache, run_dir, "resume=auto"), "export",
                                    tmp_path / "resume1.log")
    sigkill_when(resumed, marker.exists, tmp_path / "resume1.log", "the paused export")
    log1 = (tmp_path / "resume1.log").read_text()
    assert "step-8" in log1  # "Restoring states from .../step-8"
    assert not any(".tmp-" in p.name for p in (run_dir / "checkpoints").iterdir())  # the partial step-12 is gone
    assert [p for p in run_dir.iterdir() if p.name.startswith(".hf.tmp-")] and not (run_dir / "hf").exists()
    newest = ck.latest_checkpoint(run_dir)
    assert newest.name == f"step-{MAX_STEPS}"
    ck_io.DirCheckpointIO().load_checkpoint(newest)

    # resume=auto again: nothing left to train, the export is redone and the half one cleaned up
    done = run_plain(args(corpus, cache, run_dir, "resume=auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "hf" / "model.safetensors").is_file()
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    # the losses equal the uninterrupted run's, step for step, and so do the final weights
    ref_rows = {int(r["step"]): r for r in read_metrics(ref_dir / "metrics.csv")}
    run_rows = {int(r["step"]): r for r in read_metrics(run_dir / "metrics.csv")}
    assert sorted(run_rows) == sorted(ref_rows) == list(range(1, MAX_STEPS + 1))
    for step in ref_rows:
        for key in ("train/loss", "val/loss", "lr"):
            assert run_rows[step][key] == ref_rows[step][key], (step, key)
    a = load_file(str(ref_dir / "checkpoints" / f"step-{MAX_STEPS}" / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / f"step-{MAX_STEPS}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_during_save_keeps_the_previous_checkpoint(monkeypatch, tmp_path, corpus, async_save):
    """ENOSPC halfway through a checkpoint: a clear error, the previous checkpoint intact, resume=auto works. With
    checkpoint.async_save the failed background write stops the run at its next save with the same error."""
    run_dir = tmp_path / "run"
    small = ["model.n_layer=1", "model.n_embd=32", "data.vocab_size=384", "trainer.val_check_interval=10",
             "checkpoint.every_n_steps=5", "sample.max_new_tokens=2", "model.dropout=0.0",
             f"checkpoint.async_save={str(async_save).lower()}"]
    run_args = [a for a in args(corpus, tmp_path / "cache", run_dir, *small)
                if not a.startswith(("checkpoint.every_n_steps=4", "model.n_layer=2", "model.n_embd=64",
                                     "data.vocab_size=512", "trainer.val_check_interval=10", "model.dropout=0.1"))]
    run_args = [a if not a.startswith("trainer.max_steps=") else "trainer.max_steps=12" for a in run_args]

    def compose_run(*extra):
        return compose_config([*run_args, *extra])

    orig = ck_weights.save_weights

    def full_disk(state_dict, path):
        if path.parent.name.startswith("step-10.tmp-"):
            path.write_bytes(b"\x00" * 1000)  # a partial file, then the device is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        orig(state_dict, path)

    monkeypatch.setattr(ck_io, "save_weights", full_disk)
    with pytest.raises(ck.CheckpointError, match=r"no space left on the device writing checkpoint .*step-10.*"
                                                 r"previous checkpoint .*step-5 is intact.*resume=auto"):
        train(compose_run())
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name != "last"] == ["step-5"]
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step-5"
    ck_io.DirCheckpointIO().load_checkpoint(ck.step_dir(run_dir, 5))

    monkeypatch.setattr(ck_io, "save_weights", orig)  # space freed
    summary = train(compose_run("resume=auto"))
    assert summary["global_step"] == 12 and ck.latest_checkpoint(run_dir).name == "step-12"


def logged_steps(run_dir: Path) -> list[int]:
    """The steps metrics.csv holds so far (a run in progress may be mid-line: the partial row is dropped)."""
    try:
        return [int(r["step"]) for r in read_metrics(run_dir / "metrics.csv") if r.get("step") is not None]
    except (FileNotFoundError, ValueError, TypeError):
        return []


def test_async_checkpoint_killed_mid_write_is_never_resumed(tmp_path, corpus):
    """checkpoint.async_save=true: the step-12 write hangs in the background writer while training goes on (row 14
    is logged before the kill, so the loop did not wait for the disk); a SIGKILL then leaves step-12 half written,
    never published: `last` and resume=auto take step-8, and the resumed run completes."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    small = ["model.n_layer=1", "model.n_embd=32", "model.dropout=0.0", "checkpoint.async_save=true",
             "trainer.limit_val_batches=0", "sample.max_new_tokens=2"]
    run_args = [a for a in args(corpus, cache, run_dir, *small)
                if not a.startswith(("model.n_layer=2", "model.n_embd=64", "model.dropout=0.1",
                                     "trainer.limit_val_batches=2"))]
    victim, marker = launch_paused(tmp_path, run_args, "12", tmp_path / "victim.log")
    sigkill_when(victim, lambda: marker.exists() and max(logged_steps(run_dir), default=0) >= 14,
                 tmp_path / "victim.log", "training past the hung step-12 write")
    partial = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-12.tmp-")]
    assert partial and (partial[0] / ck.WEIGHTS_NAME).is_file() and not (partial[0] / ck.META_NAME).exists()
    assert not ck.step_dir(run_dir, 12).exists()
    assert ck.latest_checkpoint(run_dir).name == "step-8"
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step-8"

    resumed = run_plain([*[a for a in run_args if not a.startswith("trainer.max_steps=")], "trainer.max_steps=16",
                         "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-8" in resumed.stdout + resumed.stderr  # "Restoring states from .../step-8"
    assert ck.latest_checkpoint(run_dir).name == "step-16"
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step-16"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert ck_io.DirCheckpointIO().load_checkpoint(ck.step_dir(run_dir, 16))["global_step"] == 16
