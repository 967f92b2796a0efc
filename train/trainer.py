"""The Lightning Trainer of a run: the `trainer` group's arguments, the strategy, the callbacks every run has, the
checkpoint IO plugin and the cluster environment. train/job.py adds the run's checkpoint callbacks; benchmarks/
time exactly this Trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.callbacks import Callback


def build_profiler(name: Optional[str], run_dir: Path):
    """trainer.profiler=simple|advanced|pytorch -> Lightning's profiler writing run_dir/profile*; None -> none."""
    if name is None:
        return None
    from lightning.pytorch import profilers

    cls = {"simple": profilers.SimpleProfiler, "advanced": profilers.AdvancedProfiler,
           "pytorch": profilers.PyTorchProfiler}[name]
    return cls(dirpath=str(run_dir), filename="profile")


class ValidateLastStep(Callback):
    """The last optimizer step (trainer.max_steps) gets a validation inside `fit`, also when it is not a multiple of
    the validation interval, so the final checkpoint, checkpoints/best and the export all see it.

    Lightning validates when a callback sets `trainer.should_stop` at a step boundary (training_epoch_loop.py,
    `_should_check_val_fx`: "allow validation if requesting to stop early through `Trainer.should_stop`"); at
    max_steps the fit ends there anyway. A step that validates by its interval validates once.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def build_trainer(trainer_cfg, guard_cfg, strategy: Any, precision: str, run_dir: Path, loggers: list,
                  extra_callbacks: Sequence = ()):
    """The Lightning Trainer of a run (also what benchmarks/overhead.py times).

    Args:
        trainer_cfg: the `trainer` group (TrainerConfig); guard_cfg: the `guard` group. The per-micro-batch
            reseeding (StepSeed) starts from the seed `lightning.seed_everything` set.
        strategy: the Lightning strategy (train.strategies.build_strategy) or "auto"; precision: the resolved
            Lightning precision string (train.strategies.Hardware.precision).
        run_dir, loggers: where the run writes, and its loggers (train.callbacks.loggers.build_loggers).
        extra_callbacks: the run's own callbacks (checkpoints, evaluation, preemption), after the loss guard.

    Callbacks, in order: StepSeed, RNGState, Throughput, the loss guard (before the checkpoint callbacks in
    `extra_callbacks`, so a step-N save holds a rolled-back state, not the spiking one), ValidateLastStep, then the
    progress bar.
    """
    import lightning as L

    from train.callbacks.guard import build_guard
    from train.callbacks.progress import StepProgressBar
    from train.callbacks.rng import RNGState, StepSeed
    from train.callbacks.throughput import Throughput
    from train.checkpoint.io import DirCheckpointIO
    from train.strategies import build_plugins

    tcfg, fast = trainer_cfg, trainer_cfg.fast_dev_run
    callbacks: list = [StepSeed(), RNGState(), Throughput(tcfg.log_every_n_steps), *build_guard(guard_cfg, run_dir),
                       ValidateLastStep(), *extra_callbacks]
    if tcfg.enable_progress_bar:
        # the bar's numbers change only at logging steps; redrawing it every batch costs ~1 ms a step
        callbacks.append(StepProgressBar(refresh_rate=tcfg.log_every_n_steps))
    return L.Trainer(
        accelerator=tcfg.accelerator,
        devices=tcfg.devices,
        num_nodes=tcfg.num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=1 if fast else tcfg.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=tcfg.accumulate_grad_batches,
        gradient_clip_val=tcfg.gradient_clip_val,
        gradient_clip_algorithm="norm",
        # the training stream never ends: validate every N optimizer steps, counted in micro-batches
        val_check_interval=(1 if fast else tcfg.val_check_interval) * tcfg.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=min(1, tcfg.limit_val_batches) if fast else tcfg.limit_val_batches,
        num_sanity_val_steps=tcfg.num_sanity_val_steps,
        log_every_n_steps=tcfg.log_every_n_steps,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,  # StepCheckpoint owns checkpoints/
        enable_progress_bar=tcfg.enable_progress_bar,
        enable_model_summary=tcfg.enable_progress_bar,
        plugins=[DirCheckpointIO(), *build_plugins()],  # + SLURMEnvironment(auto_requeue=False) under SLURM
        deterministic="warn" if tcfg.deterministic else None,  # torch.use_deterministic_algorithms(True, warn_only)
        profiler=build_profiler(tcfg.profiler, run_dir),
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # data_pipelines' sampler shards by rank and resumes by position
    )


__all__ = ["ValidateLastStep", "build_profiler", "build_trainer"]
