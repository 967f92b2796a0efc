"""The LightningModule: a plain `gpt2` model + AdamW + warm-up/decay schedule + step-wise metric rows + validation.

The network is built outside (train/tasks/model.py) and passed in, so the module owns no model-construction logic and the
same `nn.Module` can be wrapped by any strategy (lightning-hydra-template: "the LightningModule wraps a plain
nn.Module"). Nothing here calls `.item()` in the step: the loss is synced to the host only at logging intervals.

`GPT2LitModule` trains the causal LM as it is; a fine-tuning task (train/tasks/) subclasses it and overrides three
hooks: `step` (forward + loss of a batch), `collect` (what validation keeps of a batch) and `val_metrics` (the
task's scores at the end of a validation).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn

from train.checkpoint.layout import META_KEY, MODEL_CONFIG_KEY, MODULE_PREFIX, CheckpointError
from train.config import OptimConfig
from train.lora import is_lora, trainable_names, trainable_only

# Lightning's DeepSpeed strategy warns whenever a module overrides configure_gradient_clipping. Ours falls through to
# the default there (DeepSpeed's precision plugin clips nothing; DeepSpeed clips by trainer.gradient_clip_val itself),
# so the warning is not true of this module.
warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ schedule
class WarmupDecay:
    """LR multiplier: linear warm-up to 1, then cosine/linear decay to min_ratio at decay_steps, then min_ratio.

    A callable object (not a lambda), so LambdaLR's state_dict stores its fields and a resumed run continues the
    same schedule. Step s is the number of optimizer steps already taken (LambdaLR's last_epoch).
    """

    def __init__(self, warmup_steps: int, decay_steps: int, min_ratio: float, schedule: str = "cosine"):
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.min_ratio = min_ratio
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:  # nanoGPT: lr * (it + 1) / (warmup + 1), never exactly 0
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        if step >= self.decay_steps:
            return self.min_ratio
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        if self.schedule == "linear":
            decay = 1.0 - progress
        else:  # cosine (Loshchilov & Hutter 2017; GPT-3 appendix B)
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the weights of Linear layers only; biases, LayerNorm and embeddings (and the tied lm_head) are not
    decayed (minGPT's configure_optimizers; Mistral / HF Trainer exclude bias and LayerNorm)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, nn.Linear) and pname == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    # "decay" marks the group for `apply_optim_config` (a restored group's weight_decay may be the old value)
    groups = [{"params": decay, "weight_decay": weight_decay, "decay": True},
              {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------------------------------ the module
def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)` with the run's hyper-parameters (conf/optim/adamw.yaml).

    fused=null: torch's single-kernel AdamW wherever it exists (CUDA and CPU): one pass over each parameter instead
    of foreach's several.
    """
    fused = cfg.fused
    if fused is None:
        fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=fused)


def schedule(cfg, max_steps: int) -> WarmupDecay:
    """The lr multiplier of the `optim` group (decay_steps=null: decay over trainer.max_steps)."""
    return WarmupDecay(cfg.warmup_steps, cfg.decay_steps or max_steps, cfg.min_lr_ratio, cfg.schedule)


def apply_optim_config(optimizer, scheduler, cfg, max_steps: int) -> tuple[float, float]:
    """Make `optimizer` and its LambdaLR `scheduler` follow the `optim` group `cfg` from the current step on, keeping
    the moments and the step count; returns (the lr the next update would have used before, the lr it uses now).

    Restoring a checkpoint brings back the optimizer's and the scheduler's hyper-parameters as they were written
    (param_groups' lr / betas / eps / weight_decay, LambdaLR's base_lrs and the WarmupDecay fields), silently
    overriding what the resumed run's config built (pytorch/examples#816, composer#3154). The schedule is a function
    of the step and the config, so after this the lr continues on the config's curve: a raised trainer.max_steps
    stretches the decay from the resumed step on. Keys a param group lacks are left alone.
    """
    before = optimizer.param_groups[0]["lr"]
    for i, group in enumerate(optimizer.param_groups):
        decay = group.get("decay", i == 0 and len(optimizer.param_groups) > 1)  # checkpoints from before the marker
        settings = {"betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay if decay else 0.0,
                    "initial_lr": cfg.lr}
        group.update({k: v for k, v in settings.items() if k in group})
    if scheduler is not None:
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        scheduler.lr_lambdas = [schedule(cfg, max_steps) for _ in optimizer.param_groups]
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() reports (torch.optim.lr_scheduler.LRScheduler)
    return before, optimizer.param_groups[0]["lr"]


