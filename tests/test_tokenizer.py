"""GPT2TokenizerFast / train_tokenizer: file compatibility and encoding parity with transformers.GPT2TokenizerFast.

Everything is built locally: a small byte-level BPE (vocab 600, well under a second) trained on 300 kB of the embedded
default corpus (CPython's documentation prose, made at run time: tests/helpers.py).
transformers is the reference; in 5.x GPT2TokenizerFast is GPT2Tokenizer, and it is built with from_pretrained(dir)
(its vocab_file/merges_file constructor gives empty encodings in 5.x).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.tokenizer import BatchEncoding, GPT2Tokenizer, GPT2TokenizerFast, train_tokenizer
from helpers import corpus_text

transformers = pytest.importorskip("transformers")


# accents, CJK, emoji (4-byte UTF-8, ZWJ sequence), tabs, runs of spaces, CRLF/newlines, <|endoftext|> mid-text
UNICODE_TEXT = (
    "Héllo wörld! Ça va? naïve façade, Øresund, Ελληνικά, русский.\n"
    "你好，世界。日本語のテキスト、한국어 텍스트.\n"
    "Emoji: 🤗🎉 👩‍👩‍👧 😀!\tTabs\tand    four spaces,  two;\n\n\n"
    "ROMEO:\r\nBut soft! what light<|endoftext|>through yonder window breaks?   \n"
    "<|endoftext|><|endoftext|> trailing   "
)
BATCH = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "Hi",
    "  leading spaces and\ttabs 😀",
    "你好<|endoftext|>world",
    "",
]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """A 300 kB English text file (the head of the embedded default corpus)."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(corpus_text(300_000), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus_file) -> GPT2TokenizerFast:
    return train_tokenizer(corpus_file, vocab_size=600)


