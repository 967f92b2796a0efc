"""FSDP2 (`strategy=fsdp`): `fully_shard` per block then the root, applied to the built model from outside
(torchtitan's recipe), through Lightning's ModelParallelStrategy; also runs on CPU with gloo.

Checkpoints keep our step-dir layout: the DCP shards of model + optimizer under `sharded/`, plus the gathered
`model.safetensors`, config.json, training_state.pt and meta.json (train/checkpoint/io.py), published with one rename.
DCP reshards them to any world size; another family's checkpoint is loaded through the universal training state
(`load_universal_fsdp`).
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from train.checkpoint import io as ck_io
from train.strategies.engines.elastic import AttemptProcessGroup

from train.checkpoint import layout as ck
from train.config import ConfigError
from train.adapters.lora import trainable_only

SHARDED_DIR = ck.SHARDED_DIR  # inside checkpoints/step-N: the FSDP2 DCP shards of model + optimizer


def import_class(path: str) -> type:
    """"gpt2.modeling.GPT2Block" -> the class; a clear error naming the key otherwise."""
    mod, _, cls = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"strategy.wrap_class={path} cannot be imported ({e}); name a class, e.g. "
                          f"gpt2.modeling.GPT2Block.") from e
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
                              f"name its transformer block class.")
        for i, block in enumerate(blocks):
            # the last block's params are needed again at once by backward: keeping them saves one all-gather
            fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs)
            units += 1
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return units + 1


def _model_parallel_base():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDP2Strategy(AttemptProcessGroup, _model_parallel_base()):
    """ModelParallelStrategy as pure FSDP2: a 1-D data-parallel mesh over every rank, `fully_shard` applied to the
    LightningModule's `.model` in `setup` (after its configure_model: activation checkpointing / compile), and
    checkpoints in our step-dir layout (DCP shards under `sharded/`, a consolidated model.safetensors, atomic). Its
    process group is formed per torchrun restart attempt (engines/elastic.py)."""

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
                   self.offload, self.param_precision)
        super().setup(trainer)

    # -- checkpoints: checkpoints/step-N/{sharded/ (DCP), model.safetensors, config.json, training_state.pt, meta.json}
    checkpoint_writer = None  # a BackgroundWriter once use_async_save() is called (checkpoint.async_save)
    _checkpoint_group = None

    def use_async_save(self) -> None:
        """Save through torch.distributed.checkpoint.async_save from now on (train/checkpoint/async_io.py)."""
        from train.checkpoint.async_io import BackgroundWriter

        self.checkpoint_writer = BackgroundWriter()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Every rank writes its DCP shard into `step-N.tmp-<pid>/sharded/`; rank 0 adds the gathered weights and the
        rest (DirCheckpointIO), then one rename publishes the folder. With `use_async_save()` the shards are staged
        (copied to host memory) and written by DCP's async_save in a thread, and rank 0's BackgroundWriter, once
        that save's future is done (its coordinator wrote `.metadata` after every rank's shard), reads the full
        weights back from the shards (no gather in the loop) and publishes; the next save waits for the previous
        one on every rank."""
        import torch.distributed.checkpoint as dcp

        writer = self.checkpoint_writer
        if writer is not None:
            writer.wait()  # the previous checkpoint is published (or its error raised) on every rank first
        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(path.parent / f"{path.name}.tmp-{os.getpid()}")))  # rank 0's pid names it
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier("fsdp-save-mkdir")
        sharded = {"state_dict": checkpoint.pop("state_dict")}
        sharded.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        try:
            if self.is_global_zero:
                meta = checkpoint[ck.META_KEY] = dict(checkpoint.get(ck.META_KEY) or {}, strategy=ck.DCP_FAMILY)
                net = self.lightning_module.model
                if meta.get("task") == type(net).__name__:  # the model's class, not fully_shard's FSDP<class>
                    meta["task"] = plain_class(net).__name__
            if writer is None:
                dcp.save(sharded, checkpoint_id=str(tmp / SHARDED_DIR))  # every rank writes its shard
                self._save_full_state(checkpoint, path, tmp)
            else:
                self._async_save(sharded, checkpoint, path, tmp)
        except BaseException:
            if self.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier("fsdp-save-done")

    def _save_full_state(self, checkpoint: dict[str, Any], path: Path, tmp: Path) -> None:
        """The full weights gathered to rank 0's CPU (a collective: every rank takes part); rank 0's DirCheckpointIO
        writes them and the rest into `tmp` and publishes it with one rename."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_global_zero:
            # LoRA: the adapters + head only (train/adapters/lora.py)
            checkpoint["state_dict"] = trainable_only(retie(full, self.model), self.lightning_module.model,
                                                      ck.MODULE_PREFIX)
            ck_io.DirCheckpointIO().save_checkpoint(checkpoint, path, storage_options={"tmp_dir": tmp})

    def _async_save(self, sharded: dict[str, Any], checkpoint: dict[str, Any], path: Path, tmp: Path) -> None:
        """dcp.async_save of the shards (staged in host memory now, written in DCP's thread, whose collectives use a
        process group of their own so they never interleave with training's); rank 0's writer publishes after."""
        import torch.distributed.checkpoint as dcp

        from train.checkpoint.async_io import snapshot

        done = dcp.async_save(sharded, checkpoint_id=str(tmp / SHARDED_DIR), process_group=self.checkpoint_group())
        if self.is_global_zero:
            names = list(trainable_only(sharded["state_dict"], self.lightning_module.model, ck.MODULE_PREFIX))
            self.checkpoint_writer.submit(_publish_when_written, done, snapshot(checkpoint), path, tmp, names,
                                          tied_aliases(self.model))
        else:
            self.checkpoint_writer.submit(done.result)

    def checkpoint_group(self):
        """The gloo process group async_save's thread runs its collectives on (made on first use, on every rank)."""
        if self._checkpoint_group is None:
            self._checkpoint_group = torch.distributed.new_group(backend="gloo")
        return self._checkpoint_group

    def teardown(self) -> None:
        try:
            if self.checkpoint_writer is not None:
                self.checkpoint_writer.close()  # the last checkpoint is published (or its error raised) first
        finally:
            self._checkpoint_group = None
            super().teardown()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        meta = ck.read_meta(path)
        if ck.family_of(meta) != ck.DCP_FAMILY:
            return load_universal_fsdp(self, path, meta)  # another family's checkpoint
        shards = path / SHARDED_DIR
        if not (shards / ".metadata").is_file():
            raise ck.CheckpointError(f"{path} has no sharded FSDP state ({SHARDED_DIR}/.metadata); it is incomplete.")
        # what the module saved (LoRA: the adapters and the head; the frozen base comes from model.init_from)
        state = {"state_dict": trainable_only(get_model_state_dict(self.model), self.lightning_module.model,
                                              ck.MODULE_PREFIX)}
        dcp.load(state, checkpoint_id=str(shards))
        self.model.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, opt in enumerate(self.optimizers):
            ostate = {f"optimizer_{i}": get_optimizer_state_dict(self.model, opt)}
            dcp.load(ostate, checkpoint_id=str(shards))
            set_optimizer_state_dict(self.model, opt, optim_state_dict=ostate[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        ckpt = torch.load(path / ck.STATE_NAME, map_location="cpu", weights_only=True)
        ckpt[ck.META_KEY] = meta
        return ckpt


def _publish_when_written(done, checkpoint: dict[str, Any], path: Path, tmp: Path, names: list[str],
                          aliases: dict[str, str]) -> None:
    """Rank 0's BackgroundWriter job: wait for DCP's async_save future (every rank's shard and `.metadata` are
    written); read the full weights back from those shards (`dcp.load` into full-size plain tensors, no_dist: DCP
    reshards on load, and no collective runs beside training's); then DirCheckpointIO adds model.safetensors,
    config.json, training_state.pt, meta.json last, and publishes `tmp` as `path` with one rename. A failure removes
    `tmp` (nothing half-written is ever published).

    names: the model's state-dict keys in order; aliases: its `tied_aliases` (DCP stores a shared tensor under one
    of its names only): the weights come back under every name, in that order, a shared one as one tensor.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        done.result()
        shards = tmp / SHARDED_DIR
        stored = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata
        prefix = "state_dict."  # DCP's flattened key of {"state_dict": {...}}
        got = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in stored.items()
               if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
        dcp.load({"state_dict": got}, checkpoint_id=str(shards), no_dist=True)
        shared = {**{n: a for a, n in aliases.items()}, **aliases}  # either name of a tied pair -> the other
        full: dict[str, torch.Tensor] = {}
        for name in names:
            first = aliases.get(name)
            full[name] = full[first] if first in full else got[name] if name in got else got[shared[name]]
        ck_io.DirCheckpointIO().save_checkpoint(dict(checkpoint, state_dict=full), path,
                                                storage_options={"tmp_dir": tmp})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_universal_fsdp(strategy, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Another family's checkpoint (train/checkpoint/universal.py) into the FSDP2 model and optimizer: every rank
    holds the full state, torch.distributed.checkpoint.state_dict keeps each rank's shard of it (full_state_dict).
    Returns the training state Lightning restores (loops, LR schedule, callbacks, data position)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from train.checkpoint.universal import read_universal
    from train.module import optimizer_param_names

    module = strategy.lightning_module
    state = read_universal(path, meta, optimizer_param_names(module.model))
    prefix = ck.MODULE_PREFIX  # the LightningModule holds the network as `model`: its state-dict keys and FQNs
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(strategy.model, {prefix + k: v for k, v in state.weights.items()},
                         options=StateDictOptions(full_state_dict=True, strict=module.strict_loading))
    optim = state.optimizer
    for opt in strategy.optimizers:
        set_optimizer_state_dict(strategy.model, opt, optim_state_dict={
            "state": {prefix + n: s for n, s in optim["state"].items()},
            "param_groups": [dict(g, params=[prefix + n for n in g["params"]]) for g in optim["param_groups"]],
        }, options=options)
    return dict(state.training, **{ck.META_KEY: meta})


def retie(full: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered full state dict holds one copy per name; names of one shared parameter (tied embeddings:
    lm_head.weight is transformer.wte.weight) point at one tensor again, so the safetensors file stores it once."""
    for alias, name in tied_aliases(model).items():
        if alias in full and name in full:
            full[alias] = full[name]
    return full


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{a later name of a shared parameter: its first name} in named_parameters order, e.g. {"lm_head.weight":
    "transformer.wte.weight"} for tied embeddings (names as `model.state_dict()` spells them)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        first.setdefault(id(p), name)
    return aliases


def plain_class(net: nn.Module) -> type:
    """fully_shard swaps a module's class for a dynamic `FSDP<cls>` subclass; the model's own class is its base."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(net)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls


__all__ = [
    "FSDP2Strategy",
    "load_universal_fsdp",
    "SHARDED_DIR",
    "apply_fsdp",
    "import_class",
    "mixed_precision_policy",
    "plain_class",
    "retie",
    "tied_aliases",
]
