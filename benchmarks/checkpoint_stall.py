"""Checkpoint stall benchmark: how long the training loop waits at a checkpoint step, checkpoint.async_save off vs on.

    python benchmarks/checkpoint_stall.py                          # gpt2-medium, ddp / fsdp / deepspeed_zero3, 2 CPU ranks
    python benchmarks/checkpoint_stall.py --model tiny --no-record # a smoke run (~2 min)

For each strategy, `torchrun --nproc-per-node D train/run.py` trains `--steps` optimizer steps with one checkpoint,
at step `--save-at` (checkpoint.every_n_steps; no final save, no validation), once with checkpoint.async_save=false
and once with =true, in that order, on the same data and model. The runs go through a small wrapper (written by
this script, not product code) that times train/checkpoint/callbacks.py's `StepCheckpoint.save` on every rank: the
whole time the loop is held at that step (the strategy's save, the `last` pointer for a synchronous save, the
barrier), and on rank 0 when the checkpoint is published (the `last` pointer moves). Printed per strategy:
  stall     seconds inside StepCheckpoint.save (the slowest rank: they leave it together), sync and async, and the
            ratio sync / async (> 1: async stalls less)
  publish   async: seconds from the start of the save until the checkpoint is published (the background write)
  steps     the median time of the optimizer steps after the save (sync: undisturbed; async: the first of them run
            beside the background write, which takes CPU and memory bandwidth from them)
The model is `--model` with model.vocab_size=50257 (GPT-2's vocabulary: gpt2-medium is then its 355M parameters),
trained on the embedded corpus with a 512-token BPE, micro-batch 1 x 64 tokens, fp32 AdamW: a checkpoint holds the
weights + two Adam moments (~4.3 GB at gpt2-medium). Each run's checkpoint is checked to be complete (meta.json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import NO_RECORD_HELP, corpus_text, machine_line, recorded  # benchmarks/common.py (run as a script)

ROOT = Path(__file__).resolve().parents[1]

# train/run.py's Hydra main with StepCheckpoint.save and the publish step timed; torchrun runs it on every rank
WRAPPER = r'''
import json, os, runpy, sys, time
import train
from train.checkpoint import callbacks as cb

out = os.environ["STALL_LOG"]
rank = int(os.environ.get("RANK", "0"))
orig_save, orig_published, orig_batch_end = cb.StepCheckpoint.save, cb.StepCheckpoint._published, \
    cb.StepCheckpoint.on_train_batch_end
starts = {}

def record(**row):
    with open(out, "a") as f:
        f.write(json.dumps(dict(rank=rank, **row)) + "\n")

def save(self, trainer):
    step, t0 = trainer.global_step, time.perf_counter()
    starts[step] = t0
    path = orig_save(self, trainer)
    record(event="save", step=step, seconds=time.perf_counter() - t0)
    return path

def published(self, path):
    orig_published(self, path)
    step = int(path.name.split("-")[1])
    record(event="published", step=step, seconds=time.perf_counter() - starts[step])

def on_train_batch_end(self, trainer, *args):
    record(event="step_end", step=trainer.global_step, t=time.perf_counter())
    orig_batch_end(self, trainer, *args)
    record(event="hook_end", step=trainer.global_step, t=time.perf_counter())

cb.StepCheckpoint.save, cb.StepCheckpoint._published = save, published
cb.StepCheckpoint.on_train_batch_end = on_train_batch_end
run_py = os.path.join(os.path.dirname(train.__file__), "run.py")
runpy.run_path(run_py, run_name="__main__")  # as a script, so Hydra finds ../conf next to it
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(strategy: str, async_save: bool, args, work: Path) -> dict:
    """One training run; returns {"stall": s, "publish": s or None, "steps": [s, ...] after the save}."""
    name = f"{strategy}-{'async' if async_save else 'sync'}"
    run_dir, log_file = work / name, work / f"{name}.jsonl"
    overrides = [f"model={args.model}", "model.vocab_size=50257", "model.dropout=0.0", "data=text",
                 f"data.path={work / 'input.txt'}", f"data.cache_dir={work / 'cache'}", "data.vocab_size=512",
                 "data.block_size=64", "data.batch_size=1", f"strategy={strategy}", f"trainer.devices={args.devices}",
                 "trainer.accelerator=cpu", f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0",
                 "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
                 f"checkpoint.every_n_steps={args.save_at}", "checkpoint.save_final=false", "checkpoint.keep_last=0",
                 f"checkpoint.async_save={str(async_save).lower()}", "sample.max_new_tokens=1", f"run_dir={run_dir}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.devices),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(work / "wrapper.py"), *overrides]
    env = dict(os.environ, STALL_LOG=str(log_file), PYTHONPATH=str(ROOT))
    with open(work / f"{name}.log", "w") as log:
        if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
            raise RuntimeError(f"{name} failed; see the end of {work / f'{name}.log'}:\n"
                               + (work / f"{name}.log").read_text()[-3000:])
    if not (run_dir / "checkpoints" / f"step-{args.save_at}" / "meta.json").is_file():
        raise RuntimeError(f"{name}: checkpoints/step-{args.save_at} is not complete")
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    stall = max(r["seconds"] for r in rows if r["event"] == "save" and r["step"] == args.save_at)
    publish = [r["seconds"] for r in rows if r["event"] == "published" and r["step"] == args.save_at]
    ends = {r["step"]: r["t"] for r in rows if r["event"] == "hook_end" and r["rank"] == 0}
    starts = {r["step"]: r["t"] for r in rows if r["event"] == "step_end" and r["rank"] == 0}
    steps = [starts[s] - ends[s - 1] for s in range(args.save_at + 1, args.steps + 1) if s in starts and s - 1 in ends]
    return {"stall": stall, "publish": publish[0] if publish else None, "steps": steps}


def line(strategy: str, sync: dict, asyn: dict) -> str:
    first = asyn["steps"][0] if asyn["steps"] else float("nan")
    return (f"{strategy:<16} stall sync {sync['stall']:6.2f} s  async {asyn['stall']:6.2f} s  "
            f"ratio {sync['stall'] / asyn['stall']:5.1f}x  | async published after {asyn['publish']:6.2f} s  | "
            f"step after the save: sync {statistics.median(sync['steps']):5.2f} s, async first {first:5.2f} s "
            f"(median {statistics.median(asyn['steps']):5.2f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="ddp,fsdp,deepspeed_zero3")
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    p.add_argument("--save-at", type=int, default=2, help="the step that checkpoints")
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = p.parse_args()
    with recorded("checkpoint_stall"), tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "input.txt").write_text(corpus_text(120_000))
        (work / "wrapper.py").write_text(WRAPPER)
        print(machine_line())
        print(f"model={args.model} (vocab 50257), {args.devices} ranks, fp32 AdamW, checkpoint at step {args.save_at} "
              f"of {args.steps}")
        for strategy in args.strategies.split(","):
            sync = run(strategy, False, args, work)
            asyn = run(strategy, True, args, work)
            print(line(strategy, sync, asyn), flush=True)


if __name__ == "__main__":
    main()
