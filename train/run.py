"""Train / fine-tune a GPT-2: `python train/run.py [group=option ...] [key=value ...]`.

`main` is a thin `@hydra.main` shell: it turns the composed DictConfig into the typed `Config` and calls
`train(cfg)`, an ordinary function tests call directly (lightning-hydra-template). Expected errors end with one
sentence on stderr and exit code 1 (set HYDRA_FULL_ERROR=1 for the traceback).
"""

from __future__ import annotations

import json
import math
import os
import shlex
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


# ------------------------------------------------------------------------------------------------ building blocks
def build_strategy(strategy_cfg, trainer_cfg, micro_batch_size: int = 1):
    """`strategy` group -> a Lightning strategy object or name (train/strategies.py; refused up front if this
    machine cannot run it)."""
    from train.strategies import build_strategy as _build

    return _build(strategy_cfg, trainer_cfg, micro_batch_size)


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


def build_loggers(cfg: Config, run_dir: Path, resume_step: Optional[int]) -> list:
    from train.callbacks import MetricsCSV

    loggers: list = [MetricsCSV(run_dir, resume_step=resume_step)]
    if cfg.logger.wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=cfg.logger.wandb_project,
                entity=cfg.logger.wandb_entity,
                save_dir=str(run_dir),
                name=run_dir.name,
                mode=wandb_mode(cfg.logger),
                resume="allow" if resume_step is not None else None,
            )
        )
    if cfg.logger.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    if len(loggers) > 1:  # the resolved config as the run's hyper-parameters (no secrets live in it)
        import dataclasses

        from train.checkpoint import to_plain

        params = to_plain(dataclasses.asdict(cfg))
        for lg in loggers[1:]:
            lg.log_hyperparams(params)
    return loggers


def build_profiler(name: Optional[str], run_dir: Path):
    if name is None:
        return None
    from lightning.pytorch import profilers

    cls = {"simple": profilers.SimpleProfiler, "advanced": profilers.AdvancedProfiler,
           "pytorch": profilers.PyTorchProfiler}[name]  # fmt: skip
    return cls(dirpath=str(run_dir), filename="profile")


def _resolve_resume(cfg: Config, run_dir: Path) -> Optional[Path]:
    from train import checkpoint as ck

    if cfg.resume is None:
        existing = ck.list_checkpoints(run_dir)
        if existing:
            raise ConfigError(
                f"run_dir={run_dir} already holds checkpoints (newest {existing[-1].name}); pass resume=auto to "
                f"continue that run or choose another run_dir."
            )
        return None
    ck.clean_partial(run_dir)
    if cfg.resume == "auto":
        found = ck.latest_checkpoint(run_dir)
        if found is None:
            raise ConfigError(
                f"resume=auto found no complete checkpoint in {ck.checkpoints_dir(run_dir)}; drop resume to start "
                f"fresh, or set run_dir to the run you want to continue."
            )
        return found
    return ck.resolve_checkpoint(cfg.resume)


def _check_compatible(step_path: Path, model_config, model_class: Optional[str] = None) -> None:
    """A checkpoint of another model size or task head fails here with the difference named, not deep in
    load_state_dict."""
    from train.checkpoint import load_model_config_dict, read_meta

    saved_task = read_meta(step_path).get("task")
    if model_class and saved_task and saved_task != model_class:
        raise ConfigError(
            f"checkpoint {step_path} holds a {saved_task} (another task head), but this run builds a {model_class}; "
            f"resume with the task it was trained with, or start a new run_dir with model.init_from={step_path}."
        )
    saved = load_model_config_dict(step_path)
    n_saved = saved.get("num_labels", len(saved["id2label"]) if isinstance(saved.get("id2label"), dict) else None)
    if n_saved is not None and n_saved != getattr(model_config, "num_labels", n_saved):
        raise ConfigError(
            f"checkpoint {step_path} has a head of num_labels={n_saved}, but this run builds "
            f"num_labels={model_config.num_labels}; resume with the same task settings."
        )
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings"):
        if key in saved and saved[key] != getattr(model_config, key):
            raise ConfigError(
                f"checkpoint {step_path} was written by a model with {key}={saved[key]}, but this run builds "
                f"{key}={getattr(model_config, key)}; resume with the same model settings."
            )


