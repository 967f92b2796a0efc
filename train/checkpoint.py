"""Checkpoints as directories: `run_dir/checkpoints/step-N/` holds

    model.safetensors   our model's weights under our key names; a tied weight is stored once (safetensors refuses
                        shared storage) and its aliases are listed in the file's metadata
    config.json         the GPT2Config (`GPT2Config.to_dict()`)
    training_state.pt   everything else Lightning knows (loops / global step, optimizer, LR schedule, datamodule
                        position, callback states such as the RNG states), plain tensors and primitives only, so it
                        is read with `torch.load(weights_only=True)`: loading a checkpoint executes no code
    meta.json           format version, step, where the tokenizer lives

`checkpoints/best/` (a fine-tuning task's model at its best validation metric) holds the first two and meta.json:
weights without training state, a valid `model.init_from` (`save_model_dir`, `load_best_into`).

`DirCheckpointIO` is a Lightning `CheckpointIO` plugin, so `trainer.save_checkpoint(dir)` and
`trainer.fit(..., ckpt_path=dir)` go through it and Lightning restores every state it saved. Writes are atomic:
everything goes into `step-N.tmp-<pid>/`, then one `os.rename` publishes it; `checkpoints/last` (a text file with
the newest complete step dir's name) is replaced with `os.replace`. A crash leaves at worst a `*.tmp-*` folder,
which is never loaded and is removed by the next run.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from train.config import ConfigError

FORMAT = "gpt2-forge-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_NAME = "training_state.pt"
META_NAME = "meta.json"
LAST_NAME = "last"
# The LightningModule holds the network as `self.model`, so Lightning's state-dict keys are "model.<our key>".
MODULE_PREFIX = "model."
# Extra checkpoint keys our LightningModule adds in on_save_checkpoint; they go to config.json / meta.json.
MODEL_CONFIG_KEY = "gpt2_config"
META_KEY = "gpt2_forge_meta"

BEST_NAME = "best"

_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial, corrupt or not ours; the message names the file and the fix."""


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
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict `save_weights` wrote, aliases restored (they share the stored tensor)."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); the checkpoint is corrupt.") from e
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


# Lightning adds these when a module/datamodule called save_hyperparameters(); we never need them to resume and they
# may hold arbitrary objects, so they are not stored.
_DROPPED_KEYS = ("hyper_parameters", "hparams_name", "hparams_type", "datamodule_hyper_parameters")


