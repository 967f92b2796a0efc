"""LM pre-training data: sources -> (cached) byte-level BPE -> token shards -> packed, resumable batches.

Imports only `gpt2` of ours. Public API: DataConfig, LMDataModule, prepare_tokens (tokenize + cache ahead of a job,
sharded over `data.num_proc` processes and resumable; the CLI is data_pipelines/prepare.py with `prepare(cfg) -> Path`;
the encoder is fast_bpe.DocumentEncoder: tiktoken with provably identical ids, else tokenizers),
build_corpus (the embedded default corpus), ResumableBatchSampler, PackedBlocks.
"""

from data_pipelines.config import SOURCES, DataConfig, Source, register_configs, to_data_config

__all__ = [
    "SOURCES", "DataConfig", "Source", "register_configs", "to_data_config",
    "LMDataModule", "prepare_tokens", "build_corpus", "ResumableBatchSampler", "PackedBlocks", "read_token_dir",
]


def __getattr__(name):  # lazy: `import data_pipelines` stays light (no torch/lightning/datasets until used)
    if name == "LMDataModule":
        from data_pipelines.datamodule import LMDataModule

        return LMDataModule
    if name == "prepare_tokens":
        from data_pipelines.cache import prepare_tokens

        return prepare_tokens
    if name == "build_corpus":
        from data_pipelines.corpus import build_corpus

        return build_corpus
    if name in ("ResumableBatchSampler", "PackedBlocks"):
        from data_pipelines import sampler

        return getattr(sampler, name)
    if name == "read_token_dir":
        from data_pipelines.cache import read_token_dir

        return read_token_dir
    raise AttributeError(f"module 'data_pipelines' has no attribute {name!r}")
