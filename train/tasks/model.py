"""Building the network: a fresh GPT-2 from the model / attention / stability groups, or the weights of
`model.init_from` (an HF folder, one of our checkpoints, or a run dir), and loading our checkpoints back.

The model is built here and handed to the LightningModule (train/module.py), which only trains it
(lightning-hydra-template: "the LightningModule wraps a plain nn.Module").
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import gpt2
from gpt2 import GPT2Config

from train.checkpoint.layout import (
    WEIGHTS_NAME,
    CheckpointError,
    init_source,
    is_hf_folder,
    load_model_config_dict,
    read_meta,
    resolve_checkpoint,
)
from train.config import AttentionConfig, ConfigError, ModelConfig, StabilityConfig
from train.checkpoint.weights import load_weights  # not checkpoint.io: loading a model must not import Lightning

# The head classes gpt2 exports, by name: a checkpoint's meta.json "task" names the one it holds.
HEAD_MODELS: dict[str, type] = {
    name: obj for name in gpt2.__all__
    if isinstance(obj := getattr(gpt2, name), type) and issubclass(obj, gpt2.GPT2PreTrainedModel)
    and obj not in (gpt2.GPT2PreTrainedModel, gpt2.GPT2Model)
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
        layer_norm_epsilon=model_cfg.layer_norm_epsilon,
        initializer_range=model_cfg.initializer_range,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        bos_token_id=eos_token_id,  # GPT-2 uses <|endoftext|> as both (HF config)
        eos_token_id=eos_token_id,
        **runtime_overrides(model_cfg, attention_cfg, stability_cfg),
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
        loss_chunk_size=model_cfg.loss_chunk_size,
    )


def check_vocab(model: nn.Module, vocab_size: int, init_from: str) -> None:
    """Refuse a tokenizer with more tokens than the loaded weights have embeddings (its ids would be out of range)."""
    if model.config.vocab_size < vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but model.init_from={init_from} has only "
            f"{model.config.vocab_size} embeddings; use the tokenizer that came with that model (data.tokenizer=null)."
        )


def build_model(
    cls: type,
    model_cfg: ModelConfig,
    attention_cfg: AttentionConfig,
    stability_cfg: StabilityConfig,
    vocab_size: int,
    eos_token_id: Optional[int],
) -> nn.Module:
    """A fresh `cls` (a gpt2 model class), or the weights of `model.init_from` (an HF folder, one of our checkpoints,
    or a run dir) loaded strictly. Raises FileNotFoundError / ConfigError / CheckpointError naming the fix."""
    if model_cfg.init_from is None:
        return cls(build_model_config(model_cfg, attention_cfg, stability_cfg, vocab_size, eos_token_id))
    src = init_source(model_cfg.init_from, model_cfg.revision)
    overrides = runtime_overrides(model_cfg, attention_cfg, stability_cfg)
    if is_hf_folder(src):
        model = cls.from_pretrained(str(src), dtype=torch.float32, **overrides)
    else:
        model = load_checkpoint_model(resolve_checkpoint(src), cls, **overrides)
    model.train()  # from_pretrained returns eval mode (HF convention); training needs dropout back on
    check_vocab(model, vocab_size, model_cfg.init_from)
    return model


def _source_weights(src: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config dict, state dict under OUR key names, description) of an HF folder or one of our checkpoints."""
    if is_hf_folder(src):
        from gpt2 import hf_io

        folder = hf_io.resolve_model_dir(str(src))
        config = GPT2Config.from_pretrained(folder).to_dict()
        sd, _ = hf_io.convert_hf_state_dict(hf_io.read_weights(hf_io.weight_files(folder)), with_trunk_prefix=True)
        return config, sd, f"HF folder {src}"
    step = resolve_checkpoint(src)
    return load_model_config_dict(step), load_weights(step / WEIGHTS_NAME), f"checkpoint {step}"


