"""Attention backends: plain functions with one signature, in a registry keyed by `config.attn_implementation`.

    out, weights = ATTENTION_BACKENDS[name](q, k, v, mask=..., is_causal=..., scale=..., dropout_p=..., upcast=...)

q: (B, nh, Tq, hs), k/v: (B, nh, Tk, hs) -> out: (B, nh, Tq, hs); weights: (B, nh, Tq, Tk) or None.
`mask` is None or a bool tensor broadcastable to (B, 1, Tq, Tk), True = may attend. `is_causal=True` (only ever
together with mask=None and Tq == Tk) asks for the plain causal pattern, which fused kernels do without a mask tensor.
`scale` already contains both GPT-2 factors: 1/sqrt(hs) (scale_attn_weights) and the Mistral 1/(layer_idx+1).
`upcast` is the Mistral `reorder_and_upcast_attn` flag: QK^T (scale folded into the matmul) and softmax in fp32
even under autocast, then cast back to v's dtype.

Backends own no parameters, so any checkpoint runs on any backend (torchtitan-style registry). The registry is the
one place where backend names are spelled: the config validates `attn_implementation` against its keys, and each
entry carries the facts other code needs about its backend (see `AttentionBackend`).
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

# torch is imported inside the kernels, not here: the registry below (names and facts) is read by config validation
# before torch is imported (a wrong option is refused in well under a second); a local import is a dict lookup.
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def eager_attention(q, k, v, *, mask=None, is_causal=False, scale, dropout_p=0.0, upcast=False):
    """Explicit softmax(QK^T * scale + mask) V — the reference maths (= transformers' eager path)."""
    import torch
    import torch.nn.functional as F

    B, nh, Tq, hs = q.shape
    Tk = k.size(-2)
    if upcast:
        # Mistral: the product and softmax in fp32 with autocast off; scale folded in as the matmul's alpha
        # (transformers GPT2Attention._upcast_and_reordered_attn, after Megatron-LM's baddbmm).
        with torch.autocast(q.device.type, enabled=False):
            att = torch.baddbmm(
                torch.empty(B * nh, Tq, Tk, dtype=torch.float32, device=q.device),
                q.reshape(B * nh, Tq, hs).float(),
                k.transpose(-1, -2).reshape(B * nh, hs, Tk).float(),
                beta=0.0, alpha=scale,
            ).view(B, nh, Tq, Tk)  # (B, nh, Tq, Tk) fp32
    else:
        att = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, nh, Tq, Tk)
    if is_causal:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    if mask is not None:
        # finfo.min, not -inf: same as transformers' additive mask, and a fully masked row cannot produce NaN
        att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
    att = F.softmax(att, dim=-1)
    if upcast and att.dtype != torch.float32:
        raise RuntimeError("reorder_and_upcast_attn: attention probabilities are not fp32")  # would be a bug here
    att = att.to(v.dtype)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return torch.matmul(att, v), att  # (B, nh, Tq, hs), (B, nh, Tq, Tk)


def _needs_upcast_fallback(q, upcast: bool) -> bool:
    import torch

    # In fp32 a fused kernel already computes QK^T and softmax in fp32, so the flag is honoured as is. In fp16/bf16
    # (autocast or a half model) it is not: then only the explicit upcast path gives the flag's numerics.
    return upcast and q.dtype != torch.float32


def sdpa_attention(q, k, v, *, mask=None, is_causal=False, scale, dropout_p=0.0, upcast=False):
    """torch.nn.functional.scaled_dot_product_attention; the scale is always passed explicitly."""
    import torch.nn.functional as F

    if _needs_upcast_fallback(q, upcast):
        _warn_once("sdpa-upcast", "reorder_and_upcast_attn=True with fp16/bf16 attention inputs: SDPA cannot compute "
                   "QK^T and softmax in fp32, so these calls use the eager upcast path (slower, exact).")
        return eager_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p, upcast=True)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return y, None


def _flash_attn_func() -> Callable | None:
    try:
        from flash_attn import flash_attn_func  # Dao-AILab/flash-attention, optional
    except ImportError:
        return None
    return flash_attn_func


def flash_available() -> bool:
    """True when the flash backend can run here: the flash-attn package or torch's SDPA flash kernel, on CUDA."""
    import torch

    if not torch.cuda.is_available():
        return False
    return _flash_attn_func() is not None or torch.backends.cuda.is_flash_attention_available()


def flash_attention(q, k, v, *, mask=None, is_causal=False, scale, dropout_p=0.0, upcast=False):
    """FlashAttention: the flash-attn package when importable, else SDPA restricted to its flash kernel."""
    import torch
    import torch.nn.functional as F

    if q.device.type != "cuda" or not flash_available():
        raise RuntimeError(
            f"attn_implementation='flash' needs a CUDA GPU with FlashAttention (the flash-attn package or a torch "
            f"build with the SDPA flash kernel); this tensor is on {q.device.type}. Use attn_implementation='sdpa' "
            f"instead.")
    if _needs_upcast_fallback(q, upcast):
        _warn_once("flash-upcast", "reorder_and_upcast_attn=True: FlashAttention cannot compute QK^T in fp32, so these "
                   "calls use the eager upcast path (slower, exact).")
        return eager_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p, upcast=True)
    if mask is not None or q.dtype not in (torch.float16, torch.bfloat16):
        # Flash kernels take neither an arbitrary mask (padding, cache offsets) nor fp32 inputs.
        _warn_once("flash-mask", "attn_implementation='flash': calls with a padding/offset mask or fp32 inputs cannot "
                   "use the flash kernel and run through generic SDPA instead.")
        return sdpa_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p, upcast=upcast)
    fa = _flash_attn_func()
    if fa is not None:
        # flash-attn wants (B, T, nh, hs); the transposes are views of the projection output, no copy.
        y = fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, softmax_scale=scale,
               causal=is_causal)
        return y.transpose(1, 2), None  # (B, nh, Tq, hs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return y, None


class AttentionBackend(NamedTuple):
    """One registry entry: the backend function and what callers need to know about it without running it."""

    fn: Callable  # (q, k, v, *, mask, is_causal, scale, dropout_p, upcast) -> (out, weights or None)
    needs_cuda: bool  # runs only on a CUDA GPU (raises elsewhere)
    materializes_scores: bool  # holds the (B, nh, Tq, Tk) probabilities in memory: O(T^2) activations per layer
    returns_weights: bool  # returns those probabilities (transformers' output_attentions) instead of None

    def __call__(self, q, k, v, **kwargs):
        return self.fn(q, k, v, **kwargs)


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "eager": AttentionBackend(eager_attention, needs_cuda=False, materializes_scores=True, returns_weights=True),
    "sdpa": AttentionBackend(sdpa_attention, needs_cuda=False, materializes_scores=False, returns_weights=False),
    "flash": AttentionBackend(flash_attention, needs_cuda=True, materializes_scores=False, returns_weights=False),
}
DEFAULT_ATTENTION = "sdpa"  # torch's fused kernels where they apply, on every device


def attention_backend(name: str, need_weights: bool = False) -> AttentionBackend:
    """The backend `name`, or, when the caller needs the attention probabilities and it does not return them, the
    first one that does: transformers, too, answers output_attentions=True with its eager path."""
    backend = ATTENTION_BACKENDS[name]
    if need_weights and not backend.returns_weights:
        backend = next(b for b in ATTENTION_BACKENDS.values() if b.returns_weights)
    return backend
