"""Chunked cross-entropy (gpt2/loss.py, GPT2Config.loss_chunk_size): the loss and every gradient equal the unchunked
loss's within 1e-6 relative (norm of the difference / norm), with ignored (-100) labels, chunks that do not divide the
tokens, num_items_in_batch, tied and untied heads; the forward returns logits None only when it chunks; a training
run's model chunks by default and its HF export's config.json does not carry the switch.

Tolerance: 1e-6 relative. Chunking sums the tokens' losses and the lm_head weight's gradient in another order than
one (tokens x vocab) matmul does, so the results differ in the last float32 bits (measured here: <= 4e-7).
"""

from __future__ import annotations

import json

import pytest
import torch

import gpt2
from gpt2.compat import lm_loss
from gpt2.loss import chunked_lm_loss

RTOL = 1e-6
V = 3001  # a vocabulary no chunk or vector width divides


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model_pair(chunk: int, tie: bool = True):
    cfg = dict(vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie)
    torch.manual_seed(0)
    plain = gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_preset("tiny", **cfg))
    chunked = gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_preset("tiny", loss_chunk_size=chunk, **cfg))
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


def batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (3, 50), generator=g)
    labels = x.clone()
    labels[0, :7] = -100  # prompt tokens left out of the loss
    labels[2, 30:] = -100
    return x, labels


@pytest.mark.parametrize("chunk,tie,num_items", [(64, True, None), (7, False, None), (1000, True, 123)])
def test_loss_and_every_gradient_equal_the_unchunked(chunk, tie, num_items):
    plain, chunked = model_pair(chunk, tie)
    x, labels = batch()
    outs = {}
    for name, m in (("plain", plain), ("chunked", chunked)):
        out = m(input_ids=x, labels=labels, num_items_in_batch=num_items)
        out.loss.backward()
        outs[name] = out
    assert outs["plain"].logits.shape == (3, 50, V) and outs["chunked"].logits is None
    assert rel(outs["chunked"].loss, outs["plain"].loss) <= RTOL
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for n, p in chunked.named_parameters():
        assert rel(p.grad, grads[n]) <= RTOL, n


def test_the_function_alone_and_without_grad():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 40, 16, generator=g, requires_grad=True)
    w = (torch.randn(V, 16, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, V, (2, 40), generator=g)
    ref = lm_loss(h @ w.t(), y)
    got = chunked_lm_loss(h, w, y, chunk_size=33)
    assert rel(got, ref) <= RTOL
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(ref, (h, w))):
        assert rel(a, b) <= RTOL
    with torch.no_grad():  # validation: the loss only (no gradient buffers)
        assert rel(chunked_lm_loss(h, w, y, 33), ref.detach()) <= RTOL
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        chunked_lm_loss(h, w, y, 0)


def test_logits_when_asked_and_by_default_without_the_switch():
    plain, chunked = model_pair(64)
    x, labels = batch()
    with torch.no_grad():
        asked = chunked(input_ids=x, labels=labels, skip_logits=False)
        ref = plain(input_ids=x, labels=labels)
        assert torch.equal(asked.logits, ref.logits) and torch.equal(asked.loss, ref.loss)
        assert chunked(input_ids=x).logits.shape == (3, 50, V)  # no labels: the logits, as always
        forced = plain(input_ids=x, labels=labels, skip_logits=True)  # chunks even with loss_chunk_size=0
        assert forced.logits is None and rel(forced.loss, ref.loss) <= RTOL
        with pytest.raises(ValueError, match="skip_logits=True .* needs labels"):
            plain(input_ids=x, skip_logits=True)
    assert gpt2.GPT2Config().loss_chunk_size == 0  # gpt2 on its own keeps transformers' behaviour


def test_a_training_model_chunks_and_its_export_config_does_not_carry_it(tmp_path):
    from train.config import AttentionConfig, ModelConfig, StabilityConfig
    from train.tasks.model import build_model

    model = build_model(gpt2.GPT2LMHeadModel, ModelConfig(), AttentionConfig(), StabilityConfig(), 512, 0)
    assert model.config.loss_chunk_size == ModelConfig().loss_chunk_size > 0
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "loss_chunk_size" not in saved and saved["n_embd"] == model.config.n_embd
    with pytest.raises(ValueError, match="loss_chunk_size must be an integer >= 0"):
        gpt2.GPT2Config(loss_chunk_size=-1)
