"""Token folders: writing (tokenize once, cache) and reading (ours, sharded or flat, or nanoGPT's train.bin/val.bin).

A token folder — what `prepare.py` writes and what `data=tokens data.path=<dir>` reads — is one of:

- sharded (format version 2, written now; layout in shards.py): `index.json` + `shards/*.bin` + `tokenizer/`.
  index.json: {"format": "gpt2-forge-tokens", "version": 2, "dtype", "vocab_size", "eos_token_id", "tokenizer"
  (folder, relative), "tokenizer_sha256", "encoder", "shard_size_mb", "source", "val_source", "num_tokens",
  "splits": {"train" | "val": {"shards": [[file, num_tokens], ...], "start", "stop"}}}: a split is the token range
  [start, stop) of its shards' concatenation (without a validation source, "val" is the tail of the train shards).
- flat (version 1, still read): `train.bin` `train.json` `val.bin` `val.json` `tokenizer/`; sidecar {"format",
  "version", "dtype", "vocab_size", "num_tokens", "eos_token_id", "tokenizer", "tokenizer_sha256", "source", "split"}.
- nanoGPT's `train.bin` [+ `val.bin`]: uint16, no sidecar (`data.vocab_size` says the vocabulary).

Cache key of a prepared folder: sha256 of (source identity — file paths + sizes + mtimes, hub name/config/split, or the
embedded corpus' Python version —, the validation source or `val_fraction`, `max_documents`, the tokenizer's
tokenizer.json hash, `shard_size_mb`, FORMAT_VERSION). Neither `block_size` (blocks are cut from the stream when it
is read) nor `num_proc` (the shards do not depend on it) is in the key. A folder is complete once index.json exists;
until then a run (or a killed run's successor) finishes the missing shards.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines.config import DataConfig, Source
from data_pipelines.corpus import build_corpus, corpus_sha256
from data_pipelines.fast_bpe import DocumentEncoder
from data_pipelines.files import write_json_atomic
from data_pipelines.shards import INDEX, ShardJob, prepare_shards, remove_temp_files, split_shards
from data_pipelines.sources import DocumentSource
from data_pipelines.tokenizing import (
    atomic_dir,
    get_tokenizer,
    is_gpt2_pre_tokenizer,
    publish_dir,
    sha256_json,
    token_dtype,
    tokenizer_sha256,
)

log = logging.getLogger(__name__)

FORMAT = "gpt2-forge-tokens"
FORMAT_VERSION = 2  # 2: sharded (index.json); 1: flat train.bin/val.bin, still read


@dataclass
class TokenSplit:
    """A contiguous range [start, stop) of tokens in a flat .bin file, or in the concatenation of `shards`.

    `shards`: ((file, num_tokens), ...) in stream order for a sharded folder (then `file` is the first shard);
    empty for one flat file.
    """

    file: Path
    dtype: np.dtype
    start: int
    stop: int
    shards: tuple[tuple[Path, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start

    @property
    def files(self) -> list[Path]:
        return [f for f, _ in self.shards] if self.shards else [self.file]


@dataclass
class TokenData:
    """What the datamodule needs to serve batches: the two streams, the vocabulary, the tokenizer folder."""

    root: Path
    train: TokenSplit
    val: TokenSplit | None
    vocab_size: int
    tokenizer_dir: Path | None
    eos_token_id: int | None = None


# --------------------------------------------------------------------------------------------- writing
def tokens_dir_for(cfg: DataConfig, create: bool = True) -> tuple[Path, DocumentSource, DocumentSource | None, object]:
    train_src = DocumentSource(cfg, "train")
    has_val = bool(cfg.val_path) if train_src.files else (cfg.source is Source.hub and bool(cfg.val_split))
    val_src = DocumentSource(cfg, "val") if has_val else None
    tok = get_tokenizer(cfg, train_src, create=create)
    key = sha256_json(
        {
            "train": train_src.identity(),
            "val": val_src.identity() if val_src else {"val_fraction": cfg.val_fraction},
            "tokenizer_sha256": tokenizer_sha256(tok),
            "shard_size_mb": cfg.shard_size_mb,
            "format": [FORMAT, FORMAT_VERSION],
        }
    )[:16]
    return cfg.cache_root / "tokens" / f"{train_src.kind}-{key}", train_src, val_src, tok


def prepare_tokens(
    cfg: DataConfig, create: bool = True, verbose: bool = False, task_index: int = 0, num_tasks: int = 1
) -> Path:
    """Tokenize + cache the configured source into a sharded token folder (no-op when complete); returns it.

    Runs `cfg.num_proc` processes and resumes a killed run (shards.py). source=tokens: validates `cfg.path` and
    returns it. create=False: never tokenizes, raises FileNotFoundError when the folder is not complete (for ranks
    that wait on rank 0). num_tasks > 1: encode only this task's share (`task_index`) of the shards and write no
    index — the Slurm array path; a final run with num_tasks=1 finishes what is missing and writes the index.
    """
    if cfg.source is Source.tokens:
        read_token_dir(cfg)  # validates (clear errors) without writing anything
        return Path(cfg.path).expanduser()
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task_index={task_index} must be in [0, num_tasks={num_tasks}).")
    out, train_src, val_src, tok = tokens_dir_for(cfg, create=create)
    if (out / INDEX).exists():
        return out
    if not create:
        raise FileNotFoundError(f"no cached tokens at {out}; run data_pipelines/prepare.py (or rank 0) first.")
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; documents are joined with <|endoftext|>, so add one.")
    t0 = time.perf_counter()
    if not (out / "tokenizer").is_dir():
        tmp = atomic_dir(out / "tokenizer")
        tok.save_pretrained(str(tmp))
        publish_dir(tmp, out / "tokenizer")
    encoder = DocumentEncoder(tok.backend_tokenizer, engine=cfg.encoder)
    dtype = token_dtype(len(tok))
    job = ShardJob(cfg, out, encoder, tok.eos_token_id, dtype.name, is_gpt2_pre_tokenizer(tok.backend_tokenizer))
    summary = prepare_shards(job, train_src, val_src, task_index=task_index, num_tasks=num_tasks)
    if verbose:
        print(f"  {summary['parts_written']} shard(s), {summary['tokens_written']:,} tokens written by this run "
              f"({encoder.engine}, {cfg.num_proc} process(es)) in {summary['seconds']:.1f} s; peak RSS "
              f"{summary['peak_rss_mb']:.0f} MB (largest worker {summary['peak_worker_rss_mb']:.0f} MB)")
    if num_tasks == 1:
        write_index(cfg, out, tok, train_src, val_src, encoder.engine, summary["units"], time.perf_counter() - t0)
    return out


def write_index(
    cfg: DataConfig, out: Path, tok, train_src: DocumentSource, val_src: DocumentSource | None, engine: str,
    units: dict[str, int], seconds: float,
) -> None:
    """Check that every shard exists and publish index.json (the folder is complete from then on)."""
    dtype = token_dtype(len(tok))

    def shards(split: str) -> list[list]:
        return [[f, size // dtype.itemsize] for f, size in split_shards(out, split, units[split])]

    train = shards("train")
    n_train = sum(n for _, n in train)
    if n_train == 0:
        raise ValueError(f"{train_src.label()} contains no text (no non-empty documents); give a source with text.")
    if val_src is not None:
        val = shards("val")
        n_val = sum(n for _, n in val)
        if n_val == 0:
            raise ValueError(f"{val_src.label()} contains no text; give a non-empty validation source.")
        splits = {"train": {"shards": train, "start": 0, "stop": n_train}, "val": {"shards": val, "start": 0, "stop": n_val}}
        val_ident = val_src.identity()
    else:
        # hold out the stream's tail (nanoGPT's shakespeare prepare.py does the same with a 90/10 cut)
        n_val = int(round(n_train * cfg.val_fraction))
        cut = n_train - n_val
        splits = {"train": {"shards": train, "start": 0, "stop": cut}, "val": {"shards": train, "start": cut, "stop": n_train}}
        val_ident = {"val_fraction": cfg.val_fraction, "of": train_src.identity()}
    import tiktoken
    import tokenizers

    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "tokenizer": "tokenizer",
        "tokenizer_sha256": tokenizer_sha256(tok),
        "encoder": f"{engine} {tiktoken.__version__ if engine == 'tiktoken' else tokenizers.__version__}",
        "shard_size_mb": cfg.shard_size_mb,
        "source": train_src.identity(),
        "val_source": val_ident,
        "num_tokens": {"train": splits["train"]["stop"] - splits["train"]["start"],
                       "val": splits["val"]["stop"] - splits["val"]["start"]},
        "splits": splits,
        "seconds": round(seconds, 3),
    }
    if cfg.source is Source.default:
        index["corpus_sha256"] = corpus_sha256(build_corpus())
    write_json_atomic(out / INDEX, index)
    remove_temp_files(out)


# --------------------------------------------------------------------------------------------- reading
def _bin_split(file: Path, dtype: np.dtype, sidecar: dict | None) -> TokenSplit:
    size = file.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(
            f"{file} has {size} bytes, not a whole number of {dtype.name} tokens; is data.vocab_size right "
            f"(uint16 up to 65536, else uint32)?"
        )
    n = size // dtype.itemsize
    if sidecar is not None and sidecar.get("num_tokens", n) != n:
        raise ValueError(f"{file} holds {n} tokens but its sidecar says {sidecar['num_tokens']}; re-run prepare.py.")
    return TokenSplit(file, dtype, 0, n)


def _max_token(split: TokenSplit, chunk: int = 1 << 26) -> int:
    mm = np.memmap(split.file, dtype=split.dtype, mode="r")
    best = -1
    for i in range(split.start, split.stop, chunk):
        best = max(best, int(mm[i : min(i + chunk, split.stop)].max()))
    return best


def _vocab_for(cfg: DataConfig, root: Path, vocab: int, own: bool) -> int:
    want = None if own else cfg.vocab_size
    if want is not None and want < vocab:
        raise ValueError(
            f"data.vocab_size={want} is smaller than the vocabulary of the tokens in {root} ({vocab}); "
            f"set data.vocab_size={vocab} or larger (or null)."
        )
    return want or vocab


def _read_index(cfg: DataConfig, root: Path, own: bool) -> TokenData:
    """A sharded folder: every shard memmapped where it lies (no concatenation), sizes checked against the index."""
    try:
        index = json.loads((root / INDEX).read_text())
        fmt, version = index.get("format"), index.get("version")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{root / INDEX} is not a token index (unreadable JSON); re-run prepare.py.") from None
    if fmt != FORMAT or version != FORMAT_VERSION:
        raise ValueError(
            f"{root / INDEX} is {fmt!r} version {version!r}, not {FORMAT} version {FORMAT_VERSION}; re-run prepare.py."
        )
    dtype = np.dtype(index["dtype"])
    vocab = _vocab_for(cfg, root, int(index["vocab_size"]), own)

    def split(name: str) -> TokenSplit | None:
        spec = index["splits"].get(name)
        if spec is None:
            return None
        shards = []
        for rel, n in spec["shards"]:
            f = root / rel
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} is missing from the token folder {root}; delete {root / INDEX} and re-run prepare.py "
                    f"(it encodes only the missing shards)."
                )
            if f.stat().st_size != n * dtype.itemsize:
                raise ValueError(
                    f"{f} has {f.stat().st_size} bytes, but the index says {n} {dtype.name} tokens; delete it and "
                    f"{root / INDEX}, then re-run prepare.py (it encodes only the missing shards)."
                )
            shards.append((f, int(n)))
        if not shards:
            return None
        return TokenSplit(shards[0][0], dtype, int(spec["start"]), int(spec["stop"]), tuple(shards))

    tok_dir = root / index["tokenizer"] if index.get("tokenizer") and (root / index["tokenizer"]).is_dir() else None
    return TokenData(root, split("train"), split("val"), vocab, tok_dir, index.get("eos_token_id"))


def read_token_dir(cfg: DataConfig, root: Path | None = None) -> TokenData:
    """Open a token folder: ours (sharded index.json, or flat with sidecars) or nanoGPT's (train.bin [+ val.bin],
    uint16, `data.vocab_size` given). Raises FileNotFoundError / ValueError with one sentence naming the fix."""
    own = root is not None  # a folder prepare_tokens wrote: trust the sidecars' vocabulary
    root = Path(root or Path(cfg.path).expanduser())
    if not root.is_dir():
        if root.is_file() and root.suffix == ".bin":
            raise FileNotFoundError(f"data.path={root} is a file; point data.path at the folder holding train.bin.")
        raise FileNotFoundError(f"data.path={root} does not exist; point it at a folder with train.bin (and val.bin).")
    if (root / INDEX).exists():
        return _read_index(cfg, root, own)
    train_bin = root / "train.bin"
    if not train_bin.exists():
        raise FileNotFoundError(
            f"data.path={root} has no train.bin; point it at the folder prepare.py printed or a nanoGPT data folder."
        )
    meta = json.loads((root / "train.json").read_text()) if (root / "train.json").exists() else None
    val_meta = json.loads((root / "val.json").read_text()) if (root / "val.json").exists() else None
    want = None if own else cfg.vocab_size
    if meta is not None:
        dtype = np.dtype(meta["dtype"])
        vocab = _vocab_for(cfg, root, int(meta["vocab_size"]), own)
    else:
        if want is None:
            raise ValueError(
                f"{train_bin} has no train.json sidecar, so its vocabulary is unknown; pass data.vocab_size=<V> "
                f"(50304 or 50257 for GPT-2 tokens)."
            )
        vocab = want
        dtype = token_dtype(vocab)
    train = _bin_split(train_bin, dtype, meta)
    if train.num_tokens == 0:
        raise ValueError(f"{train_bin} is empty; re-run prepare.py or give a folder with tokens.")
    val_bin = root / "val.bin"
    val = _bin_split(val_bin, dtype, val_meta) if val_bin.exists() else None
    if val is None and cfg.val_fraction > 0:
        n_val = int(round(train.num_tokens * cfg.val_fraction))
        val = TokenSplit(train_bin, dtype, train.stop - n_val, train.stop)
        train = TokenSplit(train_bin, dtype, 0, train.stop - n_val)
    if meta is None:  # nobody vouches for the ids: check they fit the vocabulary the model will get
        found = max(_max_token(s) for s in (train, val) if s is not None and s.num_tokens)
        if found >= vocab:
            raise ValueError(
                f"{root} holds token id {found} but data.vocab_size={vocab}; set data.vocab_size={found + 1} or larger."
            )
    tok_dir = None
    if meta is not None and meta.get("tokenizer") and (root / meta["tokenizer"]).is_dir():
        tok_dir = root / meta["tokenizer"]
    elif (root / "tokenizer").is_dir():
        tok_dir = root / "tokenizer"
    eos = meta.get("eos_token_id") if meta else None
    return TokenData(root, train, val, vocab, tok_dir, eos)
