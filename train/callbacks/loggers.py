"""The loggers of a run: `metrics.csv` (always), W&B and TensorBoard (logger group), and the loss plot.

- `MetricsCSV`: a Lightning logger writing `run_dir/metrics.csv`, one row per optimizer step (columns step,
  train/loss, val/loss, val/ppl, lr, tokens_per_sec, mfu, then any task metric); on resume it keeps the rows up to
  the resume step and appends after them.
- `build_loggers`: the `logger` group -> [MetricsCSV, WandbLogger?, TensorBoardLogger?].
- `read_metrics` / `plot_losses`: metrics.csv back as numbers; plots/loss.png from it (matplotlib, Agg backend).
- `RunSummary`: run_dir/summary.json at the end of the fit, from metrics.csv and every callback's `summary_fields()`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only


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


# ------------------------------------------------------------------------------------------------ plot
def plot_losses(metrics_csv: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """plots/loss.png: train loss (and val loss where measured) against the optimizer step; below it, when the run
    logged any, a second panel with the in-training evaluation's eval/<task>/<metric> values (scores in [0, 1] on
    the left axis, perplexities and other unbounded values on a log-scale right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    evals = {k: _points(rows, k) for k in dict.fromkeys(k for r in rows for k in r if k.startswith("eval/"))}
    evals = {k: pts for k, pts in evals.items() if pts}
    if evals:
        fig, (ax, ax_eval) = plt.subplots(2, 1, figsize=(7, 8), sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        pts = _points(rows, key)
        if pts:
            ax.plot(*zip(*pts), style, label=key, markersize=4)
    if not evals:  # else the panel below carries the shared x axis's label
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals:
        _plot_evals(ax_eval, evals)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _points(rows: list[dict[str, Optional[float]]], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]


def _plot_evals(ax, evals: dict[str, list[tuple[float, float]]]) -> None:
    """Bounded scores (accuracy, exact match: every value in [0, 1]) on `ax`; the rest on a log-scale twin axis."""
    unbounded = {k for k, pts in evals.items() if any(not 0.0 <= v <= 1.0 for _, v in pts)}
    right = ax.twinx() if unbounded and len(unbounded) < len(evals) else None
    if right is not None or unbounded:
        (right or ax).set_yscale("log")
        (right or ax).set_ylabel("perplexity, bits per byte (log)")
    if len(unbounded) < len(evals):
        ax.set_ylabel("score")
        ax.set_ylim(-0.03, 1.03)
    for i, (key, pts) in enumerate(evals.items()):
        target = right if key in unbounded and right is not None else ax
        target.plot(*zip(*pts), "o--" if key in unbounded else "o-", color=f"C{i % 10}", markersize=4,
                    label=key.removeprefix("eval/"))
    ax.set_xlabel("optimizer step")
    ax.set_title("evaluation (lm-evaluation-harness)")
    ax.grid(alpha=0.3)
    handles = [h for a in (ax, right) if a is not None for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below


# ------------------------------------------------------------------------------------------------ summary.json
class RunSummary(Callback):
    """run_dir/summary.json when the fit completes (reaches trainer.max_steps); `summary`, the same dict, on every rank
    after fit (rank 0's alone has the metrics.csv fields, the task's fields and the export's).

    Fields: run_dir, global_step, checkpoint (the newest), train_seconds (fit start to the end of the last step's
    validation), resumed_step (after a resume: `seconds` count this process only, from that step on), init (what
    model.init_from gave, `init_report`), then what each callback of the run adds through `summary_fields()` (eval,
    monitor, best, hf_dir, samples ...), first/last_train_loss of this process's steps and how many steps logged one
    (logged_train_steps), the task's own fields
    (`task.summary`), plot (plots/loss.png) and seconds (to now). A fit stopped early (preemption) is not done: no
    summary.json, and `summary` is {run_dir, global_step, checkpoint, preempted, requeued}.
    Sits last among the callbacks: its `on_fit_end` reads what the others' wrote (HFExport's export).
    """

    def __init__(self, run_dir: str | os.PathLike, task: Any, t_start: float, resume_step: Optional[int] = None,
                 init_report: Optional[dict[str, Any]] = None):
        self.run_dir, self.task, self.t_start = Path(run_dir), task, t_start
        self.resume_step, self.init_report = resume_step, init_report
        self.train_seconds: Optional[float] = None
        self.summary: dict[str, Any] = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds = time.perf_counter() - self.t_start

    def on_fit_end(self, trainer, pl_module) -> None:
        fields: dict[str, Any] = {}
        for cb in trainer.callbacks:
            if cb is not self and hasattr(cb, "summary_fields"):
                fields.update(cb.summary_fields())
        summary = {"run_dir": str(self.run_dir), "global_step": trainer.global_step,
                   "checkpoint": fields.pop("checkpoint", None)}
        if not (trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step):
            self.summary = {**summary, **{k: fields[k] for k in ("preempted", "requeued") if k in fields}}
            return
        summary["train_seconds"] = self.train_seconds
        if self.resume_step is not None:
            summary["resumed_step"] = self.resume_step
        if self.init_report is not None:
            summary["init"] = self.init_report
        summary.update(fields)
        self.summary = summary
        if not trainer.is_global_zero:
            return
        metrics_csv = self.run_dir / "metrics.csv"
        rows = read_metrics(metrics_csv) if metrics_csv.is_file() else []
        # this process's steps (after a resume: from the resumed step on, like the step count and seconds printed)
        losses = [r["train/loss"] for r in rows
                  if r.get("train/loss") is not None and (self.resume_step is None or r["step"] > self.resume_step)]
        summary.update(first_train_loss=losses[0] if losses else None, last_train_loss=losses[-1] if losses else None,
                       logged_train_steps=len(losses), **self.task.summary(pl_module, trainer.datamodule, rows))
        if rows:
            summary["plot"] = str(plot_losses(metrics_csv, self.run_dir / "plots" / "loss.png"))
        summary["seconds"] = time.perf_counter() - self.t_start
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ the logger group
def wandb_mode(logger_cfg) -> str:
    """online when a key is configured (env or ~/.netrc), else offline; the key itself is never read into our config."""
    if logger_cfg.wandb_mode:
        return logger_cfg.wandb_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, OSError, netrc.NetrcParseError):
        pass
    return "offline"


def build_loggers(logger_cfg, run_dir: Path, resume_step: Optional[int], hparams: dict[str, Any]) -> list:
    """The `logger` group -> [MetricsCSV, + WandbLogger, + TensorBoardLogger]; `hparams` (the resolved config as plain
    containers, which holds no secrets) is logged as the run's hyper-parameters by the loggers that show them."""
    loggers: list = [MetricsCSV(run_dir, resume_step=resume_step)]
    if logger_cfg.wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=logger_cfg.wandb_project,
                entity=logger_cfg.wandb_entity,
                save_dir=str(run_dir),
                name=run_dir.name,
                mode=wandb_mode(logger_cfg),
                resume="allow" if resume_step is not None else None,
            )
        )
    if logger_cfg.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    for lg in loggers[1:]:
        lg.log_hyperparams(hparams)
    return loggers


__all__ = ["BASE_COLUMNS", "MetricsCSV", "RunSummary", "build_loggers", "plot_losses", "read_metrics", "wandb_mode"]
