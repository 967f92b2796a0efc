"""Typed configuration of a training run: one dataclass per component, one YAML group per dataclass.

`conf/config.yaml` starts its defaults list with `config_schema` (the root `Config` below, registered in Hydra's
ConfigStore by `register_configs`), so every `conf/<group>/<option>.yaml` merges onto a typed node: an unknown key
(`trainer.max_step=5`) or a badly typed value (`trainer.max_steps=abc`) fails at composition time with Hydra's
message naming the key. What types alone cannot express (ranges, combinations) is checked in `__post_init__`,
which runs when `train/run.py` turns the composed `DictConfig` into these objects (`OmegaConf.to_object`), before
anything is built. Every error names the key and the fix (lightning-hydra-template layout, litgpt-style dataclasses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from data_pipelines.config import DataConfig
from gpt2.attention import ATTENTION_BACKENDS, DEFAULT_ATTENTION  # names and facts only: no torch import
from data_pipelines.tasks.config import TaskDataConfig

from train.tasks import task_names


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# ----------------------------------------------------------------------------------------------------- model
MODEL_PRESETS = ("tiny", "demo", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


@dataclass
class ModelConfig:
    """The network's shape (conf/model/<size>.yaml). vocab_size=None: take it from the tokenizer."""

    name: str = "tiny"
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256
    n_inner: Optional[int] = None  # None -> 4 * n_embd (GPT-2 paper)
    activation_function: str = "gelu_new"
    vocab_size: Optional[int] = None  # None -> len(tokenizer)
    dropout: float = 0.0  # resid/embd/attn dropout; nanoGPT: 0 for pre-training, 0.1+ for fine-tuning
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    # The LM loss this many tokens at a time, without the full (tokens x vocab) logits (gpt2/loss.py: the logits of
    # 8 x 1024 tokens at GPT-2's vocabulary are 1.6 GB in fp32); 0: the loss on the full logits. Equal results
    # either way; benchmarks/chunked_ce.py measures the memory and the step time.
    loss_chunk_size: int = 1024
    # An HF folder (config.json + model.safetensors), one of our checkpoints (checkpoints/step-N), a run dir, or a
    # Hugging Face hub id (gpt2, openai-community/gpt2-xl): start from those weights instead of a random init (the
    # shape fields above are then taken from it).
    init_from: Optional[str] = None
    # The hub revision (branch, tag or commit) of a hub id in init_from; null: main. transformers'
    # from_pretrained(revision=...), run_clm.py's --model_revision. A run records the commit it resolved to.
    revision: Optional[str] = None

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "n_positions"):
            _check(getattr(self, key) > 0, f"model.{key}={getattr(self, key)} must be positive.")
        _check(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}.",
        )
        _check(self.n_inner is None or self.n_inner > 0, f"model.n_inner={self.n_inner} must be positive or null.")
        _check(self.vocab_size is None or self.vocab_size > 0, f"model.vocab_size={self.vocab_size} must be > 0.")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1).")
        _check(self.loss_chunk_size >= 0, f"model.loss_chunk_size={self.loss_chunk_size} must be >= 0 (0: no chunks).")
        _check(self.revision is None or self.init_from is not None,
               f"model.revision={self.revision} names a hub revision of model.init_from, which is not set; set "
               f"model.init_from=<hub id> or drop model.revision.")


@dataclass
class AttentionConfig:
    """Which attention kernel runs (conf/attention/*.yaml): a key of `gpt2.ATTENTION_BACKENDS`, whose backends own no
    parameters, so any checkpoint runs on any. Whether this machine can run it is checked with the hardware."""

    implementation: str = DEFAULT_ATTENTION

    def __post_init__(self) -> None:
        _check(
            self.implementation in ATTENTION_BACKENDS,
            f"attention.implementation={self.implementation!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}.",
        )


@dataclass
class StabilityConfig:
    """Mistral's two GPT-2 stability flags (conf/stability/*.yaml; Stanford CRFM Mistral, 2021)."""

    scale_attn_by_inverse_layer_idx: bool = False  # scale attention logits by 1/(layer_idx+1)
    reorder_and_upcast_attn: bool = False  # compute q·k in fp32 (avoids fp16/bf16 overflow in deep models)


