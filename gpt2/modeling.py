"""GPT-2 in plain PyTorch: the trunk (GPT2Model), its block, and the Hugging Face head classes.

Reads top to bottom: activations -> attention -> MLP -> block -> outputs -> base class (init, load/save)
-> trunk -> heads -> FLOPs. Parameter names equal transformers' GPT-2 names, except that the four projections are
nn.Linear (out, in) instead of HF's Conv1D (in, out); gpt2/hf_io.py transposes them on load/save.
References: GPT-2 paper (Radford et al. 2019), nanoGPT model.py, transformers models/gpt2/modeling_gpt2.py (5.24).
"""

from __future__ import annotations

import math
import os
import dataclasses
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import generation, hf_io
from .attention import ATTENTION_BACKENDS, WEIGHTS_ATTENTION
from .cache import StaticKVCache
from .config import GPT2Config

# ----------------------------------------------------------------------------------------------------------------
# Activations: every name of transformers' ACT2FN that a GPT-2 config can carry (activations.py).
# gelu_new / gelu_fast / gelu_accurate / gelu_python_tanh are all the tanh approximation
# 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))) written out in Python by HF; F.gelu(approximate="tanh") is the same formula
# in one fused kernel (equal to ~1e-7), which is what makes our MLP cheaper than transformers' on CPU.


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACT2FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_10": lambda x: torch.clamp(F.gelu(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "hardswish": F.hardswish,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "leaky_relu": F.leaky_relu,
    "linear": lambda x: x,
    "mish": F.mish,
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
}

