"""Checkpoints written in the background (`checkpoint.async_save`), with the same publish rule as a synchronous save.

The training loop pays for a point-in-time snapshot of the checkpoint's tensors (a copy in host memory); one
background thread per process writes the snapshot into `step-N.tmp-<pid>/`, publishes it with one rename and only
then runs what follows a save (the `checkpoints/last` pointer, retention). A process killed while the thread writes
leaves a `*.tmp-*` folder that is never loaded (train/checkpoint/layout.py), so `resume=auto` takes the previous
complete checkpoint.

- `BackgroundWriter`: the thread. Jobs run one at a time in submission order; the first failure is raised, once, in
  the training thread at the next `wait()` (the next save, a rollback, teardown), and the jobs queued after it are
  skipped, so nothing that follows a failed write (the `last` pointer) happens.
- `AsyncDirCheckpointIO`: Lightning's `AsyncCheckpointIO` (lightning.pytorch.plugins.io.async_plugin: clone the
  tensors on the caller thread, write in a thread) around `DirCheckpointIO`, except that a save first waits for the
  previous one (one snapshot in memory at a time) and a writer's error is never swallowed (the full-state path:
  single device and DDP, where rank 0 writes).
- FSDP2 saves through `torch.distributed.checkpoint.async_save` (train/strategies/engines/fsdp2.py) and DeepSpeed
  ZeRO consolidates its shards in the background (train/strategies/engines/zero.py); both hand their publish step to
  the strategy's `checkpoint_writer`.

`writer_of(strategy)` finds the writer a strategy saves through (None: saves are synchronous); `after_save` and
`wait_for_checkpoints` are what the callbacks use.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from train.checkpoint.io import DirCheckpointIO

log = logging.getLogger(__name__)


def snapshot(checkpoint: Any) -> Any:
    """A point-in-time copy of every tensor in a (nested) checkpoint dict, on the calling thread, so that training can
    update the weights and optimizer state in place while the copy is written (Lightning's AsyncCheckpointIO does
    the same: `t.detach().clone()`). Tensors that are one tensor under several names (tied embeddings: lm_head.weight
    is transformer.wte.weight) stay one copy, so the weights file still stores them once. Tensors stay on their
    device; other values are shared (they are not mutated). Costs one copy of the checkpoint's tensors in memory
    until the write finishes."""
    copies: dict[tuple, torch.Tensor] = {}

    def copy(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() == 0 or key not in copies:
            copies[key] = t.detach().clone()
        return copies[key]

    return apply_to_collection(checkpoint, torch.Tensor, copy)


class BackgroundWriter:
    """One worker thread running checkpoint jobs in submission order (a `ThreadPoolExecutor(max_workers=1)`).

    `submit(fn, *args)` returns at once; `wait()` blocks until every submitted job is done and raises the first
    failure since the last `wait()` (the exception the job raised, e.g. CheckpointError for a full disk). After a
    failure the jobs still queued are skipped. `close()` waits, then stops the thread.
    """

    def __init__(self) -> None:
        self._executor: Optional[ThreadPoolExecutor] = None
        self._futures: list[Future] = []
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._futures.append(self._executor.submit(self._run, fn, *args, **kwargs))

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        with self._lock:
            if self._error is not None:  # an earlier write failed: what follows it must not happen
                return
        try:
            fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the training thread by wait()
            with self._lock:
                self._error = e

    def wait(self) -> None:
        """Block until every submitted job is done; raise the first failure among them (once)."""
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()  # _run never raises: failures are kept in _error
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """wait(), then shut the thread down (a later submit starts a new one)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


class AsyncDirCheckpointIO(AsyncCheckpointIO):
    """Lightning's AsyncCheckpointIO around `DirCheckpointIO` (the step-dir layout, published by one rename).

    `save_checkpoint(checkpoint, path)` waits for the previous save, snapshots the tensors (`snapshot`) and returns;
    the write happens in `writer`. `teardown()` (Lightning calls it when a fit / validate ends) waits for it and
    raises its failure. Loading waits for a pending write first, so a checkpoint is read only when complete.
    """

    def __init__(self, checkpoint_io: Optional[DirCheckpointIO] = None) -> None:
        super().__init__(checkpoint_io or DirCheckpointIO())
        self.writer = BackgroundWriter()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        self.writer.wait()  # the previous checkpoint is published (or its error raised) before the next snapshot
        self.writer.submit(self.checkpoint_io.save_checkpoint, snapshot(checkpoint), path, storage_options)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.writer.wait()
        return self.checkpoint_io.load_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        self.writer.close()


def writer_of(strategy: Any) -> Optional[BackgroundWriter]:
    """The BackgroundWriter this strategy's checkpoints go through, or None when it saves synchronously: the
    strategy's own `checkpoint_writer` (FSDP2, ZeRO) or its AsyncDirCheckpointIO plugin's (single device, DDP)."""
    writer = getattr(strategy, "checkpoint_writer", None)
    if writer is not None:
        return writer
    io = getattr(strategy, "checkpoint_io", None)  # the plugin train.trainer.build_checkpoint_io gave the Trainer
    return io.writer if isinstance(io, AsyncDirCheckpointIO) else None


def after_save(strategy: Any, fn: Callable[[], Any]) -> None:
    """Run `fn` once the checkpoint just saved through `strategy` is published: now for a synchronous save, else
    in its writer after the write (skipped if the write fails; the failure is raised at the next wait)."""
    writer = writer_of(strategy)
    if writer is None:
        fn()
    else:
        writer.submit(fn)


def wait_for_checkpoints(strategy: Any) -> None:
    """Block until this process's checkpoint writes are published; raise a failed write's error. A no-op for
    synchronous saves. Call it on every rank before reading checkpoints/ (a rollback) or reporting a save as done."""
    writer = writer_of(strategy)
    if writer is not None:
        writer.wait()


__all__ = ["AsyncDirCheckpointIO", "BackgroundWriter", "after_save", "snapshot", "wait_for_checkpoints", "writer_of"]
