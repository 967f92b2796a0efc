"""Task metrics: torchmetrics (classification, multiple choice, SQuAD) and seqeval (entities) give the numbers the
hand-written metrics gave before them, on hand-computed cases and on randomized predictions; QA post-processing.

The reference: the hand-written functions train/metrics.py held until the tasks switched to the libraries, kept here
verbatim as the oracle (sklearn-style macro F1, conlleval chunking, the official SQuAD evaluation).
"""

from __future__ import annotations

import collections
import random
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from seqeval.metrics.sequence_labeling import get_entities as seqeval_get_entities

from train.tasks.cls import classification_metrics
from train.tasks.mc import multiple_choice_accuracy
from train.tasks.qa import postprocess_qa, squad_metrics
from train.tasks.token_cls import IGNORE_INDEX, token_cls_metrics


# ------------------------------------------------------------------------------------------------- the oracle
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


def oracle_classification_metrics(logits: Any, labels: Any, regression: bool = False) -> dict[str, float]:
    """cls: {"accuracy", "macro_f1"} from (N, num_labels) logits, or {"mse"} for regression ((N,) or (N, 1))."""
    z = _np(logits)
    if regression:
        return {"mse": mean_squared_error(z.reshape(-1), labels)}
    preds = z.argmax(-1)
    return {"accuracy": accuracy(preds, labels), "macro_f1": macro_f1(preds, labels)}


def oracle_multiple_choice_accuracy(mc_logits: Any, mc_labels: Any) -> float:
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
            or (prev_tag != "O" and prev_type != type_))


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    # conlleval / seqeval `start_of_chunk`
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("I", "E"))
            or (tag != "O" and prev_type != type_))


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


def oracle_token_cls_metrics(pred_ids: Any, label_ids: Any, id2label: dict[int, str]) -> dict[str, float]:
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


def oracle_squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
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


# ------------------------------------------------------------------------------------------------- by hand
def test_accuracy_macro_f1_mse_by_hand():
    y = [0, 0, 1, 1, 2]
    p = [0, 1, 1, 1, 0]
    assert accuracy(p, y) == pytest.approx(3 / 5)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 -> 0
    assert macro_f1(p, y) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert mean_squared_error([1.0, 2.0], [0.0, 4.0]) == pytest.approx((1 + 4) / 2)
    # the library-backed metrics on the same predictions (as one-hot logits)
    m = classification_metrics(torch.nn.functional.one_hot(torch.tensor(p), 3).float(), torch.tensor(y))
    assert m["accuracy"] == pytest.approx(3 / 5) and m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert classification_metrics(torch.tensor([1.0, 2.0]), [0.0, 4.0], regression=True)["mse"] == 2.5
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    m = classification_metrics(logits, torch.tensor([0, 0, 0]))
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert classification_metrics(torch.tensor([[0.5], [1.5]]), [1.0, 1.0], regression=True) == {"mse": 0.25}
    assert multiple_choice_accuracy(np.array([[0.1, 0.9, 0, 0], [2, 1, 0, 0]]), [1, 1]) == 0.5


