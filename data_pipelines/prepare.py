"""Tokenize + pack a data source ahead of a (cluster) job:

    python data_pipelines/prepare.py data=<default|text|jsonl|csv|parquet|hub|tokens> [data.num_proc=N] [data.key=value ...]

Writes a sharded token folder (index.json + shards/*.bin + tokenizer/, see data_pipelines/shards.py) with
`data.num_proc` processes, prints where and its token counts; a training job then finds it in the cache by itself,
or reads it anywhere with `data=tokens data.path=<folder>`. Killed and run again, it encodes only the missing
shards. `num_tasks=K task_index=i` runs one task of a multi-node preparation (launch/slurm.py --prepare --array K).
Also importable: `prepare(cfg: DataConfig) -> Path`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from data_pipelines.cli import run_hydra
from data_pipelines.config import DataConfig, PrepareConfig, Source, register_configs, to_data_config, to_dataclass


def prepare(cfg: DataConfig, task_index: int = 0, num_tasks: int = 1, verbose: bool = False) -> Path:
    """Tokenize + cache `cfg`'s source (no-op when already cached); returns the token folder.

    With num_tasks > 1 only this task's share of the shards is encoded and no index is written (see
    `cache.prepare_tokens`); the folder is complete after a final call with num_tasks=1.
    """
    from data_pipelines.cache import prepare_tokens

    return prepare_tokens(to_data_config(cfg), create=True, verbose=verbose, task_index=task_index, num_tasks=num_tasks)


def summarize(cfg: DataConfig, root: Path) -> str:
    from data_pipelines.cache import read_token_dir

    data = read_token_dir(cfg, None if cfg.source is Source.tokens else root)
    n_val = data.val.num_tokens if data.val is not None else 0
    verb = "read from" if cfg.source is Source.tokens else "written to"  # source=tokens only validates the folder
    files = f"{len(data.train.shards)} shards" if data.train.shards else data.train.file.name
    lines = [
        f"tokens {verb} {root}",
        f"  train: {data.train.num_tokens:,} tokens ({files}, {data.train.dtype.name}), "
        f"{data.train.num_tokens // cfg.block_size:,} blocks of {cfg.block_size}",
        f"  val:   {n_val:,} tokens",
        f"  vocab_size: {data.vocab_size}   tokenizer: {data.tokenizer_dir or cfg.tokenizer or 'none'}",
        f"  train with: data=tokens data.path={root}",
    ]
    return "\n".join(lines)


def _run(node: DictConfig) -> None:
    try:
        pcfg = to_dataclass(PrepareConfig, node, "prepare config")
        cfg = to_data_config(pcfg.data)
        t0 = time.perf_counter()
        root = prepare(cfg, pcfg.task_index, pcfg.num_tasks, verbose=True)
        if pcfg.num_tasks > 1:
            print(f"task {pcfg.task_index} of {pcfg.num_tasks} done: its shards are in {root}; a final run with "
                  f"num_tasks=1 writes the index")
        else:
            print(summarize(cfg, root))
        print(f"  took {time.perf_counter() - t0:.1f} s")
    except (ValueError, OSError, OmegaConfBaseException) as e:  # bad input: one sentence, non-zero exit, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    register_configs()
    run_hydra(hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")(_run))


if __name__ == "__main__":
    main()

__all__ = ["prepare", "main", "summarize"]
