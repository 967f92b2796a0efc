"""The model's weights on disk, with torch and safetensors only (no Lightning): `model.safetensors` (a tied weight
stored once, its aliases in the file's metadata), the weights-only model folder (`save_model_dir`: weights +
config.json + meta.json, what `checkpoints/best/` holds) and `to_plain`, the weights_only-loadable form of a state.

It lives apart from train/checkpoint/io.py (Lightning's CheckpointIO plugin) so that export, generate and evaluation
load a checkpoint's weights without importing Lightning (seconds of every such command).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gpt2.hf_io import save_safetensors
from train.checkpoint.layout import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    META_NAME,
    WEIGHTS_NAME,
    best_dir,
    check_weights_file,
    corrupt_weights_error,
    publish_dir,
    read_meta,
)


# ------------------------------------------------------------------------------------------------ weights
def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file of `state_dict`; tensors sharing storage (tied embeddings) are stored once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.contiguous().cpu()
    save_safetensors(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict `save_weights` wrote, aliases restored (they share the stored tensor)."""
    check_weights_file(path)  # missing, or a header safetensors cannot parse
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise corrupt_weights_error(path, e) from e
    for alias, target in json.loads(meta.get("aliases", "{}")).items():
        sd[alias] = sd[target]
    return sd


# ------------------------------------------------------------------------------------------------ plain state
def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """Tensors, numbers, strings, None, lists/tuples/dicts of those: what `torch.load(weights_only=True)` reads."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    try:  # numpy arrays / scalars (e.g. in RNG states)
        import numpy as np

        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.copy())
        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(
        f"{where} holds a {type(obj).__name__}, which a safe (weights_only) checkpoint cannot store; "
        f"return tensors and primitives from state_dict()."
    )


def save_model_dir(state_dict: dict[str, torch.Tensor], config, out: Path, meta: dict[str, Any]) -> Path:
    """Weights + config.json + meta.json in our checkpoint layout (no training state), atomically (tmp + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(state_dict, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, module_prefix="")
        (tmp / META_NAME).write_text(json.dumps(to_plain(meta), indent=2, sort_keys=True) + "\n")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_best_into(model: torch.nn.Module, run_dir: Path) -> Optional[dict[str, Any]]:
    """Copy checkpoints/best's weights into `model` (in place); returns its meta, or None when there is none."""
    d = best_dir(run_dir)
    if not (d / META_NAME).is_file():
        return None
    model.load_state_dict(load_weights(d / WEIGHTS_NAME), strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return read_meta(d)


__all__ = ["load_best_into", "load_weights", "save_model_dir", "save_weights", "to_plain"]
