"""Sequence classification (`task=cls`): GPT2ForSequenceClassification (scores the last non-pad token),
cross-entropy, or MSE for float labels (task.data.problem_type=regression). Validation: val/accuracy and val/f1
(macro), or val/mse; checkpoints/best by val/accuracy (val/mse, min, for regression).
Export: AutoModelForSequenceClassification, with id2label / label2id.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

import gpt2

from train.module import IGNORE_INDEX
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


def problem_type(config, labels: torch.Tensor) -> str:
    """The loss GPT2ForSequenceClassification takes for these labels: config.problem_type, else inferred as
    transformers does (1 label: regression; integer labels: single-label; else multi-label)."""
    if config.problem_type:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


class ClsModule(TaskModule):
    """Items: examples (single-label: those labelled, not -100), label entries for regression / multi-label."""

    target_keys = ("labels",)

    def __init__(self, *args: Any, regression: bool = False, **kwargs: Any):
        super().__init__(*args, loss_weights={"examples": 1.0}, **kwargs)
        self.regression = regression

    def count_items(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        if problem_type(self.model.config, labels) == "single_label_classification":
            return {"examples": (labels != IGNORE_INDEX).sum()}
        return {"examples": torch.tensor(labels.numel())}

    def loss_sums(self, batch: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """transformers' classification losses (cross-entropy, MSE, BCE) with reduction="sum" (fp32)."""
        out = self.outputs(batch)
        logits, labels = out.logits.float(), batch["labels"]  # (B, num_labels), (B,) or (B, num_labels)
        problem = problem_type(self.model.config, labels)
        if problem == "single_label_classification":
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), reduction="sum")
        elif problem == "regression":
            loss = F.mse_loss(logits.view(labels.shape), labels.float(), reduction="sum")
        else:
            loss = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
        return out, {"examples": loss}

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
