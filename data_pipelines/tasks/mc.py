"""Multiple choice (`task=mc`, SWAG / ROCStories style) for GPT2DoubleHeadsModel.

Each example becomes `num_choices` sequences

    ids(context) + ids(" " + ending_k) + [eos]

and `mc_token_ids[k]` is the index of that final eos: the summary token whose hidden state the multiple-choice head
scores (transformers' run_openai_gpt.py appends a trained [CLS] token there; GPT-2 has no spare token, and eos is the
token the LM already uses to close a text). A sequence longer than `max_length` drops context tokens from the LEFT,
so the ending and its eos always survive. LM labels (`labels`, for the double-heads LM loss) are the input ids of
every choice (`mc_lm_labels="all"`, as run_openai_gpt.py), of the correct choice only ("correct"), or absent
("none"); -100 on padding. `mc_labels` is the index of the correct ending.
"""

from __future__ import annotations

import re

from data_pipelines.tasks.config import TaskDataConfig
from data_pipelines.tasks.base import TaskData
from data_pipelines.tasks.demo import mc_rows
from data_pipelines.tasks.loading import RawSplit, as_list, pad, resolve_column, with_pair_template
from data_pipelines.tasks.token_cls import IGNORE_INDEX

_ENDING_COL = re.compile(r"ending(\d+)")


def read_examples(raw: RawSplit, cfg: TaskDataConfig) -> list[dict]:
    """Rows -> [{"context": str, "endings": list[str], "label": int}]."""
    cand = DATA.column_candidates(cfg)
    explicit = DATA.explicit_columns(cfg)
    c_col = resolve_column(raw, "context", cand["context"], config_key="context_column")
    suffix_cand = cand["context_suffix"] or (("sent2",) if c_col == "sent1" else ())  # SWAG: sent1 + " " + sent2
    s_col = resolve_column(raw, "context suffix", suffix_cand, required="context_suffix" in explicit,
                           config_key="context_suffix_column") if suffix_cand else None
    y_col = resolve_column(raw, "label", cand["label"], config_key="label_column")
    e_cols: list[str] = []
    e_col = None
    if cfg.ending_columns:
        e_cols = list(cfg.ending_columns)
        missing = [c for c in e_cols if c not in raw.columns]
        if missing:
            raise ValueError(f"{raw.where} has no column(s) {missing} (columns: {', '.join(raw.columns)}); "
                             f"fix data.ending_columns.")
    else:
        e_col = resolve_column(raw, "endings", cand["endings"], required="endings" in explicit,
                               config_key="endings_column")
        if e_col is None:
            e_cols = sorted((c for c in raw.columns if _ENDING_COL.fullmatch(str(c))),
                            key=lambda c: int(_ENDING_COL.fullmatch(c).group(1)))
            if not e_cols:
                raise ValueError(
                    f"{raw.where} has no endings column {cand['endings']} nor ending0, ending1, ... columns "
                    f"(columns: {', '.join(map(str, raw.columns))}); set data.endings_column or data.ending_columns."
                )
    out = []
    n_choices = cfg.num_choices
    for i in range(len(raw)):
        where = f"row {i} of {raw.where}"
        ctx = raw.columns[c_col][i]
        if s_col is not None and raw.columns[s_col][i]:
            ctx = f"{ctx} {raw.columns[s_col][i]}"
        endings = (as_list(raw.columns[e_col][i], f"column {e_col!r}", raw.where, i) if e_col
                   else [raw.columns[c][i] for c in e_cols])
        endings = ["" if x is None else str(x) for x in endings]
        if n_choices is None:
            n_choices = len(endings)
        if len(endings) != n_choices:
            expected = "data.num_choices is" if cfg.num_choices else "the first row has"
            raise ValueError(
                f"{where}: {len(endings)} endings, but {expected} {n_choices}; every example needs the same number "
                f"of choices."
            )
        y = raw.columns[y_col][i]
        if isinstance(y, str) and y.strip().lstrip("-").isdigit():
            y = int(y)
        if isinstance(y, float) and y.is_integer():
            y = int(y)
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < n_choices:
            raise ValueError(
                f"{where}: label {y!r} is not a choice index 0..{n_choices - 1}; the label is the position of the "
                f"correct ending."
            )
        if not isinstance(ctx, str):
            raise ValueError(f"{where}: context {ctx!r} is not text.")
        out.append({"context": ctx, "endings": endings, "label": y})
    if n_choices is not None and n_choices < 2:
        raise ValueError(f"{raw.where}: examples have {n_choices} ending(s); multiple choice needs at least 2.")
    return out


