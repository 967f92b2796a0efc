"""The training job: `train(cfg)` runs every task (lm, cls, token_cls, qa, mc) through one sequence, top to bottom:

    input checks (run dir, resume, data files, hardware: before Lightning is imported) -> tokenizer -> config.yaml
    -> seed -> data -> model -> compatibility check -> LightningModule -> callbacks + loggers -> Trainer -> fit
    -> interruption / preemption -> final validation -> summary -> export (+ what the task adds: samples.txt for lm)

What differs per task is the `Task` object of train/tasks/<name>.py (torchtitan's TrainSpec): its data module, model,
LightningModule, best checkpoint, summary fields. train/run.py is the Hydra shell around this function; tests call
it directly (lightning-hydra-template's `train(cfg)`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

from train.config import Config, ConfigError, to_config, write_config

log = logging.getLogger(__name__)


def check_inputs(cfg: Config) -> Optional[Path]:
    """Refuse, with one sentence, what the job would refuse later but the config and small file reads already show;
    returns the checkpoint the run resumes from (None: a fresh start).

    In order: the run dir and `resume` (a fresh run into a used run dir, resume=auto with nothing to resume, a corrupt
    model.safetensors header, a checkpoint of another model shape), a model.init_from that does not exist, the LM
    data source (missing / empty / not UTF-8 / not JSON lines / no text column: data_pipelines' check_source), then,
    after `import torch` (~1 s) but before Lightning (~4 s), the hardware (devices, flash attention, DeepSpeed
    precision) and the resumed checkpoint's strategy family. train/run.py calls it before it imports Lightning and
    tells `train` so (inputs_checked=True); a direct `train(cfg)` calls it first, so every check holds there too.
    Reads the run dir, small checkpoint files and the first MiB of each LM data file.

    Raises:
        ConfigError / CheckpointError / OSError: naming the key or file and the fix.
    """
    from data_pipelines.sources import check_source

    from train.checkpoint.layout import WEIGHTS_NAME, check_compatible, check_weights_file, init_source, resolve_resume

    run_dir = Path(cfg.run_dir).expanduser()
    resume_from = resolve_resume(cfg.resume, run_dir)
    if cfg.model.init_from:
        init_source(cfg.model.init_from)
    if resume_from is not None:
        if (resume_from / WEIGHTS_NAME).exists():
            check_weights_file(resume_from / WEIGHTS_NAME)
        if not cfg.model.init_from:  # the shape the config fixes (vocab_size waits for the tokenizer unless set)
            m = cfg.model
            shape = {"n_positions": m.n_positions, "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head,
                     "n_inner": m.n_inner, **({"vocab_size": m.vocab_size} if m.vocab_size is not None else {})}
            check_compatible(resume_from, SimpleNamespace(**shape))
    # the LM data: an LM's training set, or the corpus a fine-tune's tokenizer is trained on when none is given
    if cfg.task.name == "lm" or not (cfg.model.init_from or cfg.data.tokenizer or resume_from):
        check_source(cfg.data)

    from train.strategies import check_hardware, check_resume  # imports torch, not Lightning

    check_hardware(cfg.strategy, cfg.trainer, cfg.attention.implementation)
    if resume_from is not None:
        check_resume(resume_from, cfg.strategy)  # FSDP / ZeRO / full training state resume only under their own kind
    return resume_from


def train(cfg: Config, inputs_checked: bool = False) -> dict[str, Any]:
    """Run the training job `cfg` describes; returns the summary it writes to run_dir/summary.json (rank 0): paths,
    step count, first/last train loss, timings and the task's own fields (fine-tuning: the final and best metrics).

    `check_inputs(cfg)` runs first, unless `inputs_checked` says the caller already ran it on this cfg (train/run.py
    does, before it imports Lightning): it reads the head of every LM data file, which need not happen twice.

    A run stopped by SIGUSR1/SIGTERM returns {"preempted", "requeued", "checkpoint", ...} after its checkpoint, without
    export. Raises ConfigError / CheckpointError / OSError (bad input: one sentence naming the fix), GuardError (the
    loss guard stopped a diverging run), KeyboardInterrupt (Ctrl-C; the newest checkpoint resumes it).
    """
    t_start = time.perf_counter()
    cfg = to_config(cfg)
    # -- refused up front, before Lightning is imported or any data is prepared: a used run dir, nothing to resume,
    # unreadable data, what this machine cannot run, a checkpoint that cannot resume
    if inputs_checked:
        from train.checkpoint.layout import resolve_resume

        resume_from = resolve_resume(cfg.resume, Path(cfg.run_dir).expanduser())
    else:
        resume_from = check_inputs(cfg)

    import lightning as L
    import torch

    from train.callbacks.guard import check_finite_weights
    from train.callbacks.preemption import Preemption
    from train.checkpoint.callbacks import BestCheckpoint, StepCheckpoint
    from train.checkpoint.layout import check_compatible, read_meta
    from train.checkpoint.weights import load_best_into
    from train.checkpoint.export import export_hf
    from train.callbacks.loggers import build_loggers, plot_losses, read_metrics
    from train.tasks.model import tokenizer_source
    from train.strategies import model_for_export
    from train.tasks import get_task
    from train.trainer import build_trainer

    task, tcfg, fast = get_task(cfg.task.name), cfg.trainer, cfg.trainer.fast_dev_run
    run_dir = Path(cfg.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_step = read_meta(resume_from)["global_step"] if resume_from else None
    if cfg.eval.tasks:  # in-training lm_eval tasks: installed, known, an LM; nothing of lm_eval is imported when off
        from train.eval.callback import check_eval

        check_eval(cfg.eval, cfg.task.name)

    # -- the tokenizer (a fine-tune keeps model.init_from's: its ids index that embedding table), then config.yaml
    source = tokenizer_source(cfg.data.tokenizer, cfg.model.init_from, resume_from)
    if source:
        cfg.data.tokenizer = source
    tokenizer = task.tokenizer(cfg.data, cfg.model.init_from, resume_from, run_dir)  # None: the data module makes it
    write_config(cfg, run_dir)
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

    # -- model: fresh or from model.init_from; a resumed checkpoint must hold the same shape and head
    model, init_report = task.build_model(cfg.model, cfg.attention, cfg.stability, dm)
    if resume_from is not None:
        check_compatible(resume_from, model.config, type(model).__name__)
    key, length = task.sequence_length(cfg.data, cfg.task)
    if length > model.config.n_positions:
        raise ConfigError(f"{key}={length} exceeds the model's n_positions={model.config.n_positions}; lower {key}.")
    meta = {"tokenizer_dir": "../../tokenizer"} if tokenizer is not None else {}  # in every checkpoint's meta.json
    module = task.module(model, dm, cfg.task, tcfg, cfg.optim, meta)

    # -- callbacks, loggers, Trainer
    own = resume_from is not None and resume_from.parent.parent.resolve() == run_dir.resolve()
    protect = resume_from if own else None  # retention never deletes the checkpoint this run resumed from
    ckpt_cb = StepCheckpoint(run_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
                             save_final=cfg.checkpoint.save_final, protect=protect,
                             val_every_n_steps=tcfg.val_check_interval if tcfg.limit_val_batches else None)  # fmt: skip
    monitor = task.monitor(cfg.task, dm)  # (metric, mode) of checkpoints/best, or None: the export is the final model
    best_cb = BestCheckpoint(run_dir, *monitor, meta=meta) if monitor else None
    preempt = Preemption(ckpt_cb)  # SIGUSR1/SIGTERM -> checkpoint at a step boundary, stop (+ SLURM requeue)
    loggers = build_loggers(cfg.logger, run_dir, resume_step, dataclasses.asdict(cfg))
    if task.full_validation:  # the task metrics need the whole validation set (every qa window of an example)
        tcfg.limit_val_batches = 1.0 if tcfg.limit_val_batches > 0 else 0
    eval_cb = None
    if cfg.eval.tasks:
        from train.eval.callback import build_eval

        eval_cb = build_eval(cfg.eval, tokenizer, run_dir, tcfg.val_check_interval, fast)
    # best before step: a step-N checkpoint written after validation N holds BestCheckpoint's state of step N;
    # eval before step: checkpoint N is published after eval row N is on disk (fast_dev_run: the eval alone)
    callbacks = [cb for cb in ((eval_cb,) if fast else (best_cb, eval_cb, ckpt_cb, preempt)) if cb is not None]
    trainer = build_trainer(cfg, run_dir, loggers, extra_callbacks=callbacks)

    # -- fit
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)
    if trainer.interrupted:
        raise KeyboardInterrupt(
            f"interrupted at step {trainer.global_step}; continue with resume=auto run_dir={run_dir}"
        )
    if preempt.stopped:  # not done: no final validation / export / samples; the next job continues
        for lg in loggers:
            lg.save()
        return {"run_dir": str(run_dir), "global_step": trainer.global_step, "preempted": preempt.signal_name,
                "requeued": preempt.requeued, "checkpoint": str(ckpt_cb.saved[-1]) if ckpt_cb.saved else None}
    # a final validation unless the last step already had one (an LM without validation data has no batches)
    if trainer.limit_val_batches > 0 and trainer.global_step % (1 if fast else tcfg.val_check_interval) != 0:
        trainer.validate(module, datamodule=dm, verbose=False)
    for lg in loggers:
        lg.save()

    # -- summary, export
    summary: dict[str, Any] = {"run_dir": str(run_dir), "global_step": trainer.global_step,
                               "checkpoint": str(ckpt_cb.saved[-1]) if ckpt_cb.saved else None,
                               "train_seconds": time.perf_counter() - t_start}  # fmt: skip
    if resume_step is not None:
        summary["resumed_step"] = resume_step  # `seconds` count this process only: from that step on
    if init_report is not None:
        summary["init"] = init_report
    if eval_cb is not None and eval_cb.last_metrics:  # the newest in-training evaluation (rank 0)
        summary["eval"] = {"step": eval_cb.evaluated[-1], **eval_cb.last_metrics}
    if monitor:
        summary["monitor"], summary["monitor_mode"] = monitor
    export_net = model_for_export(trainer, module) if not fast and tokenizer is not None else None  # every rank
    if trainer.is_global_zero:
        rows = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else []
        # this process's steps (after a resume: from the resumed step on, like the step count and seconds printed)
        losses = [r["train/loss"] for r in rows
                  if r.get("train/loss") is not None and (resume_step is None or r["step"] > resume_step)]
        summary.update(first_train_loss=losses[0] if losses else None, last_train_loss=losses[-1] if losses else None,
                       **task.summary(module, dm, rows))  # fmt: skip
        if rows:
            summary["plot"] = str(plot_losses(run_dir / "metrics.csv", run_dir / "plots" / "loss.png"))
        if export_net is not None:
            best = load_best_into(export_net, run_dir) if best_cb is not None and best_cb.best is not None else None
            if best is not None:  # the export is the best model
                summary["best"] = {"metric": monitor[0], "mode": monitor[1], "value": best["value"],
                                   "step": best["global_step"], "metrics": best.get("metrics", {}),
                                   "path": str(best_cb.path)}  # fmt: skip
                log.info("best %s=%.4f at step %d -> %s", monitor[0], best["value"], best["global_step"],
                         run_dir / "hf")  # fmt: skip
            check_finite_weights(export_net, trainer.global_step)
            summary["hf_dir"] = str(export_hf(export_net, tokenizer, run_dir / "hf", overwrite=True))
            log.info("exported %s (loads in transformers.%s)", summary["hf_dir"], task.hf_class)
            summary.update(task.after_export(export_net, tokenizer, cfg.sample, run_dir))
        summary["seconds"] = time.perf_counter() - t_start
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary






__all__ = ["check_inputs", "train"]