# ------------------------------------------------------------------------------------------------ the plugin
class DirCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO writing/reading the `step-N/` directory layout above, atomically."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # storage_options={"tmp_dir": d}: `d` (a step-N.tmp-* folder) already holds more files to publish with this
        # checkpoint, e.g. FSDP's sharded/ DCP folder (train/strategies/fsdp.py); it is renamed into place with the rest
        prepared = storage_options.get("tmp_dir") if isinstance(storage_options, dict) else None
        tmp = Path(prepared) if prepared else path.parent / f"{path.name}.tmp-{os.getpid()}"
        if not prepared:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        ckpt = dict(checkpoint)
        state_dict = ckpt.pop("state_dict")
        model_config = ckpt.pop(MODEL_CONFIG_KEY, None)
        meta = dict(ckpt.pop(META_KEY, None) or {})
        for k in _DROPPED_KEYS:
            ckpt.pop(k, None)
        weights = {k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k: v for k, v in state_dict.items()}
        prefixed = [k for k in state_dict if k.startswith(MODULE_PREFIX)]
        try:
            save_weights(weights, tmp / WEIGHTS_NAME)
            if model_config is not None:
                (tmp / CONFIG_NAME).write_text(json.dumps(to_plain(model_config), indent=2, sort_keys=True) + "\n")
            torch.save(to_plain(ckpt, "training state"), tmp / STATE_NAME)
            meta.update(
                format=FORMAT,
                format_version=FORMAT_VERSION,
                global_step=int(checkpoint.get("global_step", 0)),
                module_prefix=MODULE_PREFIX if prefixed else "",
            )
            (tmp / META_NAME).write_text(json.dumps(to_plain(meta), indent=2, sort_keys=True) + "\n")
            _fsync_dir(tmp)
            publish_dir(tmp, path)  # re-saving the same step (e.g. final == periodic) replaces it as a whole
            _fsync_dir(path.parent)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                prev = latest_checkpoint(path.parent.parent)
                raise CheckpointError(
                    f"no space left on the device writing checkpoint {path} ({e.strerror}); "
                    f"{'the previous checkpoint ' + str(prev) + ' is intact' if prev else 'no earlier checkpoint exists'}"
                    f" - free disk space (or raise the quota, or lower checkpoint.keep_last), then continue with "
                    f"resume=auto."
                ) from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load_checkpoint(
        self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:
        path = Path(path)
        meta = read_meta(path)
        state_file = path / STATE_NAME
        if not state_file.is_file():
            raise CheckpointError(f"{state_file} is missing; {path} holds weights only and cannot resume training.")
        try:
            ckpt = torch.load(state_file, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{state_file} cannot be read safely ({e}); the checkpoint is corrupt.") from e
        weights = load_weights(path / WEIGHTS_NAME)
        prefix = meta.get("module_prefix", MODULE_PREFIX)
        ckpt["state_dict"] = {prefix + k: v for k, v in weights.items()}
        cfg_file = path / CONFIG_NAME
        if cfg_file.is_file():
            ckpt[MODEL_CONFIG_KEY] = json.loads(cfg_file.read_text())
        ckpt[META_KEY] = meta
        return ckpt

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(path, ignore_errors=True)


def publish_dir(tmp: Path, path: Path) -> Path:
    """Move a fully written folder `tmp` to `path` by rename, replacing an existing `path` as a whole.

    Readers see the old folder or the new one, never a mix: checkpoints, `checkpoints/best` and HF exports are all
    written into a temporary sibling first and published here.
    """
    tmp, path = Path(tmp), Path(path)
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    return path


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename survives a power cut (POSIX; a no-op where dirs cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ finding checkpoints
def read_meta(step_dir: Path) -> dict[str, Any]:
    step_dir = Path(step_dir)
    f = step_dir / META_NAME
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint {step_dir} does not exist or is not a folder.")
    if not f.is_file():
        raise CheckpointError(
            f"{step_dir} is not a gpt2-forge checkpoint ({META_NAME} missing); "
            f"pass a run_dir/checkpoints/step-N folder or a run dir."
        )
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt.") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{step_dir} is not a gpt2-forge checkpoint (format={meta.get('format')!r}).")
    return meta


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in run_dir, oldest first (partial `*.tmp-*` folders are not listed)."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META_NAME).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove folders a crashed save left behind (`step-N.tmp-<pid>`, `step-N.old-<pid>`)."""
    d = checkpoints_dir(run_dir)
    removed = []
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def write_last(run_dir: Path, step_path: Path) -> None:
    d = checkpoints_dir(run_dir)
    tmp = d / f"{LAST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(Path(step_path).name + "\n")
    os.replace(tmp, d / LAST_NAME)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint: the `last` pointer if it names one, else the highest complete step dir."""
    d = checkpoints_dir(run_dir)
    last = d / LAST_NAME
    if last.is_file():
        p = d / last.read_text().strip()
        if _STEP_RE.match(p.name) and (p / META_NAME).is_file():
            # a newer complete step dir can exist if the process died between rename and pointer update
            newer = list_checkpoints(run_dir)
            return newer[-1] if newer and _step_of(newer[-1]) > _step_of(p) else p
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _step_of(p: Path) -> int:
    m = _STEP_RE.match(Path(p).name)
    return int(m.group(1)) if m else -1


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step dir, or a run dir (-> its newest complete checkpoint), or a checkpoints/ dir."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist.")
    if (p / META_NAME).is_file():
        read_meta(p)
        return p
    if p.name == "checkpoints":
        p = p.parent
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointError(
            f"{p} holds no complete checkpoint (looked for {checkpoints_dir(p)}/step-N/{META_NAME})."
        )
    return found


def retain(run_dir: Path, keep_last: int, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all); `protect`ed dirs are never deleted."""
    if keep_last <= 0:
        return []
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-keep_last:]) | {Path(p).resolve() for p in protect if p}
    removed = []
    for p in ckpts[:-keep_last]:
        if p.resolve() in keep or p in keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def tokenizer_dir_for(step_path: Path) -> Optional[Path]:
    """Where a checkpoint's tokenizer lives: meta.json's `tokenizer_dir` (relative to the step dir) or run_dir/tokenizer."""
    step_path = Path(step_path)
    candidates = []
    try:
        rel = read_meta(step_path).get("tokenizer_dir")
        if rel:
            candidates.append((step_path / rel).resolve())
    except CheckpointError:
        pass
    candidates += [step_path / "tokenizer", step_path.parent.parent / "tokenizer"]
    for c in candidates:
        if (c / "tokenizer.json").is_file() or (c / "vocab.json").is_file():
            return c
    return None


