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
`trainer.fit(..., ckpt_path=dir)` go through it and Lightning restores every state it saved. A checkpoint of FSDP2 or
DeepSpeed (meta.json `strategy`) is loaded through the universal training state (train/checkpoint/universal.py) into
the same layout, so DDP and one device resume it too. Writes are atomic:
everything goes into `step-N.tmp-<pid>/`, then one `os.rename` publishes it; `checkpoints/last` (a text file with
the newest complete step dir's name) is replaced with `os.replace`. A crash leaves at worst a `*.tmp-*` folder,
which is never loaded and is removed by the next run.

Finding and checking checkpoints needs no torch (train/checkpoint/layout.py), so the entry points refuse a bad run
dir or checkpoint before they import torch and Lightning; reading and writing weights needs no Lightning
(train/checkpoint/weights.py), so export, generate and evaluation never import it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from train.checkpoint.layout import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    FULL_FAMILY,
    META_KEY,
    META_NAME,
    MODEL_CONFIG_KEY,
    MODULE_PREFIX,
    STATE_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    family_of,
    latest_checkpoint,
    publish_dir,
    read_meta,
)
from train.checkpoint.weights import load_weights, save_weights, to_plain


# Lightning adds these when a module/datamodule called save_hyperparameters(); we never need them to resume and they
# may hold arbitrary objects, so they are not stored.
DROPPED_KEYS = ("hyper_parameters", "hparams_name", "hparams_type", "datamodule_hyper_parameters")


# ------------------------------------------------------------------------------------------------ the plugin
class DirCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO writing/reading the `step-N/` directory layout above, atomically."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # storage_options={"tmp_dir": d}: `d` (a step-N.tmp-* folder) already holds more files to publish with this
        # checkpoint, e.g. FSDP's sharded/ DCP folder (train/strategies/engines/fsdp2.py); it is renamed into place with the rest
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
        for k in DROPPED_KEYS:
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
        if family_of(meta) != FULL_FAMILY:
            # FSDP's DCP shards or ZeRO partitions: the universal training state, in the layout loaded below
            from train.checkpoint.universal import lightning_checkpoint, read_universal

            cfg_file = path / CONFIG_NAME
            config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
            return lightning_checkpoint(read_universal(path, meta), meta, config)
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
