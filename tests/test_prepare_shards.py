"""Sharded, parallel, resumable preparation: the same tokens whatever the processes, kills or readers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import sigkill_when

from data_pipelines import DataConfig, LMDataModule, read_token_dir, sources
from data_pipelines.cache import TokenSplit
from data_pipelines.fast_bpe import DocumentEncoder
from data_pipelines.prepare import prepare
from data_pipelines.sampler import PackedBlocks
from gpt2.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the of and to in is was it for on that with as by at from his her an which were are this be or had".split()


def english(n_chars: int, seed: int) -> str:
    """Prose-like lines (letters, digits, punctuation, apostrophes) of about n_chars characters."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS + ["it's", "Mr.", "1999", "naïve", "—", "café,"], size=n_chars // 4)
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return "\n".join(line.capitalize() + "." for line in lines)[:n_chars]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    tok = train_tokenizer(iter([english(300_000, 0)]), vocab_size=600)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(out))
    return out


def flat(root: Path, split: str = "train") -> np.ndarray:
    s = getattr(read_token_dir(DataConfig(), root), split)
    return np.concatenate([np.fromfile(f, dtype=s.dtype) for f in s.files])[s.start : s.stop]


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((root / "shards").glob("*.bin"))}


def reference_stream(tok_dir: Path, docs: list[str]) -> np.ndarray:
    from gpt2.tokenizer import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(tok_dir))
    enc = DocumentEncoder(tok.backend_tokenizer, engine="tokenizers")
    return np.concatenate([np.append(ids, tok.eos_token_id) for ids in enc.encode(docs)])


def test_num_proc_1_and_2_write_the_same_shards_and_the_reference_tokens(tmp_path, tok_dir):
    # five small files and one 2.3M-character file: it is read in 1M-character pieces cut where the GPT-2 regex
    # splits anyway, and spread over several shards (shard_size_mb=0.4)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [english(20_000 + 3_000 * i, i) for i in range(5)] + [english(2_300_000, 9)]
    for i, d in enumerate(docs):
        (corpus / f"{i}.txt").write_text(d, encoding="utf-8")
    roots = {}
    for n in (1, 2):
        cfg = DataConfig(source="text", path=str(corpus), tokenizer=str(tok_dir), cache_dir=str(tmp_path / f"c{n}"),
                         num_proc=n, shard_size_mb=0.4, val_fraction=0.01)
        roots[n] = prepare(cfg)
    assert shard_bytes(roots[1]) == shard_bytes(roots[2])
    assert len(list((roots[1] / "shards").glob("train-00005-*.bin"))) == 3  # the big file: 3 pieces, 3 shards
    index = json.loads((roots[2] / "index.json").read_text())
    assert index["encoder"].startswith("tiktoken") and index["splits"]["val"]["start"] == index["splits"]["train"]["stop"]
    stream = np.concatenate([flat(roots[2], "train"), flat(roots[2], "val")])
    np.testing.assert_array_equal(stream, reference_stream(tok_dir, docs))
    assert len(flat(roots[2], "val")) == round(len(stream) * 0.01)  # the deterministic tail, as before


