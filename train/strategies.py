"""The `strategy` config group -> a Lightning strategy, refused up front when this machine cannot run it.

    auto                     Lightning picks (one device: no wrapper; several: DDP)
    ddp                      DistributedDataParallel (one replica per process, gradients all-reduced)
    fsdp                     FSDP2: `fully_shard` per block then the root, applied from outside the model (torchtitan's
                             recipe) through Lightning's ModelParallelStrategy; sharded (DCP) checkpoints + a
                             consolidated model.safetensors in every step dir; also runs on CPU with gloo
    deepspeed_zero{1,2,3}    Lightning's DeepSpeedStrategy, the JSON from train/deepspeed_config.py (one source of
    deepspeed_zero3_offload  truth: micro-batch = data.batch_size, accumulation / clipping / precision = trainer's);
                             after each DeepSpeed save rank 0 consolidates the shards into model.safetensors

Every strategy's checkpoints/step-N holds the same `model.safetensors` + config.json + meta.json, so train/export.py
and `model.init_from` read any of them; `resume=auto` resumes with the strategy that wrote the checkpoint.

The cluster side lives here too: `build_plugins` picks the rendezvous (SLURM, torchrun or Lightning's own env
variables) and turns off Lightning's SLURM auto-requeue, which train/preemption.py replaces.
"""

from __future__ import annotations

import importlib
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from train import checkpoint as ck
from train.config import ConfigError

DEEPSPEED_STRATEGIES = ("deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")
SHARDED_DIR = "sharded"  # inside checkpoints/step-N: the FSDP2 DCP shards of model + optimizer


# ------------------------------------------------------------------------------------------------ up-front checks
def check_hardware(strategy_cfg, trainer_cfg, attention: Optional[str] = None) -> None:
    """Refuse, with one sentence, a strategy / device count / attention kernel this machine cannot run."""
    name = strategy_cfg.name
    cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if cuda else 0
    accel = trainer_cfg.accelerator
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and cuda)
    if name in DEEPSPEED_STRATEGIES and not (cuda and accel in ("auto", "gpu", "cuda")):
        where = "trainer.accelerator=cpu" if accel == "cpu" else "a machine without CUDA"
        raise ConfigError(
            f"strategy={name} needs CUDA GPUs (Lightning's DeepSpeed strategy refuses the CPU) and this is {where}; "
            f"use strategy=ddp or strategy=fsdp on CPU."
        )
    if accel in ("gpu", "cuda") and not cuda:
        raise ConfigError(f"trainer.accelerator={accel} but no CUDA GPU is visible; use trainer.accelerator=cpu.")
    if attention == "flash" and not (cuda and on_gpu):
        raise ConfigError("attention=flash needs a CUDA GPU; use attention=sdpa on CPU.")
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


def checkpoint_family(strategy_name: str) -> str:
    """Which training state a strategy writes: "fsdp" (DCP shards), "deepspeed" (ZeRO shards) or "full" (one file)."""
    if strategy_name == "fsdp":
        return "fsdp"
    return "deepspeed" if strategy_name in DEEPSPEED_STRATEGIES else "full"


def check_resume(step_path: Path, strategy_cfg) -> None:
    """resume= a checkpoint whose training state another strategy family wrote: one sentence, before anything runs.
    (The weights are the same model.safetensors everywhere: model.init_from=<it> starts a new run from them.)"""
    saved = ck.read_meta(step_path).get("strategy") or "full"
    want = checkpoint_family(strategy_cfg.name)
    if saved != want:
        names = {"fsdp": "strategy=fsdp", "deepspeed": "a deepspeed_* strategy", "full": "strategy=ddp or auto"}
        raise ConfigError(
            f"checkpoint {step_path} holds {saved} training state (written under {names[saved]}) and cannot be resumed "
            f"with strategy={strategy_cfg.name}; resume with {names[saved]}, or start a new run_dir with "
            f"model.init_from={step_path}."
        )


