"""Sharded, parallel, resumable preparation: source units -> token shards (one file each) -> index.json.

Layout of a sharded token folder (format version 2; cache.py reads it, and `data=tokens data.path=<folder>` too):

    index.json                 written last: the folder is complete iff it exists (see `write_index`)
    shards/train-UUUUU-PPPPP.bin   flat token ids of part P of unit U (uint16 when the vocabulary fits, else uint32)
    shards/train-UUUUU.json        unit manifest: how many parts the unit has (written once the unit was read)
    shards/val-...                 the same for a separate validation source (data.val_path / data.val_split)
    tokenizer/                     the tokenizer the ids came from (save_pretrained format)

How the work is cut. The source is a list of *units* (sources.py: a file, a row range of a hub split, a streamed
data-file shard). A unit's document stream is cut into *parts* of about `data.shard_size_mb` million characters —
after a document, or inside a long text file at a point where GPT-2's pre-tokenizer splits anyway — so the part
boundaries depend on the data and that size only, never on the number of processes or nodes. Each part becomes
one token file, written under a temp name and renamed into place, so a part file either is complete or is not
there. Concatenating the parts in (unit, part) order gives, token for token, the stream of a one-process run.

Who does what. There are `lanes` = tasks (Slurm array tasks, `num_tasks`) x processes per task (`data.num_proc`).
With at least as many units as lanes, a work item is a whole unit; with fewer, every unit is read by several items
and item r of M encodes the parts p with p % M == r (reading is ~10-50x faster than encoding, so the extra reads
are cheap next to the parallel encoding). Items go round-robin to the tasks, and a task's items to its processes.

Resuming. A run skips items whose unit manifest and parts exist, and inside an item skips the parts that exist
(it reads past them without encoding). So killing a preparation and running it again finishes only the missing
parts, whatever `num_proc` either run used. Each item's process re-reads its own unit: nothing but the unit
number travels between processes, and memory per process is one encoding batch (bounded by ENCODE_BATCH_CHARS).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines.config import DataConfig
from data_pipelines.fast_bpe import DocumentEncoder, encode_stream
from data_pipelines.files import temp_path, write_json_atomic
from data_pipelines.sources import DocumentSource

INDEX = "index.json"
SHARDS = "shards"
ENCODE_BATCH_CHARS = 1 << 22  # ~4 MB of text per encoding batch: per-call overhead vanishes, memory stays small


@dataclass(frozen=True)
class WorkItem:
    """Encode the parts p of unit `unit` of `split` with p % stripes == stripe."""

    split: str  # "train" or "val"
    unit: int
    stripe: int = 0
    stripes: int = 1


@dataclass
class ShardJob:
    """Everything a worker process needs (pickled once per process)."""

    cfg: DataConfig
    root: Path
    encoder: DocumentEncoder
    eos: int
    dtype: str
    cut_text: bool  # text files may be cut at SAFE_CUT points (GPT-2 pre-tokenizer)

    @property
    def shard_chars(self) -> int:
        return max(1, int(self.cfg.shard_size_mb * 1e6))


def part_path(root: Path, split: str, unit: int, part: int) -> Path:
    """The token file of part `part` of unit `unit` of `split` (names sort in stream order)."""
    return root / SHARDS / f"{split}-{unit:05d}-{part:05d}.bin"


def manifest_path(root: Path, split: str, unit: int) -> Path:
    """The unit manifest ({"parts": n}), written once the unit has been read to its end."""
    return root / SHARDS / f"{split}-{unit:05d}.json"


def plan(units: dict[str, int], lanes: int) -> list[WorkItem]:
    """The work items for `units` ({split: number of units}) spread over `lanes` processes (see module docstring)."""
    total = sum(units.values())
    stripes = max(1, math.ceil(lanes / total)) if total else 1
    return [WorkItem(split, u, r, stripes) for split, n in units.items() for u in range(n) for r in range(stripes)]


def item_done(root: Path, item: WorkItem) -> bool:
    """True when the unit's manifest and every part this item owns exist (then a run skips it without reading)."""
    man = manifest_path(root, item.split, item.unit)
    if not man.exists():
        return False
    n_parts = json.loads(man.read_text())["parts"]
    return all(part_path(root, item.split, item.unit, p).exists() for p in range(item.stripe, n_parts, item.stripes))