@pytest.fixture(scope="module")
def saved_dir(trained, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ours")
    trained.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf(saved_dir):
    return transformers.GPT2TokenizerFast.from_pretrained(str(saved_dir))


@pytest.fixture(scope="module")
def hf_written_dir(hf, tmp_path_factory) -> Path:
    """A folder written by transformers' own save_pretrained (5.x writes tokenizer.json + tokenizer_config.json)."""
    d = tmp_path_factory.mktemp("hf_written")
    hf.save_pretrained(str(d))
    return d


def fresh(path) -> GPT2TokenizerFast:
    return GPT2TokenizerFast.from_pretrained(path)


# ------------------------------------------------------------------------------------------- training + round trip
def test_trained_tokenizer_shape(trained, corpus_file):
    assert GPT2Tokenizer is GPT2TokenizerFast
    assert trained.vocab_size == len(trained) == 600
    # the BPE trainer gives special tokens the first ids; bos = eos = unk, no pad token by default
    assert trained.eos_token == trained.bos_token == trained.unk_token == "<|endoftext|>"
    assert trained.eos_token_id == trained.bos_token_id == 0
    assert trained.pad_token is None and trained.pad_token_id is None
    assert trained.encode("<|endoftext|>") == [0]
    # merges learnt real words: the text is compressed well below one token per byte
    text = corpus_file.read_text(encoding="utf-8")[:20_000]
    assert len(trained.encode(text)) < 0.6 * len(text.encode("utf-8"))
    assert "GPT2TokenizerFast" in repr(trained) and "vocab_size=600" in repr(trained)


def test_round_trip_is_exact_including_bytes_never_seen_in_training(trained):
    # ASCII-only training text: the full 256-byte alphabet still covers emoji/CJK, so nothing is unknown
    ascii_tok = train_tokenizer(iter(["hello world, the quick brown fox.\n"] * 50), vocab_size=300)
    for tok in (trained, ascii_tok):
        ids = tok.encode(UNICODE_TEXT)
        assert tok.decode(ids) == UNICODE_TEXT
        assert tok.decode(ids, skip_special_tokens=True) == UNICODE_TEXT.replace("<|endoftext|>", "")
        assert tok.batch_decode([tok.encode(t) for t in BATCH]) == BATCH


def test_train_from_file_iterator_and_list_agree(trained, corpus_file):
    lines = corpus_file.read_text(encoding="utf-8").splitlines(keepends=True)
    from_iter = train_tokenizer(iter(lines), vocab_size=600)
    from_list = train_tokenizer([str(corpus_file)], vocab_size=600)
    assert from_iter.get_vocab() == trained.get_vocab() == from_list.get_vocab()
    assert from_iter.encode(UNICODE_TEXT) == trained.encode(UNICODE_TEXT)


def test_train_extra_special_tokens():
    tok = train_tokenizer(iter(["some text here and there\n"] * 20), 300, special_tokens=("<|endoftext|>", "<|pad|>"))
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|pad|>"]) == [0, 1]
    assert tok.encode("a<|pad|>b") == [tok.encode("a")[0], 1, tok.encode("b")[0]]
    assert tok.additional_special_tokens == ["<|pad|>"]


# ------------------------------------------------------------------------------------ parity with transformers
def test_saved_tokenizer_loads_in_transformers_with_same_ids(trained, saved_dir, hf, corpus_file):
    assert {p.name for p in saved_dir.iterdir()} >= {
        "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    for text in [UNICODE_TEXT, *BATCH, corpus_file.read_text(encoding="utf-8")[:5000]]:
        ids = trained.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == trained.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=True) == trained.decode(ids, skip_special_tokens=True)
    assert len(hf) == len(trained) and hf.vocab_size == trained.vocab_size
    assert hf.eos_token_id == trained.eos_token_id and hf.bos_token_id == trained.bos_token_id
    assert hf.pad_token is None
    assert hf.get_vocab() == trained.get_vocab()
    tokens = trained.convert_ids_to_tokens(trained.encode(UNICODE_TEXT))
    assert tokens == hf.convert_ids_to_tokens(hf.encode(UNICODE_TEXT))
    assert trained.convert_tokens_to_ids(tokens + ["not-a-token"]) == hf.convert_tokens_to_ids(tokens + ["not-a-token"])


def test_loads_files_written_by_transformers_tokenizer_json(hf, hf_written_dir):
    assert (hf_written_dir / "tokenizer.json").is_file()
    ours = fresh(hf_written_dir)
    assert ours.encode(UNICODE_TEXT) == hf(UNICODE_TEXT)["input_ids"]
    assert ours.eos_token_id == hf.eos_token_id and ours.pad_token is None and len(ours) == len(hf)
    assert ours.decode(ours.encode(UNICODE_TEXT)) == UNICODE_TEXT
    # a tokenizer.json file path works too
    assert fresh(hf_written_dir / "tokenizer.json").encode(UNICODE_TEXT) == ours.encode(UNICODE_TEXT)


def test_loads_vocab_and_merges_without_tokenizer_json(hf, hf_written_dir, tmp_path):
    # transformers 5 no longer writes vocab.json/merges.txt, so the legacy files come from its backend BPE model;
    # its tokenizer_config.json is kept and tokenizer.json deleted.
    legacy = tmp_path / "legacy"
    shutil.copytree(hf_written_dir, legacy)
    (legacy / "tokenizer.json").unlink()
    hf.backend_tokenizer.model.save(str(legacy))
    ours = fresh(legacy)
    hf_legacy = transformers.GPT2TokenizerFast.from_pretrained(str(legacy))
    for text in [UNICODE_TEXT, *BATCH]:
        assert ours.encode(text) == hf_legacy(text)["input_ids"] == hf(text)["input_ids"]
    assert ours.encode("<|endoftext|>") == [hf.eos_token_id]  # special token matched whole, not split into bytes


def test_save_vocabulary_files_load_back(trained, tmp_path):
    vocab, merges = trained.save_vocabulary(tmp_path / "v")
    assert Path(vocab).name == "vocab.json" and Path(merges).name == "merges.txt"
    assert sorted(os.listdir(tmp_path / "v")) == ["merges.txt", "vocab.json"]
    ours = fresh(tmp_path / "v")
    hf_v = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "v"))
    assert ours.encode(UNICODE_TEXT) == trained.encode(UNICODE_TEXT) == hf_v(UNICODE_TEXT)["input_ids"]
    assert ours.get_vocab() == trained.get_vocab()
    assert ours.eos_token_id == trained.eos_token_id
    # also via the explicit constructor
    direct = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    assert direct.encode(UNICODE_TEXT) == trained.encode(UNICODE_TEXT)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_transformers(saved_dir, side):
    ours, hf = fresh(saved_dir), transformers.GPT2TokenizerFast.from_pretrained(str(saved_dir))
    for t in (ours, hf):
        t.pad_token = t.eos_token
        t.padding_side = side
    a = ours(BATCH, padding=True, return_tensors="pt")
    b = hf(BATCH, padding=True, return_tensors="pt")
    assert a.input_ids.dtype == torch.long and a.attention_mask.dtype == torch.long
    assert torch.equal(a.input_ids, b["input_ids"]) and torch.equal(a.attention_mask, b["attention_mask"])
    # real tokens are where the mask is 1, on the requested side
    first_row_len = len(ours.encode(BATCH[1]))
    row = a.attention_mask[1].tolist()
    assert row == ([1] * first_row_len + [0] * (len(row) - first_row_len) if side == "right"
                   else [0] * (len(row) - first_row_len) + [1] * first_row_len)
    # max_length padding + truncation, and pad_to_multiple_of, as lists
    for kw in [dict(padding="max_length", truncation=True, max_length=7), dict(max_length=5),
               dict(padding=True, pad_to_multiple_of=8), dict(padding="longest", truncation=True, max_length=4)]:
        x, y = ours(BATCH, **kw), hf(BATCH, **kw)
        assert x["input_ids"] == y["input_ids"] and x["attention_mask"] == y["attention_mask"], kw


