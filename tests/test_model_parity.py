"""Parity with transformers (the pinned dev version) on tiny odd-sized random configs, fp32.

Every class x backend (eager, sdpa) x Mistral flags (off, on), both directions:
  HF model -> save_pretrained -> our from_pretrained, and ours -> save_pretrained -> transformers' from_pretrained.
Outputs at non-padded positions <= 1e-5, losses and gradients <= 1e-4; batches mix left and right padding.

transformers 5.24 GPT-2 forward uses arange positions even for left-padded rows (only its generate() derives them
from the mask); ours derives them from attention_mask. So the HF side gets the mask-derived position_ids explicitly
— exactly what its generate() passes — and ours gets none.
"""

import warnings

import pytest
import torch
import transformers
from helpers import randomize

import gpt2
from gpt2.hf_io import hf_key

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: 1 thread is faster (conftest)

TOL_OUT, TOL_LOSS = 1e-5, 1e-4
CLASSES = ["GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification",
           "GPT2ForTokenClassification", "GPT2ForQuestionAnswering"]
PAD = 0
B, T, V, N_CHOICES = 3, 9, 97, 2


def tiny_kwargs(mistral: bool, **kw):
    # odd sizes on purpose: head_dim 6, 5 heads, 3 layers, vocab 97, MLP width not 4C
    return dict(vocab_size=V, n_positions=24, n_embd=30, n_layer=3, n_head=5, n_inner=50,
                bos_token_id=1, eos_token_id=2, pad_token_id=PAD, num_labels=3,
                scale_attn_by_inverse_layer_idx=mistral, reorder_and_upcast_attn=mistral, **kw)