@pytest.mark.parametrize("chunker", [get_entities, seqeval_get_entities])
def test_get_entities_conlleval_chunking(chunker):
    assert chunker(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # an I- after O starts a chunk (IOB1 tolerance, like seqeval's default mode); a type change splits
    assert chunker(["O", "I-MISC", "I-MISC", "I-ORG"]) == [("MISC", 1, 2), ("ORG", 3, 3)]
    assert chunker(["B-X", "B-X", "I-X"]) == [("X", 0, 0), ("X", 1, 2)]
    assert chunker(["O", "O"]) == []


def _ids(sentences: list[list[str]], names: list[str]) -> list[torch.Tensor]:
    """Tag sentences -> one tensor of ids in `names` per sentence."""
    return [torch.tensor([names.index(t) for t in s]) for s in sentences]


def test_entity_scores_partial_match_counts_as_wrong():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-MISC"]]
    # gold entities: PER(0-1), LOC(3), ORG(0) = 3; predicted: PER(0-0) (partial: wrong), LOC(3), ORG(0), MISC(1) = 4
    names = ["O", "B-PER", "I-PER", "B-LOC", "B-ORG", "B-MISC"]
    id2label = dict(enumerate(names))
    for s in (entity_scores(gold, pred), token_cls_metrics(_ids(pred, names), _ids(gold, names), id2label)):
        assert s["precision"] == pytest.approx(2 / 4)
        assert s["recall"] == pytest.approx(2 / 3)
        assert s["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    perfect = entity_scores(gold, gold)
    assert perfect == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    s = token_cls_metrics(_ids(gold, names), _ids(gold, names), dict(enumerate(names)))
    assert s == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0}


def test_token_cls_metrics_skip_ignored_positions():
    id2label = {0: "B-CODE", 1: "I-CODE", 2: "O"}
    labels = torch.tensor([[0, -100, 1, 2, -100], [2, 0, -100, -100, -100]])
    # predictions on ignored positions are nonsense and must not matter
    preds = torch.tensor([[0, 0, 1, 2, 0], [2, 2, 0, 0, 0]])
    s = token_cls_metrics(preds, labels, id2label)
    # gold: CODE(0-1) in row 0, CODE(1) in row 1; predicted: CODE(0-1) only
    assert s["precision"] == 1.0 and s["recall"] == 0.5
    assert s["accuracy"] == pytest.approx(4 / 5)
    assert s == oracle_token_cls_metrics(preds, labels, id2label)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Cat!", "cat"),
        ("  an   apple, a pear ", "apple pear"),
        ("Theory of the 'Other'", "theory of other"),  # "the" only as a whole word
        ("U.S.A.", "usa"),
    ],
)
def test_squad_normalisation(raw, norm):
    assert normalize_answer(raw) == norm
    assert squad_metrics([raw], [[norm]])["exact_match"] == 1.0  # torchmetrics normalises the same way
    assert squad_metrics([raw], [[norm + " x"]])["exact_match"] == 0.0


