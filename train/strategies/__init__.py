"""The `strategy` config group: one `StrategySpec` per option, in a registry every other part reads.

Each module of this package (not its `engines/` subpackage, which holds the implementations against Lightning, FSDP2
and DeepSpeed and is imported only when a strategy is built) may define `SPECS`, a tuple of specs; the registry
collects them on first use:

    ddp.py         auto (Lightning picks), ddp (DistributedDataParallel)
    fsdp.py        fsdp (FSDP2: `fully_shard` per block then the root, from outside the model: torchtitan's recipe)
    deepspeed.py   deepspeed_zero1, deepspeed_zero2, deepspeed_zero3, deepspeed_zero3_offload (DeepSpeed ZeRO)

A new strategy is a module here defining its spec, plus conf/strategy/<name>.yaml selecting it. The registry is read
before Lightning is imported (the up-front checks), so spec modules import torch at most, and Lightning only inside
`build`. Every strategy's checkpoints/step-N holds the same `model.safetensors` + config.json + meta.json, so export
and `model.init_from` read any of them; training state resumes under any strategy at any world size: natively within a
family (`native_resume`), else through the universal training state (train/checkpoint/universal.py).

The cluster side lives here too: `build_plugins` picks the rendezvous (SLURM, torchrun or Lightning's own env
variables) and turns off Lightning's SLURM auto-requeue, which train/callbacks/preemption.py replaces; the process group of each
torchrun restart attempt forms on keys of its own (engines/rendezvous.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from gpt2.attention import ATTENTION_BACKENDS, DEFAULT_ATTENTION
from train.checkpoint.layout import FULL_FAMILY, ZERO_FAMILY, family_of  # torch-free
from train.config import ConfigError


# ------------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Hardware:
    """What `check_hardware` resolved for a run: whether it trains on CUDA GPUs (`on_gpu`; else the CPU) and the
    Lightning precision string `trainer.precision` resolves to there (`resolve_precision`)."""

    on_gpu: bool
    precision: str


@dataclass(frozen=True)
class StrategySpec:
    """One option of the `strategy` group.

    name: `strategy.name` (= conf/strategy/<name>.yaml). config: its config dataclass (train.config: StrategyConfig
        or a subclass), which its YAML's defaults list names.
    build: (strategy_cfg, trainer_cfg, micro_batch_size, hardware) -> the Lightning strategy object, or "auto".
    checkpoint_family: the training state its checkpoints hold (train.checkpoint.layout): FULL_FAMILY (one file),
        DCP_FAMILY (DCP shards) or ZERO_FAMILY (ZeRO partitions). A strategy of the same family loads them natively
        (`native_resume`); any other through the universal training state (train/checkpoint/universal.py).
    check_hardware: (strategy_cfg, trainer_cfg, hardware) -> None, raising ConfigError for what this machine cannot
        run with it (after the checks every strategy shares); None: nothing more to check.
    full_state_dict: (trainer, module) -> the full weights on rank 0 (None elsewhere) when the strategy shards
        parameters, called on every rank; None: every rank holds a replica.
    zero_stage: what it partitions over the ranks, in ZeRO's terms (Rajbhandari et al. 2020): 0 nothing,
        1 optimizer state, 2 + gradients, 3 + parameters. engine: "torch" or "deepspeed" (whose buffers and master
        weights differ). offload: states in host memory. plan_rank: launch/plan.py's order of preference (least
        communication first); None: not planned (auto).
    optimizer_params: what the optimizer is handed as its parameters: "whole" tensors, or (for a strategy that
        shards them) what it gets instead, named in the refusal of an optimizer that needs whole matrices
        (`check_optimizer`).
    """

    name: str
    config: type
    build: Callable[..., Any]
    checkpoint_family: str = FULL_FAMILY
    check_hardware: Optional[Callable[..., None]] = None
    full_state_dict: Optional[Callable[..., Optional[dict]]] = None
    zero_stage: int = 0
    engine: str = "torch"
    offload: bool = False
    plan_rank: Optional[int] = None
    optimizer_params: str = "whole"


@lru_cache(maxsize=1)
def strategy_specs() -> dict[str, StrategySpec]:
    """Every registered strategy, by name: the `SPECS` of each module of this package (engines/ excluded)."""
    specs: dict[str, StrategySpec] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            continue
        for spec in getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPECS", ()):
            if spec.name in specs:
                raise RuntimeError(f"strategy {spec.name!r} is registered twice (train/strategies/{info.name}.py)")
            specs[spec.name] = spec
    return specs


def get_spec(name: str) -> StrategySpec:
    """The spec of `strategy.name`; ConfigError naming the available strategies if there is none."""
    specs = strategy_specs()
    if name not in specs:
        raise ConfigError(f"strategy.name={name!r} is not available; use one of {', '.join(specs)}.")
    return specs[name]


# ------------------------------------------------------------------------------------------------ up-front checks
def check_hardware(strategy_cfg, trainer_cfg, attention: Optional[str] = None) -> Hardware:
    """Refuse, with one sentence, a strategy / device count / attention kernel this machine cannot run; returns the
    resolved `Hardware`. Raises ConfigError naming the setting and the fix."""
    spec = get_spec(strategy_cfg.name)
    check_launcher(trainer_cfg)
    cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if cuda else 0
    accel = trainer_cfg.accelerator
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and cuda)
    if accel in ("gpu", "cuda") and not cuda:
        raise ConfigError(f"trainer.accelerator={accel} but no CUDA GPU is visible; use trainer.accelerator=cpu.")
    if attention is not None and ATTENTION_BACKENDS[attention].needs_cuda and not (cuda and on_gpu):
        raise ConfigError(f"attention={attention} needs a CUDA GPU; use attention={DEFAULT_ATTENTION} on CPU.")
    # on a GPU the precision asks the device for bf16 support: after the device checks below
    hardware = Hardware(on_gpu, None if on_gpu else resolve_precision(trainer_cfg.precision, "cpu"))
    if spec.check_hardware is not None:
        spec.check_hardware(strategy_cfg, trainer_cfg, hardware)
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
    return hardware if hardware.precision else Hardware(on_gpu, resolve_precision(trainer_cfg.precision, accel))


def launched_world_size(env: Optional[dict] = None) -> Optional[tuple[str, int]]:
    """(launcher, number of processes) when a launcher started this process with a fixed world size, else None.

    Slurm first, as Lightning picks its cluster environment: SLURM_NTASKS unless the job is named bash / interactive
    (lightning.fabric SLURMEnvironment.detect); then torchrun (TORCHELASTIC_RUN_ID, torch.distributed's
    is_torchelastic_launched) with its WORLD_SIZE. Lightning's own launcher (neither) starts trainer.devices itself.
    """
    env = os.environ if env is None else env
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME", "") not in ("bash", "interactive"):
        return "Slurm started", int(env["SLURM_NTASKS"])
    if env.get("TORCHELASTIC_RUN_ID") is not None and env.get("WORLD_SIZE"):
        return "torchrun started", int(env["WORLD_SIZE"])
    return None


def check_launcher(trainer_cfg, env: Optional[dict] = None) -> None:
    """Refuse a launcher that started another number of processes than trainer.devices x trainer.num_nodes: Lightning
    takes the launcher's world size, so an `sbatch --ntasks=1` job with trainer.devices=2 would train on one process
    at half the global batch without a word (Lightning#20391). Raises ConfigError naming both numbers."""
    launched = launched_world_size(env)
    devices = trainer_cfg.devices
    n = len(devices) if isinstance(devices, (list, tuple)) else devices if isinstance(devices, int) else -1
    if launched is None or n < 1:  # devices=auto / -1: Lightning counts them from the launcher
        return
    who, world = launched
    want = n * trainer_cfg.num_nodes
    if world != want:
        raise ConfigError(
            f"{who} {world} process(es) but trainer.devices x trainer.num_nodes = {n} x {trainer_cfg.num_nodes} = "
            f"{want}; start {want} (one per device: srun --ntasks-per-node={n}, torchrun --nproc-per-node={n}) or "
            f"set trainer.devices / trainer.num_nodes to match."
        )


def check_optimizer(strategy_cfg, optim_cfg) -> None:
    """Refuse, in one sentence, an optimizer that updates each weight matrix as a whole (`optim_cfg.
    needs_whole_matrices`: torch.optim.Muon orthogonalizes it) under a strategy that hands the optimizer shards
    of the matrices instead (FSDP2's DTensor shards, ZeRO's flat partitions). Raises ConfigError naming the
    strategies that can run it."""
    spec = get_spec(strategy_cfg.name)
    if not optim_cfg.needs_whole_matrices or spec.optimizer_params == "whole":
        return
    able = "|".join(s.name for s in strategy_specs().values() if s.optimizer_params == "whole")
    raise ConfigError(
        f"optim={optim_cfg.name} cannot run under strategy={spec.name}: it orthogonalizes whole weight matrices but "
        f"this strategy hands the optimizer {spec.optimizer_params}; use strategy={able}, or optim=adamw."
    )


def checkpoint_family(strategy_name: str) -> str:
    """Which training state a strategy writes: one of train.checkpoint.layout's FULL_FAMILY (one file), DCP_FAMILY
    (DCP shards), ZERO_FAMILY (ZeRO partitions)."""
    return get_spec(strategy_name).checkpoint_family


def native_resume(meta: dict, strategy_name: str, world_size: int) -> bool:
    """Whether a checkpoint resumes under `strategy_name` on `world_size` ranks through its engine's own loader (the
    fast path), rather than through the universal training state (train/checkpoint/universal.py).

    meta: the checkpoint's meta.json. Native: the same checkpoint family, and for ZeRO also the same stage and world
    size (DeepSpeed's loader reads one partition file per rank of the writer's stage). FSDP2's DCP shards reshard to
    any world size by themselves; a full checkpoint loads anywhere. A ZeRO checkpoint whose meta.json does not name
    its stage and world size (written before they were recorded) keeps the native path within ZeRO.
    """
    saved = family_of(meta)
    spec = get_spec(strategy_name)
    if saved != spec.checkpoint_family:
        return False
    if saved != ZERO_FAMILY or "strategy_name" not in meta or "world_size" not in meta:
        return True
    writer = strategy_specs().get(meta["strategy_name"])
    return writer is not None and writer.zero_stage == spec.zero_stage and int(meta["world_size"]) == world_size


def requested_world_size(trainer_cfg) -> Optional[int]:
    """The number of ranks `trainer.devices` x `trainer.num_nodes` asks for; None when Lightning decides (auto, -1)."""
    devices = trainer_cfg.devices
    if isinstance(devices, int) and devices > 0:
        return devices * trainer_cfg.num_nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * trainer_cfg.num_nodes
    return None


def zero_partition_files(step_path: Path) -> list[Path]:
    """The optimizer partition files of a ZeRO checkpoint (in its train.checkpoint.layout.ZERO_DIR), one per rank that
    wrote it; empty for other families."""
    from train.checkpoint.layout import ZERO_DIR

    d = Path(step_path) / ZERO_DIR
    return sorted(d.glob("*optim_states.pt")) if d.is_dir() else []


def check_resume(step_path: Path, strategy_cfg, meta: dict, trainer_cfg=None) -> None:
    """Refuse, in one sentence and before anything is built, a resume whose training state cannot be mapped onto
    `strategy_cfg` at `trainer_cfg`'s world size. Any family resumes under any other through the universal training
    state (train/checkpoint/universal.py), except:

    - a ZeRO checkpoint without training_state.pt (written before checkpoints kept Lightning's state apart from
      DeepSpeed's files) under another family, stage or world size: only DeepSpeed's own loader reads it;
    - a ZeRO checkpoint under another family, stage or world size when DeepSpeed is not installed (its universal
      converter reads the partitions);
    - fp16 training state under another family: its dynamic loss scale lives in the engine's own state.

    meta: the checkpoint's meta.json (train.checkpoint.layout.read_meta), read once by the caller. Raises ConfigError.
    """
    from train.checkpoint import layout

    saved = family_of(meta)
    world = requested_world_size(trainer_cfg) if trainer_cfg is not None else None
    writer = meta.get("strategy_name") or "|".join(s.name for s in strategy_specs().values()
                                                    if s.checkpoint_family == saved)
    if saved == ZERO_FAMILY and "world_size" not in meta:  # written before meta.json recorded it: count partitions
        files = zero_partition_files(step_path)
        if files and world is not None and world != len(files) and checkpoint_family(strategy_cfg.name) == saved:
            raise ConfigError(
                f"checkpoint {step_path} holds ZeRO partitions of {len(files)} ranks and no universal training state; "
                f"resume it with trainer.devices x trainer.num_nodes = {len(files)}, or start a new run_dir with "
                f"model.init_from={step_path}."
            )
    if native_resume(meta, strategy_cfg.name, world if world is not None else int(meta.get("world_size", 0))):
        return
    how = f"resume it with strategy={writer}" + (f" on {meta['world_size']} ranks" if "world_size" in meta else "")
    if saved == ZERO_FAMILY and not (step_path / layout.STATE_NAME).is_file():
        raise ConfigError(f"checkpoint {step_path} keeps its training state inside DeepSpeed's files only (written "
                          f"before universal checkpoints), so strategy={strategy_cfg.name} cannot resume it; {how}, "
                          f"or start a new run_dir with model.init_from={step_path}.")
    if saved == ZERO_FAMILY and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"checkpoint {step_path} holds ZeRO partitions, which only DeepSpeed's universal "
                          f"converter can read; install deepspeed (pip install -e '.[dev]') or {how}.")
    if str(meta.get("precision", "")).startswith("16"):
        raise ConfigError(f"checkpoint {step_path} trained in fp16, whose dynamic loss scale lives in its engine's "
                          f"own state, so strategy={strategy_cfg.name} cannot take it over; {how}.")