# ----------------------------------------------------------------------------------------------------------------
# The transformer block


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x); during CPU generation the same product against an (in, out) copy of the weight.

    gpt2/generation.py sets `layer.weight_t` (a contiguous (in, out) copy, i.e. HF's Conv1D layout) for the decode
    loop only: at 1-3 rows the CPU GEMV streams that layout faster than nn.Linear's (out, in) (see generation.py).
    It is None otherwise, so training and compiled forwards run plain nn.Linear.
    """
    w_t = layer.__dict__.get("weight_t")  # a plain attribute (not a parameter or buffer): no state_dict entry
    if w_t is None:
        return layer(x)
    return torch.addmm(layer.bias, x.reshape(-1, x.size(-1)), w_t).view(*x.shape[:-1], w_t.size(1))




class GPT2Attention(nn.Module):
    """Causal self-attention. Owns the projections; the attention maths is a backend function (gpt2/attention.py)."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head, self.n_embd, self.layer_idx = config.n_head, config.n_embd, layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v: one matmul instead of three
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.attn_implementation = config.attn_implementation
        self.upcast = config.reorder_and_upcast_attn
        # Both GPT-2 scalings fold into one number, so every backend honours them through its `scale`:
        # 1/sqrt(head_dim) (Attention Is All You Need) and Mistral's 1/(layer_idx+1) (scale_attn_by_inverse_layer_idx).
        scale = config.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale

    def forward(self, x, mask=None, is_causal=False, layer_past=None, use_cache=False, output_attentions=False):
        B, T, C = x.size()
        q, k, v = _linear(self.c_attn, x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if isinstance(layer_past, StaticKVCache):
            k, v = layer_past.update(self.layer_idx, k, v)  # written in place; views (B, nh, T_past + T, hs)
        elif layer_past is not None:
            past_k, past_v = layer_past
            k = torch.cat((past_k, k), dim=-2)  # (B, nh, T_past + T, hs)
            v = torch.cat((past_v, v), dim=-2)
        present = (k, v) if use_cache else None
        # Attention probabilities exist only on the eager path; asking for them switches this call to eager (like HF).
        backend = ATTENTION_BACKENDS[WEIGHTS_ATTENTION if output_attentions else self.attn_implementation].fn
        y, att = backend(q, k, v, mask=mask, is_causal=is_causal, scale=self.scale,
                         dropout_p=self.attn_pdrop if self.training else 0.0, upcast=self.upcast)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh, hs) -> (B, T, C): re-assemble the heads
        y = self.resid_dropout(_linear(self.c_proj, y))
        return y, present, att


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.act = ACT2FN[config.activation_function]
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        h = self.act(_linear(self.c_fc, x))  # (B, T, C) -> (B, T, 4C)
        return self.dropout(_linear(self.c_proj, h))  # (B, T, 4C) -> (B, T, C)


class GPT2Block(nn.Module):
    """Pre-LayerNorm block (GPT-2 paper §2.3: LayerNorm moved to the input of each sub-block). What FSDP wraps."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, mask=None, is_causal=False, layer_past=None, use_cache=False, output_attentions=False):
        a, present, att = self.attn(self.ln_1(x), mask, is_causal, layer_past, use_cache, output_attentions)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present, att


# ----------------------------------------------------------------------------------------------------------------
# Outputs: dataclasses with HF's field names; `out["logits"]` and `out[0]` work like transformers' ModelOutput.


def _past(past_key_values, cache):
    """transformers 5.24 names the forward's cache argument `cache` (past_key_values is its deprecated alias): take
    either. Only caches this model made are understood (a tuple of (k, v) per layer, or generate's StaticKVCache)."""
    if cache is not None:
        if past_key_values is not None:
            raise ValueError("pass the cache once: cache or past_key_values, not both.")
        past_key_values = cache
    if past_key_values is not None and not isinstance(past_key_values, (tuple, list, StaticKVCache)):
        raise ValueError(f"past_key_values/cache must be the .past_key_values an earlier forward of this model "
                         f"returned (a tuple of (key, value) per layer), got {type(past_key_values).__name__}.")
    return past_key_values


def _returned(out: "ModelOutput", return_dict: bool | None):
    """return_dict=False gives the tuple of the set fields, as in transformers."""
    return out.to_tuple() if return_dict is False else out


class ModelOutput:
    @property
    def cache(self):
        """transformers 5.24's name for past_key_values."""
        return getattr(self, "past_key_values", None)

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class GPT2ModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple | None = None  # () with output_attentions (GPT-2 has no cross-attention), as transformers


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple | None = None  # () with output_attentions, as transformers' CausalLMOutputWithCrossAttentions


@dataclass
class GPT2DoubleHeadsModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    mc_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mc_logits: torch.Tensor | None = None
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Base class: init, load/save, parameter counts, gradient checkpointing

# transformers' from_pretrained arguments that only matter for hub ids (passed to huggingface_hub.snapshot_download)
_HUB_ARGUMENTS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


class GPT2PreTrainedModel(nn.Module):
    config_class = GPT2Config
    base_model_prefix = "transformer"  # head models keep the trunk here, as in transformers

    def __init__(self, config: GPT2Config):
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise TypeError(f"{type(self).__name__} takes a gpt2.GPT2Config, got {type(config).__name__}.")
        self.config = config

    # --- initialisation (torchtitan style: callable again after a meta-device build + to_empty) ---
    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Residual projections: std 0.02/sqrt(2*n_layer) — GPT-2 paper §2.3 ("scale the weights of residual layers
        # at initialization by 1/sqrt(N)", N = 2 residual adds per block); the same as transformers' _init_weights.
        for block in self._trunk().h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and getattr(self, "lm_head", None) is not None:
            self.lm_head.weight = self._trunk().wte.weight  # one tensor: input embedding = output projection

    def _trunk(self) -> "GPT2Model":
        return self if isinstance(self, GPT2Model) else self.transformer

    def get_input_embeddings(self) -> nn.Embedding:
        return self._trunk().wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self._trunk().wte = value

    def get_output_embeddings(self) -> nn.Linear | None:
        """The lm_head (LM and double-heads models), None for the trunk and the classification heads."""
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the token embedding (V, C) -> (new_num_tokens, C), e.g. to len(tokenizer) after adding tokens.

        transformers 5.24's PreTrainedModel.resize_token_embeddings, step for step and with the same random draws, so
        a fixed seed gives the same new rows: rows [0, min(V, new)) are kept; new rows come, with mean_resizing=True
        (the default), from a normal with the old rows' mean and 1e-9 x their covariance (Hewitt 2021,
        https://nlp.stanford.edu/~johnhew/vocab-expansion.html: new tokens start near the average token, so the LM's
        next-token distribution barely moves; the mean itself when that covariance is not positive definite), else
        from N(0, initializer_range). pad_to_multiple_of rounds the size up (Tensor Cores like multiples of 64).
        A tied lm_head follows (it is the same tensor); an untied one is resized the same way. config.vocab_size is
        updated. new_num_tokens=None and pad_to_multiple_of=None: nothing changes. Returns the input embedding.
        Call it before wrapping the model for FSDP / DeepSpeed (it resizes plain tensors).
        """
        old = self.get_input_embeddings()
        if pad_to_multiple_of is not None:
            if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
            if new_num_tokens is None:
                new_num_tokens = old.weight.shape[0]
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens is None:
            return old
        if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be a positive int (e.g. len(tokenizer)), got {new_num_tokens!r}")
        old_n = old.weight.shape[0]
        if new_num_tokens != old_n:
            # As transformers: a new nn.Embedding (its own default init draws from the RNG too), new rows initialised,
            # old rows copied, and the data swapped into the existing Parameter, so a tied lm_head (the same
            # Parameter) has the new rows as well.
            new = nn.Embedding(new_num_tokens, old.weight.shape[1], device=old.weight.device, dtype=old.weight.dtype)
            self._init_new_rows(old.weight, new.weight, mean_resizing)
            n = min(old_n, new_num_tokens)
            new.weight.data[:n] = old.weight.data[:n]
            old.weight.data = new.weight.data
            old.num_embeddings = new_num_tokens
        head = self.get_output_embeddings()
        if head is not None:
            if head.weight.shape[0] != new_num_tokens:  # untied: a new Linear, initialised like the embedding
                new_head = nn.Linear(head.in_features, new_num_tokens, bias=head.bias is not None,
                                     device=head.weight.device, dtype=head.weight.dtype)
                self._init_new_rows(head.weight, new_head.weight, mean_resizing)
                n = min(head.weight.shape[0], new_num_tokens)
                new_head.weight.data[:n] = head.weight.data[:n]
                new_head.requires_grad_(head.weight.requires_grad)
                self.set_output_embeddings(new_head)
            else:
                head.out_features = new_num_tokens
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        return self.get_input_embeddings()

    def _init_new_rows(self, old_weight: torch.Tensor, new_weight: torch.Tensor, mean_resizing: bool) -> None:
        """The rows of new_weight past old_weight's: transformers' _init_added_embeddings_weights_with_mean, or
        _init_weights' N(0, initializer_range) over the whole new tensor (the kept rows are copied over after)."""
        old_n, added = old_weight.shape[0], new_weight.shape[0] - old_weight.shape[0]
        if added <= 0:
            return
        if not mean_resizing:
            nn.init.normal_(new_weight, mean=0.0, std=self.config.initializer_range)
            return
        w = old_weight.data.to(torch.float32)
        mean = w.mean(dim=0)
        centered = w - mean
        covariance = centered.T @ centered / old_n  # (C, C)
        epsilon = 1e-9
        if torch.distributions.constraints.positive_definite.check(epsilon * covariance).all():
            dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=epsilon * covariance)
            new_weight.data[-added:] = dist.sample(sample_shape=(added,)).to(old_weight.dtype)
        else:
            new_weight.data[-added:] = mean[None, :].repeat(added, 1).to(old_weight.dtype)

    # --- convenience like transformers ---
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied lm_head counts once); exclude_embeddings drops wte and wpe."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self._trunk().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._trunk().gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._trunk().gradient_checkpointing

    # --- Hugging Face folders (gpt2/hf_io.py) ---
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, config=None,
                        dtype="auto", device_map=None, subfolder: str = "", **kwargs):
        """Load an HF GPT-2 folder (config.json + model.safetensors, or a sharded index) or hub id.

        dtype: "auto" keeps the dtype the folder was saved in; a torch.dtype converts; None -> float32.
        config: a GPT2Config to use instead of the folder's config.json. device_map: a device ("cpu", "cuda:0", 0,
        a torch.device) or "auto" (the first GPU, else the CPU) to put the whole model on; subfolder: the model sits in
        <folder>/<subfolder>; revision / cache_dir / token / local_files_only / force_download: for hub ids.
        trust_remote_code, low_cpu_mem_usage and use_safetensors=True change nothing here (no remote code; the
        weights are always loaded without a second copy, from safetensors). Other keyword arguments override config
        fields (e.g. attn_implementation, num_labels=3); anything else raises one sentence naming it.
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes the folder and keyword arguments only; got "
                            f"{len(model_args)} extra positional argument(s).")
        if "torch_dtype" in kwargs:  # the transformers < 4.56 spelling
            dtype = kwargs.pop("torch_dtype")
        hub = {k: kwargs.pop(k) for k in _HUB_ARGUMENTS if k in kwargs}
        for key in ("trust_remote_code", "low_cpu_mem_usage"):
            kwargs.pop(key, None)
        if kwargs.pop("use_safetensors", None) is False:
            raise ValueError("use_safetensors=False: gpt2 loads safetensors only (never pickle); convert the folder "
                             "with transformers' save_pretrained(safe_serialization=True).")
        fields = {f.name for f in dataclasses.fields(GPT2Config)} | {"torch_dtype"}
        unknown = sorted(k for k in kwargs if k not in fields)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got {unknown}, which are neither GPT2Config fields nor "
                            f"loading options gpt2 implements (config, dtype, device_map, subfolder, "
                            f"{', '.join(_HUB_ARGUMENTS)}).")
        model = hf_io.load_pretrained(cls, pretrained_model_name_or_path, dtype=dtype, config=config,
                                      subfolder=subfolder, hub_kwargs=hub, **kwargs)
        if device_map is not None:
            if isinstance(device_map, dict):
                raise ValueError("device_map as a dict (layers spread over devices) is not supported; pass one "
                                 "device, e.g. device_map='cuda:0', or 'auto'.")
            if device_map == "auto":
                device_map = "cuda:0" if torch.cuda.is_available() else "cpu"
            model.to(torch.device(device_map) if not isinstance(device_map, int) else torch.device("cuda", device_map))
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        max_shard_size: int | str = "5GB") -> None:
        """Write an HF GPT-2 folder that transformers.GPT2*.from_pretrained loads with identical outputs."""
        hf_io.save_pretrained(self, save_directory, safe_serialization=safe_serialization, max_shard_size=max_shard_size)


# ----------------------------------------------------------------------------------------------------------------
# The trunk


class GPT2Model(GPT2PreTrainedModel):
    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # learned absolute positions
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPT2Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)  # GPT-2 adds a final LayerNorm
        self.gradient_checkpointing = False
        self.init_weights()

    @property
    def transformer(self) -> "GPT2Model":
        """So `model.transformer.h` reaches the blocks for the trunk and every head class alike."""
        return self

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: tuple | list | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        *,
        cache: tuple | list | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> GPT2ModelOutput:
        """The trunk: (B, T) ids (or embeddings), an optional cache and padding mask -> the final hidden states
        (B, T, C), with the cache, hidden states and attention probabilities on request (transformers' arguments)."""
        past_key_values = _past(past_key_values, cache)
        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            raise ValueError("encoder_hidden_states / encoder_attention_mask feed cross-attention (add_cross_attention"
                             "=True), which gpt2-forge's GPT-2 does not have; drop them.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds.")
        # Inputs may have extra leading dims (GPT2DoubleHeadsModel: (B, n_choices, T)); flatten them into the batch.
        input_shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        T = input_shape[-1]
        input_ids, token_type_ids, position_ids = (None if ids is None else ids.reshape(-1, T)  # (B, T)
                                                   for ids in (input_ids, token_type_ids, position_ids))
        static = isinstance(past_key_values, StaticKVCache)
        # generate()'s decode steps (its StaticKVCache already filled) feed back its own argmax/sampled ids and
        # positions: only the prompt, at the prefill, needs the check
        if not (static and past_key_values.length > 0):
            self._check_input_ids(input_ids, token_type_ids, position_ids)
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds.reshape(-1, T, inputs_embeds.size(-1))

        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed blocks cannot hand out their keys/values
        if static:
            past_len = past_key_values.length
        else:
            past_len = past_key_values[0][0].size(-2) if past_key_values is not None and len(past_key_values) else 0
        if past_len + T > self.config.n_positions:
            raise ValueError(f"sequence of length {past_len + T} exceeds n_positions={self.config.n_positions}; "
                             f"truncate the input (or generate fewer tokens).")
        mask, is_causal, position_ids = _attention_pattern(attention_mask, position_ids, x.size(0), T, past_len,
                                                           x.device)
        x = x + self.wpe(position_ids)  # (B, T, C)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)  # GPT-2 has no segment table; HF reuses wte for token types
        x, presents, all_hidden, all_att = self._blocks(self.drop(x), mask, is_causal, past_key_values, past_len,
                                                        use_cache, output_attentions, output_hidden_states)
        out_shape = (*input_shape, x.size(-1))
        x = x.view(out_shape)
        if output_hidden_states:
            all_hidden.append(x)  # the last entry is the final LayerNorm output, like transformers
            all_hidden = tuple(h.view(out_shape) for h in all_hidden)
        return _returned(GPT2ModelOutput(
            last_hidden_state=x,
            past_key_values=(presents if static else tuple(presents)) if use_cache else None,
            hidden_states=all_hidden,
            attentions=tuple(all_att) if output_attentions else None,
            cross_attentions=() if output_attentions else None,
        ), return_dict)

    def _check_input_ids(self, input_ids, token_type_ids, position_ids) -> None:
        if input_ids is not None:
            _check_ids(input_ids, "input_ids", self.wte.num_embeddings, "tokens")
        if token_type_ids is not None:
            _check_ids(token_type_ids, "token_type_ids", self.wte.num_embeddings, "tokens")
        if position_ids is not None:
            _check_ids(position_ids, "position_ids", self.config.n_positions, "positions")

    def _blocks(self, x, mask, is_causal, past_key_values, past_len, use_cache, output_attentions,
                output_hidden_states):
        """x (B, T, C) through every block and the final LayerNorm -> (x, presents, hidden states, attentions)."""
        static = isinstance(past_key_values, StaticKVCache)
        presents = [] if use_cache else None
        all_hidden = [] if output_hidden_states else None
        all_att = [] if output_attentions else None
        for i, block in enumerate(self.h):
            if output_hidden_states:
                all_hidden.append(x)
            layer_past = past_key_values if static else (past_key_values[i] if past_len else None)
            if self.gradient_checkpointing and self.training and not static:
                x, present, att = checkpoint(block, x, mask, is_causal, None, False, output_attentions,
                                             use_reentrant=False)
            else:
                x, present, att = block(x, mask, is_causal, layer_past, use_cache, output_attentions)
            if use_cache:
                presents.append(present)
            if output_attentions:
                all_att.append(att)
        if static:
            past_key_values.length += x.size(1)  # every layer has written its T new positions
            presents = past_key_values
        return self.ln_f(x), presents, all_hidden, all_att


def _attention_pattern(attention_mask, position_ids, B: int, T: int, past_len: int, device):
    """(mask, is_causal, position_ids) of a forward: the bool mask (None when `is_causal` lets fused kernels apply
    causality themselves, or when one new token attends everything) and the positions (B or 1, T)."""
    mask, is_causal = None, False
    if attention_mask is not None:
        attention_mask = attention_mask.reshape(B, -1)  # (B, T_past + T)
        if attention_mask.size(-1) != past_len + T:
            raise ValueError(f"attention_mask has length {attention_mask.size(-1)} but past + input is "
                             f"{past_len + T}; it must cover the cached tokens too.")
        if position_ids is None:
            # Left padding: count positions from each row's first real token, as transformers' generate() does
            # (GenerationMixin._prepare_position_ids_for_generation), so a left-padded row computes what the
            # unpadded row does. transformers' forward counts from column 0 instead; everywhere else (no or
            # right padding, and the pad positions after the last real token) this is its arange exactly.
            first = attention_mask.long().argmax(-1, keepdim=True)  # (B, 1): left pads before the first real token
            position_ids = (torch.arange(past_len, past_len + T, device=device) - first).clamp(min=0)  # (B, T)
        mask = _padding_causal_mask(attention_mask, T, past_len)  # (B, 1, T, T_past + T)
    elif past_len == 0:
        is_causal = True  # the fast path: fused kernels apply causality without a mask tensor
    elif T > 1:
        mask = _padding_causal_mask(None, T, past_len, device=device)  # causal with an offset for the cache
    # else: one new token with a cache and no padding attends to everything, no mask needed
    if position_ids is None:
        position_ids = torch.arange(past_len, past_len + T, device=device).unsqueeze(0)  # (1, T)
    return mask, is_causal, position_ids


def _check_ids(ids: torch.Tensor, name: str, size: int, what: str) -> None:
    """One sentence naming an id outside [0, size) instead of the embedding's bare "IndexError: index out of range".

    Only for CPU tensors, where min/max is a cheap host computation: on an accelerator reading the result back would
    stall the launch queue every step (a host sync), so there the embedding's own device-side assert reports it.
    """
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= size:
        bad = hi if hi >= size else lo
        fix = ("resize the model with model.resize_token_embeddings(len(tokenizer)) after adding tokens, or use the "
               "tokenizer the model was trained with") if what == "tokens" else "keep positions below n_positions"
        raise ValueError(f"{name} holds the id {bad}, but the model has {size} {what} (ids 0 to {size - 1}); {fix}.")


def _padding_causal_mask(attention_mask, T, past_len, device=None):
    """Bool mask (B or 1, 1, T, T_past + T), True = may attend: causal (with the cache offset) and not a pad key.

    A query that may attend nothing (left padding: a pad before every real token) keeps its own key, since a fully
    masked row gives NaN in SDPA (and NaN gradients); such outputs are never used. Every other row is exactly
    transformers' mask, so a right-padded pad position computes what it computes there (QA's loss reads the logits
    of every position).
    """
    device = attention_mask.device if attention_mask is not None else device
    Tk = past_len + T
    q_pos = torch.arange(past_len, Tk, device=device).view(T, 1)  # absolute position of each query
    k_pos = torch.arange(Tk, device=device).view(1, Tk)
    keep = k_pos <= q_pos  # (T, Tk) causal
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]  # (B, 1, T, Tk)
        keep = keep | ((k_pos == q_pos) & ~keep.any(dim=-1, keepdim=True))  # empty rows: the query's own key
    else:
        keep = keep.view(1, 1, T, Tk)
    return keep


