"""The LM loss without the full logits: the lm_head projection and the cross-entropy per chunk of tokens.

At GPT-2's vocabulary the logits of one 8 x 1024-token micro-batch are 8192 x 50257 fp32 values (1.6 GB), and the
unchunked loss keeps more tensors of that size alive for its backward (the log-softmax, then the gradient of the
logits). Here the tokens are taken `chunk_size` at a time: each chunk's logits are computed, reduced to its loss, and
turned at once into that chunk's gradients of the hidden states and of the projection weight (softmax - one-hot,
two matmuls), after which they are freed. So at most two chunk-sized buffers (the logits and their log-softmax) exist
at any time besides the gradients, and the backward pass only scales the stored gradients by the incoming gradient:
no recomputation, the same three matmuls as the unchunked loss.

Source: the fused linear cross-entropy of Liger-Kernel (linkedin/Liger-Kernel, src/liger_kernel/ops/
fused_linear_cross_entropy.py: gradients computed in the forward, chunk by chunk, scaled in the backward) and
torchtune's chunked cross-entropy (torchtune/modules/loss/ce_chunked_output_loss.py); the loss itself is
transformers' ForCausalLMLoss (labels shifted left inside, -100 ignored, mean over the counted tokens or sum /
num_items_in_batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # transformers' / torch's ignore_index of the LM loss


def _loss_and_grads(hidden, weight, labels, divisor, chunk_size, need_h, need_w):
    """(sum of the token losses (0-dim fp32), d sum/divisor / d hidden or None, d sum/divisor / d weight or None),
    one chunk of `chunk_size` tokens at a time. hidden (N, C), weight (V, C), labels (N,) with IGNORE_INDEX.

    The logits are computed in the dtype of hidden/weight and the softmax in fp32 (as transformers' `logits.float()`);
    the weight's gradient is accumulated in fp32 over the chunks."""
    n = hidden.size(0)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h, y = hidden[start:end], labels[start:end]  # (n_c, C), (n_c,)
        # (n_c, V): torch's fused log-softmax, as F.cross_entropy computes it; it becomes the softmax in place below
        logp = torch.log_softmax((h @ weight.t()).float(), dim=-1)
        valid = y != IGNORE_INDEX
        target = torch.where(valid, y, 0).unsqueeze(1)  # (n_c, 1): ignored rows point at token 0 and weigh 0
        # -log p(label), counted rows only (static shapes: no boolean indexing, torch.compile-friendly)
        total -= torch.where(valid, logp.gather(1, target).squeeze(1), 0.0).sum()
        if not (need_h or need_w):
            continue
        # d(sum of losses) / d logits = softmax - one_hot(label), times 1/divisor on counted rows and 0 on ignored
        # ones; that row scale is applied to the (n_c, C) operands and results, not to the (n_c, V) gradient
        g = logp.exp_()
        g.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=g.dtype))
        g = g.to(hidden.dtype)
        scale = (valid.to(torch.float32) / divisor).to(hidden.dtype).unsqueeze(1)  # (n_c, 1)
        if need_h:
            torch.mm(g, weight, out=grad_h[start:end]).mul_(scale)  # (n_c, C)
        if need_w:
            if g.dtype == torch.float32:
                grad_w.addmm_(g.t(), h * scale)  # (V, C)
            else:
                grad_w.add_((g.t() @ (h * scale)).float())
        del g, logp
    return total, grad_h, grad_w.to(weight.dtype) if grad_w is not None else None


class LinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight.T, labels) / divisor, with the gradients computed chunk by
    chunk in the forward and scaled by the incoming gradient in the backward (see the module doc).

    forward(hidden (N, C), weight (V, C), labels (N,) int64 with IGNORE_INDEX, divisor 0-dim tensor, chunk_size int)
    -> 0-dim fp32 loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, chunk_size):
        total, grad_h, grad_w = _loss_and_grads(hidden, weight, labels, divisor, chunk_size,
                                                ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        grad_w = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                    num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy of the logits `hidden @ weight.T` without materialising them.

    hidden (..., T, C): the final hidden states; weight (V, C): the LM head (tied: the token embedding); labels
    (..., T): token ids, -100 ignored, shifted left inside (the label of position t is labels[t + 1]).
    chunk_size: tokens per chunk (> 0). Returns the 0-dim fp32 loss: the mean over counted tokens, or their sum /
    num_items_in_batch (transformers' ForCausalLMLoss), equal to `lm_loss(hidden @ weight.T, labels)` up to float
    rounding; its gradients reach `hidden` and `weight`. Raises ValueError for chunk_size <= 0.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.size(-1))
    if num_items_in_batch is None:
        divisor = (shift_labels != IGNORE_INDEX).sum().float()  # 0 counted tokens: 0/0 = nan, as F.cross_entropy
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):  # validation: the loss only
        return _loss_and_grads(h, weight, shift_labels, divisor, chunk_size, False, False)[0] / divisor
    return LinearCrossEntropy.apply(h, weight, shift_labels, divisor, chunk_size)


__all__ = ["IGNORE_INDEX", "LinearCrossEntropy", "chunked_lm_loss"]
