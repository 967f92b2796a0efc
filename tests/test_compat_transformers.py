"""Calls written for transformers' GPT-2 classes give transformers 5.24's results here (issue 13, kind 1).

Each case runs the same call through `transformers` and through `gpt2` on the same folder (a byte-level BPE trained
here on the embedded corpus + a tiny random model) and compares the results: the tokenizer's __call__ / encode /
decode / batch_decode / pad / save_pretrained / from_pretrained, resize_token_embeddings, every head's forward
arguments, generate's arguments and defaults, and pipeline("text-generation"). What gpt2 does not implement raises
one sentence, checked at the end. Sampled cases seed torch's global RNG, which both sides draw from.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import randomize

import gpt2
from data_pipelines.corpus import build_corpus

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: 1 thread is faster (conftest)

QUESTION, CONTEXT = "What does the module provide?", "This module provides functions for working with paths."
TEXTS = ["Return the value of the named attribute of object.", "Hi", "  leading spaces,\ttabs and émojis 😀",
         "a<|endoftext|>b", "If the value is None, the default is used and returned to the caller unchanged."]
PAIRS = ["and a second text", "pair", "x", "yet another one here", "z z z"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder as transformers users get them: tokenizer files + config.json + model.safetensors."""
    d = tmp_path_factory.mktemp("tiny-gpt2")
    tok = gpt2.train_tokenizer(iter(build_corpus()[:200]), vocab_size=400)
    tok.save_pretrained(d)
    cfg = gpt2.GPT2Config(vocab_size=len(tok), n_positions=320, n_embd=32, n_layer=2, n_head=4,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    randomize(gpt2.GPT2LMHeadModel(cfg)).save_pretrained(d)
    return d


def both_tokenizers(folder, **kw):
    return gpt2.GPT2TokenizerFast.from_pretrained(folder, **kw), transformers.AutoTokenizer.from_pretrained(folder, **kw)


def same(a, b) -> bool:
    """Equal results: dicts / lists / tensors / arrays compared by value (tensors exactly)."""
    if hasattr(a, "keys") and hasattr(b, "keys"):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a.keys())
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if type(a).__module__ == "numpy" or type(b).__module__ == "numpy":
        return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and (a == b).all()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------------------------------ tokenizer
