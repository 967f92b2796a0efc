"""Universal training state: a checkpoint of any strategy family, at any world size, in one canonical form that any
other strategy loads (`UniversalState`).

    weights    the full fp32 weights under our key names: the checkpoint's model.safetensors, which every family
               writes (DDP: rank 0's replica; FSDP2: gathered from the DTensor shards; ZeRO: DeepSpeed's
               `get_fp32_state_dict_from_zero_checkpoint` over the fp32 master partitions)
    optimizer  AdamW's state keyed by parameter name, in the optimizer's group order (the layout of
               torch.distributed.checkpoint.state_dict's full optimizer state dict):
               {"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{lr, ..., "params": [names]}]}
    training   everything else Lightning restores: loops and global step, LR schedule, callbacks (RNG states, guard,
               best metric) and the datamodule's position in global samples (`consumed_samples`)

Each family's optimizer state is read with its engine's own tool, not by cutting shards by hand:

    full       training_state.pt's `optimizer_states` (torch's Optimizer.state_dict(): integer ids in group order)
    fsdp       the DCP shards under sharded/, consolidated by torch.distributed.checkpoint's dcp_to_torch_save
    deepspeed  the ZeRO partitions, merged per parameter by DeepSpeed's universal-checkpoint converter
               (deepspeed.checkpoint.ds_to_universal); the parameter names per optimizer group come from the
               checkpoint's `param_shapes`, the table zero_to_fp32 reads too

The conversion runs when a run resumes under another family, or a ZeRO checkpoint under another stage or world size
(train.strategies.native_resume decides); every rank reads the whole state into host memory (parameters + two
moments: 12 bytes per parameter), then keeps its own part. The strategies load it with their own APIs
(train/strategies/engines/fsdp2.py: set_model_state_dict / set_optimizer_state_dict; engines/zero.py: DeepSpeed's
safe_set_full_fp32_param / safe_set_full_optimizer_state; DDP and one device: the integer-keyed dict Lightning loads,
`lightning_checkpoint`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from train.checkpoint.layout import (
    DCP_FAMILY,
    META_KEY,
    MODEL_CONFIG_KEY,
    MODULE_PREFIX,
    SHARDED_DIR,
    STATE_NAME,
    WEIGHTS_NAME,
    ZERO_DIR,
    ZERO_FAMILY,
    CheckpointError,
    family_of,
)
from train.checkpoint.weights import load_weights

_ANCHOR_KEY = "transformer.wte.weight"  # the first key of every one of our models, whatever wraps it


@dataclass
class UniversalState:
    """A checkpoint's training state in the canonical form of the module docstring (weights, optimizer, training)."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    training: dict[str, Any]

    @property
    def step(self) -> int:
        """The optimizer step the state was saved at."""
        return int(self.training.get("global_step", 0))


def read_universal(step_path: Path, meta: dict[str, Any], group_names: Optional[Sequence[Sequence[str]]] = None
                   ) -> UniversalState:
    """The training state of checkpoint `step_path` (any family) as a `UniversalState`.

    meta: its meta.json (layout.read_meta). group_names: the parameter names of each optimizer group, in order, of
    the model being resumed (train.module.optimizer_param_names); needed for a full-family checkpoint, whose optimizer
    state names parameters by position only (the same build_optimizer over the same model gives the same order).
    Raises CheckpointError naming what is missing.
    """
    step_path = Path(step_path)
    family = family_of(meta)
    weights = load_weights(step_path / WEIGHTS_NAME)
    training = _training_state(step_path)
    if family == DCP_FAMILY:
        optimizer = _fsdp_optimizer(step_path)
    elif family == ZERO_FAMILY:
        optimizer = _zero_optimizer(step_path, {k: v.shape for k, v in weights.items()})
    else:
        states = training.get("optimizer_states") or []
        if not states:
            raise CheckpointError(f"{step_path / STATE_NAME} holds no optimizer state; it cannot resume training.")
        if group_names is None:
            raise ValueError("read_universal needs group_names for a checkpoint of the full family")
        optimizer = named_optimizer_state(states[0], group_names)
    training.pop("optimizer_states", None)
    training.pop("state_dict", None)
    return UniversalState(weights, optimizer, training)


def _training_state(step_path: Path) -> dict[str, Any]:
    f = step_path / STATE_NAME
    if not f.is_file():
        raise CheckpointError(f"{f} is missing; {step_path} cannot resume training under another strategy (it was "
                              f"written before checkpoints kept their training state apart from the engine's).")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{f} cannot be read safely ({e}); the checkpoint is corrupt.") from e


# ------------------------------------------------------------------------------------------------ per family
def named_optimizer_state(state: dict[str, Any], group_names: Sequence[Sequence[str]]) -> dict[str, Any]:
    """torch's Optimizer.state_dict() (integer ids, numbered across the groups in order) -> keyed by name."""
    groups = state["param_groups"]
    if [len(g["params"]) for g in groups] != [len(n) for n in group_names]:
        raise CheckpointError(f"the checkpoint's optimizer has groups of {[len(g['params']) for g in groups]} "
                              f"parameters, this model's {[len(n) for n in group_names]}; resume the same model.")
    name_of = {i: n for g, names in zip(groups, group_names) for i, n in zip(g["params"], names)}
    return {"state": {name_of[i]: s for i, s in state["state"].items()},
            "param_groups": [dict(g, params=list(names)) for g, names in zip(groups, group_names)]}