# ----------------------------------------------------------------------------------------------------- task
MONITOR_MODES = ("max", "min")


@dataclass
class TaskConfig:
    """What the model learns (conf/task/*.yaml): `name` picks the task module train/tasks/<name>.py (head, loss,
    metrics, best checkpoint); the allowed names are those modules.

    The fine-tuning tasks (cls, token_cls, qa, mc) read their examples from `task.data` (data_pipelines.tasks'
    TaskDataConfig: the offline demo set by default, or local jsonl/csv/parquet / hub datasets); the top-level `data`
    group stays the LM data (and, with no model.init_from, names the corpus the BPE tokenizer is trained on).
    """

    name: str = "lm"
    # a task defined outside train/tasks/: the importable module (on PYTHONPATH) whose TASK it is; null -> the
    # module train/tasks/<name>.py
    module: Optional[str] = None
    data: TaskDataConfig = field(default_factory=TaskDataConfig)  # unused by task=lm
    lm_coef: float = 0.5  # mc: loss = lm_coef * LM loss + multiple-choice loss (HF run_openai_gpt.py: lm_coef 0.9)
    # the validation metric that picks checkpoints/best and the export; null -> the task's default
    # (cls: val/accuracy max, or val/mse min for regression; token_cls and qa: val/f1 max; mc: val/accuracy max)
    monitor: Optional[str] = None
    monitor_mode: Optional[str] = None  # max | min; null -> the default for `monitor`

    def __post_init__(self) -> None:
        names = task_names()
        _check(
            self.name in names or self.module is not None,
            f"task.name={self.name!r} is not available; use one of {', '.join(names)}, or name the module of a task "
            f"of your own with task.module=<module>.",
        )
        _check(self.lm_coef >= 0, f"task.lm_coef={self.lm_coef} must be >= 0.")
        _check(
            self.monitor_mode is None or self.monitor_mode in MONITOR_MODES,
            f"task.monitor_mode={self.monitor_mode!r} is unknown; use max, min or null.",
        )
        _check(
            self.monitor is None or self.monitor.startswith("val/"),
            f"task.monitor={self.monitor!r} must name a validation metric, e.g. val/f1 or val/accuracy.",
        )


# ----------------------------------------------------------------------------------------------------- strategy
@dataclass
class StrategyConfig:
    """How the model is spread over devices (conf/strategy/<name>.yaml): the settings every strategy has. `name` is a
    key of train/strategies' registry (each option's YAML sets it); a strategy with settings of its own uses one of
    the subclasses below, so a key it does not have fails at composition, naming the key."""

    name: str = "auto"
    process_group_backend: Optional[str] = None  # None -> nccl on CUDA, gloo on CPU
    timeout_minutes: int = 30  # a collective waiting longer than this fails the run

    def __post_init__(self) -> None:
        _check(bool(self.name), "strategy.name is empty; choose a strategy with strategy=<option>.")
        _check(self.timeout_minutes > 0, f"strategy.timeout_minutes={self.timeout_minutes} must be positive.")


@dataclass
class DDPConfig(StrategyConfig):
    """DistributedDataParallel's settings (torch DDP docs)."""

    gradient_as_bucket_view: bool = True  # gradients are views into the all-reduce buckets: one copy less
    find_unused_parameters: bool = False  # every parameter gets a gradient in GPT-2; true costs a graph walk a step


@dataclass
class FSDPConfig(StrategyConfig):
    """FSDP2's settings (`fully_shard`, applied from outside the model: torchtitan)."""

    wrap_class: Optional[str] = None  # "gpt2.modeling.GPT2Block": one FSDP unit per instance; None -> the root only
    reshard_after_forward: bool = True  # free gathered params after forward (ZeRO-3-like); false = ZeRO-2-like
    offload: bool = False  # parameters, gradients and optimizer state in CPU memory (CPUOffloadPolicy)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.wrap_class is None or "." in self.wrap_class,
            f"strategy.wrap_class={self.wrap_class!r} must be a dotted class path, e.g. gpt2.modeling.GPT2Block.",
        )


