"""data_pipelines: sources -> cached tokenizer -> flat token files -> packed batches, and the clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import DataConfig, LMDataModule, read_token_dir
from data_pipelines import cache, tokenizing
from data_pipelines.corpus import (
    build_corpus, corpus_sha256, docstring_documents, prose_paragraphs, topic_documents,
)
from data_pipelines.prepare import prepare
from data_pipelines.tokenizing import encode_documents, split_document, token_dtype
from gpt2.tokenizer import GPT2TokenizerFast, train_tokenizer
from helpers import corpus_text


@pytest.fixture(scope="module")
def english() -> str:
    """300 kB of varied English prose: the head of the embedded default corpus (made at run time)."""
    return corpus_text(300_000)


@pytest.fixture(scope="module")
def docs(english) -> list[str]:
    # varied documents: prose with blank lines, unicode, leading spaces, a literal tab
    paras = [p for p in english[:60_000].split("\n\n") if p.strip()]
    return paras[:40] + ["  indented line\n\tand a tab", "naïve café — ünïcödé ✓", "x"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, english) -> Path:
    tok = train_tokenizer(iter([english[:200_000]]), vocab_size=300)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> GPT2TokenizerFast:
    return GPT2TokenizerFast.from_pretrained(str(tok_dir))


def expected_stream(tok, docs) -> np.ndarray:
    out = []
    for d in docs:
        out += tok.encode(d) + [tok.eos_token_id]
    return np.array(out)


def split_stream(root: Path, split: str) -> np.ndarray:
    """The tokens of one split of a prepared folder (sharded: its shards' range), read through the public reader."""
    s = getattr(read_token_dir(DataConfig(), root), split)
    flat = np.concatenate([np.fromfile(f, dtype=s.dtype) for f in s.files])
    return flat[s.start : s.stop]


def read_stream(root: Path) -> np.ndarray:
    return np.concatenate([split_stream(root, "train"), split_stream(root, "val")])


# ------------------------------------------------------------------ embedded corpus
def test_embedded_corpus_is_deterministic_and_substantial():
    docs = build_corpus()  # built once per process (lru_cache); the default-source test reuses it
    text = "\n".join(docs)
    assert 1_000_000 < len(text) < 4_000_000  # real prose, not a toy
    assert "The \"if\" statement is used for conditional execution" in text  # pydoc_data topic "if"
    assert "This module is an optparse-inspired command-line parsing library that:" in text  # argparse's docstring
    letters = sum(c.isalpha() or c.isspace() for c in text[:200_000]) / 200_000
    assert letters > 0.85  # English text, not code or binary
    # prose only, re-flowed: no doctest or indented code, no hard-wrapped lines, no runs of blank lines, no repeats
    lines = text.split("\n")
    assert not any(ln.startswith((">>>", " ", "\t")) for ln in lines)
    assert sum(map(len, lines)) / sum(1 for ln in lines if ln) > 90  # hard-wrapped docstrings average ~50
    assert "\n\n\n" not in text
    paragraphs = [p for d in docs for p in d.split("\n\n")[1:]]
    assert len(paragraphs) == len(set(paragraphs)) > 5000
    # determinism: rebuilding from scratch gives the same documents in the same order (checked on the topics and
    # one stdlib package; the whole walk takes seconds and uses the same sorted code path); every paragraph of every
    # topic is in the corpus, once ("if" holds only paragraphs of "compound", so it is no document of its own)
    topics = topic_documents()
    assert topics == topic_documents() and len(topics) > 50
    assert {p for t in topics for p in t.split("\n\n")[1:]} <= set(paragraphs)
    email_dir = str(Path(json.__file__).parents[1] / "email")
    a, b = docstring_documents(email_dir), docstring_documents(email_dir)
    assert a == b and len(a) > 10 and corpus_sha256(a) == corpus_sha256(b)


def test_prose_paragraphs_reflow_prose_and_drop_code():
    doc = (
        "Frobnicate the widget.\n\n"
        "This function frobnicates a widget in place. It was\nwrapped at seventy-two columns by\nits author.\n\n"
        "Options\n-------\n\n"
        "    code_sample = frobnicate(widget)\n    print(code_sample)\n\n"
        ">>> frobnicate(1)\nTraceback (most recent call last):\n\n"
        "Args:\n    widget: the widget to change.\n\n"
        ":param widget: the widget\n:returns: None\n\n"
        "   expr ::= term | expr \"+\" term\n\n"
        "+-----+-----+\n| a   | b   |\n\n"
        "The steps are:\n\n"
        "    - open the widget box\n    - turn the crank until it\n      clicks twice\n\n"
        "1. First the widget is read, then its parts are\n   counted one by one.\n"
        "2. Then it is written back to the same place.\n\n"
        "See the example::\n\n    frob()\n"
    )
    assert prose_paragraphs(doc) == [
        "This function frobnicates a widget in place. It was wrapped at seventy-two columns by its author.",
        "- open the widget box\n- turn the crank until it clicks twice",
        "1. First the widget is read, then its parts are counted one by one.\n"
        "2. Then it is written back to the same place.",
    ]  # "Frobnicate the widget." / "The steps are:" / "See the example::" are 3 words: headings, not prose


# ------------------------------------------------------------------ encoding
def test_split_long_document_gives_identical_ids(tok, english, monkeypatch):
    code = Path(json.__file__).read_text()  # indentation-heavy Python source: the hard case for safe cuts
    for text in (english[:40_000], code):
        pieces = split_document(text, chunk_chars=500)
        assert len(pieces) > 1 and "".join(pieces) == text
        got = np.concatenate(list(encode_documents(tok, [[text]], chunk_chars=500)))
        np.testing.assert_array_equal(got, expected_stream(tok, [text]))
    # flushing the encoder mid-document and mid-batch changes nothing either
    monkeypatch.setattr(tokenizing, "ENCODE_BATCH_CHARS", 3000)
    docs = [english[i : i + 7000] for i in range(0, 35_000, 7000)] + ["tiny", code[:2000]]
    arrays = list(encode_documents(tok, [docs[:3], docs[3:]], chunk_chars=500))
    assert len(arrays) > 5
    np.testing.assert_array_equal(np.concatenate(arrays), expected_stream(tok, docs))


def test_token_dtype_choice():
    assert token_dtype(300) == np.uint16 and token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32


# ------------------------------------------------------------------ local formats
def _write(fmt: str, root: Path, docs: list[str]) -> Path:
    if fmt == "text":  # one document per file, names sort in document order
        d = root / "texts"
        d.mkdir()
        for i, doc in enumerate(docs):
            (d / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
        return d
    if fmt == "jsonl":
        p = root / "d.jsonl"
        p.write_text("".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(docs)))
        return p
    if fmt == "csv":
        p = root / "d.csv"
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "text"])
            w.writerows([i, doc] for i, doc in enumerate(docs))
        return p
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = root / "d.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), p)
    return p