def test_truncation_side_left_matches_transformers(saved_dir):
    ours, hf = fresh(saved_dir), transformers.GPT2TokenizerFast.from_pretrained(str(saved_dir))
    ours.truncation_side = hf.truncation_side = "left"
    kw = dict(truncation=True, max_length=3)
    assert ours(BATCH, **kw)["input_ids"] == hf(BATCH, **kw)["input_ids"]


def test_offsets_mapping_matches_transformers(saved_dir, hf):
    ours = fresh(saved_dir)
    texts = [UNICODE_TEXT, *BATCH]
    a = ours(texts, return_offsets_mapping=True)
    b = hf(texts, return_offsets_mapping=True)
    assert a["offset_mapping"] == [list(map(tuple, o)) for o in b["offset_mapping"]]
    # offsets index the python string: the span of every token of a plain-ASCII text decodes to that text slice
    text = BATCH[0]
    one = ours(text, return_offsets_mapping=True)
    assert [text[s:e] for s, e in one.offset_mapping] == [ours.decode([i]) for i in one.input_ids]
    # padded offsets are (0, 0), as in transformers
    ours.pad_token = hf.pad_token = "<|endoftext|>"
    padded = ours(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
    assert padded.offset_mapping.shape == (len(texts), padded.input_ids.shape[1], 2)
    assert padded.offset_mapping.tolist() == hf(texts, padding=True, return_offsets_mapping=True,
                                                return_tensors="pt")["offset_mapping"].tolist()
    hf.pad_token = None


def test_pad_token_settings_survive_save_and_load_in_both(trained, tmp_path):
    tok = GPT2TokenizerFast(trained.backend_tokenizer)
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    tok.model_max_length = 64
    tok.save_pretrained(tmp_path / "p")
    for loaded in (fresh(tmp_path / "p"), transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "p"))):
        assert loaded.pad_token == "<|endoftext|>" and loaded.pad_token_id == 0
        assert loaded.padding_side == "left" and loaded.model_max_length == 64
    assert trained.pad_token is None  # the copy did not touch the original
    assert tok(["a", "bb cc"], padding=True)["attention_mask"][0][0] == 0  # left padding by default now


