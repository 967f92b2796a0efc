"""Muon vs AdamW: optimizer steps to reach AdamW's final validation loss, demo model, embedded corpus, 3 seeds.

The target of seed s: the final validation loss of `python train/run.py seed=s` as it is (optim=adamw at its tuned
default lr, 900 steps), so every comparison is paired by seed (same initial weights, same data order) and AdamW at
its default reaches its own target by step 900. Each optimizer gets its best lr from a small sweep run on the first
seed (AdamW: optim.lr; Muon: optim.muon_lr, its AdamW part keeping optim.lr's default): the lr that reaches that
seed's target in the fewest steps (ties: the lower final loss); it is then run on every seed. "Steps to the target"
is the first step at which the validation loss is <= the target, linearly interpolated between the two validations
around the crossing (validation every --val-every steps, default 50, on the same first 20 validation batches); a
run that never gets there counts as not reaching it (reported as "> max_steps"). The schedule is the default one
(warm-up 90 steps, cosine over 900) for every run, so a faster optimizer reaches the target before the decay ends.

Every run is a fresh `python train/run.py` process with the default config plus the overrides printed; their
metrics.csv are kept in --work-dir, and a run whose metrics are already there is not repeated (rerun to resume an
interrupted benchmark). --jobs runs go at a time, each with (cores / jobs) intra-op threads. Goal: Muon's mean
steps <= 0.8 x AdamW's.

    python benchmarks/muon.py [--seeds 3 --adamw-lrs 1.5e-3,3e-3,6e-3 --muon-lrs 0.02,0.04,0.01 --jobs 2 --work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import NO_RECORD_HELP, machine_line, recorded  # noqa: E402  benchmarks/common.py (run as a script)
from train.callbacks.loggers import read_metrics  # noqa: E402

ADAMW_DEFAULT_LR = 3e-3  # conf/optim/adamw.yaml (OptimConfig.lr)
RUN_SECONDS: dict[str, float] = {}  # each run's own wall time (its summary.json), trained here or reused


def run_once(work: Path, optim: str, lr: float, seed: int, args) -> tuple[list[tuple[int, float]], Optional[float]]:
    """Train once (or reuse a finished run in `work`); returns ([(step, val loss)], wall seconds or None if reused)."""
    name = f"{optim}-lr{lr:g}-seed{seed}"
    run_dir = work / name
    wall = None
    if not (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again
        t0 = time.perf_counter()
        lr_key = "optim.lr" if optim == "adamw" else "optim.muon_lr"
        cmd = [sys.executable, str(ROOT / "train" / "run.py"), f"optim={optim}", f"{lr_key}={lr}", f"seed={seed}",
               f"trainer.max_steps={args.max_steps}", f"trainer.val_check_interval={args.val_every}",
               "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=100000", "sample.max_new_tokens=0",
               f"run_dir={run_dir}"]
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=threads)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
        wall = time.perf_counter() - t0
    RUN_SECONDS[name] = json.loads((run_dir / "summary.json").read_text())["seconds"]
    rows = read_metrics(run_dir / "metrics.csv")
    curve = [(int(r["step"]), r["val/loss"]) for r in rows if r.get("val/loss") is not None]
    return curve, wall


def steps_to(curve: list[tuple[int, float]], target: float) -> Optional[float]:
    """The first step where the validation loss reaches `target`, interpolated linearly between validations; None if
    it never does."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            (s0, l0) = prev
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        prev = (step, loss)
    return None


def fmt(steps: Optional[float], max_steps: int) -> str:
    return f"> {max_steps}" if steps is None else f"{steps:.0f}"


