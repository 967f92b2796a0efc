"""The LightningModule: a plain `gpt2` model + the optim group's optimizer + warm-up/decay schedule + step-wise metric
rows + validation.

The optimizers: AdamW over decay / no-decay groups (optim=adamw), or Muon for the hidden weight matrices with AdamW for
the rest (optim=muon), both as ONE `torch.optim.Optimizer`, because Lightning's automatic optimization steps one
optimizer per step, and one LR scheduler (LambdaLR) drives every group of it. References: minGPT's
configure_optimizers (the decay split); torch.optim.Muon and its docstring (Jordan et al. 2024, "Muon: An optimizer
for hidden layers in neural networks"); modded-nanogpt's GPT-2 speedrun (which parameters Muon takes: the 2-D
matrices of the blocks; embeddings, LM head and scalars stay on Adam).

The network is built outside (train/tasks/model.py) and passed in, so the module owns no model-construction logic and the
same `nn.Module` can be wrapped by any strategy (lightning-hydra-template: "the LightningModule wraps a plain
nn.Module"). Nothing here calls `.item()` in the step: the loss is synced to the host only at logging intervals.

`GPT2LitModule` trains the causal LM as it is; a fine-tuning task (train/tasks/) subclasses it and overrides four
hooks: `loss_sums` (forward + each loss term summed over the batch's items), `count_items` (those items, from the
labels alone), `collect` (what validation keeps of a batch) and `val_metrics` (the task's scores at the end of a
validation). Every loss is a mean over items of the whole optimizer step or validation split.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Iterable, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn
from torchmetrics.aggregation import SumMetric

from train.checkpoint.layout import META_KEY, MODEL_CONFIG_KEY, MODULE_PREFIX, CheckpointError
from train.config import OptimConfig
from train.adapters.lora import is_lora, trainable_names, trainable_only

# Lightning's DeepSpeed strategy warns whenever a module overrides configure_gradient_clipping. Ours falls through to
# the default there (DeepSpeed's precision plugin clips nothing; DeepSpeed clips by trainer.gradient_clip_val itself),
# so the warning is not true of this module.
warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")

log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------------ optimizers
def param_groups(model: nn.Module, weight_decay: float, exclude: Iterable[nn.Parameter] = ()) -> list[dict[str, Any]]:
    """Decay the weights of Linear layers only; biases, LayerNorm and embeddings (and the tied lm_head) are not
    decayed (minGPT's configure_optimizers; Mistral / HF Trainer exclude bias and LayerNorm). `exclude`: parameters
    another optimizer owns (left out of both groups). Empty groups are dropped."""
    decay, no_decay = [], []
    seen: set[int] = {id(p) for p in exclude}
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


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon updates: every trainable 2-D weight inside the transformer blocks (`model.transformer.h`:
    attention c_attn / c_proj, MLP c_fc / c_proj), in module order. The embeddings, the LM head (tied to wte) and any
    task head are outside the blocks and stay on AdamW, as in modded-nanogpt. A model without `transformer.h`
    has none (ValueError from the caller's Muon: nothing to optimize)."""
    blocks = getattr(getattr(model, "transformer", model), "h", None)
    if blocks is None:
        return []
    return [p for p in blocks.parameters() if p.requires_grad and p.ndim == 2]


def optimizer_param_names(model: nn.Module) -> list[list[str]]:
    """The parameter names of each group `build_optimizer` makes for `model`, in its order (a tied weight under the
    name it was first registered with): how a checkpoint's optimizer state, which numbers parameters by position,
    is keyed by name (train/checkpoint/universal.py)."""
    name_of: dict[int, str] = {}
    for name, p in model.named_parameters():
        name_of.setdefault(id(p), name)
    return [[name_of[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over `muon_params` and torch.optim.AdamW over `adamw_groups`, stepped as one optimizer.

    `param_groups` is AdamW's groups followed by Muon's (the very dicts the two inner optimizers read, so an LR
    scheduler or clipping that walks `param_groups` reaches both; group 0 holds `optim.lr`, the logged lr, as
    under optim=adamw), and `state` is one dict the two share (their
    parameters are disjoint). So `state_dict()` / `load_state_dict()` are torch.optim.Optimizer's own, and a dict saved
    by one instance loads into another built over the same model: after loading, the inner optimizers are pointed at
    the loaded groups and state again. `step(closure)` calls the closure once (Lightning's forward + backward), then
    steps Muon and AdamW; parameters without a gradient are skipped by both (the loss guard's skipped update).

    Args:
        muon_params: 2-D parameters (ValueError from torch.optim.Muon for any other shape).
        adamw_groups: AdamW's parameter groups (e.g. `param_groups(model, wd, exclude=muon_params)`).
        muon: torch.optim.Muon's keyword arguments (lr, momentum, weight_decay, nesterov, ns_steps, adjust_lr_fn).
        adamw: torch.optim.AdamW's keyword arguments (lr, betas, eps, fused).
    """

    def __init__(self, muon_params: list[nn.Parameter], adamw_groups: list[dict[str, Any]], muon: dict[str, Any],
                 adamw: dict[str, Any]):
        self.muon = torch.optim.Muon(muon_params, **muon)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        self.n_adamw_groups = len(self.adamw.param_groups)
        super().__init__(self.adamw.param_groups + self.muon.param_groups, defaults={})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this optimizer's group dicts and state (again, after a load replaced them)."""
        self.adamw.param_groups = self.param_groups[: self.n_adamw_groups]
        self.muon.param_groups = self.param_groups[self.n_adamw_groups:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def _fused(model: nn.Module, fused: Optional[bool]) -> bool:
    if fused is not None:
        return fused
    return all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in model.parameters())


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optim group's optimizer over `model` (train.config.OptimConfig / MuonConfig).

    optim=adamw: AdamW over `param_groups(model)`. optim=muon (`cfg.needs_whole_matrices`): `MuonWithAdamW`, Muon over
    `hidden_matrices(model)` with cfg.muon_* and AdamW over the rest with cfg.lr / betas / eps / weight_decay.
    fused=null: torch's single-kernel AdamW wherever it exists (CUDA and CPU): one pass over each parameter instead
    of foreach's several. Raises ValueError for optim=muon over sharded parameters (FSDP2 DTensors, ZeRO-3).
    """
    adamw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=_fused(model, cfg.fused))
    if not cfg.needs_whole_matrices:
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw)
    matrices = hidden_matrices(model)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in matrices):  # train/job.py refuses this earlier
        raise ValueError("torch.optim.Muon orthogonalizes whole matrices, but these parameters are shards (FSDP2 "
                         "DTensors or DeepSpeed ZeRO-3 partitions); use optim=adamw with a sharding strategy.")
    muon = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay,
                nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.adjust_lr_fn)
    return MuonWithAdamW(matrices, param_groups(model, cfg.weight_decay, exclude=matrices), muon, adamw)


def schedule(cfg, max_steps: int) -> WarmupDecay:
    """The lr multiplier of the `optim` group (decay_steps=null: decay over trainer.max_steps)."""
    return WarmupDecay(cfg.warmup_steps, cfg.decay_steps or max_steps, cfg.min_lr_ratio, cfg.schedule)


def apply_optim_config(optimizer, scheduler, reference: torch.optim.Optimizer, cfg, max_steps: int) -> tuple[float, float]:
    """Make `optimizer` and its LambdaLR `scheduler` follow the `optim` group `cfg` from the current step on, keeping
    the moments and the step count; returns (the lr the next update would have used before, the lr it uses now).

    `reference`: `build_optimizer(model, cfg)` built fresh over the same model: its param groups carry the config's
    hyper-parameters group for group (AdamW's lr / betas / eps / weight_decay, Muon's lr / momentum / ...), which are
    copied onto the restored groups. Restoring a checkpoint brings back the hyper-parameters it was written with
    (param_groups, LambdaLR's base_lrs and WarmupDecay fields), silently overriding what the resumed run's config built
    (pytorch/examples#816, composer#3154). The schedule is a function of the step and the config, so after this the
    lr continues on the config's curve: a raised trainer.max_steps stretches the decay from the resumed step on.
    """
    before = optimizer.param_groups[0]["lr"]
    for group, ref in zip(optimizer.param_groups, reference.param_groups):
        group.update({k: v for k, v in ref.items() if k != "params"})
        group["initial_lr"] = ref["lr"]
    if scheduler is not None:
        scheduler.base_lrs = [ref["lr"] for ref in reference.param_groups]
        scheduler.lr_lambdas = [schedule(cfg, max_steps) for _ in optimizer.param_groups]
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    return before, optimizer.param_groups[0]["lr"]


# ------------------------------------------------------------------------------------------------ the module
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
        # after Lightning restored a resumed run's optimizer and scheduler: this run's optim.* and max_steps win
        sched = self.trainer.lr_scheduler_configs[0].scheduler if self.trainer.lr_scheduler_configs else None
        reference = build_optimizer(self.model, self.optim_cfg)  # holds no state: nothing is allocated
        before, now = apply_optim_config(self.trainer.optimizers[0], sched, reference, self.optim_cfg, self.max_steps)
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
        if not self.should_log(step) or not self.train_loss.update_called:
            self.train_loss.reset()
            return
        # the step's exact mean loss: the micro-batches' shares summed over all ranks (torchmetrics syncs them, at
        # logging steps only: the only host sync of the training loss)
        loss = float(self.train_loss.compute())
        self.train_loss.reset()
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
        trainer = self.trainer
        spec = getattr(trainer.strategy, "strategy_spec", None)
        # the layout that wrote it: whether a resume loads natively or through the universal training state
        # (train.strategies.native_resume), and how its loop counts map onto another accumulation (on_load_checkpoint)
        checkpoint[META_KEY] = dict(self.meta, task=type(self.model).__name__,
                                    strategy_name=spec.name if spec is not None else "auto",
                                    world_size=trainer.world_size,
                                    accumulate_grad_batches=trainer.accumulate_grad_batches,
                                    precision=str(trainer.precision))
        if "state_dict" in checkpoint:  # LoRA: the adapters and the head only (train/adapters/lora.py)
            checkpoint["state_dict"] = trainable_only(checkpoint["state_dict"], self.model, MODULE_PREFIX)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written with another gradient accumulation (another world size at the same global batch):
        Lightning counts micro-batches per rank and steps the optimizer when that count reaches a multiple of
        trainer.accumulate_grad_batches, so the saved count is moved to the one this run would have at the saved
        step (global_step x accumulation, the offset of a save inside the batch's hooks kept). The data position
        itself is the datamodule's `consumed_samples`, in global samples, which needs no change.
        A LoRA checkpoint loads non-strictly (it lacks the frozen base): every trainable weight must be in it;
        raises CheckpointError when one is not (written with other peft settings)."""
        if is_lora(self.model) and "state_dict" in checkpoint:
            missing = sorted({MODULE_PREFIX + n for n in trainable_names(self.model)} - set(checkpoint["state_dict"]))
            if missing:
                raise CheckpointError(f"the checkpoint lacks {len(missing)} adapter/head weight(s) of this run "
                                      f"({missing[0]}, ...); it was written with other peft settings.")
        saved = (checkpoint.get(META_KEY) or {}).get("accumulate_grad_batches")
        now = self.trainer.accumulate_grad_batches
        progress = ((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.batch_progress")
        if saved is None or int(saved) == now or not progress:
            return
        shift = int(checkpoint.get("global_step", 0)) * (now - int(saved))
        for part in ("total", "current"):
            for key in ("ready", "started", "processed", "completed"):
                if key in progress.get(part, {}):
                    progress[part][key] = max(0, progress[part][key] + shift)


__all__ = ["GPT2LitModule", "MuonWithAdamW", "WarmupDecay", "apply_optim_config", "build_optimizer", "hidden_matrices",
           "optimizer_param_names", "param_groups", "schedule"]
