"""Sequence classification (`task=cls`): text (+ optional second text) -> one label per example.

Encoding: `ids(text)` or `ids(text) + [eos] + ids(" " + text_pair)`, truncated to `max_length` from the right (the
model pools the *last* real token — GPT2ForSequenceClassification takes the rightmost non-pad token — so a sequence
must not end in padding that equals a real token; we pad with eos, which only appears mid-sequence as the pair
separator). Labels: ids via `LabelMap` (strings sorted or in `label_list` order; ints checked against the label count);
floats with `problem_type="regression"` stay floats and `num_labels` is 1.
"""

from __future__ import annotations

from data_pipelines.tasks.config import TaskDataConfig
from data_pipelines.tasks.base import TaskData
from data_pipelines.tasks.demo import cls_rows
from data_pipelines.tasks.loading import (
    LabelMap,
    RawSplit,
    build_label_map,
    class_names,
    padded_ids,
    resolve_column,
)


def read_examples(raw: RawSplit, cfg: TaskDataConfig) -> list[dict]:
    """Rows -> [{"text", "text_pair" (or None), "label"}] with the configured/default columns."""
    cand = DATA.column_candidates(cfg)
    text_col = resolve_column(raw, "text", cand["text"], config_key="text_column")
    label_col = resolve_column(raw, "label", cand["label"], config_key="label_column")
    pair_col = None
    if cand["text_pair"]:
        pair_col = resolve_column(raw, "text pair", cand["text_pair"], config_key="text_pair_column")
    texts, labels = raw.columns[text_col], raw.columns[label_col]
    pairs = raw.columns[pair_col] if pair_col else [None] * len(texts)
    out = []
    for i, (t, p, y) in enumerate(zip(texts, pairs, labels)):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"row {i} of {raw.where}: column {text_col!r} is {t!r}, not a non-empty text.")
        if y is None:
            raise ValueError(f"row {i} of {raw.where}: column {label_col!r} has no label.")
        out.append({"text": t, "text_pair": p, "label": y})
    return out


def is_regression(examples: list[dict], cfg: TaskDataConfig, where: str) -> bool:
    if cfg.problem_type == "regression":
        return True
    fractional = next((e["label"] for e in examples
                       if isinstance(e["label"], float) and not e["label"].is_integer()), None)
    if fractional is not None:
        raise ValueError(
            f"{where} has fractional labels (e.g. {fractional}); for a regression task set "
            f"data.problem_type=regression, else give integer or string class labels."
        )
    return False


def label_map(train: list[dict], raw: RawSplit, cfg: TaskDataConfig) -> LabelMap:
    regression = is_regression(train, cfg, raw.where)
    label_col = resolve_column(raw, "label", DATA.column_candidates(cfg)["label"], config_key="label_column")
    return build_label_map([e["label"] for e in train], cfg, class_names(raw.features, label_col), raw.where,
                           regression)


def encode(examples: list[dict], tokenizer, cfg: TaskDataConfig, labels: LabelMap, where: str,
           validation: bool = False) -> list[dict]:
    """-> [{"input_ids": list[int], "labels": int | float}]"""
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode_batch([e["text"] for e in examples])
    has_pair = [e["text_pair"] is not None for e in examples]
    pair_ids = tokenizer.encode_batch([" " + str(e["text_pair"]) for e, h in zip(examples, has_pair) if h])
    pair_iter = iter(pair_ids)
    out = []
    for i, (e, x) in enumerate(zip(examples, ids)):
        if has_pair[i]:
            x = x + [eos] + next(pair_iter)
        out.append({"input_ids": x[: cfg.max_length], "labels": labels.encode(e["label"], f"row {i} of {where}")})
    return out


class ClsData(TaskData):
    """cls: text (+ text pair) -> one label; batches input_ids, attention_mask (B, T), labels (B,) (float for
    regression)."""

    name = "cls"
    columns = {"text": ("text", "sentence"), "text_pair": (), "label": ("label",)}
    column_fields = {"text_column": "text", "text_pair_column": "text_pair", "label_column": "label"}
    model_keys = ("input_ids", "attention_mask", "labels")
    demo_sizes = (2000, 400)  # (train, validation): ~1 minute of CPU fine-tuning for the tiny model

    read_examples = staticmethod(read_examples)
    label_map = staticmethod(label_map)
    encode = staticmethod(encode)  # training and validation features are encoded alike

    def collate(self, feats, pad_token_id, regression):
        import torch

        out = padded_ids(feats, pad_token_id)
        out["labels"] = torch.tensor([f["labels"] for f in feats], dtype=torch.float32 if regression else torch.long)
        return out

    def problem_type(self, label_map):
        return "regression" if label_map.regression else "single_label_classification"

    def demo_examples(self, docs, n, rng, split):
        return cls_rows(docs, n, rng, split)


DATA = ClsData()