def test_new_pad_token_added_as_special(trained, tmp_path):
    tok = GPT2TokenizerFast(trained.backend_tokenizer)
    assert tok.add_special_tokens({"pad_token": "[PAD]"}) == 1
    assert tok.pad_token_id == 600 and len(tok) == 601 and tok.vocab_size == 600
    assert len(trained) == 600  # the backend was copied, not shared
    tok.save_pretrained(tmp_path / "pad")
    ours, hf = fresh(tmp_path / "pad"), transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "pad"))
    assert ours.pad_token_id == hf.pad_token_id == 600 and len(ours) == len(hf) == 601
    assert ours.encode("x[PAD]y") == hf("x[PAD]y")["input_ids"]
    # the legacy route (vocab.json + merges.txt + added_tokens.json / config) keeps the id too
    (tmp_path / "pad" / "tokenizer.json").unlink()
    assert fresh(tmp_path / "pad").encode("x[PAD]y") == ours.encode("x[PAD]y")


# ----------------------------------------------------------------------------------------------- API behaviour
def test_call_outputs_and_batch_encoding(trained):
    tok = GPT2TokenizerFast(trained.backend_tokenizer)
    single = tok("Hello there")
    assert isinstance(single, BatchEncoding) and isinstance(single, dict)
    assert single.input_ids == single["input_ids"] == tok.encode("Hello there")
    assert single.attention_mask == [1] * len(single.input_ids)
    pt = tok("Hello there", return_tensors="pt").to("cpu")
    assert pt.input_ids.shape == (1, len(single.input_ids)) and pt.input_ids.dtype == torch.long
    assert tok.encode("Hello there", return_tensors="pt").tolist() == [single.input_ids]
    assert tok.decode(pt.input_ids[0]) == "Hello there"
    assert tok.batch_decode(pt.input_ids) == ["Hello there"]
    assert "attention_mask" not in tok(["a"], return_attention_mask=False)
    assert tok(["a b", "c"], add_special_tokens=False)["input_ids"] == tok(["a b", "c"])["input_ids"]  # GPT-2 adds none
    with pytest.raises(AttributeError, match="no key or attribute"):
        _ = single.labels
    assert tok.encode_batch(BATCH) == [tok.encode(t) for t in BATCH]
    assert tok.tokenize("Hello there") == tok.convert_ids_to_tokens(tok.encode("Hello there"))
    assert tok.convert_tokens_to_string(tok.tokenize(UNICODE_TEXT)) == UNICODE_TEXT


def test_padding_without_pad_token_is_a_clear_error(trained):
    with pytest.raises(ValueError, match=r"tokenizer\.pad_token = tokenizer\.eos_token"):
        trained(BATCH, padding=True)
    with pytest.raises(ValueError, match="padding=True"):
        trained(BATCH, return_tensors="pt")  # ragged batch without padding
    with pytest.raises(ValueError, match="not in the vocabulary"):
        GPT2TokenizerFast(trained.backend_tokenizer).pad_token = "[NOPE]"


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT2TokenizerFast.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT2TokenizerFast.from_pretrained("./no/such/tokenizer/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json, or vocab\.json \+ merges\.txt"):
        GPT2TokenizerFast.from_pretrained(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(FileNotFoundError, match=r"found: \['vocab.json'\]"):
        GPT2TokenizerFast.from_pretrained(tmp_path / "half")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        GPT2TokenizerFast.from_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="from_pretrained"):
        GPT2TokenizerFast()