def batch(cls_name, padded: bool, seed=0):
    """Inputs and labels for one class; padded batches: row 1 right-padded, row 2 left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        mask[1, -3:] = 0
        mask[2, :2] = 0
        ids = ids.masked_fill(mask == 0, PAD)
    kw = dict(input_ids=ids, attention_mask=mask if padded else None)
    labels_lm = lm_labels(ids, mask)
    if cls_name == "GPT2LMHeadModel":
        kw["labels"] = labels_lm
    elif cls_name == "GPT2DoubleHeadsModel":
        # (B, n_choices, T): the same rows twice, shifted; mc token = each row's last real token
        kw["input_ids"] = torch.stack([ids, ids.roll(1, dims=0)], dim=1)
        m2 = torch.stack([mask, mask.roll(1, dims=0)], dim=1)
        kw["attention_mask"] = m2 if padded else None
        last = (torch.arange(T) * (m2 != 0)).argmax(-1)  # (B, n_choices)
        kw["mc_token_ids"] = last
        kw["labels"] = lm_labels(kw["input_ids"], m2)
        kw["mc_labels"] = torch.randint(0, N_CHOICES, (B,), generator=g)
    elif cls_name == "GPT2ForSequenceClassification":
        kw["labels"] = torch.randint(0, 3, (B,), generator=g)
    elif cls_name == "GPT2ForTokenClassification":
        kw["labels"] = torch.randint(0, 3, (B, T), generator=g).masked_fill(mask == 0, -100)
    elif cls_name == "GPT2ForQuestionAnswering" and not padded:  # pad-position logits would enter the QA loss
        kw["start_positions"] = torch.randint(0, T, (B,), generator=g)
        kw["end_positions"] = torch.randint(0, T, (B,), generator=g)
    return kw


def lm_labels(ids, mask):
    # -100 at pads, and at a left-padded row's first real token: it is predicted from a pad position, whose output
    # is undefined (transformers and we fill fully masked rows differently), so no loss may depend on it
    prev_is_pad = torch.nn.functional.pad(mask, (1, 0), value=1)[..., :-1] == 0
    return ids.masked_fill((mask == 0) | prev_is_pad, -100)


def hf_position_ids(mask):
    # what transformers' generate() derives (GenerationMixin._prepare_position_ids_for_generation)
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def run(model, kw, hf: bool):
    kw = dict(kw)
    if hf and kw.get("attention_mask") is not None:
        mask = kw["attention_mask"]
        kw["position_ids"] = hf_position_ids(mask).reshape(-1, mask.size(-1))  # HF wants (B*n_choices, T) here
    return model(**kw)


def outputs_and_loss(out, cls_name, kw):
    """(dict of outputs restricted to non-padded positions, scalar loss to backprop)."""
    mask = kw.get("attention_mask")
    keep = (mask != 0) if mask is not None else None
    res = {}
    if cls_name == "GPT2Model":
        h = out.last_hidden_state
        res["last_hidden_state"] = h[keep] if keep is not None else h
        w = torch.linspace(-1, 1, h.numel()).view_as(h)
        loss = (h * w * (keep[..., None] if keep is not None else 1)).sum()
    elif cls_name == "GPT2ForQuestionAnswering":
        for k in ("start_logits", "end_logits"):
            v = getattr(out, k)
            res[k] = v[keep] if keep is not None else v
        loss = out.loss if out.loss is not None else (res["start_logits"].sum() + res["end_logits"].sum())
    else:
        v = out.logits
        res["logits"] = v[keep] if keep is not None and v.dim() > 2 else v
        if cls_name == "GPT2DoubleHeadsModel":
            res["mc_logits"] = out.mc_logits
            res["mc_loss"] = out.mc_loss
        loss = out.loss + (out.mc_loss if cls_name == "GPT2DoubleHeadsModel" else 0)
    if getattr(out, "loss", None) is not None:
        res["loss"] = out.loss
    return res, loss


def grads_by_hf_name(ours, with_prefix):
    g = {}
    for name, p in ours.named_parameters():
        k, transposed = hf_key(name, with_prefix)
        g[k] = p.grad.t() if transposed else p.grad
    return g


def compare(ours, theirs, cls_name, kw):
    o_res, o_loss = outputs_and_loss(run(ours, kw, hf=False), cls_name, kw)
    h_res, h_loss = outputs_and_loss(run(theirs, kw, hf=True), cls_name, kw)
    assert o_res.keys() == h_res.keys()
    for k in o_res:
        tol = TOL_LOSS if "loss" in k else TOL_OUT
        torch.testing.assert_close(o_res[k], h_res[k], atol=tol, rtol=0, msg=lambda m: f"{cls_name}.{k}: {m}")
    o_loss.backward()
    h_loss.backward()
    with_prefix = cls_name != "GPT2Model"
    og = grads_by_hf_name(ours, with_prefix)
    hg = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert set(og) == set(hg), set(og) ^ set(hg)
    for n in og:
        torch.testing.assert_close(og[n], hg[n], atol=TOL_LOSS, rtol=0, msg=lambda m: f"grad {n}: {m}")


def hf_reference_impl(backend: str, mistral: bool) -> str:
    # transformers' sdpa path ignores reorder_and_upcast_attn (only its eager path upcasts), so with the flags on
    # the correct maths is transformers' eager; ours must equal it on every backend.
    return "eager" if mistral else backend


@pytest.mark.parametrize("mistral", [False, True], ids=["plain", "mistral"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_hf_to_ours(cls_name, backend, mistral, tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(**tiny_kwargs(mistral))
    theirs = randomize(getattr(transformers, cls_name)(hf_cfg)).eval()
    theirs.save_pretrained(tmp_path)
    theirs = getattr(transformers, cls_name).from_pretrained(tmp_path, attn_implementation=hf_reference_impl(backend, mistral)).eval()
    ours = getattr(gpt2, cls_name).from_pretrained(tmp_path, attn_implementation=backend)
    assert not ours.training
    for padded in (False, True):
        ours.zero_grad(), theirs.zero_grad()
        compare(ours, theirs, cls_name, batch(cls_name, padded))


@pytest.mark.parametrize("mistral", [False, True], ids=["plain", "mistral"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_ours_to_hf(cls_name, backend, mistral, tmp_path):
    torch.manual_seed(0)
    ours = randomize(getattr(gpt2, cls_name)(gpt2.GPT2Config(**tiny_kwargs(mistral), attn_implementation=backend)), seed=1).eval()
    ours.save_pretrained(tmp_path)
    theirs = getattr(transformers, cls_name).from_pretrained(tmp_path, attn_implementation=hf_reference_impl(backend, mistral)).eval()
    for padded in (False, True):
        ours.zero_grad(), theirs.zero_grad()
        compare(ours, theirs, cls_name, batch(cls_name, padded, seed=2))


def _pair(tmp_path, cls_name="GPT2LMHeadModel", backend="eager", **kw):
    ours = randomize(getattr(gpt2, cls_name)(gpt2.GPT2Config(**{**tiny_kwargs(False), **kw}, attn_implementation=backend))).eval()
    ours.save_pretrained(tmp_path)
    theirs = getattr(transformers, cls_name).from_pretrained(tmp_path, attn_implementation="eager").eval()
    return ours, theirs


@pytest.mark.parametrize("problem_type,num_labels", [("regression", 1), ("single_label_classification", 3),
                                                      ("multi_label_classification", 3), (None, 1), (None, 3)])
def test_sequence_classification_problem_types(problem_type, num_labels, tmp_path):
    ours, theirs = _pair(tmp_path, "GPT2ForSequenceClassification", problem_type=problem_type, num_labels=num_labels)
    kw = batch("GPT2ForSequenceClassification", padded=True)
    g = torch.Generator().manual_seed(3)
    if problem_type == "regression" or (problem_type is None and num_labels == 1):
        kw["labels"] = torch.randn(B, generator=g) if num_labels == 1 else torch.randn(B, num_labels, generator=g)
    elif problem_type == "multi_label_classification":
        kw["labels"] = torch.randint(0, 2, (B, num_labels), generator=g).float()
    o, h = run(ours, kw, hf=False), run(theirs, kw, hf=True)
    torch.testing.assert_close(o.logits, h.logits, atol=TOL_OUT, rtol=0)
    torch.testing.assert_close(o.loss, h.loss, atol=TOL_LOSS, rtol=0)


def test_sequence_classification_pools_last_real_token_for_left_and_right_padding():
    model = randomize(gpt2.GPT2ForSequenceClassification(gpt2.GPT2Config(**tiny_kwargs(False)))).eval()
    ids = torch.randint(3, V, (1, 6))
    alone = model(ids).logits
    right = model(torch.cat([ids, torch.full((1, 3), PAD)], 1), attention_mask=torch.tensor([[1] * 6 + [0] * 3])).logits
    left = model(torch.cat([torch.full((1, 3), PAD), ids], 1), attention_mask=torch.tensor([[0] * 3 + [1] * 6])).logits
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)  # positions come from the mask, so left = unpadded
    with pytest.raises(ValueError, match="pad_token_id"):
        gpt2.GPT2ForSequenceClassification(gpt2.GPT2Config(**{**tiny_kwargs(False), "pad_token_id": None}))(
            torch.randint(3, V, (2, 5)))


@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu", "gelu_pytorch_tanh", "quick_gelu", "silu", "swish",
                                 "tanh", "gelu_fast", "gelu_accurate", "gelu_10", "mish", "relu2", "linear", "sigmoid",
                                 "leaky_relu", "laplace", "sqrtsoftplus", "relu6", "hardswish", "gelu_python",
                                 "gelu_python_tanh"])
def test_activations_match_transformers(act, tmp_path):
    ours, theirs = _pair(tmp_path, activation_function=act)
    ids = torch.randint(3, V, (2, T))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=TOL_OUT, rtol=0)


def test_hidden_states_and_attentions_match_transformers_eager(tmp_path):
    ours, theirs = _pair(tmp_path, backend="sdpa")  # asking for attentions switches ours to eager for that call
    kw = batch("GPT2LMHeadModel", padded=True)
    del kw["labels"]
    o = run(ours, {**kw, "output_hidden_states": True, "output_attentions": True}, hf=False)
    h = run(theirs, {**kw, "output_hidden_states": True, "output_attentions": True}, hf=True)
    keep = kw["attention_mask"] != 0
    assert len(o.hidden_states) == len(h.hidden_states) == 4 and len(o.attentions) == len(h.attentions) == 3
    for a, b in zip(o.hidden_states, h.hidden_states):
        torch.testing.assert_close(a[keep], b[keep], atol=TOL_OUT, rtol=0)
    for a, b in zip(o.attentions, h.attentions):  # (B, nh, T, T): rows of real query tokens
        torch.testing.assert_close(a.transpose(1, 2)[keep], b.transpose(1, 2)[keep], atol=TOL_OUT, rtol=0)


def test_unpadded_forward_matches_transformers_without_position_ids(tmp_path):
    # no mask at all -> our is_causal fast path; and an all-ones mask -> the masked path; both = HF forward as is
    ours, theirs = _pair(tmp_path, backend="sdpa")
    ids = torch.randint(3, V, (2, T))
    ref = theirs(ids).logits
    torch.testing.assert_close(ours(ids).logits, ref, atol=TOL_OUT, rtol=0)
    torch.testing.assert_close(ours(ids, attention_mask=torch.ones_like(ids)).logits, ref, atol=TOL_OUT, rtol=0)
    pos = torch.arange(T).expand(2, T)
    torch.testing.assert_close(ours(ids, position_ids=pos).logits, ref, atol=TOL_OUT, rtol=0)


def test_token_type_ids_and_lm_loss_ignore_index(tmp_path):
    ours, theirs = _pair(tmp_path)
    ids = torch.randint(3, V, (2, T))
    tt = torch.randint(0, 5, (2, T))
    labels = ids.clone()
    labels[:, :4] = -100
    o, h = ours(ids, token_type_ids=tt, labels=labels), theirs(ids, token_type_ids=tt, labels=labels)
    torch.testing.assert_close(o.logits, h.logits, atol=TOL_OUT, rtol=0)
    torch.testing.assert_close(o.loss, h.loss, atol=TOL_LOSS, rtol=0)


def test_reorder_and_upcast_under_bf16_autocast_is_honoured_by_sdpa(tmp_path):
    """Under autocast the flag changes the numerics (fp32 QK^T + softmax). SDPA cannot do that, so it must fall back
    to the eager upcast path with one warning — never ignore the flag (transformers' sdpa path ignores it)."""
    import gpt2.attention as A

    eager, theirs = _pair(tmp_path, backend="eager", reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)
    sdpa = gpt2.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    ids = torch.randint(3, V, (2, T))
    A._warned.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out_sdpa = sdpa(ids).logits.float()
            sdpa(ids)  # a second call must not warn again
        out_eager = eager(ids).logits.float()
        ref = theirs(ids).logits.float()
    assert len([x for x in w if "reorder_and_upcast_attn" in str(x.message)]) == 1
    torch.testing.assert_close(out_sdpa, out_eager, atol=0, rtol=0)  # the same upcast maths, bit for bit
    # transformers' eager upcast path, up to bf16 rounding of the surrounding (non-attention) ops
    torch.testing.assert_close(out_eager, ref, atol=0.1, rtol=0.02)


def test_upcast_attention_is_more_accurate_than_plain_low_precision():
    import gpt2.attention as A

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g) * 3 for _ in range(3))
    scale = 8 ** -0.5
    exact = A.eager_attention(q.double(), k.double(), v.double(), is_causal=True, scale=scale)[0]
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        up = A.eager_attention(qb, kb, vb, is_causal=True, scale=scale, upcast=True)[0]
        plain = A.eager_attention(qb, kb, vb, is_causal=True, scale=scale, upcast=False)[0]
    assert up.dtype == torch.bfloat16
    assert (up.double() - exact).abs().max() < (plain.double() - exact).abs().max()


