"""Sequence classification (`task=cls`): GPT2ForSequenceClassification (scores the last non-pad token),
cross-entropy, or MSE for float labels (task.data.problem_type=regression). Validation: val/accuracy and val/f1
(macro), or val/mse; checkpoints/best by val/accuracy (val/mse, min, for regression).
Export: AutoModelForSequenceClassification, with id2label / label2id.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

import gpt2

from train.tasks.base import FineTuneTask, TaskModule


def classification_metrics(logits: Any, labels: Any, regression: bool = False) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of the argmax class of (N, num_labels) logits against (N,) label ids, or {"mse"}
    of (N,) or (N, 1) regression outputs against (N,) float targets; torchmetrics' functional metrics.

    Macro F1 is the unweighted mean of per-class F1 over the classes that occur in the labels or the predictions
    (torchmetrics leaves a class with no true positive, false positive nor false negative out of the mean, as
    sklearn's f1_score(average="macro") over the classes present does). MSE is computed in float64.
    """
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if regression:
        return {"mse": float(mean_squared_error(logits.reshape(-1).double(), labels.reshape(-1).double()))}
    n = logits.shape[-1]
    return {"accuracy": float(multiclass_accuracy(logits, labels, num_classes=n, average="micro")),
            "macro_f1": float(multiclass_f1_score(logits, labels, num_classes=n, average="macro"))}


class ClsModule(TaskModule):
    def __init__(self, *args: Any, regression: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.regression = regression

    def keep(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple:
        return outputs.logits.float().cpu(), batch["labels"].cpu()  # (B, L), (B,)

    def score(self, kept: list[tuple]) -> dict[str, float]:
        logits = torch.cat([k[0] for k in kept])
        labels = torch.cat([k[1] for k in kept])
        m = classification_metrics(logits, labels, regression=self.regression)
        return {"val/mse": m["mse"]} if self.regression else {"val/accuracy": m["accuracy"], "val/f1": m["macro_f1"]}


class ClsTask(FineTuneTask):
    name = "cls"
    model_class = gpt2.GPT2ForSequenceClassification
    hf_class = "AutoModelForSequenceClassification"
    module_class = ClsModule

    def head_config(self, dm) -> dict[str, Any]:
        return {**super().head_config(dm), **self.label_config(dm), "problem_type": dm.problem_type}

    def module_options(self, model: nn.Module, dm, task_cfg) -> dict[str, Any]:
        return {"regression": dm.problem_type == "regression"}

    def default_monitor(self, dm) -> tuple[str, str]:
        return ("val/mse", "min") if dm.problem_type == "regression" else ("val/accuracy", "max")


TASK = ClsTask()