def test_squad_em_f1_by_hand():
    assert exact_match_score("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert squad_metrics(["the Eiffel Tower."], [["Eiffel tower"]])["exact_match"] == 1.0
    # pred tokens [eiffel, tower, paris] vs gold [eiffel, tower]: P 2/3, R 1 -> F1 0.8
    assert f1_score("Eiffel Tower, Paris", "The Eiffel Tower") == pytest.approx(0.8)
    assert squad_metrics(["Eiffel Tower, Paris"], [["The Eiffel Tower"]])["f1"] == pytest.approx(0.8)
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0
    assert squad_metrics(["", "x"], [[], []]) == {"exact_match": 0.5, "f1": 0.5}  # unanswerable: scored against ""
    m = squad_metrics(["Denver Broncos", "blue"], [["Broncos", "Denver Broncos"], ["red"]])
    assert m["exact_match"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)


def test_postprocess_qa_picks_best_valid_span_and_exact_text():
    context = "Alpha beta gamma, delta epsilon."
    # window layout: positions 0-1 question, 2 separator, then context tokens
    offsets = [None, None, None, (0, 5), (6, 10), (11, 17), (18, 23), (24, 32)]
    feats = [{"example_index": 0, "offsets": offsets}, {"example_index": 0, "offsets": offsets}]
    start = np.full(10, -100.0)  # longer than the window: padding positions must be ignored
    end = np.full(10, -100.0)
    start[0] = end[0] = 50.0  # a question token scores highest: not a context span, never picked
    start[9] = end[9] = 60.0  # padding
    start[7], end[3] = 20.0, 20.0  # end before start: invalid
    start[4], end[5] = 3.0, 4.0  # "beta gamma," score 7 (valid)
    start[5] = 1.0  # "gamma," score 5: the best one-token span
    second_start, second_end = np.full(8, -100.0), np.full(8, -100.0)
    second_start[6], second_end[7] = 4.0, 4.5  # "delta epsilon." score 8.5 in the other window: the best
    preds = postprocess_qa([start, second_start], [end, second_end], feats, [context])
    assert preds == ["delta epsilon."]
    preds = postprocess_qa([start], [end], feats, [context])
    assert preds == ["beta gamma,"]  # exact characters of the context, punctuation included
    # max_answer_length=1 rules out the 2-token spans: the best 1-token span remains
    assert postprocess_qa([start], [end], feats, [context], max_answer_length=1) == ["gamma,"]
    # feature_indices maps logits rows to features; an example with no window predicts ""
    assert postprocess_qa([second_start], [second_end], feats, [context, "other"], feature_indices=[1]) == [
        "delta epsilon.",
        "",
    ]
    # torch tensors (what the qa module keeps of a validation batch) give the same answers as arrays
    t = [torch.tensor(start, dtype=torch.float32), torch.tensor(second_start, dtype=torch.float32)]
    e = [torch.tensor(end, dtype=torch.float32), torch.tensor(second_end, dtype=torch.float32)]
    assert postprocess_qa(t, e, feats, [context]) == ["delta epsilon."]


# ------------------------------------------------------------------------------------------------- randomized
@pytest.mark.parametrize("seed", range(8))
def test_classification_equals_reference_on_random_predictions(seed):
    g = torch.Generator().manual_seed(seed)
    n, c = int(torch.randint(1, 200, (), generator=g)), int(torch.randint(2, 7, (), generator=g))
    logits = torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    if seed % 2:  # some classes never predicted, some never gold: they must stay out of the macro mean
        logits[:, -1] -= 100.0
        labels = labels.clamp(max=max(c - 3, 0))
    new, ref = classification_metrics(logits, labels), oracle_classification_metrics(logits, labels)
    assert new["accuracy"] == pytest.approx(ref["accuracy"], rel=1e-6)  # torchmetrics divides in float32
    assert new["macro_f1"] == pytest.approx(ref["macro_f1"], rel=1e-6)
    outputs, targets = torch.randn(n, 1, generator=g), torch.randn(n, generator=g) * 3
    assert classification_metrics(outputs, targets, regression=True)["mse"] == pytest.approx(
        oracle_classification_metrics(outputs, targets, regression=True)["mse"], rel=1e-12)
    choices = torch.randn(n, c, generator=g)
    right = torch.randint(0, c, (n,), generator=g)
    assert multiple_choice_accuracy(choices, right) == pytest.approx(oracle_multiple_choice_accuracy(choices, right),
                                                                     rel=1e-6)


def test_classification_all_wrong_and_one_class():
    labels = torch.tensor([0, 0, 1, 1])
    wrong = torch.nn.functional.one_hot(1 - labels, 2).float()
    assert classification_metrics(wrong, labels) == {"accuracy": 0.0, "macro_f1": 0.0}
    assert oracle_classification_metrics(wrong, labels) == {"accuracy": 0.0, "macro_f1": 0.0}
    same = torch.tensor([[1.0, 0.0, 0.0]] * 3)  # one class predicted and gold: macro over that class only
    assert classification_metrics(same, torch.tensor([0, 0, 0]))["macro_f1"] == 1.0


TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-ORG", "PER", "B_MISC", "I_MISC"]  # BIO, BIOES, IO, "_"


def _random_rows(rng: random.Random, n_rows: int, n_tags: int, weights: list[float]) -> list[list[int]]:
    return [[rng.choices(range(n_tags), weights)[0] for _ in range(rng.randint(0, 12))] for _ in range(n_rows)]


@pytest.mark.parametrize("seed", range(12))
def test_token_cls_equals_reference_on_random_predictions(seed):
    rng = random.Random(seed)
    id2label = dict(enumerate(TAGS))
    weights = [6.0] + [1.0] * (len(TAGS) - 1)  # mostly "O", as real tag sequences are
    gold = _random_rows(rng, rng.randint(1, 30), len(TAGS), weights)
    # predictions: gold with some tags changed (so some entities match), padded rows, -100 on random gold positions
    pred = [[t if rng.random() < 0.7 else rng.randrange(len(TAGS)) for t in row] for row in gold]
    gold = [[t if rng.random() < 0.85 else IGNORE_INDEX for t in row] for row in gold]
    width = max(len(r) for r in gold) or 1
    labels = torch.tensor([row + [IGNORE_INDEX] * (width - len(row)) for row in gold])
    preds = torch.tensor([row + [rng.randrange(len(TAGS))] * (width - len(row)) for row in pred])
    new, ref = token_cls_metrics(preds, labels, id2label), oracle_token_cls_metrics(preds, labels, id2label)
    assert new == ref  # the same counts, divided the same way: exactly equal


def test_token_cls_edge_cases_equal_reference():
    id2label = dict(enumerate(["O", "B-X", "I-X", "B-Y", "I-Y"]))
    labels = torch.tensor([[1, 2, 0, 3], [0, 0, 0, 0]])
    cases = {
        "no entity predicted": torch.zeros_like(labels),
        "all wrong": torch.tensor([[3, 4, 1, 0], [1, 2, 3, 4]]),
        "I- without B-": torch.tensor([[2, 2, 0, 4], [0, 2, 2, 0]]),
        "perfect": labels.clone(),
    }
    for what, preds in cases.items():
        assert token_cls_metrics(preds, labels, id2label) == oracle_token_cls_metrics(preds, labels, id2label), what
    none = token_cls_metrics(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), IGNORE_INDEX), id2label)
    assert none == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.0}  # nothing scored
    assert token_cls_metrics(cases["no entity predicted"], labels, id2label)["precision"] == 0.0


