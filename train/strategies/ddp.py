"""`strategy=auto` (Lightning picks: one device runs the model as it is, several run DDP) and `strategy=ddp`
(DistributedDataParallel: one replica per process, gradients all-reduced in buckets during backward)."""

from __future__ import annotations

from train.config import DDPConfig, StrategyConfig
from train.strategies import StrategySpec, timeout


def build_ddp(strategy_cfg: DDPConfig, trainer_cfg, micro_batch_size: int, hardware):
    """Lightning's DDPStrategy with the ddp group's settings (its process group formed per torchrun restart attempt:
    engines/elastic.py)."""
    from train.strategies.engines.elastic import ElasticDDPStrategy

    return ElasticDDPStrategy(
        find_unused_parameters=strategy_cfg.find_unused_parameters,
        gradient_as_bucket_view=strategy_cfg.gradient_as_bucket_view,
        process_group_backend=strategy_cfg.process_group_backend,
        timeout=timeout(strategy_cfg),
    )


SPECS = (
    StrategySpec("auto", StrategyConfig, build=lambda strategy_cfg, trainer_cfg, micro_batch_size, hardware: "auto"),
    StrategySpec("ddp", DDPConfig, build=build_ddp, plan_rank=0),
)