def load_model_config_dict(step_path: Path) -> dict[str, Any]:
    f = Path(step_path) / CONFIG_NAME
    if not f.is_file():
        raise CheckpointError(f"{f} is missing; the checkpoint is incomplete.")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt.") from e


# ------------------------------------------------------------------------------------------------ resuming
def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """The checkpoint a run continues from (`resume`: null | auto | <step dir or run dir>), or None for a fresh start.

    A fresh start in a run_dir that already holds checkpoints is refused (it would mix two runs); partial folders a
    crashed save left behind are removed first. Raises ConfigError / CheckpointError naming the fix.
    """
    if resume is None:
        existing = list_checkpoints(run_dir)
        if existing:
            raise ConfigError(
                f"run_dir={run_dir} already holds checkpoints (newest {existing[-1].name}); pass resume=auto to "
                f"continue that run or choose another run_dir."
            )
        return None
    clean_partial(run_dir)
    if resume == "auto":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise ConfigError(
                f"resume=auto found no complete checkpoint in {checkpoints_dir(run_dir)}; drop resume to start "
                f"fresh, or set run_dir to the run you want to continue."
            )
        return found
    return resolve_checkpoint(resume)


def check_compatible(step_path: Path, model_config, model_class: Optional[str] = None) -> None:
    """A checkpoint of another model size or task head fails here with the difference named, not deep in
    load_state_dict. model_config: the GPT2Config this run builds; model_class: its class name (meta.json "task")."""
    saved_task = read_meta(step_path).get("task")
    if model_class and saved_task and saved_task != model_class:
        raise ConfigError(
            f"checkpoint {step_path} holds a {saved_task} (another task head), but this run builds a {model_class}; "
            f"resume with the task it was trained with, or start a new run_dir with model.init_from={step_path}."
        )
    saved = load_model_config_dict(step_path)
    n_saved = saved.get("num_labels", len(saved["id2label"]) if isinstance(saved.get("id2label"), dict) else None)
    if n_saved is not None and n_saved != getattr(model_config, "num_labels", n_saved):
        raise ConfigError(
            f"checkpoint {step_path} has a head of num_labels={n_saved}, but this run builds "
            f"num_labels={model_config.num_labels}; resume with the same task settings."
        )
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings"):
        if key in saved and saved[key] != getattr(model_config, key):
            raise ConfigError(
                f"checkpoint {step_path} was written by a model with {key}={saved[key]}, but this run builds "
                f"{key}={getattr(model_config, key)}; resume with the same model settings."
            )


# ------------------------------------------------------------------------------------------------ checkpoints/best
def best_dir(run_dir: str | os.PathLike) -> Path:
    """run_dir/checkpoints/best: a fine-tuning task's model at the best value of its monitored metric."""
    return checkpoints_dir(Path(run_dir)) / BEST_NAME


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
