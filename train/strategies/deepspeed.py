"""The DeepSpeed ZeRO strategies through Lightning's DeepSpeedStrategy (train/strategies/engines/zero.py), on CUDA GPUs
or on the CPU (DeepSpeed's CPU accelerator with gloo): stage 1 shards optimizer state, 2 also gradients, 3 also
parameters (Rajbhandari et al. 2020, ZeRO); `_offload` keeps optimizer state and parameters in host memory
(ZeRO-Offload, Ren et al. 2021). The DeepSpeed JSON is generated from our config (engines/deepspeed_config.py: one
source of truth); after each save rank 0 consolidates the shards into model.safetensors."""

from __future__ import annotations

from train.checkpoint.layout import ZERO_FAMILY
from train.config import ConfigError, ZeROConfig
from train.strategies import StrategySpec, timeout


def check_cpu_precision(strategy_name: str, precision: str) -> None:
    """Refuse, in one sentence, a trainer precision DeepSpeed's CPU accelerator cannot train in.

    It trains in fp32 and bf16 on any CPU, and in fp16 only where oneDNN has fp16 kernels (AVX512-FP16 / AMX-FP16:
    `CPU_Accelerator.is_fp16_supported`); elsewhere deepspeed.initialize stops with "Type fp16 is not supported on
    your device" after the data and model were built. fp64 runs under no DeepSpeed accelerator.
    """
    if precision.startswith("64"):
        raise ConfigError(f"strategy={strategy_name} cannot train in trainer.precision={precision} (DeepSpeed has no "
                          f"fp64 mode); use trainer.precision=32-true or bf16-mixed.")
    if not precision.startswith("16"):
        return
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator  # imports DeepSpeed (~2 s): only for fp16

    if not CPU_Accelerator().is_fp16_supported():
        raise ConfigError(f"strategy={strategy_name} with trainer.precision={precision} needs fp16 kernels this CPU "
                          f"lacks (DeepSpeed's CPU accelerator uses oneDNN's AVX512-FP16/AMX ones); use "
                          f"trainer.precision=bf16-mixed or 32-true on this machine.")


def check_zero(strategy_cfg: ZeROConfig, trainer_cfg, hardware) -> None:
    """DeepSpeed runs on CUDA GPUs or, through its CPU accelerator, on the CPU in fp32 / bf16 (fp16 where the CPU has
    the kernels)."""
    if hardware.on_gpu:
        return
    if trainer_cfg.accelerator not in ("cpu", "auto"):
        raise ConfigError(f"strategy={strategy_cfg.name} runs on CUDA GPUs or the CPU, not "
                          f"trainer.accelerator={trainer_cfg.accelerator}; use trainer.accelerator=cpu.")
    check_cpu_precision(strategy_cfg.name, hardware.precision)


def deepspeed_config_for_strategy(strategy: str, **kwargs):
    """engines.deepspeed_config.deepspeed_config for one of the ZeRO strategies (its stage and offload); ValueError
    for any other name."""
    from train.strategies.engines.deepspeed_config import deepspeed_config

    if strategy not in STRATEGY_STAGES:
        raise ValueError(f"{strategy!r} is not a DeepSpeed strategy; choose one of {', '.join(STRATEGY_STAGES)}.")
    stage, offload = STRATEGY_STAGES[strategy]
    return deepspeed_config(stage, offload, **kwargs)


def build_zero(strategy_cfg: ZeROConfig, trainer_cfg, micro_batch_size: int, hardware):
    """ZeroStrategy with the JSON of this stage from the data / trainer values."""
    from train.strategies.engines.deepspeed_config import deepspeed_config
    from train.strategies.engines.zero import ZeroStrategy, select_cpu_accelerator

    stage, offload = STRATEGY_STAGES[strategy_cfg.name]
    offload = offload or strategy_cfg.offload
    if not hardware.on_gpu:
        select_cpu_accelerator()
    config = deepspeed_config(
        stage,
        offload,
        micro_batch_size=micro_batch_size,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        precision=hardware.precision,
        param_persistence_threshold=strategy_cfg.stage3_param_persistence_threshold,
        for_lightning=True,
    )
    if offload:
        # our LightningModule builds torch.optim.AdamW; DeepSpeed refuses a client optimizer with offload
        # unless told (DeepSpeedCPUAdam would be faster, at the price of a C++ op build on first use)
        config["zero_force_ds_cpu_optimizer"] = False
    return ZeroStrategy(config=config, process_group_backend=strategy_cfg.process_group_backend,
                        timeout=timeout(strategy_cfg))


def gather_zero3(trainer, module):
    """The full weights on rank 0 (None elsewhere): every rank gathers the partitioned parameters (a collective)."""
    import deepspeed

    from train.strategies.engines.fsdp2 import retie

    with deepspeed.zero.GatheredParameters(list(module.model.parameters()), modifier_rank=None):
        if not trainer.is_global_zero:
            return None
        full = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
    return retie(full, module.model)  # the tied lm_head is wte again: stored once


def _zero(name: str, stage: int, offload: bool, plan_rank: int) -> StrategySpec:
    return StrategySpec(name, ZeROConfig, build=build_zero, checkpoint_family=ZERO_FAMILY, check_hardware=check_zero,
                        full_state_dict=gather_zero3 if stage == 3 else None, zero_stage=stage, engine="deepspeed",
                        offload=offload, plan_rank=plan_rank,
                        optimizer_params="flat 1-D partitions of the flattened parameters (ZeRO)")


SPECS = (
    _zero("deepspeed_zero1", 1, False, plan_rank=1),
    _zero("deepspeed_zero2", 2, False, plan_rank=2),
    _zero("deepspeed_zero3", 3, False, plan_rank=4),
    _zero("deepspeed_zero3_offload", 3, True, plan_rank=5),
)
STRATEGY_STAGES = {spec.name: (spec.zero_stage, spec.offload) for spec in SPECS}  # name -> (stage, offload)
