"""Token classification (`task=token_cls`, NER-style): GPT2ForTokenClassification, cross-entropy on the first
sub-token of each word (-100 on the rest). Validation: entity-level val/precision, val/recall, val/f1 (conlleval
chunking: an entity counts only with its exact type and span) and val/token_accuracy; checkpoints/best by val/f1.
Export: AutoModelForTokenClassification, with id2label / label2id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

import gpt2

from train.tasks.base import FineTuneTask, TaskModule

IGNORE_INDEX = -100  # label of the positions not scored (later sub-tokens of a word, padding)


def bio_tag(tag: Optional[str]) -> str:
    """A tag as seqeval reads it ("B-PER", "O"): "B_PER" -> "B-PER"; a tag without a B/I/E/S prefix ("PER", the IO
    scheme) -> "I-PER", which conlleval chunks as an entity running over consecutive tags of the same type."""
    if tag in ("O", "", None):
        return "O"
    if len(tag) > 1 and tag[0] in "BIES" and tag[1] in "-_":
        return f"{tag[0]}-{tag[2:]}"
    return f"I-{tag}"


def token_cls_metrics(pred_ids: Sequence[Any], label_ids: Sequence[Any], id2label: dict[int, str]) -> dict[str, float]:
    """Entity-level micro {"precision", "recall", "f1"} (seqeval's default mode, conlleval-compatible: an entity
    counts only if its type AND exact span match) and token {"accuracy"}, from per-sentence predicted ids and gold
    ids (-100 on positions not scored). Rows may be tensors or lists of unequal length; a prediction id with no name
    reads as "O"."""
    from seqeval.metrics import accuracy_score  # seqeval imports scikit-learn: only a token_cls run pays for it
    from seqeval.metrics.sequence_labeling import precision_recall_fscore_support

    names = {int(k): v for k, v in id2label.items()}
    y_true, y_pred = [], []
    for p_row, y_row in zip(pred_ids, label_ids):
        p_row, y_row = torch.as_tensor(p_row).reshape(-1), torch.as_tensor(y_row).reshape(-1)
        keep = y_row != IGNORE_INDEX
        y_true.append([names[int(i)] for i in y_row[keep]])
        y_pred.append([names.get(int(i), "O") for i in p_row[: len(y_row)][keep]])
    precision, recall, f1, _ = precision_recall_fscore_support(
        [[bio_tag(t) for t in row] for row in y_true], [[bio_tag(t) for t in row] for row in y_pred],
        average="micro", zero_division=0,
    )
    n = sum(len(row) for row in y_true)
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1),
            "accuracy": float(accuracy_score(y_true, y_pred)) if n else 0.0}


class TokenClsModule(TaskModule):
    """Items: the labelled tokens (the first sub-token of each word)."""

    target_keys = ("labels",)

    def __init__(self, *args: Any, id2label: Optional[dict[int, str]] = None, **kwargs: Any):
        super().__init__(*args, loss_weights={"labelled_tokens": 1.0}, **kwargs)
        self.id2label = id2label

    def count_items(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"labelled_tokens": (batch["labels"] != IGNORE_INDEX).sum()}

    def loss_sums(self, batch: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """Cross-entropy summed over the labelled tokens (transformers' GPT2ForTokenClassification loss x items)."""
        out = self.outputs(batch)
        logits = out.logits.float()  # (B, T, num_labels)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), batch["labels"].view(-1), reduction="sum")
        return out, {"labelled_tokens": loss}

    def keep(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple:
        return outputs.logits.argmax(-1).cpu(), batch["labels"].cpu()  # (B, T), (B, T)

    def score(self, kept: list[tuple]) -> dict[str, float]:
        preds = [row for k in kept for row in k[0]]
        labels = [row for k in kept for row in k[1]]
        m = token_cls_metrics(preds, labels, self.id2label)
        return {"val/precision": m["precision"], "val/recall": m["recall"], "val/f1": m["f1"],
                "val/token_accuracy": m["accuracy"]}


class TokenClsTask(FineTuneTask):
    name = "token_cls"
    model_class = gpt2.GPT2ForTokenClassification
    hf_class = "AutoModelForTokenClassification"
    module_class = TokenClsModule

    def head_config(self, dm) -> dict[str, Any]:
        return {**super().head_config(dm), **self.label_config(dm)}

    def module_options(self, model: nn.Module, dm, task_cfg) -> dict[str, Any]:
        return {"id2label": model.config.id2label}

    def default_monitor(self, dm) -> tuple[str, str]:
        return "val/f1", "max"


TASK = TokenClsTask()
