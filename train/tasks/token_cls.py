"""Token classification (`task=token_cls`, NER-style): GPT2ForTokenClassification, cross-entropy on the first
sub-token of each word (-100 on the rest). Validation: entity-level val/precision, val/recall, val/f1 (conlleval
chunking: an entity counts only with its exact type and span) and val/token_accuracy; checkpoints/best by val/f1.
Export: AutoModelForTokenClassification, with id2label / label2id.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

import gpt2

from train import metrics as M
from train.tasks.base import FineTuneTask, TaskModule


class TokenClsModule(TaskModule):
    def __init__(self, *args: Any, id2label: Optional[dict[int, str]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.id2label = id2label

    def keep(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple:
        return outputs.logits.argmax(-1).cpu(), batch["labels"].cpu()  # (B, T), (B, T)

    def score(self, kept: list[tuple]) -> dict[str, float]:
        preds = [row for k in kept for row in k[0]]
        labels = [row for k in kept for row in k[1]]
        m = M.token_cls_metrics(preds, labels, self.id2label)
        return {"val/precision": m["precision"], "val/recall": m["recall"], "val/f1": m["f1"],
                "val/token_accuracy": m["accuracy"]}  # fmt: skip


class TokenClsTask(FineTuneTask):
    name = "token_cls"
    model_class = gpt2.GPT2ForTokenClassification
    hf_class = "AutoModelForTokenClassification"
    module_class = TokenClsModule

    def head_config(self, dm) -> dict[str, Any]:
        return {**super().head_config(dm), "num_labels": dm.num_labels, "id2label": dm.id2label,
                "label2id": dm.label2id}  # fmt: skip

    def module_options(self, model: nn.Module, dm, task_cfg) -> dict[str, Any]:
        return {"id2label": model.config.id2label}

    def default_monitor(self, dm) -> tuple[str, str]:
        return "val/f1", "max"


TASK = TokenClsTask()
