"""The tasks a run can train, one module each, named as `task.name` (= conf/task/<name>.yaml):

    lm          causal language modelling (pre-training, or continuing from model.init_from)
    cls         sequence classification          token_cls   token classification (NER-style)
    qa          extractive question answering    mc          multiple choice (double heads)

Each module defines `TASK`, a `train.tasks.base.Task`: what differs per task in the one training job
(train/job.py) — its data module, head model, LightningModule (loss + validation metrics), which checkpoint is best,
which transformers class loads its export, what it adds to the summary. Every module in this package except `base`
is a task: adding one means adding its file here and its YAML in conf/task/, nothing else. A task may also live
outside the repository: its YAML sets `module: <importable module>` (and its folder joins Hydra's search path).

Listing the tasks imports none of them (config validation stays free of torch); `get_task` imports the one a run uses.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

NOT_TASKS = ("base", "model")  # modules of this package that hold shared code, not a task


def task_names() -> tuple[str, ...]:
    """The names `task.name` accepts: the task modules of this package, sorted (found on disk, none imported)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_TASKS))


def get_task(name: str, module: Optional[str] = None):
    """The `Task` of task `name`: its module's TASK, the module being train/tasks/<name>.py or, for a task defined
    elsewhere, `module` (an importable dotted name: task.module).

    Raises:
        ValueError: naming the available tasks, or the module that cannot be imported or defines no TASK.
    """
    if module is None:
        if name not in task_names():
            raise ValueError(f"task.name={name!r} is not available; use one of {', '.join(task_names())}.")
        module = f"{__name__}.{name}"
    try:
        task = importlib.import_module(module).TASK
    except ModuleNotFoundError as e:
        raise ValueError(f"task.module={module} cannot be imported ({e}); put its folder on PYTHONPATH.") from e
    except AttributeError:
        raise ValueError(f"task.module={module} defines no TASK; set TASK = <your Task>() in it.") from None
    if task.name != name:
        raise ValueError(f"task.module={module} defines the task {task.name!r}, not task.name={name!r}.")
    return task


__all__ = ["get_task", "task_names"]