def test_killed_preparation_resumes_with_only_the_missing_shards(tmp_path, tok_dir):
    big = tmp_path / "big.jsonl"  # one large file: document ranges of one unit are spread over the processes
    with open(big, "w", encoding="utf-8") as f:
        for i in range(1200):
            f.write(json.dumps({"text": english(1500 + 17 * (i % 50), i)}) + "\n")
    args = ["data=jsonl", f"data.path={big}", f"data.tokenizer={tok_dir}", "data.shard_size_mb=0.05"]
    cache = tmp_path / "c"
    log = tmp_path / "run1.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "data_pipelines" / "prepare.py"), *args, f"data.cache_dir={cache}",
             "data.num_proc=2"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
        shards = lambda: list(cache.glob("tokens/*/shards/*.bin"))  # noqa: E731
        sigkill_when(proc, lambda: len(shards()) >= 3, log, "three shards written")
    (root,) = cache.glob("tokens/*")
    assert not (root / "index.json").exists()
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in shards()}
    r = subprocess.run(
        [sys.executable, str(ROOT / "data_pipelines" / "prepare.py"), *args, f"data.cache_dir={cache}", "data.num_proc=1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    after = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in shards()}
    assert all(after[name] == st for name, st in before.items())  # finished shards were not rewritten
    assert len(after) > len(before) and not list((root / "shards").glob(".*tmp*"))
    # token for token what one uninterrupted process writes
    one = prepare(DataConfig(source="jsonl", path=str(big), tokenizer=str(tok_dir), shard_size_mb=0.05,
                             cache_dir=str(tmp_path / "one")))
    assert shard_bytes(one) == shard_bytes(root)
    np.testing.assert_array_equal(flat(one, "val"), flat(root, "val"))


def test_training_reads_the_shards_as_one_stream(tmp_path, tok_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        rows = [json.dumps({"text": english(400 + 7 * j, 100 * i + j)}) for j in range(60)]
        (corpus / f"{i}.jsonl").write_text("\n".join(rows) + "\n")
    base = dict(tokenizer=str(tok_dir), cache_dir=str(tmp_path / "c"), shard_size_mb=0.005, block_size=48, batch_size=4)
    dm = LMDataModule(DataConfig(source="jsonl", path=str(corpus), **base))
    dm.prepare_data()
    dm.setup()
    split = dm.data.train
    assert len(split.shards) > 8 and split.num_tokens % 48  # blocks straddle shard edges
    # the same blocks as one flat file holding the concatenation
    whole = tmp_path / "whole.bin"
    np.concatenate([np.fromfile(f, dtype=split.dtype) for f in split.files]).tofile(whole)
    one = PackedBlocks(TokenSplit(whole, split.dtype, split.start, split.stop), 48)
    assert len(one) == len(dm.train_dataset)
    idx = list(range(len(one)))
    assert (one.__getitems__(idx)["input_ids"] == dm.train_dataset.__getitems__(idx)["input_ids"]).all()
    # data=tokens on the sharded folder gives the same batches in the same (resumable) order
    tokens = LMDataModule(DataConfig(source="tokens", path=str(dm.data.root), vocab_size=None, **base))
    tokens.prepare_data()
    tokens.setup()
    assert tokens.vocab_size == dm.vocab_size and len(tokens.tokenizer) == len(dm.tokenizer)
    a, b = iter(dm.train_dataloader()), iter(tokens.train_dataloader())
    for _ in range(6):
        assert (next(a)["input_ids"] == next(b)["input_ids"]).all()
    assert [x["input_ids"].tolist() for x in dm.val_dataloader()] == [x["input_ids"].tolist() for x in tokens.val_dataloader()]


@pytest.mark.parametrize("streaming", [True, False])
def test_hub_split_is_sharded_without_downloading_it_first(tmp_path, tok_dir, monkeypatch, streaming):
    # a local dataset folder stands in for the hub: load_dataset(<folder>, streaming=True) reads its data files
    # one by one, and each file is a unit the processes share out
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    docs = [english(800 + 50 * i, i) for i in range(90)]
    for k in range(3):
        (repo / f"train-{k:05d}-of-00003.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[30 * k : 30 * (k + 1)]))
    monkeypatch.setattr(sources, "HUB_ROWS_PER_UNIT", 25)  # a downloaded split is cut into row ranges of 25
    cfg = DataConfig(source="hub", name=str(tmp_path / "repo"), streaming=streaming, tokenizer=str(tok_dir),
                     cache_dir=str(tmp_path / "c"), val_fraction=0.0, shard_size_mb=0.02)
    assert sources.DocumentSource(cfg).num_units() == (3 if streaming else 4)
    root = prepare(cfg)
    np.testing.assert_array_equal(flat(root), reference_stream(tok_dir, docs))


def test_a_damaged_shard_folder_is_refused_with_the_fix(tmp_path, tok_dir):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": english(1000, i)}) + "\n" for i in range(40)))
    root = prepare(DataConfig(source="jsonl", path=str(tmp_path / "a.jsonl"), tokenizer=str(tok_dir),
                              cache_dir=str(tmp_path / "c"), shard_size_mb=0.01))
    victim = sorted((root / "shards").glob("*.bin"))[1]
    with open(victim, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="re-run prepare.py"):
        read_token_dir(DataConfig(source="tokens", path=str(root), vocab_size=None))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        read_token_dir(DataConfig(source="tokens", path=str(root), vocab_size=None))


def test_flat_version_1_folders_still_train(tmp_path):
    # what prepare.py wrote before the shards: train.bin/val.bin with JSON sidecars
    ids = (np.arange(4000) % 300).astype(np.uint16)
    ids[:3000].tofile(tmp_path / "train.bin")
    ids[3000:].tofile(tmp_path / "val.bin")
    meta = {"format": "gpt2-forge-tokens", "version": 1, "dtype": "uint16", "vocab_size": 300, "eos_token_id": 0}
    for split, n in (("train", 3000), ("val", 1000)):
        (tmp_path / f"{split}.json").write_text(json.dumps({**meta, "num_tokens": n, "split": split}))
    dm = LMDataModule(DataConfig(source="tokens", path=str(tmp_path), vocab_size=None, block_size=50, batch_size=2))
    dm.prepare_data()
    dm.setup()
    assert dm.vocab_size == 300 and len(dm.train_dataset) == 60 and len(dm.val_dataset) == 20
    np.testing.assert_array_equal(next(iter(dm.val_dataloader()))["input_ids"].numpy(), ids[3000:3100].reshape(2, 50))
