"""The tasks a run can train, one module each, named as `task.name` (= conf/task/<name>.yaml):

    lm          causal language modelling (pre-training, or continuing from model.init_from)
    cls         sequence classification          token_cls   token classification (NER-style)
    qa          extractive question answering    mc          multiple choice (double heads)

Each module defines `TASK`, a `train.tasks.base.Task`: what differs per task in the one training job
(train/job.py) — its data module, head model, LightningModule (loss + validation metrics), which checkpoint is best,
which transformers class loads its export, what it adds to the summary. Every module in this package except `base`
is a task: adding one means adding its file here and its YAML in conf/task/, nothing else.

Listing the tasks imports none of them (config validation stays free of torch); `get_task` imports the one a run uses.
"""

from __future__ import annotations

import importlib
import pkgutil

NOT_TASKS = ("base", "model")  # modules of this package that hold shared code, not a task


def task_names() -> tuple[str, ...]:
    """The names `task.name` accepts: the task modules of this package, sorted (found on disk, none imported)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_TASKS))


def get_task(name: str):
    """The `Task` of task `name` (its module's TASK); ValueError naming the available tasks if there is none."""
    if name not in task_names():
        raise ValueError(f"task.name={name!r} is not available; use one of {', '.join(task_names())}.")
    return importlib.import_module(f"{__name__}.{name}").TASK


__all__ = ["get_task", "task_names"]
