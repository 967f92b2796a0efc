"""`strategy=fsdp`: FSDP2, `fully_shard` per block then the root, applied to the built model from outside
(torchtitan's recipe) through Lightning's ModelParallelStrategy (train/strategies/engines/fsdp2.py); parameters,
gradients and optimizer state sharded over every rank; also runs on the CPU with gloo. Its checkpoints hold the DCP
shards of model + optimizer beside the consolidated model.safetensors."""

from __future__ import annotations

from train.checkpoint.layout import DCP_FAMILY
from train.config import FSDPConfig
from train.strategies import StrategySpec, timeout


def build_fsdp(strategy_cfg: FSDPConfig, trainer_cfg, micro_batch_size: int, hardware):
    """FSDP2Strategy with the fsdp group's settings and the resolved precision's MixedPrecisionPolicy."""
    from train.strategies.engines.fsdp2 import FSDP2Strategy

    return FSDP2Strategy(
        wrap_class=strategy_cfg.wrap_class,
        reshard_after_forward=strategy_cfg.reshard_after_forward,
        offload=strategy_cfg.offload,
        param_precision=hardware.precision,
        process_group_backend=strategy_cfg.process_group_backend,
        timeout=timeout(strategy_cfg),
    )


def gather_fsdp(trainer, module):
    """The full weights on rank 0 (to CPU; None elsewhere), gathered from the DTensor shards by every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if trainer.is_global_zero else None


SPECS = (
    StrategySpec("fsdp", FSDPConfig, build=build_fsdp, checkpoint_family=DCP_FAMILY, full_state_dict=gather_fsdp,
                 zero_stage=3, plan_rank=3, optimizer_params="row shards of each matrix (FSDP2 DTensors)"),
)
