"""The tasks are found by module name: `task.name` accepts exactly the modules of train/tasks/ (= conf/task/*.yaml),
each declares the classes it trains and exports to, and a sixth task is one new file plus one YAML — shown by
training one that lives outside the repository."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
