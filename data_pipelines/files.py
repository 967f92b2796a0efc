"""Small file helpers shared by the tokenizer cache and the token shards: atomic publishing, token dtype, hashing.

No heavy imports: the preparation worker processes import this (and not `gpt2`, which pulls in torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np


def sha256_json(obj) -> str:
    """Hex sha256 of `obj` as canonical JSON (sorted keys): the cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


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


def temp_path(final: Path) -> Path:
    """A unique hidden temp name next to `final` (same directory, so `os.replace` onto `final` is atomic)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write `obj` as JSON to a temp file next to `path`, then rename it over `path`: readers never see half a file."""
    tmp = temp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