def _tokenizer_source(cfg: Config, resume_from: Optional[Path]) -> Optional[str]:
    """The tokenizer a fine-tune must keep: its ids index the embedding table of model.init_from."""
    from train.checkpoint import tokenizer_dir_for

    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    # A resumed run keeps data.tokenizer as it was: the BPE trained on the source is cached (and deterministic), so
    # the cached token files are reused; a changed vocabulary is caught by _check_compatible.
    if cfg.model.init_from and resume_from is None:
        src = Path(cfg.model.init_from).expanduser()
        if (src / "tokenizer.json").is_file() or (src / "vocab.json").is_file():
            return str(src)
        from train.checkpoint import resolve_checkpoint

        if src.exists():
            d = tokenizer_dir_for(resolve_checkpoint(src))
            return str(d) if d else None
    return None


def build_trainer(cfg: Config, run_dir: Path, loggers: list, extra_callbacks: list = ()):
    """The Lightning Trainer of a run (also what benchmarks/overhead.py times)."""
    import lightning as L

    from train.callbacks import RNGState, StepProgressBar, StepSeed, Throughput
    from train.checkpoint import DirCheckpointIO
    from train.module import resolve_precision
    from train.strategies import build_plugins

    tcfg = cfg.trainer
    fast = tcfg.fast_dev_run
    max_steps = 1 if fast else tcfg.max_steps
    val_every = 1 if fast else tcfg.val_check_interval
    limit_val = min(1, tcfg.limit_val_batches) if fast else tcfg.limit_val_batches
    from train.guard import build_guard

    # the guard runs before StepCheckpoint: a rolled-back state, not the spiking one, is what a step-N save holds
    callbacks: list = [StepSeed(cfg.seed), RNGState(), Throughput(tcfg.log_every_n_steps),
                       *build_guard(cfg.guard, run_dir), *extra_callbacks]  # fmt: skip
    if tcfg.enable_progress_bar:
        # the bar's numbers change only at logging steps; redrawing it every batch costs ~1 ms a step
        callbacks.append(StepProgressBar(refresh_rate=tcfg.log_every_n_steps))
    return L.Trainer(
        accelerator=tcfg.accelerator,
        devices=tcfg.devices,
        num_nodes=tcfg.num_nodes,
        strategy=build_strategy(cfg.strategy, tcfg, cfg.data.batch_size),
        precision=resolve_precision(tcfg.precision, tcfg.accelerator),
        max_steps=max_steps,
        max_epochs=-1,
        accumulate_grad_batches=tcfg.accumulate_grad_batches,
        gradient_clip_val=tcfg.gradient_clip_val,
        gradient_clip_algorithm="norm",
        # the training stream never ends: validate every N optimizer steps, counted in micro-batches
        val_check_interval=val_every * tcfg.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=limit_val,
        num_sanity_val_steps=tcfg.num_sanity_val_steps,
        log_every_n_steps=tcfg.log_every_n_steps,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,  # StepCheckpoint owns checkpoints/
        enable_progress_bar=tcfg.enable_progress_bar,
        enable_model_summary=tcfg.enable_progress_bar,
        plugins=[DirCheckpointIO(), *build_plugins()],  # + SLURMEnvironment(auto_requeue=False) under SLURM
        deterministic=tcfg.deterministic or None,
        profiler=build_profiler(tcfg.profiler, run_dir),
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # data_pipelines' sampler shards by rank and resumes by position
    )


