"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, eos stop, left-padded batches.

Follows transformers' GenerationMixin where it matters for equal results: position ids from the attention mask
(cumsum - 1, so left-padded rows start at position 0), logits processors applied in the order temperature ->
top-k -> top-p, finished rows continue with pad_token_id.

What makes it fast (benchmarks/generation.py measures it against transformers' generate):
  * a preallocated KV cache (cache.StaticKVCache) written in place — no torch.cat of the whole past per token;
  * the output ids and the attention mask are preallocated too; position ids advance by one per step instead of a
    cumsum over the whole mask; with no padding at all there is no mask (SDPA runs mask-free);
  * logits for the last position only (the trunk's last hidden state -> lm_head), under torch.inference_mode;
  * no host syncs per token on accelerators: "all rows finished" is recorded on the device and read every
    _SYNC_EVERY tokens (on CPU a read costs nothing, so it is read every token and no work is wasted);
  * on CPU at batch <= 3, the GEMVs run on cached (in, out) copies of the weights (see _T_LAYOUT_MAX_ROWS).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from .cache import StaticKVCache


def _top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set the logits outside the top-k / nucleus to -inf (transformers TopKLogitsWarper / TopPLogitsWarper)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)  # the low tail holding at most 1-top_p of the mass
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


# Accelerators: read the device-side "all finished" flag every this many tokens (each read is a host sync that
# stalls the launch queue); tokens computed past the stop are trimmed, so the output is the same.
_SYNC_EVERY = 16
# CPU decoding at 1-3 rows is a chain of GEMVs that stream every weight once per token, and MKL streams the (in, out)
# layout (HF's Conv1D) markedly faster than nn.Linear's (out, in): measured on a 2-core AMD EPYC, one thread, the
# gpt2 lm_head (50257 x 384) took 12.0 ms vs 4.2 ms per token, a 4 x 768 trunk ~10 % less; from 4 rows up MKL uses
# GEMM and both layouts are equal. So a CPU decode loop of enough tokens runs on (in, out) copies of the projection
# weights and the output embedding. The copies live for one generate() call only (a transpose copy costs ~100 ms
# for that lm_head, repaid after ~32 tokens): nothing outlives the call, so a model never silently holds its weights
# twice.
_T_LAYOUT_MAX_ROWS = 3
_T_LAYOUT_MIN_TOKENS = 32


def _decode_linears(model) -> list[torch.nn.Linear]:
    """The layers whose weights get an (in, out) decode copy: every block projection and the lm_head."""
    layers = []
    for block in model.transformer.h:
        layers += [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
    return layers + [model.lm_head]


def _use_t_layout(model, batch: int, new_tokens: int) -> bool:
    return (model.lm_head.weight.device.type == "cpu" and batch <= _T_LAYOUT_MAX_ROWS
            and new_tokens >= _T_LAYOUT_MIN_TOKENS)


@contextmanager
def _t_layout(model, enabled: bool):
    """For the duration of one decode loop, give each projection a `weight_t` (in, out) copy (modeling._linear)."""
    if not enabled:
        yield None
        return
    layers = _decode_linears(model)
    with torch.no_grad():
        for layer in layers:
            layer.weight_t = layer.weight.detach().t().contiguous()  # (out, in) -> (in, out)
    try:
        yield model.lm_head.weight_t  # (C, V)
    finally:
        for layer in layers:
            layer.weight_t = None


def generate(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int | None = None, max_length: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, stopping_criteria=None) -> torch.LongTensor:
    """Return prompt + generated tokens, (B, T + n). Rows that hit eos are padded with pad_token_id afterwards.

    `stopping_criteria`: callables `(input_ids (B, T + s), scores (B, V)) -> bool | BoolTensor (B,)` called after
    every new token, as transformers' StoppingCriteria: a row they mark done is finished like an eos row (pad
    tokens from then on), and generation ends once every row is. lm-evaluation-harness's stop sequences use it.
    """
    config = model.config
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    B, T = input_ids.shape
    if max_new_tokens is None:
        max_new_tokens = (max_length if max_length is not None else 20) - T  # transformers' default max_length=20
    if max_new_tokens < 0:
        raise ValueError(f"max_length ({max_length}) is shorter than the prompt ({T} tokens); raise max_length or use "
                         f"max_new_tokens.")
    if T + max_new_tokens > config.n_positions:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's n_positions "
                         f"({config.n_positions}); shorten the prompt or generate fewer tokens.")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")

    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                           device=input_ids.device, dtype=torch.long)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos_ids[0]) if len(eos_ids) else 0  # transformers also falls back to eos
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}.")
    if attention_mask.dtype == torch.bool or attention_mask.is_floating_point():
        attention_mask = attention_mask.long()
    if B > 1 and (attention_mask[:, -1] == 0).any():
        warnings.warn("generate(): a row ends with padding; decoder-only models need left padding "
                      "(tokenizer.padding_side = 'left') or generated text follows pad tokens.", stacklevel=3)

    was_training = model.training
    model.eval()
    try:
        ids = _generate(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                        eos_ids, pad_token_id, generator, list(stopping_criteria or ()))
    finally:
        model.train(was_training)
    return ids.clone()  # an ordinary tensor: inference-mode tensors cannot be saved for backward later


