"""README's local lm_eval task, as written: `train/cli/sample_task.py my_tasks/` writes a task YAML + JSONL from the
embedded corpus, and `train/cli/evaluate.py hf-out --tasks my_lambada --include-path my_tasks/ --device cpu` scores a
model on it (offline; the folders are made in tmp, the commands are README's)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from gpt2 import GPT2Config, GPT2LMHeadModel, train_tokenizer  # noqa: E402
from train.cli.sample_task import sample_sentences, write_sample_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_sample_sentences_end_in_a_word_and_are_deterministic():
    docs = sample_sentences(50)
    assert len(docs) == 50 and docs == sample_sentences(50) and len(set(docs)) > 40
    for s in docs:
        words = s.split(" ")
        assert 8 <= len(words) <= 30 and re.fullmatch(r"[A-Za-z]{3,}", words[-1]), s
    with pytest.raises(ValueError, match="--num-docs"):
        write_sample_task("unused", num_docs=0)


def test_readme_local_task_commands_run_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    write = "python train/cli/sample_task.py my_tasks/"
    score = "python train/cli/evaluate.py hf-out --tasks my_lambada --include-path my_tasks/ --device cpu"
    assert write in readme and score in readme
    # hf-out: a small GPT-2 with its tokenizer (README makes it with train/cli/export.py)
    tok = train_tokenizer(iter(sample_sentences(400)), vocab_size=400)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(
        str(tmp_path / "hf-out"))
    tok.save_pretrained(str(tmp_path / "hf-out"))
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "datasets"), HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    for cmd in (write + " --num-docs 24", score + " --out results.json"):
        argv = cmd.split()
        r = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert len((tmp_path / "my_tasks" / "my_lambada.jsonl").read_text().splitlines()) == 24
    results = json.loads((tmp_path / "results.json").read_text())
    scores = results["results"]["my_lambada"]
    assert 0.0 <= scores["acc,none"] <= 1.0 and scores["perplexity,none"] > 1.0
    assert results["n-samples"]["my_lambada"]["effective"] == 24