# ------------------------------------------------------------------------------------------------ build
def build_strategy(strategy_cfg, trainer_cfg, micro_batch_size: int = 1, precision: Optional[str] = None):
    """`strategy` group -> a Lightning strategy object (or "auto").

    micro_batch_size: data.batch_size (DeepSpeed's train_micro_batch_size_per_gpu); precision: the resolved
    trainer precision (Lightning string) for FSDP's MixedPrecisionPolicy and DeepSpeed's fp16/bf16 section.
    """
    from train.module import resolve_precision

    check_hardware(strategy_cfg, trainer_cfg)
    name = strategy_cfg.name
    precision = precision or resolve_precision(trainer_cfg.precision, trainer_cfg.accelerator)
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
        return FSDP2Strategy(
            wrap_class=strategy_cfg.wrap_class,
            reshard_after_forward=strategy_cfg.reshard_after_forward,
            offload=strategy_cfg.offload,
            param_precision=precision,
            process_group_backend=strategy_cfg.process_group_backend,
            timeout=timeout,
        )
    if name in DEEPSPEED_STRATEGIES:
        from train.deepspeed_config import STRATEGY_STAGES, deepspeed_config

        stage, offload = STRATEGY_STAGES[name]
        config = deepspeed_config(
            stage,
            offload or strategy_cfg.offload,
            micro_batch_size=micro_batch_size,
            accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
            gradient_clip_val=trainer_cfg.gradient_clip_val,
            precision=precision,
            for_lightning=True,
        )
        if offload or strategy_cfg.offload:
            # our LightningModule builds torch.optim.AdamW; DeepSpeed refuses a client optimizer with offload
            # unless told (DeepSpeedCPUAdam would be faster, at the price of a C++ op build on first use)
            config["zero_force_ds_cpu_optimizer"] = False
        return zero_strategy_class()(config=config, process_group_backend=strategy_cfg.process_group_backend,
                                     timeout=timeout)  # fmt: skip
    raise ConfigError(f"strategy.name={name!r} is not available.")


def build_plugins() -> list:
    """The cluster environment: under SLURM, Lightning's SLURMEnvironment with its own requeue turned off.

    Lightning 2.6 installs SLURMEnvironment(auto_requeue=True) by default; its SIGUSR1 handler saves hpc_ckpt_N.ckpt
    inside the signal handler (a collective in a signal handler: it deadlocked once under DDP) and requeues.
    train/preemption.py does the same at a step boundary instead. Outside SLURM, Lightning picks torchrun's
    TorchElasticEnvironment (TORCHELASTIC_RUN_ID) or its own LightningEnvironment (MASTER_ADDR, MASTER_PORT,
    NODE_RANK, WORLD_SIZE; it spawns the other local ranks itself).
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


# ------------------------------------------------------------------------------------------------ FSDP2
def import_class(path: str) -> type:
    """"gpt2.modeling.GPT2Block" -> the class; a clear error naming the key otherwise."""
    mod, _, cls = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"strategy.wrap_class={path} cannot be imported ({e}); name a class, e.g. "
                          f"gpt2.modeling.GPT2Block.") from e  # fmt: skip
    if not isinstance(obj, type):
        raise ConfigError(f"strategy.wrap_class={path} is not a class.")
    return obj


def mixed_precision_policy(precision: str):
    """trainer.precision -> FSDP2 MixedPrecisionPolicy: compute in 16 bit, reduce gradients in fp32 (torchtitan)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision.startswith("16"):
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # full precision


