"""The checkpoint callbacks (the format and its IO: train/checkpoint/io.py).

- `StepCheckpoint`: checkpoints/step-N every `every_n_steps` optimizer steps and at the end (training state
  included: what `resume` continues from), the `last` pointer, keep-last-k.
- `BestCheckpoint`: checkpoints/best at the best value of a fine-tuning task's monitored metric (weights only: what
  the export holds, and a valid `model.init_from`).
- `HFExport`: run_dir/hf at the end of a completed fit (the best model where there is one), + what the task adds.

Each has `summary_fields()`: what it adds to the run's summary.json (train.callbacks.loggers.RunSummary).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from train.checkpoint.async_io import after_save
from train.checkpoint.layout import best_dir, retain, step_dir, write_last
from train.checkpoint.weights import save_model_dir
from train.config import ConfigError
from train.adapters.lora import is_lora, merged_model, save_adapter, trainable_only
from train.strategies import full_state_dict, model_for_export
from train.strategies.engines.fsdp2 import plain_class

log = logging.getLogger(__name__)


class StepCheckpoint(Callback):
    """checkpoints/step-N every `every_n_steps` optimizer steps and at the end; `last` pointer; keep-last-k.

    A checkpoint is published only after everything the run logs for its step: the module's train row is written
    first, and at a step that also validates (`val_every_n_steps`) the save waits for the end of that validation
    (so a run killed right after step-N is published, then resumed, still has row N with its val metrics, and
    BestCheckpoint's state in the checkpoint includes step N). If that validation does not happen after all (no
    validation data), the save happens before the next batch.
    `protect`: the checkpoint this run resumed from, never deleted by retention.
    """

    def __init__(self, run_dir: str | os.PathLike, every_n_steps: int, keep_last: int, save_final: bool = True,
                 protect: Optional[Path] = None, val_every_n_steps: Optional[int] = None):
        self.run_dir = Path(run_dir)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.save_final = save_final
        self.protect = protect
        self.val_every_n_steps = val_every_n_steps
        self._last_step = -1
        self._due: Optional[int] = None  # a save waiting for this step's validation
        self.saved: list[Path] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if step % self.every_n_steps == 0:
            last = trainer.max_steps is not None and 0 < trainer.max_steps <= step  # validates too (ValidateLastStep)
            if self.val_every_n_steps and (step % self.val_every_n_steps == 0 or last):
                self._due = step
            else:
                self.save(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._due == trainer.global_step and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.save(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._due is not None and self._due == trainer.global_step:  # no validation ran after all
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if (self.save_final and trainer.global_step > 0) or self._due == trainer.global_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        self._due = None
        path = step_dir(self.run_dir, trainer.global_step)
        if self.saved and self.saved[-1] == path:
            return path
        log_train_step = getattr(trainer.lightning_module, "log_train_step", None)
        if log_train_step is not None:
            log_train_step()  # row N reaches metrics.csv before step-N is published
        trainer.save_checkpoint(path, weights_only=False)  # -> DirCheckpointIO (rank 0 writes for single-device/DDP)
        if trainer.is_global_zero:
            # with checkpoint.async_save the write is still under way: the pointer moves and retention deletes
            # only after it is published (train/checkpoint/async_io.py)
            after_save(trainer.strategy, lambda: self._published(path))
        trainer.strategy.barrier("StepCheckpoint.save")
        self.saved.append(path)
        return path

    def _published(self, path: Path) -> None:
        write_last(self.run_dir, path)
        retain(self.run_dir, self.keep_last, protect=(self.protect,) if self.protect else ())

    def summary_fields(self) -> dict[str, Any]:
        """{"checkpoint": the newest checkpoint this process saved, or None}."""
        return {"checkpoint": str(self.saved[-1]) if self.saved else None}


class BestCheckpoint(Callback):
    """checkpoints/best/: the model at the best value of `monitor` seen at a validation (ties keep the earlier).

    Reads the module's `last_val_metrics` at each validation end; the best value travels with every step checkpoint
    (`state_dict`), so a resumed run compares against it.
    """

    def __init__(self, run_dir: str | os.PathLike, monitor: str, mode: str = "max", meta: Optional[dict] = None):
        self.path = best_dir(run_dir)
        self.monitor, self.mode = monitor, mode
        self.meta = dict(meta or {})
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None

    def _better(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.best is None:
            return True
        return v > self.best if self.mode == "max" else v < self.best

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = pl_module.last_val_metrics
        if not metrics:
            return
        if self.monitor not in metrics:
            raise ConfigError(
                f"task.monitor={self.monitor} is not a metric of this task; use one of {', '.join(sorted(metrics))}."
            )
        v = float(metrics[self.monitor])
        if not self._better(v):
            return
        self.best, self.best_step = v, trainer.global_step
        state = full_state_dict(trainer, pl_module)  # every rank: FSDP / ZeRO-3 gather their shards
        if trainer.is_global_zero:
            state = trainable_only(state, pl_module.model)  # LoRA: the adapters and the head
            meta = dict(self.meta, global_step=trainer.global_step, task=plain_class(pl_module.model).__name__,
                        monitor=self.monitor, mode=self.mode, value=v, metrics=dict(metrics))
            save_model_dir(state, pl_module.model.config, self.path, meta)
        trainer.strategy.barrier("BestCheckpoint.save")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "monitor": self.monitor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("monitor") == self.monitor:
            self.best, self.best_step = state.get("best"), state.get("best_step")

    def summary_fields(self) -> dict[str, Any]:
        """{"monitor": the metric, "monitor_mode": "max" | "min"}."""
        return {"monitor": self.monitor, "monitor_mode": self.mode}


class HFExport(Callback):
    """run_dir/hf when a fit completes (reaches trainer.max_steps): the HF export (train.checkpoint.export.export_hf)
    of checkpoints/best when `best` holds one, else of the final weights, then what the task writes next to it
    (`task.after_export`: samples.txt for lm). A fit stopped early (preemption) is not done: nothing is exported.

    Runs at `on_fit_end`, after the last step's validation (inside fit) and the final checkpoint. Every rank takes
    part (FSDP2 / ZeRO-3 gather the full weights); rank 0 writes. Raises GuardError when the weights hold NaN/Inf.
    After fit, `summary_fields()` gives {"hf_dir", "best" (when the export is the best model), + the task's files}.
    """

    def __init__(self, run_dir: str | os.PathLike, tokenizer: Any, task: Any, sample_cfg: Any,
                 best: Optional[BestCheckpoint] = None):
        self.run_dir = Path(run_dir)
        self.tokenizer, self.task, self.sample_cfg, self.best = tokenizer, task, sample_cfg, best
        self.fields: dict[str, Any] = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        if not (trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step):
            return
        from train.trainer import check_finite_weights
        from train.checkpoint.export import export_hf
        from train.checkpoint.weights import load_best_into

        net = model_for_export(trainer, pl_module)  # every rank
        if net is None:  # not rank 0
            return
        if self.best is not None and self.best.best is not None:
            best = load_best_into(net, self.run_dir)
            if best is not None:  # the export is the best model
                self.fields["best"] = {"metric": self.best.monitor, "mode": self.best.mode, "value": best["value"],
                                       "step": best["global_step"], "metrics": best.get("metrics", {}),
                                       "path": str(self.best.path)}
                log.info("best %s=%.4f at step %d -> %s", self.best.monitor, best["value"], best["global_step"],
                         self.run_dir / "hf")
        check_finite_weights(net, trainer.global_step)
        if is_lora(net):  # run_dir/adapter (PEFT format), then the merged model is the export
            base = (pl_module.meta.get("peft") or {}).get("base_model")
            self.fields["adapter_dir"] = str(save_adapter(net, self.run_dir / "adapter", base))
            log.info("wrote the LoRA adapter %s (base %s)", self.fields["adapter_dir"], base)
            net = merged_model(net)
        tokenizer = self.task.export_tokenizer(self.tokenizer)  # with training's input layout (prefix space, pairs)
        self.fields["hf_dir"] = str(export_hf(net, tokenizer, self.run_dir / "hf", overwrite=True))
        log.info("exported %s (loads in transformers.%s)", self.fields["hf_dir"], self.task.hf_class)
        self.fields.update(self.task.after_export(net, self.tokenizer, self.sample_cfg, self.run_dir))

    def summary_fields(self) -> dict[str, Any]:
        return dict(self.fields)


__all__ = ["BestCheckpoint", "HFExport", "StepCheckpoint"]
