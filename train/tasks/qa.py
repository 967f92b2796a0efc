"""Extractive question answering (`task=qa`, SQuAD style): GPT2ForQuestionAnswering, start/end cross-entropy on
[question][eos][context window]; long contexts are cut into windows sharing task.data.doc_stride tokens.
Validation: the windows' logits post-processed back to one answer text per example, scored with SQuAD's
val/exact_match and val/f1; checkpoints/best by val/f1. Export: AutoModelForQuestionAnswering.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.text import squad

import gpt2

from train.tasks.base import FineTuneTask, TaskModule


# No library maps window logits back to answer text (transformers keeps it in its examples, not in an API): written
# here after transformers' examples/pytorch/question-answering/utils_qa.py `postprocess_qa_predictions`.
def postprocess_qa(
    start_logits: Sequence[Any],
    end_logits: Sequence[Any],
    features: Sequence[dict],
    contexts: Sequence[str],
    n_best_size: int = 20,
    max_answer_length: int = 30,
    feature_indices: Sequence[int] | None = None,
) -> list[str]:
    """Best answer text per example from per-window logits.

    start_logits[r] / end_logits[r]: the logits of one window (1-D, any length >= its tokens: padding is ignored),
    for feature `feature_indices[r]` (default r). features[f]: {"example_index": int, "offsets": per position a
    (start, end) character span in the example's context, or None for question/separator tokens}. Returns one
    string per context ("" when no window has a valid span).

    As transformers does: the n_best_size highest start and end logits of each window, pairs over context tokens
    only with start <= end and at most max_answer_length tokens, the best start + end logit sum over all windows of
    the example; the answer is the exact characters of the context between the two tokens' offsets.
    """
    best: dict[int, tuple[float, str]] = {}
    rows = range(len(start_logits)) if feature_indices is None else feature_indices
    for r, fi in enumerate(rows):
        feat = features[int(fi)]
        offsets = feat["offsets"]
        s_log = np.asarray(start_logits[r]).reshape(-1)[: len(offsets)]  # CPU tensors or arrays
        e_log = np.asarray(end_logits[r]).reshape(-1)[: len(offsets)]
        ctx = contexts[feat["example_index"]]
        starts = np.argsort(s_log)[::-1][:n_best_size]
        ends = np.argsort(e_log)[::-1][:n_best_size]
        for s in starts:
            if offsets[s] is None:
                continue
            for e in ends:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_log[s] + e_log[e])
                ex = feat["example_index"]
                if ex not in best or score > best[ex][0]:
                    best[ex] = (score, ctx[offsets[s][0] : offsets[e][1]])
    return [best[i][1] if i in best else "" for i in range(len(contexts))]


def squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD {"exact_match", "f1"} as fractions in [0, 1] (the official script prints 100x): the mean over examples
    of the best score against any gold answer, after SQuAD's normalisation (lower-case, no punctuation, no articles
    a/an/the, whitespace collapsed); F1 over the bag of tokens. torchmetrics' SQuAD (the v1.1 script's maths; an
    empty answer scores 1 only against an empty answer, as in v2.0). An example without gold answers (SQuAD v2.0's
    unanswerable) is scored against "", as the v2.0 script does.
    """
    if len(predictions) != len(references):
        raise ValueError(f"squad_metrics: {len(predictions)} predictions for {len(references)} examples.")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    preds = [{"id": str(i), "prediction_text": p} for i, p in enumerate(predictions)]
    target = [{"id": str(i), "answers": {"text": list(golds) or [""]}} for i, golds in enumerate(references)]
    scores = squad(preds, target)
    return {"exact_match": float(scores["exact_match"]) / 100, "f1": float(scores["f1"]) / 100}


class QAModule(TaskModule):
    """qa_eval: the validation features (offsets, example_index), contexts and gold answer texts, and the
    post-processing limits (n_best_size, max_answer_length)."""

    target_keys = ("start_positions", "end_positions")

    def __init__(self, *args: Any, qa_eval: dict[str, Any], **kwargs: Any):
        # transformers' QA loss: (mean start cross-entropy + mean end cross-entropy) / 2
        super().__init__(*args, loss_weights={"start": 0.5, "end": 0.5}, **kwargs)
        self.qa_eval = qa_eval

    def count_items(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Items: the windows whose start (end) position lies inside the input; one outside is ignored, as in
        transformers (clamped to T, ignore_index=T)."""
        T = batch["input_ids"].size(-1)
        return {k: (batch[f"{k}_positions"].reshape(-1).clamp(0, T) != T).sum() for k in ("start", "end")}

    def loss_sums(self, batch: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """Start and end cross-entropy summed over the windows, over the window's own positions: padding is left
        out of the softmax (transformers' QA loss keeps it, so its loss changes with how long the longest window
        of the batch is)."""
        out = self.outputs(batch)
        pad = batch["attention_mask"] == 0 if "attention_mask" in batch else None
        sums = {}
        for k, logits in (("start", out.start_logits), ("end", out.end_logits)):
            T = logits.size(1)
            logits = logits.float()
            if pad is not None:
                logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
            target = batch[f"{k}_positions"].reshape(-1).clamp(0, T)
            sums[k] = F.cross_entropy(logits, target, ignore_index=T, reduction="sum")
        return out, sums

    def keep(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple:
        return (outputs.start_logits.float().cpu(), outputs.end_logits.float().cpu(),
                batch["feature_index"].cpu())  # (B, T), (B, T), (B,)

    def score(self, kept: list[tuple]) -> dict[str, float]:
        q = self.qa_eval
        starts = [row for k in kept for row in k[0]]
        ends = [row for k in kept for row in k[1]]
        fidx = [int(i) for k in kept for i in k[2]]
        preds = postprocess_qa(starts, ends, q["features"], q["contexts"], n_best_size=q["n_best_size"],
                                 max_answer_length=q["max_answer_length"], feature_indices=fidx)
        seen = sorted({q["features"][i]["example_index"] for i in fidx})  # fast_dev_run sees a few windows only
        m = squad_metrics([preds[i] for i in seen], [q["answers"][i] for i in seen])
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
                            "max_answer_length": task_cfg.data.max_answer_length}}

    def default_monitor(self, dm) -> tuple[str, str]:
        return "val/f1", "max"


TASK = QATask()
