"""Universal training state: a checkpoint written under any of ddp x1, ddp x2, fsdp x2, deepspeed_zero1 x2,
deepspeed_zero2 x1 and deepspeed_zero3 x2 resumes under each of the others, and the resumed run logs the losses of
the writer's own continuation and ends on its weights (train/checkpoint/universal.py; `python train/run.py
resume=<checkpoint> strategy=<other> trainer.devices=<n>`), plus the case DeepSpeed itself refuses: a ZeRO-3
checkpoint of 2 ranks resumed on 1.

Runs: each writer trains S = 5 steps and saves checkpoints/step-3 on the way; its steps 4-5 are its own
continuation. Each reader starts a new run_dir from a writer's step-3 and trains to step 5 (30 ordered pairs + 1).
Every run has the same global batch: 8 samples = micro-batch 2 x accumulation (4 on one rank, 2 on two) x ranks, so
all the writers' losses agree too, and a reader on another world size must map Lightning's micro-batch counts and the
data position (global samples) onto its own layout; an odd saved step makes the counts of 2 and 4 micro-batches per
step disagree (left unmapped, the first resumed step of ddp x2 -> x1 accumulates 2 micro-batches: 9e-4 off).

What each number checks: step 4's loss depends on the weights and the data position only; step 5's also on the AdamW
moments, the step count (bias correction) and the LR the schedule set. Measured on the 2-core CPU VM: zeroed moments
move the second resumed loss by 1.5e-3 relative, a wrong step count by 8e-4; the pairs agree to ~1e-7 (the engines
reduce gradients in another order). Tolerance: 1e-5 relative per loss (the issue's), 1e-5 absolute on the final weights.
Clipping is off (PyTorch sums squared norms in fp32, DeepSpeed in fp64), dropout 0, AdamW eps=1e-3 (near the
gradients' size, so the second moment matters; with 1e-8 AdamW nearly hides it).

Cost: a launch is mostly start-up (imports, process group, DeepSpeed's engine), 10-50 s each on 2 cores; the 37
launches run two at a time in one module-scoped fixture (`runs`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import corpus_text
from train.callbacks.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
S, SAVED, MICRO, GLOBAL = 5, 3, 2, 8
RTOL, ATOL_W = 1e-5, 1e-5
LAYOUTS = {  # name -> (strategy, ranks)
    "ddp_x1": ("ddp", 1), "ddp_x2": ("ddp", 2), "fsdp_x2": ("fsdp", 2),
    "zero1_x2": ("deepspeed_zero1", 2), "zero2_x1": ("deepspeed_zero2", 1), "zero3_x2": ("deepspeed_zero3", 2),
}
WRITERS = list(LAYOUTS)
PAIRS = [(w, r) for w in WRITERS for r in WRITERS if w != r] + [("zero3_x2", "zero3_x1")]
READERS = dict(LAYOUTS, zero3_x1=("deepspeed_zero3", 1))

pytest.importorskip("deepspeed")  # the dev extra installs it; without it the module is skipped
pytestmark = pytest.mark.slow


def overrides(d: Path, run_dir: Path, layout: str, *extra: str) -> list[str]:
    strategy, ranks = READERS[layout]
    return [
        "data=text", f"data.path={d / 'input.txt'}", f"data.cache_dir={d / 'cache'}", "data.vocab_size=300",
        "data.block_size=16", f"data.batch_size={MICRO}", "data.val_fraction=0.1",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.n_positions=16", "model.dropout=0.0",
        f"trainer.max_steps={S}", "trainer.accelerator=cpu", f"trainer.devices={ranks}", f"strategy={strategy}",
        f"trainer.accumulate_grad_batches={GLOBAL // (MICRO * ranks)}", "trainer.gradient_clip_val=null",
        "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        f"checkpoint.every_n_steps={SAVED}", "checkpoint.keep_last=0",
        "optim.warmup_steps=2", "optim.decay_steps=20", "optim.eps=1e-3", "sample.max_new_tokens=2", "guard=off",
        f"run_dir={run_dir}",
        # ZeRO-3: with DeepSpeed's default (1e5 elements) no tensor of this model would be partitioned
        *(["strategy.stage3_param_persistence_threshold=0"] if strategy == "deepspeed_zero3" else []),
        *extra,
    ]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "DS_ACCELERATOR"):
        e.pop(k, None)
    e.update(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    return e


def launch(args: list[str]) -> tuple[int, str, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "train" / "run.py"), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=400, env=env())
    return r.returncode, (r.stdout[-2000:] + r.stderr[-4000:]), time.monotonic() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 6 writers and the 31 readers (two launches at a time; a reader starts once its writer is done). Returns
    (folder, {run name: (returncode, output tail, seconds)}); a writer is `d/<layout>`, a reader
    `d/<writer>-to-<reader>`."""
    d = tmp_path_factory.mktemp("universal")
    (d / "input.txt").write_text(corpus_text(30_000))
    results: dict[str, tuple[int, str, float]] = {}
    t0 = time.monotonic()
    results["ddp_x1"] = launch(overrides(d, d / "ddp_x1", "ddp_x1"))  # alone: it writes the token cache
    jobs: dict[str, Future] = {}
    with ThreadPoolExecutor(2) as pool:
        for w in WRITERS[1:]:
            jobs[w] = pool.submit(launch, overrides(d, d / w, w))

        def reader(w: str, r: str):
            if w in jobs:
                jobs[w].result()
            step = d / w / "checkpoints" / f"step-{SAVED}"
            return launch(overrides(d, d / f"{w}-to-{r}", r, f"resume={step}"))

        for w, r in PAIRS:  # queued behind every writer
            jobs[f"{w}-to-{r}"] = pool.submit(reader, w, r)
        for name, f in jobs.items():
            results[name] = f.result()
    sizes = {w: sum(f.stat().st_size for f in (d / w / "checkpoints" / f"step-{SAVED}").rglob("*") if f.is_file())
             for w in WRITERS}
    print(f"\nuniversal resume runs: {time.monotonic() - t0:.0f} s wall for {len(results)} launches; seconds per "
          f"launch {({k: round(v[2]) for k, v in results.items()})}; step-{SAVED} checkpoint bytes {sizes}")
    return d, results