@dataclass
class ZeROConfig(StrategyConfig):
    """DeepSpeed ZeRO's settings; the stage comes with the strategy (train/strategies/deepspeed.py)."""

    offload: bool = False  # ZeRO-Offload: optimizer state (+ parameters at stage 3) in CPU memory
    # stage 3: a parameter with fewer elements stays whole on every rank (gathering it would cost more than it
    # weighs). DeepSpeed's default, 1e5, keeps every tensor of a small model whole: tests lower it to really shard
    stage3_param_persistence_threshold: int = 100_000

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.stage3_param_persistence_threshold >= 0,
            f"strategy.stage3_param_persistence_threshold={self.stage3_param_persistence_threshold} must be >= 0.",
        )


STRATEGY_SCHEMAS = {"strategy_schema": StrategyConfig, "ddp_schema": DDPConfig, "fsdp_schema": FSDPConfig,
                    "zero_schema": ZeROConfig}  # conf/strategy/<option>.yaml starts its defaults list with one


# ----------------------------------------------------------------------------------------------------- trainer
PRECISIONS = ("auto", "32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64", "64-true")


@dataclass
class TrainerConfig:
    """Arguments of lightning.Trainer plus our switches (conf/trainer/default.yaml)."""

    max_steps: int = 400  # optimizer steps
    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps
    devices: Any = "auto"  # "auto" | int | list of device ids
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on a CUDA device with bf16, else 32-true
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0  # global-norm clip (GPT-3 paper §B, nanoGPT)
    val_check_interval: int = 100  # optimizer steps between validations
    limit_val_batches: int = 20  # batches per validation
    log_every_n_steps: int = 10  # optimizer steps between metric rows (and the only host syncs of the loss)
    compile: bool = False  # torch.compile the model (nn.Module.compile: state-dict keys unchanged)
    activation_checkpointing: bool = False  # recompute block activations in backward (saves memory, ~30% slower)
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 0
    fast_dev_run: bool = False  # one step of train + val, no checkpoints/export (a smoke test)
    overfit_batches: int = 0  # > 0: train and validate on the same first N batches
    profiler: Optional[str] = None  # None | simple | advanced | pytorch

    def __post_init__(self) -> None:
        _check(self.max_steps > 0, f"trainer.max_steps={self.max_steps} must be positive.")
        _check(self.num_nodes > 0, f"trainer.num_nodes={self.num_nodes} must be positive.")
        _check(
            self.accumulate_grad_batches > 0,
            f"trainer.accumulate_grad_batches={self.accumulate_grad_batches} must be positive.",
        )
        self.precision = str(self.precision)
        _check(
            self.precision in PRECISIONS,
            f"trainer.precision={self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}.",
        )
        _check(
            self.gradient_clip_val is None or self.gradient_clip_val > 0,
            f"trainer.gradient_clip_val={self.gradient_clip_val} must be positive or null (no clipping).",
        )
        _check(self.val_check_interval > 0, f"trainer.val_check_interval={self.val_check_interval} must be > 0.")
        _check(self.limit_val_batches >= 0, f"trainer.limit_val_batches={self.limit_val_batches} must be >= 0.")
        _check(self.log_every_n_steps > 0, f"trainer.log_every_n_steps={self.log_every_n_steps} must be > 0.")
        _check(self.overfit_batches >= 0, f"trainer.overfit_batches={self.overfit_batches} must be >= 0.")
        _check(
            self.profiler in (None, "simple", "advanced", "pytorch"),
            f"trainer.profiler={self.profiler!r} is unknown; use simple, advanced, pytorch or null.",
        )
        if isinstance(self.devices, str) and self.devices != "auto":
            _check(self.devices.lstrip("-").isdigit(), f"trainer.devices={self.devices!r}: use auto, N or a list.")
            self.devices = int(self.devices)
        if isinstance(self.devices, int):
            _check(self.devices > 0 or self.devices == -1, f"trainer.devices={self.devices} must be >0 or -1.")