def test_training_errors_name_the_problem(tmp_path, corpus_file):
    with pytest.raises(ValueError, match=r"vocab_size=200 is too small.*>= 257"):
        train_tokenizer(corpus_file, vocab_size=200)
    with pytest.raises(ValueError, match=">= 258"):
        train_tokenizer(corpus_file, vocab_size=257, special_tokens=("<|endoftext|>", "<|pad|>"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(empty, vocab_size=300)
    with pytest.raises(ValueError, match="no \\(non-empty\\) text"):
        train_tokenizer(iter(["", ""]), vocab_size=300)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_tokenizer(tmp_path / "missing.txt", vocab_size=300)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([str(corpus_file), str(tmp_path / "missing.txt")], vocab_size=300)


def test_tokenizer_module_needs_neither_torch_nor_transformers():
    # load gpt2/tokenizer.py on its own (gpt2/__init__ imports the torch model) and check what it pulled in
    path = Path(__file__).resolve().parents[1] / "gpt2" / "tokenizer.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tok', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "t = m.train_tokenizer(iter(['hello world'] * 5), 260)\n"
        "assert t.decode(t.encode('héllo')) == 'héllo'\n"
        "bad = [k for k in ('torch', 'transformers', 'huggingface_hub') if k in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_old_folder_flags_match_transformers(saved_dir, tmp_path, corpus_file):
    # transformers 4 wrote clean_up_tokenization_spaces=true into GPT-2 folders; 5.x ignores it for BPE so decode
    # still round-trips, and model_max_length bounds truncation=True without max_length
    old = tmp_path / "old"
    shutil.copytree(saved_dir, old)
    cfg = json.loads((old / "tokenizer_config.json").read_text())
    cfg.update(clean_up_tokenization_spaces=True, model_max_length=16)
    (old / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, hf = fresh(old), transformers.GPT2TokenizerFast.from_pretrained(str(old))
    text = "Hello , world . I 'm here , aren 't you ?"
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text)) == text
    long = corpus_file.read_text(encoding="utf-8")[:2000]
    assert ours(long, truncation=True)["input_ids"] == hf(long, truncation=True)["input_ids"]
    assert len(ours(long, truncation=True)["input_ids"]) == 16


def test_pickles_for_dataloader_workers(trained):
    import pickle

    tok = pickle.loads(pickle.dumps(trained))
    assert tok.encode(UNICODE_TEXT) == trained.encode(UNICODE_TEXT) and tok.eos_token_id == trained.eos_token_id
    enc = pickle.loads(pickle.dumps(trained(BATCH)))
    assert enc.input_ids == trained(BATCH).input_ids


def test_hub_id_goes_through_huggingface_hub(saved_dir, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(repo_id, allow_patterns=None, **_):
        calls.append((repo_id, allow_patterns))
        if repo_id == "someone/missing":
            raise OSError("Repository Not Found\nfor url https://huggingface.co/someone/missing")
        return str(saved_dir)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    tok = GPT2TokenizerFast.from_pretrained("someone/tiny-gpt2")
    assert tok.encode(UNICODE_TEXT) == fresh(saved_dir).encode(UNICODE_TEXT)
    assert calls[0][0] == "someone/tiny-gpt2" and "tokenizer.json" in calls[0][1]
    with pytest.raises(FileNotFoundError, match=r"not a local tokenizer folder, and as a hub id it could not be "
                                                r"fetched.*Repository Not Found"):
        GPT2TokenizerFast.from_pretrained("someone/missing")


def test_add_bos_eos_config_matches_transformers_vocab_route(trained, tmp_path):
    # a folder whose config asks for bos/eos around every sequence (not GPT-2's default); transformers 5 honours
    # it on the vocab.json + merges.txt route (with tokenizer.json present it keeps the file's post-processor)
    d = tmp_path / "bos"
    trained.save_vocabulary(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": True}))
    ours, hf = fresh(d), transformers.GPT2TokenizerFast.from_pretrained(str(d))
    for kw in [{}, dict(truncation=True, max_length=4), dict(add_special_tokens=False)]:
        assert ours(BATCH, **kw)["input_ids"] == hf(BATCH, **kw)["input_ids"], kw
    assert ours(BATCH[0])["input_ids"][0] == ours(BATCH[0])["input_ids"][-1] == ours.eos_token_id
    # a max_length that leaves no room next to bos + eos: whatever the tokenizers pipeline gives, as in transformers
    for n in (1, 2, 3):
        assert ours(BATCH, truncation=True, max_length=n)["input_ids"] == hf(BATCH, truncation=True, max_length=n)[
            "input_ids"], n