CALLS = {
    "issue: tokenizer(question, context) is a pair": ((QUESTION, CONTEXT), {}),
    "text_pair keyword": ((QUESTION,), dict(text_pair=CONTEXT, return_token_type_ids=True)),
    "batch of pairs, padded, token types": ((TEXTS, PAIRS), dict(padding=True, return_token_type_ids=True)),
    "pair longest_first": ((TEXTS, PAIRS), dict(truncation=True, max_length=6)),
    "pair only_first": ((TEXTS[0], PAIRS[1]), dict(truncation="only_first", max_length=8)),
    "pair only_second": ((QUESTION, CONTEXT), dict(truncation="only_second", max_length=24, padding="max_length")),
    "stride + overflowing windows": ((TEXTS,), dict(truncation=True, max_length=6, stride=2,
                                                    return_overflowing_tokens=True, padding=True)),
    "overflow, one text": ((TEXTS[4],), dict(truncation=True, max_length=5, return_overflowing_tokens=True)),
    "is_split_into_words": ((["Return", "the", "value"],), dict(is_split_into_words=True)),
    "is_split_into_words batch": (([["a", "b"], ["c"]],), dict(is_split_into_words=True, padding=True)),
    "pad right, multiple of 8": ((TEXTS,), dict(padding=True, pad_to_multiple_of=8)),
    "pad left per call": ((TEXTS,), dict(padding="longest", padding_side="left", return_tensors="pt")),
    "max_length padding": ((TEXTS,), dict(padding="max_length", truncation=True, max_length=10)),
    "max_length alone truncates": ((TEXTS,), dict(max_length=4)),
    "numpy tensors": ((TEXTS,), dict(padding=True, return_tensors="np")),
    "offsets, special mask, length": ((TEXTS,), dict(return_offsets_mapping=True, return_special_tokens_mask=True,
                                                     return_length=True, return_attention_mask=False)),
    "one text, tensors": ((TEXTS[0],), dict(return_tensors="pt", return_token_type_ids=True)),
    "split_special_tokens": ((TEXTS[3],), dict(split_special_tokens=True)),
    "text_target -> labels": ((TEXTS[:2],), dict(text_target=PAIRS[:2], padding=True)),
    "tokenizer_kwargs": ((TEXTS,), dict(tokenizer_kwargs={"padding": True, "return_tensors": "pt"})),
    "add_special_tokens=False": ((TEXTS, PAIRS), dict(add_special_tokens=False)),
    "empty pair means no pair": ((TEXTS[0], ""), {}),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_tokenizer_call_equals_transformers(folder, name):
    args, kw = CALLS[name]
    ours, theirs = both_tokenizers(folder, pad_token="<|endoftext|>")
    a, b = ours(*args, **kw), theirs(*args, **kw)
    assert same(dict(a), dict(b)), (name, dict(a), dict(b))
    if a.encodings and b.encodings:  # the backend encodings too: tokens, word ids, sequence ids
        assert a.tokens() == b.tokens() and a.word_ids() == b.word_ids() and a.sequence_ids() == b.sequence_ids()


def test_tokenizer_encode_decode_pad_equal_transformers(folder):
    ours, theirs = both_tokenizers(folder, pad_token="<|endoftext|>")
    for args, kw in [((TEXTS[0],), {}), ((QUESTION, CONTEXT), {}), ((TEXTS,), {}),
                     ((TEXTS[0],), dict(return_tensors="pt")), ((TEXTS[4],), dict(truncation=True, max_length=3))]:
        assert same(ours.encode(*args, **kw), theirs.encode(*args, **kw)), (args, kw)
    ids = ours(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    for x in [ids, ids[0], ids.tolist(), ids[0].tolist(), int(ids[0, 0]), ids.numpy()]:  # batches decode to lists
        for kw in [{}, dict(skip_special_tokens=True)]:
            assert ours.decode(x, **kw) == theirs.decode(x, **kw)
    assert ours.batch_decode(ids, skip_special_tokens=True) == theirs.batch_decode(ids, skip_special_tokens=True)
    assert ours.batch_decode([]) == theirs.batch_decode([]) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns that a flat list is deprecated in batch_decode
        assert ours.batch_decode(ids[0].tolist()) == theirs.batch_decode(ids[0].tolist())  # one text, not one per id
        # clean_up_tokenization_spaces=True is ignored for byte-level BPE (it would corrupt the text), in both
        text = "Hello , world . I 'm here"
        assert ours.decode(ours.encode(text), clean_up_tokenization_spaces=True) == theirs.decode(
            theirs.encode(text), clean_up_tokenization_spaces=True) == text
    assert ours.tokenize(QUESTION, CONTEXT) == theirs.tokenize(QUESTION, CONTEXT)
    # pad(): a DataCollatorWithPadding-style list of dicts, dicts of lists, tensors in -> tensors out
    rows = [ours(t) for t in TEXTS[:3]]
    for enc, kw in [(rows, {}), (rows, dict(return_tensors="pt")), (rows, dict(padding_side="left")),
                    ({"input_ids": [r["input_ids"] for r in rows]}, dict(padding="max_length", max_length=24,
                                                                          pad_to_multiple_of=16)),
                    ({"input_ids": torch.tensor([1, 2, 3])}, {}), (rows[0], dict(padding="max_length", max_length=30))]:
        assert same(dict(ours.pad(enc, **kw)), dict(theirs.pad(enc, **kw))), kw


def test_tokenizer_save_and_from_pretrained_arguments_equal_transformers(folder, tmp_path):
    ours, theirs = both_tokenizers(folder)
    written = ours.save_pretrained(tmp_path / "o", filename_prefix="x", legacy_format=False)
    assert all(p.rsplit("/", 1)[-1].startswith("x-") for p in written)
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"x-tokenizer.json", "x-tokenizer_config.json"}
    # settings passed to from_pretrained override the folder in both (add_prefix_space rebuilds the pre-tokenizer)
    for kw in [dict(add_prefix_space=True), dict(padding_side="left", truncation_side="left", model_max_length=8),
               dict(pad_token="<|endoftext|>")]:
        a, b = both_tokenizers(folder, **kw)
        assert same(dict(a(TEXTS, truncation=True, padding=bool(a.pad_token))),
                    dict(b(TEXTS, truncation=True, padding=bool(b.pad_token)))), kw
    # transformers' loading arguments are accepted (local folder: the hub ones change nothing)
    a = gpt2.GPT2TokenizerFast.from_pretrained(folder, revision="main", cache_dir=str(tmp_path / "c"),
                                               local_files_only=True, use_fast=True, trust_remote_code=False)
    assert a.encode(TEXTS[0]) == theirs.encode(TEXTS[0])
    nested = tmp_path / "repo"
    ours.save_pretrained(nested / "tok")
    assert gpt2.GPT2TokenizerFast.from_pretrained(nested, subfolder="tok").encode(TEXTS[2]) == theirs.encode(TEXTS[2])


def test_tokenizer_errors_where_transformers_errors(folder):
    ours, theirs = both_tokenizers(folder)  # no pad token (GPT-2 has none)
    for call in [lambda t: t(TEXTS, padding=True), lambda t: t(QUESTION, truncation="only_second", max_length=3),
                 lambda t: t(TEXTS, padding=True, truncation=True, max_length=5, pad_to_multiple_of=4),
                 lambda t: t(), lambda t: t(TEXTS, truncation="nope"), lambda t: t([1, 2, 3])]:
        with pytest.raises(Exception):
            call(theirs)
        with pytest.raises(ValueError) as err:
            call(ours)
        assert "\n" not in str(err.value)  # one sentence
    with pytest.raises(ValueError, match=r"tokenizer\.pad_token = tokenizer\.eos_token"):
        ours(TEXTS, padding=True)
    with pytest.raises(TypeError, match="typo_argument"):  # transformers ignores unknown keywords in silence
        ours(TEXTS[0], typo_argument=True)


# ------------------------------------------------------------------------------------------------- resize_embeddings
CLASSES = ["GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification",
           "GPT2ForTokenClassification", "GPT2ForQuestionAnswering"]
TINY = dict(vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)


def pair_of(cls_name: str, tmp_path, **cfg):
    ours = randomize(getattr(gpt2, cls_name)(gpt2.GPT2Config(**{**TINY, **cfg})))
    ours.save_pretrained(tmp_path)
    theirs = getattr(transformers, cls_name).from_pretrained(tmp_path, attn_implementation="eager").eval()
    return gpt2.GPT2LMHeadModel.from_pretrained(tmp_path) if cls_name == "GPT2LMHeadModel" else ours, theirs


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_equals_transformers(cls_name, tied, tmp_path):
    for i, (new, kw) in enumerate([(101, {}), (101, dict(mean_resizing=False)), (90, {}),
                                   (None, dict(pad_to_multiple_of=64)), (110, dict(pad_to_multiple_of=8))]):
        ours, theirs = pair_of(cls_name, tmp_path / str(i), tie_word_embeddings=tied)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(i)  # new rows are drawn from the RNG: the same draws on both sides
            a = ours.resize_token_embeddings(new, **kw)
            after_ours = torch.rand(2)
            torch.manual_seed(i)
            b = theirs.resize_token_embeddings(new, **kw)
            after_theirs = torch.rand(2)
        assert torch.equal(a.weight, b.weight) and torch.equal(after_ours, after_theirs), (new, kw)
        assert ours.config.vocab_size == theirs.config.vocab_size == a.weight.shape[0]
        if hasattr(ours, "lm_head"):
            assert torch.equal(ours.lm_head.weight, theirs.lm_head.weight)
            assert (ours.lm_head.weight is ours.transformer.wte.weight) == tied
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()  # no argument: nothing changes


def test_issue_add_pad_token_then_resize(folder):
    """The issue's example: add a pad token, resize to len(tokenizer), run a padded batch; before, the forward died
    with a bare `IndexError: index out of range in self`."""
    results = []
    for lib, tok_cls in ((gpt2, gpt2.GPT2TokenizerFast), (transformers, transformers.AutoTokenizer)):
        tok = tok_cls.from_pretrained(folder)
        assert tok.add_special_tokens({"pad_token": "[PAD]"}) == 1
        model = lib.GPT2LMHeadModel.from_pretrained(folder).eval()
        torch.manual_seed(0)
        model.resize_token_embeddings(len(tok))
        batch = tok(TEXTS, padding=True, return_tensors="pt")
        assert int(batch["input_ids"].max()) == len(tok) - 1  # the new pad id is used
        with torch.no_grad():
            results.append(model(**batch).logits)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(results[0][keep], results[1][keep], atol=1e-4, rtol=0)


def test_out_of_vocabulary_id_is_one_sentence(folder):
    tok = gpt2.GPT2TokenizerFast.from_pretrained(folder)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    model = gpt2.GPT2LMHeadModel.from_pretrained(folder)
    batch = tok(TEXTS[:2], padding=True, return_tensors="pt")
    V = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids holds the id {V}, but the model has {V} tokens.*resize_token"):
        model(**batch)
    with pytest.raises(ValueError, match=rf"the id {V}.*{V} tokens"):
        model.train()(**batch, labels=batch["input_ids"])  # the training path (sparse embedding gradient)
    for cls in CLASSES:
        m = getattr(gpt2, cls)(gpt2.GPT2Config(**TINY))
        with pytest.raises(ValueError, match="holds the id -1"):
            m(torch.tensor([[3, -1]]))
        with pytest.raises(ValueError, match="token_type_ids holds the id 97"):
            m(torch.tensor([[3, 4]]), token_type_ids=torch.tensor([[0, 97]]))


# ------------------------------------------------------------------------------------------------------- forward
FORWARD = {
    "mask + labels": lambda ids, mask: dict(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)),
    "token_type_ids + position_ids": lambda ids, mask: dict(token_type_ids=ids.flip(-1), position_ids=(
        torch.arange(ids.shape[-1]) + 3).expand_as(ids)),
    "hidden states + attentions": lambda ids, mask: dict(attention_mask=mask, output_hidden_states=True,
                                                         output_attentions=True),
    "return_dict=False": lambda ids, mask: dict(attention_mask=mask, return_dict=False),
}
HEAD_EXTRA = {
    "GPT2ForSequenceClassification": lambda ids: dict(labels=torch.tensor([1, 0, 1])),
    "GPT2ForQuestionAnswering": lambda ids: dict(start_positions=torch.tensor([1, 2, 40]),
                                                 end_positions=torch.tensor([3, 4, 6])),
}


