"""Multiple choice (`task=mc`, SWAG / ROCStories style): GPT2DoubleHeadsModel on each choice "context ending<eos>",
the eos state scored; loss = task.lm_coef x LM loss + multiple-choice cross-entropy (HF run_openai_gpt.py).
Validation: val/accuracy of the argmax choice; checkpoints/best by it. Export: GPT2DoubleHeadsModel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

import gpt2

from train.tasks.base import FineTuneTask, TaskModule


def multiple_choice_accuracy(mc_logits: Any, mc_labels: Any) -> float:
    """Accuracy of the argmax choice of (N, num_choices) logits against (N,) right-choice indices (torchmetrics)."""
    mc_logits, mc_labels = torch.as_tensor(mc_logits), torch.as_tensor(mc_labels)
    return float(multiclass_accuracy(mc_logits, mc_labels, num_classes=mc_logits.shape[-1], average="micro"))


class MCModule(TaskModule):
    def __init__(self, *args: Any, lm_coef: float = 0.5, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lm_coef = lm_coef

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        out, lm_loss = super().step(batch)  # no LM loss with task.data.mc_lm_labels=none
        return out, out.mc_loss if lm_loss is None else self.lm_coef * lm_loss + out.mc_loss

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
        return {"lm_coef": task_cfg.lm_coef}

    def default_monitor(self, dm) -> tuple[str, str]:
        return "val/accuracy", "max"


TASK = MCTask()
