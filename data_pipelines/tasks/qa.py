"""Extractive question answering (`task=qa`, SQuAD style): question + context -> the answer's span in the context.

Windows (transformers' run_qa.py `prepare_train_features`, without the text-pair tokenizer GPT-2 lacks): a context
longer than fits is cut into overlapping slices, consecutive ones sharing `doc_stride` tokens. Each window is

    [question tokens][eos][context slice]        (question first: a causal model reads the context *knowing* it)

The export's tokenizer carries this layout as its pair post-processor (`hf_tokenizer`), so transformers'
`model(**tokenizer(question, context))` feeds a window as training did (questions longer than max_question_length
are cut in training only).

`start_positions`/`end_positions` are the answer's first/last token in the window when the answer lies FULLY inside
it; otherwise both point at the separator — `no_answer_index = len(question tokens)`. The separator (not index 0, the
usual [CLS] slot) because in a causal model position 0 has seen only the first question token, while the separator
has read the whole question, so it is the one place that can learn "the answer is not in this slice". An answer that
crosses a window's end is thus labelled in the next window, which holds it whole (given doc_stride >= its length).

Offsets: the tokenizer's character offsets of context tokens (byte-level BPE includes a token's leading space; we
trim leading whitespace so a span maps back to exactly the answer text), and None for question/separator tokens,
so post-processing (train/tasks/qa.py `postprocess_qa`) only ever picks context spans.
"""

from __future__ import annotations

from data_pipelines.tasks.config import TaskDataConfig
from data_pipelines.tasks.base import TaskData
from data_pipelines.tasks.demo import qa_rows
from data_pipelines.tasks.loading import RawSplit, padded_ids, resolve_column, with_pair_template


def _answers(value, where: str) -> tuple[list[str], list[int]]:
    """SQuAD {"text": [...], "answer_start": [...]} or a list of {"text", "answer_start"} dicts."""
    if isinstance(value, dict) and "text" in value and "answer_start" in value:
        texts, starts = value["text"], value["answer_start"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        starts = [starts] if isinstance(starts, int) else list(starts)
    elif isinstance(value, list) and all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in value):
        texts, starts = [a["text"] for a in value], [a["answer_start"] for a in value]
    else:
        raise ValueError(
            f"{where}: answers {value!r} should be {{'text': [...], 'answer_start': [...]}} (SQuAD format); "
            f"or give flat columns via data.answer_text_column / data.answer_start_column."
        )
    if len(texts) != len(starts):
        raise ValueError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values.")
    return texts, starts


def read_examples(raw: RawSplit, cfg: TaskDataConfig) -> list[dict]:
    """Rows -> [{"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}], every answer
    checked against its context (a mismatch names the example)."""
    cand = DATA.column_candidates(cfg)
    explicit = DATA.explicit_columns(cfg)
    q_col = resolve_column(raw, "question", cand["question"], config_key="question_column")
    c_col = resolve_column(raw, "context", cand["context"], config_key="context_column")
    id_col = resolve_column(raw, "id", cand["id"], required="id" in explicit, config_key="id_column")
    a_col = resolve_column(raw, "answers", cand["answers"], required="answers" in explicit, config_key="answers_column")
    flat = None
    if a_col is None:
        try:
            flat = (resolve_column(raw, "answer text", cand["answer_text"], config_key="answer_text_column"),
                    resolve_column(raw, "answer start", cand["answer_start"], config_key="answer_start_column"))
        except ValueError:
            have = ", ".join(map(str, raw.columns))
            raise ValueError(
                f"{raw.where} has no answers column {cand['answers']} nor flat {cand['answer_text']} + "
                f"{cand['answer_start']} columns (columns: {have}); set data.answers_column or "
                f"data.answer_text_column + data.answer_start_column."
            ) from None
    out = []
    for i in range(len(raw)):
        ex_id = str(raw.columns[id_col][i]) if id_col else str(i)
        where = f"qa example {ex_id!r} (row {i} of {raw.where})"
        question, context = raw.columns[q_col][i], raw.columns[c_col][i]
        if not isinstance(question, str) or not isinstance(context, str):
            raise ValueError(f"{where}: question and context must be text.")
        if flat:
            texts, starts = _answers({"text": raw.columns[flat[0]][i], "answer_start": raw.columns[flat[1]][i]}, where)
        else:
            texts, starts = _answers(raw.columns[a_col][i], where)
        for t, s in zip(texts, starts):
            if isinstance(s, float) and s.is_integer():
                s = int(s)
            if not isinstance(t, str) or not isinstance(s, int):
                raise ValueError(f"{where}: answer {t!r} at {s!r} must be a text and an int character offset.")
            if s < 0 or context[s : s + len(t)] != t:
                found = context[max(s, 0) : max(s, 0) + len(t)]
                raise ValueError(
                    f"{where}: answer {t!r} is not in the context at answer_start={s} (the context there reads "
                    f"{found!r}); fix answer_start (a character offset into the context) or the answer text."
                )
        starts = [int(s) for s in starts]
        out.append({"id": ex_id, "question": question, "context": context,
                    "answers": {"text": list(texts), "answer_start": starts}})
    return out


