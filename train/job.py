"""The training job: `train(cfg)` runs every task (lm, cls, token_cls, qa, mc) through one sequence, top to bottom:

    check_inputs (run dir, resume, data files, hardware, eval tasks: before Lightning is imported)
    -> tokenizer -> config.yaml -> seed -> data -> model -> LightningModule -> callbacks + loggers -> Trainer -> fit
    -> interruption / preemption -> final validation -> summary -> export (+ what the task adds: samples.txt for lm)

What differs per task is the `Task` object of train/tasks/<name>.py (torchtitan's TrainSpec): its data module, model,
LightningModule, best checkpoint, micro-batch, summary fields. train/run.py is the Hydra shell around this function;
tests call it directly (lightning-hydra-template's `train(cfg)`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from train.config import Config, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedInputs:
    """What `check_inputs` resolved, handed to `train` as it is (nothing is checked or read twice).

    run_dir: the run's folder. resume_from: the checkpoint the run continues from (None: a fresh start) and
    resume_meta its meta.json. tokenizer: the tokenizer folder the run must use (model.init_from's), or None.
    hardware: `train.strategies.Hardware` (accelerator, resolved precision) of this machine for this config.
    """

    run_dir: Path
    hardware: Any
    resume_from: Optional[Path] = None
    resume_meta: dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None

    @property
    def resume_step(self) -> Optional[int]:
        """The optimizer step of the checkpoint resumed from; None for a fresh start."""
        return self.resume_meta.get("global_step") if self.resume_from is not None else None


def check_inputs(cfg: Config) -> CheckedInputs:
    """Refuse, with one sentence, what the job would refuse later but the config and small file reads already show,
    and return what the checks resolved.

    In order: the run dir and `resume` (a fresh run into a used run dir, resume=auto with nothing to resume, a corrupt
    model.safetensors header, a checkpoint of another model shape), a model.init_from that does not exist (and the
    tokenizer that comes with it), the LM data source (missing / empty / not UTF-8 / not JSON lines / no text column),
    then, after `import torch` (~1 s) but before Lightning (~4 s), the hardware (devices, attention kernel, precision)
    and the resumed checkpoint's strategy, and the in-training evaluation tasks (eval.tasks). Reads the run dir, small
    checkpoint files and the first MiB of each LM data file.

    Raises:
        ConfigError / CheckpointError / OSError: naming the key or file and the fix.
    """
    from data_pipelines.sources import check_source

    from train.checkpoint import layout

    run_dir = Path(cfg.run_dir).expanduser()
    resume_from = layout.resolve_resume(cfg.resume, run_dir)
    if cfg.model.init_from:
        layout.init_source(cfg.model.init_from)
    tokenizer = layout.tokenizer_source(cfg.data.tokenizer, cfg.model.init_from, resume_from)
    meta: dict[str, Any] = {}
    if resume_from is not None:
        meta = layout.read_meta(resume_from)
        layout.check_weights_file(resume_from / layout.WEIGHTS_NAME)
        if not cfg.model.init_from:  # the shape the config fixes (vocab_size waits for the tokenizer unless set)
            layout.check_compatible(resume_from, meta, layout.model_shape(cfg.model))
    # the LM data: an LM's training set, or the corpus a fine-tune's tokenizer is trained on when none is given
    if cfg.task.name == "lm" or not (cfg.model.init_from or cfg.data.tokenizer or resume_from):
        check_source(cfg.data)

    from train.strategies import check_hardware, check_resume  # imports torch, not Lightning

    hardware = check_hardware(cfg.strategy, cfg.trainer, cfg.attention.implementation)
    if resume_from is not None:
        check_resume(resume_from, cfg.strategy, meta, cfg.trainer)
    if cfg.eval.tasks:  # installed, known, an LM; nothing of lm_eval is imported while eval.tasks is empty
        from train.eval.callback import check_eval

        check_eval(cfg.eval, cfg.task.name)
    return CheckedInputs(run_dir, hardware, resume_from, meta, tokenizer)


def train(cfg: Config, checked: Optional[CheckedInputs] = None) -> dict[str, Any]:
    """Run the training job `cfg` describes; returns what `finish` returns: the summary written to
    run_dir/summary.json (paths, steps, first/last train loss, timings, the task's fields), or a preemption's record.

    `checked`: what `check_inputs(cfg)` returned (train/run.py runs it before importing Lightning); None runs it here.
    Raises TypeError (cfg is not a `train.config.Config`: convert a DictConfig with `to_config`), ConfigError /
    CheckpointError / OSError (bad input: one sentence naming the fix), GuardError (the loss guard stopped a diverging
    run), KeyboardInterrupt (Ctrl-C; the newest checkpoint resumes it).
    """
    if not isinstance(cfg, Config):  # a DictConfig would skip every __post_init__ check
        raise TypeError(f"train() takes a train.config.Config, not {type(cfg).__name__}; use to_config(cfg).")
    t_start = time.perf_counter()
    checked = checked if checked is not None else check_inputs(cfg)

    import lightning as L
    import torch

    from train.callbacks.loggers import build_loggers
    from train.callbacks.preemption import Preemption
    from train.checkpoint.callbacks import BestCheckpoint, StepCheckpoint
    from train.checkpoint.layout import check_compatible
    from train.eval.callback import build_eval
    from train.strategies import build_strategy
    from train.tasks import get_task
    from train.trainer import build_trainer

    task, tcfg, run_dir = get_task(cfg.task.name, cfg.task.module), cfg.trainer, checked.run_dir

    # -- the tokenizer (a fine-tune keeps model.init_from's: its ids index that embedding table), then config.yaml
    if checked.tokenizer:
        cfg.data.tokenizer = checked.tokenizer
    tokenizer = task.tokenizer(cfg.data, cfg.model.init_from, checked.resume_from, run_dir)  # None: the data's own
    hparams = write_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # -- data
    dm = task.datamodule(cfg.data, cfg.task, tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    tokenizer = dm.tokenizer  # None only for pre-tokenized LM data (data=tokens): then no export or samples
    if tokenizer is not None and not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))

    # -- model: fresh or from model.init_from; a resumed checkpoint must hold the same head and vocabulary
    model, init_report = task.build_model(cfg.model, cfg.attention, cfg.stability, dm)
    if checked.resume_from is not None:
        check_compatible(checked.resume_from, checked.resume_meta, model.config, type(model).__name__)
    key, length = task.sequence_length(cfg.data, cfg.task)
    if length > model.config.n_positions:
        raise ConfigError(f"{key}={length} exceeds the model's n_positions={model.config.n_positions}; lower {key}.")
    meta = {"tokenizer_dir": "../../tokenizer"} if tokenizer is not None else {}  # in every checkpoint's meta.json
    module = task.module(model, dm, cfg.task, tcfg, cfg.optim, meta)

    # -- callbacks, loggers, Trainer
    own = checked.resume_from is not None and checked.resume_from.parent.parent.resolve() == run_dir.resolve()
    ckpt_cb = StepCheckpoint(run_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
                             save_final=cfg.checkpoint.save_final,
                             protect=checked.resume_from if own else None,  # retention keeps what this run resumed
                             val_every_n_steps=tcfg.val_check_interval if tcfg.limit_val_batches else None)
    monitor = task.monitor(cfg.task, dm)  # (metric, mode) of checkpoints/best, or None: the export is the final model
    best_cb = BestCheckpoint(run_dir, *monitor, meta=meta) if monitor else None
    preempt = Preemption(ckpt_cb)  # SIGUSR1/SIGTERM -> checkpoint at a step boundary, stop (+ SLURM requeue)
    loggers = build_loggers(cfg.logger, run_dir, checked.resume_step, hparams)
    if task.full_validation:  # the task metrics need the whole validation set (every qa window of an example)
        tcfg.limit_val_batches = 1.0 if tcfg.limit_val_batches > 0 else 0
    eval_cb = build_eval(cfg.eval, tokenizer, run_dir, tcfg.val_check_interval, tcfg.fast_dev_run)
    # best before step: a step-N checkpoint written after validation N holds BestCheckpoint's state of step N;
    # eval before step: checkpoint N is published after eval row N is on disk (fast_dev_run: the eval alone)
    run_callbacks = (eval_cb,) if tcfg.fast_dev_run else (best_cb, eval_cb, ckpt_cb, preempt)
    strategy = build_strategy(cfg.strategy, tcfg, task.micro_batch_size(cfg.data, cfg.task), checked.hardware)
    trainer = build_trainer(tcfg, cfg.guard, cfg.seed, strategy, checked.hardware.precision, run_dir, loggers,
                            [cb for cb in run_callbacks if cb is not None])

    # -- fit, then the summary and the export
    trainer.fit(module, datamodule=dm, ckpt_path=str(checked.resume_from) if checked.resume_from else None)
    return finish(trainer, module, dm, task, Finish(
        run_dir, tokenizer, checked.resume_step, init_report, monitor, best_cb, eval_cb, ckpt_cb, preempt, loggers,
        cfg.sample, t_start, fast=tcfg.fast_dev_run, val_every=1 if tcfg.fast_dev_run else tcfg.val_check_interval))


def write_config(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """run_dir/config.yaml (run_dir created if needed): the fully resolved config of the run, written before anything
    runs (tmp + replace). Returns it as plain containers: the hyper-parameters the loggers record."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    node = OmegaConf.structured(cfg)
    tmp = run_dir / f"config.yaml.tmp-{os.getpid()}"
    tmp.write_text(OmegaConf.to_yaml(node, resolve=True))
    os.replace(tmp, run_dir / "config.yaml")
    return OmegaConf.to_container(node, resolve=True)


@dataclass
class Finish:
    """What `finish` needs of a completed fit besides the trainer, module, data and task."""

    run_dir: Path
    tokenizer: Any
    resume_step: Optional[int]
    init_report: Optional[dict[str, Any]]
    monitor: Optional[tuple[str, str]]
    best_cb: Any
    eval_cb: Any
    ckpt_cb: Any
    preempt: Any
    loggers: list
    sample_cfg: Any
    t_start: float
    fast: bool  # trainer.fast_dev_run: one step, no export
    val_every: int  # optimizer steps between validations


def finish(trainer, module, dm, task, f: Finish) -> dict[str, Any]:
    """After `trainer.fit`: Ctrl-C raises KeyboardInterrupt naming the resume command; a preemption stop returns
    {"preempted", "requeued", "checkpoint", ...} (no export: the next job continues); a completed fit gets a final
    validation unless the last step had one, then on rank 0 summary.json, the loss plot and the HF export (the best
    model when the task keeps one) + what the task adds."""
    from train.callbacks.guard import check_finite_weights
    from train.callbacks.loggers import plot_losses, read_metrics
    from train.checkpoint.export import export_hf
    from train.checkpoint.weights import load_best_into
    from train.strategies import model_for_export

    if trainer.interrupted:
        raise KeyboardInterrupt(f"interrupted at step {trainer.global_step}; continue with resume=auto "
                                f"run_dir={f.run_dir}")
    latest = str(f.ckpt_cb.saved[-1]) if f.ckpt_cb.saved else None
    if f.preempt.stopped:
        for lg in f.loggers:
            lg.save()
        return {"run_dir": str(f.run_dir), "global_step": trainer.global_step, "preempted": f.preempt.signal_name,
                "requeued": f.preempt.requeued, "checkpoint": latest}
    fast = f.fast
    # a final validation unless the last step already had one (an LM without validation data has no batches)
    if trainer.limit_val_batches > 0 and trainer.global_step % f.val_every != 0:
        trainer.validate(module, datamodule=dm, verbose=False)
    for lg in f.loggers:
        lg.save()
    summary: dict[str, Any] = {"run_dir": str(f.run_dir), "global_step": trainer.global_step,
                               "checkpoint": latest, "train_seconds": time.perf_counter() - f.t_start}
    if f.resume_step is not None:
        summary["resumed_step"] = f.resume_step  # `seconds` count this process only: from that step on
    if f.init_report is not None:
        summary["init"] = f.init_report
    if f.eval_cb is not None and f.eval_cb.last_metrics:  # the newest in-training evaluation (rank 0)
        summary["eval"] = {"step": f.eval_cb.evaluated[-1], **f.eval_cb.last_metrics}
    if f.monitor:
        summary["monitor"], summary["monitor_mode"] = f.monitor
    export_net = model_for_export(trainer, module) if not fast and f.tokenizer is not None else None  # every rank
    if not trainer.is_global_zero:
        return summary
    metrics_csv = f.run_dir / "metrics.csv"
    rows = read_metrics(metrics_csv) if metrics_csv.is_file() else []
    # this process's steps (after a resume: from the resumed step on, like the step count and seconds printed)
    losses = [r["train/loss"] for r in rows
              if r.get("train/loss") is not None and (f.resume_step is None or r["step"] > f.resume_step)]
    summary.update(first_train_loss=losses[0] if losses else None, last_train_loss=losses[-1] if losses else None,
                   **task.summary(module, dm, rows))
    if rows:
        summary["plot"] = str(plot_losses(metrics_csv, f.run_dir / "plots" / "loss.png"))
    if export_net is not None:
        best = load_best_into(export_net, f.run_dir) if f.best_cb is not None and f.best_cb.best is not None else None
        if best is not None:  # the export is the best model
            summary["best"] = {"metric": f.monitor[0], "mode": f.monitor[1], "value": best["value"],
                               "step": best["global_step"], "metrics": best.get("metrics", {}),
                               "path": str(f.best_cb.path)}
            log.info("best %s=%.4f at step %d -> %s", f.monitor[0], best["value"], best["global_step"],
                     f.run_dir / "hf")
        check_finite_weights(export_net, trainer.global_step)
        summary["hf_dir"] = str(export_hf(export_net, f.tokenizer, f.run_dir / "hf", overwrite=True))
        log.info("exported %s (loads in transformers.%s)", summary["hf_dir"], task.hf_class)
        summary.update(task.after_export(export_net, f.tokenizer, f.sample_cfg, f.run_dir))
    summary["seconds"] = time.perf_counter() - f.t_start
    (f.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


__all__ = ["CheckedInputs", "Finish", "check_inputs", "finish", "train", "write_config"]