WORDS = ["Paris", "the", "Eiffel", "tower", "A", "an", "red", "car,", "blue.", "U.S.A.", "Denver", "BRONCOS", "x"]


@pytest.mark.parametrize("seed", range(8))
def test_squad_equals_reference_on_random_answers(seed):
    rng = random.Random(seed)

    def text(lo: int = 0) -> str:
        return "  ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, 4)))

    preds, refs = [], []
    for _ in range(rng.randint(1, 60)):
        golds = [text(1) for _ in range(rng.randint(0, 3))]
        # keep answers that normalise to "" out: the one case where the old code (SQuAD v2.0's filter) differs,
        # see test_squad_gold_answer_of_only_articles
        golds = [g for g in golds if normalize_answer(g)]
        preds.append(rng.choice(golds) if golds and rng.random() < 0.3 else text())
        refs.append(golds)
    new, ref = squad_metrics(preds, refs), oracle_squad_metrics(preds, refs)
    assert new["exact_match"] == pytest.approx(ref["exact_match"], rel=1e-6)  # torchmetrics sums in float32
    assert new["f1"] == pytest.approx(ref["f1"], rel=1e-6)


def test_squad_gold_answer_of_only_articles():
    """The one difference from the old code: a gold answer that normalises to "" ("The", "a.") counts as a gold
    answer (SQuAD v1.1 script, torchmetrics), where the old code dropped it (SQuAD v2.0 script's filter). It matters
    only when the prediction normalises to "" too (no valid span in any window)."""
    assert squad_metrics([""], [["The", "Paris"]])["exact_match"] == 1.0
    assert oracle_squad_metrics([""], [["The", "Paris"]])["exact_match"] == 0.0
    for pred in ("Paris", "the Paris", "London"):  # any other prediction: the same score
        assert squad_metrics([pred], [["The", "Paris"]]) == oracle_squad_metrics([pred], [["The", "Paris"]])
