"""KV cache and generate(): incremental = full forward, greedy = transformers' greedy token for token, sampling
controls, eos stop, left padding; and the two usage examples of the Hugging Face GPT-2 page on our classes."""

import pytest
import torch
import transformers
from helpers import corpus_text, randomize

import gpt2

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: 1 thread is faster (conftest)

V = 97
CFG = dict(vocab_size=V, n_positions=64, n_embd=30, n_layer=3, n_head=5, bos_token_id=1, eos_token_id=2,
           pad_token_id=0)


def left_padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("mistral", [False, True])
def test_kv_cache_incremental_equals_full_forward(backend, mistral):
    model = randomize(gpt2.GPT2LMHeadModel(gpt2.GPT2Config(
        **CFG, attn_implementation=backend, scale_attn_by_inverse_layer_idx=mistral, reorder_and_upcast_attn=mistral)))
    ids, mask = left_padded_batch()
    full = model(ids, attention_mask=mask).logits  # (B, T, V)
    keep = mask.bool()
    # prefill 3 tokens, then 2 tokens at once (a multi-token step with a cache offset), then one at a time
    out = model(ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
    steps, past = [out.logits], out.past_key_values
    for a, b in [(3, 5), (5, 6), (6, 7), (7, 8)]:
        out = model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=past, use_cache=True)
        steps.append(out.logits)
        past = out.past_key_values
    inc = torch.cat(steps, dim=1)
    torch.testing.assert_close(inc[keep], full[keep], atol=1e-5, rtol=0)
    assert len(past) == 3 and past[0][0].shape == (3, 5, 8, 6)  # (B, nh, T, hs) per layer
    # no padding: the mask-free cache path (one token attends everything, several tokens get an offset causal mask)
    ids2 = torch.randint(3, V, (2, 7))
    full2 = model(ids2).logits
    o = model(ids2[:, :4], use_cache=True)
    o2 = model(ids2[:, 4:6], past_key_values=o.past_key_values)
    o3 = model(ids2[:, 6:], past_key_values=o2.past_key_values)
    torch.testing.assert_close(torch.cat([o.logits, o2.logits, o3.logits], 1), full2, atol=1e-5, rtol=0)


def test_left_padding_gives_the_unpadded_result():
    model = randomize(gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**CFG)))
    ids = torch.randint(3, V, (1, 6))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 4:], model(ids).logits, atol=1e-5, rtol=0)
    a = model.generate(ids, max_new_tokens=6)
    b = model.generate(padded, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(a[:, 6:], b[:, 10:])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_greedy_generate_equals_transformers(backend, tmp_path):
    ours = randomize(gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**CFG, attn_implementation=backend)))
    ours.save_pretrained(tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation=backend).eval()
    ids, mask = left_padded_batch(seed=1)
    ref = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=2)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(out, ref)
    # max_length counts the prompt, as in transformers
    assert ours.generate(ids, attention_mask=mask, max_length=11).shape == (3, 11)


def test_eos_stops_and_pads_finished_rows():
    model = randomize(gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**CFG)))
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(0))
    free = model.generate(ids, max_new_tokens=8, eos_token_id=[])  # [] = no eos at all
    new0 = free[0, 5:].tolist()
    j = max(i for i in range(len(new0)) if new0[i] not in new0[:i])  # the last first-occurrence in row 0
    eos = new0[j]
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out[0, : 5 + j + 1], free[0, : 5 + j + 1])  # identical up to and including eos
    assert torch.all(out[0, 5 + j + 1:] == 0)  # then padding
    if eos not in free[1, 5:].tolist():  # row 1 never emits it: unchanged (generation may stop once all rows end)
        assert torch.equal(out[1], free[1, : out.shape[1]])