def encode(examples: list[dict], tokenizer, cfg: TaskDataConfig) -> list[dict]:
    """-> [{"input_ids": C lists, "mc_token_ids": C ints, "labels": C lists (or None), "mc_labels": int}]"""
    eos = tokenizer.eos_token_id
    ctx_ids = tokenizer.encode_batch([e["context"] for e in examples])
    end_ids = tokenizer.encode_batch([" " + x for e in examples for x in e["endings"]])
    k = 0
    out = []
    for i, e in enumerate(examples):
        seqs, cls_idx, lm = [], [], []
        for c in range(len(e["endings"])):
            end = end_ids[k][: cfg.max_length - 1]
            k += 1
            room = cfg.max_length - len(end) - 1
            ctx = ctx_ids[i][-room:] if room > 0 else []  # keep the context's end: it leads into the ending
            seq = ctx + end + [eos]
            seqs.append(seq)
            cls_idx.append(len(seq) - 1)
            on = cfg.mc_lm_labels == "all" or (cfg.mc_lm_labels == "correct" and c == e["label"])
            lm.append(list(seq) if on else [IGNORE_INDEX] * len(seq))
        out.append({"input_ids": seqs, "mc_token_ids": cls_idx,
                    "labels": lm if cfg.mc_lm_labels != "none" else None, "mc_labels": e["label"]})
    return out


class McData(TaskData):
    """mc: context + C endings -> the right one; batches input_ids, attention_mask, labels (B, C, T) (labels absent
    with mc_lm_labels=none), mc_token_ids (B, C), mc_labels (B,)."""

    name = "mc"
    columns = {"context": ("context", "startphrase", "sent1"), "context_suffix": (), "endings": ("endings",),
               "label": ("label",)}
    column_fields = {"context_column": "context", "context_suffix_column": "context_suffix",
                     "endings_column": "endings", "label_column": "label"}
    model_keys = ("input_ids", "attention_mask", "mc_token_ids", "labels", "mc_labels")
    demo_sizes = (1500, 300)  # (train, validation): ~1 minute of CPU fine-tuning for the tiny model

    read_examples = staticmethod(read_examples)

    def check_splits(self, train, val) -> None:
        n_train, n_val = len(train[0]["endings"]), len(val[0]["endings"])
        if n_train != n_val:
            raise ValueError(
                f"training examples have {n_train} choices but validation examples {n_val}; set data.num_choices "
                f"or fix the data so both splits have the same number of endings."
            )

    def encode(self, examples, tokenizer, cfg, labels, where, validation):
        return encode(examples, tokenizer, cfg)

    def hf_tokenizer(self, tokenizer):
        """The choice layout context + ending + eos as the pair post-processor: `tokenizer(context, " " + ending)`
        gives a training sequence, and its last token (the eos) is the one mc_token_ids points to."""
        return with_pair_template(tokenizer, "$A:0 $B:1 <eos>:1")

    def collate(self, feats, pad_token_id, regression):
        import torch

        T = max(len(s) for f in feats for s in f["input_ids"])
        out = {
            "input_ids": torch.tensor([pad(f["input_ids"], pad_token_id, T) for f in feats]),  # (B, C, T)
            "attention_mask": torch.tensor([pad([[1] * len(s) for s in f["input_ids"]], 0, T) for f in feats]),
            "mc_token_ids": torch.tensor([f["mc_token_ids"] for f in feats]),  # (B, C)
            "mc_labels": torch.tensor([f["mc_labels"] for f in feats]),  # (B,)
        }
        if feats[0]["labels"] is not None:
            out["labels"] = torch.tensor([pad(f["labels"], IGNORE_INDEX, T) for f in feats])  # (B, C, T)
        return out

    def num_labels(self, label_map) -> int:
        return 1  # one score per choice

    def num_choices(self, examples):
        return len(examples[0]["endings"])

    def demo_examples(self, docs, n, rng, split):
        return mc_rows(docs, n, rng, split)


DATA = McData()
