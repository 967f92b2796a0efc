"""torchrun restarts (`--max-restarts N`) under its static rendezvous: the strategies' process group is formed on keys
of the restart attempt only (engines/rendezvous.py says why), before Lightning's or
DeepSpeed's own init, which then find it initialized. Outside torchrun nothing changes.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy

from train.strategies.engines.rendezvous import init_attempt_process_group


class AttemptProcessGroup:
    """Strategy mixin (before the Lightning strategy in the bases): under torchrun, the process group is formed with
    `init_attempt_process_group` just before the strategy's own init (Lightning's DDP and DeepSpeed strategies in
    `setup_distributed`, ModelParallelStrategy in `_setup_distributed`), which then finds it initialized."""

    def _init_attempt_group(self) -> None:
        init_attempt_process_group(self._get_process_group_backend(), self._timeout, self.root_device)

    def setup_distributed(self) -> None:
        self._init_attempt_group()
        super().setup_distributed()

    def _setup_distributed(self) -> None:
        self._init_attempt_group()
        super()._setup_distributed()


class ElasticDDPStrategy(AttemptProcessGroup, DDPStrategy):
    """Lightning's DDPStrategy whose process group survives torchrun restarts (`AttemptProcessGroup`)."""


__all__ = ["AttemptProcessGroup", "ElasticDDPStrategy"]