def compare_outputs(a, b, keep: torch.Tensor):
    """Every output field equal, at the real (not padding) positions `keep` (B, T): what a padding position computes
    is never used, and the two implementations mask a padding query differently."""
    a = a if isinstance(a, tuple) else a.to_tuple()
    b = b if isinstance(b, tuple) else b.to_tuple()
    a = [x for x in a if not (isinstance(x, tuple) and x and isinstance(x[0], tuple))]  # drop caches (kinds differ)
    b = [x for x in b if not hasattr(x, "get_seq_length")]
    assert len(a) == len(b)
    B, T = keep.shape

    def real(t):
        if t.dim() >= 3 and t.shape[0] == 1 and t.shape[1] == B:  # GPT2DoubleHeadsModel: (1, n_choices, T, ...)
            t = t[0]
        if t.dim() == 4 and t.shape[-1] == t.shape[-2] == T:  # attentions (B, nh, T, T): the real queries' rows
            return t.transpose(1, 2)[keep]
        return t[keep] if t.dim() >= 2 and tuple(t.shape[:2]) == (B, T) else t

    for x, y in zip(a, b):
        for u, v in zip(x, y) if isinstance(x, tuple) else [(x, y)]:
            torch.testing.assert_close(real(u), real(v), atol=2e-4, rtol=0)


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("case", list(FORWARD))
def test_head_forward_arguments_equal_transformers(cls_name, case, tmp_path):
    ours, theirs = pair_of(cls_name, tmp_path, attn_implementation="eager")
    ids = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding (what classifiers get), with the pad id 0 there
    ids = ids.masked_fill(mask == 0, 0)
    kw = FORWARD[case](ids, mask)
    if cls_name in ("GPT2Model", "GPT2ForSequenceClassification", "GPT2ForQuestionAnswering"):
        kw.pop("labels", None)  # token labels are the LM's, token classification's (kept) and double heads'
    if cls_name == "GPT2ForTokenClassification" and "labels" in kw:
        kw["labels"] = (ids % 2).masked_fill(mask == 0, -100)
    kw.update(HEAD_EXTRA.get(cls_name, lambda ids: {})(ids) if case == "mask + labels" else {})
    keep = mask.bool() if "attention_mask" in kw else torch.ones_like(mask, dtype=torch.bool)
    if cls_name == "GPT2DoubleHeadsModel":  # (B, n_choices, T)
        kw.pop("position_ids", None)  # transformers 5.24's double-heads forward fails on (B, n_choices, T) ones
        ids, kw = ids[None], {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        kw["mc_token_ids"] = torch.tensor([[6, 4, 6]])
    with torch.no_grad():
        compare_outputs(ours(ids, **kw), theirs(ids, **kw), keep)


def test_cache_argument_and_logits_to_keep_equal_transformers(tmp_path):
    ours, theirs = pair_of("GPT2LMHeadModel", tmp_path)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids[:, :6], use_cache=True), theirs(ids[:, :6], use_cache=True)
        a2, b2 = ours(ids[:, 6:], cache=a.cache), theirs(ids[:, 6:], cache=b.cache)  # transformers 5's name
        torch.testing.assert_close(a2.logits, b2.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(a2.logits, ours(ids).logits[:, 6:], atol=1e-5, rtol=0)
        for keep in (1, 3, torch.tensor([0, 4])):
            torch.testing.assert_close(ours(ids, logits_to_keep=keep).logits, theirs(ids, logits_to_keep=keep).logits,
                                       atol=1e-5, rtol=0)
        labels = ids.masked_fill(ids % 3 == 0, -100)
        torch.testing.assert_close(ours(ids, labels=labels, num_items_in_batch=11).loss,
                                   theirs(ids, labels=labels, num_items_in_batch=11).loss, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cross-attention"):
        ours(ids, encoder_hidden_states=torch.zeros(2, 3, 24))
    with pytest.raises(ValueError, match="cache once"):
        ours(ids[:, 6:], cache=a.cache, past_key_values=a.cache)


# ------------------------------------------------------------------------------------------------------ generate
GENERATE = {
    "greedy, left-padded batch": dict(max_new_tokens=10),
    "issue: HF blog top_p=0.92, top_k=0": dict(do_sample=True, top_p=0.92, top_k=0, max_new_tokens=10),
    "sampling defaults (top_k=50)": dict(do_sample=True, max_new_tokens=10),
    "top_k=None switches top-k off": dict(do_sample=True, top_k=None, temperature=4.0, max_new_tokens=10),
    "hot sampling, no top-k": dict(do_sample=True, top_k=0, temperature=4.0, max_new_tokens=10),
    "temperature + top_k + top_p": dict(do_sample=True, temperature=0.7, top_k=7, top_p=0.8, max_new_tokens=10),
    "num_return_sequences": dict(do_sample=True, num_return_sequences=3, max_new_tokens=6),
    "repetition_penalty": dict(repetition_penalty=1.7, max_new_tokens=10),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2, max_new_tokens=12),
    "min_new_tokens holds eos back": dict(min_new_tokens=8, max_new_tokens=10, eos_token_id=[5, 6, 7, 8, 9, 10]),
    "min_length": dict(min_length=14, max_new_tokens=10, eos_token_id=[5, 6, 7, 8, 9, 10]),
    "bad_words_ids": dict(bad_words_ids=[[5], [6, 7], [8, 9, 10]], max_new_tokens=10),
    "eos stops rows, pad fills": dict(max_new_tokens=12, eos_token_id=[11, 12, 13, 14, 15, 16], pad_token_id=0),
    "eos_token_id=None: no stop": dict(max_new_tokens=8, eos_token_id=None),
    "max_length counts the prompt": dict(max_length=13),
    "default length: 20 new tokens": dict(),
    "everything at once": dict(do_sample=True, repetition_penalty=1.3, no_repeat_ngram_size=3, top_k=20, top_p=0.9,
                               temperature=0.8, min_new_tokens=3, max_new_tokens=10),
    "return_dict_in_generate": dict(do_sample=True, max_new_tokens=4, return_dict_in_generate=True,
                                    output_scores=True, output_logits=True),
}


@pytest.fixture(scope="module")
def lm_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    randomize(gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**{**TINY, "n_positions": 48}))).save_pretrained(d)
    return gpt2.GPT2LMHeadModel.from_pretrained(d), transformers.GPT2LMHeadModel.from_pretrained(d).eval()