def build_head_model(
    cls: type,
    model_cfg: ModelConfig,
    attention_cfg: AttentionConfig,
    stability_cfg: StabilityConfig,
    vocab_size: int,
    eos_token_id: Optional[int],
    head: dict[str, Any],
) -> tuple[nn.Module, dict[str, Any]]:
    """A fine-tuning head model `cls` and a report {"source", "new": [...], "reinitialized": [...]}.

    head: the GPT2Config fields of the head, from the data (num_labels, id2label, label2id, problem_type,
    pad_token_id). With model.init_from every tensor whose name and shape match is loaded (the trunk; a head of the
    same shape too, so a fine-tuned model can be fine-tuned further); the rest keeps its fresh GPT-2 init and is
    reported: "new" (the source lacks it, e.g. an LM's trunk into a classifier) or "reinitialized" ("<name> <old
    shape> -> <new shape>": another label count). Raises ConfigError when the source holds no GPT-2 trunk.
    """
    head = {k: v for k, v in head.items() if v is not None or k == "problem_type"}
    if model_cfg.init_from is None:
        config = build_model_config(model_cfg, attention_cfg, stability_cfg, vocab_size, eos_token_id)
        model = cls(GPT2Config.from_dict(config.to_dict(), **head))
        return model, {"source": None, "new": sorted(model.state_dict()), "reinitialized": []}
    saved, sd, where = _source_weights(init_source(model_cfg.init_from, model_cfg.revision))
    config = GPT2Config.from_dict(saved, **runtime_overrides(model_cfg, attention_cfg, stability_cfg), **head)
    model = cls(config)  # every tensor initialised (GPT-2 init); the matching ones are overwritten below
    target = model.state_dict()
    tied = "lm_head.weight" if config.tie_word_embeddings else None
    load, reinit = {}, []
    for k, t in sd.items():
        if k not in target:
            continue  # another head's weights (an LM checkpoint's lm_head into a classifier)
        if tuple(t.shape) != tuple(target[k].shape):
            reinit.append(f"{k} {tuple(t.shape)} -> {tuple(target[k].shape)}")
        else:
            load[k] = t
    model.load_state_dict(load, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    new = sorted(k for k in target if k not in load and k != tied and not any(r.startswith(k + " ") for r in reinit))
    if not any(k.startswith("transformer.") for k in load):
        raise ConfigError(
            f"model.init_from={model_cfg.init_from} ({where}) holds no GPT-2 trunk weights; point it to a GPT-2 HF "
            f"folder, one of our checkpoints or a run dir."
        )
    model.train()
    check_vocab(model, vocab_size, model_cfg.init_from)
    return model, {"source": where, "new": new, "reinitialized": reinit}


def load_checkpoint_model(step_path: Path, cls: Optional[type] = None, **overrides) -> nn.Module:
    """The model stored in one of our checkpoints (`checkpoints/step-N`), weights loaded strictly.

    `cls=None` builds the class the checkpoint records (meta.json "task": GPT2LMHeadModel, a head class, ...).
    """
    if cls is None:
        saved = read_meta(Path(step_path)).get("task") or "GPT2LMHeadModel"
        if saved not in HEAD_MODELS:
            raise CheckpointError(f"{step_path} holds a {saved}, which is not one of {sorted(HEAD_MODELS)}.")
        cls = HEAD_MODELS[saved]
    peft_meta = read_meta(Path(step_path)).get("peft")
    if peft_meta:  # a LoRA checkpoint: its base model with these adapters, merged
        return load_lora_checkpoint(Path(step_path), cls, peft_meta, **overrides)
    config = GPT2Config.from_dict(load_model_config_dict(step_path), **overrides)
    model = cls(config)
    sd = load_weights(Path(step_path) / WEIGHTS_NAME)
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


def load_lora_checkpoint(step_path: Path, cls: type, peft_meta: dict[str, Any], **overrides) -> nn.Module:
    """The merged model of a LoRA run's checkpoint (train/adapters/lora.py): the base its meta.json names (an HF folder,
    one of our checkpoints or a hub id), the same adapters injected, the checkpoint's adapter and head weights
    loaded, merged.
    Raises CheckpointError when the base is gone or the checkpoint lacks an adapter weight."""
    from types import SimpleNamespace

    from train.adapters import lora

    base = peft_meta.get("base_model")
    src = lora.base_folder(base, peft_meta.get("base_revision"), label=f"the base model {base} of {step_path}")
    if src is None:
        raise CheckpointError(f"{step_path} holds LoRA adapters of base model {base!r}, which does not exist here; "
                              f"use the run's merged hf/ folder, or put the base back at that path.")
    with warnings.catch_warnings():  # the head is not in the base: it comes from this checkpoint, checked below
        warnings.filterwarnings("ignore", message=".*newly initialized")
        if is_hf_folder(src):
            model = cls.from_pretrained(str(src), dtype=torch.float32, **overrides)
        else:
            model = load_checkpoint_model(resolve_checkpoint(src), cls, **overrides)
    settings = SimpleNamespace(method="lora", r=peft_meta["r"], alpha=peft_meta["alpha"], dropout=0.0,
                               target_modules=peft_meta["target_modules"])
    model = lora.wrap(model, settings)
    sd = load_weights(step_path / WEIGHTS_NAME)
    missing = sorted(lora.trainable_names(model) - set(sd))
    if missing:
        raise CheckpointError(f"{step_path} lacks {len(missing)} adapter/head weight(s) ({missing[0]}, ...); it was "
                              f"written by another model.")
    model.load_state_dict(sd, strict=False)
    return lora.merged_model(model).eval()


__all__ = [
    "HEAD_MODELS",
    "build_head_model",
    "build_model",
    "build_model_config",
    "check_vocab",
    "load_checkpoint_model",
    "load_lora_checkpoint",
    "runtime_overrides",
]