# ----------------------------------------------------------------------------------------------------------------
# Heads: each is the trunk plus one small module, sharing base_model_prefix="transformer".


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    # Shift the labels left (pad with -100) rather than slicing the logits: same loss, no copy of the (B, T, V) logits
    # (transformers' ForCausalLMLoss). Loss in fp32 even when the logits are bf16. With num_items_in_batch (gradient
    # accumulation over uneven batches), the sum over tokens divided by it, as there.
    shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=-100, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


class GPT2LMHeadModel(GPT2PreTrainedModel):
    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()  # also ties lm_head to wte (GPT-2 shares input and output embeddings)
        # generate()'s defaults; from_pretrained replaces it with the folder's generation_config.json when present
        self.generation_config = generation.GenerationConfig.from_model_config(config)

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, output_attentions=False,
                output_hidden_states=False, logits_to_keep: int | torch.Tensor = 0, *, cache=None,
                encoder_hidden_states=None, encoder_attention_mask=None, num_items_in_batch=None,
                return_dict=None) -> CausalLMOutput:
        """Logits (B, T, V) and, with labels (B, T), the next-token cross-entropy (labels shifted inside, -100
        ignored; mean over tokens, or summed / num_items_in_batch as transformers' ForCausalLMLoss). logits_to_keep:
        an int keeps the last n positions (0 = all), a 1-D tensor the positions it lists."""
        past_key_values = _past(past_key_values, cache)
        if labels is not None and input_ids is not None and inputs_embeds is None and self._sparse_embedding_grad():
            _check_ids(input_ids, "input_ids", self.lm_head.weight.shape[0], "tokens")
            inputs_embeds, input_ids = F.embedding(input_ids, self.lm_head.weight, sparse=True), None
        out = self.transformer(input_ids, past_key_values, attention_mask, token_type_ids, position_ids,
                               inputs_embeds, use_cache, output_attentions, output_hidden_states,
                               encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        elif logits_to_keep:  # generation only needs the last position's logits
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)  # (B, T, V)
        loss = _lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return _returned(CausalLMOutput(loss, logits, out.past_key_values, out.hidden_states, out.attentions,
                                        out.cross_attentions), return_dict)

    def _sparse_embedding_grad(self) -> bool:
        """Whether the token lookup of a training forward may hand autograd a sparse gradient.

        With tied embeddings the loss always reaches the (V, C) table through the lm_head, whose gradient is dense.
        Autograd sums the two gradients of the one parameter before accumulating it, so a sparse lookup gradient is
        added as B*T rows into the lm_head's, instead of being built as a second dense (V, C) tensor (a 154 MB
        zero-fill plus a 154 MB add for GPT-2's vocabulary) — and `.grad` stays dense, as optimizers and DDP need.
        Only for a plain tied Parameter in eager mode: FSDP2's DTensors, DeepSpeed ZeRO-3's partitioned parameters and
        torch.compile keep the dense path.
        """
        w = self.lm_head.weight
        return (w is self.transformer.wte.weight and type(w) is nn.Parameter and w.requires_grad
                and torch.is_grad_enabled() and not hasattr(w, "ds_id") and not torch.compiler.is_compiling())

    def generate(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config=None, generator: torch.Generator | None = None, **kwargs):
        """Prompt + new tokens (B, T + n) with a KV cache, taking transformers 5.24's generate arguments
        (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, num_return_sequences, ...) with
        its defaults and results; see gpt2/generation.py for the full list and what raises."""
        return generation.generate(self, input_ids, attention_mask, generation_config, generator, **kwargs)


