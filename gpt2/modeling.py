"""GPT-2 in plain PyTorch: attention -> MLP -> block -> trunk (GPT2Model) -> LM head -> the other heads -> FLOPs.

The trunk and the LM head have a core forward (`core_forward`) that takes what training needs — token ids, a padding
mask, labels, a KV cache — and reads top to bottom like nanoGPT's model.py. The transformers surface of the classes
(`forward` with transformers' keyword arguments and output classes, `return_dict`, resize_token_embeddings, ...) is
mixed in from gpt2/compat.py and calls the core; from_pretrained / save_pretrained come from gpt2/hf_io.py. Parameter names equal transformers' GPT-2 names, except that the
four projections are nn.Linear (out, in) instead of HF's Conv1D (in, out); gpt2/hf_io.py transposes them on load/save.
References: GPT-2 paper (Radford et al. 2019), nanoGPT model.py, transformers models/gpt2/modeling_gpt2.py (5.24).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import compat, generation, hf_io
from .activations import ACT2FN
from .attention import attention_backend
from .cache import StaticKVCache  # noqa: F401  (gpt2.modeling.StaticKVCache: generate's cache, imported from here)
from .compat import (  # noqa: F401  (the output classes' historical home: gpt2.modeling.CausalLMOutput, ...)
    CausalLMOutput,
    GPT2DoubleHeadsModelOutput,
    GPT2ModelOutput,
    ModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
    lm_loss,
)
from .config import GPT2Config
from .loss import chunked_lm_loss

# ----------------------------------------------------------------------------------------------------------------
# The transformer block


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

    def forward(self, x, mask=None, is_causal=False, cache=None, need_weights=False):
        """x (B, T, C) -> (y (B, T, C), probabilities (B, nh, T, T_past + T) when need_weights else None).

        cache: a gpt2.cache KV cache (None in training); it stores this call's keys/values and returns the whole past.
        """
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, T_past + T, hs)
        backend = attention_backend(self.attn_implementation, need_weights)
        y, att = backend.fn(q, k, v, mask=mask, is_causal=is_causal, scale=self.scale,
                            dropout_p=self.attn_pdrop if self.training else 0.0, upcast=self.upcast)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh, hs) -> (B, T, C): re-assemble the heads
        return self.resid_dropout(self.c_proj(y)), att


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.act = ACT2FN[config.activation_function]
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        h = self.act(self.c_fc(x))  # (B, T, C) -> (B, T, 4C)
        return self.dropout(self.c_proj(h))  # (B, T, 4C) -> (B, T, C)


class GPT2Block(nn.Module):
    """Pre-LayerNorm block (GPT-2 paper §2.3: LayerNorm moved to the input of each sub-block). What FSDP wraps."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, mask=None, is_causal=False, cache=None, need_weights=False):
        """x (B, T, C) -> (x (B, T, C), attention probabilities or None); arguments as GPT2Attention.forward."""
        a, att = self.attn(self.ln_1(x), mask, is_causal, cache, need_weights)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, att


# ----------------------------------------------------------------------------------------------------------------
# Base class: the config, weight init and tying (load/save: hf_io.PretrainedIO; more of transformers' API:
# compat.PreTrainedAPI)


class GPT2PreTrainedModel(compat.PreTrainedAPI, hf_io.PretrainedIO, nn.Module):
    config_class = GPT2Config
    base_model_prefix = "transformer"  # head models keep the trunk here, as in transformers

    def __init__(self, config: GPT2Config):
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise TypeError(f"{type(self).__name__} takes a gpt2.GPT2Config, got {type(config).__name__}.")
        self.config = config

    # torchtitan style: callable again after a meta-device build + to_empty
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
        for block in self.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and getattr(self, "lm_head", None) is not None:
            self.lm_head.weight = self.transformer.wte.weight  # one tensor: input embedding = output projection


# ----------------------------------------------------------------------------------------------------------------
# The trunk