class GPT2LitModule(L.LightningModule):
    """Training of a `gpt2` model; the causal LM unless a subclass overrides `step` / `collect` / `val_metrics`.

    Args:
        model: the network (built by train/tasks/model.py).
        optim: the optim group.
        max_steps: trainer.max_steps (the schedule's default decay horizon).
        log_every_n_steps: optimizer steps between logged rows (the loss is synced to the host only then).
        compile / activation_checkpointing: trainer switches applied to the network in `configure_model`.
        overfit_batches: > 0 -> train and validate on the first N micro-batches only (debug/overfit_batch).
        meta: extra fields stored in each checkpoint's meta.json (e.g. where the tokenizer lives).
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        max_steps: int,
        log_every_n_steps: int = 10,
        compile: bool = False,
        activation_checkpointing: bool = False,
        overfit_batches: int = 0,
        meta: Optional[dict[str, Any]] = None,
    ):
        super().__init__()
        self.model = model
        self.optim_cfg = optim
        self.max_steps = max_steps
        self.log_every_n_steps = log_every_n_steps
        self.compile_model = compile
        self.activation_checkpointing = activation_checkpointing
        self.overfit_batches = overfit_batches
        self.meta = dict(meta or {})
        self._overfit_cache: list[dict[str, torch.Tensor]] = []
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_n = 0
        self._last_step = -1
        self._val_sum: Optional[torch.Tensor] = None
        self._val_n: Optional[torch.Tensor] = None
        self.last_logged: dict[str, float] = {}
        self.last_val_metrics: dict[str, float] = {}  # the latest validation's row (BestCheckpoint reads it)
        # this optimizer step's total gradient 2-norm (0-dim tensor) when a callback already computed it exactly as
        # clip_grad_norm_ would (the loss guard does), for `configure_gradient_clipping`; reset there every step
        self.grad_norm: Optional[torch.Tensor] = None
        self.step_lr: Optional[float] = None  # the lr of the newest optimizer step (what its metrics row logs)
        # a LoRA model's checkpoints hold its trainable weights only (the frozen base comes from model.init_from)
        self.strict_loading = not is_lora(model)

    # -- setup
    def configure_model(self) -> None:
        if self.activation_checkpointing:
            self.model.gradient_checkpointing_enable()
        if self.compile_model and not getattr(self, "_compiled", False):
            self.model.compile()  # nn.Module.compile: compiles in place, state-dict keys stay the same
            self._compiled = True

    def configure_optimizers(self):
        cfg = self.optim_cfg
        optimizer = build_optimizer(self.model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg, self.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -- when the gradients are freed
    def frees_grads_after_step(self) -> bool:
        """Whether this module sets the gradients to None right after each optimizer step (True except under
        DeepSpeed, whose engine owns accumulation and zeroes its own gradient partitions at its boundaries).

        Lightning's automatic optimization frees them inside its closure, after the next forward and before its
        backward, so the previous step's gradients stay alive while the forward allocates its activations; a
        hand-written loop (and nanoGPT) frees them after optimizer.step(). The order changes no number (the next
        backward writes fresh gradients either way), but the earlier free lowers the step's peak memory and time
        (benchmarks/overhead.py --floor measures both orders; figures in benchmarks/RESULTS.md).
        """
        return not self.trainer.strategy.handles_gradient_accumulation

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        # the lr this update uses, for its metrics row: Lightning steps the scheduler right after the optimizer, so
        # the lr read at logging time is already the next update's (the off-by-one of transformers#35942)
        self.step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step(closure=optimizer_closure)
        if self.frees_grads_after_step():
            optimizer.zero_grad(set_to_none=True)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if not self.frees_grads_after_step():
            optimizer.zero_grad()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping (trainer.gradient_clip_val, by norm), reusing `grad_norm` when it is set.

        The loss guard already computed the step's total gradient norm over the optimizer's parameters, with the
        kernels and in the order clip_grad_norm_ uses, so clipping only scales the gradients by
        min(1, max_norm / (norm + 1e-6)) (`torch.nn.utils.clip_grads_with_norm_`) instead of a second pass that
        recomputes the same number: the same gradients bit for bit. This path is taken where the precision plugin
        would clip with the stock clip_grad_norm_: Lightning's `Precision` (32-true) and bf16 AMP, which has no
        GradScaler and so nothing to unscale (Lightning's `MixedPrecision` refuses to clip for any optimizer that
        unscales internally, fused AdamW included, even then: bf16-mixed + the default fused AdamW + clipping
        raised at the first step). fp16 with its GradScaler, DeepSpeed and the other plugins keep their own path.
        """
        total_norm, self.grad_norm = self.grad_norm, None
        plugin = self.trainer.precision_plugin
        stock = type(plugin).clip_grad_by_norm is Precision.clip_grad_by_norm and (
            type(plugin).clip_gradients is Precision.clip_gradients
            or (isinstance(plugin, MixedPrecision) and plugin.scaler is None)
        )
        if stock and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if total_norm is not None and hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6
                torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, total_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    # -- batches
    def _maybe_overfit(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        if not self.overfit_batches:
            return batch
        if len(self._overfit_cache) < self.overfit_batches:
            self._overfit_cache.append({k: v.detach().clone() for k, v in batch.items()})
        return self._overfit_cache[batch_idx % len(self._overfit_cache)]

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        return self.model(input_ids=input_ids, labels=labels)

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """(model outputs, loss) of one batch: next-token cross-entropy (labels shifted inside the model)."""
        out = self.model(input_ids=batch["input_ids"], labels=batch["labels"])
        return out, out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        n_samples = batch["input_ids"].shape[0]
        batch = self._maybe_overfit(batch, batch_idx)
        _, loss = self.step(batch)
        # The mean over the micro-batches of one optimizer step, kept on the device (no host sync here).
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        self._loss_n += 1
        self.count_samples(n_samples)
        return loss

    def count_samples(self, n_samples: int) -> None:
        """Advance the datamodule's `consumed_samples` (contract with data_pipelines: the GLOBAL sample count,
        checkpointed with the datamodule state, where a resumed run's sampler starts)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "consumed_samples"):
            dm.consumed_samples += n_samples * self.trainer.world_size

    def on_train_start(self) -> None:
        self._last_step = self.trainer.global_step
        # after Lightning restored a resumed run's optimizer and scheduler: this run's optim.* and max_steps win
        sched = self.trainer.lr_scheduler_configs[0].scheduler if self.trainer.lr_scheduler_configs else None
        before, now = apply_optim_config(self.trainer.optimizers[0], sched, self.optim_cfg, self.max_steps)
        if self.trainer.global_step > 0 and not math.isclose(before, now, rel_tol=1e-9, abs_tol=0.0):
            log.info("optim: step %d runs at lr=%.6g (the checkpoint's schedule gave %.6g): the lr follows this "
                     "run's optim.* and trainer.max_steps from the resumed step on", self.trainer.global_step + 1,
                     now, before)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log_train_step()

    def log_train_step(self) -> None:
        """Write the train row of the optimizer step just taken, once (a no-op inside an accumulation window or when
        already written). StepCheckpoint calls it before it saves, so checkpoint step-N never exists without row N."""
        step = self.trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        loss_sum, n = self._loss_sum, self._loss_n
        self._loss_sum, self._loss_n = None, 0
        if not self.should_log(step) or loss_sum is None:
            return
        # the mean over all ranks (one collective, at logging steps only): the number 1 process with the whole
        # global batch would log; the only host sync of the training loss
        loss = self.trainer.strategy.reduce(loss_sum / n, reduce_op="mean").item()
        lr = self.step_lr if self.step_lr is not None else self.trainer.optimizers[0].param_groups[0]["lr"]
        self.emit_metrics({"train/loss": loss, "lr": lr}, step)  # the progress bar reads them from last_logged
        self._flush_logs()  # the row is complete (throughput was logged before this hook)

    def should_log(self, step: int) -> bool:
        """Whether optimizer step `step` gets a metrics row: every log_every_n_steps, the first and the last."""
        return step % self.log_every_n_steps == 0 or step == 1 or step >= self.trainer.max_steps

    def emit_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One row of metrics at optimizer step `step`, to every logger (metrics.csv, W&B, TensorBoard)."""
        self.last_logged.update(metrics)
        if self.trainer.sanity_checking:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _flush_logs(self) -> None:
        for logger in self.trainer.loggers:
            if hasattr(logger, "flush"):
                logger.flush()

    # -- validation
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_n = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.overfit_batches and self._overfit_cache:
            batch = self._overfit_cache[batch_idx % len(self._overfit_cache)]
        out, loss = self.step(batch)
        self._val_sum += loss.detach().double()
        self._val_n += 1
        self.collect(out, batch)

    def collect(self, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        """Keep what `val_metrics` needs of one validation batch; the LM needs nothing besides the loss."""

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        """The scores of the validation just finished, besides val/loss; the LM's: its perplexity."""
        return {"val/ppl": math.exp(min(val_loss, 700.0))}

    def on_validation_epoch_end(self) -> None:
        # the mean over every rank's batches (the LM's validation stream is sharded by rank)
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_n, reduce_op="sum")
        if count.item() == 0:
            return
        val_loss = (total / count).item()
        metrics = {"val/loss": val_loss, **self.val_metrics(val_loss)}
        self.last_val_metrics = metrics
        self.emit_metrics(metrics, self.trainer.global_step)
        self._flush_logs()
        self.log("val_loss", val_loss, prog_bar=True, logger=False, on_epoch=True)

    # -- checkpoints: the GPT2Config and our meta travel with every checkpoint (config.json / meta.json)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cfg = self.model.config
        checkpoint[MODEL_CONFIG_KEY] = cfg.to_dict()
        checkpoint[META_KEY] = dict(self.meta, task=type(self.model).__name__)
        if "state_dict" in checkpoint:  # LoRA: the adapters and the head only (train/lora.py)
            checkpoint["state_dict"] = trainable_only(checkpoint["state_dict"], self.model, MODULE_PREFIX)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a LoRA checkpoint loads non-strictly (it lacks the frozen base): every trainable weight must be in it
        if is_lora(self.model) and "state_dict" in checkpoint:
            missing = sorted({MODULE_PREFIX + n for n in trainable_names(self.model)} - set(checkpoint["state_dict"]))
            if missing:
                raise CheckpointError(f"the checkpoint lacks {len(missing)} adapter/head weight(s) of this run "
                                      f"({missing[0]}, ...); it was written with other peft settings.")


__all__ = ["GPT2LitModule", "WarmupDecay", "build_optimizer", "param_groups"]
