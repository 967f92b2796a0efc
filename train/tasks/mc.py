"""Multiple choice (`task=mc`, SWAG / ROCStories style): GPT2DoubleHeadsModel on each choice "context ending<eos>",
the eos state scored; loss = task.lm_coef x LM loss + multiple-choice cross-entropy (HF run_openai_gpt.py).
Validation: val/accuracy of the argmax choice; checkpoints/best by it. Export: GPT2DoubleHeadsModel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

import gpt2
from gpt2.compat import lm_loss

from train.module import IGNORE_INDEX
from train.tasks.base import FineTuneTask, TaskModule


def multiple_choice_accuracy(mc_logits: Any, mc_labels: Any) -> float:
    """Accuracy of the argmax choice of (N, num_choices) logits against (N,) right-choice indices (torchmetrics)."""
    mc_logits, mc_labels = torch.as_tensor(mc_logits), torch.as_tensor(mc_labels)
    return float(multiclass_accuracy(mc_logits, mc_labels, num_classes=mc_logits.shape[-1], average="micro"))


class MCModule(TaskModule):
    """Two terms (HF run_openai_gpt.py: lm_coef x LM loss + multiple-choice loss), each a mean over its own items:
    "choices" the examples (their right choice), "tokens" the LM-labelled tokens of every choice (absent with
    task.data.mc_lm_labels=none)."""

    target_keys = ("labels", "mc_labels")

    def __init__(self, *args: Any, lm_coef: float = 0.5, lm_labels: bool = True, **kwargs: Any):
        weights = {"choices": 1.0, **({"tokens": lm_coef} if lm_labels else {})}
        super().__init__(*args, loss_weights=weights, **kwargs)
        self.lm_coef = lm_coef

    def count_items(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        counts = {"choices": (batch["mc_labels"] != IGNORE_INDEX).sum()}
        if "labels" in batch:
            counts["tokens"] = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
        return counts

    def loss_sums(self, batch: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        out = self.outputs(batch)
        mc_logits = out.mc_logits.float()  # (B, C)
        sums = {"choices": F.cross_entropy(mc_logits, batch["mc_labels"].view(-1), reduction="sum")}
        if "labels" in batch:  # next-token cross-entropy summed (transformers' ForCausalLMLoss, num_items_in_batch=1)
            sums["tokens"] = lm_loss(out.logits, batch["labels"], num_items_in_batch=1)
        return out, sums

    def keep(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple:
        return outputs.mc_logits.float().cpu(), batch["mc_labels"].cpu()  # (B, C), (B,)

    def score(self, kept: list[tuple]) -> dict[str, float]:
        logits = torch.cat([k[0] for k in kept])
        labels = torch.cat([k[1] for k in kept])
        return {"val/accuracy": multiple_choice_accuracy(logits, labels)}


class MCTask(FineTuneTask):
    name = "mc"
    model_class = gpt2.GPT2DoubleHeadsModel
    hf_class = "GPT2DoubleHeadsModel"
    module_class = MCModule

    def module_options(self, model: nn.Module, dm, task_cfg) -> dict[str, Any]:
        return {"lm_coef": task_cfg.lm_coef, "lm_labels": task_cfg.data.mc_lm_labels != "none"}

    def default_monitor(self, dm) -> tuple[str, str]:
        return "val/accuracy", "max"


TASK = MCTask()
