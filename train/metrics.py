"""Task metrics as pure functions (numpy only; no Lightning, no torch needed — tensors are accepted and converted).

Every score is a fraction in [0, 1] (SQuAD's official script prints 100x these), so "higher is better" holds for all
of them except `mean_squared_error`.

- cls: `accuracy`, `macro_f1` (unweighted mean of per-class F1 over the classes that occur in labels or predictions,
  as sklearn's f1_score(average="macro")), `mean_squared_error` for regression.
- token_cls: `get_entities` + `entity_scores` — entity-level micro precision/recall/F1 over BIO(ES) tag sequences with
  conlleval's chunking rules (as seqeval's default mode): an entity counts only if its type AND exact span match, so a
  partial match is a miss. `token_cls_metrics` goes from label ids (with -100 on ignored positions) to those scores.
- qa: `normalize_answer`, `exact_match_score`, `f1_score`, `squad_metrics` — the official SQuAD v1.1/v2.0 evaluation
  (lower-case, drop punctuation and the articles a/an/the, collapse whitespace; F1 over bag-of-tokens overlap; the max
  over the gold answers). `postprocess_qa` turns per-window start/end logits + character offsets into one answer text
  per example (transformers' run_qa.py `postprocess_qa_predictions`: n-best starts x n-best ends, only context tokens,
  end >= start, at most `max_answer_length` tokens, best start+end logit sum over all windows of the example).
- mc: `multiple_choice_accuracy` (argmax over the choices).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------------- classification
def accuracy(preds: Any, labels: Any) -> float:
    p, y = _np(preds).reshape(-1), _np(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"accuracy: {p.size} predictions for {y.size} labels.")
    return float((p == y).mean()) if y.size else 0.0


def macro_f1(preds: Any, labels: Any) -> float:
    p, y = _np(preds).reshape(-1), _np(labels).reshape(-1)
    classes = np.union1d(p, y)
    f1s = []
    for c in classes:
        tp = float(np.sum((p == c) & (y == c)))
        fp = float(np.sum((p == c) & (y != c)))
        fn = float(np.sum((p != c) & (y == c)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s)) if f1s else 0.0


def mean_squared_error(preds: Any, targets: Any) -> float:
    p, y = _np(preds).astype(np.float64).reshape(-1), _np(targets).astype(np.float64).reshape(-1)
    return float(np.mean((p - y) ** 2)) if y.size else 0.0


def classification_metrics(logits: Any, labels: Any, regression: bool = False) -> dict[str, float]:
    """cls: {"accuracy", "macro_f1"} from (N, num_labels) logits, or {"mse"} for regression ((N,) or (N, 1))."""
    z = _np(logits)
    if regression:
        return {"mse": mean_squared_error(z.reshape(-1), labels)}
    preds = z.argmax(-1)
    return {"accuracy": accuracy(preds, labels), "macro_f1": macro_f1(preds, labels)}


def multiple_choice_accuracy(mc_logits: Any, mc_labels: Any) -> float:
    """mc: accuracy of argmax over choices; mc_logits (N, num_choices)."""
    return accuracy(_np(mc_logits).argmax(-1), mc_labels)


# ------------------------------------------------------------------------------------------------- entities
def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); a tag with no B/I/E/S prefix ('PER') is read as 'I-PER' (IO)."""
    if tag in ("O", "", None):
        return "O", ""
    if len(tag) > 1 and tag[0] in "BIES" and tag[1] in "-_":
        return tag[0], tag[2:]
    return "I", tag


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    # conlleval / seqeval `end_of_chunk`
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag != "O" and prev_type != type_))  # fmt: skip


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    # conlleval / seqeval `start_of_chunk`
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("I", "E"))
            or (tag != "O" and prev_type != type_))  # fmt: skip


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of one tag sequence as (type, first index, last index), conlleval chunking:
    ['B-PER', 'I-PER', 'O', 'I-LOC'] -> [('PER', 0, 1), ('LOC', 3, 3)]."""
    out = []
    prev_tag, prev_type, start = "O", "", 0
    for i, t in enumerate(list(tags) + ["O"]):  # the sentinel "O" closes a chunk running to the end
        tag, type_ = _split_tag(t)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            out.append((prev_type, start, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            start = i
        prev_tag, prev_type = tag, type_
    return out


def entity_scores(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level micro precision / recall / F1 over sentences of tags (exact type and span only)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"entity_scores: {len(y_true)} gold sentences but {len(y_pred)} predicted.")
    gold, pred = set(), set()
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"entity_scores: sentence {i} has {len(t)} gold tags but {len(p)} predicted.")
        gold |= {(i, *e) for e in get_entities(t)}
        pred |= {(i, *e) for e in get_entities(p)}
    tp = len(gold & pred)
    precision = tp / len(pred) if pred else 0.0
    recall = tp / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def token_cls_metrics(pred_ids: Any, label_ids: Any, id2label: dict[int, str]) -> dict[str, float]:
    """From (N, T) predicted ids and (N, T) gold ids with -100 on positions not scored (later sub-tokens, padding):
    entity precision/recall/F1 on the scored positions + their token accuracy. Rows may be lists of unequal length."""
    names = {int(k): v for k, v in id2label.items()}
    y_true, y_pred, hits, n = [], [], 0, 0
    for p_row, y_row in zip(pred_ids, label_ids):
        p_row, y_row = _np(p_row).reshape(-1), _np(y_row).reshape(-1)
        keep = y_row != IGNORE_INDEX
        t = [names[int(i)] for i in y_row[keep]]
        p = [names.get(int(i), "O") for i in p_row[: len(y_row)][keep]]
        y_true.append(t)
        y_pred.append(p)
        hits += sum(a == b for a, b in zip(t, p))
        n += len(t)
    scores = entity_scores(y_true, y_pred)
    scores["accuracy"] = hits / n if n else 0.0
    return scores


# ------------------------------------------------------------------------------------------------- SQuAD
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Official SQuAD normalisation: lower-case, remove punctuation, remove articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    if not pred or not gold:  # SQuAD v2: an empty answer scores 1 only against an empty answer
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean over examples of the max over gold answers; an example without gold answers is scored against ""."""
    if len(predictions) != len(references):
        raise ValueError(f"squad_metrics: {len(predictions)} predictions for {len(references)} examples.")
    em = f1 = 0.0
    for pred, golds in zip(predictions, references):
        golds = [g for g in golds if normalize_answer(g)] or [""]
        em += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    n = max(len(predictions), 1)
    return {"exact_match": em / n, "f1": f1 / n}


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
    string per context ("" when no window has a valid span)."""
    best: dict[int, tuple[float, str]] = {}
    rows = range(len(start_logits)) if feature_indices is None else feature_indices
    for r, fi in enumerate(rows):
        feat = features[int(fi)]
        offsets = feat["offsets"]
        s_log = _np(start_logits[r]).reshape(-1)[: len(offsets)]
        e_log = _np(end_logits[r]).reshape(-1)[: len(offsets)]
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
