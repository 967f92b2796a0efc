"""The LightningModule: a plain `gpt2` model + AdamW + warm-up/decay schedule + step-wise metric rows + validation.

The network is built outside (train/tasks/model.py) and passed in, so the module owns no model-construction logic and the
same `nn.Module` can be wrapped by any strategy (lightning-hydra-template: "the LightningModule wraps a plain
nn.Module"). Nothing here calls `.item()` in the step: the loss is synced to the host only at logging intervals.

`GPT2LitModule` trains the causal LM as it is; a fine-tuning task (train/tasks/) subclasses it and overrides four
hooks: `loss_sums` (forward + each loss term summed over the batch's items), `count_items` (those items, from the
labels alone), `collect` (what validation keeps of a batch) and `val_metrics` (the task's scores at the end of a
validation). Every loss is a mean over items of the whole optimizer step or validation split.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn
from torchmetrics.aggregation import SumMetric

from train.checkpoint.layout import META_KEY, MODEL_CONFIG_KEY
from train.config import OptimConfig

# Lightning's DeepSpeed strategy warns whenever a module overrides configure_gradient_clipping. Ours falls through to
# the default there (DeepSpeed's precision plugin clips nothing; DeepSpeed clips by trainer.gradient_clip_val itself),
# so the warning is not true of this module.
warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")

IGNORE_INDEX = -100  # the label no loss scores (torch cross_entropy's ignore_index, transformers' convention)


def item_sum() -> SumMetric:
    """A float64 sum that all-reduces on compute() (torchmetrics); NaN kept (the loss guard must see it) and never
    checked per update (that check syncs the host)."""
    return SumMetric(nan_strategy="disable").set_dtype(torch.float64)


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
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
        loss_weights: {loss term: weight} of `loss_sums`' terms in the loss (the LM's one term: {"tokens": 1}).

    Losses and metrics are means over items (tokens, labelled tokens, examples), never over batches: training
    divides each term's sum by the items of the whole optimizer step (`training_step`), validation sums and counts
    over the whole split (`on_validation_epoch_end`).
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
        loss_weights: Optional[dict[str, float]] = None,
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
        self.loss_weights = dict(loss_weights or {"tokens": 1.0})
        self.train_loss = item_sum()  # this step's micro-batch shares of its mean loss
        self.val_sums = nn.ModuleDict({t: item_sum() for t in self.loss_weights})
        self.val_counts = nn.ModuleDict({t: item_sum() for t in self.loss_weights})
        self._step_items: Optional[dict[str, torch.Tensor]] = None  # this step's all-reduced item counts
        self._last_step = -1
        self.last_logged: dict[str, float] = {}
        self.last_val_metrics: dict[str, float] = {}  # the latest validation's row (BestCheckpoint reads it)
        # this optimizer step's total gradient 2-norm (0-dim tensor) when a callback already computed it exactly as
        # clip_grad_norm_ would (the loss guard does), for `configure_gradient_clipping`; reset there every step
        self.grad_norm: Optional[torch.Tensor] = None

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
        decay_steps = cfg.decay_steps or self.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupDecay(cfg.warmup_steps, decay_steps, cfg.min_lr_ratio, cfg.schedule)
        )
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
    def _maybe_overfit(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if not self.overfit_batches:
            return batch
        if len(self._overfit_cache) < self.overfit_batches:
            self._overfit_cache.append({k: v.detach().clone() for k, v in batch.items() if torch.is_tensor(v)})
        # the step's item counts stay those of the step being trained (the cached blocks hold as many tokens)
        step = {k: batch[k] for k in ("step_items", "step_micro_batch") if k in batch}
        return {**self._overfit_cache[batch_idx % len(self._overfit_cache)], **step}

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        return self.model(input_ids=input_ids, labels=labels)

    def count_items(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{loss term: 0-dim integer tensor}: the items each term of `loss_sums` sums over in `batch`, from its labels
        alone (the data loader counts a whole optimizer step ahead with it: data_pipelines.sampler.StepBatches).
        The causal LM's: the tokens that have a next-token label (labels[..., 1:] != -100)."""
        return {"tokens": (batch["labels"][..., 1:] != IGNORE_INDEX).sum()}

    def loss_sums(self, batch: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """(model outputs, {loss term: the SUM of its loss over the batch's items}, fp32 0-dim): next-token
        cross-entropy summed over the labelled tokens (transformers' ForCausalLMLoss with num_items_in_batch=1)."""
        out = self.model(input_ids=batch["input_ids"], labels=batch["labels"], num_items_in_batch=1)
        return out, {"tokens": out.loss}

    def weighted_mean(self, sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum over terms of weight x sum / count (a term with no items adds 0)."""
        return torch.stack([self.loss_weights[t] * sums[t] / counts[t].clamp(min=1) for t in sums]).sum()

    def step_items(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{loss term: items of the WHOLE optimizer step, over its micro-batches and every rank} (0-dim tensors on
        this device): the counts StepBatches attached, all-reduced once, at the step's first micro-batch. A batch
        from a loader without StepBatches counts itself and assumes its step's micro-batches hold as many items."""
        local = batch.get("step_items")
        if local is None:
            scale = self.trainer.accumulate_grad_batches
            return {k: v * scale for k, v in self._all_reduce_counts(self.count_items(batch)).items()}
        if batch.get("step_micro_batch", 0) == 0 or self._step_items is None:
            self._step_items = self._all_reduce_counts(local)
        return self._step_items

    def _all_reduce_counts(self, counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = list(counts)
        stacked = torch.stack([torch.as_tensor(counts[k]) for k in names]).to(self.device, torch.int64)
        if self.trainer.world_size > 1:  # one collective for every term
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        return dict(zip(names, stacked.unbind()))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The micro-batch's share of the optimizer step's mean loss, scaled for what follows it.

        Each term is summed over the micro-batch's items and divided by the items of the whole step (all
        micro-batches, all ranks): the gradient is that of the mean over every item of the step, however the step
        is cut into micro-batches, accumulation and ranks (transformers' num_items_in_batch). Lightning divides the
        returned loss by accumulate_grad_batches (DeepSpeed's engine is told not to divide again) and DDP / FSDP /
        ZeRO average gradients over the ranks, so the loss is multiplied back by both.
        """
        n_samples = batch["input_ids"].shape[0]
        batch = self._maybe_overfit(batch, batch_idx)
        counts = self.step_items(batch)
        _, sums = self.loss_sums(batch)
        loss = self.weighted_mean(sums, counts)
        self.train_loss.update(loss.detach())  # summed over the step's micro-batches and ranks: the step's mean
        self.count_samples(n_samples)
        return loss * (self.trainer.world_size * self.trainer.accumulate_grad_batches)

    def count_samples(self, n_samples: int) -> None:
        """Advance the datamodule's `consumed_samples` (contract with data_pipelines: the GLOBAL sample count,
        checkpointed with the datamodule state, where a resumed run's sampler starts)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "consumed_samples"):
            dm.consumed_samples += n_samples * self.trainer.world_size

    def on_train_start(self) -> None:
        self._last_step = self.trainer.global_step
        self.train_loss.reset()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log_train_step()

    def log_train_step(self) -> None:
        """Write the train row of the optimizer step just taken, once (a no-op inside an accumulation window or when
        already written). StepCheckpoint calls it before it saves, so checkpoint step-N never exists without row N."""
        step = self.trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if not self.should_log(step) or not self.train_loss.update_called:
            self.train_loss.reset()
            return
        # the step's exact mean loss: the micro-batches' shares summed over all ranks (torchmetrics syncs them, at
        # logging steps only: the only host sync of the training loss)
        loss = float(self.train_loss.compute())
        self.train_loss.reset()
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
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
        for metric in (*self.val_sums.values(), *self.val_counts.values()):
            metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.overfit_batches and self._overfit_cache:
            batch = self._overfit_cache[batch_idx % len(self._overfit_cache)]
        out, sums = self.loss_sums(batch)
        counts = self.count_items(batch)
        for term, value in sums.items():
            self.val_sums[term].update(value.detach())
            self.val_counts[term].update(counts[term])
        self.collect(out, batch)

    def collect(self, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        """Keep what `val_metrics` needs of one validation batch; the LM needs nothing besides the loss."""

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        """The scores of the validation just finished, besides val/loss; the LM's: its perplexity."""
        return {"val/ppl": math.exp(min(val_loss, 700.0))}

    def on_validation_epoch_end(self) -> None:
        # each term's loss summed and its items counted over every batch of every rank (torchmetrics all-reduces
        # both), divided once: the exact mean over the split's items whatever the batch size or rank count
        terms = [t for t in self.loss_weights if self.val_counts[t].update_called]
        if not terms:
            return
        sums = {t: self.val_sums[t].compute() for t in terms}
        counts = {t: self.val_counts[t].compute() for t in terms}
        if not any(float(c) > 0 for c in counts.values()):
            return
        val_loss = float(sum(self.loss_weights[t] * sums[t] / counts[t].clamp(min=1) for t in terms))
        metrics = {"val/loss": val_loss, **self.val_metrics(val_loss)}
        self.last_val_metrics = metrics
        self.emit_metrics(metrics, self.trainer.global_step)
        self._flush_logs()
        self.log("val_loss", val_loss, prog_bar=True, logger=False, on_epoch=True)

    # -- resume with another cut of the same step
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Count the resumed run's micro-batches in ITS micro-batches per step.

        Lightning restores its batch counters as the saved run counted them, then decides when to step the
        optimizer (batch count % accumulate_grad_batches) and when to validate (batch count % val_check_batch) from
        them: a run saved at step 3 of 8 x 1 and resumed as 4 x accumulate 2 took a first step of one micro-batch
        and validated off its steps. Checkpoints are taken at optimizer-step boundaries and the data position is
        kept in samples, so setting the counters to global_step x this run's micro-batches per step resumes as if
        this run had made every step.
        """
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        progress = loop.get("epoch_loop.batch_progress")
        if progress is None or "global_step" not in checkpoint:
            return
        per_step = 1 if self.trainer.strategy.handles_gradient_accumulation else self.trainer.accumulate_grad_batches
        batches = int(checkpoint["global_step"]) * per_step
        for part in ("total", "current"):
            for key in ("ready", "started", "processed", "completed"):
                if key in progress.get(part, {}):
                    progress[part][key] = batches

    # -- checkpoints: the GPT2Config and our meta travel with every checkpoint (config.json / meta.json)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cfg = self.model.config
        checkpoint[MODEL_CONFIG_KEY] = cfg.to_dict()
        checkpoint[META_KEY] = dict(self.meta, task=type(self.model).__name__)


__all__ = ["GPT2LitModule", "WarmupDecay", "build_optimizer", "param_groups"]
