"""The `strategy` config group -> a Lightning strategy, refused up front when this machine cannot run it.

    auto                     Lightning picks (one device: no wrapper; several: DDP)
    ddp                      DistributedDataParallel (one replica per process, gradients all-reduced)
    fsdp                     FSDP2 (fsdp.py): `fully_shard` per block then the root, applied from outside the model
                             (torchtitan's recipe) through Lightning's ModelParallelStrategy; sharded (DCP) checkpoints
                             + a consolidated model.safetensors in every step dir; also runs on CPU with gloo
    deepspeed_zero{1,2,3}    Lightning's DeepSpeedStrategy (deepspeed.py), the JSON from deepspeed_config.py (one
    deepspeed_zero3_offload  source of truth: micro-batch = data.batch_size, accumulation / clipping / precision =
                             trainer's); after each DeepSpeed save rank 0 consolidates the shards into model.safetensors

Every strategy's checkpoints/step-N holds the same `model.safetensors` + config.json + meta.json, so train/cli/export.py
and `model.init_from` read any of them; `resume=auto` resumes with the strategy that wrote the checkpoint
(`check_resume`). After fit, `full_state_dict` and `model_for_export` give the whole trained network under any of
them (FSDP2 and ZeRO-3 gather their shards).

The cluster side lives here too: `build_plugins` picks the rendezvous (SLURM, torchrun or Lightning's own env
variables) and turns off Lightning's SLURM auto-requeue, which train/callbacks/preemption.py replaces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from gpt2.attention import ATTENTION_BACKENDS, DEFAULT_ATTENTION
from train.config import ConfigError

DEEPSPEED_STRATEGIES = ("deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")


# ------------------------------------------------------------------------------------------------ up-front checks
@dataclass(frozen=True)
class Hardware:
    """What `check_hardware` resolved for a run: whether it trains on CUDA GPUs (`on_gpu`; else the CPU) and the
    Lightning precision string `trainer.precision` resolves to there (`resolve_precision`)."""

    on_gpu: bool
    precision: str


def check_hardware(strategy_cfg, trainer_cfg, attention: Optional[str] = None) -> Hardware:
    """Refuse, with one sentence, a strategy / device count / attention kernel this machine cannot run; returns the
    resolved `Hardware`. Raises ConfigError naming the setting and the fix."""
    name = strategy_cfg.name
    cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if cuda else 0
    accel = trainer_cfg.accelerator
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and cuda)
    if accel in ("gpu", "cuda") and not cuda:
        raise ConfigError(f"trainer.accelerator={accel} but no CUDA GPU is visible; use trainer.accelerator=cpu.")
    if attention is not None and ATTENTION_BACKENDS[attention].needs_cuda and not (cuda and on_gpu):
        raise ConfigError(f"attention={attention} needs a CUDA GPU; use attention={DEFAULT_ATTENTION} on CPU.")
    if name in DEEPSPEED_STRATEGIES and not on_gpu:  # DeepSpeed's CPU accelerator (gloo) trains ZeRO 1/2/3 too
        if accel not in ("cpu", "auto"):
            raise ConfigError(f"strategy={name} runs on CUDA GPUs or the CPU, not trainer.accelerator={accel}; use "
                              f"trainer.accelerator=cpu.")
    # on a GPU the precision asks the device for bf16 support: after the device checks below
    precision = None if on_gpu else resolve_precision(trainer_cfg.precision, "cpu")
    if name in DEEPSPEED_STRATEGIES and not on_gpu:
        from train.strategies.deepspeed import check_cpu_precision

        check_cpu_precision(name, precision)
    devices = trainer_cfg.devices
    if isinstance(devices, int) and devices > 0:
        if on_gpu and devices > n_gpus:
            raise ConfigError(
                f"trainer.devices={devices} but this node has {n_gpus} CUDA GPU(s); set trainer.devices<={n_gpus} "
                f"(and trainer.num_nodes for more nodes)."
            )
        cpus = os.cpu_count() or 1
        if not on_gpu and devices > cpus:
            raise ConfigError(
                f"trainer.devices={devices} CPU processes but this node has {cpus} CPU cores; set "
                f"trainer.devices<={cpus}."
            )
    elif isinstance(devices, (list, tuple)) and on_gpu:
        bad = [d for d in devices if int(d) >= n_gpus]
        if bad:
            raise ConfigError(f"trainer.devices={list(devices)} names GPU(s) {bad} but this node has {n_gpus}.")
    return Hardware(on_gpu, precision or resolve_precision(trainer_cfg.precision, accel))


def checkpoint_family(strategy_name: str) -> str:
    """Which training state a strategy writes: "fsdp" (DCP shards), "deepspeed" (ZeRO shards) or "full" (one file)."""
    if strategy_name == "fsdp":
        return "fsdp"
    return "deepspeed" if strategy_name in DEEPSPEED_STRATEGIES else "full"


def check_resume(step_path: Path, strategy_cfg, meta: Optional[dict] = None) -> None:
    """resume= a checkpoint whose training state another strategy family wrote: one sentence, before anything runs.
    meta: the checkpoint's meta.json when the caller has read it already (else it is read here). (The weights are the
    same model.safetensors everywhere: model.init_from=<it> starts a new run from them.)"""
    if meta is None:
        from train.checkpoint.layout import read_meta

        meta = read_meta(step_path)
    saved = meta.get("strategy") or "full"
    want = checkpoint_family(strategy_cfg.name)
    if saved != want:
        names = {"fsdp": "strategy=fsdp", "deepspeed": "a deepspeed_* strategy", "full": "strategy=ddp or auto"}
        raise ConfigError(
            f"checkpoint {step_path} holds {saved} training state (written under {names[saved]}) and cannot be resumed "
            f"with strategy={strategy_cfg.name}; resume with {names[saved]}, or start a new run_dir with "
            f"model.init_from={step_path}."
        )


# ------------------------------------------------------------------------------------------------ build
def build_strategy(strategy_cfg, trainer_cfg, micro_batch_size: int = 1, hardware: Optional[Hardware] = None):
    """`strategy` group -> a Lightning strategy object (or "auto").

    micro_batch_size: the loader's batch (DeepSpeed's train_micro_batch_size_per_gpu; the Task says which).
    hardware: what `check_hardware` resolved (the training job passes it: the checks ran before Lightning was
    imported); None checks here. Its precision sets FSDP's MixedPrecisionPolicy and DeepSpeed's fp16/bf16 section.
    """
    hardware = hardware or check_hardware(strategy_cfg, trainer_cfg)
    name, precision = strategy_cfg.name, hardware.precision
    timeout = timedelta(minutes=strategy_cfg.timeout_minutes)
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            find_unused_parameters=strategy_cfg.find_unused_parameters,
            gradient_as_bucket_view=strategy_cfg.gradient_as_bucket_view,
            process_group_backend=strategy_cfg.process_group_backend,
            timeout=timeout,
        )
    if name == "fsdp":
        from train.strategies.fsdp import FSDP2Strategy

        return FSDP2Strategy(
            wrap_class=strategy_cfg.wrap_class,
            reshard_after_forward=strategy_cfg.reshard_after_forward,
            offload=strategy_cfg.offload,
            param_precision=precision,
            process_group_backend=strategy_cfg.process_group_backend,
            timeout=timeout,
        )
    if name in DEEPSPEED_STRATEGIES:
        from train.strategies.deepspeed import select_cpu_accelerator, zero_strategy_class
        from train.strategies.deepspeed_config import STRATEGY_STAGES, deepspeed_config

        stage, offload = STRATEGY_STAGES[name]
        if not hardware.on_gpu:
            select_cpu_accelerator()
        config = deepspeed_config(
            stage,
            offload or strategy_cfg.offload,
            micro_batch_size=micro_batch_size,
            accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
            gradient_clip_val=trainer_cfg.gradient_clip_val,
            precision=precision,
            param_persistence_threshold=strategy_cfg.stage3_param_persistence_threshold,
            for_lightning=True,
        )
        if offload or strategy_cfg.offload:
            # our LightningModule builds torch.optim.AdamW; DeepSpeed refuses a client optimizer with offload
            # unless told (DeepSpeedCPUAdam would be faster, at the price of a C++ op build on first use)
            config["zero_force_ds_cpu_optimizer"] = False
        return zero_strategy_class()(config=config, process_group_backend=strategy_cfg.process_group_backend,
                                     timeout=timeout)
    raise ConfigError(f"strategy.name={name!r} is not available.")


def build_plugins() -> list:
    """The cluster environment: under SLURM, Lightning's SLURMEnvironment with its own requeue turned off.

    Lightning 2.6 installs SLURMEnvironment(auto_requeue=True) by default; its SIGUSR1 handler saves hpc_ckpt_N.ckpt
    inside the signal handler (a collective in a signal handler can deadlock under DDP) and requeues.
    train/callbacks/preemption.py does the same at a step boundary instead. Outside SLURM, Lightning picks torchrun's
    TorchElasticEnvironment (TORCHELASTIC_RUN_ID) or its own LightningEnvironment (MASTER_ADDR, MASTER_PORT,
    NODE_RANK, WORLD_SIZE; it spawns the other local ranks itself).
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def resolve_precision(precision: str, accelerator: str) -> str:
    """trainer.precision=auto -> bf16-mixed on a bf16-capable CUDA device, else 32-true."""
    if precision != "auto":
        return {"32": "32-true", "64": "64-true"}.get(precision, precision)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


