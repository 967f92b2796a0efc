"""train/metrics.py against hand-computed cases: classification, entity-level NER, SQuAD EM/F1, QA post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.metrics import (
    accuracy,
    classification_metrics,
    entity_scores,
    exact_match_score,
    f1_score,
    get_entities,
    macro_f1,
    mean_squared_error,
    multiple_choice_accuracy,
    normalize_answer,
    postprocess_qa,
    squad_metrics,
    token_cls_metrics,
)


def test_accuracy_macro_f1_mse_by_hand():
    y = [0, 0, 1, 1, 2]
    p = [0, 1, 1, 1, 0]
    assert accuracy(p, y) == pytest.approx(3 / 5)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 -> 0
    assert macro_f1(p, y) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert mean_squared_error([1.0, 2.0], [0.0, 4.0]) == pytest.approx((1 + 4) / 2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    m = classification_metrics(logits, torch.tensor([0, 0, 0]))
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert classification_metrics(torch.tensor([[0.5], [1.5]]), [1.0, 1.0], regression=True) == {"mse": 0.25}
    assert multiple_choice_accuracy(np.array([[0.1, 0.9, 0, 0], [2, 1, 0, 0]]), [1, 1]) == 0.5


def test_get_entities_conlleval_chunking():
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # an I- after O starts a chunk (IOB1 tolerance, like seqeval's default mode); a type change splits
    assert get_entities(["O", "I-MISC", "I-MISC", "I-ORG"]) == [("MISC", 1, 2), ("ORG", 3, 3)]
    assert get_entities(["B-X", "B-X", "I-X"]) == [("X", 0, 0), ("X", 1, 2)]
    assert get_entities(["O", "O"]) == []


def test_entity_scores_partial_match_counts_as_wrong():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-MISC"]]
    # gold entities: PER(0-1), LOC(3), ORG(0) = 3; predicted: PER(0-0) (partial: wrong), LOC(3), ORG(0), MISC(1) = 4
    s = entity_scores(gold, pred)
    assert s["precision"] == pytest.approx(2 / 4)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    perfect = entity_scores(gold, gold)
    assert perfect == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_token_cls_metrics_skip_ignored_positions():
    id2label = {0: "B-CODE", 1: "I-CODE", 2: "O"}
    labels = torch.tensor([[0, -100, 1, 2, -100], [2, 0, -100, -100, -100]])
    # predictions on ignored positions are nonsense and must not matter
    preds = torch.tensor([[0, 0, 1, 2, 0], [2, 2, 0, 0, 0]])
    s = token_cls_metrics(preds, labels, id2label)
    # gold: CODE(0-1) in row 0, CODE(1) in row 1; predicted: CODE(0-1) only
    assert s["precision"] == 1.0 and s["recall"] == 0.5
    assert s["accuracy"] == pytest.approx(4 / 5)


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


def test_squad_em_f1_by_hand():
    assert exact_match_score("the Eiffel Tower.", "Eiffel tower") == 1.0
    # pred tokens [eiffel, tower, paris] vs gold [eiffel, tower]: P 2/3, R 1 -> F1 0.8
    assert f1_score("Eiffel Tower, Paris", "The Eiffel Tower") == pytest.approx(0.8)
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0
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
