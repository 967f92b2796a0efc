"""The tasks are found by module name: `task.name` accepts exactly the modules of train/tasks/ (= conf/task/*.yaml),
each declares the classes it trains and exports to, and a sixth task is one new file plus one YAML — shown by
training one that lives outside the repository."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import gpt2
import train.tasks
from helpers import compose_config, corpus_text
from train.config import ConfigError, TaskConfig, register_configs
from train.job import train as run_job
from train.tasks import get_task, task_names

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


def test_task_names_are_the_task_modules_and_the_task_yamls():
    assert task_names() == tuple(sorted(p.stem for p in (CONF / "task").glob("*.yaml")))
    assert set(task_names()) >= {"lm", "cls", "token_cls", "qa", "mc"}
    with pytest.raises(ConfigError, match=r"task.name='ner' is not available; use one of cls, lm, mc, qa, token_cls"):
        TaskConfig(name="ner")


@pytest.mark.parametrize("name", task_names())
def test_each_task_declares_its_model_and_export_class(name):
    task = get_task(name)
    assert task.name == name
    assert getattr(gpt2, task.model_class.__name__) is task.model_class
    transformers = pytest.importorskip("transformers")
    assert hasattr(transformers, task.hf_class), task.hf_class


SIXTH_TASK = '''"""Sequence classification kept by its macro F1: the cls data and head, another best checkpoint."""
from train.tasks.cls import ClsTask


class ClsByF1(ClsTask):
    name = "cls_f1"
    data_task = "cls"

    def default_monitor(self, dm):
        return "val/f1", "max"


TASK = ClsByF1()
'''


def test_a_sixth_task_is_one_file_and_one_yaml(tmp_path, monkeypatch):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "cls_f1.py").write_text(SIXTH_TASK)
    (tmp_path / "conf" / "task").mkdir(parents=True)
    yaml = (CONF / "task" / "cls.yaml").read_text().replace("name: cls\n", "name: cls_f1\n")
    (tmp_path / "conf" / "task" / "cls_f1.yaml").write_text(yaml)
    monkeypatch.setattr(train.tasks, "__path__", [*train.tasks.__path__, str(tmp_path / "tasks")])
    monkeypatch.delitem(sys.modules, "train.tasks.cls_f1", raising=False)
    corpus = tmp_path / "input.txt"
    corpus.write_text(corpus_text(60_000))
    run_dir = tmp_path / "run"
    cfg = compose_config([
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "task=cls_f1", f"run_dir={run_dir}",
        "data=text", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=512",
        f"task.data.cache_dir={tmp_path / 'cache'}", "task.data.demo_train_size=64", "task.data.demo_val_size=16",
        "task.data.batch_size=8", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=4", "guard=off",
    ])
    try:
        assert cfg.task.name == "cls_f1" and "cls_f1" in task_names()
        summary = run_job(cfg)
    finally:
        sys.modules.pop("train.tasks.cls_f1", None)
    # the job ran the new task through every step: its monitor picked checkpoints/best, the export is its head
    assert summary["task"] == "cls_f1" and summary["monitor"] == "val/f1"
    assert summary["best"]["metric"] == "val/f1" and (run_dir / "checkpoints" / "best" / "meta.json").is_file()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/loss", "val/accuracy", "val/f1"} <= set(header)
    config = json.loads((run_dir / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["num_labels"] == 2


# A task of one's own, outside the repository: its own head (a classifier over the mean of the real tokens' hidden
# states) and its own data (how many words a sentence has, in three bins), in one Python file...
OWN_TASK = '''"""Word count: how many words a sentence has (1-6, 7-12, 13+), read by a mean-pooling head."""
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import gpt2
from data_pipelines.tasks import TaskData
from data_pipelines.tasks.loading import padded_ids, resolve_column
from train.tasks.base import FineTuneTask, TaskModule

BINS = ("short", "medium", "long")


class GPT2ForWordCount(gpt2.GPT2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = gpt2.GPT2Model(config)
        self.count_head = nn.Linear(config.n_embd, config.num_labels)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        h = self.transformer(input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        logits = self.count_head((h * m).sum(1) / m.sum(1))  # (B, bins)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


class WordCountData(TaskData):
    name = "word_count"
    columns = {"text": ("text",)}
    model_keys = ("input_ids", "attention_mask", "labels")
    demo_sizes = (256, 64)

    def read_examples(self, raw, cfg):
        col = resolve_column(raw, "text", self.column_candidates(cfg)["text"])
        return [{"text": t} for t in raw.columns[col]]

    def encode(self, examples, tokenizer, cfg, labels, where, validation):
        ids = tokenizer.encode_batch([e["text"] for e in examples])
        return [{"input_ids": x[: cfg.max_length], "labels": min(len(e["text"].split()) // 7, 2)}
                for e, x in zip(examples, ids)]

    def collate(self, feats, pad_token_id, regression):
        out = padded_ids(feats, pad_token_id)
        out["labels"] = torch.tensor([f["labels"] for f in feats])
        return out

    def num_labels(self, label_map):
        return len(BINS)

    def demo_examples(self, docs, n, rng, split):
        sentences = [s for doc in docs for p in doc for s in p.split(". ") if 0 < len(s.split()) < 40]
        rng.shuffle(sentences)
        return [{"text": s} for s in sentences[:n]]


class WordCountModule(TaskModule):
    def keep(self, outputs, batch):
        return outputs.logits.argmax(-1).cpu(), batch["labels"].cpu()

    def score(self, kept):
        pred, gold = torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept])
        return {"val/accuracy": float((pred == gold).float().mean())}


class WordCountTask(FineTuneTask):
    name = "word_count"
    model_class = GPT2ForWordCount
    hf_class = "GPT2ForWordCount (gpt2-forge only)"
    module_class = WordCountModule
    data = WordCountData()

    def head_config(self, dm):
        return {**super().head_config(dm), "num_labels": dm.num_labels}

    def default_monitor(self, dm):
        return "val/accuracy", "max"


TASK = WordCountTask()
'''
# ... and one YAML.
OWN_TASK_YAML = """name: word_count
module: word_count_task
data:
  max_length: 48
  batch_size: 16
