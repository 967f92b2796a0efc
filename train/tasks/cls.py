"""Sequence classification (`task=cls`): GPT2ForSequenceClassification (scores the last non-pad token),
cross-entropy, or MSE for float labels (task.data.problem_type=regression). Validation: val/accuracy and val/f1
(macro), or val/mse; checkpoints/best by val/accuracy (val/mse, min, for regression).
Export: AutoModelForSequenceClassification, with id2label / label2id.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import gpt2

from train import metrics as M
from train.tasks.base import FineTuneTask, TaskModule


class ClsModule(TaskModule):
    def __init__(self, *args: Any, regression: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.regression = regression

    def keep(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple:
        return outputs.logits.float().cpu(), batch["labels"].cpu()  # (B, L), (B,)

    def score(self, kept: list[tuple]) -> dict[str, float]:
        logits = torch.cat([k[0] for k in kept])
        labels = torch.cat([k[1] for k in kept])
        m = M.classification_metrics(logits, labels, regression=self.regression)
        return {"val/mse": m["mse"]} if self.regression else {"val/accuracy": m["accuracy"], "val/f1": m["macro_f1"]}


class ClsTask(FineTuneTask):
    name = "cls"
    model_class = gpt2.GPT2ForSequenceClassification
    hf_class = "AutoModelForSequenceClassification"
    module_class = ClsModule

    def head_config(self, dm) -> dict[str, Any]:
        return {**super().head_config(dm), "num_labels": dm.num_labels, "id2label": dm.id2label,
                "label2id": dm.label2id, "problem_type": dm.problem_type}  # fmt: skip

    def module_options(self, model: nn.Module, dm, task_cfg) -> dict[str, Any]:
        return {"regression": dm.problem_type == "regression"}

    def default_monitor(self, dm) -> tuple[str, str]:
        return ("val/mse", "min") if dm.problem_type == "regression" else ("val/accuracy", "max")


TASK = ClsTask()