# ------------------------------------------------------------------------------------------------ train()
def train(cfg: Config) -> dict[str, Any]:
    """Run one training job described by `cfg`; returns a summary (paths, first/last losses, timings)."""
    import lightning as L
    import torch

    from data_pipelines import LMDataModule
    from train import checkpoint as ck
    from train.callbacks import StepCheckpoint, plot_losses
    from train.module import GPT2LitModule, build_model

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
    resume_from = _resolve_resume(cfg, run_dir)
    if resume_from is not None:
        from train.strategies import check_resume

        check_resume(resume_from, cfg.strategy)  # FSDP / ZeRO / full training state resume only under their own kind
    resume_step = ck.read_meta(resume_from)["global_step"] if resume_from else None
    fast = tcfg.fast_dev_run

    tok_src = _tokenizer_source(cfg, resume_from)
    if tok_src and tok_src != cfg.data.tokenizer:
        cfg.data.tokenizer = tok_src
    _write_config(cfg, run_dir)

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
        _check_compatible(resume_from, model.config, type(model).__name__)
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
    loggers = build_loggers(cfg, run_dir, resume_step)
    from train.preemption import Preemption

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
        from train.callbacks import read_metrics

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
            from train.guard import check_finite_weights

            net = export_net if export_net is not None else module.model
            check_finite_weights(net, trainer.global_step)
            summary["hf_dir"] = str(export_hf(net, tokenizer, run_dir / "hf", overwrite=True))
            summary["samples"] = str(write_samples(net, tokenizer, cfg.sample, run_dir / "samples.txt"))
        summary["seconds"] = time.perf_counter() - t_start
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_config(cfg: Config, run_dir: Path) -> None:
    """run_dir/config.yaml: the fully resolved config, written before anything runs (tmp + replace)."""
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)
    tmp = run_dir / f"config.yaml.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, run_dir / "config.yaml")


# ------------------------------------------------------------------------------------------------ CLI
def _expected_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import OmegaConfBaseException

    errors: tuple = (ValueError, OSError, KeyError, OmegaConfBaseException)
    # only from modules already imported: a config error must not pay for importing torch + Lightning (~5 s)
    if "lightning.fabric" in sys.modules:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        errors += (MisconfigurationException,)
    if "train.guard" in sys.modules:
        from train.guard import GuardError

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
        val = summary.get("last_val_loss")
        val_txt = f", validation loss {val:.3f} (perplexity {math.exp(val):.1f})" if val is not None else ""
        print(
            f"done: {summary['global_step']} steps in {summary['seconds']:.0f}s, train loss "
            f"{summary['first_train_loss']:.3f} -> {summary['last_train_loss']:.3f}{val_txt}; "
            f"run dir {summary['run_dir']}"
        )
    best = summary.get("best")
    if best:  # a fine-tuning task: the monitored metric of the exported (best) model
        print(f"best {best['metric']}={best['value']:.4f} at step {best['step']}; export {summary.get('hf_dir')}")
    if summary.get("samples"):  # an LM run: the last line says what to look at and what to type next

        def shown(path: str) -> str:  # as the user types it: relative to the working directory when below it
            return path if os.path.relpath(path).startswith("..") else os.path.relpath(path)

        rd, prompt = shown(summary["run_dir"]), dcfg.sample.prompts[0] if dcfg.sample.prompts else ""
        # resume = this run's own overrides + resume=auto into its run dir, to twice the steps
        again = [o for o in HydraConfig.get().overrides.task
                 if o.split("=", 1)[0].lstrip("+~") not in ("run_dir", "resume", "trainer.max_steps")]  # fmt: skip
        again += [f"run_dir={rd}", "resume=auto", f"trainer.max_steps={2 * summary['global_step']}"]
        py = shlex.quote(shown(sys.executable))  # `make run`'s .venv/bin/python works without an activated venv
        print(f"open {shown(summary['samples'])} and {shown(summary.get('plot', rd + '/plots'))}; sample: {py} "
              f"train/generate.py {shlex.quote(shown(summary['hf_dir']))} --prompt {shlex.quote(prompt)}; resume for "
              f"{summary['global_step']} more steps: {py} train/run.py {' '.join(map(shlex.quote, again))}")
    # the value a sweeper optimises (hydra/sweeper=optuna_lr): the task's best metric, else the LM's val loss
    return best["value"] if best else summary.get("last_val_loss")


if __name__ == "__main__":
    main()