# ----------------------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    """AdamW + warm-up + decay (conf/optim/adamw.yaml). The schedule fields apply to every optimizer of the group."""

    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 40
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    decay_steps: Optional[int] = None  # None -> trainer.max_steps: reach min_lr at the last step
    min_lr_ratio: float = 0.1  # min_lr = lr * ratio (Chinchilla / nanoGPT: ~lr/10)
    fused: Optional[bool] = None  # None -> torch's fused AdamW kernel where it exists (CUDA, CPU)

    # whether the optimizer updates each weight matrix as a whole (so a strategy that hands it shards cannot run it)
    needs_whole_matrices = False

    def __post_init__(self) -> None:
        self._check_name()
        _check(self.lr > 0 and math.isfinite(self.lr), f"optim.lr={self.lr} must be a positive number.")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0.")
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9,0.95].",
        )
        self.betas = [float(b) for b in self.betas]
        _check(self.eps > 0, f"optim.eps={self.eps} must be positive.")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0.")
        _check(
            self.schedule in ("cosine", "linear", "constant"),
            f"optim.schedule={self.schedule!r} is unknown; use cosine, linear or constant.",
        )
        _check(self.decay_steps is None or self.decay_steps > 0, f"optim.decay_steps={self.decay_steps} must be >0.")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")

    def _check_name(self) -> None:
        _check(self.name == "adamw", f"optim.name={self.name!r} is unknown; choose the optimizer with optim=adamw or "
                                     f"optim=muon.")


MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn


@dataclass
class MuonConfig(OptimConfig):
    """Muon for the 2-D weight matrices of the transformer blocks, AdamW (the fields above: lr, betas, ...) for the
    embeddings, the LM head, biases and LayerNorms: the split of modded-nanogpt's GPT-2 speedrun (Jordan et al.
    2024). conf/optim/muon.yaml; the schedule scales both learning rates alike. The names are torch.optim.Muon's."""

    name: str = "muon"
    muon_lr: float = 0.02  # Muon's lr (KellerJordan/Muon README: 0.02)
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov)
    muon_weight_decay: float = 0.0  # decoupled: each step multiplies the matrix by 1 - lr * weight_decay
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations of the orthogonalization
    adjust_lr_fn: Optional[str] = None  # None = "original": lr x sqrt(max(1, rows/cols)); or match_rms_adamw

    needs_whole_matrices = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.muon_lr > 0 and math.isfinite(self.muon_lr),
               f"optim.muon_lr={self.muon_lr} must be a positive number.")
        _check(0.0 <= self.muon_momentum < 1.0, f"optim.muon_momentum={self.muon_momentum} must be in [0, 1).")
        _check(self.muon_weight_decay >= 0, f"optim.muon_weight_decay={self.muon_weight_decay} must be >= 0.")
        _check(0 < self.ns_steps < 100, f"optim.ns_steps={self.ns_steps} must be in 1..99.")
        _check(
            self.adjust_lr_fn is None or self.adjust_lr_fn in MUON_LR_ADJUSTMENTS,
            f"optim.adjust_lr_fn={self.adjust_lr_fn!r} is unknown; use null, {' or '.join(MUON_LR_ADJUSTMENTS)}.",
        )

    def _check_name(self) -> None:
        _check(self.name == "muon", f"optim.name={self.name!r} does not go with the muon group's keys; choose the "
                                    f"optimizer with optim=adamw or optim=muon.")


OPTIM_SCHEMAS = {"muon_schema": MuonConfig}  # conf/optim/<option>.yaml with keys of its own starts with one


# ----------------------------------------------------------------------------------------------------- logging
@dataclass
class LoggerConfig:
    """Where metrics go besides run_dir/metrics.csv, which is always written (conf/logger/*.yaml)."""

    wandb: bool = False
    # W&B mode: None -> "online" when a key is configured (WANDB_API_KEY or ~/.netrc), else "offline".
    # The key is read by wandb itself from the environment / netrc; it is never part of this config.
    wandb_mode: Optional[str] = None
    wandb_project: str = "gpt2-forge"
    wandb_entity: Optional[str] = None
    tensorboard: bool = False

    def __post_init__(self) -> None:
        _check(
            self.wandb_mode in (None, "online", "offline", "disabled"),
            f"logger.wandb_mode={self.wandb_mode!r} is unknown; use online, offline, disabled or null.",
        )


