"""Preemption: SIGUSR1 (SLURM's warning before the time limit, `#SBATCH --signal=USR1@90`) or SIGTERM (any
scheduler's "stop now") -> a checkpoint at the next optimizer-step boundary, then a clean stop; under SLURM a USR1
also requeues the job, and the requeued job resumes from that checkpoint (launch/slurm.py adds resume=auto).

Why not Lightning's own handling: its SLURM handler saves `hpc_ckpt_N.ckpt` *inside the signal handler* (a collective
run from a signal handler can deadlock under DDP) next to checkpoints/ where resume=auto never looks, and its
SIGTERM handler broadcasts inside the handler too. Here the handlers only set a flag; the ranks agree on it with one
all-reduce per optimizer step (`reduce_boolean_decision(any)`), then every rank saves through the same
`StepCheckpoint` path as the periodic checkpoints (checkpoints/step-N, atomic, `last` updated) and stops together.
train/strategies/:build_plugins passes SLURMEnvironment(auto_requeue=False) so Lightning installs no USR1 handler.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from train.checkpoint.async_io import wait_for_checkpoints

_NONE, _TERM, _USR1 = 0, 1, 2  # what a rank saw; the max over ranks decides (USR1 = requeue wins)


def slurm_job_id(env: Optional[dict] = None) -> Optional[str]:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array task, else SLURM_JOB_ID (None outside)."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def requeue(job_id: str, runner: Callable[..., Any] = subprocess.run) -> bool:
    """`scontrol requeue <job_id>`; True when Slurm accepted it."""
    try:
        r = runner(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        rank_zero_warn(f"scontrol requeue {job_id} failed ({e}); resubmit the job script to continue.")
        return False
    if r.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job_id} failed: {(r.stderr or r.stdout).strip()}")
        return False
    return True


def _is_lightning_handler(h: Any) -> bool:
    # Lightning's composed SIGTERM/USR1 handlers (trainer/connectors/signal_connector.py): replaced, not chained
    return type(h).__module__.startswith("lightning.")


class Preemption(Callback):
    """Save a checkpoint and stop on SIGUSR1/SIGTERM at a step boundary; requeue under SLURM on SIGUSR1.

    checkpoint: the run's `StepCheckpoint` (its `save(trainer)` writes checkpoints/step-N and barriers).
    After `fit`, `stopped` says the run stopped early for a signal (skip the final export: the run is not done),
    `signal_name` which one, `requeued` whether Slurm accepted the requeue.
    """

    def __init__(self, checkpoint, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.checkpoint = checkpoint
        self.signals = signals
        self.seen = _NONE  # set by the handler; read at the next step boundary
        self.stopped = False
        self.requeued = False
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    # -- handlers: registered at train start, after Lightning registered its own (so ours replace them)
    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works only in the main thread
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = max(self.seen, _USR1 if signum == signal.SIGUSR1 else _TERM)
        prev = self._previous.get(signum)
        if callable(prev) and not _is_lightning_handler(prev):
            prev(signum, frame)  # someone else's handler (e.g. a user's) still runs

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._previous.items():
            if prev is not None:
                signal.signal(sig, prev)
        self._previous.clear()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    # -- the decision, once per optimizer step
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or self.stopped:  # inside an accumulation window
            return
        self._last_step = step
        seen = self.seen
        if trainer.world_size > 1:  # every rank learns that one rank got the signal (any; USR1 wins)
            t = torch.tensor(seen, device=trainer.strategy.root_device)
            seen = int(trainer.strategy.reduce(t, reduce_op="max").item())
        if seen == _NONE:
            return
        self.signal_name = "SIGUSR1" if seen == _USR1 else "SIGTERM"
        path = self.checkpoint.save(trainer)  # every rank: checkpoints/step-N (atomic, `last`), then a barrier
        wait_for_checkpoints(trainer.strategy)  # checkpoint.async_save: published before the job may be requeued
        rank_zero_info(f"{self.signal_name}: saved {path} at step {step}; stopping")
        self.stopped = True
        job = slurm_job_id()
        if seen == _USR1 and job is not None and trainer.is_global_zero:
            self.requeued = requeue(job)
            if self.requeued:
                rank_zero_info(f"requeued SLURM job {job}; it resumes from {path.name}")
        trainer.should_stop = True

    def summary_fields(self) -> dict[str, Any]:
        """{"preempted": the signal, "requeued": bool} after a preemption stop; {} otherwise."""
        return {"preempted": self.signal_name, "requeued": self.requeued} if self.stopped else {}


__all__ = ["Preemption", "requeue", "slurm_job_id"]
