"""Train / fine-tune a GPT-2: `python train/run.py [group=option ...] [key=value ...]`.

`main` is a thin `@hydra.main` shell: it turns the composed DictConfig into the typed `Config` and calls
`train(cfg)`, an ordinary function tests call directly (lightning-hydra-template). Expected errors end with one
sentence on stderr and exit code 1 (set HYDRA_FULL_ERROR=1 for the traceback).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from train.config import Config, ConfigError, register_configs, to_config

register_configs()  # the typed schemas must be in Hydra's ConfigStore before composition

try:  # registers data_schema (C's own schema name) too, harmless if unused
    from data_pipelines.config import register_configs as _register_data

    _register_data()
except ImportError:  # pragma: no cover
    pass


# ------------------------------------------------------------------------------------------------ train()
def train(cfg: Config) -> dict[str, Any]:
    """Run one training job described by `cfg`; returns a summary (paths, first/last losses, timings)."""
    import lightning as L
    import torch

    from data_pipelines import LMDataModule
    from train import checkpoint as ck
    from train.callbacks import StepCheckpoint
    from train.config import write_config
    from train.loggers import build_loggers, plot_losses
    from train.model import build_model, tokenizer_source
    from train.module import GPT2LitModule
    from train.trainer import build_trainer

    t_start = time.perf_counter()
    cfg = to_config(cfg)
    if cfg.task.name != "lm":  # fine-tuning tasks (cls, token_cls, qa, mc): head + task data + metrics
        from train.tasks import train_task

        return train_task(cfg)
    tcfg = cfg.trainer
    run_dir = Path(cfg.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    from train.strategies import check_hardware

    check_hardware(cfg.strategy, tcfg, cfg.attention.implementation)  # up front: before any data is prepared
    resume_from = ck.resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:
        from train.strategies import check_resume

        check_resume(resume_from, cfg.strategy)  # FSDP / ZeRO / full training state resume only under their own kind
    resume_step = ck.read_meta(resume_from)["global_step"] if resume_from else None
    fast = tcfg.fast_dev_run

    tok_src = tokenizer_source(cfg.data.tokenizer, cfg.model.init_from, resume_from)
    if tok_src and tok_src != cfg.data.tokenizer:
        cfg.data.tokenizer = tok_src
    write_config(cfg, run_dir)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    dm = LMDataModule(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    tokenizer = dm.tokenizer
    vocab = max(dm.vocab_size, len(tokenizer) if tokenizer is not None else 0)
    tok_dir = run_dir / "tokenizer"
    if tokenizer is not None and not (tok_dir / "tokenizer.json").is_file():
        tokenizer.save_pretrained(str(tok_dir))

    model = build_model(cfg.task, cfg.model, cfg.attention, cfg.stability, vocab, dm.eos_token_id)
    if resume_from is not None:
        ck.check_compatible(resume_from, model.config, type(model).__name__)
    if cfg.data.block_size > model.config.n_positions:
        raise ConfigError(
            f"data.block_size={cfg.data.block_size} exceeds the model's n_positions={model.config.n_positions}; "
            f"lower data.block_size."
        )

    module = GPT2LitModule(
        model,
        cfg.optim,
        max_steps=1 if fast else tcfg.max_steps,
        log_every_n_steps=tcfg.log_every_n_steps,
        compile=tcfg.compile,
        activation_checkpointing=tcfg.activation_checkpointing,
        overfit_batches=tcfg.overfit_batches,
        meta={"tokenizer_dir": "../../tokenizer"} if tokenizer is not None else {},
    )

    protect = resume_from if resume_from is not None and resume_from.parent.parent.resolve() == run_dir.resolve() else None
    ckpt_cb = StepCheckpoint(run_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
                             save_final=cfg.checkpoint.save_final, protect=protect,
                             val_every_n_steps=tcfg.val_check_interval if tcfg.limit_val_batches else None)  # fmt: skip
    loggers = build_loggers(cfg.logger, run_dir, resume_step, dataclasses.asdict(cfg))
    from train.callbacks import Preemption

    preempt = Preemption(ckpt_cb)  # SIGUSR1/SIGTERM -> checkpoint at a step boundary, stop (+ SLURM requeue)
    trainer = build_trainer(cfg, run_dir, loggers, extra_callbacks=[] if fast else [ckpt_cb, preempt])
    val_every = 1 if fast else tcfg.val_check_interval
    limit_val = trainer.limit_val_batches
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)
    if trainer.interrupted:
        raise KeyboardInterrupt(f"interrupted at step {trainer.global_step}; continue with resume=auto run_dir={run_dir}")
    if preempt.stopped:  # not done: no final validation / export / samples; the next job continues
        for lg in loggers:
            lg.save()
        return {"run_dir": str(run_dir), "global_step": trainer.global_step, "preempted": preempt.signal_name,
                "requeued": preempt.requeued, "checkpoint": str(ckpt_cb.saved[-1]) if ckpt_cb.saved else None}
    # a final validation unless the last step already had one
    if limit_val > 0 and trainer.global_step % val_every != 0 and dm.val_dataset is not None:
        trainer.validate(module, datamodule=dm, verbose=False)
    for lg in loggers:
        lg.save()

    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "global_step": trainer.global_step,
        "checkpoint": str(ckpt_cb.saved[-1]) if ckpt_cb.saved else None,
        "train_seconds": time.perf_counter() - t_start,
    }
    from train.strategies import model_for_export

    export_net = model_for_export(trainer, module) if not fast and tokenizer is not None else None  # every rank
    if trainer.is_global_zero:
        from train.loggers import read_metrics

        rows = read_metrics(run_dir / "metrics.csv")
        train_losses = [r["train/loss"] for r in rows if r.get("train/loss") is not None]
        val_losses = [r["val/loss"] for r in rows if r.get("val/loss") is not None]
        summary.update(
            first_train_loss=train_losses[0] if train_losses else None,
            last_train_loss=train_losses[-1] if train_losses else None,
            last_val_loss=val_losses[-1] if val_losses else None,
        )
        if rows:
            summary["plot"] = str(plot_losses(run_dir / "metrics.csv", run_dir / "plots" / "loss.png"))
        if not fast and tokenizer is not None:
            from train.export import export_hf
            from train.generate import write_samples
            from train.callbacks import check_finite_weights

            net = export_net if export_net is not None else module.model
            check_finite_weights(net, trainer.global_step)
            summary["hf_dir"] = str(export_hf(net, tokenizer, run_dir / "hf", overwrite=True))
            summary["samples"] = str(write_samples(net, tokenizer, cfg.sample, run_dir / "samples.txt"))
        summary["seconds"] = time.perf_counter() - t_start
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------ CLI
def _expected_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import OmegaConfBaseException

    errors: tuple = (ValueError, OSError, KeyError, OmegaConfBaseException)
    # only from modules already imported: a config error must not pay for importing torch + Lightning (~5 s)
    if "lightning.fabric" in sys.modules:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        errors += (MisconfigurationException,)
    if "train.callbacks.guard" in sys.modules:
        from train.callbacks.guard import GuardError

        errors += (GuardError,)
    return errors


def _debug() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("GPT2_FORGE_DEBUG") == "1"


def _route_lightning_logs() -> None:
    """Lightning installs its own console handler; under Hydra (console + run.log) every line would print twice."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - installs its handler at import; remove it after

    for name in ("lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # we run single-process under a SLURM allocation only through launch/slurm.py (srun); the hint is noise
    warnings.filterwarnings("ignore", message=".*srun.*command is available on your system.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        # run_dir is hydra's output dir: equal to ${run_dir} in a single run, the job's folder under -m
        dcfg.run_dir = HydraConfig.get().runtime.output_dir
        cfg = to_config(dcfg)  # a bad value fails here, before torch and Lightning are imported
        _route_lightning_logs()
        summary = train(cfg)
    except _expected_errors() as e:
        if _debug():
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = f"missing key {msg}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(f"stopped: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    if summary.get("preempted"):
        requeued = " and requeued the SLURM job" if summary.get("requeued") else ""
        print(f"stopped: {summary['preempted']} at step {summary['global_step']}; saved {summary['checkpoint']}"
              f"{requeued}; continue with resume=auto run_dir={summary['run_dir']}", file=sys.stderr)
        # a requeued job's exit does not matter; a SIGTERM stop is 128+15, as if the signal had ended it
        sys.exit(0 if summary["preempted"] == "SIGUSR1" else 143)
    if summary.get("first_train_loss") is not None:
        print(
            f"done: {summary['global_step']} steps in {summary['seconds']:.0f}s, train loss "
            f"{summary['first_train_loss']:.3f} -> {summary['last_train_loss']:.3f}; run dir {summary['run_dir']}"
        )
    best = summary.get("best")
    if best:  # a fine-tuning task: the monitored metric of the exported (best) model
        print(f"best {best['metric']}={best['value']:.4f} at step {best['step']}; export {summary.get('hf_dir')}")
    # the value a sweeper optimises (hydra/sweeper=optuna_lr): the task's best metric, else the LM's val loss
    return best["value"] if best else summary.get("last_val_loss")


if __name__ == "__main__":
    main()
