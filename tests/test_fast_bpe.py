"""tiktoken as our bulk encoder: the same ids as tokenizers (the reference) on hard text, refusal where not provable."""

from __future__ import annotations

import logging
import random
import unicodedata

import pytest
import tiktoken
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from data_pipelines.fast_bpe import (
    GPT2_PATTERN,
    DocumentEncoder,
    NotConvertible,
    bytes_to_unicode,
    reference_backend,
    to_tiktoken,
    unicode_to_bytes,
)
from gpt2.tokenizer import train_tokenizer

# What makes byte-level BPE and the GPT-2 regex hard: many scripts, multi-byte UTF-8 (2-4 bytes), combining marks,
# emoji ZWJ sequences, every kind of Unicode whitespace, digits of other scripts, contractions (and look-alikes),
# control characters, astral letters, private use, noncharacters.
FRAGMENTS = [
    "naïve café", "Ærøskøbing", "straße", "ΑΒΓ αβγ Ωμέγα", "Привет, мир", "مرحبا بالعالم", "שָׁלוֹם", "नमस्ते दुनिया",
    "สวัสดีครับ", "日本語のテキスト", "中文字符", "한국어 텍스트", "カタカナ", "ｆｕｌｌｗｉｄｔｈ １２３",
    "e\u0301e\u0300a\u0308\u0323", "Z\u0351\u0362a\u0336l\u0315g\u0327o", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇩🇪🇯🇵", "❤️", "🤖🤖🤖",
    "it's", "we're", "they've", "I'm", "you'll", "he'd", "IT'S", "don't", "rock’n’roll", "'s", "''", "'",
    "123", "1234567890", "３.１４", "٣٤٥", "१२३", "²³", "Ⅻ", "½", "0x1F", "1e-9", "3,000,000",
    " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u2003", "\u3000", "\u200b", "\u2028", "\x0b", "\x0c",
    "\x00", "\x01", "\x1b[31m", "\x7f", "\x85", "\x9f", "\ufeff", "\ufffd", "\uffff", "\U0010fffd", "\ue000",
    "𝐀𝐁𝐂", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𓀀𓀁", "ꙮ", "$$$", "...", "!!!", "—–-", "«»", "<|endoftext|>", "<|endoftext", "http://x.y/z?a=1",
]
SEPARATORS = ["", " ", "  ", "\n", "\t", "   \n", "\u3000", ",", "'"]


def unicode_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of random fragments, random separators and random code points (every plane, no surrogates)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(1, 120)):
            r = rng.random()
            if r < 0.75:
                parts.append(rng.choice(FRAGMENTS))
            elif r < 0.85:
                parts.append(rng.choice(SEPARATORS) * rng.randint(1, 6))  # whitespace runs
            else:
                c = rng.choice([rng.randrange(0x20, 0x3000), rng.randrange(0x10000, 0x30000), rng.randrange(0xE000, 0xF900)])
                parts.append(chr(c) * rng.randint(1, 3))
            parts.append(rng.choice(SEPARATORS))
        docs.append("".join(parts))
    return docs


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return unicode_corpus(600)


@pytest.fixture(scope="module")
def tok(corpus):
    # trained on the same kind of text, so the merges reach into multi-byte characters, emoji and whitespace runs
    return train_tokenizer(iter(unicode_corpus(1500, seed=1)), vocab_size=2000)


def reference_ids(backend: Tokenizer, docs: list[str]) -> list[list[int]]:
    return [e.ids for e in reference_backend(backend).encode_batch(docs, add_special_tokens=False)]


def test_unicode_heavy_corpus_gives_the_same_ids_with_both_engines(corpus, tok):
    enc = DocumentEncoder(tok.backend_tokenizer)
    assert enc.engine == "tiktoken" and enc.reason is None
    got = [ids.tolist() for ids in enc.encode(corpus)]
    want = reference_ids(tok.backend_tokenizer, corpus)
    mismatches = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not mismatches, f"{len(mismatches)} documents differ, first: {corpus[mismatches[0]]!r}"
    assert sum(map(len, want)) > 50_000 and len(set(i for w in want for i in w)) > 1000  # the merges are in use
    # the whole documents concatenated too (one long string: whitespace runs and pre-tokens across fragments)
    joined = "".join(corpus)
    assert enc.encode([joined]).__next__().tolist() == reference_ids(tok.backend_tokenizer, [joined])[0]
    # and the Encoding decodes back to the text, byte for byte
    assert to_tiktoken(tok.backend_tokenizer).decode(got[0]) == corpus[0]