@dataclass
class CheckpointConfig:
    """checkpoints/step-N/ cadence and retention (conf/checkpoint/default.yaml)."""

    every_n_steps: int = 100
    keep_last: int = 3  # keep the newest N step dirs (0 = keep all); the one resumed from is never deleted
    save_final: bool = True  # also save at the last step
    # write checkpoints in the background (train/checkpoint/async_io.py): training waits only for a copy of the
    # state in host memory, not for the disk; published only when complete, like a synchronous save
    async_save: bool = True

    def __post_init__(self) -> None:
        _check(self.every_n_steps > 0, f"checkpoint.every_n_steps={self.every_n_steps} must be positive.")
        _check(self.keep_last >= 0, f"checkpoint.keep_last={self.keep_last} must be >= 0 (0 keeps all).")


@dataclass
class GuardConfig:
    """The loss-spike / NaN guard (conf/guard/*.yaml; train/trainer.py's LossGuard): skip non-finite updates, roll back
    spikes."""

    enabled: bool = True
    spike_factor: Optional[float] = 3.0  # loss > factor x running average -> roll back; null: no spike check
    # ... and above the running average by at least this much (nats): a loss near 0, a classifier's late in training,
    # triples on an ordinary batch (0.05 -> 0.2) without anything diverging
    spike_min_delta: float = 1.0
    warmup_steps: int = 100  # optimizer steps before spikes are checked (the loss falls fast at first)
    ema_decay: float = 0.99  # running average's decay per step (~100 steps of memory)
    max_events: int = 5  # skipped + rolled-back steps after which the run stops

    def __post_init__(self) -> None:
        _check(
            self.spike_factor is None or self.spike_factor > 1.0,
            f"guard.spike_factor={self.spike_factor} must be > 1 or null (no spike check).",
        )
        _check(self.spike_min_delta >= 0, f"guard.spike_min_delta={self.spike_min_delta} must be >= 0.")
        _check(self.warmup_steps >= 0, f"guard.warmup_steps={self.warmup_steps} must be >= 0.")
        _check(0.0 < self.ema_decay < 1.0, f"guard.ema_decay={self.ema_decay} must be in (0, 1).")
        _check(self.max_events > 0, f"guard.max_events={self.max_events} must be positive.")


@dataclass
class EvalConfig:
    """In-training evaluation on lm-evaluation-harness tasks (conf/eval/*.yaml; train/eval/evaluate.py): the
    evaluator of `train/cli/evaluate.py` runs on rank 0 every `every_n_steps` optimizer steps and at the end of training,
    and logs eval/<task>/<metric>. Off while `tasks` is empty (the default): then nothing of lm_eval is imported.

    The names are lm_eval's (`simple_evaluate`: tasks, limit, num_fewshot, batch_size, include_path, max_gen_toks).
    """

    tasks: List[str] = field(default_factory=list)  # lm_eval task / group / tag names; [] = off
    every_n_steps: Optional[int] = None  # optimizer steps between evaluations; null -> trainer.val_check_interval
    limit: Optional[float] = None  # documents per task (>= 1), or a fraction of each task (< 1); null -> all
    num_fewshot: Optional[int] = None  # null -> each task's own setting
    batch_size: int = 8  # requests per forward pass
    include_path: Optional[str] = None  # a folder of extra task YAMLs (lm_eval's format; comma-separated folders)
    max_gen_toks: Optional[int] = None  # generation budget when a task sets none; null -> lm_eval's 256

    def __post_init__(self) -> None:
        self.tasks = [t.strip() for t in self.tasks]
        _check(all(self.tasks), f"eval.tasks={list(self.tasks)} holds an empty name; list lm_eval task names.")
        _check(
            self.every_n_steps is None or self.every_n_steps >= 1,
            f"eval.every_n_steps={self.every_n_steps} must be >= 1 (or null: every trainer.val_check_interval).",
        )
        _check(
            self.limit is None or (self.limit > 0 and math.isfinite(self.limit)
                                   and (self.limit < 1 or float(self.limit).is_integer())),
            f"eval.limit={self.limit} must be a whole number of documents per task, a fraction in (0, 1), or null.",
        )
        if self.limit is not None and self.limit >= 1:
            self.limit = int(self.limit)
        _check(self.num_fewshot is None or self.num_fewshot >= 0, f"eval.num_fewshot={self.num_fewshot} must be >= 0.")
        _check(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be >= 1.")
        _check(self.max_gen_toks is None or self.max_gen_toks >= 1,
               f"eval.max_gen_toks={self.max_gen_toks} must be >= 1 or null.")


@dataclass
class SampleConfig:
    """What samples.txt shows at the end of an LM run."""

    prompts: List[str] = field(default_factory=lambda: ["Return True if", "If an", "It is"])  # conf/config.yaml
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 0, f"sample.max_new_tokens={self.max_new_tokens} must be >= 0.")
        _check(self.temperature > 0, f"sample.temperature={self.temperature} must be positive.")
        _check(self.top_k is None or self.top_k > 0, f"sample.top_k={self.top_k} must be positive or null.")
        _check(self.top_p is None or 0 < self.top_p <= 1, f"sample.top_p={self.top_p} must be in (0, 1].")