def run_many(specs: list[tuple[str, float, int]], args, walls: list[float]) -> dict:
    """run_once for every (optim, lr, seed), --jobs at a time in submission order; {spec: curve}."""
    def one(spec):
        curve, wall = run_once(args.work_dir, *spec, args)
        print(f"  finished {spec[0]} lr {spec[1]:g} seed {spec[2]}: final val loss {curve[-1][1]:.4f}"
              + (f" in {wall:.0f} s" if wall is not None else " (reused)"), file=sys.stderr, flush=True)
        if wall is not None:
            walls.append(wall)
        return curve

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {spec: pool.submit(one, spec) for spec in dict.fromkeys(specs)}
    return {spec: f.result() for spec, f in futures.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--adamw-lrs", default="1.5e-3,3e-3,6e-3")
    ap.add_argument("--muon-lrs", default="0.02,0.04,0.01")
    ap.add_argument("--max-steps", type=int, default=900)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each with cores/jobs intra-op threads)")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpt2-forge-bench-muon")
    ap.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = ap.parse_args()
    with recorded("muon.py"):
        print(machine_line())
        t_start = time.perf_counter()
        args.work_dir.mkdir(parents=True, exist_ok=True)
        seeds = [1337 + i for i in range(args.seeds)]  # 1337: conf/config.yaml's seed
        sweeps = {"adamw": [float(x) for x in args.adamw_lrs.split(",")],
                  "muon": [float(x) for x in args.muon_lrs.split(",")]}
        walls: list[float] = []  # seconds of each run this invocation trained (reused runs are not counted)
        # phase 1, all independent: AdamW's default on every seed (the target) interleaved with Muon's sweep, then
        # the rest of AdamW's sweep; phase 2: every seed at each optimizer's best lr
        base_specs = [("adamw", ADAMW_DEFAULT_LR, s) for s in seeds]
        muon_specs = [("muon", lr, seeds[0]) for lr in sweeps["muon"]]
        first = [x for pair in zip(base_specs, muon_specs) for x in pair]
        first += base_specs[len(muon_specs):] + muon_specs[len(base_specs):]
        first += [("adamw", lr, seeds[0]) for lr in sweeps["adamw"]]
        curves = run_many(first, args, walls)
        target = {spec[2]: curves[spec][-1][1] for spec in base_specs}  # seed -> AdamW's final validation loss
        print(f"targets: AdamW lr {ADAMW_DEFAULT_LR:g} final validation loss at step {args.max_steps}, per seed: "
              f"{', '.join(f'{s} {t:.4f}' for s, t in target.items())}")
        best = {}
        for optim in ("adamw", "muon"):
            ranked = []
            for lr in sweeps[optim]:
                curve = curves[(optim, lr, seeds[0])]
                st = steps_to(curve, target[seeds[0]])
                ranked.append((st if st is not None else float("inf"), curve[-1][1], lr))
                print(f"sweep {optim:5s} lr {lr:<7g} seed {seeds[0]}: steps to target {fmt(st, args.max_steps):>6}, "
                      f"final val loss {curve[-1][1]:.4f}")
            best[optim] = min(ranked)[2]
        curves.update(run_many([(o, best[o], s) for o in ("adamw", "muon") for s in seeds], args, walls))
        results = {}
        for optim in ("adamw", "muon"):
            runs = [curves[(optim, best[optim], s)] for s in seeds]
            results[optim] = [steps_to(c, target[s]) for c, s in zip(runs, seeds)]
            print(f"{optim:5s} best lr {best[optim]:g}: steps to target per seed "
                  f"{', '.join(fmt(x, args.max_steps) for x in results[optim])}; final val loss mean "
                  f"{statistics.mean(c[-1][1] for c in runs):.4f}")
        a, m = results["adamw"], results["muon"]
        if None in a or None in m:
            print("ratio muon/adamw: n/a (a run did not reach the target; goal <= 0.8)")
        else:
            ratio = statistics.mean(m) / statistics.mean(a)
            print(f"steps to target, mean: muon {statistics.mean(m):.0f} / adamw {statistics.mean(a):.0f} = "
                  f"{ratio:.3f}x (goal <= 0.8)")
        secs = list(RUN_SECONDS.values())
        print(f"runs: {len(secs)} of {args.max_steps} steps, {statistics.mean(secs):.0f} s each on average "
              f"({min(secs):.0f}..{max(secs):.0f}: run.py's own wall time, sharing the CPU with the runs beside it), "
              f"{sum(secs) / 60:.0f} min in all; this invocation trained {len(walls)} of them in "
              f"{time.perf_counter() - t_start:.0f} s and reused the rest from --work-dir")


if __name__ == "__main__":
    main()
