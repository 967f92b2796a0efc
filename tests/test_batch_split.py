"""The same numbers however a batch is cut: for every task (lm, cls, token_cls, qa, mc), one optimizer step of a
global batch of 16 taken as 16 x 1, 8 x accumulate 2, 4 x accumulate 4 and 2 ranks x 8 (DDP, gloo) gives the same
gradients, the same logged train loss and the same consumed samples, and the validation loss is the exact mean over
the split's items (computed here example by example with the model's own transformers loss) for validation batches
of 16, 8 and 4 on one rank and 8 per rank on two. Then: a run of 8 x 1 stopped at step 3 and resumed as
4 x accumulate 2 logs what the uninterrupted run logs, step for step, and validates at the same steps; resumed again
with a global batch of 16 it continues at the next sample.

Runs: tests/split_runs.py in two subprocesses (one and two ranks), tiny model, dropout off, ~45 s together.
Tolerances: gradients within 1e-5 of the largest gradient entry (measured: <= 4e-7; per-micro-batch means, the bug
this guards against, were 3.6e-3 apart for token_cls and 2e-4 for mc); losses rtol 1e-6 (measured <= 3.3e-8; a
validation mean of batch means, or a dropped block, was 1e-5 to 1e-2 off).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import compose_config, corpus_text

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("lm", "cls", "token_cls", "qa", "mc")
ONE_RANK = ("16:1", "8:2", "4:4")
CUTS = ("1x16x1", "1x8x2", "1x4x4", "2x8x1")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split")
    corpus = out / "corpus.txt"
    corpus.write_text(corpus_text(40_000))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "WORLD_SIZE"))},
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for devices, cuts in ((1, ONE_RANK), (2, ("8:1",))):
        cmd = [sys.executable, str(ROOT / "tests" / "split_runs.py"), str(out), str(corpus), str(out / "cache"),
               str(devices), *cuts]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out


def load(runs: Path, task: str, cut: str) -> dict:
    return torch.load(runs / f"{task}-{cut}.pt")


@pytest.mark.parametrize("task", TASKS)
def test_one_step_cut_four_ways_gives_the_same_gradients(runs, task):
    ref = load(runs, task, "1x16x1")
    scale = max(float(g.abs().max()) for g in ref["grads"].values())
    assert scale > 0
    for cut in CUTS[1:]:
        got = load(runs, task, cut)
        assert got["grads"].keys() == ref["grads"].keys()
        worst = max(float((got["grads"][n] - g).abs().max()) for n, g in ref["grads"].items())
        assert worst <= 1e-5 * scale, f"{task} {cut}: gradients {worst / scale:.2e} of the largest apart"
        assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-6), cut
        assert got["consumed_samples"] == 16, cut


@pytest.mark.parametrize("task", TASKS)
def test_val_loss_is_the_exact_item_mean_for_every_batch_size_and_rank_count(runs, task):
    exact = torch.load(runs / f"{task}-exact.pt")["val_loss"]
    n = load(runs, task, "1x16x1")["val_size"]
    assert n % 8  # a short last batch for every batch size
    if task == "lm":  # the LM's validation is sharded by rank: one rank has one block more (the other a pad row)
        assert n % 2
    for cut in CUTS:
        assert load(runs, task, cut)["val_loss"] == pytest.approx(exact, rel=1e-6), cut


def _lm_run(run_dir: Path, corpus: Path, cache: Path, micro: int, accumulate: int, steps: int, resume: bool):
    from train.job import train

    cfg = compose_config([
        "data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=320", "data.block_size=24",
        f"data.batch_size={micro}", "data.val_fraction=0.1", "model=tiny", "model.n_embd=32", "model.n_head=2",
        "model.n_positions=24", "model.dropout=0.0", f"trainer.accumulate_grad_batches={accumulate}",
        f"trainer.max_steps={steps}", "trainer.val_check_interval=2", "trainer.limit_val_batches=1000",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=3",
        "checkpoint.keep_last=0",
        "optim.warmup_steps=2", "optim.decay_steps=6", "sample.max_new_tokens=2", f"run_dir={run_dir}",
        *(["resume=auto"] if resume else []),
    ])
    return train(cfg)


def test_resume_with_another_cut_of_the_same_global_batch_equals_the_uninterrupted_run(tmp_path):
    from train.callbacks.loggers import read_metrics

    corpus, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    corpus.write_text(corpus_text(40_000))
    _lm_run(tmp_path / "ref", corpus, cache, 8, 1, 6, resume=False)
    _lm_run(tmp_path / "cut", corpus, cache, 8, 1, 3, resume=False)
    _lm_run(tmp_path / "cut", corpus, cache, 4, 2, 6, resume=True)  # same global batch of 8, cut 4 x accumulate 2
    ref = {r["step"]: r for r in read_metrics(tmp_path / "ref" / "metrics.csv")}
    got = {r["step"]: r for r in read_metrics(tmp_path / "cut" / "metrics.csv")}
    for step in range(1, 7):
        assert got[step]["train/loss"] == pytest.approx(ref[step]["train/loss"], rel=1e-6), step
    # validation at the uninterrupted run's steps (2, 4, 6); the stopped run's own final validation at 3 aside
    assert [s for s in ref if ref[s].get("val/loss") is not None] == [2, 4, 6]
    assert [s for s in got if got[s].get("val/loss") is not None and s != 3] == [2, 4, 6]
    for step in (4, 6):
        assert got[step]["val/loss"] == pytest.approx(ref[step]["val/loss"], rel=1e-6), step
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-6" / "training_state.pt", weights_only=False)
    assert state["LMDataModule"] == {"consumed_samples": 48}  # 6 steps x 8 samples, none lost at the resume
    # another global batch: the data continues at sample 48, each further step taking 16 samples
    _lm_run(tmp_path / "cut", corpus, cache, 16, 1, 8, resume=True)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-8" / "training_state.pt", weights_only=False)
    assert state["LMDataModule"] == {"consumed_samples": 48 + 2 * 16}
