"""torchrun restarts (`--max-restarts N`) under its static rendezvous (`--master-addr/--master-port`): the process group
of each restart attempt is formed on keys of that attempt only.

Why: torchrun's static rendezvous keeps one TCPStore in the agent for the whole job
(torch/distributed/elastic/rendezvous/static_tcp_rendezvous.py), and with TORCHELASTIC_USE_AGENT_STORE=True every
worker's `init_process_group` connects to it as a client with no per-attempt prefix
(torch/distributed/rendezvous.py: `_create_c10d_store`). The keys the failed attempt wrote - gloo's listening address
of each rank under `default_pg/0/` - are still there, so a restarted rank that reads a peer's key before that peer has
rewritten it connects to the dead attempt's port: "Connection refused" in gloo's connectFullMesh. Whether that happens
depends on how far apart the ranks reach `init_process_group`: a few milliseconds in a bare script, seconds in a
training job (pytorch/pytorch#135712 is the same stale-key race with NCCL's unique id under the c10d rendezvous).

The fix: a worker started by torchrun opens the default process group itself, on the agent's store seen through a
`PrefixStore` naming the attempt (TORCHELASTIC_RESTART_COUNT: the agent restarts its whole worker group, and a failure
on one node fails the collectives of every other, so all workers of an attempt carry the same count); Lightning's
`_init_dist_connection` and `deepspeed.init_distributed` then find the group initialized and use it. Outside torchrun
(Lightning's own launcher, SLURM's srun) nothing changes.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy


def agent_store_prefix(env: Optional[dict] = None) -> Optional[str]:
    """The key prefix of this restart attempt when torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE=True),
    e.g. "torchelastic/attempt_1"; None outside torchrun or when the workers host their own store."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    return f"torchelastic/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def init_attempt_process_group(backend: str, timeout: timedelta, device: Optional[torch.device] = None) -> bool:
    """Under torchrun's agent store: `init_process_group(backend)` on the agent's TCPStore (MASTER_ADDR:MASTER_PORT)
    behind this attempt's `agent_store_prefix`, rank RANK of WORLD_SIZE. Returns True when it formed the group; False
    (nothing done) outside torchrun or when a group exists already.

    device: the rank's accelerator (a CUDA device binds NCCL to it at once, as Lightning does); None / CPU: none.
    Raises what `init_process_group` raises (a peer that never arrives: DistStoreError after `timeout`).
    """
    prefix = agent_store_prefix()
    if prefix is None or not dist.is_available() or dist.is_initialized():
        return False
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, client), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout,
                            device_id=device if device is not None and device.type != "cpu" else None)
    if backend == "nccl":  # what Lightning's _init_dist_connection registers for the groups it opens itself
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return True


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


__all__ = ["AttemptProcessGroup", "ElasticDDPStrategy", "agent_store_prefix", "init_attempt_process_group"]
