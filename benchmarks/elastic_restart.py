"""Elastic restart benchmark: how long a torchrun restart takes after a worker dies, and what a checkpoint weighs.

    python benchmarks/elastic_restart.py                       # model=tiny, ddp / fsdp / deepspeed_zero2, 2 CPU ranks
    python benchmarks/elastic_restart.py --strategies fsdp --model demo --devices 2

For each strategy: `torchrun --nproc-per-node D --max-restarts 1 ... train/run.py resume=auto` is started, and half a
checkpoint interval after checkpoints/step-K is published, the worker with RANK=1 is SIGKILLed. Printed per strategy:
  restart  seconds from the kill to the first optimizer step of the restarted workers (their first row in
           metrics.csv: written right after that step), split into the time until the restarted job has built its
           loggers (metrics.csv rewritten down to the resumed step: torchrun noticed, stopped the group and started
           the workers, which imported torch / Lightning, read the data and built the model) and the rest (the
           strategy and its process group, the checkpoint load, the step itself)
  redone   optimizer steps the restarted workers did again (between the checkpoint and the kill)
  ckpt     bytes of checkpoints/step-K on disk, and of its model.safetensors alone (the rest: optimizer state and
           the strategy's own shards)
The run must exit 0. No baseline: what it costs is start-up, not our code's speed; the figure is the price of a fault.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import NO_RECORD_HELP, corpus_text, machine_line, recorded  # benchmarks/common.py (run as a script)

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "last").read_text().strip().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return -1


def logged_steps(run_dir: Path) -> list[int]:
    try:
        lines = (run_dir / "metrics.csv").read_text().splitlines()[1:]
    except FileNotFoundError:
        return []
    return [int(line.split(",", 1)[0]) for line in lines if line.split(",", 1)[0].isdigit()]


def wait_until(cond, proc: subprocess.Popen, what: str, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"the run exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.005)
    return time.monotonic()


def worker_with_rank(agent: int, rank: int) -> int:
    for pid in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise RuntimeError(f"no worker with RANK={rank}")


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def one(strategy: str, args, work: Path) -> str:
    run_dir = work / strategy
    overrides = [f"model={args.model}", "data=text", f"data.path={work / 'input.txt'}",
                 f"data.cache_dir={work / 'cache'}", "data.vocab_size=512", "data.block_size=64", "data.batch_size=4",
                 f"strategy={strategy}", f"trainer.devices={args.devices}", "trainer.accelerator=cpu",
                 f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
                 "trainer.enable_progress_bar=false", f"checkpoint.every_n_steps={args.every}",
                 "sample.max_new_tokens=2", f"run_dir={run_dir}", "resume=auto"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.devices), "--max-restarts", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "train/run.py", *overrides]
    log = open(work / f"{strategy}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: newest_step(run_dir) >= args.kill_after, proc, f"checkpoint step-{args.kill_after}")
        resumed = newest_step(run_dir)
        # mid-interval, as a fault lands: a few steps after the checkpoint, which the restart then redoes
        wait_until(lambda: max(logged_steps(run_dir), default=0) >= resumed + args.every // 2, proc, "the kill step")
        os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
        t_kill = time.monotonic()
        killed_at = max(logged_steps(run_dir), default=0)
        if newest_step(run_dir) != resumed:
            raise RuntimeError("a checkpoint was published while the worker was killed; rerun")
        t_loggers = wait_until(lambda: max(logged_steps(run_dir), default=0) <= resumed, proc, "the restart")
        t_step = wait_until(lambda: resumed + 1 in logged_steps(run_dir), proc, "the first step after the restart")
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"{strategy}: exit {proc.returncode}; see {work / f'{strategy}.log'}")
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = run_dir / "checkpoints" / f"step-{resumed}"
    return (f"{strategy:<16} restart {t_step - t_kill:5.1f} s (restarted job's loggers {t_loggers - t_kill:5.1f} s, "
            f"then {t_step - t_loggers:4.1f} s to its first step)  redone {killed_at - resumed:3d} steps  "
            f"ckpt step-{resumed} {dir_bytes(ckpt) / 1e6:6.2f} MB (model.safetensors "
            f"{(ckpt / 'model.safetensors').stat().st_size / 1e6:5.2f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="ddp,fsdp,deepspeed_zero2")
    p.add_argument("--model", default="tiny")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--kill-after", type=int, default=20)
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = p.parse_args()
    with recorded("elastic_restart"), tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "input.txt").write_text(corpus_text(120_000))
        print(machine_line())
        for strategy in args.strategies.split(","):
            print(one(strategy, args, work), flush=True)


if __name__ == "__main__":
    main()
