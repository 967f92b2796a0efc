"""Token folders: writing (tokenize once, cache atomically) and reading (ours, or nanoGPT's train.bin/val.bin).

A token folder — what `prepare.py` writes and what `data=tokens data.path=<dir>` reads — holds:

    train.bin  train.json     flat token ids (uint16 when the vocabulary fits, else uint32) + JSON sidecar
    val.bin    val.json       the validation stream (optional: else `val_fraction` of train.bin's tail)
    tokenizer/                the tokenizer the ids came from (save_pretrained format)

Sidecar: {"format": "gpt2-forge-tokens", "version", "dtype", "vocab_size", "num_tokens", "eos_token_id",
"tokenizer": "tokenizer" (folder, relative to the sidecar), "tokenizer_sha256", "source", "split"}.

Cache key of a prepared folder: sha256 of (source identity — file paths + sizes + mtimes, hub name/config/split, or the
embedded corpus' Python version —, the validation source or `val_fraction`, `max_documents`, the tokenizer's
tokenizer.json hash, FORMAT_VERSION). `block_size` is *not* in the key: blocks are cut from the flat stream when it is
read, so one cached stream serves every block size. The folder is built under a temp name and renamed into place, so a
killed run never leaves a half-written cache entry.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines.config import DataConfig, Source
from data_pipelines.corpus import build_corpus, corpus_sha256
from data_pipelines.sources import DocumentSource
from data_pipelines.tokenizing import (
    atomic_dir,
    encode_to_file,
    get_tokenizer,
    publish_dir,
    sha256_json,
    token_dtype,
    tokenizer_sha256,
)

FORMAT = "gpt2-forge-tokens"
FORMAT_VERSION = 1


@dataclass
class TokenSplit:
    """A contiguous range [start, stop) of tokens in a flat .bin file."""

    file: Path
    dtype: np.dtype
    start: int
    stop: int

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start


@dataclass
class TokenData:
    """What the datamodule needs to serve batches: the two streams, the vocabulary, the tokenizer folder."""

    root: Path
    train: TokenSplit
    val: TokenSplit | None
    vocab_size: int
    tokenizer_dir: Path | None
    eos_token_id: int | None = None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


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
            "format": [FORMAT, FORMAT_VERSION],
        }
    )[:16]
    return cfg.cache_root / "tokens" / f"{train_src.kind}-{key}", train_src, val_src, tok


def prepare_tokens(cfg: DataConfig, create: bool = True, verbose: bool = False) -> Path:
    """Tokenize + cache the configured source (no-op when cached); returns the token folder.

    source=tokens: validates `cfg.path` and returns it. create=False: never tokenizes, raises FileNotFoundError
    when the cache entry is missing (for ranks that wait on rank 0).
    """
    if cfg.source is Source.tokens:
        read_token_dir(cfg)  # validates (clear errors) without writing anything
        return Path(cfg.path).expanduser()
    out, train_src, val_src, tok = tokens_dir_for(cfg, create=create)
    if (out / "train.json").exists():
        return out
    if not create:
        raise FileNotFoundError(f"no cached tokens at {out}; run data_pipelines/prepare.py (or rank 0) first.")
    t0 = time.perf_counter()
    tmp = atomic_dir(out)
    dtype = token_dtype(len(tok))
    n_train = encode_to_file(tok, train_src.batches(), tmp / "train.bin")
    if n_train == 0:
        raise ValueError(f"{train_src.label()} contains no text (no non-empty documents); give a source with text.")
    if val_src is not None:
        n_val = encode_to_file(tok, val_src.batches(), tmp / "val.bin")
        if n_val == 0:
            raise ValueError(f"{val_src.label()} contains no text; give a non-empty validation source.")
    else:
        # hold out the stream's tail (nanoGPT's shakespeare prepare.py does the same with a 90/10 cut)
        n_val = int(round(n_train * cfg.val_fraction))
        n_train -= n_val
        whole = np.memmap(tmp / "train.bin", dtype=dtype, mode="r")
        np.asarray(whole[n_train:]).tofile(tmp / "val.bin")
        del whole
        os.truncate(tmp / "train.bin", n_train * dtype.itemsize)
    tok.save_pretrained(str(tmp / "tokenizer"))
    common = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "tokenizer": "tokenizer",
        "tokenizer_sha256": tokenizer_sha256(tok),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if cfg.source is Source.default:
        common["corpus_sha256"] = corpus_sha256(build_corpus())
    _write_json(tmp / "train.json", {**common, "num_tokens": n_train, "split": "train", "source": train_src.identity()})
    val_ident = val_src.identity() if val_src else {"val_fraction": cfg.val_fraction, "of": train_src.identity()}
    _write_json(tmp / "val.json", {**common, "num_tokens": n_val, "split": "val", "source": val_ident})
    publish_dir(tmp, out)
    return out


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


def read_token_dir(cfg: DataConfig, root: Path | None = None) -> TokenData:
    """Open a token folder: ours (sidecars) or nanoGPT's (train.bin [+ val.bin], uint16, `data.vocab_size` given)."""
    own = root is not None  # a folder prepare_tokens wrote: trust the sidecars' vocabulary
    root = Path(root or Path(cfg.path).expanduser())
    if not root.is_dir():
        if root.is_file() and root.suffix == ".bin":
            raise FileNotFoundError(f"data.path={root} is a file; point data.path at the folder holding train.bin.")
        raise FileNotFoundError(f"data.path={root} does not exist; point it at a folder with train.bin (and val.bin).")
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
        vocab = int(meta["vocab_size"])
        if want is not None and want < vocab:
            raise ValueError(
                f"data.vocab_size={want} is smaller than the vocabulary of the tokens in {root} ({vocab}); "
                f"set data.vocab_size={vocab} or larger (or null)."
            )
        vocab = want or vocab
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