class GPT2SequenceSummary(nn.Module):
    """One vector per sequence for the multiple-choice head (transformers' GPT2SequenceSummary)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.summary_type = config.summary_type
        self.summary = nn.Identity()
        if config.summary_use_proj:
            n_out = config.num_labels if config.summary_proj_to_labels and config.num_labels > 0 else config.n_embd
            self.summary = nn.Linear(config.n_embd, n_out)
        self.activation = ACT2FN[config.summary_activation] if config.summary_activation else (lambda x: x)
        self.first_dropout = nn.Dropout(config.summary_first_dropout)

    def forward(self, h: torch.Tensor, cls_index: torch.LongTensor | None = None) -> torch.Tensor:
        # h: (B, n_choices, T, C)
        if self.summary_type == "last":
            out = h[..., -1, :]
        elif self.summary_type == "first":
            out = h[..., 0, :]
        elif self.summary_type == "mean":
            out = h.mean(dim=-2)
        else:  # "cls_index": the hidden state at each choice's classification token; default the last token
            if cls_index is None:
                out = h[..., -1, :]
            else:
                idx = cls_index[..., None, None].expand(*cls_index.shape, 1, h.size(-1))  # (B, n_choices, 1, C)
                out = h.gather(-2, idx).squeeze(-2)  # (B, n_choices, C)
        return self.activation(self.summary(self.first_dropout(out)))


class GPT2DoubleHeadsModel(GPT2PreTrainedModel):
    """LM head + multiple-choice head (RocStories/SWAG): input_ids (B, n_choices, T), mc_token_ids (B, n_choices)."""

    def __init__(self, config: GPT2Config):
        # one score per choice: transformers sets config.num_labels = 1 here; we copy instead of mutating the caller's
        config = replace(config, num_labels=1, id2label=None, label2id=None)
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.multiple_choice_head = GPT2SequenceSummary(config)
        self.init_weights()
        self.generation_config = generation.GenerationConfig.from_model_config(config)

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, mc_token_ids=None, labels=None, mc_labels=None,
                use_cache=None, output_attentions=False, output_hidden_states=False, *, cache=None,
                return_dict=None) -> GPT2DoubleHeadsModelOutput:
        past_key_values = _past(past_key_values, cache)
        out = self.transformer(input_ids, past_key_values, attention_mask, token_type_ids, position_ids,
                               inputs_embeds, use_cache, output_attentions, output_hidden_states)
        h = out.last_hidden_state  # (B, n_choices, T, C)
        lm_logits = self.lm_head(h)  # (B, n_choices, T, V)
        mc_logits = self.multiple_choice_head(h, mc_token_ids).squeeze(-1)  # (B, n_choices)
        mc_loss = None
        if mc_labels is not None:
            mc_loss = F.cross_entropy(mc_logits.view(-1, mc_logits.size(-1)), mc_labels.view(-1))
        lm_loss = _lm_loss(lm_logits, labels) if labels is not None else None
        return _returned(GPT2DoubleHeadsModelOutput(lm_loss, mc_loss, lm_logits, mc_logits, out.past_key_values,
                                                    out.hidden_states, out.attentions), return_dict)


    # transformers' GPT2DoubleHeadsModel generates too (its language-model head): the same generate, on (B, T) ids
    generate = GPT2LMHeadModel.generate


class GPT2ForSequenceClassification(GPT2PreTrainedModel):
    """Classifies from the rightmost non-pad token (a causal model has seen the whole sequence only there)."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.init_weights()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, output_attentions=False,
                output_hidden_states=False, *, cache=None, return_dict=None) -> SequenceClassifierOutput:
        past_key_values = _past(past_key_values, cache)
        out = self.transformer(input_ids, past_key_values, attention_mask, token_type_ids, position_ids,
                               inputs_embeds, use_cache, output_attentions, output_hidden_states)
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        B, T = logits.shape[:2]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("GPT2ForSequenceClassification needs config.pad_token_id to find the last token of "
                             "padded sequences in a batch > 1; set pad_token_id (e.g. to the tokenizer's eos id).")
        if pad is None or input_ids is None:
            last = torch.full((B,), T - 1, device=logits.device)
        else:
            # rightmost token != pad: correct for right padding (last real token) and left padding (position T-1)
            not_pad = (input_ids != pad).to(torch.int32)
            last = (torch.arange(T, device=logits.device, dtype=torch.int32) * not_pad).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)

        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:  # inferred as in transformers
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                if self.num_labels == 1:
                    loss = F.mse_loss(pooled.squeeze(), labels.squeeze())
                else:
                    loss = F.mse_loss(pooled, labels)
            elif problem == "single_label_classification":
                loss = F.cross_entropy(pooled.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(pooled, labels)
        return _returned(SequenceClassifierOutput(loss, pooled, out.past_key_values, out.hidden_states,
                                                  out.attentions), return_dict)


class GPT2ForTokenClassification(GPT2PreTrainedModel):
    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.dropout = nn.Dropout(config.classifier_dropout if config.classifier_dropout is not None else 0.1)
        self.classifier = nn.Linear(config.n_embd, config.num_labels)
        self.init_weights()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, output_attentions=False,
                output_hidden_states=False, *, cache=None, return_dict=None) -> TokenClassifierOutput:
        past_key_values = _past(past_key_values, cache)
        out = self.transformer(input_ids, past_key_values, attention_mask, token_type_ids, position_ids,
                               inputs_embeds, use_cache, output_attentions, output_hidden_states)
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, T, num_labels)
        loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1)) if labels is not None else None
        return _returned(TokenClassifierOutput(loss, logits, out.hidden_states, out.attentions), return_dict)


