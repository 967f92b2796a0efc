"""The Lightning callbacks of a training run (train/trainer.py puts them on the Trainer, in this order):

- `StepSeed` (rng.py): reseeds torch before every micro-batch from (seed, rank, index), so dropout masks do not
  depend on what ran before; `RNGState` (rng.py): every RNG state in each checkpoint, restored on resume.
- `Throughput` (throughput.py): tokens/s over each logging interval, and MFU on known GPUs.
- `LossGuard` (guard.py): skips non-finite updates, rolls loss spikes back to the last checkpoint.
- `BestCheckpoint` (checkpointing.py): checkpoints/best at the best value of a fine-tuning task's monitored metric.
- `StepCheckpoint` (checkpointing.py): checkpoints/step-N every N steps and at the end, `last`, keep-last-k.
- `Preemption` (preemption.py): SIGUSR1 / SIGTERM -> a checkpoint at the next step boundary, stop, SLURM requeue.
- `StepProgressBar` (progress.py): Lightning's bar, counting optimizer steps.
"""

from train.callbacks.checkpointing import BestCheckpoint, StepCheckpoint
from train.callbacks.guard import GuardError, LossGuard, build_guard, check_finite_weights
from train.callbacks.preemption import Preemption
from train.callbacks.progress import StepProgressBar
from train.callbacks.rng import RNGState, StepSeed
from train.callbacks.throughput import Throughput

__all__ = [
    "BestCheckpoint",
    "GuardError",
    "LossGuard",
    "Preemption",
    "RNGState",
    "StepCheckpoint",
    "StepProgressBar",
    "StepSeed",
    "Throughput",
    "build_guard",
    "check_finite_weights",
]