def apply_fsdp(model: nn.Module, mesh, wrap_class: Optional[str], reshard_after_forward: bool = True,
               offload: bool = False, precision: str = "32-true") -> int:
    """fully_shard every `wrap_class` instance, then the root (torchtitan parallelize_llama). Returns the unit count.

    Idempotent: a model already sharded (a second Trainer stage such as validate after fit) is left as it is.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return 0
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mixed_precision_policy(precision)}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    units = 0
    if wrap_class:
        cls = import_class(wrap_class)
        blocks = [m for m in model.modules() if isinstance(m, cls)]
        if not blocks:
            raise ConfigError(f"strategy.wrap_class={wrap_class} matches no module of {type(model).__name__}; "
                              f"name its transformer block class.")  # fmt: skip
        for i, block in enumerate(blocks):
            # the last block's params are needed again at once by backward: keeping them saves one all-gather
            fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs)
            units += 1
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return units + 1


def _model_parallel_base():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDP2Strategy(_model_parallel_base()):
    """ModelParallelStrategy as pure FSDP2: a 1-D data-parallel mesh over every rank, `fully_shard` applied to the
    LightningModule's `.model` in `setup` (after its configure_model: activation checkpointing / compile), and
    checkpoints in our step-dir layout (DCP shards under `sharded/`, a consolidated model.safetensors, atomic)."""

    def __init__(self, wrap_class: Optional[str] = None, reshard_after_forward: bool = True, offload: bool = False,
                 param_precision: str = "32-true", **kwargs: Any):
        super().__init__(save_distributed_checkpoint=True, **kwargs)
        self.wrap_class = wrap_class
        self.reshard_after_forward = reshard_after_forward
        self.offload = offload
        self.param_precision = param_precision

    def setup_environment(self) -> None:
        # FSDP only: every rank is a data-parallel rank (Lightning's "auto" would make the node's ranks a TP group)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer) -> None:
        net = self.lightning_module.model
        apply_fsdp(net, self.device_mesh["data_parallel"], self.wrap_class, self.reshard_after_forward,
                   self.offload, self.param_precision)  # fmt: skip
        super().setup(trainer)

    # -- checkpoints: checkpoints/step-N/{sharded/ (DCP), model.safetensors, config.json, training_state.pt, meta.json}
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(path.parent / f"{path.name}.tmp-{os.getpid()}")))  # rank 0's pid names it
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier("fsdp-save-mkdir")
        sharded = {"state_dict": checkpoint.pop("state_dict")}
        sharded.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        try:
            dcp.save(sharded, checkpoint_id=str(tmp / SHARDED_DIR))  # every rank writes its shard
            # the full weights, gathered to rank 0's CPU (a collective: every rank takes part)
            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            full = retie(full, self.model)
            if self.is_global_zero:
                checkpoint["state_dict"] = full
                meta = checkpoint[ck.META_KEY] = dict(checkpoint.get(ck.META_KEY) or {}, strategy="fsdp")
                net = self.lightning_module.model
                if meta.get("task") == type(net).__name__:  # the model's class, not fully_shard's FSDP<class>
                    meta["task"] = plain_class(net).__name__
                # DirCheckpointIO writes the rest into the same tmp dir and publishes it with one rename
                ck.DirCheckpointIO().save_checkpoint(checkpoint, path, storage_options={"tmp_dir": tmp})
        except BaseException:
            if self.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier("fsdp-save-done")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        shards = path / SHARDED_DIR
        if not (shards / ".metadata").is_file():
            raise ck.CheckpointError(
                f"{path} has no sharded FSDP state ({SHARDED_DIR}/); it was written by another strategy: resume it "
                f"with that strategy, or start a new run from its weights with model.init_from={path}."
            )
        meta = ck.read_meta(path)
        state = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(state, checkpoint_id=str(shards))
        self.model.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, opt in enumerate(self.optimizers):
            ostate = {f"optimizer_{i}": get_optimizer_state_dict(self.model, opt)}
            dcp.load(ostate, checkpoint_id=str(shards))
            set_optimizer_state_dict(self.model, opt, optim_state_dict=ostate[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))  # fmt: skip
        ckpt = torch.load(path / ck.STATE_NAME, map_location="cpu", weights_only=True)
        ckpt[ck.META_KEY] = meta
        return ckpt


def retie(full: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered full state dict holds one copy per name; names of one shared parameter (tied embeddings:
    lm_head.weight is transformer.wte.weight) point at one tensor again, so the safetensors file stores it once."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in full and first[id(p)] in full:
            full[name] = full[first[id(p)]]
        first.setdefault(id(p), name)
    return full


# ------------------------------------------------------------------------------------------------ DeepSpeed
def finalize_zero_checkpoint(tmp: Path, path: Path, model_config: Optional[dict], meta: dict[str, Any],
                             global_step: int, convert=None) -> Path:
    """Rank 0, after DeepSpeed wrote its shards into `tmp`: add model.safetensors (fp32, consolidated), config.json
    and meta.json, then publish `tmp` as `path` with one rename (the same atomic step-dir contract as DirCheckpointIO).

    convert(checkpoint_dir, out_file): the consolidation; default train.deepspeed_config.zero_checkpoint_to_safetensors.
    """
    import json

    if convert is None:
        from train.deepspeed_config import zero_checkpoint_to_safetensors as convert
    tmp, path = Path(tmp), Path(path)
    if not (tmp / "latest").is_file():
        raise ck.CheckpointError(f"{tmp} holds no DeepSpeed checkpoint ('latest' missing); the save did not finish.")
    convert(tmp, tmp / ck.WEIGHTS_NAME)
    if model_config is not None:
        (tmp / ck.CONFIG_NAME).write_text(json.dumps(ck.to_plain(model_config), indent=2, sort_keys=True) + "\n")
    meta = dict(meta or {})
    meta.update(format=ck.FORMAT, format_version=ck.FORMAT_VERSION, global_step=int(global_step),
                module_prefix=ck.MODULE_PREFIX, strategy="deepspeed")  # fmt: skip
    (tmp / ck.META_NAME).write_text(json.dumps(ck.to_plain(meta), indent=2, sort_keys=True) + "\n")
    return ck.publish_dir(tmp, path)


_ZERO_CLASS: Optional[type] = None


def zero_strategy_class() -> type:
    """Lightning's DeepSpeedStrategy writing our step-dir layout (built on first use: importing it loads DeepSpeed)."""
    global _ZERO_CLASS
    if _ZERO_CLASS is not None:
        return _ZERO_CLASS
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class ZeroStrategy(DeepSpeedStrategy):
        """DeepSpeed saves its shards into step-N.tmp-*, rank 0 consolidates them into model.safetensors, renames."""

        def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Optional[Any] = None) -> None:
            path = Path(self.broadcast(str(filepath)))
            tmp = Path(self.broadcast(str(path.parent / f"{path.name}.tmp-{os.getpid()}")))
            model_config = checkpoint.pop(ck.MODEL_CONFIG_KEY, None)
            meta = checkpoint.pop(ck.META_KEY, None) or {}
            step = int(checkpoint.get("global_step", 0))
            super().save_checkpoint(checkpoint, tmp)  # every rank writes its ZeRO partition (a collective)
            self.barrier("zero-save")
            if self.is_global_zero:
                finalize_zero_checkpoint(tmp, path, model_config, meta, step)
            self.barrier("zero-finalize")

    _ZERO_CLASS = ZeroStrategy
    return ZeroStrategy


