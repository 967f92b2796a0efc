"""The random state of a run: `RNGState` saves and restores every RNG with the checkpoints, `StepSeed` reseeds torch
before each micro-batch, so a resumed run draws the same dropout masks as an uninterrupted one."""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RNGState(Callback):
    """Torch (CPU + CUDA), numpy and python RNG states in every checkpoint; restored when training resumes.

    Stored as tensors and lists (weights_only-loadable). Restoring happens at `on_train_start`, after Lightning has
    restored everything else and right before the first resumed batch is drawn.
    """

    def __init__(self):
        self._pending: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        py_state = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_num, np_state[2:])],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        s, self._pending = self._pending, None
        if not s:
            return
        torch.set_rng_state(s["torch"])
        n = s["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
        p = s["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])


def _num(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


class StepSeed(Callback):
    """Reseed torch before every training micro-batch from (seed, rank, micro-batch index).

    Dropout masks then depend only on where a batch sits in the run, not on how much randomness something else
    (a validation pass, a DataLoader iterator's base seed) drew before it, so an interrupted-and-resumed run draws
    exactly the same masks as an uninterrupted one.

    seed: the base seed; None takes the one `lightning.seed_everything` set (its PL_GLOBAL_SEED environment variable,
    which Lightning's own `reset_seed` and DataLoader worker seeding read). Raises RuntimeError at fit start when
    neither is there.
    """

    def __init__(self, seed: Optional[int] = None):
        self.seed = seed
        self._step = -1
        self._k = 0  # micro-batch index inside the current accumulation window

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.seed is None:
            if "PL_GLOBAL_SEED" not in os.environ:
                raise RuntimeError("StepSeed() needs lightning.seed_everything(seed) before fit, or StepSeed(seed).")
            self.seed = int(os.environ["PL_GLOBAL_SEED"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self._k = self._k + 1 if step == self._step else 0
        self._step = step
        index = step * trainer.accumulate_grad_batches + self._k
        seed = (self.seed * 1_000_003 + trainer.global_rank * 7919 + index) % (2**63 - 1)
        torch.default_generator.manual_seed(seed)  # torch.manual_seed walks every backend: ~100x slower
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(seed)
