"""The progress bar of a run: optimizer steps, not epochs (the training stream never ends)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


# The bar's numbers and the metric rows they come from (GPT2LitModule.last_logged: the latest value of each).
BAR_METRICS = {"train/loss": "loss", "lr": "lr", "tokens_per_sec": "tok/s"}


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, counting micro-batches up to max_steps x accumulation (the train loader never ends).

    It shows the latest logged row's loss, lr and tokens/s read from the module's `last_logged`, not values passed
    through `self.log(..., prog_bar=True)`: at nanoGPT's CPU dims Lightning's result collection took ~1 % of the
    training loop (py-spy) for these three numbers, which every metrics row already holds.
    """

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
        last = getattr(pl_module, "last_logged", None) or {}
        items.update({name: last[key] for key, name in BAR_METRICS.items() if key in last})
        return items