@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv", "parquet"])
def test_local_format_gives_docs_joined_with_eos(fmt, tmp_path, docs, tok, tok_dir):
    path = _write(fmt, tmp_path, docs)
    cfg = DataConfig(source=fmt, path=str(path), tokenizer=str(tok_dir), cache_dir=str(tmp_path / "c"))
    root = prepare(cfg)
    np.testing.assert_array_equal(read_stream(root), expected_stream(tok, docs))
    meta = json.loads((root / "index.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tok) and meta["tokenizer"] == "tokenizer"
    assert meta["num_tokens"]["train"] + meta["num_tokens"]["val"] == len(read_stream(root))


def test_val_file_is_used_instead_of_fraction(tmp_path, docs, tok, tok_dir):
    (tmp_path / "tr.txt").write_text(docs[0])
    (tmp_path / "va.txt").write_text(docs[1])
    cfg = DataConfig(
        source="text", path=str(tmp_path / "tr.txt"), val_path=str(tmp_path / "va.txt"),
        tokenizer=str(tok_dir), cache_dir=str(tmp_path / "c"),
    )
    root = prepare(cfg)
    np.testing.assert_array_equal(split_stream(root, "val"), expected_stream(tok, [docs[1]]))
    np.testing.assert_array_equal(split_stream(root, "train"), expected_stream(tok, [docs[0]]))


# ------------------------------------------------------------------ caching
def test_tokenizer_trained_once_and_tokens_cached(tmp_path, monkeypatch, english):
    (tmp_path / "s.txt").write_text(english[:100_000])
    calls = {"train": 0, "encode": 0}
    real_train, real_encode = tokenizing.train_tokenizer, cache.prepare_shards

    def counting_train(*a, **k):
        calls["train"] += 1
        return real_train(*a, **k)

    def counting_encode(*a, **k):
        calls["encode"] += 1
        return real_encode(*a, **k)

    monkeypatch.setattr(tokenizing, "train_tokenizer", counting_train)
    monkeypatch.setattr(cache, "prepare_shards", counting_encode)
    cfg = DataConfig(source="text", path=str(tmp_path / "s.txt"), vocab_size=320, cache_dir=str(tmp_path / "c"))
    root = prepare(cfg)
    mtime = (root / "index.json").stat().st_mtime_ns
    assert calls == {"train": 1, "encode": 1}
    assert prepare(cfg) == root and calls == {"train": 1, "encode": 1}  # second run: nothing retrained/re-encoded
    assert (root / "index.json").stat().st_mtime_ns == mtime
    assert len(GPT2TokenizerFast.from_pretrained(str(root / "tokenizer"))) == 320
    # a changed file is a new cache entry (paths + sizes + mtimes key the cache)
    (tmp_path / "s.txt").write_text(english[:90_000])
    assert prepare(cfg) != root and calls["encode"] == 2
    assert not list((tmp_path / "c" / "tokens").glob(".*tmp*"))  # no temp leftovers


def test_default_source_end_to_end(tmp_path):
    cfg = DataConfig(max_documents=60, vocab_size=400, block_size=32, batch_size=4, cache_dir=str(tmp_path))
    dm = LMDataModule(cfg)
    dm.prepare_data()
    dm.setup()
    assert dm.vocab_size == len(dm.tokenizer) == 400 and dm.tokenizer.eos_token_id == 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and str(batch["input_ids"].dtype) == "torch.int64"
    assert (batch["labels"] == batch["input_ids"]).all()
    meta = json.loads((dm.data.root / "index.json").read_text())
    assert meta["corpus_sha256"] == corpus_sha256(build_corpus())
    # the stream decodes back to the corpus: document 0, then <|endoftext|>, then document 1
    stream = split_stream(dm.data.root, "train")
    docs = build_corpus()
    n0 = len(dm.tokenizer.encode(docs[0]))
    assert dm.tokenizer.decode(stream[:n0].tolist()) == docs[0] and stream[n0] == 0
    val = list(dm.val_dataloader())
    assert val and all(b["input_ids"].shape[1] == 32 for b in val)
    assert [b["input_ids"].tolist() for b in val] == [b["input_ids"].tolist() for b in dm.val_dataloader()]


# ------------------------------------------------------------------ tokens source
def test_tokens_source_reads_prepared_folder(tmp_path, docs, tok_dir):
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    base = dict(block_size=16, batch_size=3, cache_dir=str(tmp_path / "c"))
    root = prepare(DataConfig(source="text", path=str(tmp_path / "a.txt"), tokenizer=str(tok_dir), **base))
    dm_a = LMDataModule(DataConfig(source="text", path=str(tmp_path / "a.txt"), tokenizer=str(tok_dir), **base))
    dm_b = LMDataModule(DataConfig(source="tokens", path=str(root), vocab_size=None, **base))
    for dm in (dm_a, dm_b):
        dm.prepare_data()
        dm.setup()
    assert dm_b.vocab_size == 300 and dm_b.tokenizer is not None and len(dm_b.tokenizer) == 300
    it_a, it_b = iter(dm_a.train_dataloader()), iter(dm_b.train_dataloader())
    for _ in range(5):
        assert (next(it_a)["input_ids"] == next(it_b)["input_ids"]).all()


def test_tokens_source_reads_nanogpt_bins(tmp_path):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 50257, 5000, dtype=np.uint16), rng.integers(0, 50257, 700, dtype=np.uint16)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    dm = LMDataModule(DataConfig(source="tokens", path=str(tmp_path), vocab_size=50304, block_size=64, batch_size=2))
    dm.prepare_data()
    dm.setup()
    assert dm.vocab_size == 50304 and dm.tokenizer is None
    assert len(dm.train_dataset) == 5000 // 64 and len(dm.val_dataset) == 700 // 64
    first_val = next(iter(dm.val_dataloader()))["input_ids"]
    np.testing.assert_array_equal(first_val.numpy(), val[:128].reshape(2, 64))
    rows = {tuple(r) for r in train[: 78 * 64].reshape(78, 64).tolist()}
    assert all(tuple(r) in rows for r in next(iter(dm.train_dataloader()))["input_ids"].tolist())


def test_tokens_source_uint32_when_vocab_exceeds_uint16(tmp_path):
    ids = np.arange(60_000, 60_000 + 4096 * 2, dtype=np.uint32) * 2  # ids up to ~136k need uint32
    ids.tofile(tmp_path / "train.bin")
    dm = LMDataModule(DataConfig(source="tokens", path=str(tmp_path), vocab_size=200_000, block_size=8, val_fraction=0.1))
    dm.setup()
    assert dm.data.train.dtype == np.uint32
    n = len(dm.train_dataset) * 8  # whole blocks only
    np.testing.assert_array_equal(dm.train_dataset.blocks.reshape(-1), ids[:n])
    assert ids[:n].max() > 65535
    assert dm.data.val.num_tokens == round(len(ids) * 0.1)  # no val.bin: tail of train.bin


# ------------------------------------------------------------------ packing
def test_packed_blocks_are_consecutive_slices(tmp_path):
    from data_pipelines.cache import TokenSplit
    from data_pipelines.sampler import PackedBlocks

    ids = np.arange(1000, dtype=np.uint16)
    ids.tofile(tmp_path / "x.bin")
    ds = PackedBlocks(TokenSplit(tmp_path / "x.bin", np.dtype(np.uint16), 100, 1000), block_size=64)
    assert len(ds) == 900 // 64
    b = ds.__getitems__([0, 13, 2])
    assert b["input_ids"].shape == (3, 64)
    assert b["input_ids"][1].tolist() == list(range(100 + 13 * 64, 100 + 14 * 64))
    assert b["input_ids"][0, 0].item() == 100


# ------------------------------------------------------------------ clear errors
def _err(cfg_kwargs, tmp_path, exc=ValueError):
    with pytest.raises(exc) as e:
        cfg = DataConfig(cache_dir=str(tmp_path / "c"), **cfg_kwargs)
        dm = LMDataModule(cfg)
        dm.prepare_data()
        dm.setup()
    return str(e.value)


def test_error_missing_path(tmp_path):
    msg = _err({"source": "jsonl", "path": str(tmp_path / "nope.jsonl")}, tmp_path, FileNotFoundError)
    assert "nope.jsonl" in msg and "does not exist" in msg


def test_error_empty_data(tmp_path, tok_dir):
    (tmp_path / "e.txt").write_text("")
    assert "empty" in _err({"source": "text", "path": str(tmp_path / "e.txt"), "tokenizer": str(tok_dir)}, tmp_path)
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    msg = _err({"source": "jsonl", "path": str(tmp_path / "e.jsonl"), "tokenizer": str(tok_dir)}, tmp_path)
    assert "no text" in msg and "e.jsonl" in msg


def test_error_undecodable_bytes(tmp_path, tok_dir):
    d = tmp_path / "t"
    d.mkdir()
    (d / "a.txt").write_text("fine text\n")
    (d / "b.txt").write_bytes("caf\xe9 in latin-1\n".encode("latin-1"))
    msg = _err({"source": "text", "path": str(d), "tokenizer": str(tok_dir)}, tmp_path)
    assert "b.txt" in msg and "UTF-8" in msg and "0xe9" in msg


def test_error_missing_text_column(tmp_path, tok_dir):
    (tmp_path / "d.jsonl").write_text('{"body": "a", "title": "b"}\n')
    msg = _err({"source": "jsonl", "path": str(tmp_path / "d.jsonl"), "tokenizer": str(tok_dir)}, tmp_path)
    assert "'text'" in msg and "body, title" in msg and "data.text_column" in msg


def test_check_source_refuses_from_a_files_head_with_the_full_reads_message(tmp_path, tok_dir):
    """check_source (run before torch / Lightning / datasets are imported) says what reading the data would say, and
    passes what only the full read can judge: one JSON document over many lines, a later row holding the column."""
    from data_pipelines.sources import check_source

    (tmp_path / "d.jsonl").write_text('{"body": "a", "title": "b"}\n')
    (tmp_path / "l.txt").write_bytes(("fine\n" * 10 + "caf\xe9\n").encode("latin-1"))
    for name, source in (("d.jsonl", "jsonl"), ("l.txt", "text")):
        spec = {"source": source, "path": str(tmp_path / name), "tokenizer": str(tok_dir)}
        with pytest.raises(ValueError) as early:
            check_source(DataConfig(cache_dir=str(tmp_path / "c"), **spec))
        assert str(early.value) == _err(spec, tmp_path)
    (tmp_path / "p.jsonl").write_text("plain text, not JSON lines\n" * 3)
    with pytest.raises(ValueError, match=r"p\.jsonl is not JSON lines \(line 1 starts 'plain text.*data=text"):
        check_source(DataConfig(source="jsonl", path=str(tmp_path / "p.jsonl"), tokenizer=str(tok_dir)))
    (tmp_path / "doc.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    (tmp_path / "later.jsonl").write_text('{"id": 1}\n{"id": 2, "text": "b"}\n')
    for name in ("doc.json", "later.jsonl"):
        check_source(DataConfig(source="jsonl", path=str(tmp_path / name), tokenizer=str(tok_dir)))


def test_error_bad_source_and_block_size(tmp_path):
    assert "data.source='bogus'" in _err({"source": "bogus"}, tmp_path) and "jsonl" in _err({"source": "x"}, tmp_path)
    assert "data.block_size=1" in _err({"block_size": 1}, tmp_path)


def test_error_tokens_dir_problems(tmp_path):
    msg = _err({"source": "tokens", "path": str(tmp_path), "vocab_size": 100}, tmp_path, FileNotFoundError)
    assert "no train.bin" in msg
    np.array([1, 2, 999, 3] * 100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    msg = _err({"source": "tokens", "path": str(tmp_path), "vocab_size": 500}, tmp_path)
    assert "token id 999" in msg and "data.vocab_size=1000" in msg
    assert "data.vocab_size=<V>" in _err({"source": "tokens", "path": str(tmp_path), "vocab_size": None}, tmp_path)


def test_error_data_too_small_for_one_block(tmp_path, tok_dir):
    (tmp_path / "s.txt").write_text("a short text")
    msg = _err({"source": "text", "path": str(tmp_path / "s.txt"), "tokenizer": str(tok_dir), "block_size": 512}, tmp_path)
    assert "fewer than one block" in msg and "data.block_size=512" in msg


# ------------------------------------------------------------------ hub (a local dataset folder stands in for the hub)
@pytest.mark.parametrize("streaming", [False, True])
def test_hub_source_with_val_split(tmp_path, docs, tok, tok_dir, streaming):
    # load_dataset(<folder>) resolves train/validation splits from file names exactly as it does for a hub repo
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs[:30]))
    (repo / "validation.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs[30:]))
    cfg = DataConfig(source="hub", name=str(repo), split="train", val_split="validation", text_column="content",
                     streaming=streaming, tokenizer=str(tok_dir), cache_dir=str(tmp_path / "c"))
    root = prepare(cfg)
    np.testing.assert_array_equal(split_stream(root, "train"), expected_stream(tok, docs[:30]))
    np.testing.assert_array_equal(split_stream(root, "val"), expected_stream(tok, docs[30:]))
    cfg.max_documents = 5
    root5 = prepare(cfg)  # max_documents is part of the cache key
    assert root5 != root
    np.testing.assert_array_equal(split_stream(root5, "train"), expected_stream(tok, docs[:5]))
