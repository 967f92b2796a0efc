"""The Lightning Trainer of a run: the `trainer` group's arguments, the strategy, the callbacks every run has, the
checkpoint IO plugin and the cluster environment. train/job.py adds the run's checkpoint callbacks; benchmarks/
time exactly this Trainer. Here too, the two callbacks that decide what a step counts for: `ValidateLastStep` and
the loss guard (`LossGuard`, the `guard` group).

The loss-spike / NaN guard: a Lightning callback that keeps one bad batch from ruining a run.

Per optimizer step it looks at two numbers, the step's mean loss and whether any gradient is non-finite:

- a non-finite loss or gradient: the update is skipped. Every `.grad` is set to None before the optimizer runs, and
  torch optimizers skip parameters without a gradient, so the weights, AdamW's moments and its step count all stay
  as they were (zeroing the gradients would not do: AdamW would still move the weights by its momentum and weight
  decay). The LR schedule and the data position still advance, as with GradScaler's skipped steps.
- a finite loss above `spike_factor` x its running average (an EMA, checked after `warmup_steps`) and at least
  `spike_min_delta` nats above it (a classifier's loss near 0 triples on an ordinary batch): the update is
  skipped too, and the model, optimizer and LR schedule are reloaded from `checkpoints/last`. The data are not
  rewound: the samples drawn between that checkpoint and the spike are skipped (PaLM §5.1 restarts ~100 steps before
  a spike and skips ~200-500 batches). The step counter keeps counting, so metrics.csv rows and step-N checkpoint
  names stay monotonic and no earlier checkpoint is overwritten.

After `max_events` skips + rollbacks together the run stops with `GuardError`, naming the steps. The counts are
logged to metrics.csv as guard/skipped and guard/rollbacks, and the guard's state (running average, events) is
saved in every checkpoint so a resumed run continues it exactly.

Cost: one host sync per optimizer step (a 2-element tensor: loss, grad norm) in
`on_before_optimizer_step`, before the optimizer runs; guard.enabled=false removes it. The loss of every micro-batch
is summed on the device (`on_before_backward`), so accumulation adds no syncs. The gradient norm is not computed twice:
`GPT2LitModule` clips with the guard's total norm (`grad_norm`) where it equals clip_grad_norm_'s bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor

from train.checkpoint.layout import latest_checkpoint
from train.strategies import at_accumulation_boundary


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


def build_checkpoint_io(strategy: Any, async_save: bool):
    """The Trainer's CheckpointIO plugin for `checkpoint.async_save` (the choice among train/checkpoint's writers).

    False: DirCheckpointIO (synchronous). True: a strategy that writes its own layout (FSDP2's DCP shards, DeepSpeed's
    ZeRO files) is switched to its background path through its `use_async_save()`, and keeps DirCheckpointIO for
    what Lightning reads through the plugin; any other ("auto", DDP) gets AsyncDirCheckpointIO.
    """
    from train.checkpoint.async_io import AsyncDirCheckpointIO
    from train.checkpoint.io import DirCheckpointIO

    if not async_save:
        return DirCheckpointIO()
    use_async_save = getattr(strategy, "use_async_save", None)
    if use_async_save is None:
        return AsyncDirCheckpointIO()
    use_async_save()
    return DirCheckpointIO()


# ------------------------------------------------------------------------------------------------ the loss guard
class GuardError(RuntimeError):
    """The run diverged: too many non-finite / spiking steps. The message names the steps and what to try."""


class LossGuard(Callback):
    """Skip non-finite updates, roll back loss spikes to the last checkpoint, stop after `max_events`.

    Args:
        run_dir: the run directory (its checkpoints/last is the rollback target).
        spike_factor: a loss above spike_factor x running average is a spike; None: no spike detection.
        spike_min_delta: ... if it is also at least this far above the running average (nats), so that the small
            loss of a well-fitted classifier (0.05 -> 0.2 on one batch) is not taken for a divergence.
        warmup_steps: optimizer steps before spikes are checked (the loss falls fast at first).
        ema_decay: the running average's decay per optimizer step (0.99: ~100 steps of memory).
        max_events: skips + rollbacks after which the run stops.
    """

    def __init__(self, run_dir: str | Path, spike_factor: Optional[float] = 3.0, warmup_steps: int = 100,
                 ema_decay: float = 0.99, max_events: int = 5, spike_min_delta: float = 1.0):
        self.run_dir = Path(run_dir)
        self.spike_factor = spike_factor
        self.spike_min_delta = spike_min_delta
        self.warmup_steps = warmup_steps
        self.ema_decay = ema_decay
        self.max_events = max_events
        # state saved in checkpoints (plain numbers: weights_only-loadable)
        self.ema: Optional[float] = None
        self.n_good = 0  # finite, non-spiking steps seen (the warm-up counter)
        self.skipped = 0
        self.rollbacks = 0
        self.events: list[list] = []  # [step, "nan" | "spike", loss, rolled back to step or -1]
        # per-step scratch
        self._loss_sum: Optional[torch.Tensor] = None
        self._rollback_pending = False
        self._logged_step = -1  # the optimizer step of the last counts row (accumulation ends many batches per step)
        self._param_order: Optional[tuple] = None  # (optimizer, its module parameters in order, the others)

    def on_train_start(self, trainer, pl_module) -> None:
        self._logged_step = trainer.global_step  # step 0, or the resumed step whose row is already on disk

    # -- the step's loss, summed on the device over its micro-batches (Lightning divides each by the accumulation)
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not at_accumulation_boundary(trainer):  # DeepSpeed: called after every micro-batch; decide once per step
            return
        loss_sum, self._loss_sum = self._loss_sum, None
        dev = pl_module.device
        in_optimizer, others = self._params_in_optimizer_order(pl_module, optimizer)
        grads = [p.grad for p in in_optimizer if p.grad is not None]
        outside = [p.grad for p in others if p.grad is not None]  # not the optimizer's: clip_grad_norm_ skips them
        if grads or outside:
            # one fused norm kernel per dtype/device group; a NaN/Inf anywhere makes the total non-finite
            norms = torch._foreach_norm(grads + outside)
            sharded = any(isinstance(n, DTensor) for n in norms)
            plain = not outside and not sharded
            if sharded:
                # FSDP2: per-shard norms come back as DTensors (a pending sum over ranks); full_tensor() reduces
                # each to the whole parameter's norm, so every rank sees the true global norm
                norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
            if not all(n.dtype == torch.float32 and n.device == dev for n in norms):
                norms = [n.float().to(dev) for n in norms]  # (a dispatcher call each: only where needed)
            gnorm = torch.linalg.vector_norm(torch.stack(norms))
            if plain and hasattr(pl_module, "grad_norm") and all(g.dtype == torch.float32 for g in grads):
                # the very number clip_grad_norm_ would compute (same kernels, same order): the module's clipping
                # scales by it instead of a second pass over the gradients
                pl_module.grad_norm = gnorm
        else:  # DeepSpeed ZeRO keeps the gradients in its own partitions (and skips a non-finite step itself)
            gnorm = torch.zeros((), device=dev)
        loss = loss_sum if loss_sum is not None else torch.zeros((), device=dev)
        stats = torch.stack([loss if loss.device == dev else loss.to(dev), gnorm])
        if trainer.world_size > 1:  # every rank must take the same decision; a mean keeps any rank's NaN/Inf
            stats = trainer.strategy.reduce(stats, reduce_op="mean")
        loss_v, gnorm_v = stats.tolist()  # the guard's one host sync per optimizer step
        # fp16 + GradScaler: overflowing gradients are routine and the scaler already skips those steps
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        bad = not math.isfinite(loss_v) or (not scaled and not math.isfinite(gnorm_v))
        step = trainer.global_step + 1  # the step this update would complete
        if bad:
            self._drop_update(pl_module)
            self.skipped += 1
            self._record(trainer, step, "nan", loss_v, -1)
            return
        if self._is_spike(loss_v):
            self._drop_update(pl_module)
            self._rollback_pending = True
            self.events.append([step, "spike", loss_v, -1])  # the target is filled in by the rollback
            return
        self.ema = loss_v if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * loss_v
        self.n_good += 1

    def _params_in_optimizer_order(self, pl_module, optimizer) -> tuple[list, list]:
        """The module's parameters in the optimizer's group order (how clip_grad_norm_ sums their norms), and those
        the optimizer does not hold. Computed once per optimizer: walking the module tree and matching parameter ids
        is Python work that need not be repeated every step. Under DeepSpeed ZeRO the optimizer holds
        its own flat partitions, so every module parameter lands in the second list (and has no `.grad` there)."""
        if self._param_order is None or self._param_order[0] is not optimizer:
            params = list(pl_module.parameters())
            ids = {id(p) for p in params}
            ordered = [p for g in optimizer.param_groups for p in g["params"] if id(p) in ids]
            held = {id(p) for p in ordered}
            self._param_order = (optimizer, ordered, [p for p in params if id(p) not in held])
        return self._param_order[1], self._param_order[2]

    def _is_spike(self, loss: float) -> bool:
        return (
            self.spike_factor is not None
            and self.ema is not None
            and self.n_good >= self.warmup_steps
            and loss > self.spike_factor * self.ema
            and loss - self.ema >= self.spike_min_delta
        )

    @staticmethod
    def _drop_update(pl_module) -> None:
        # optimizers skip parameters without a gradient: no update, no moment / step change. (Under DeepSpeed ZeRO
        # `.grad` is already None - the gradients live in its partitions - and the update goes through; a spike's
        # rollback then overwrites it, and DeepSpeed skips a non-finite step on its own.)
        for p in pl_module.parameters():
            p.grad = None

    # -- after the (skipped) optimizer step: roll back, log, stop
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._rollback_pending:
            self._rollback_pending = False
            self.rollbacks += 1
            target = self.rollback(trainer, pl_module)
            self.events[-1][3] = target
            self._record(trainer, step, None, None, target)
            return
        # with gradient accumulation every micro-batch ends here, but a step's row is written once, when it completes
        if step != self._logged_step and self._should_log(trainer, pl_module, step):
            self._log(pl_module, step)

    def _record(self, trainer, step: int, kind: Optional[str], loss: Optional[float], target: int) -> None:
        if kind is not None:
            self.events.append([step, kind, loss, target])
        self._log(trainer.lightning_module, step)
        if len(self.events) >= self.max_events:
            raise GuardError(self._stop_message())

    def _log(self, pl_module, step: int) -> None:
        self._logged_step = step
        metrics = {"guard/skipped": float(self.skipped), "guard/rollbacks": float(self.rollbacks)}
        if hasattr(pl_module, "emit_metrics"):
            pl_module.emit_metrics(metrics, step)
        elif pl_module.logger is not None:
            pl_module.logger.log_metrics(metrics, step=step)

    @staticmethod
    def _should_log(trainer, pl_module, step: int) -> bool:
        if hasattr(pl_module, "should_log"):
            return pl_module.should_log(step)
        return step % max(1, trainer.log_every_n_steps) == 0 or step >= trainer.max_steps

    def _stop_message(self) -> str:
        parts = []
        for step, kind, loss, target in self.events:
            what = f"step {step}: non-finite loss/gradient" if kind == "nan" else f"step {step}: loss {loss:.4g} spike"
            if kind == "spike":
                what += f" (rolled back to step {target})" if target >= 0 else " (no checkpoint to roll back to)"
            parts.append(what)
        return (
            f"the loss guard stopped the run after {len(self.events)} bad steps (guard.max_events="
            f"{self.max_events}): {'; '.join(parts)}. Lower optim.lr or check the data around those steps, then "
            f"continue with resume=auto (or raise guard.max_events / guard.spike_factor)."
        )

    def rollback(self, trainer, pl_module) -> int:
        """Reload model, optimizer and LR schedule from checkpoints/last; the step it came from, or -1 if none."""
        from train.checkpoint.async_io import wait_for_checkpoints

        wait_for_checkpoints(trainer.strategy)  # checkpoint.async_save: the newest one is published (rank 0) ...
        trainer.strategy.barrier("LossGuard.rollback")  # ... before any rank looks for it
        target = latest_checkpoint(self.run_dir)
        if target is None:
            return -1
        # through the strategy, as a resume loads: FSDP2 and DeepSpeed ZeRO load their sharded model and optimizer
        # state in place here (DeepSpeed: engine.load_checkpoint, every rank its own partition), and their
        # load_*_state_dict below are no-ops; single-device / DDP get the full dict from DirCheckpointIO and load it
        ckpt = trainer.strategy.load_checkpoint(target)
        trainer.strategy.load_model_state_dict(ckpt, strict=True)
        trainer.strategy.load_optimizer_state_dict(ckpt)
        for cfg, state in zip(trainer.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
            cfg.scheduler.load_state_dict(state)
        return int(ckpt.get("global_step", -1))

    # -- checkpointed state
    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "n_good": self.n_good, "skipped": self.skipped, "rollbacks": self.rollbacks,
                "events": [list(e) for e in self.events]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema = state_dict.get("ema")
        self.n_good = int(state_dict.get("n_good", 0))
        self.skipped = int(state_dict.get("skipped", 0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.events = [list(e) for e in state_dict.get("events", [])]


def build_guard(guard_cfg, run_dir: str | Path) -> list[Callback]:
    """The `guard` group -> [LossGuard] (or [] when guard.enabled=false)."""
    if not guard_cfg.enabled:
        return []
    return [LossGuard(run_dir, spike_factor=guard_cfg.spike_factor, warmup_steps=guard_cfg.warmup_steps,
                      ema_decay=guard_cfg.ema_decay, max_events=guard_cfg.max_events,
                      spike_min_delta=guard_cfg.spike_min_delta)]


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Refuse to export or sample a model whose weights hold NaN/Inf (only possible with guard=off)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise GuardError(
            f"the trained weights hold NaN/Inf ({bad[0]}{more}) at step {step}: a non-finite update went through with "
            f"guard=off, so no export or samples were written; train again with the default guard, which skips such "
            f"steps."
        )


# ------------------------------------------------------------------------------------------------ the Trainer
def build_trainer(trainer_cfg, guard_cfg, strategy: Any, precision: str, run_dir: Path, loggers: list,
                  extra_callbacks: Sequence = (), async_save: bool = False):
    """The Lightning Trainer of a run (also what benchmarks/overhead.py times).

    Args:
        trainer_cfg: the `trainer` group (TrainerConfig); guard_cfg: the `guard` group. The per-micro-batch
            reseeding (StepSeed) starts from the seed `lightning.seed_everything` set.
        strategy: the Lightning strategy (train.strategies.build_strategy) or "auto"; precision: the resolved
            Lightning precision string (train.strategies.Hardware.precision).
        run_dir, loggers: where the run writes, and its loggers (train.callbacks.loggers.build_loggers).
        extra_callbacks: the run's own callbacks (checkpoints, evaluation, preemption), after the loss guard.
        async_save: `checkpoint.async_save`: checkpoints written by a background writer (the CheckpointIO plugin
            `build_checkpoint_io` chooses), else synchronously (DirCheckpointIO).

    Callbacks, in order: StepSeed, RNGState, Throughput, the loss guard (before the checkpoint callbacks in
    `extra_callbacks`, so a step-N save holds a rolled-back state, not the spiking one), ValidateLastStep, then the
    progress bar.
    """
    import lightning as L

    from train.callbacks.progress import StepProgressBar
    from train.callbacks.rng import RNGState, StepSeed
    from train.callbacks.throughput import Throughput
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
        # the CheckpointIO, + SLURMEnvironment(auto_requeue=False) under SLURM
        plugins=[build_checkpoint_io(strategy, async_save), *build_plugins()],
        deterministic="warn" if tcfg.deterministic else None,  # torch.use_deterministic_algorithms(True, warn_only)
        profiler=build_profiler(tcfg.profiler, run_dir),
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # data_pipelines' sampler shards by rank and resumes by position
    )


__all__ = ["GuardError", "LossGuard", "ValidateLastStep", "build_checkpoint_io", "build_guard", "build_profiler",
           "build_trainer", "check_finite_weights"]
