"""What a fine-tuning task's data is: one `TaskData` object per task, which `TaskDataModule` calls instead of
branching on a task name (litgpt's data modules behind one interface).

A task's object knows its columns (logical column -> default candidate names, and the `TaskDataConfig` fields that
override them), how a split's rows become examples, the label map, how examples become features (token ids and
targets), how features become a batch, which batch keys the head's forward takes, and the recipe of its offline demo
set. The built-in ones are the `DATA` of data_pipelines/tasks/<name>.py, found by module name (`task_data`); a task
defined elsewhere hands its own object to `TaskDataModule` directly.
"""

from __future__ import annotations

import importlib
import pkgutil
import random
from pathlib import Path
from typing import Any, Optional

# modules of this package that hold shared code; every other module is a task's data (its `DATA`)
SHARED_MODULES = ("base", "config", "datamodule", "demo", "loading")


class TaskData:
    """The data side of one fine-tuning task. Subclasses set the class attributes and implement the methods marked
    "required"; the defaults are those of a task without labels of its own (qa, mc).

    name: the task's name (the demo files' cache key, messages).
    columns: logical column -> candidate column names, the first present wins.
    column_fields: `TaskDataConfig` field -> the logical column it names explicitly (then it must exist).
    model_keys: the batch keys the task's gpt2 head takes as forward arguments.
    demo_sizes: (train, validation) examples of the offline demo set.
    """

    name: str = ""
    columns: dict[str, tuple[str, ...]] = {}
    column_fields: dict[str, str] = {}
    model_keys: tuple[str, ...] = ()
    demo_sizes: tuple[int, int] = (0, 0)

    # -- required
    def read_examples(self, raw, cfg) -> list[dict]:
        """A split's rows (loading.RawSplit) -> examples (dicts of the logical columns); ValueError naming the row."""
        raise NotImplementedError

    def encode(self, examples: list[dict], tokenizer, cfg, labels, where: str, validation: bool) -> list[dict]:
        """Examples -> features (token ids and targets); `labels` is `label_map`'s result, `validation` whether the
        features are scored (qa keeps each window's offsets)."""
        raise NotImplementedError

    def collate(self, feats: list[dict], pad_token_id: int, regression: bool) -> dict:
        """Features -> one right-padded batch of tensors."""
        raise NotImplementedError

    def demo_examples(self, docs: list[list[str]], n: int, rng: random.Random, split: str) -> list[dict]:
        """`n` demo rows (the task's jsonl format) from the embedded corpus' paragraphs `docs`."""
        raise NotImplementedError

    # -- optional
    def check_config(self, cfg) -> None:
        """Settings that concern this task only (so a short max_length for cls is not refused for qa's sake)."""

    def label_map(self, train: list[dict], raw, cfg):
        """The task's labels (loading.LabelMap) from the training split, or None when it has none of its own."""
        return None

    def check_splits(self, train: list[dict], val: list[dict]) -> None:
        """What the two splits must agree on (e.g. mc's number of choices)."""

    def hf_tokenizer(self, tokenizer):
        """The tokenizer an export ships: one with which transformers' documented calls (`tokenizer(text)`, text
        pairs, pre-split words, the pipelines) encode an input as `encode` did in training. By default the training
        tokenizer itself (one text, no special tokens)."""
        return tokenizer

    def num_labels(self, label_map) -> int:
        """The head's output count."""
        return label_map.num_labels

    def problem_type(self, label_map) -> Optional[str]:
        """What GPT2Config.problem_type takes, for a sequence classifier; None otherwise."""
        return None

    def num_choices(self, examples: list[dict]) -> Optional[int]:
        """Choices per example, for a multiple-choice head; None otherwise."""
        return None

    # -- shared
    def column_candidates(self, cfg) -> dict[str, tuple[str, ...]]:
        """Logical column -> names to try: the explicit `cfg.<field>` alone, else the task's defaults."""
        cols = dict(self.columns)
        for field_name, logical in self.column_fields.items():
            value = getattr(cfg, field_name)
            if value is not None:
                cols[logical] = (value,)
        return cols

    def explicit_columns(self, cfg) -> set[str]:
        """The logical columns the user named (these must exist)."""
        return {logical for field_name, logical in self.column_fields.items() if getattr(cfg, field_name) is not None}

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch keys the head's forward takes."""
        return {k: batch[k] for k in self.model_keys if k in batch}


def task_data_names() -> tuple[str, ...]:
    """The built-in tasks with data of their own: the task modules of this package (found on disk, none imported)."""
    here = str(Path(__file__).resolve().parent)
    return tuple(sorted(m.name for m in pkgutil.iter_modules([here]) if m.name not in SHARED_MODULES))


def task_data(task: "str | TaskData") -> TaskData:
    """The `TaskData` of a built-in task name (its module's `DATA`), or `task` itself when it is one already.

    Raises:
        ValueError: naming the built-in tasks when there is no such task.
    """
    if isinstance(task, TaskData):
        return task
    names = task_data_names()
    if task not in names:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(names)} (task=lm uses LMDataModule).")
    return importlib.import_module(f"data_pipelines.tasks.{task}").DATA


__all__ = ["SHARED_MODULES", "TaskData", "task_data", "task_data_names"]