@pytest.mark.parametrize("case", list(GENERATE))
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "inferred-mask"])
def test_generate_equals_transformers(lm_pair, case, masked):
    ours, theirs = lm_pair
    ids = torch.randint(3, 97, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3], mask[2, :5] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)  # left padding with pad id 0 (!= eos 2): inferable without a mask
    kw = dict(GENERATE[case], **({"attention_mask": mask} if masked else {}))
    outs, caught = [], []
    for model in (ours, theirs):
        torch.manual_seed(7)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            outs.append(model.generate(ids, **kw))
        caught.append({str(x.message).split("(")[0] for x in w if "max_length" in str(x.message)})
    a, b = outs
    if kw.get("return_dict_in_generate"):
        assert torch.equal(a.sequences, b.sequences) and len(a.scores) == len(b.scores) == len(a.logits)
        for x, y in zip(a.scores + a.logits, b.scores + b.logits):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    else:
        assert a.shape == b.shape and torch.equal(a, b), (a, b)
    assert caught[0] == caught[1]  # the default-length warning where transformers gives it, and only there


def test_double_heads_model_generates_like_transformers(tmp_path):
    ours, theirs = pair_of("GPT2DoubleHeadsModel", tmp_path)
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours.generate(ids, max_new_tokens=5), theirs.generate(ids, max_new_tokens=5))