def test_sampling_controls():
    model = randomize(gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**CFG)))
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(0))
    greedy = model.generate(ids, max_new_tokens=6)
    # top_k=1 and a tiny top_p both reduce sampling to greedy
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_p=1e-6), greedy)
    # the same generator seed -> the same sample; high temperature -> differs from greedy
    s1 = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(0))
    s2 = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and not torch.equal(s1, greedy)
    # top_k keeps samples inside the k most likely tokens of the first step
    top3 = model(ids).logits[:, -1].topk(3).indices
    for seed in range(5):
        s = model.generate(ids, max_new_tokens=1, do_sample=True, top_k=3, temperature=10.0,
                           generator=torch.Generator().manual_seed(seed))
        assert all(s[b, -1] in top3[b] for b in range(2))
    for bad, match in [(dict(temperature=0.0), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k")]:
        with pytest.raises(ValueError, match=match):
            model.generate(ids, max_new_tokens=2, do_sample=True, **bad)
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(ids, max_new_tokens=100)


# ------------------------------------------------------------------------------------------------------------
# The Hugging Face GPT-2 page's usage examples, on a locally saved folder (tokenizer trained here + tiny model)


@pytest.fixture(scope="module")
def hf_style_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    text = corpus_text(200_000)
    tok = gpt2.train_tokenizer(iter(text.splitlines()), vocab_size=400)
    tok.save_pretrained(folder)
    cfg = gpt2.GPT2Config.from_preset("tiny", vocab_size=len(tok), n_layer=2, n_embd=64, n_head=4,
                                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    gpt2.GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(folder)  # saved in bf16: dtype="auto" keeps it
    return folder


def test_hf_page_example_pipeline(hf_style_folder):
    pipeline = gpt2.pipeline(task="text-generation", model=str(hf_style_folder), dtype="auto")
    assert pipeline.model.dtype == torch.bfloat16
    out = pipeline("Plants create energy through a process known as photosynthesis.", max_new_tokens=20)
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"generated_text"}
    text = out[0]["generated_text"]
    assert text.startswith("Plants create energy through a process known as photosynthesis.")
    # greedy and seeded sampling are reproducible; list input gives one list per prompt
    g1 = pipeline("To be, or not", do_sample=False, max_new_tokens=10)
    assert g1 == pipeline("To be, or not", do_sample=False, max_new_tokens=10)
    assert pipeline("a", seed=3, max_length=12) == pipeline("a", seed=3, max_length=12)
    assert len(pipeline(["one", "two"], max_new_tokens=3)) == 2


def test_hf_page_example_tokenizer_generate_decode(hf_style_folder, tmp_path):
    tokenizer = gpt2.GPT2TokenizerFast.from_pretrained(hf_style_folder)
    model = gpt2.GPT2LMHeadModel.from_pretrained(hf_style_folder, dtype="auto")
    assert model.dtype == torch.bfloat16
    inputs = tokenizer("Plants create energy through a process known as photosynthesis.", return_tensors="pt")
    generated_ids = model.generate(**inputs, max_length=50)
    assert generated_ids.shape[1] <= 50 and torch.equal(generated_ids[:, : inputs["input_ids"].shape[1]],
                                                        inputs["input_ids"])
    text = tokenizer.decode(generated_ids[0], skip_special_tokens=True)
    assert text.startswith("Plants create energy through a process known as photosynthesis.")
    # and transformers produces the same tokens from the same folder
    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf_style_folder, dtype=torch.float32).eval()
    ours32 = gpt2.GPT2LMHeadModel.from_pretrained(hf_style_folder, dtype=torch.float32)
    ref = theirs.generate(**dict(inputs), max_length=50, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(ours32.generate(**inputs, max_length=50), ref)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_static_kv_cache_equals_full_forward(backend):
    # generate()'s preallocated cache, written in place: prefill with a padding mask, a 2-token step, then 1 at a time
    model = randomize(gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**CFG, attn_implementation=backend)))
    ids, mask = left_padded_batch()
    full = model(ids, attention_mask=mask).logits
    cache = gpt2.modeling.StaticKVCache(model.config, batch_size=3, max_len=10)
    steps = []
    for a, b in [(0, 3), (3, 5), (5, 6), (6, 7), (7, 8)]:
        out = model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache and cache.length == b
        steps.append(out.logits)
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[keep], full[keep], atol=1e-5, rtol=0)
    assert cache[0][0].shape == (3, 5, 8, 6)  # reads like the tuple cache: (B, nh, length, hs)
    with pytest.raises(ValueError, match="full"):
        model(ids[:, :3], attention_mask=torch.ones(3, 11, dtype=torch.long), past_key_values=cache)


def test_long_greedy_batch1_equals_transformers_on_decode_weight_copies(tmp_path):
    # batch 1 and >= 32 new tokens: the CPU decode path on (in, out) weight copies (gpt2/generation.py); the copies
    # follow in-place weight updates (an optimizer step) and do not outlive the call
    ours = randomize(gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**CFG, attn_implementation="sdpa")))
    ours.save_pretrained(tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=40, eos_token_id=2, pad_token_id=0)
    ref = theirs.generate(ids, do_sample=False, **kw)
    assert torch.equal(ours.generate(ids, **kw), ref)
    assert all(getattr(m, "weight_t", None) is None for m in ours.modules())  # nothing kept: training uses nn.Linear
    with torch.no_grad():
        ours.transformer.h[0].mlp.c_fc.weight.mul_(-1.0)  # in place, like an optimizer step
    changed = ours.generate(ids, **kw)
    ours_plain = gpt2.GPT2LMHeadModel(ours.config).eval()
    ours_plain.load_state_dict(ours.state_dict())
    assert torch.equal(changed, ours_plain.generate(ids, max_new_tokens=40, eos_token_id=2, pad_token_id=0))