class GPT2ForQuestionAnswering(GPT2PreTrainedModel):
    """Extractive QA: a start and an end logit per token."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=False,
                output_hidden_states=False, *, return_dict=None) -> QuestionAnsweringModelOutput:
        out = self.transformer(input_ids, None, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               False, output_attentions, output_hidden_states)
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(-1)  # 2 x (B, T)
        loss = None
        if start_positions is not None and end_positions is not None:
            # positions outside the input are clamped to T and ignored, as in transformers
            T = start_logits.size(1)
            start = start_positions.reshape(-1).clamp(0, T)
            end = end_positions.reshape(-1).clamp(0, T)
            loss = (F.cross_entropy(start_logits, start, ignore_index=T)
                    + F.cross_entropy(end_logits, end, ignore_index=T)) / 2
        return _returned(QuestionAnsweringModelOutput(loss, start_logits, end_logits, out.hidden_states,
                                                      out.attentions), return_dict)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs for MFU


def flops_per_token(config: GPT2Config, seq_len: int) -> float:
    """Training FLOPs per token: 6*N + 12*L*H*Q*T (PaLM, Chowdhery et al. 2022, appendix B).

    N = non-embedding parameters plus the lm_head matmul (V*C): the tied output projection is real compute,
    the embedding look-ups are not (as nanoGPT's estimate_mfu counts it). The second term is attention's QK^T and AV.
    """
    C, L, I, V = config.n_embd, config.n_layer, config.inner_dim, config.vocab_size
    per_layer = (2 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (2 * C) + (C * I + I) + (I * C + C)
    N = L * per_layer + 2 * C + V * C  # blocks + ln_f + lm_head
    H, Q = config.n_head, config.head_dim
    return 6.0 * N + 12.0 * L * H * Q * seq_len
