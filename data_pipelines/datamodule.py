"""`LMDataModule`: the LightningDataModule for causal-LM pre-training (the contract is the project's public interface: README.md).

prepare_data (local rank 0 of each node): tokenize + pack + cache (no-op when cached).
setup: every rank opens the cached token folder (ranks other than local 0 wait for it), builds the datasets.
train_dataloader: endless, seeded, rank-sharded, resumable from `consumed_samples` (a position in samples) —
Lightning must not swap in its own DistributedSampler, so build the Trainer with `use_distributed_sampler=False`, and
validate on a step interval (`val_check_interval=<int>`, `check_val_every_n_epoch=None`): the stream has no epochs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from data_pipelines.cache import TokenData, prepare_tokens, read_token_dir
from data_pipelines.config import DataConfig, Source, to_data_config
from data_pipelines.sampler import (
    PackedBlocks,
    ResumableBatchSampler,
    batched,
    passthrough,
    step_batches,
    val_indices,
)
from gpt2.tokenizer import GPT2TokenizerFast

WAIT_SECONDS = 4 * 3600  # ranks > 0 wait this long for local rank 0 to finish tokenizing


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LMDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = to_data_config(cfg)
        self.consumed_samples = 0  # GLOBAL training samples consumed (the trainer adds micro_batch * world_size)
        self.prepare_data_per_node = True  # every node tokenizes into its own (possibly node-local) cache
        self.data: TokenData | None = None
        self._tokenizer: GPT2TokenizerFast | None = None
        self.train_dataset: PackedBlocks | None = None
        self.val_dataset: PackedBlocks | None = None
        self.rank, self.world_size = 0, 1
        self._root: Path | None = None

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        # Lightning calls this on local rank 0 only; a caller that runs it on every rank (before the Trainer
        # exists) still tokenizes once per node: LOCAL_RANK > 0 waits for the cache instead
        self._root = self._token_dir()

    def _token_dir(self) -> Path:
        if self.cfg.source is Source.tokens:
            return Path(self.cfg.path).expanduser()
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            return prepare_tokens(self.cfg, create=True)  # idempotent; covers use without a Trainer
        deadline = time.monotonic() + WAIT_SECONDS
        while True:  # Lightning already barriers after prepare_data; this covers hand-rolled multi-process use
            try:
                return prepare_tokens(self.cfg, create=False)
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2.0)

    def setup(self, stage: str | None = None) -> None:
        # rank / world size are refreshed on every call: a first setup() before the Trainer exists sees (0, 1),
        # the Trainer's own setup() call then brings the real DDP values
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.rank, self.world_size = trainer.global_rank, trainer.world_size
        else:
            self.rank, self.world_size = _dist_rank_world()
        if self.data is not None:
            if self.val_dataset is not None and len(self.val_dataset) < self.world_size:
                raise ValueError(
                    f"the validation stream has {len(self.val_dataset)} blocks, fewer than the {self.world_size} "
                    f"ranks; raise data.val_fraction or lower data.block_size."
                )
            return
        root = self._root or self._token_dir()
        own = self.cfg.source is not Source.tokens
        self.data = read_token_dir(self.cfg, root if own else None)
        cfg = self.cfg
        if cfg.tokenizer and not (own and self.data.tokenizer_dir is not None):
            self._tokenizer = GPT2TokenizerFast.from_pretrained(cfg.tokenizer)
        elif self.data.tokenizer_dir is not None:  # the copy saved next to the tokens (same tokenizer.json)
            self._tokenizer = GPT2TokenizerFast.from_pretrained(str(self.data.tokenizer_dir))
        if self._tokenizer is not None and len(self._tokenizer) > self.data.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self._tokenizer)} tokens but data.vocab_size={self.data.vocab_size}; "
                f"set data.vocab_size={len(self._tokenizer)} or larger."
            )
        self.train_dataset = PackedBlocks(self.data.train, cfg.block_size)
        if len(self.train_dataset) == 0:
            raise ValueError(
                f"the training stream has {self.data.train.num_tokens} tokens, fewer than one block of "
                f"data.block_size={cfg.block_size}; lower data.block_size or give more data."
            )
        self.val_dataset = None
        if self.data.val is not None and self.data.val.num_tokens > 0:
            self.val_dataset = PackedBlocks(self.data.val, cfg.block_size)
            if len(self.val_dataset) < self.world_size:
                raise ValueError(
                    f"the validation stream has {self.data.val.num_tokens} tokens, fewer than one block of "
                    f"data.block_size={cfg.block_size} per rank; raise data.val_fraction or lower data.block_size."
                )

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> GPT2TokenizerFast | None:
        """The tokenizer of the data (None only for a tokens folder that ships none and no data.tokenizer)."""
        self._require_setup()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        self._require_setup()
        return self.data.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        self._require_setup()
        if self._tokenizer is not None:
            return self._tokenizer.eos_token_id
        return self.data.eos_token_id

    def _require_setup(self) -> None:
        if self.data is None:
            raise RuntimeError("LMDataModule.setup() has not run yet; call dm.prepare_data(); dm.setup() first.")

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: PackedBlocks, batch_sampler) -> DataLoader:
        cfg = self.cfg
        pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=passthrough,
            num_workers=cfg.num_workers,
            pin_memory=pin,
            persistent_workers=cfg.num_workers > 0,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
        )

    def train_sampler(self) -> ResumableBatchSampler:
        self._require_setup()
        return ResumableBatchSampler(
            len(self.train_dataset),
            self.cfg.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.cfg.seed,
            consumed_samples=self.consumed_samples,
        )

    def train_dataloader(self):
        """The endless training loader; under a Trainer whose module counts items, each micro-batch carries its
        optimizer step's item counts (`sampler.StepBatches`)."""
        return step_batches(self._loader(self.train_dataset, self.train_sampler()), getattr(self, "trainer", None))

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        if self.val_dataset is None:
            return []  # val_fraction=0 and no val file: Lightning skips validation
        idx = val_indices(len(self.val_dataset), self.rank, self.world_size)
        return self._loader(self.val_dataset, batched(idx, self.cfg.batch_size))

    # ------------------------------------------------------------------ state (saved in Lightning checkpoints)
    def state_dict(self) -> dict:
        return {"consumed_samples": int(self.consumed_samples)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.consumed_samples = int(state_dict.get("consumed_samples", 0))
