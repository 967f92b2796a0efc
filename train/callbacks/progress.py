"""The progress bar of a run: optimizer steps, not epochs (the training stream never ends)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, counting micro-batches up to max_steps x accumulation (the train loader never ends)."""

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = trainer.max_steps * trainer.accumulate_grad_batches
        done = trainer.global_step * trainer.accumulate_grad_batches
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.initial = done
        self.train_progress_bar.n = done
        self.train_progress_bar.set_description(f"train (steps of {trainer.accumulate_grad_batches} batch)")

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