def indexed_optimizer_state(optimizer: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `named_optimizer_state`: what torch's Optimizer.load_state_dict takes (ids in group order)."""
    ids: dict[str, int] = {}
    groups = []
    for g in optimizer["param_groups"]:
        groups.append(dict(g, params=[ids.setdefault(n, len(ids)) for n in g["params"]]))
    return {"state": {ids[n]: s for n, s in optimizer["state"].items() if n in ids}, "param_groups": groups}


def _strip(names: Sequence[str]) -> str:
    """The prefix an engine put in front of our keys (Lightning's `_forward_module.`, our module's `model.`)."""
    anchors = [n for n in names if n.endswith(_ANCHOR_KEY)]
    if not anchors:
        raise CheckpointError(f"the optimizer state names no '{_ANCHOR_KEY}' (names start with {sorted(names)[:3]}); "
                              f"it is not a gpt2-forge GPT-2 checkpoint.")
    return min(anchors, key=len)[: -len(_ANCHOR_KEY)]


def _fsdp_optimizer(step_path: Path) -> dict[str, Any]:
    """FSDP2's sharded optimizer state -> by name, full tensors: DCP's own consolidation (dcp_to_torch_save reads
    every shard without a process group) into a temporary file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    shards = step_path / SHARDED_DIR
    if not (shards / ".metadata").is_file():
        raise CheckpointError(f"{step_path} has no sharded FSDP state ({SHARDED_DIR}/.metadata); it is incomplete.")
    with tempfile.TemporaryDirectory(prefix="gpt2-forge-dcp-") as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(shards, out)
        full = torch.load(out, map_location="cpu", weights_only=True)
    opt = full.get("optimizer_0")
    if opt is None:
        raise CheckpointError(f"{shards} holds no optimizer state (optimizer_0); it cannot resume training.")
    prefix = _strip(list(opt["state"]))
    cut = len(prefix)
    return {"state": {k[cut:]: v for k, v in opt["state"].items()},
            "param_groups": [dict(g, params=[p[cut:] for p in g["params"]]) for g in opt["param_groups"]]}


def _zero_optimizer(step_path: Path, shapes: dict[str, torch.Size]) -> dict[str, Any]:
    """ZeRO's partitioned optimizer state -> by name, full tensors, through DeepSpeed's universal checkpoint
    (ds_to_universal: every parameter's fp32 value and Adam moments merged from all ranks' partitions, any stage;
    stage 3's come out flat and take the parameter's shape, `shapes`, by our names)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tag = step_path / ZERO_DIR
    if not tag.is_dir():
        raise CheckpointError(f"{step_path} has no DeepSpeed partitions ({ZERO_DIR}/); it is incomplete.")
    with tempfile.TemporaryDirectory(prefix="gpt2-forge-universal-") as out:
        args = argparse.Namespace(input_folder=str(tag), output_folder=out, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # Lightning's engine does not record the version tag
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal(args)  # prints its progress
        zero = Path(out) / "zero"
        # DeepSpeed's own files (pickled configs and enums): read as DeepSpeed reads them
        common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
        model_states = torch.load(sorted(tag.glob("*model_states.pt"))[0], map_location="cpu", weights_only=False)
        groups = [list(names) for names in model_states["param_shapes"]]  # names per optimizer group, in order
        cut = len(_strip([n for g in groups for n in g]))
        step = _zero_step(zero, common)
        state = {}
        for name in (n for g in groups for n in g):
            entry = {"step": step.clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                t = torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=False)
                entry[key] = (t["param"] if isinstance(t, dict) else t).float().reshape(shapes[name[cut:]])
            state[name[cut:]] = entry
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in common["param_groups"]]
    return {"state": state, "param_groups": [dict(h, params=[n[cut:] for n in g]) for h, g in zip(hyper, groups)]}


def _zero_step(zero: Path, common: dict[str, Any]) -> torch.Tensor:
    """AdamW's step count: ds_to_universal writes it per parameter for stages 1-2 (step.pt) and keeps stage 3's in
    the common optimizer state."""
    for d in sorted(zero.iterdir()):
        if (d / "step.pt").is_file():
            return torch.as_tensor(torch.load(d / "step.pt", map_location="cpu", weights_only=False)).float()
    opt = common.get("optimizer_state_dict") or common.get("base_optimizer_state") or {}
    states = list((opt.get("state") or {}).values())
    if not states or "step" not in states[0]:
        raise CheckpointError(f"DeepSpeed's universal checkpoint of {zero.parent} holds no optimizer step count.")
    return torch.as_tensor(states[0]["step"]).float()


# ------------------------------------------------------------------------------------------------ into Lightning
def lightning_checkpoint(state: UniversalState, meta: dict[str, Any], model_config: Optional[dict] = None
                         ) -> dict[str, Any]:
    """The dict Lightning restores on a strategy that keeps a full replica (DDP, one device): weights under the
    LightningModule's keys, the optimizer state with integer ids, and the training state as it was saved."""
    ckpt = dict(state.training)
    prefix = meta.get("module_prefix", MODULE_PREFIX)
    ckpt["state_dict"] = {prefix + k: v for k, v in state.weights.items()}
    ckpt["optimizer_states"] = [indexed_optimizer_state(state.optimizer)]
    if model_config is not None:
        ckpt[MODEL_CONFIG_KEY] = model_config
    ckpt[META_KEY] = meta
    return ckpt


__all__ = ["UniversalState", "indexed_optimizer_state", "lightning_checkpoint", "named_optimizer_state",
           "read_universal"]
