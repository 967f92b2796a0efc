"""Token classification (`task=token_cls`, CoNLL-2003 style): pre-split words + one tag per word.

Encoding — words are encoded one by one as `" " + word`, every word (the first too) with a leading space, and the
ids concatenated. That is what transformers does for GPT-2 with `is_split_into_words=True`, which requires
`add_prefix_space=True` (the GPT-2 BPE gives a word after a space different ids from the same word at the start of a
text; with the prefix every word gets its mid-sentence ids, as in the LM's training text " ".join(words)). The tag id
goes on the FIRST sub-token of each word and -100 on its other sub-tokens (and on padding), as in transformers'
run_ner.py (`label_all_tokens=False`), so the loss and the metrics count each word once. Sequences longer than
`max_length` are truncated (the words past it get no prediction, as in run_ner.py).
"""

from __future__ import annotations

from data_pipelines.tasks.config import TaskDataConfig
from data_pipelines.tasks.base import TaskData
from data_pipelines.tasks.demo import token_cls_rows
from data_pipelines.tasks.loading import (
    LabelMap,
    RawSplit,
    as_list,
    build_label_map,
    class_names,
    pad,
    padded_ids,
    resolve_column,
    with_prefix_space,
)

IGNORE_INDEX = -100  # torch cross_entropy's ignore_index


def _columns(raw: RawSplit, cfg: TaskDataConfig) -> tuple[str, str]:
    cand = DATA.column_candidates(cfg)
    return (resolve_column(raw, "tokens", cand["tokens"], config_key="tokens_column"),
            resolve_column(raw, "tags", cand["tags"], config_key="tags_column"))


def read_examples(raw: RawSplit, cfg: TaskDataConfig) -> list[dict]:
    """Rows -> [{"tokens": list[str], "tags": list}] (tags still raw: names or ids)."""
    tok_col, tag_col = _columns(raw, cfg)
    out = []
    for i, (words, tags) in enumerate(zip(raw.columns[tok_col], raw.columns[tag_col])):
        words = [str(w) for w in as_list(words, f"column {tok_col!r}", raw.where, i)]
        tags = as_list(tags, f"column {tag_col!r}", raw.where, i)
        if len(words) != len(tags):
            raise ValueError(
                f"row {i} of {raw.where}: {len(words)} words in {tok_col!r} but {len(tags)} tags in {tag_col!r}; "
                f"every word needs exactly one tag."
            )
        if not words:
            raise ValueError(f"row {i} of {raw.where}: no words in column {tok_col!r}.")
        out.append({"tokens": words, "tags": tags})
    return out


def label_map(train: list[dict], raw: RawSplit, cfg: TaskDataConfig) -> LabelMap:
    _, tag_col = _columns(raw, cfg)
    flat = [t for e in train for t in e["tags"]]
    return build_label_map(flat, cfg, class_names(raw.features, tag_col), raw.where)


def encode(examples: list[dict], tokenizer, cfg: TaskDataConfig, labels: LabelMap, where: str,
           validation: bool = False) -> list[dict]:
    """-> [{"input_ids": list[int], "labels": list[int]}], labels on first sub-tokens, -100 elsewhere."""
    pieces = tokenizer.encode_batch([" " + w for e in examples for w in e["tokens"]])  # one parallel call
    k = 0
    out = []
    for i, e in enumerate(examples):
        ids: list[int] = []
        lab: list[int] = []
        for j, tag in enumerate(e["tags"]):
            p = pieces[k]
            k += 1
            tag_id = labels.encode(tag, f"row {i} of {where} (word {j} {e['tokens'][j]!r})")
            ids += p
            lab += [tag_id] + [IGNORE_INDEX] * (len(p) - 1)
        out.append({"input_ids": ids[: cfg.max_length], "labels": lab[: cfg.max_length]})
    return out


class TokenClsData(TaskData):
    """token_cls: words -> one tag each; batches input_ids, attention_mask, labels (B, T) (-100 off first sub-tokens
    and on padding)."""

    name = "token_cls"
    columns = {"tokens": ("tokens",), "tags": ("tags", "ner_tags")}
    column_fields = {"tokens_column": "tokens", "tags_column": "tags"}
    model_keys = ("input_ids", "attention_mask", "labels")
    demo_sizes = (1500, 300)  # (train, validation): ~1 minute of CPU fine-tuning for the tiny model

    read_examples = staticmethod(read_examples)
    label_map = staticmethod(label_map)
    encode = staticmethod(encode)  # training and validation features are encoded alike

    def hf_tokenizer(self, tokenizer):
        """add_prefix_space=True: `encode` puts a space before every word, the first included, which is what
        transformers' GPT-2 tokenizer does with it for `tokenizer(words, is_split_into_words=True)`; the
        token-classification pipeline's `tokenizer(sentence)` then gives every word the ids training gave it."""
        return with_prefix_space(tokenizer)

    def collate(self, feats, pad_token_id, regression):
        import torch

        out = padded_ids(feats, pad_token_id)
        out["labels"] = torch.tensor(pad([f["labels"] for f in feats], IGNORE_INDEX, out["input_ids"].size(1)))
        return out

    def demo_examples(self, docs, n, rng, split):
        return token_cls_rows(docs, n, rng, split)


DATA = TokenClsData()
