"""The process group of a torchrun restart attempt (`--max-restarts N` under the static rendezvous), formed on keys of
that attempt only: `init_attempt_process_group` says why. torch only (no Lightning), so a bare torchrun worker can use
it as the strategies do (engines/elastic.py)."""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Optional

import torch


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
    (nothing done) outside torchrun or when a group exists already. The strategies call it before their own init
    (engines/elastic.py: AttemptProcessGroup).

    Why: torchrun's static rendezvous (`--master-addr/--master-port`) keeps one TCPStore in the agent for the whole
    job (torch/distributed/elastic/rendezvous/static_tcp_rendezvous.py), and with TORCHELASTIC_USE_AGENT_STORE=True
    every worker's env:// `init_process_group` connects to it as a client with no per-attempt prefix
    (torch/distributed/rendezvous.py: `_create_c10d_store`). The keys the failed attempt wrote - each rank's gloo
    address, `default_pg/0//cpu//0/<rank>` - are still there, so a restarted rank that reads a peer's key before that
    peer has rewritten it connects to the dead attempt's port: "Connection refused" in gloo's connectFullMesh. gloo
    retries for a few seconds, so it bites when the ranks of a restart reach `init_process_group` further apart than
    that - a training job's start-up on a busy machine (pytorch/pytorch#135712 is the same stale-key race with NCCL's
    unique id). Here the group forms on the agent's store seen through a `PrefixStore` naming the attempt
    (TORCHELASTIC_RESTART_COUNT: the agent restarts its whole worker group, and a failure on one node fails the
    collectives of every other, so all workers of an attempt carry the same count).

    The group is destroyed at interpreter exit (`atexit`), whatever the backend.

    device: the rank's accelerator (a CUDA device binds NCCL to it at once, as Lightning does); None / CPU: none.
    Raises what `init_process_group` raises (a peer that never arrives: DistStoreError after `timeout`).
    """
    prefix = agent_store_prefix()
    dist = torch.distributed
    if prefix is None or not dist.is_available() or dist.is_initialized():
        return False
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, client), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout,
                            device_id=device if device is not None and device.type != "cpu" else None)
    # Destroyed at exit for every backend, while the interpreter is still whole (atexit runs before finalization).
    # Lightning's _init_dist_connection registers this for NCCL only, but a gloo group left to interpreter
    # finalization can abort the process after its work is done: a gloo thread may still take the GIL then, and
    # "grabbing the GIL ... will crash" once the interpreter has exited (torch 2.13's comment on the ProcessGroup
    # dtor in destroy_process_group, torch/distributed/distributed_c10d.py:2386) - "terminate called without an
    # active exception", SIGABRT, which torchrun counts as a failed attempt.
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return True


__all__ = ["agent_store_prefix", "init_attempt_process_group"]