def _trimmed_offsets(context: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for s, e in offsets:
        while s < e and context[s].isspace():
            s += 1
        out.append((s, e))
    return out


def answer_token_span(offsets: list[tuple[int, int]], start_char: int, end_char: int) -> tuple[int, int] | None:
    """First and last context token overlapping the answer's characters [start_char, end_char)."""
    nonempty = [i for i, (s, e) in enumerate(offsets) if e > s]  # whitespace-only tokens hold no answer characters
    ts = next((i for i in nonempty if offsets[i][1] > start_char), None)
    te = next((i for i in reversed(nonempty) if offsets[i][0] < end_char), None)
    if ts is None or te is None or te < ts:
        return None
    return ts, te


def window_starts(n_tokens: int, budget: int, stride: int) -> list[int]:
    """Start token of each context slice: slices of `budget` tokens, consecutive ones overlapping by `stride`."""
    starts = [0]
    while starts[-1] + budget < n_tokens:
        starts.append(starts[-1] + budget - stride)
    return starts


def encode(examples: list[dict], tokenizer, cfg: TaskDataConfig, keep_offsets: bool = False) -> list[dict]:
    """-> features [{"input_ids", "start_positions", "end_positions", "example_index", "no_answer_index",
    ("offsets": per position (start, end) char span in the context, or None)}], one per window."""
    eos = tokenizer.eos_token_id
    q_ids = [q[: cfg.max_question_length] for q in tokenizer.encode_batch([e["question"] for e in examples])]
    enc = tokenizer([e["context"] for e in examples], add_special_tokens=False, return_attention_mask=False,
                    return_offsets_mapping=True)
    features = []
    for i, e in enumerate(examples):
        ctx_ids = enc["input_ids"][i]
        offsets = _trimmed_offsets(e["context"], enc["offset_mapping"][i])
        q = q_ids[i]
        sep = len(q)  # the separator's position = the no-answer label
        budget = cfg.max_length - sep - 1
        span = None
        if e["answers"]["text"] and e["answers"]["text"][0]:
            a0 = e["answers"]["answer_start"][0]
            span = answer_token_span(offsets, a0, a0 + len(e["answers"]["text"][0]))
        for ws in window_starts(len(ctx_ids), budget, cfg.doc_stride):
            we = min(ws + budget, len(ctx_ids))
            first = sep + 1  # position of the window's first context token
            if span is not None and ws <= span[0] and span[1] < we:
                start, end = span[0] - ws + first, span[1] - ws + first
            else:
                start = end = sep
            f = {"input_ids": q + [eos] + ctx_ids[ws:we], "start_positions": start, "end_positions": end,
                 "example_index": i, "no_answer_index": sep}
            if keep_offsets:
                f["offsets"] = [None] * first + offsets[ws:we]
            features.append(f)
    return features


class QaData(TaskData):
    """qa: question + context -> the answer span; batches input_ids, attention_mask (B, T), start_positions,
    end_positions, example_index, feature_index (B,); validation features keep each window's offsets."""

    name = "qa"
    columns = {"id": ("id",), "question": ("question",), "context": ("context",), "answers": ("answers",),
               "answer_text": ("answer_text",), "answer_start": ("answer_start",)}
    column_fields = {"id_column": "id", "question_column": "question", "context_column": "context",
                     "answers_column": "answers", "answer_text_column": "answer_text",
                     "answer_start_column": "answer_start"}
    model_keys = ("input_ids", "attention_mask", "start_positions", "end_positions")
    demo_sizes = (1500, 250)  # (train, validation): ~1 minute of CPU fine-tuning for the tiny model

    def check_config(self, cfg) -> None:
        """A window holds the question, a separator and at least a few context tokens, and consecutive windows
        overlap by less than a window."""
        if not 1 <= cfg.max_question_length <= cfg.max_length - 4:
            raise ValueError(
                f"data.max_question_length={cfg.max_question_length} leaves no room for context in "
                f"data.max_length={cfg.max_length}; use 1 .. {cfg.max_length - 4}."
            )
        budget = cfg.max_length - cfg.max_question_length - 1
        if cfg.doc_stride >= budget:
            raise ValueError(
                f"data.doc_stride={cfg.doc_stride} must be smaller than the context tokens per window "
                f"({budget} = max_length - max_question_length - 1); lower doc_stride or raise max_length."
            )

    read_examples = staticmethod(read_examples)

    def encode(self, examples, tokenizer, cfg, labels, where, validation):
        return encode(examples, tokenizer, cfg, keep_offsets=validation)

    def hf_tokenizer(self, tokenizer):
        """The pair layout [question][eos][context] as the post-processor: `tokenizer(question, context)` (and
        the question-answering pipeline, which calls it with truncation="only_second" and a stride) gives the ids
        of a training window; the eos gets no sequence id, so the pipeline answers from context tokens only."""
        return with_pair_template(tokenizer, "$A:0 <eos>:0 $B:1")

    def collate(self, feats, pad_token_id, regression):
        import torch

        out = padded_ids(feats, pad_token_id)
        for k in ("start_positions", "end_positions", "example_index", "feature_index"):
            out[k] = torch.tensor([f[k] for f in feats])  # (B,)
        return out

    def num_labels(self, label_map) -> int:
        return 2  # a start and an end logit per position

    def demo_examples(self, docs, n, rng, split):
        return qa_rows(docs, n, rng, split)


DATA = QaData()