def test_model_from_pretrained_arguments(tmp_path):
    ours, _ = pair_of("GPT2LMHeadModel", tmp_path / "repo" / "lm")
    ids = torch.randint(3, 97, (1, 5))
    for kw in [dict(subfolder="lm"), dict(subfolder="lm", device_map="cpu", low_cpu_mem_usage=True, revision="main",
                                          trust_remote_code=False, use_safetensors=True, torch_dtype=torch.float32),
               dict(subfolder="lm", config=ours.config, attn_implementation="eager")]:
        loaded = gpt2.GPT2LMHeadModel.from_pretrained(tmp_path / "repo", **kw)
        if "config" in kw:  # each library takes its own config class
            kw["config"] = transformers.GPT2Config.from_pretrained(tmp_path / "repo" / "lm")
        theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "repo", **kw)
        torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
    for kw, match in [(dict(subfolder="nope"), "subfolder"), (dict(use_safetensors=False), "safetensors"),
                      (dict(device_map={"": 0}), "device_map"), (dict(output_loading_info=True), "output_loading_info")]:
        with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
            gpt2.GPT2LMHeadModel.from_pretrained(tmp_path / "repo" / ("" if "subfolder" in kw else "lm"), **kw)


def test_generate_refuses_what_transformers_refuses_or_we_do_not_implement(lm_pair):
    ours, theirs = lm_pair
    ids = torch.randint(3, 97, (2, 5))
    for kw in [dict(num_return_sequences=2), dict(max_new_tokens=0), dict(max_length=5)]:
        with pytest.raises(ValueError):
            theirs.generate(ids, **kw)
        with pytest.raises(ValueError):
            ours.generate(ids, **kw)
    for kw, name in [(dict(num_beams=3), "num_beams"), (dict(typical_p=0.5, do_sample=True), "typical_p"),
                     (dict(stop_strings=["x"]), "stop_strings"), (dict(typo_arg=1), "typo_arg")]:
        with pytest.raises(ValueError, match=name) as err:
            ours.generate(ids, max_new_tokens=2, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="n_positions"):  # transformers: a warning, then an IndexError
        ours.generate(ids, max_new_tokens=60)
    # values that change nothing are accepted, as transformers accepts them
    assert torch.equal(ours.generate(ids, max_new_tokens=3, num_beams=1, use_cache=False, output_attentions=False),
                       theirs.generate(ids, max_new_tokens=3, num_beams=1, use_cache=False))
    # the folder's generation_config.json is generate's default, as in transformers
    ours.generation_config.max_new_tokens = 4
    theirs.generation_config.max_new_tokens = 4
    try:
        assert torch.equal(ours.generate(ids), theirs.generate(ids)) and ours.generate(ids).shape == (2, 9)
    finally:
        ours.generation_config.max_new_tokens = theirs.generation_config.max_new_tokens = None


