"""Callbacks and the metrics.csv logger of a training run.

- `MetricsCSV`: a Lightning logger writing `run_dir/metrics.csv`, one row per optimizer step (columns step,
  train/loss, val/loss, val/ppl, lr, tokens_per_sec, mfu, then any task metric); on resume it keeps the rows up to
  the resume step and appends after them.
- `Throughput`: tokens/s over each logging interval and MFU (model FLOPs utilisation, PaLM appendix B) on known GPUs.
- `RNGState`: saves the torch / CUDA / numpy / python RNG states in every checkpoint and restores them on resume.
- `StepCheckpoint`: `checkpoints/step-N/` every `every_n_steps` and at the end, the `last` pointer, keep-last-k.
- `StepProgressBar`: Lightning's tqdm bar counting optimizer steps up to max_steps.
- `plot_losses`: plots/loss.png from metrics.csv (matplotlib, Agg backend).
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from train import checkpoint as ckpt_io

BASE_COLUMNS = ["step", "train/loss", "val/loss", "val/ppl", "lr", "tokens_per_sec", "mfu"]


# ------------------------------------------------------------------------------------------------ metrics.csv
class MetricsCSV(Logger):
    """run_dir/metrics.csv: one row per step; rows logged for the same step are merged.

    A row is written once its step is complete (a later step is logged, or on save/finalize), so train and val
    metrics of one step share a row. `resume_step`: keep the existing rows with step <= resume_step (the steps a
    resumed run repeats are dropped and written again).
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: Optional[int] = None):
        super().__init__()
        self.path = Path(run_dir) / "metrics.csv"
        # rows read back from disk hold strings; keep them as they were written
        self.columns = list(BASE_COLUMNS)
        self.rows: dict[int, dict[str, Any]] = {}  # pending (not yet written) rows
        self._written: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("step") and int(row["step"]) <= resume_step:
                        self._written.append(row)
                        self.columns += [c for c in row if c not in self.columns]
        self._rewrite()

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> str:
        return "0"

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is run_dir/config.yaml

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        step = int(step or 0)
        row = self.rows.setdefault(step, {"step": step})
        for k, v in metrics.items():
            if k == "epoch":
                continue
            row[k] = float(v.item() if isinstance(v, torch.Tensor) else v)
        done = [s for s in self.rows if s < step]
        if done:
            self._flush(done)

    def _flush(self, steps: list[int]) -> None:
        rows = [self.rows.pop(s) for s in sorted(steps)]
        new_cols = [k for r in rows for k in r if k not in self.columns]
        by_step = {int(r["step"]): r for r in self._written[-8:]}  # a later metric of an already written step
        merged = False
        for r in rows:
            if r["step"] in by_step:
                by_step[r["step"]].update(r)
                merged = True
            else:
                self._written.append(r)
        if new_cols or merged:
            self.columns += list(dict.fromkeys(c for c in new_cols if c not in self.columns))
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writerows(_fmt(r) for r in rows)

    @rank_zero_only
    def flush(self) -> None:
        """Write every pending row now (called after each logged step, so a SIGKILL loses no logged row)."""
        if self.rows:
            self._flush(list(self.rows))

    def _rewrite(self) -> None:
        if not rank_zero_only.rank == 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"metrics.csv.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(_fmt(r) for r in self._written)
        os.replace(tmp, self.path)

    @rank_zero_only
    def save(self) -> None:
        self.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def _fmt(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()}


def read_metrics(path: str | os.PathLike) -> list[dict[str, Optional[float]]]:
    """metrics.csv as a list of {column: float or None}."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
    return out


# ------------------------------------------------------------------------------------------------ throughput / MFU
# Peak dense bf16 tensor-core FLOP/s (vendor data sheets: A100 SXM 312 TFLOP/s, H100 SXM 989, H200 989).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def flops_per_token(config: Any, seq_len: int) -> float:
    """6N + 12·L·H·Q·T training FLOPs per token (N non-embedding params; PaLM appendix B); gpt2's if it has one."""
    try:
        from gpt2.modeling import flops_per_token as fpt

        return float(fpt(config, seq_len))
    except ImportError:
        pass
    d, L_, inner = config.n_embd, config.n_layer, (config.n_inner or 4 * config.n_embd)
    n = L_ * (4 * d * d + 4 * d + 2 * d * inner + inner + d + 4 * d)  # attn qkv+proj, mlp, 2 LayerNorms per block
    return 6.0 * n + 12.0 * L_ * config.n_head * (d // config.n_head) * seq_len


class Throughput(Callback):
    """tokens/s (all ranks) over each logging interval; MFU against the device's peak bf16 FLOP/s when known."""

    def __init__(self, log_every_n_steps: int):
        self.log_every_n_steps = log_every_n_steps
        self._t0: Optional[float] = None
        self._tokens = 0
        self._last_step = -1
        self._flops_per_token: Optional[float] = None
        self._peak: Optional[float] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._peak = peak_flops(pl_module.device)
        self._t0 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:  # the first interval starts at the first batch (excludes start-up time)
            self._sync(pl_module)
            self._t0 = time.perf_counter()
            self._tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = batch["input_ids"]
        self._tokens += ids.numel() * trainer.world_size
        if self._flops_per_token is None:
            self._flops_per_token = flops_per_token(pl_module.model.config, ids.shape[1])
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if not (step % self.log_every_n_steps == 0 or step >= trainer.max_steps):
            return
        self._sync(pl_module)
        now = time.perf_counter()
        tps = self._tokens / max(now - self._t0, 1e-9)
        metrics = {"tokens_per_sec": tps}
        if self._peak:
            metrics["mfu"] = self._flops_per_token * tps / (self._peak * trainer.world_size)
        pl_module.emit_metrics(metrics, step)
        pl_module.log("tok/s", tps, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self._t0, self._tokens = now, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t0 = None  # validation time is not training throughput

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


# ------------------------------------------------------------------------------------------------ RNG states
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
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._step = -1
        self._k = 0  # micro-batch index inside the current accumulation window

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self._k = self._k + 1 if step == self._step else 0
        self._step = step
        index = step * trainer.accumulate_grad_batches + self._k
        seed = (self.seed * 1_000_003 + trainer.global_rank * 7919 + index) % (2**63 - 1)
        torch.default_generator.manual_seed(seed)  # torch.manual_seed walks every backend: ~100x slower
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(seed)


# ------------------------------------------------------------------------------------------------ checkpoints
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
            if self.val_every_n_steps and step % self.val_every_n_steps == 0:
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
        path = ckpt_io.step_dir(self.run_dir, trainer.global_step)
        if self.saved and self.saved[-1] == path:
            return path
        log_train_step = getattr(trainer.lightning_module, "log_train_step", None)
        if log_train_step is not None:
            log_train_step()  # row N reaches metrics.csv before step-N is published
        trainer.save_checkpoint(path, weights_only=False)  # -> DirCheckpointIO (rank 0 writes for single-device/DDP)
        if trainer.is_global_zero:
            ckpt_io.write_last(self.run_dir, path)
            ckpt_io.retain(self.run_dir, self.keep_last, protect=(self.protect,) if self.protect else ())
        trainer.strategy.barrier("StepCheckpoint.save")
        self.saved.append(path)
        return path


# ------------------------------------------------------------------------------------------------ progress bar
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


# ------------------------------------------------------------------------------------------------ plot
def plot_losses(metrics_csv: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """plots/loss.png: train loss (and val loss where measured) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), style, label=key, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