def losses(run_dir: Path) -> dict[int, float]:
    rows = read_metrics(run_dir / "metrics.csv")
    steps = [int(r["step"]) for r in rows if r.get("train/loss") is not None]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss") is not None}


def test_writers_agree(runs):
    """The six layouts train the same global batch: their own losses agree at every step (the reference for the
    pairs is each writer's own continuation)."""
    d, results = runs
    for w in WRITERS:
        code, out, _ = results[w]
        assert code == 0, (w, out)
    ref = losses(d / "ddp_x1")
    assert sorted(ref) == list(range(1, S + 1))
    for w in WRITERS:
        got = losses(d / w)
        for s in ref:
            assert abs(got[s] - ref[s]) <= RTOL * abs(ref[s]), (w, s, got[s], ref[s])


def test_every_family_reads_into_the_same_universal_state(runs):
    """The read side alone, in this process: the six saved checkpoints (three families, four engines' layouts, one
    and two ranks) give the same universal state: AdamW moments by name, step, LR, data position in global samples."""
    from train.checkpoint.layout import read_meta
    from train.checkpoint.universal import read_universal
    from train.module import optimizer_param_names
    from train.tasks.model import load_checkpoint_model

    d, _ = runs
    steps = {w: d / w / "checkpoints" / f"step-{SAVED}" for w in WRITERS}
    names = optimizer_param_names(load_checkpoint_model(steps["ddp_x1"]))
    ref = read_universal(steps["ddp_x1"], read_meta(steps["ddp_x1"]), names)
    assert ref.training["LMDataModule"] == {"consumed_samples": SAVED * GLOBAL}
    for w in WRITERS[1:]:
        got = read_universal(steps[w], read_meta(steps[w]), names)
        assert got.step == SAVED and got.training["LMDataModule"] == ref.training["LMDataModule"], w
        assert [g["params"] for g in got.optimizer["param_groups"]] == names, w
        for g, r in zip(got.optimizer["param_groups"], ref.optimizer["param_groups"]):
            assert (g["lr"], g["weight_decay"]) == pytest.approx((r["lr"], r["weight_decay"])), w
        for n, want in ref.optimizer["state"].items():
            have = got.optimizer["state"][n]
            assert float(have["step"]) == SAVED, (w, n)
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(have[k], want[k], rtol=1e-4, atol=1e-4 * want[k].abs().max().item(),
                                           msg=f"{w} {n} {k}")
        assert got.training["lr_schedulers"] == ref.training["lr_schedulers"], w


@pytest.mark.parametrize("writer,reader", PAIRS, ids=[f"{w}-to-{r}" for w, r in PAIRS])
def test_resume_under_another_strategy_and_world_size_equals_the_writers_continuation(runs, writer, reader):
    d, results = runs
    assert results[writer][0] == 0, results[writer][1]
    code, out, _ = results[f"{writer}-to-{reader}"]
    assert code == 0, out
    run_dir = d / f"{writer}-to-{reader}"
    got, want = losses(run_dir), losses(d / writer)
    assert sorted(got) == list(range(SAVED + 1, S + 1))  # resumed at the saved step, not started afresh
    for s in got:
        assert abs(got[s] - want[s]) <= RTOL * abs(want[s]), (s, got[s], want[s])
    a = load_file(str(run_dir / "checkpoints" / f"step-{S}" / "model.safetensors"))
    b = load_file(str(d / writer / "checkpoints" / f"step-{S}" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL_W, msg=k)
