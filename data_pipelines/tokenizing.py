"""Tokenizer (trained once and cached, or loaded) and the batched, parallel document -> flat token stream encoder.

Speed: the `tokenizers` backend's `encode_batch_fast` runs the BPE on all cores in Rust and skips offset bookkeeping;
we feed it thousands of documents at a time, so Python touches each *document* once and each *token* only in C
(`list.extend`, `np.array`, `ndarray.tofile`). A single huge document (a 50 MB text file) is first cut into
~`CHUNK_CHARS` pieces at boundaries where the GPT-2 pre-tokenizer splits anyway (see `split_document`), so it is
encoded in parallel too and gives exactly the ids of encoding it whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gpt2.tokenizer import GPT2TokenizerFast, train_tokenizer

from data_pipelines.config import DataConfig
from data_pipelines.sources import DocumentSource, iter_texts

TOKENIZER_RECIPE = {"kind": "byte-level-bpe", "min_frequency": 2, "version": 1}
CHUNK_CHARS = 1 << 16  # split documents longer than this for parallel encoding
ENCODE_BATCH_CHARS = 1 << 23  # ~8 MB of text per encode_batch call: all threads busy, bounded memory

# A cut right after a lone "\n" that sits between two non-space characters: GPT-2's pre-tokenizer regex
# ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) always ends a pre-token there — no pattern joins
# "\n" to a neighbour — and BPE merges never cross pre-tokens, so encoding the pieces gives the same ids.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_sha256(tok: GPT2TokenizerFast) -> str:
    """Identity of a tokenizer: the hash of its tokenizer.json (vocab, merges, pre-tokenizer, special tokens)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536, GPT-2's 50257 included), else uint32 (nanoGPT's choice)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def atomic_dir(final: Path) -> Path:
    """A fresh temp dir next to `final`; publish it with `publish_dir`. A killed run leaves only a `.tmp-*` dir."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)  # atomic on POSIX; fails if `final` is a non-empty dir
    except OSError:
        if final.exists():  # another process published the same content first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


# --------------------------------------------------------------------------------------------- tokenizer
def tokenizer_cache_dir(cfg: DataConfig, source: DocumentSource) -> Path:
    key = sha256_json(
        {
            "source": source.identity(),
            "vocab_size": cfg.vocab_size,
            "max_chars": cfg.tokenizer_max_chars,
            "recipe": TOKENIZER_RECIPE,
        }
    )[:16]
    return cfg.cache_root / "tokenizers" / f"{source.kind}-v{cfg.vocab_size}-{key}"


def get_tokenizer(cfg: DataConfig, source: DocumentSource, create: bool = True) -> GPT2TokenizerFast:
    """cfg.tokenizer if given; else the byte-level BPE trained on `source` (trained on first use, then cached).

    With create=False a missing cached tokenizer raises FileNotFoundError (used by ranks that must not train).
    """
    if cfg.tokenizer:
        p = Path(cfg.tokenizer).expanduser()
        if p.exists():
            return GPT2TokenizerFast.from_pretrained(str(p))
        if cfg.tokenizer.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", cfg.tokenizer):
            raise FileNotFoundError(
                f"data.tokenizer={cfg.tokenizer} does not exist; give a folder with tokenizer.json "
                f"(or vocab.json + merges.txt), a hub id, or null to train one."
            )
        return GPT2TokenizerFast.from_pretrained(cfg.tokenizer)  # a hub id
    out = tokenizer_cache_dir(cfg, source)
    if (out / "tokenizer.json").exists():
        return GPT2TokenizerFast.from_pretrained(str(out))
    if not create:
        raise FileNotFoundError(f"no cached tokenizer at {out}; run data_pipelines/prepare.py (or rank 0) first.")
    texts = iter_texts(source, cfg.tokenizer_max_chars)
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size, min_frequency=TOKENIZER_RECIPE["min_frequency"])
    if len(tok) < 2:
        raise ValueError(f"{source.label()} contains no text to train a tokenizer on; give a non-empty source.")
    tmp = atomic_dir(out)
    tok.save_pretrained(str(tmp))
    publish_dir(tmp, out)
    return GPT2TokenizerFast.from_pretrained(str(out))


# --------------------------------------------------------------------------------------------- encoding
def split_document(doc: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut a long document at pre-tokenizer boundaries (see `_SAFE_CUT`) into pieces of about `chunk_chars`."""
    if len(doc) <= chunk_chars:
        return [doc]
    pieces, start = [], 0
    while len(doc) - start > chunk_chars:
        m = _SAFE_CUT.search(doc, start + chunk_chars)
        if m is None:
            break
        pieces.append(doc[start : m.start()])
        start = m.start()
    pieces.append(doc[start:])
    return pieces


def _gpt2_pre_tokenizer(backend) -> bool:
    """True when the pre-tokenizer is byte-level with GPT-2's regex and no normalizer rewrites the text."""
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _encode_pieces(backend, pieces: list[str], ends: list[bool], eos: int, dtype: np.dtype) -> np.ndarray:
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    out: list[int] = []
    for enc, last in zip(encode(pieces, add_special_tokens=False), ends):
        out.extend(enc.ids)
        if last:
            out.append(eos)  # nanoGPT / GPT-2: every document ends with <|endoftext|>
    return np.array(out, dtype=dtype)


def encode_documents(
    tok: GPT2TokenizerFast, batches: Iterable[list[str]], chunk_chars: int = CHUNK_CHARS
) -> Iterator[np.ndarray]:
    """Yield flat token arrays: each document's ids followed by eos, in document order.

    Work is flushed every ~ENCODE_BATCH_CHARS characters of *pieces*, so memory stays bounded even for one huge
    document.
    """
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; documents are joined with <|endoftext|>, so add one.")
    dtype = token_dtype(len(tok))
    backend = tok.backend_tokenizer
    if not _gpt2_pre_tokenizer(backend):
        chunk_chars = 1 << 62  # the safe-cut argument holds for GPT-2's regex only: never split other tokenizers' docs
    pieces: list[str] = []
    ends: list[bool] = []  # ends[i]: pieces[i] is the last piece of its document
    chars = 0
    for batch in batches:
        for doc in batch:
            parts = split_document(doc, chunk_chars)
            for j, part in enumerate(parts):
                pieces.append(part)
                ends.append(j == len(parts) - 1)
                chars += len(part)
                if chars >= ENCODE_BATCH_CHARS:
                    yield _encode_pieces(backend, pieces, ends, eos, dtype)
                    pieces, ends, chars = [], [], 0
    if pieces:
        yield _encode_pieces(backend, pieces, ends, eos, dtype)


def encode_to_file(tok: GPT2TokenizerFast, batches: Iterable[list[str]], path: Path) -> int:
    """Stream the encoded documents into a flat binary file; returns the number of tokens written."""
    n = 0
    with open(path, "wb") as f:
        for arr in encode_documents(tok, batches):
            arr.tofile(f)
            n += arr.size
    return n
