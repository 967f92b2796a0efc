"""Fine-tuning task data: cls, token_cls, qa, mc — loading (local jsonl/csv/parquet, hub, offline demo), column
mapping, label maps, encoding, and the `TaskDataModule`. Imports only `gpt2` of ours (via the tokenizer it is given).

Public API: TASKS, TaskDataConfig, to_task_data_config, DEFAULT_COLUMNS, TaskDataModule, TaskCollator, MODEL_KEYS,
LabelMap, build_demo, demo_files, DEMO_SIZES.
"""

from data_pipelines.tasks.config import (
    DEFAULT_COLUMNS,
    TASK_SOURCES,
    TASKS,
    TaskDataConfig,
    register_configs,
    to_task_data_config,
)

__all__ = [
    "TASKS", "TASK_SOURCES", "DEFAULT_COLUMNS", "TaskDataConfig", "to_task_data_config", "register_configs",
    "TaskDataModule", "TaskCollator", "MODEL_KEYS", "LabelMap", "build_demo", "demo_files", "DEMO_SIZES",
]


def __getattr__(name):  # lazy: importing the config does not pull in torch/lightning/datasets
    if name in ("TaskDataModule", "TaskCollator", "MODEL_KEYS"):
        from data_pipelines.tasks import datamodule

        return getattr(datamodule, name)
    if name == "LabelMap":
        from data_pipelines.tasks.loading import LabelMap

        return LabelMap
    if name in ("build_demo", "demo_files", "DEMO_SIZES"):
        from data_pipelines.tasks import demo

        return getattr(demo, name)
    raise AttributeError(f"module 'data_pipelines.tasks' has no attribute {name!r}")
