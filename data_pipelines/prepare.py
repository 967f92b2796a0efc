"""Tokenize + pack a data source ahead of a (cluster) job:

    python data_pipelines/prepare.py data=<default|text|jsonl|csv|parquet|hub|tokens> [data.key=value ...]

Prints the token folder (train.bin/val.bin + sidecars + tokenizer/) and its token counts; a training job then finds
it in the cache by itself, or reads it anywhere with `data=tokens data.path=<folder>`. Also importable:
`prepare(cfg: DataConfig) -> Path`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from data_pipelines.cache import prepare_tokens, read_token_dir
from data_pipelines.config import DataConfig, Source, register_configs, to_data_config


def prepare(cfg: DataConfig) -> Path:
    """Tokenize + cache `cfg`'s source (no-op when already cached); returns the token folder."""
    return prepare_tokens(to_data_config(cfg), create=True)


def summarize(cfg: DataConfig, root: Path) -> str:
    data = read_token_dir(cfg, None if cfg.source is Source.tokens else root)
    n_val = data.val.num_tokens if data.val is not None else 0
    verb = "read from" if cfg.source is Source.tokens else "written to"  # source=tokens only validates the folder
    lines = [
        f"tokens {verb} {root}",
        f"  train: {data.train.num_tokens:,} tokens ({data.train.file.name}, {data.train.dtype.name}), "
        f"{data.train.num_tokens // cfg.block_size:,} blocks of {cfg.block_size}",
        f"  val:   {n_val:,} tokens",
        f"  vocab_size: {data.vocab_size}   tokenizer: {data.tokenizer_dir or cfg.tokenizer or 'none'}",
        f"  train with: data=tokens data.path={root}",
    ]
    return "\n".join(lines)


def _run(node: DictConfig) -> None:
    try:
        cfg = to_data_config(node.data)
        t0 = time.perf_counter()
        root = prepare(cfg)
        print(summarize(cfg, root))
        print(f"  took {time.perf_counter() - t0:.1f} s")
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as e:  # bad input: one clear sentence, non-zero exit, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    register_configs()
    hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")(_run)()


if __name__ == "__main__":
    main()

__all__ = ["prepare", "main", "summarize"]
