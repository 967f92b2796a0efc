"""Fine-tuning task data — loading (local jsonl/csv/parquet, hub, offline demo), column mapping, label maps,
encoding, batches — and the `TaskDataModule`. What is specific to a task is its `TaskData` object (base.py), the
`DATA` of its module here (cls.py, token_cls.py, qa.py, mc.py). Imports only `gpt2` of ours (via the tokenizer).

Public API: TaskData, task_data, task_data_names, TaskDataConfig, to_task_data_config, TASK_SOURCES, TaskDataModule,
TaskCollator, LabelMap, build_demo, demo_files; DEFAULT_COLUMNS and MODEL_KEYS ({task: its TaskData's columns /
model_keys}, read from the objects).
"""

from data_pipelines.tasks.base import TaskData, task_data, task_data_names
from data_pipelines.tasks.config import TASK_SOURCES, TaskDataConfig, register_configs, to_task_data_config

__all__ = [
    "TaskData", "task_data", "task_data_names", "TASK_SOURCES", "TaskDataConfig", "to_task_data_config",
    "register_configs", "TaskDataModule", "TaskCollator", "LabelMap", "build_demo", "demo_files", "DEFAULT_COLUMNS",
    "MODEL_KEYS",
]


def __getattr__(name):  # lazy: importing the config does not pull in torch/lightning/datasets
    if name in ("TaskDataModule", "TaskCollator"):
        from data_pipelines.tasks import datamodule

        return getattr(datamodule, name)
    if name == "LabelMap":
        from data_pipelines.tasks.loading import LabelMap

        return LabelMap
    if name in ("build_demo", "demo_files"):
        from data_pipelines.tasks import demo

        return getattr(demo, name)
    if name == "DEFAULT_COLUMNS":
        return {t: task_data(t).columns for t in task_data_names()}
    if name == "MODEL_KEYS":
        return {t: task_data(t).model_keys for t in task_data_names()}
    raise AttributeError(f"module 'data_pipelines.tasks' has no attribute {name!r}")