def test_every_code_point_splits_the_same_in_both_regex_engines():
    # A vocabulary with a merge for every byte pair makes a pre-token boundary visible in the ids: where one engine
    # cut between two bytes and the other did not, the pair is merged by one engine only. Each code point goes
    # through the contexts that separate letters, numbers, whitespace and punctuation in the GPT-2 regex.
    tab = bytes_to_unicode()
    vocab = {tab[b]: b for b in range(256)}
    merges = []
    for a in range(256):
        for b in range(256):
            vocab[tab[a] + tab[b]] = len(vocab)
            merges.append((tab[a], tab[b]))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    enc = to_tiktoken(backend)
    # every assigned code point below U+3000 (the alphabets, marks, digits, symbols and spaces), then every 61st
    # (CJK, Hangul, astral planes, private use, unassigned); the full sweep of all 154,745 assigned code points gave
    # no difference either (tiktoken 0.14, tokenizers 0.23; see README "Data")
    cps = [
        c for c in range(0x110000)
        if not 0xD800 <= c < 0xE000 and (c < 0x3000 and unicodedata.category(chr(c)) != "Cn" or c % 61 == 0)
    ]
    lines = [f"a{chr(c)} 1{chr(c)} {chr(c)}a {chr(c)}{chr(c)}'s{chr(c)}\n" for c in cps]
    ref = reference_backend(backend).encode_batch_fast(lines, add_special_tokens=False)
    got = enc.encode_ordinary_batch(lines, num_threads=2)
    bad = [hex(cps[i]) for i in range(len(lines)) if ref[i].ids != got[i]]
    assert len(cps) > 25_000 and not bad, f"{len(bad)} code points split differently: {bad[:20]}"


def _abc_tokenizer(merges: list[tuple[str, str]], extra: dict[str, int] | None = None) -> Tokenizer:
    tab = bytes_to_unicode()
    vocab = {tab[b]: b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab.update(extra or {})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return backend


def test_a_vocabulary_where_tiktoken_would_differ_is_refused_and_encoded_by_tokenizers(caplog):
    # "bc" merges before "ab", so tokenizers turns "abc" into [a, bc] and stops (no merge "a bc"); tiktoken would
    # see the whole-word vocabulary entry "abc" (made by "ab c") and emit it as one token.
    backend = _abc_tokenizer([("b", "c"), ("a", "b"), ("ab", "c")])
    vocab = backend.get_vocab()
    naive = tiktoken.Encoding(
        "naive", pat_str=GPT2_PATTERN, special_tokens={},
        mergeable_ranks={bytes(unicode_to_bytes()[c] for c in s): i for s, i in vocab.items()},
    )
    ref = reference_ids(backend, ["abc"])[0]
    assert ref == [vocab["a"], vocab["bc"]] and naive.encode_ordinary("abc") == [vocab["abc"]]  # the hazard is real
    with pytest.raises(NotConvertible, match="'abc' as \\['a', 'bc'\\]"):
        to_tiktoken(backend)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.fast_bpe"):
        enc = DocumentEncoder(backend)
        DocumentEncoder(backend)  # the same tokenizer again: said once
    assert enc.engine == "tokenizers" and "'abc'" in enc.reason
    assert len([r for r in caplog.records if "instead of tiktoken" in r.getMessage()]) == 1
    docs = ["abc abcabc", "cab bca"]
    assert [x.tolist() for x in enc.encode(docs)] == reference_ids(backend, docs)
    with pytest.raises(NotConvertible):
        DocumentEncoder(backend, engine="tiktoken")


def test_unreachable_vocabulary_entries_are_left_out():
    # "xyz" is in the vocabulary but no merge makes it: tokenizers never emits it, so the Encoding must not either
    backend = _abc_tokenizer([("x", "y"), ("a", "b")], extra={"xyz": 900})
    enc = to_tiktoken(backend)
    assert b"xyz" not in enc._mergeable_ranks and b"xy" in enc._mergeable_ranks
    docs = ["xyz xyzxyz ab", "xyz"]
    assert enc.encode_ordinary_batch(docs) == reference_ids(backend, docs)


def test_merge_order_must_match_the_ids():
    backend = _abc_tokenizer([("a", "b"), ("c", "d")])
    spec = backend.get_vocab()
    spec["ab"], spec["cd"] = spec["cd"], spec["ab"]  # ids no longer grow with the merge order
    swapped = Tokenizer(models.BPE(vocab=spec, merges=[("a", "b"), ("c", "d")], dropout=None, fuse_unk=False))
    swapped.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    with pytest.raises(NotConvertible, match="do not grow with the merge order"):
        to_tiktoken(swapped)


@pytest.mark.parametrize("change", ["normalizer", "prefix_space", "added_token", "no_regex"])
def test_pipelines_tiktoken_cannot_run_fall_back_with_the_same_ids(tok, change):
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    if change == "normalizer":
        backend.normalizer = normalizers.NFKC()
    elif change == "prefix_space":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    elif change == "added_token":
        backend.add_tokens(["naïve café"])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    enc = DocumentEncoder(backend)
    assert enc.engine == "tokenizers" and enc.reason
    docs = unicode_corpus(20, seed=3)
    assert [x.tolist() for x in enc.encode(docs)] == reference_ids(backend, docs)


def test_special_token_strings_and_lone_surrogates_are_text(tok):
    docs = ["a <|endoftext|> b", "json escape \ud800 here", "<|endoftext|>"]
    fast = [x.tolist() for x in DocumentEncoder(tok.backend_tokenizer, engine="tiktoken").encode(docs)]
    ref = [x.tolist() for x in DocumentEncoder(tok.backend_tokenizer, engine="tokenizers").encode(docs)]
    assert fast == ref
    assert all(tok.eos_token_id not in ids for ids in fast)  # a document never cuts itself in two
    assert fast[1] == tok.encode("json escape \ufffd here")  # tiktoken's own replacement of a lone surrogate