class GPT2Model(compat.GPT2ModelForward, GPT2PreTrainedModel):
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

    def core_forward(self, input_ids, attention_mask=None, cache=None, *, position_ids=None, token_type_ids=None,
                     inputs_embeds=None, sparse_grad=False, hidden_states=None, attentions=None) -> torch.Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C).

        attention_mask (B, T_past + T), 1 = real token (padding); cache: a gpt2.cache KV cache to read and extend.
        inputs_embeds (B, T, C) replaces the token lookup (input_ids None then). sparse_grad: the token lookup hands
        autograd a sparse gradient (see GPT2LMHeadModel._sparse_embedding_grad: only its caller knows when that is
        safe). hidden_states / attentions: lists that, when given, receive each block's input plus the final output,
        and each block's attention probabilities (transformers' output_hidden_states / output_attentions).
        Raises ValueError when past + T exceeds n_positions or the mask does not cover past + T.
        """
        if input_ids is None:
            x = inputs_embeds  # (B, T, C)
        elif sparse_grad:  # the gradient as B*T rows of the table instead of a dense (V, C) tensor
            x = F.embedding(input_ids, self.wte.weight, sparse=True)  # (B, T, C)
        else:
            x = self.wte(input_ids)  # (B, T, C)
        T = x.size(1)
        past_len = cache.length if cache is not None else 0
        if past_len + T > self.config.n_positions:
            raise ValueError(f"sequence of length {past_len + T} exceeds n_positions={self.config.n_positions}; "
                             f"truncate the input (or generate fewer tokens).")
        mask, is_causal, position_ids = _mask_and_positions(attention_mask, position_ids, T, past_len, x.device)
        x = x + self.wpe(position_ids)  # (B, T, C)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)  # GPT-2 has no segment table; transformers reuses wte for token types
        x = self.drop(x)
        need_weights = attentions is not None
        for block in self.h:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training and cache is None:
                # recompute the block in backward instead of keeping its activations (Chen et al. 2016)
                x, att = checkpoint(block, x, mask, is_causal, None, need_weights, use_reentrant=False)
            else:
                x, att = block(x, mask, is_causal, cache, need_weights)
            if need_weights:
                attentions.append(att)
        if cache is not None:
            cache.length += T  # every layer has written its T new positions
        x = self.ln_f(x)
        if hidden_states is not None:
            hidden_states.append(x)  # the last entry is the final LayerNorm output, like transformers
        return x


def _mask_and_positions(attention_mask, position_ids, T, past_len, device):
    """(mask, is_causal, position_ids) for T new tokens after past_len cached ones.

    No padding: no mask tensor — is_causal for a prefill (fused kernels apply causality themselves), the causal mask
    with the cache offset for several new tokens, nothing for one new token (it may attend to everything).
    """
    mask, is_causal = None, False
    if attention_mask is not None:
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
        is_causal = True
    elif T > 1:
        mask = _padding_causal_mask(None, T, past_len, device=device)  # (1, 1, T, T_past + T)
    if position_ids is None:
        position_ids = torch.arange(past_len, past_len + T, device=device).unsqueeze(0)  # (1, T)
    return mask, is_causal, position_ids


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
# The language-model head

DEFAULT_LOSS_CHUNK_SIZE = 1024  # tokens per chunk for skip_logits=True when config.loss_chunk_size is 0


class GPT2LMHeadModel(compat.LMHeadForward, GPT2PreTrainedModel):
    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()  # also ties lm_head to wte (GPT-2 shares input and output embeddings)
        # generate()'s defaults; from_pretrained replaces it with the folder's generation_config.json when present
        self.generation_config = generation.GenerationConfig.from_model_config(config)

    def core_forward(self, input_ids, attention_mask=None, labels=None, cache=None, *, logits_to_keep=0,
                     num_items_in_batch=None, skip_logits=None, **trunk_kwargs):
        """(logits (B, T, V) or None, loss or None): the loss with labels (B, T) — next-token cross-entropy, labels
        shifted inside, -100 ignored; mean over tokens, or summed / num_items_in_batch as transformers' ForCausalLMLoss.
        logits_to_keep: an int keeps the last n positions (0 = all), a 1-D tensor the positions it lists.
        skip_logits: compute the loss chunk by chunk (gpt2/loss.py) and return logits None; None -> when labels are
        given and config.loss_chunk_size > 0 (Liger-Kernel's `skip_logits` default, with our config switch).
        trunk_kwargs: GPT2Model.core_forward's keyword arguments (position_ids, token_type_ids, inputs_embeds, ...).
        Raises ValueError for skip_logits=True without labels.
        """
        # A token lookup with a sparse gradient, when that is safe: only with labels (the loss then reaches the
        # tied table through lm_head's dense gradient too) — see _sparse_embedding_grad.
        sparse = labels is not None and input_ids is not None and self._sparse_embedding_grad()
        x = self.transformer.core_forward(input_ids, attention_mask, cache, sparse_grad=sparse, **trunk_kwargs)
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[:, logits_to_keep]
        elif logits_to_keep:  # generation only needs the last position's logits
            x = x[:, -logits_to_keep:]
        if self._chunked_loss(labels, skip_logits, logits_to_keep):
            chunk = self.config.loss_chunk_size or DEFAULT_LOSS_CHUNK_SIZE
            return None, chunked_lm_loss(x, self.lm_head.weight, labels, chunk, num_items_in_batch)
        logits = self.lm_head(x)  # (B, T, V)
        loss = lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return logits, loss

    def _chunked_loss(self, labels, skip_logits, logits_to_keep) -> bool:
        """Whether this forward computes the loss chunk by chunk (see core_forward's skip_logits). Not by default
        under DeepSpeed ZeRO-3, whose partitioned lm_head weight is gathered only by a call of the lm_head module."""
        if skip_logits is None:
            w = self.lm_head.weight
            return (labels is not None and self.config.loss_chunk_size > 0 and not hasattr(w, "ds_id")
                    and not isinstance(logits_to_keep, torch.Tensor) and not logits_to_keep)
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True computes the loss without the logits and needs labels; pass labels, "
                             "or skip_logits=None/False to get the logits.")
        return bool(skip_logits)

    def _sparse_embedding_grad(self) -> bool:
        """Whether the token lookup of a training forward may hand autograd a sparse gradient.

        With tied embeddings the loss always reaches the (V, C) table through the lm_head, whose gradient is dense.
        Autograd sums the two gradients of the one parameter before accumulating it, so a sparse lookup gradient is
        added as B*T rows into the lm_head's, instead of being built as a second dense (V, C) tensor (a V*C zero-fill
        plus a V*C add; benchmarks/README.md measures its share of a CPU step) — and `.grad` stays dense, as
        optimizers and DDP need. Only for a plain tied Parameter in eager mode: FSDP2's DTensors, DeepSpeed ZeRO-3's
        partitioned parameters and torch.compile keep the dense path.
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


# ----------------------------------------------------------------------------------------------------------------
# The other heads: each is the trunk plus one small module, sharing base_model_prefix="transformer"; what each
# computes from the trunk's output (pooling, loss) is transformers' behaviour, in its forward in gpt2/compat.py.


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


class GPT2DoubleHeadsModel(compat.DoubleHeadsForward, GPT2PreTrainedModel):
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

    # transformers' GPT2DoubleHeadsModel generates too (its language-model head): the same generate, on (B, T) ids
    generate = GPT2LMHeadModel.generate


class GPT2ForSequenceClassification(compat.SequenceClassificationForward, GPT2PreTrainedModel):
    """Classifies from the rightmost non-pad token (a causal model has seen the whole sequence only there)."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.init_weights()


class GPT2ForTokenClassification(compat.TokenClassificationForward, GPT2PreTrainedModel):
    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.dropout = nn.Dropout(config.classifier_dropout if config.classifier_dropout is not None else 0.1)
        self.classifier = nn.Linear(config.n_embd, config.num_labels)
        self.init_weights()


class GPT2ForQuestionAnswering(compat.QuestionAnsweringForward, GPT2PreTrainedModel):
    """Extractive QA: a start and an end logit per token."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        self.init_weights()


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
