"""DeepSpeed ZeRO (`strategy=deepspeed_zero1|2|3|3_offload`): Lightning's DeepSpeedStrategy writing our step-dir layout.

DeepSpeed saves its shards into `step-N.tmp-*`; rank 0 consolidates them into an fp32 `model.safetensors`
(deepspeed_config.py), adds config.json + meta.json and publishes the folder with one rename, so export and
`model.init_from` read a ZeRO checkpoint like any other. The DeepSpeed JSON itself comes from deepspeed_config.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from train import checkpoint as ck


def finalize_zero_checkpoint(tmp: Path, path: Path, model_config: Optional[dict], meta: dict[str, Any],
                             global_step: int, convert=None) -> Path:
    """Rank 0, after DeepSpeed wrote its shards into `tmp`: add model.safetensors (fp32, consolidated), config.json
    and meta.json, then publish `tmp` as `path` with one rename (the same atomic step-dir contract as DirCheckpointIO).

    convert(checkpoint_dir, out_file): the consolidation; default deepspeed_config.zero_checkpoint_to_safetensors.
    """
    if convert is None:
        from train.strategies.deepspeed_config import zero_checkpoint_to_safetensors as convert
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


def is_zero3(strategy) -> bool:
    """True for our ZeRO strategy at stage 3 (parameters partitioned across ranks)."""
    return type(strategy).__name__ == "ZeroStrategy" and strategy.zero_stage_3


__all__ = ["finalize_zero_checkpoint", "is_zero3", "zero_strategy_class"]