# ----------------------------------------------------------------------------------------------------- peft
PEFT_METHODS = ("none", "lora")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (conf/peft/*.yaml; train/adapters/lora.py): `none` trains every weight; `lora`
    freezes the base model of model.init_from and trains low-rank adapters on `target_modules` plus the task head in full
    (peft's modules_to_save), with the `peft` library (Hu et al. 2021, "LoRA"; peft's LoraConfig names: r,
    lora_alpha, lora_dropout, target_modules).

    r: the adapters' rank. alpha: their scale numerator (the update is alpha / r * B A). dropout: on the adapters'
    input. target_modules: module names (transformers' GPT-2 names) that get an adapter.
    """

    method: str = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])

    def __post_init__(self) -> None:
        _check(self.method in PEFT_METHODS, f"peft.method={self.method!r} is unknown; use peft=none or peft=lora.")
        _check(self.r >= 1, f"peft.r={self.r} must be >= 1 (the adapters' rank).")
        _check(self.alpha > 0, f"peft.alpha={self.alpha} must be positive.")
        _check(0.0 <= self.dropout < 1.0, f"peft.dropout={self.dropout} must be in [0, 1).")
        self.target_modules = [str(t).strip() for t in self.target_modules]
        _check(bool(self.target_modules) and all(self.target_modules),
               f"peft.target_modules={list(self.target_modules)} must list module names, e.g. [c_attn,c_proj,c_fc].")


# ----------------------------------------------------------------------------------------------------- root
@dataclass
class Config:
    """The whole run. Groups are sub-configs; components receive only their own."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    seed: int = 1337
    run_dir: str = "outputs/run"
    resume: Optional[str] = None  # null | auto (newest complete checkpoint in run_dir) | <step dir or run dir>

    def __post_init__(self) -> None:
        _check(bool(self.run_dir), "run_dir is empty; set run_dir=<folder>.")
        _check(self.resume is None or bool(self.resume), "resume is empty; use resume=auto or resume=<checkpoint>.")
        _check(
            self.peft.method == "none" or self.model.init_from is not None,
            f"peft={self.peft.method} adapts a trained base model, but model.init_from is unset; set "
            f"model.init_from=<an HF folder, a checkpoint or a run dir>.",
        )
        # The model must see every position the data produces (INTERFACE.md: "a sequence longer than n_positions").
        # With model.init_from the size comes from those weights; train/job.py checks it once they are loaded.
        _check(
            self.model.init_from is not None or self.data.block_size <= self.model.n_positions,
            f"data.block_size={self.data.block_size} exceeds model.n_positions={self.model.n_positions}; "
            f"lower data.block_size or raise model.n_positions.",
        )


def register_configs() -> None:
    """Register the schemas: `config_schema` is the first entry of conf/config.yaml's defaults list."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, node in STRATEGY_SCHEMAS.items():
        cs.store(group="strategy", name=name, node=node)
    for name, node in OPTIM_SCHEMAS.items():
        cs.store(group="optim", name=name, node=node)


# data.* keys that choose the LM training data; a fine-tuning task reads its data from task.data.* instead
_LM_DATA_KEYS = ("source", "path", "val_path", "name", "config_name", "split", "val_split", "text_column")


def check_overrides(cfg: Config, overrides: Sequence[str]) -> None:
    """Never let a fine-tuning task ignore the data its user named.

    A fine-tuning task (task != lm) trains on `task.data.*`; `data=<group>` and `data.path` / `data.name` / ... choose
    the LM corpus (for a fine-tune, at most the corpus its tokenizer is trained on). While the task data is still its
    built-in demo, such an override would leave the task training on the demo data, so the run stops, naming the
    `task.data.*` key to set (`task=cls data=jsonl data.path=my.jsonl` -> task.data.source=jsonl task.data.path=...).
    With the task's own data given, data.* keeps choosing the tokenizer's corpus.

    Args:
        cfg: the composed, validated config.
        overrides: the command line's overrides as Hydra saw them (e.g. `HydraConfig.get().overrides.task`).
    Raises:
        ConfigError: an LM-data override on a fine-tuning task that trains on its demo data.
    """
    if cfg.task.name == "lm" or cfg.task.data.source != "demo":
        return
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        field = "source" if key == "data" else key[len("data."):] if key.startswith("data.") else None
        if field not in _LM_DATA_KEYS or (key == "data" and value == "default"):
            continue
        if field == "source":
            kind = value if value in ("jsonl", "csv", "parquet", "hub") else "jsonl|csv|parquet|hub"
            hint = f"task.data.source={kind} task.data.path=... (or task.data.name=... for hub)"
        else:
            hint = f"task.data.source=jsonl|csv|parquet|hub task.data.{field}={value}"
        raise ConfigError(
            f"task={cfg.task.name} fine-tunes on task.data.*, not on data.*: {override} would leave it training on "
            f"its demo data; set {hint} instead."
        )


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a composed DictConfig that its structured schema (the dataclasses of this module) does not
    have: what `+key=value` adds. OmegaConf.to_object drops them without a word, so `to_config` refuses them."""
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    if not is_dataclass(schema):
        return []
    fields = {f.name for f in dataclass_fields(schema)}
    found = []
    for key in node.keys():
        if key not in fields:
            found.append(f"{prefix}{key}")
            continue
        child = None if OmegaConf.is_missing(node, key) else node[key]
        if isinstance(child, DictConfig):
            found += unknown_keys(child, f"{prefix}{key}.")
    return found


def _unknown_key_error(node: Any, key: str) -> ConfigError:
    from omegaconf import OmegaConf

    from data_pipelines.cli import unknown_key_message

    group = key.rpartition(".")[0]
    return ConfigError(unknown_key_message(key, OmegaConf.get_type(OmegaConf.select(node, group) if group else node)))


def sweep_root_from_run_dir(argv: Sequence[str]) -> list[str]:
    """Under -m, `run_dir=X` is the sweep's root: adds `hydra.sweep.dir=X`, so the jobs go to X/0, X/1, ...

    Hydra puts multirun jobs under `hydra.sweep.dir` (conf/config.yaml: multirun/<date>/<time>) and run.py points each
    job's run_dir at its folder there, so a plain `run_dir=X` would otherwise be ignored in silence.

    Raises:
        ConfigError: run_dir itself is swept (`run_dir=a,b`): the jobs' folders are numbered under one root.
    """
    if not {"-m", "--multirun"} & set(argv) or any(a.startswith("hydra.sweep.dir=") for a in argv):
        return list(argv)
    for arg in argv:
        if arg.lstrip("+").startswith("run_dir="):
            root = arg.split("=", 1)[1]
            if "," in root or root.startswith(("range(", "choice(", "glob(")):
                raise ConfigError(
                    f"{arg}: under -m run_dir is the sweep's root (each job gets a numbered folder in it), so it "
                    f"cannot be swept; give one folder."
                )
            return [*argv, f"hydra.sweep.dir={root}"]
    return list(argv)


def to_config(node: Any) -> Config:
    """A composed DictConfig -> validated `Config` (runs every __post_init__). Used only by train/run.py and tests."""
    from omegaconf import OmegaConf

    if isinstance(node, Config):
        return node
    extra = unknown_keys(node)
    if extra:
        raise _unknown_key_error(node, extra[0])
    obj = OmegaConf.to_object(node)
    if not isinstance(obj, Config):
        raise ConfigError("the composed config is not a train Config; compose conf/config.yaml (config_name=config).")
    return obj