class _PartWriter:
    """Encodes the pieces of one part into a temp file and renames it into place on `close()`."""

    def __init__(self, job: ShardJob, final: Path):
        self.job, self.final = job, final
        self.tmp = temp_path(final)
        self.f = open(self.tmp, "wb")
        self.pieces: list[tuple[str, bool]] = []
        self.chars = 0
        self.tokens = 0

    def add(self, piece: str, last: bool) -> None:
        self.pieces.append((piece, last))
        self.chars += len(piece)
        if self.chars >= ENCODE_BATCH_CHARS:
            self._flush()

    def _flush(self) -> None:
        job = self.job
        for arr in encode_stream(job.encoder, self.pieces, job.eos, np.dtype(job.dtype), 1 << 62):
            arr.tofile(self.f)
            self.tokens += arr.size
        self.pieces, self.chars = [], 0

    def close(self) -> None:
        self._flush()
        self.f.flush()
        os.fsync(self.f.fileno())  # the rename below publishes the part: its bytes must be on disk first
        self.f.close()
        try:
            os.replace(self.tmp, self.final)
        except FileNotFoundError:  # a concurrent preparation of the same folder finished and cleaned up first
            if not self.final.exists():
                raise

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def run_item(job: ShardJob, item: WorkItem) -> tuple[int, int]:
    """Read the item's unit, encode the parts it owns that are missing; returns (parts written, tokens written)."""
    source = DocumentSource(job.cfg, item.split)
    part, chars, written, tokens = 0, 0, 0, 0
    writer: _PartWriter | None = None
    started = False  # pieces of part `part` were seen

    def finish_part() -> None:
        nonlocal writer, written, tokens, part, chars, started
        if writer is not None:
            writer.close()
            written, tokens, writer = written + 1, tokens + writer.tokens, None
        part, chars, started = part + 1, 0, False

    try:
        for piece, last in source.unit_pieces(item.unit, cut_text=job.cut_text):
            if not started:
                started = True
                final = part_path(job.root, item.split, item.unit, part)
                mine = part % item.stripes == item.stripe
                writer = _PartWriter(job, final) if mine and not final.exists() else None  # else: read past it
            if writer is not None:
                writer.add(piece, last)
            chars += len(piece)
            if chars >= job.shard_chars:
                finish_part()
        if started:
            finish_part()
    finally:
        if writer is not None:  # an error mid-part: leave no temp file behind
            writer.abort()
    write_json_atomic(manifest_path(job.root, item.split, item.unit), {"parts": part})
    return written, tokens


# ------------------------------------------------------------------------------------------- processes
_JOB: ShardJob | None = None


def _init_worker(job: ShardJob) -> None:
    global _JOB
    _JOB = job
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizers fallback: one thread per process


def _run_in_worker(item: WorkItem) -> tuple[int, int]:
    return run_item(_JOB, item)


def run_items(job: ShardJob, items: list[WorkItem], num_proc: int) -> tuple[int, int]:
    """Run `items` on `num_proc` processes (in this process when 1); returns (parts written, tokens written)."""
    if not items:
        return 0, 0
    if num_proc <= 1 or len(items) == 1:
        results = [run_item(job, it) for it in items]
    else:
        # spawn, not fork: the parent may hold tokenizers' Rust thread pool or datasets' threads
        ctx = mp.get_context("spawn")
        with ctx.Pool(min(num_proc, len(items)), initializer=_init_worker, initargs=(job,)) as pool:
            results = list(pool.imap_unordered(_run_in_worker, items))
    return sum(r[0] for r in results), sum(r[1] for r in results)


def prepare_shards(
    job: ShardJob, train: DocumentSource, val: DocumentSource | None, task_index: int = 0, num_tasks: int = 1
) -> dict:
    """Encode this task's share of the missing parts; returns a summary (units, items, parts/tokens written)."""
    (job.root / SHARDS).mkdir(parents=True, exist_ok=True)
    units = {"train": train.num_units()}
    if val is not None:
        units["val"] = val.num_units()
    lanes = num_tasks * max(1, job.cfg.num_proc)
    mine = [it for i, it in enumerate(plan(units, lanes)) if i % num_tasks == task_index]
    todo = [it for it in mine if not item_done(job.root, it)]
    t0 = time.perf_counter()
    parts, tokens = run_items(job, todo, job.cfg.num_proc)
    return {
        "units": units, "items": len(mine), "items_run": len(todo), "parts_written": parts,
        "tokens_written": tokens, "seconds": time.perf_counter() - t0, **peak_rss_mb(),
    }


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of the largest finished child process (the workers), in MB."""
    import resource

    kb = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb / 1e6,
        "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kb / 1e6,
    }


def split_shards(root: Path, split: str, num_units: int) -> list[tuple[str, int]]:
    """[(file relative to root, size in bytes)] of a split in stream order; raises if a unit is not complete."""
    out = []
    for u in range(num_units):
        man = manifest_path(root, split, u)
        if not man.exists():
            raise FileNotFoundError(f"{split} unit {u} of {root} is not prepared yet ({man.name} missing).")
        for p in range(json.loads(man.read_text())["parts"]):
            f = part_path(root, split, u, p)
            if not f.exists():
                raise FileNotFoundError(f"{root} lacks the shard {f.name}; run the preparation again to finish it.")
            out.append((f.relative_to(root).as_posix(), f.stat().st_size))
    return out


def remove_temp_files(root: Path) -> None:
    """Delete the temp files that killed runs left in shards/ (only called once every part exists)."""
    for f in (root / SHARDS).glob(".*.tmp-*"):
        f.unlink(missing_ok=True)


__all__ = ["INDEX", "SHARDS", "WorkItem", "ShardJob", "plan", "item_done", "run_item", "run_items",
           "prepare_shards", "split_shards", "part_path", "manifest_path"]