def test_generate_cli_top_k_zero(folder, capsys):
    from train.cli.generate import main
    from train.eval.samples import sample

    assert main([str(folder), "--prompt", "Return the", "--top-k", "0", "--top-p", "0.92",
                 "--max-new-tokens", "5"]) == 0  # was "--top-k=0 must be >= 1"
    printed = capsys.readouterr().out.strip()
    model, tok = gpt2.GPT2LMHeadModel.from_pretrained(folder), gpt2.GPT2TokenizerFast.from_pretrained(folder)
    ids = tok("Return the", return_tensors="pt").input_ids
    ref = model.generate(ids, do_sample=True, top_k=0, top_p=0.92, max_new_tokens=5, eos_token_id=None,
                         generator=torch.Generator().manual_seed(0))
    assert printed == sample(model, tok, "Return the", 5, top_k=0, top_p=0.92) == tok.decode(ref[0])
    assert main([str(folder), "--prompt", "x", "--top-k", "-1"]) == 1


# ------------------------------------------------------------------------------------------------------ pipeline
PIPE = {
    "greedy": (TEXTS[0], dict(do_sample=False, max_new_tokens=8)),
    "batch_size=2, left padding": (TEXTS, dict(do_sample=False, max_new_tokens=6, batch_size=2)),
    "new text only": (TEXTS[:2], dict(do_sample=False, max_new_tokens=5, return_full_text=False)),
    "token ids": (TEXTS[1], dict(do_sample=False, max_new_tokens=5, return_tensors=True)),
    "num_return_sequences, sampled": (TEXTS[0], dict(num_return_sequences=3, max_new_tokens=6)),
    "pipeline defaults (sampling, 256 new tokens)": (TEXTS[1], {}),
    "prefix + max_length": (TEXTS[1], dict(prefix="Return the ", max_length=12, do_sample=False)),
    "generation arguments pass through": (TEXTS[0], dict(max_new_tokens=8, repetition_penalty=1.5, top_k=5)),
    "empty prompt starts from bos": ("", dict(do_sample=False, max_new_tokens=4)),
}


