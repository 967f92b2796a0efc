"""Hydra multirun: a 2x2 sweep with the basic launcher gives four run directories and a summary table (CSV +
Markdown) with four rows; the Optuna sweeper and SLURM launcher configs compose."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small BPE (trained in a second on the embedded corpus' first documents), so the sweep jobs skip training one."""
    from data_pipelines.corpus import build_corpus
    from gpt2.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(build_corpus()[:200], vocab_size=512).save_pretrained(str(d))
    return d


def run(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    return subprocess.run([sys.executable, str(ROOT / "train" / "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
def test_two_by_two_sweep_writes_four_runs_and_a_summary(tmp_path, tokenizer_dir):
    sweep = tmp_path / "sweep"
    p = run(
        "-m", "task=cls", "model=tiny", "optim.lr=1e-3,3e-3", "seed=1,2", f"run_dir={sweep}",  # -m: the sweep root
        f"data.tokenizer={tokenizer_dir}", f"data.cache_dir={tmp_path / 'cache'}",
        f"task.data.cache_dir={tmp_path / 'cache'}", "task.data.demo_train_size=64", "task.data.demo_val_size=16",
        "task.data.batch_size=8", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=false", "optim.warmup_steps=1", "checkpoint.every_n_steps=4", "guard=off",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit())
    assert [d.name for d in jobs] == ["0", "1", "2", "3"]
    for d in jobs:  # each job is a complete run dir of its own
        for name in ("config.yaml", "metrics.csv", "summary.json", "hf/config.json", "checkpoints/best/meta.json"):
            assert (d / name).is_file(), (d, name)
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 4
    assert {(float(r["optim.lr"]), int(r["seed"])) for r in rows} == {(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)}
    for r in rows:
        assert r["status"] == "COMPLETED" and r["global_step"] == "4"
        assert 0.0 <= float(r["val/accuracy"]) <= 1.0 and r["best/accuracy"]
    md = (sweep / "summary.md").read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 4  # header + separator + one row per job
    assert "optim.lr" in table[0] and "val/accuracy" in table[0]


def test_sweep_summary_reads_job_folders(tmp_path):
    """write_summary on hand-made job folders: overrides become columns, missing metrics stay empty."""
    import json

    from train.cli.sweep import write_summary

    for i, (lr, acc) in enumerate([("1e-4", 0.7), ("1e-3", None)]):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "sweep_job.json").write_text(json.dumps({"num": i, "overrides": [f"optim.lr={lr}"], "status": "COMPLETED"}))
        if acc is not None:
            (d / "summary.json").write_text(json.dumps({"global_step": 10, "final_metrics": {"val/accuracy": acc}}))
    csv_path, md_path, rows = write_summary(tmp_path)
    got = list(csv.DictReader(open(csv_path)))
    assert [r["optim.lr"] for r in got] == ["1e-4", "1e-3"]
    assert got[0]["val/accuracy"] == "0.7" and got[1]["val/accuracy"] == ""
    assert md_path.read_text().count("\n|") == 4  # header, separator, 2 rows


@pytest.mark.parametrize("choice", ["hydra/sweeper=optuna_lr", "hydra/launcher=slurm"])
def test_sweeper_and_launcher_configs_compose(choice):
    if "optuna" in choice:
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    p = run("--cfg", "hydra", choice, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    if "optuna" in choice:
        assert "OptunaSweeper" in p.stdout and "optim.lr: tag(log, interval(" in p.stdout
    else:
        assert "SlurmLauncher" in p.stdout and "timeout_min: 60" in p.stdout and "gpus_per_node: 1" in p.stdout
