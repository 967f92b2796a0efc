"""Tokenizer (trained once and cached, or loaded) and the in-process document -> flat token stream encoder.

The encoder is `fast_bpe.DocumentEncoder` (tiktoken with provably identical ids, else tokenizers); Python touches
each *document* once and each *token* only in C (`encode_to_numpy`, `np.concatenate`, `ndarray.tofile`). A long
document is cut into ~`CHUNK_CHARS` pieces where the GPT-2 pre-tokenizer splits anyway (`sources.split_document`),
which gives exactly the ids of encoding it whole. The sharded, multi-process preparation is in shards.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gpt2.hub import is_hub_id
from gpt2.tokenizer import GPT2TokenizerFast, train_tokenizer

from data_pipelines.config import DataConfig
from data_pipelines.files import atomic_dir, publish_dir, sha256_json, token_dtype  # noqa: F401 (re-exported)
from data_pipelines.fast_bpe import DocumentEncoder, encode_stream
from data_pipelines.sources import SAFE_CUT, DocumentSource, iter_texts, split_document  # noqa: F401 (re-exported)

TOKENIZER_RECIPE = {"kind": "byte-level-bpe", "min_frequency": 2, "version": 1}
CHUNK_CHARS = 1 << 16  # split documents longer than this for parallel encoding
ENCODE_BATCH_CHARS = 1 << 23  # ~8 MB of text per encode_batch call: all threads busy, bounded memory

def tokenizer_sha256(tok: GPT2TokenizerFast) -> str:
    """Identity of a tokenizer: the hash of its tokenizer.json (vocab, merges, pre-tokenizer, special tokens)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


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
        if not Path(cfg.tokenizer).expanduser().exists() and not is_hub_id(cfg.tokenizer):
            raise FileNotFoundError(
                f"data.tokenizer={cfg.tokenizer} does not exist; give a folder with tokenizer.json "
                f"(or vocab.json + merges.txt), a hub id, or null to train one."
            )
        # a tokenizer folder, else a hub id (a folder without tokenizer files, e.g. the package gpt2/, is no tokenizer)
        return GPT2TokenizerFast.from_pretrained(cfg.tokenizer)
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
def is_gpt2_pre_tokenizer(backend) -> bool:
    """True when the pre-tokenizer is byte-level with GPT-2's regex and no normalizer rewrites the text: then a
    document may be cut at `SAFE_CUT` points and encoded piece by piece with the same ids."""
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)  # a prefix space would be added to every piece
    )


def encode_documents(
    tok: GPT2TokenizerFast, batches: Iterable[list[str]], chunk_chars: int = CHUNK_CHARS
) -> Iterator[np.ndarray]:
    """Yield flat token arrays: each document's ids followed by eos, in document order.

    Encoded by `fast_bpe.DocumentEncoder` (tiktoken when it gives provably the same ids, else tokenizers); a
    special-token string inside a document is plain text. Work is flushed every ~ENCODE_BATCH_CHARS characters of
    pieces, so memory stays bounded even for one huge document.
    """
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; documents are joined with <|endoftext|>, so add one.")
    backend = tok.backend_tokenizer
    if not is_gpt2_pre_tokenizer(backend):
        chunk_chars = 1 << 62  # the safe-cut argument holds for GPT-2's regex only: never split other tokenizers' docs

    def pieces() -> Iterator[tuple[str, bool]]:
        for batch in batches:
            for doc in batch:
                parts = split_document(doc, chunk_chars)
                for j, part in enumerate(parts):
                    yield part, j == len(parts) - 1

    encoder = DocumentEncoder(backend)
    yield from encode_stream(encoder, pieces(), eos, token_dtype(len(tok)), ENCODE_BATCH_CHARS)


def encode_to_file(tok: GPT2TokenizerFast, batches: Iterable[list[str]], path: Path) -> int:
    """Stream the encoded documents into a flat binary file; returns the number of tokens written."""
    n = 0
    with open(path, "wb") as f:
        for arr in encode_documents(tok, batches):
            arr.tofile(f)
            n += arr.size
    return n