# ------------------------------------------------------------------------------------------------ after fit
def full_state_dict(trainer, module) -> Optional[dict[str, torch.Tensor]]:
    """The full (unsharded) weights of `module.model` as of now, on rank 0; None on the other ranks.

    Call on EVERY rank: FSDP2 gathers its DTensor shards (to CPU) and ZeRO-3 its partitioned parameters with a
    collective. Other strategies hold a full replica: rank 0's own state dict (no copy).
    """
    if isinstance(trainer.strategy, FSDP2Strategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if trainer.is_global_zero else None
    if _is_zero3(trainer.strategy):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.model.parameters()), modifier_rank=None):
            if not trainer.is_global_zero:
                return None
            return {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
    return module.model.state_dict() if trainer.is_global_zero else None


def _is_zero3(strategy) -> bool:
    return type(strategy).__name__ == "ZeroStrategy" and strategy.zero_stage_3


def model_for_export(trainer, module) -> Optional[nn.Module]:
    """A plain (unsharded) copy of the trained network on rank 0 for the HF export and samples; None elsewhere.

    Call on EVERY rank: under FSDP the full weights are gathered with a collective. Other strategies keep a full
    replica on every rank (DeepSpeed ZeRO-3 exports from the consolidated checkpoint instead).
    """
    if isinstance(trainer.strategy, FSDP2Strategy):
        full = full_state_dict(trainer, module)
        if full is None:
            return None
        net = plain_class(module.model)(module.model.config)
        net.load_state_dict(full, strict=False)
        if getattr(net.config, "tie_word_embeddings", False) and hasattr(net, "tie_weights"):
            net.tie_weights()
        return net
    if _is_zero3(trainer.strategy):
        saved = ck.latest_checkpoint(trainer.default_root_dir)
        if not trainer.is_global_zero or saved is None:
            return None
        from train.module import load_checkpoint_model

        return load_checkpoint_model(saved, plain_class(module.model))
    return module.model if trainer.is_global_zero else None


def plain_class(net: nn.Module) -> type:
    """fully_shard swaps a module's class for a dynamic `FSDP<cls>` subclass; the model's own class is its base."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(net)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls


__all__ = [
    "DEEPSPEED_STRATEGIES",
    "FSDP2Strategy",
    "apply_fsdp",
    "build_plugins",
    "build_strategy",
    "check_hardware",
    "check_resume",
    "checkpoint_family",
    "finalize_zero_checkpoint",
    "full_state_dict",
    "mixed_precision_policy",
    "model_for_export",
    "plain_class",
    "zero_strategy_class",
]