# ------------------------------------------------------------------------------------------------ build
def build_strategy(strategy_cfg, trainer_cfg, micro_batch_size: int, hardware: Hardware):
    """`strategy` group -> a Lightning strategy object (or "auto"), by the spec's `build`.

    micro_batch_size: the loader's batch (DeepSpeed's train_micro_batch_size_per_gpu; the Task says which).
    hardware: what `check_hardware` resolved for these settings (the training job checks before Lightning is
    imported). Its precision sets FSDP's MixedPrecisionPolicy and DeepSpeed's fp16/bf16 section.
    """
    spec = get_spec(strategy_cfg.name)
    strategy = spec.build(strategy_cfg, trainer_cfg, micro_batch_size, hardware)
    if not isinstance(strategy, str):
        strategy.strategy_spec = spec  # what `full_state_dict` asks after fit
    return strategy


def timeout(strategy_cfg) -> timedelta:
    """strategy.timeout_minutes as the timeout of the process group's collectives."""
    return timedelta(minutes=strategy_cfg.timeout_minutes)


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

    Call on EVERY rank: a strategy that shards parameters (its spec's `full_state_dict`: FSDP2, ZeRO-3) gathers them
    with a collective. Other strategies hold a full replica: rank 0's own state dict (no copy).
    """
    spec = getattr(trainer.strategy, "strategy_spec", None)
    if spec is not None and spec.full_state_dict is not None:
        return spec.full_state_dict(trainer, module)
    return module.model.state_dict() if trainer.is_global_zero else None


def model_for_export(trainer, module) -> Optional[nn.Module]:
    """A plain (unsharded) copy of the trained network on rank 0 for the HF export and samples; None elsewhere.

    Call on EVERY rank: a strategy that shards parameters gathers the full weights with a collective; the others keep
    a full replica on every rank, which is returned as it is.
    """
    spec = getattr(trainer.strategy, "strategy_spec", None)
    if spec is None or spec.full_state_dict is None:
        return module.model if trainer.is_global_zero else None
    from train.strategies.engines.fsdp2 import plain_class

    full = full_state_dict(trainer, module)
    if full is None:
        return None
    from train.adapters.lora import inject_like

    net = inject_like(module.model, plain_class(module.model)(module.model.config))  # LoRA: the same adapters
    net.load_state_dict(full, strict=False)
    if getattr(net.config, "tie_word_embeddings", False) and hasattr(net, "tie_weights"):
        net.tie_weights()
    return net


__all__ = [
    "Hardware",
    "StrategySpec",
    "at_accumulation_boundary",
    "build_plugins",
    "build_strategy",
    "check_hardware",
    "check_launcher",
    "check_optimizer",
    "check_resume",
    "checkpoint_family",
    "full_state_dict",
    "get_spec",
    "launched_world_size",
    "requested_world_size",
    "model_for_export",
    "native_resume",
    "resolve_precision",
    "strategy_specs",
    "timeout",
    "zero_partition_files",
]
