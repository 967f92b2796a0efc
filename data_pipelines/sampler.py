"""Packed blocks from a memmapped token stream, and the deterministic, resumable, rank-sharded batch sampler.

Global sample order: position g = 0, 1, 2, ... of an endless stream that chains one seeded permutation per epoch
(sample = perm_{g // N}[g % N], perm_e = default_rng([seed, e]).permutation(N)). Global batch k covers positions
[c + k·G, c + (k+1)·G) where c = consumed_samples and G = micro_batch·world_size; rank r takes the r-th slice of b.
So 2 ranks × micro-batch b see exactly the samples 1 rank × micro-batch 2b sees, in the same order (what DDP / FSDP
loss comparisons need), and a sampler built at consumed_samples=c continues exactly where the old one stood. The
position is kept in samples, so a run resumed with another micro-batch, accumulation or rank count continues at the
same sample.

`StepBatches` hands each micro-batch the item counts of its whole optimizer step (transformers' Trainer
`get_batch_samples` + num_items_in_batch), so a loss can be normalised by the step's items instead of each
micro-batch's.
Validation (`val_indices`) covers every block: ranks get equal batch counts, the shorter shard padded with blocks whose
labels are -100 (scored by no loss).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from data_pipelines.cache import TokenSplit

IGNORE_INDEX = -100  # the label no loss scores (torch cross_entropy's ignore_index)


class PackedBlocks(Dataset):
    """Non-overlapping `block_size` windows of a flat token range (labels == input_ids; the model shifts inside).

    The range lies in one file or in the concatenation of a sharded folder's files (`split.shards`); a block that
    straddles two shards is stitched from both, so the blocks are the same as if the shards were one file. The
    memmaps are opened lazily in each process (a DataLoader worker re-opens them instead of pickling arrays).
    """

    def __init__(self, split: TokenSplit, block_size: int):
        self.file: Path = split.file
        self.dtype = np.dtype(split.dtype)
        self.start = split.start
        self.block_size = block_size
        self.num_blocks = split.num_tokens // block_size  # the tail shorter than a block is dropped
        self.shards: list[tuple[Path, int]] = list(split.shards)
        # offsets[i]: stream position of shard i's first token; offsets[-1]: the stream's length
        self.offsets = np.cumsum([0] + [n for _, n in self.shards], dtype=np.int64)
        self._blocks: np.ndarray | None = None
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return self.num_blocks

    @property
    def blocks(self) -> np.ndarray:
        """(N, T) view of a one-file range (not available for a sharded range: see `__getitems__`)."""
        if self._blocks is None:
            mm = np.memmap(
                self.file, dtype=self.dtype, mode="r", offset=self.start * self.dtype.itemsize,
                shape=(self.num_blocks * self.block_size,),
            )
            self._blocks = mm.reshape(self.num_blocks, self.block_size)  # (N, T)
        return self._blocks

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_blocks": None, "_maps": None}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])  # a (1, T) batch; the DataLoader uses __getitems__

    def __getitems__(self, indices: list[int | None]) -> dict[str, torch.Tensor]:
        """(B, T) input_ids and labels of the blocks `indices`; None is a padding row (`val_indices`): block 0's
        tokens with every label -100, so no loss or count sees it."""
        pad = [i is None for i in indices]
        indices = [0 if i is None else int(i) for i in indices]
        if not self.shards:
            # one fancy-index gather from the memmap -> (B, T) copy
            rows = self.blocks[np.asarray(indices, dtype=np.int64)]
        else:
            rows = np.stack([self._sharded_block(i) for i in indices])  # (B, T)
        # int64 because embedding/cross-entropy want it
        x = torch.from_numpy(rows.astype(np.int64))  # (B, T)
        if not any(pad):
            return {"input_ids": x, "labels": x}
        labels = x.clone()
        labels[torch.tensor(pad)] = IGNORE_INDEX
        return {"input_ids": x, "labels": labels}

    def _sharded_block(self, index: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.memmap(f, dtype=self.dtype, mode="r", shape=(n,)) for f, n in self.shards]
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} is outside [0, {self.num_blocks}).")
        lo = self.start + index * self.block_size
        hi = lo + self.block_size
        i = int(np.searchsorted(self.offsets, lo, side="right")) - 1  # the shard holding token `lo`
        pieces = []
        while lo < hi:
            take = min(hi, int(self.offsets[i + 1])) - lo
            first = lo - int(self.offsets[i])
            pieces.append(self._maps[i][first : first + take])
            lo += take
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def passthrough(batch):
    """collate_fn: `PackedBlocks.__getitems__` already returns the batch dict (module-level: workers pickle it)."""
    return batch


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless rank-local micro-batches of sample indices (see the module docstring for the exact order)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        consumed_samples: int = 0,
        shuffle: bool = True,
    ):
        if num_samples < 1:
            raise ValueError("the sampler needs at least one sample.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.shuffle = shuffle

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        n, b = self.num_samples, self.batch_size
        global_batch = b * self.world_size
        pos = self.consumed_samples + self.rank * b  # this rank's first global position
        perms: dict[int, np.ndarray] = {}
        while True:
            g = np.arange(pos, pos + b)
            epochs = g // n
            for e in np.unique(epochs):
                if e not in perms:
                    perms[int(e)] = self._perm(int(e))
            for old in [e for e in perms if e < epochs[0]]:
                del perms[old]
            yield [int(perms[int(e)][o]) for e, o in zip(epochs, g % n)]
            pos += global_batch

    # no __len__: the stream never ends; the trainer stops on max_steps


def val_indices(num_samples: int, rank: int, world_size: int) -> list[int | None]:
    """Fixed-order validation shard: rank r gets samples r, r+W, ... of all N, padded with None to ceil(N/W) entries.

    Every sample is scored once; the counts are equal, so no rank waits in a collective (an FSDP all-gather, a DDP
    buffer broadcast) for a batch another rank does not have. `PackedBlocks` turns None into a row labelled -100
    throughout, which adds nothing to a loss summed over labelled tokens.
    """
    own: list[int | None] = list(range(rank, num_samples, world_size))
    return own + [None] * (-(-num_samples // world_size) - len(own))


def batched(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


class StepBatches:
    """The micro-batches of `loader`, each carrying the item counts of its whole optimizer step on this rank.

    Pulls `accumulate` micro-batches at a time (one optimizer step's), sums `count_items(batch)` ({name: 0-dim
    integer tensor}, e.g. the labelled tokens) over them, and yields each batch dict with two more keys:
    "step_items" (those sums, the same for every micro-batch of the step) and "step_micro_batch" (its index in the
    step, an int). The training step all-reduces the counts over ranks at micro-batch 0 and divides the summed loss
    by them, so the gradient is the mean over every item of the step however the step is cut (transformers'
    Trainer: `get_batch_samples` and num_items_in_batch, PR #34191). The loader starts at a step boundary (the
    sampler's consumed_samples), so the grouping matches the optimizer's.
    """

    def __init__(self, loader: Iterable[dict], accumulate: int, count_items: Callable[[dict], dict]):
        if accumulate < 1:
            raise ValueError(f"accumulate={accumulate}: the micro-batches per optimizer step must be >= 1.")
        self.loader, self.accumulate, self.count_items = loader, accumulate, count_items

    def __iter__(self) -> Iterator[dict]:
        it = iter(self.loader)
        while group := list(itertools.islice(it, self.accumulate)):
            counts = [self.count_items(b) for b in group]
            step_items = {k: sum(c[k] for c in counts) for k in counts[0]}
            for i, batch in enumerate(group):
                yield {**batch, "step_items": dict(step_items), "step_micro_batch": i}


def step_batches(loader: Iterable[dict], trainer) -> Iterable[dict]:
    """`loader` wrapped in `StepBatches` when the Trainer's LightningModule defines `count_items(batch)`, with
    the Trainer's accumulate_grad_batches; else `loader` itself (a module that normalises by micro-batch)."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    count_items = getattr(module, "count_items", None)
    if count_items is None:
        return loader
    return StepBatches(loader, int(trainer.accumulate_grad_batches), count_items)