@torch.inference_mode()
def _generate(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos_ids,
              pad_token_id, generator, stopping_criteria) -> torch.LongTensor:
    B, T = input_ids.shape
    total, device = T + max_new_tokens, input_ids.device
    ids = torch.full((B, total), pad_token_id, dtype=torch.long, device=device)  # (B, T + n), filled step by step
    ids[:, :T] = input_ids
    if bool((attention_mask == 0).any()):  # one sync per call: padding needs a mask and mask-derived positions
        mask = torch.ones((B, total), dtype=attention_mask.dtype, device=device)  # new tokens are never padding
        mask[:, :T] = attention_mask
        # left padding: positions count from each row's first real token (transformers' generate does the same)
        pos = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, T)
    else:
        mask = None  # no padding anywhere: causal prefill, then mask-free single-token decoding
        pos = torch.arange(T, device=device).unsqueeze(0)  # (1, T)
    cache = StaticKVCache(model.config, B, total)
    step_ids = input_ids
    with _t_layout(model, _use_t_layout(model, B, max_new_tokens)) as head_t:
        n_new = _decode(model, ids, step_ids, mask, pos, cache, head_t, max_new_tokens, do_sample, temperature,
                        top_k, top_p, eos_ids, pad_token_id, generator, stopping_criteria)
    return ids[:, : T + n_new]


def _decode(model, ids, step_ids, mask, pos, cache, head_t, max_new_tokens, do_sample, temperature, top_k, top_p,
            eos_ids, pad_token_id, generator, stopping_criteria=()) -> int:
    """The token loop: fills ids[:, T:] in place; returns how many new tokens count (fewer when all rows hit eos)."""
    B, T = step_ids.shape
    device = ids.device
    sync_every = 1 if device.type == "cpu" else _SYNC_EVERY
    check_eos = len(eos_ids) > 0 or len(stopping_criteria) > 0
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    all_done = torch.zeros(max(max_new_tokens, 1), dtype=torch.bool, device=device)  # after step s: every row ended
    for s in range(max_new_tokens):
        step_mask = mask[:, : cache.length + step_ids.size(1)] if mask is not None else None
        h = model.transformer(step_ids, past_key_values=cache, attention_mask=step_mask, position_ids=pos,
                              use_cache=True).last_hidden_state[:, -1]  # (B, C): only the last position's logits
        logits = (h @ head_t if head_t is not None else model.lm_head(h)).float()  # (B, C) x (C, V) -> (B, V)
        if do_sample:
            logits = _top_k_top_p(logits / temperature, top_k, top_p)
            next_ids = torch.multinomial(logits.softmax(-1), num_samples=1, generator=generator).squeeze(1)
        else:
            next_ids = logits.argmax(dim=-1)  # (B,)
        next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad_token_id))
        ids[:, T + s] = next_ids
        step_ids, pos = next_ids[:, None], pos[:, -1:] + 1  # (B, 1), (B or 1, 1)
        if check_eos:
            unfinished &= ~torch.isin(next_ids, eos_ids)
            for criterion in stopping_criteria:  # transformers: unfinished &= ~criteria(input_ids, scores)
                unfinished &= ~torch.as_tensor(criterion(ids[:, : T + s + 1], logits), device=device, dtype=torch.bool)
            all_done[s] = ~unfinished.any()  # stays on the device
            if (s + 1) % sync_every == 0 or s == max_new_tokens - 1:
                if bool(all_done[: s + 1].any()):  # the host sync
                    return int(all_done.int().argmax()) + 1  # the first step after which every row had ended
    return max_new_tokens