"""


def test_a_task_with_its_own_head_and_data_from_outside_the_repository(tmp_path, monkeypatch):
    """One .py (head, data object, LightningModule, Task) and one .yaml, in folders of the user's own: the job trains
    it end to end (its demo data, its head, its metric picking checkpoints/best) without a change to the repository."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "word_count_task.py").write_text(OWN_TASK)
    (tmp_path / "conf" / "task").mkdir(parents=True)
    (tmp_path / "conf" / "task" / "word_count.yaml").write_text(OWN_TASK_YAML)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))  # what the user's PYTHONPATH does
    corpus = tmp_path / "input.txt"
    corpus.write_text(corpus_text(60_000))
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cfg = compose_config([
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "task=word_count", f"run_dir={run_dir}",
        "data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=512",
        f"task.data.cache_dir={cache}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
        "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=6", "guard=off",
    ])
    assert cfg.task.name == "word_count" and cfg.task.module == "word_count_task"
    try:
        summary = run_job(cfg)
    finally:
        sys.modules.pop("word_count_task", None)
    assert summary["task"] == "word_count" and summary["num_labels"] == 3
    assert summary["best"]["metric"] == "val/accuracy" and 0.0 <= summary["best"]["value"] <= 1.0
    assert summary["first_train_loss"] is not None and summary["last_train_loss"] < float("inf")
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/accuracy" in header
    config = json.loads((run_dir / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForWordCount"] and config["num_labels"] == 3
    with safe_open(str(run_dir / "hf" / "model.safetensors"), framework="pt") as f:
        assert "count_head.weight" in set(f.keys())  # its own head, exported beside the trunk


def test_an_outside_task_module_that_is_missing_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="task.module=no_such_task_module cannot be imported"):
        get_task("word_count", "no_such_task_module")
