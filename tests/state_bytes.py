"""Bytes of parameters, gradients, optimizer state and communication buffers one rank holds, counted from the live
tensors of a running job (a test helper: the 2-process CPU runs of tests/zero_runs.py call `held_bytes` from inside
each rank, and tests/test_deepspeed_cpu.py holds launch/plan.py's per-rank figures against them).

What is counted, by engine:

* torch (DDP, FSDP2): the LightningModule's parameters, their `.grad`, every tensor of `optimizer.state`; an FSDP2
  DTensor counts its local shard (`to_local()`, whose storage is the rank's padded shard). Under DDP with
  `gradient_as_bucket_view=True` the gradients are views into the reducer's buckets: the buckets are what is counted.
* DeepSpeed ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py): parameters = the module's (views into the flat
  `bit16_groups_flat`); gradients = each parameter's `.grad`, the reduced partitions (`averaged_gradients`, views
  into `grads_in_partition`) and the fp32 master partition's `.grad`; optimizer = the fp32 master partitions (`single_partition_of_fp32_groups`) and the
  wrapped optimizer's state; buffers = the reduce buckets (`ipg_buckets`).
* DeepSpeed ZeRO-3 (deepspeed/runtime/zero/stage3.py): parameters = each parameter's partition (`ds_tensor`, views
  into the flat 16-bit partition); gradients = `grad_partitions_flat_buffer`, `averaged_gradients` and the master
  partitions' `.grad` (an fp32 buffer of its own when the optimizer is offloaded); optimizer = `fp32_partitioned_groups_flat` and the optimizer's state; buffers = the reduce
  buckets.

A tensor is counted by its untyped storage (`untyped_storage().nbytes()`, keyed by its data_ptr), once: views of one
buffer count the buffer, and a storage already counted in an earlier part (parameters, then gradients, then
optimizer, then buffers) is not counted again (so a master partition that shared its parameters' storage would count
as parameters only).
Storages of 0 bytes (a ZeRO-3 parameter's released `data`) count nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

PARTS = ("params", "grads", "optimizer", "buffers")


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    """Every tensor in `obj` (a tensor, or nested lists / tuples / dicts of them); DTensors as their local shard."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj.to_local() if hasattr(obj, "to_local") else obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _count(parts: dict[str, Any]) -> dict[str, int]:
    """{part: bytes} of the unique storages of each part's tensors, earlier parts winning a shared storage."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for name in PARTS:
        total = 0
        for t in _tensors(parts.get(name)):
            st = t.untyped_storage()
            if st.nbytes() == 0 or st.data_ptr() in seen:
                continue
            seen.add(st.data_ptr())
            total += st.nbytes()
        out[name] = total
    return out


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _zero_parts(engine, params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """The parts (see the module docstring) of a DeepSpeed engine's ZeRO optimizer."""
    opt = engine.optimizer
    averaged = getattr(opt, "averaged_gradients", None) or {}
    buckets = [b.buffer for b in getattr(opt, "ipg_buckets", {}).values()]
    if hasattr(params[0], "ds_tensor"):  # stage 3
        master = list(opt.fp32_partitioned_groups_flat)
        return {"params": [p.ds_tensor for p in params],
                "grads": [opt.grad_partitions_flat_buffer, list(averaged.values()), [m.grad for m in master]],
                "optimizer": [master, _optimizer_state(opt.optimizer)], "buffers": buckets}
    master = list(opt.single_partition_of_fp32_groups)
    return {"params": list(params),
            "grads": [[p.grad for p in params], list(averaged.values()), [m.grad for m in master]],
            "optimizer": [master, _optimizer_state(opt.optimizer)], "buffers": buckets}


def held_bytes(trainer, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds in parameters, gradients, optimizer state and buffers (keys `PARTS`), for the strategy
    `trainer` runs (`module`: the network; `optimizer`: what Lightning hands `on_before_optimizer_step`, or a torch
    optimizer; trainer=None: a plain torch loop).

    Call it where the gradients and the optimizer state are both alive: before an optimizer step after the first
    (under DeepSpeed, whose engine Lightning steps after every micro-batch, after each micro-batch of such a step).
    """
    params = list({id(p): p for p in module.parameters()}.values())  # a tied weight once
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps the torch one
    engine = getattr(getattr(trainer, "strategy", None), "deepspeed_engine", None)  # trainer None: plain torch
    if engine is not None:
        return _count(_zero_parts(engine, params))
    return _count({"params": list(params), "grads": [p.grad for p in params],
                   "optimizer": _optimizer_state(optimizer)})