# ------------------------------------------------------------------------------------------------ during fit
def at_accumulation_boundary(trainer) -> bool:
    """Whether the optimizer step about to run (in `on_before_optimizer_step`) updates the weights.

    Lightning calls the optimizer and its hooks once per accumulation window, except when the strategy takes over
    accumulation: DeepSpeed's engine is stepped after every micro-batch and updates only at its own boundary
    (`DeepSpeedEngine.is_gradient_accumulation_boundary`).
    """
    strategy = trainer.strategy
    if not strategy.handles_gradient_accumulation:
        return True
    engine = getattr(strategy, "deepspeed_engine", None)
    return engine is None or engine.is_gradient_accumulation_boundary()


# ------------------------------------------------------------------------------------------------ after fit
def full_state_dict(trainer, module) -> Optional[dict[str, torch.Tensor]]:
    """The full (unsharded) weights of `module.model` as of now, on rank 0; None on the other ranks.

    Call on EVERY rank: FSDP2 gathers its DTensor shards (to CPU) and ZeRO-3 its partitioned parameters with a
    collective. Other strategies hold a full replica: rank 0's own state dict (no copy).
    """
    from train.strategies.deepspeed import is_zero3
    from train.strategies.fsdp import FSDP2Strategy

    if isinstance(trainer.strategy, FSDP2Strategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if trainer.is_global_zero else None
    if is_zero3(trainer.strategy):
        import deepspeed

        from train.strategies.fsdp import retie

        with deepspeed.zero.GatheredParameters(list(module.model.parameters()), modifier_rank=None):
            if not trainer.is_global_zero:
                return None
            full = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
        return retie(full, module.model)  # the tied lm_head is wte again: stored once
    return module.model.state_dict() if trainer.is_global_zero else None


def model_for_export(trainer, module) -> Optional[nn.Module]:
    """A plain (unsharded) copy of the trained network on rank 0 for the HF export and samples; None elsewhere.

    Call on EVERY rank: under FSDP2 and ZeRO-3 the full weights are gathered with a collective. Other strategies
    keep a full replica on every rank.
    """
    from train.strategies.deepspeed import is_zero3
    from train.strategies.fsdp import FSDP2Strategy, plain_class

    if isinstance(trainer.strategy, FSDP2Strategy) or is_zero3(trainer.strategy):
        full = full_state_dict(trainer, module)
        if full is None:
            return None
        net = plain_class(module.model)(module.model.config)
        net.load_state_dict(full, strict=False)
        if getattr(net.config, "tie_word_embeddings", False) and hasattr(net, "tie_weights"):
            net.tie_weights()
        return net
    return module.model if trainer.is_global_zero else None


__all__ = [
    "DEEPSPEED_STRATEGIES",
    "Hardware",
    "at_accumulation_boundary",
    "build_plugins",
    "build_strategy",
    "check_hardware",
    "check_resume",
    "checkpoint_family",
    "full_state_dict",
    "model_for_export",
    "resolve_precision",
]
