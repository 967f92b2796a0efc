"""The W&B key lives in the environment (or ~/.netrc) only: it reaches no file of the run directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "fakeWandbKey" + "0123456789abcdef" * 2  # 44 characters, as long as a real key would be


def test_wandb_key_is_in_no_file_of_the_run_dir(tmp_path):
    pytest.importorskip("wandb")
    corpus = tmp_path / "input.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 400)
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_API_KEY=FAKE_KEY, WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), HYDRA_FULL_ERROR="1")
    r = subprocess.run(
        [sys.executable, str(ROOT / "train" / "run.py"), "logger=wandb", "data=text", f"data.path={corpus}",
         f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300", "data.block_size=16", "data.batch_size=4",
         "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.n_positions=16",
         "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=3",
         "sample.max_new_tokens=2", f"run_dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    # the run really logged to W&B offline, so its files are among those searched
    assert any("wandb" in p.parts for p in files), sorted(str(p.relative_to(run_dir)) for p in files)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "step-3" / "training_state.pt").is_file()
    needle = FAKE_KEY.encode()
    leaks = [str(p.relative_to(run_dir)) for p in files if needle in p.read_bytes()]
    assert not leaks, f"the W&B key was written to {leaks}"
    assert FAKE_KEY not in r.stdout + r.stderr
