"""`DataConfig`: every knob of the LM data pipeline, mirrored field for field by `conf/data/<option>.yaml`.

Hydra composes the YAML onto this dataclass as a structured-config schema (see `register_configs`), so an
unknown key (`data.batchsize=8`) or a badly typed value (`data.block_size=abc`, `data=foo` is caught by Hydra's
group lookup, `data.source=foo` by the `Source` enum) fails at composition time with a message naming the key.
`__post_init__` checks what types alone cannot (ranges, combinations) and raises one clear sentence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional


class Source(str, Enum):
    """Where the text (or tokens) comes from. A `str` enum, so `cfg.source == "text"` works either way."""

    default = "default"  # embedded corpus: CPython's own documentation (data_pipelines/corpus.py), no network
    text = "text"  # local plain-text file(s): each file is one document
    jsonl = "jsonl"  # local JSON-lines file(s): each record's `text_column` is one document
    csv = "csv"  # local CSV file(s): each row's `text_column` is one document
    parquet = "parquet"  # local Parquet file(s): each row's `text_column` is one document
    hub = "hub"  # a Hugging Face hub dataset: load_dataset(name, config_name, split=split, streaming=streaming)
    tokens = "tokens"  # pre-tokenized flat .bin files (prepare.py output or nanoGPT train.bin/val.bin)


SOURCES = tuple(s.value for s in Source)

# Sources read from local files through `datasets.load_dataset(<builder>, data_files=...)`.
FILE_BUILDERS = {"text": "text", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
FILE_EXTENSIONS = {
    "text": (".txt", ".text", ".md"),
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    "csv": (".csv", ".tsv", ".csv.gz"),
    "parquet": (".parquet",),
}

ENCODERS = ("auto", "tiktoken", "tokenizers")

# Cache root: cfg.cache_dir, else $GPT2_FORGE_CACHE, else ~/.cache/gpt2-forge.
CACHE_ENV = "GPT2_FORGE_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpt2-forge").expanduser()


@dataclass
class DataConfig:
    # --- what to read ---
    source: Source = Source.default
    path: Optional[str] = None  # text/jsonl/csv/parquet: a file, a folder or a glob; tokens: the folder with train.bin
    val_path: Optional[str] = None  # text/jsonl/csv/parquet: validation file(s); else `val_fraction` of the stream
    name: Optional[str] = None  # hub: dataset id, e.g. "Skylion007/openwebtext"
    config_name: Optional[str] = None  # hub: dataset configuration, e.g. "wikitext-103-raw-v1"
    split: str = "train"  # hub: the training split
    val_split: Optional[str] = None  # hub: validation split; else `val_fraction` of the training stream
    text_column: str = "text"  # jsonl/csv/parquet/hub: the column holding the documents
    streaming: bool = False  # hub: stream instead of downloading the whole dataset first
    max_documents: Optional[int] = None  # read at most this many documents (useful with streaming)
    # --- tokenizer ---
    tokenizer: Optional[str] = None  # folder or hub id of a GPT2TokenizerFast; None -> train a byte-level BPE (cached)
    # Size of the BPE trained when tokenizer is None (4096: a tiny CPU model learns it in a few hundred steps and it
    # still fits uint16); for source=tokens: the model vocabulary (> every token id). Ignored with `tokenizer` set.
    vocab_size: Optional[int] = 4096
    tokenizer_max_chars: int = 200_000_000  # train the BPE on at most this many characters of the source
    # --- preparation (tokenize once, ahead of training: data_pipelines/prepare.py, shards.py) ---
    num_proc: int = 1  # processes that encode shards (datasets' name); the shards do not depend on it
    shard_size_mb: float = 100.0  # text per token shard, in millions of characters (~MB of English; ~25M tokens)
    encoder: str = "auto"  # auto (tiktoken when it gives provably the same ids, else tokenizers) | tiktoken | tokenizers
    # --- packing / batches ---
    block_size: int = 128  # tokens per sample (T); blocks are cut from the flat stream at read time
    batch_size: int = 16  # micro-batch per device (B)
    val_fraction: float = 0.05  # tail of the token stream held out for validation when no val file/split is given
    num_workers: int = 0  # DataLoader workers; batches are memmap slices, so 0 is fast enough on CPU
    pin_memory: Optional[bool] = None  # None -> pin when CUDA is available
    cache_dir: Optional[str] = None  # None -> $GPT2_FORGE_CACHE or ~/.cache/gpt2-forge
    seed: int = 1337  # seeds the per-epoch permutation of training blocks

    def __post_init__(self) -> None:
        try:
            self.source = Source(getattr(self.source, "value", self.source))
        except ValueError:
            raise ValueError(
                f"data.source={self.source!r} is not a known source; use one of {', '.join(SOURCES)}."
            ) from None
        if self.block_size < 2:
            raise ValueError(f"data.block_size={self.block_size} is too small; use at least 2 tokens per block.")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} must be at least 1.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1).")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0.")
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc={self.num_proc} must be at least 1.")
        if not self.shard_size_mb > 0:
            raise ValueError(f"data.shard_size_mb={self.shard_size_mb} must be positive (e.g. 100).")
        if self.encoder not in ENCODERS:
            raise ValueError(f"data.encoder={self.encoder!r} is not an encoder; use one of {', '.join(ENCODERS)}.")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents={self.max_documents} must be >= 1 (or null for all).")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"data.vocab_size={self.vocab_size} must be positive.")
        if self.source is Source.default or self.source.value in FILE_BUILDERS or self.source is Source.hub:
            if self.tokenizer is None and self.vocab_size is None:
                raise ValueError("data.vocab_size is null but no data.tokenizer is given; set data.vocab_size=4096.")
            if self.tokenizer is None and self.vocab_size < 257:
                # byte-level BPE starts from 256 byte tokens plus <|endoftext|>
                raise ValueError(
                    f"data.vocab_size={self.vocab_size} is too small for a byte-level BPE; use at least 257."
                )
        if self.source.value in FILE_BUILDERS or self.source is Source.tokens:
            if not self.path:
                raise ValueError(f"data.source={self.source.value} needs data.path=<file, folder or glob>.")
        if self.source is Source.hub and not self.name:
            raise ValueError("data.source=hub needs data.name=<dataset id>, e.g. data.name=wikitext.")

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


@dataclass
class PrepareConfig:
    """Root schema of `conf/prepare.yaml` (data_pipelines/prepare.py).

    num_tasks / task_index: one task of a multi-node (Slurm array) preparation encodes only its share of the
    shards and writes no index; a last run with num_tasks=1 finishes whatever is missing and writes the index.
    """

    data: DataConfig = field(default_factory=DataConfig)
    num_tasks: int = 1
    task_index: int = 0

    def __post_init__(self) -> None:
        if self.num_tasks < 1 or not 0 <= self.task_index < self.num_tasks:
            raise ValueError(
                f"task_index={self.task_index} / num_tasks={self.num_tasks}: need num_tasks >= 1 and "
                f"0 <= task_index < num_tasks."
            )


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore.

    `data_schema` (group-less) lets any root config type its `data` node:
    `defaults: [prepare_schema, {data: default}, _self_]`; each `conf/data/<option>.yaml` then merges onto a
    typed `DataConfig`, so a misspelt key fails at composition with its name.
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="data_schema", node=DataConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)


def to_dataclass(cls: type, node, what: str):
    """DictConfig / dict / `cls` instance -> a validated `cls` (its __post_init__ runs); unknown keys are named."""
    if isinstance(node, cls):
        return node
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            obj = OmegaConf.to_object(node)  # a typed node comes back as `cls` itself, an untyped one as a dict
            if isinstance(obj, cls):
                return obj
            node = obj
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    known = cls.__dataclass_fields__
    unknown = sorted(set(node) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; valid keys are {sorted(known)}.")
    return cls(**dict(node))


def to_data_config(node) -> DataConfig:
    """DictConfig / dict / DataConfig -> a validated DataConfig (the only place a DictConfig is unwrapped)."""
    return to_dataclass(DataConfig, node, "data config")