def test_flash_backend_needs_cuda_clear_error():
    model = gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**tiny_kwargs(False), attn_implementation="flash"))
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="attn_implementation='sdpa'"):
        model(torch.randint(3, V, (1, 5)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_matches_sdpa_on_gpu():
    cfg = gpt2.GPT2Config(**tiny_kwargs(False))
    model = randomize(gpt2.GPT2LMHeadModel(cfg)).cuda().eval()
    ids = torch.randint(3, V, (2, T), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(ids).logits.float()
        for m in model.modules():
            if isinstance(m, gpt2.modeling.GPT2Attention):
                m.attn_implementation = "flash"
        out = model(ids).logits.float()
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=0)


def test_gradient_checkpointing_same_gradients():
    cfg = gpt2.GPT2Config(**tiny_kwargs(False))
    a = randomize(gpt2.GPT2LMHeadModel(cfg)).train()
    b = randomize(gpt2.GPT2LMHeadModel(cfg)).train()
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    for m in (a, b):
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
            if isinstance(mod, gpt2.modeling.GPT2Attention):
                mod.attn_pdrop = 0.0
    b.gradient_checkpointing_enable()
    assert b.is_gradient_checkpointing
    ids = torch.randint(3, V, (2, T))
    a(ids, labels=ids).loss.backward()
    b(ids, labels=ids).loss.backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0, msg=lambda m: n + m)


def test_tied_token_lookup_gradient_is_dense_and_equals_the_dense_path(monkeypatch):
    """A training forward of the LM looks tokens up with a sparse gradient (tied wte = lm_head): autograd sums it
    into the lm_head's dense gradient, so `.grad` stays dense (optimizers and DDP need that) and equals the dense
    lookup's. Untied weights, no labels or no grad mode keep the dense path."""
    torch.manual_seed(0)
    ours = gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**tiny_kwargs(False))).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    assert ours._sparse_embedding_grad()
    ours(input_ids=ids, labels=ids).loss.backward()
    sparse_path = ours.transformer.wte.weight.grad
    assert sparse_path.layout == torch.strided
    ours.zero_grad()
    monkeypatch.setattr(gpt2.GPT2LMHeadModel, "_sparse_embedding_grad", lambda self: False)
    ours(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(sparse_path, ours.transformer.wte.weight.grad, atol=1e-6, rtol=0)
    monkeypatch.undo()
    torch.optim.AdamW(ours.parameters(), fused=True).step()  # a sparse .grad would be refused here
    with torch.no_grad():
        assert not ours._sparse_embedding_grad()
    untied = gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**tiny_kwargs(False), tie_word_embeddings=False))
    assert not untied._sparse_embedding_grad()
