"""Building the network: a fresh GPT-2 from the model / attention / stability groups, or the weights of
`model.init_from` (an HF folder, one of our checkpoints, or a run dir), and loading our checkpoints back.

The model is built here and handed to the LightningModule (train/module.py), which only trains it
(lightning-hydra-template: "the LightningModule wraps a plain nn.Module").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import gpt2
from gpt2 import GPT2Config

from train.checkpoint import (
    CheckpointError,
    load_model_config_dict,
    load_weights,
    read_meta,
    resolve_checkpoint,
    tokenizer_dir_for,
)
from train.config import AttentionConfig, ConfigError, ModelConfig, StabilityConfig, TaskConfig

TASK_MODELS: dict[str, type] = {
    "lm": gpt2.GPT2LMHeadModel,
    "cls": gpt2.GPT2ForSequenceClassification,
    "token_cls": gpt2.GPT2ForTokenClassification,
    "qa": gpt2.GPT2ForQuestionAnswering,
    "mc": gpt2.GPT2DoubleHeadsModel,
}


# ------------------------------------------------------------------------------------------------ model building
def build_model_config(
    model_cfg: ModelConfig,
    attention_cfg: AttentionConfig,
    stability_cfg: StabilityConfig,
    vocab_size: int,
    eos_token_id: Optional[int],
) -> GPT2Config:
    """GPT2Config from the model/attention/stability groups and the tokenizer (its size and <|endoftext|> id)."""
    if model_cfg.vocab_size is not None and model_cfg.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            f"set model.vocab_size=null (use the tokenizer's size) or >= {vocab_size}."
        )
    return GPT2Config(
        vocab_size=model_cfg.vocab_size or vocab_size,
        n_positions=model_cfg.n_positions,
        n_embd=model_cfg.n_embd,
        n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head,
        n_inner=model_cfg.n_inner,
        activation_function=model_cfg.activation_function,
        resid_pdrop=model_cfg.dropout,
        embd_pdrop=model_cfg.dropout,
        attn_pdrop=model_cfg.dropout,
        layer_norm_epsilon=model_cfg.layer_norm_epsilon,
        initializer_range=model_cfg.initializer_range,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        bos_token_id=eos_token_id,  # GPT-2 uses <|endoftext|> as both (HF config)
        eos_token_id=eos_token_id,
        scale_attn_by_inverse_layer_idx=stability_cfg.scale_attn_by_inverse_layer_idx,
        reorder_and_upcast_attn=stability_cfg.reorder_and_upcast_attn,
        attn_implementation=attention_cfg.implementation,
    )


def runtime_overrides(model_cfg, attention_cfg, stability_cfg) -> dict[str, Any]:
    """Config fields a run may change on pretrained weights: they own no parameters."""
    return dict(
        attn_implementation=attention_cfg.implementation,
        resid_pdrop=model_cfg.dropout,
        embd_pdrop=model_cfg.dropout,
        attn_pdrop=model_cfg.dropout,
        scale_attn_by_inverse_layer_idx=stability_cfg.scale_attn_by_inverse_layer_idx,
        reorder_and_upcast_attn=stability_cfg.reorder_and_upcast_attn,
    )


def build_model(
    task_cfg: TaskConfig,
    model_cfg: ModelConfig,
    attention_cfg: AttentionConfig,
    stability_cfg: StabilityConfig,
    vocab_size: int,
    eos_token_id: Optional[int],
) -> nn.Module:
    """A fresh model, or the weights of `model.init_from` (an HF folder, one of our checkpoints, or a run dir)."""
    cls = TASK_MODELS[task_cfg.name]
    if model_cfg.init_from is None:
        return cls(build_model_config(model_cfg, attention_cfg, stability_cfg, vocab_size, eos_token_id))
    src = Path(model_cfg.init_from).expanduser()
    overrides = runtime_overrides(model_cfg, attention_cfg, stability_cfg)
    if (src / "config.json").is_file() and not (src / "meta.json").is_file():  # an HF folder
        model = cls.from_pretrained(str(src), dtype=torch.float32, **overrides)
    elif src.exists():
        model = load_checkpoint_model(resolve_checkpoint(src), cls, **overrides)
    else:
        raise FileNotFoundError(
            f"model.init_from={model_cfg.init_from} does not exist; give an HF folder, a checkpoint or a run dir."
        )
    model.train()  # from_pretrained returns eval mode (HF convention); training needs dropout back on
    if model.config.vocab_size < vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but model.init_from={model_cfg.init_from} has only "
            f"{model.config.vocab_size} embeddings; use the tokenizer that came with that model (data.tokenizer=null)."
        )
    return model


def load_checkpoint_model(step_path: Path, cls: Optional[type] = None, **overrides) -> nn.Module:
    """The model stored in one of our checkpoints (`checkpoints/step-N`), weights loaded strictly.

    `cls=None` builds the class the checkpoint records (meta.json "task": GPT2LMHeadModel, a head class, ...).
    """
    if cls is None:
        saved = read_meta(Path(step_path)).get("task") or "GPT2LMHeadModel"
        by_name = {c.__name__: c for c in TASK_MODELS.values()}
        if saved not in by_name:
            raise CheckpointError(f"{step_path} holds a {saved}, which is not one of {sorted(by_name)}.")
        cls = by_name[saved]
    config = GPT2Config.from_dict(load_model_config_dict(step_path), **overrides)
    model = cls(config)
    sd = load_weights(Path(step_path) / "model.safetensors")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise CheckpointError(
            f"{step_path} does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            f"it was written by another model."
        )
    if config.tie_word_embeddings and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def tokenizer_source(tokenizer: Optional[str], init_from: Optional[str], resume_from: Optional[Path]) -> Optional[str]:
    """The tokenizer a run uses: `data.tokenizer` when set, else the one that came with `model.init_from` (an HF
    folder's own tokenizer files, or a checkpoint's / run dir's tokenizer/ folder): a fine-tune must keep it, since
    its ids index the embedding table of those weights. None: train (or reuse the cached) BPE on the data source.
    """
    if tokenizer:
        return tokenizer
    # A resumed run keeps data.tokenizer as it was: the BPE trained on the source is cached (and deterministic), so
    # the cached token files are reused; a changed vocabulary is caught by checkpoint.check_compatible.
    if init_from and resume_from is None:
        src = Path(init_from).expanduser()
        if (src / "tokenizer.json").is_file() or (src / "vocab.json").is_file():
            return str(src)
        if src.exists():
            d = tokenizer_dir_for(resolve_checkpoint(src))
            return str(d) if d else None
    return None


__all__ = [
    "TASK_MODELS",
    "build_model",
    "build_model_config",
    "load_checkpoint_model",
    "runtime_overrides",
    "tokenizer_source",
]
