"""The DeepSpeed JSON, generated from our config values (one source of truth), and ZeRO checkpoint -> safetensors.

Pure functions: importing this module imports neither Lightning nor DeepSpeed (launch/plan.py reads its constants).

    cfg = deepspeed_config(stage=3, offload=True, micro_batch_size=8, accumulate_grad_batches=4,
                           gradient_clip_val=1.0, precision="bf16-mixed", for_lightning=True)
    strategy = lightning.pytorch.strategies.DeepSpeedStrategy(config=cfg)

Field meanings: https://www.deepspeed.ai/docs/config-json/ (and deepspeed/runtime/zero/config.py for defaults).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# Communication buckets, in elements. DeepSpeed's defaults are 5e8, which with overlap_comm allocates two 16-bit
# buffers of 1 GB each (deepspeed/runtime/zero/stage_1_and_2.py); Lightning's DeepSpeedStrategy uses 2e8, and so do we.
REDUCE_BUCKET_SIZE = 200_000_000
ALLGATHER_BUCKET_SIZE = 200_000_000
# ZeRO-3: how many elements to prefetch ahead, the cap on gathered live parameters, and the size below which a
# parameter is kept whole on every rank (LayerNorms and biases: gathering them costs more than they weigh).
# DeepSpeed's defaults (runtime/zero/config.py).
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
STAGE3_PARAM_PERSISTENCE_THRESHOLD = 100_000
# fp16 dynamic loss scaling: start at 2**16, halve on overflow, double after 1000 clean steps (Micikevicius et al.
# 2018, "Mixed Precision Training" §3.2; the DeepSpeed and Lightning defaults).
FP16_INITIAL_SCALE_POWER = 16
FP16_LOSS_SCALE_WINDOW = 1000
FP16_HYSTERESIS = 2
FP16_MIN_LOSS_SCALE = 1

# Lightning precision strings -> what DeepSpeed runs ("32" has neither an fp16 nor a bf16 section).
_PRECISIONS = {
    "32": "32", "32-true": "32",
    "16": "fp16", "16-mixed": "fp16", "16-true": "fp16",
    "bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16",
}
def deepspeed_config(
    stage: int,
    offload: bool = False,
    micro_batch_size: int = 1,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = None,
    precision: str = "bf16-mixed",
    world_size: int | None = None,
    *,
    overlap_comm: bool = True,
    contiguous_gradients: bool = True,
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE,
    allgather_bucket_size: int = ALLGATHER_BUCKET_SIZE,
    pin_memory: bool = True,
    param_persistence_threshold: int = STAGE3_PARAM_PERSISTENCE_THRESHOLD,
    for_lightning: bool = False,
    steps_per_print: int = 10**9,
) -> dict[str, Any]:
    """The DeepSpeed config dict for ZeRO `stage` (1, 2 or 3) from the trainer's own values.

    offload: stage 3 -> optimizer state and parameters in CPU memory (ZeRO-Infinity's CPU tier);
        stages 1/2 -> optimizer state only (ZeRO-Offload, Ren et al. 2021; DeepSpeed offloads parameters only in
        stage 3). CPU offload wants DeepSpeed's CPU Adam (`deepspeed.ops.adam.DeepSpeedCPUAdam`) as the optimizer.
    precision: a Lightning precision string: "16-mixed"/"16-true" -> an fp16 section with dynamic loss scaling,
        "bf16-mixed"/"bf16-true" -> a bf16 section, "32"/"32-true" -> neither.
    world_size: when given, `train_batch_size` = micro x accumulation x world size is written too (DeepSpeed checks
        the three agree); None leaves it to DeepSpeed to derive.
    param_persistence_threshold: stage 3 -> `stage3_param_persistence_threshold`: parameters with fewer elements stay
        whole on every rank (with DeepSpeed's default, 1e5, a tiny test model is never sharded at all).
    for_lightning: leave out `gradient_accumulation_steps`: Lightning's DeepSpeedStrategy refuses a config that
        sets it and fills it from `Trainer(accumulate_grad_batches=...)` — the same value, still one source.
    """
    mode = _check_arguments(stage, offload, micro_batch_size, accumulate_grad_batches, gradient_clip_val, precision,
                            world_size, reduce_bucket_size, allgather_bucket_size, param_persistence_threshold)
    zero = _zero_section(stage, offload, overlap_comm, contiguous_gradients, reduce_bucket_size,
                         allgather_bucket_size, pin_memory, param_persistence_threshold)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulate_grad_batches,
        "gradient_clipping": float(gradient_clip_val or 0.0),  # 0.0 = off (DeepSpeed's convention)
        "zero_optimization": zero,
        # our LightningModule builds torch.optim.AdamW; DeepSpeed only "tests" its own optimizers
        "zero_allow_untested_optimizer": True,
        "steps_per_print": steps_per_print,  # progress is Lightning's job, not DeepSpeed's stdout
        "wall_clock_breakdown": False,
    }
    if world_size is not None:
        cfg["train_batch_size"] = micro_batch_size * accumulate_grad_batches * world_size
    cfg.update(_precision_section(mode))
    if for_lightning:
        del cfg["gradient_accumulation_steps"]
    return cfg


def _check_arguments(stage, offload, micro_batch_size, accumulate_grad_batches, gradient_clip_val, precision,
                     world_size, reduce_bucket_size, allgather_bucket_size, param_persistence_threshold) -> str:
    """`deepspeed_config`'s argument checks (ValueError naming the argument); returns the precision mode
    ("32", "fp16" or "bf16")."""
    if stage not in (1, 2, 3):
        hint = " (stage 0 is plain data parallelism: use strategy=ddp)" if stage == 0 else ""
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage!r}{hint}.")
    if not isinstance(offload, bool):
        raise ValueError(f"offload must be true or false, got {offload!r}.")
    for name, val in (("micro_batch_size", micro_batch_size), ("accumulate_grad_batches", accumulate_grad_batches)):
        if not (isinstance(val, int) and not isinstance(val, bool) and val >= 1):
            raise ValueError(f"{name} must be a positive integer, got {val!r}.")
    if world_size is not None and not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be a positive integer or None, got {world_size!r}.")
    if gradient_clip_val is not None and not gradient_clip_val >= 0:
        raise ValueError(f"gradient_clip_val must be >= 0 or None, got {gradient_clip_val!r}.")
    mode = _PRECISIONS.get(str(precision))
    if mode is None:
        raise ValueError(f"precision={precision!r} cannot run under DeepSpeed; use one of "
                         f"{', '.join(k for k in _PRECISIONS if '-' in k)}.")
    for name, val in (("reduce_bucket_size", reduce_bucket_size), ("allgather_bucket_size", allgather_bucket_size)):
        if not (isinstance(val, int) and val > 0):
            raise ValueError(f"{name} must be a positive integer (elements), got {val!r}.")
    if not (isinstance(param_persistence_threshold, int) and param_persistence_threshold >= 0):
        raise ValueError(f"param_persistence_threshold must be a non-negative integer (elements), got "
                         f"{param_persistence_threshold!r}.")

    return mode


def _zero_section(stage, offload, overlap_comm, contiguous_gradients, reduce_bucket_size, allgather_bucket_size,
                  pin_memory, param_persistence_threshold) -> dict[str, Any]:
    """The `zero_optimization` section of the DeepSpeed config."""
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": overlap_comm,  # reduce gradients while backward still runs
        "contiguous_gradients": contiguous_gradients,  # copy gradients into one buffer: no fragmentation
        "reduce_bucket_size": reduce_bucket_size,
        "reduce_scatter": True,
    }
    if stage in (1, 2):
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = allgather_bucket_size
    else:
        zero.update({
            "stage3_prefetch_bucket_size": STAGE3_PREFETCH_BUCKET_SIZE,
            "stage3_max_live_parameters": STAGE3_MAX_LIVE_PARAMETERS,
            "stage3_param_persistence_threshold": param_persistence_threshold,
            # save_checkpoint also writes consolidated 16-bit weights (engine.save_16bit_model) instead of shards only
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    return zero


def _precision_section(mode: str) -> dict[str, Any]:
    """The fp16 (dynamic loss scaling) or bf16 section for a precision mode; nothing for fp32."""
    if mode == "fp16":
        return {"fp16": {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": FP16_INITIAL_SCALE_POWER,
            "loss_scale_window": FP16_LOSS_SCALE_WINDOW,
            "hysteresis": FP16_HYSTERESIS,
            "min_loss_scale": FP16_MIN_LOSS_SCALE,
        }}
    if mode == "bf16":
        return {"bf16": {"enabled": True}}  # same exponent range as fp32: no loss scaling needed
    return {}


# ----------------------------------------------------------------------------------------------------- checkpoints
# Prefixes the engine's module adds in front of our model keys: Lightning wraps the LightningModule in
# `_LightningModuleWrapperBase` (attribute `_forward_module`), DDP-style wrappers add `module.`, and our LightningModule
# holds the network as `self.model`. The model keys are found by the trunk's: `transformer.wte.weight`, or a block's
# `transformer.h.<i>.` (a LoRA checkpoint holds the blocks' adapters but not the frozen embeddings).
_ANCHOR_KEY = "transformer.wte.weight"
_ANCHOR = re.compile(r"^(.*?)transformer\.(?:wte\.weight$|h\.\d+\.)")


def strip_wrapper_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Our model's keys from a wrapped model's state dict: drops the prefix in front of `transformer.wte.weight` or
    `transformer.h.<i>.` (e.g. `_forward_module.model.`) from every key; keys without it (optimizer-side extras) are
    dropped."""
    anchors = [m.group(1) for m in map(_ANCHOR.match, state_dict) if m]
    if not anchors:
        raise ValueError(f"the checkpoint has no '{_ANCHOR_KEY}' parameter (keys start with "
                         f"{sorted(state_dict)[:3]}); it is not a gpt2-forge GPT-2 checkpoint.")
    prefix = min(anchors, key=len)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def zero_checkpoint_to_state_dict(checkpoint_dir: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
    """fp32 state dict (our key names) from a DeepSpeed ZeRO checkpoint directory, any stage, any world size.

    checkpoint_dir: the folder `engine.save_checkpoint` / Lightning's DeepSpeedStrategy wrote (it holds `latest` and
    the tag folder, Lightning's tag is "checkpoint"); tag: None -> the one named in `latest`.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # heavy: import on use

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir} is not a directory; pass the folder a DeepSpeed checkpoint was "
                                f"saved to (it contains 'latest').")
    if tag is None and not (checkpoint_dir / "latest").is_file():
        tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir())
        raise FileNotFoundError(f"{checkpoint_dir} has no 'latest' file; pass tag= one of {tags} "
                                f"(the subfolder with the *_model_states.pt files).")
    sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    return strip_wrapper_prefix(sd)


def zero_checkpoint_to_safetensors(checkpoint_dir: str | os.PathLike, out_file: str | os.PathLike,
                                   tag: str | None = None) -> dict[str, Any]:
    """Consolidate a ZeRO checkpoint into one fp32 `model.safetensors` with our key names; returns the state dict.

    Tied weights (lm_head.weight = transformer.wte.weight) are stored once and listed as aliases in the metadata,
    the same file format as train/checkpoint/io.py writes (safetensors refuses tensors that share memory).
    """
    from train.checkpoint.weights import save_weights  # lazily; train.checkpoint.weights (not train.checkpoint) imports no Lightning

    sd = zero_checkpoint_to_state_dict(checkpoint_dir, tag)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + f".tmp-{os.getpid()}")
    save_weights(sd, tmp)
    os.replace(tmp, out_file)  # atomic: a crash never leaves a half-written model.safetensors
    return sd


__all__ = [
    "deepspeed_config",
    "strip_wrapper_prefix",
    "zero_checkpoint_to_state_dict",
    "zero_checkpoint_to_safetensors",
    "REDUCE_BUCKET_SIZE",
    "ALLGATHER_BUCKET_SIZE",
]
