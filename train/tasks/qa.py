"""Extractive question answering (`task=qa`, SQuAD style): GPT2ForQuestionAnswering, start/end cross-entropy on
[question][eos][context window]; long contexts are cut into windows sharing task.data.doc_stride tokens.
Validation: the windows' logits post-processed back to one answer text per example, scored with SQuAD's
val/exact_match and val/f1; checkpoints/best by val/f1. Export: AutoModelForQuestionAnswering.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import gpt2

from train import metrics as M
from train.tasks.base import FineTuneTask, TaskModule


class QAModule(TaskModule):
    """qa_eval: the validation features (offsets, example_index), contexts and gold answer texts, and the
    post-processing limits (n_best_size, max_answer_length)."""

    def __init__(self, *args: Any, qa_eval: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.qa_eval = qa_eval

    def keep(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple:
        return (outputs.start_logits.float().cpu(), outputs.end_logits.float().cpu(),
                batch["feature_index"].cpu())  # (B, T), (B, T), (B,)  # fmt: skip

    def score(self, kept: list[tuple]) -> dict[str, float]:
        q = self.qa_eval
        starts = [row for k in kept for row in k[0]]
        ends = [row for k in kept for row in k[1]]
        fidx = [int(i) for k in kept for i in k[2]]
        preds = M.postprocess_qa(starts, ends, q["features"], q["contexts"], n_best_size=q["n_best_size"],
                                 max_answer_length=q["max_answer_length"], feature_indices=fidx)  # fmt: skip
        seen = sorted({q["features"][i]["example_index"] for i in fidx})  # fast_dev_run sees a few windows only
        m = M.squad_metrics([preds[i] for i in seen], [q["answers"][i] for i in seen])
        return {"val/exact_match": m["exact_match"], "val/f1": m["f1"]}


class QATask(FineTuneTask):
    name = "qa"
    model_class = gpt2.GPT2ForQuestionAnswering
    hf_class = "AutoModelForQuestionAnswering"
    module_class = QAModule

    def module_options(self, model: nn.Module, dm, task_cfg) -> dict[str, Any]:
        features, contexts, answers = dm.qa_eval_data()
        return {"qa_eval": {"features": features, "contexts": contexts, "answers": answers,
                            "n_best_size": task_cfg.data.n_best_size,
                            "max_answer_length": task_cfg.data.max_answer_length}}  # fmt: skip

    def default_monitor(self, dm) -> tuple[str, str]:
        return "val/f1", "max"


TASK = QATask()
