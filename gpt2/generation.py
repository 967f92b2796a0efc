"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, eos stop, left-padded batches.

Follows transformers' GenerationMixin where it matters for equal results: position ids from the attention mask
(cumsum - 1, so left-padded rows start at position 0), logits processors applied in the order temperature ->
top-k -> top-p, finished rows continue with pad_token_id.
"""

from __future__ import annotations

import warnings

import torch


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


@torch.no_grad()
def generate(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int | None = None, max_length: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.LongTensor:
    """Return prompt + generated tokens, (B, T + n). Rows that hit eos are padded with pad_token_id afterwards."""
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
        ids, mask = input_ids, attention_mask
        unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
        past, step_ids = None, input_ids
        for _ in range(max_new_tokens):
            out = model(step_ids, past_key_values=past, attention_mask=mask, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()  # (B, V)
            if do_sample:
                logits = _top_k_top_p(logits / temperature, top_k, top_p)
                next_ids = torch.multinomial(logits.softmax(-1), num_samples=1, generator=generator).squeeze(1)
            else:
                next_ids = logits.argmax(dim=-1)  # (B,)
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad_token_id))
            ids = torch.cat([ids, next_ids[:, None]], dim=-1)
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)
            step_ids = next_ids[:, None]
            if len(eos_ids):
                unfinished &= ~torch.isin(next_ids, eos_ids)
                if not unfinished.any():  # one host sync per token, as in transformers' stopping criteria
                    break
    finally:
        model.train(was_training)
    return ids