@pytest.mark.parametrize("case", list(PIPE))
def test_text_generation_pipeline_equals_transformers(folder, case):
    inputs, kw = PIPE[case]
    kw = dict(kw)
    batch_size = kw.pop("batch_size", None)
    results = []
    for make in (gpt2.pipeline, transformers.pipeline):
        pipe = make("text-generation", model=str(folder))
        if batch_size:  # what transformers' "cannot do batching" error tells GPT-2 users to do
            pipe.tokenizer.pad_token_id = pipe.model.config.eos_token_id
        torch.manual_seed(11)
        results.append(pipe(inputs, batch_size=batch_size, **kw))
    assert results[0] == results[1]


def test_pipeline_construction_arguments_apply_to_every_call(folder):
    a = gpt2.pipeline("text-generation", model=str(folder), max_new_tokens=5, do_sample=False, return_full_text=False,
                      model_kwargs={"attn_implementation": "eager"})
    b = transformers.pipeline("text-generation", model=str(folder), max_new_tokens=5, do_sample=False,
                              return_full_text=False, model_kwargs={"attn_implementation": "eager"})
    assert a.model.config.attn_implementation == "eager"
    assert a(TEXTS[:2]) == b(TEXTS[:2])
    for kw, match in [(dict(stop_sequence="."), "stop strings"), (dict(num_beams=2), "num_beams")]:
        with pytest.raises(ValueError, match=match):
            a(TEXTS[0], **kw)
    with pytest.raises(ValueError, match="chat template"):
        a([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="pad_token"):  # transformers' own message when it cannot batch
        gpt2.pipeline("text-generation", model=a.model, tokenizer=gpt2.GPT2TokenizerFast.from_pretrained(folder))(
            TEXTS, batch_size=2, max_new_tokens=2)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["n_positions"] == 320
