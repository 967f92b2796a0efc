"""Offline demo datasets, one per task, built deterministically from the embedded default corpus (CPython's own
documentation, data_pipelines/corpus.py) — no network, no download. Each is written as jsonl files with the task's
default columns (so it is read by the same code as a user's files) under

    <cache_root>/task_demo/<task>-<key>/{train,validation}.jsonl

where `key` hashes (DEMO_VERSION, task, seed, sizes, the corpus fingerprint); the same seed gives byte-identical files.

Shared recipe. The corpus documents are shuffled with `random.Random(seed)`; the first 85 % of documents feed the
training examples and the rest the validation examples, so no sentence or paragraph is in both. A document's
paragraphs are its blank-line-separated blocks after the title line, keeping only prose: no indented line (code,
grammar, parameter tables), no ">>>" line, >= 80 % letters and spaces; lines are joined by single spaces. Sentences
split a paragraph after ".", "!" or "?" followed by whitespace and a capital letter.

- cls ("text", "label" in {"original", "shuffled"}; chance 50 %): a sentence of 8-30 words, its trailing "."/"!"/"?"
  removed and its first letter lower-cased (unless an acronym); with probability 1/2 its words are shuffled
  (re-shuffled until the order differs); then the first letter is capitalised and a "." appended — so the two
  classes differ only in word order: no sentence-final punctuation or capitalisation shortcut (punctuation attached
  to a word moves with it).
  Learnable by an LM-pretrained model: shuffled text is improbable text.
- token_cls ("tokens", "tags" BIO over {CODE, NUM}; chance F1 ≈ 0): sentences of 5-40 whitespace-split words with at
  least one entity. A word is NUM when, stripped of surrounding punctuation, it is a number ("3", "-1", "2.5", "10%"),
  CODE when it looks like Python code: contains "``" or "`", a ":role:`" prefix, "()" / "(...)", an identifier with
  "_" or a dotted name ("os.path.join"); consecutive CODE words form one entity (B-CODE I-CODE ...).
- qa ("id", "question", "context", "answers"; a random span scores F1 <= 0.08): an extractive question about a typed
  entity, with the entities of the token_cls recipe. Context = 1-3 consecutive sentences of a paragraph (12-70
  words) in which the asked kind occurs exactly once; question = "Which Python name does the text mention?" (CODE)
  or "Which number does the text mention?" (NUM), the kind drawn at random when both occur once, so the model must
  read the question. The answer is the entity's words without the punctuation around them (unbalanced brackets and
  paired quotes removed: "(see os.path.join)." -> "os.path.join"); one example per (paragraph, answer). About 80 % of
  the questions ask for a Python name. (The earlier recipe, "Where does the text say <3-word span> ?", asks the
  model to match a quoted span — a copying circuit that the 2-layer test model did not learn in 250 steps: F1 0.09.)
  Contexts longer than the window exercise the document stride.
- mc ("context", "endings", "label"; chance 25 %): context = a sentence (6-40 words), the 4 endings = its true next
  sentence in the same paragraph and 3 sentences drawn from OTHER documents, shuffled; label = the true one's index.

How well the tiny model learns each set at the test scale of tests/test_finetune.py is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from pathlib import Path

from data_pipelines.corpus import build_corpus, corpus_fingerprint
from data_pipelines.tasks.base import task_data

DEMO_VERSION = 6  # bump when a recipe above changes: invalidates cached demo files
TRAIN_DOC_FRACTION = 0.85

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PUNCT = "\"'()[]{}<>.,;:!?"
_NUMBER = re.compile(r"[-+]?\d+(\.\d+)?%?")
_CODE = re.compile(
    r".*(``|`).*"  # rST inline literal / role target
    r"|:\w+:`.*"  # :func:`name`
    r"|.*\w\(.*\).*"  # call: name(), f(x)
    r"|[A-Za-z_]\w*_\w*"  # snake_case identifier
    r"|[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(\(\))?"  # dotted name: os.path.join
)


# ------------------------------------------------------------------------------------------------ corpus pieces
def _paragraphs(doc: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", doc)[1:]:  # [0] is the title (topic key / module name)
        lines = block.strip("\n").splitlines()
        if not lines or any(l[:1] in (" ", "\t") or l.lstrip().startswith((">>>", "...")) for l in lines):
            continue
        text = " ".join(l.strip() for l in lines)
        if len(text) < 20 or sum(c.isalpha() or c == " " for c in text) < 0.8 * len(text):
            continue
        out.append(text)
    return out


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(paragraph) if s.strip()]


@functools.lru_cache(maxsize=1)  # the four recipes (and tests) share one pass over the corpus
def _corpus_paragraphs() -> tuple[tuple[str, ...], ...]:
    return tuple(ps for ps in (tuple(_paragraphs(d)) for d in build_corpus()) if ps)


def _doc_split(seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Paragraphs per document, documents split train/validation (seeded)."""
    docs = [list(d) for d in _corpus_paragraphs()]
    random.Random(seed).shuffle(docs)
    cut = int(len(docs) * TRAIN_DOC_FRACTION)
    return docs[:cut], docs[cut:]


def _take(rng: random.Random, items: list, n: int, task: str, split: str) -> list:
    if len(items) < n:
        raise ValueError(
            f"the corpus yields only {len(items)} {split} candidates for the {task} demo, fewer than the {n} asked; "
            f"lower data.demo_{'train' if split == 'train' else 'val'}_size."
        )
    rng.shuffle(items)
    return items[:n]


# ------------------------------------------------------------------------------------------------ the four recipes
def cls_rows(docs: list[list[str]], n: int, rng: random.Random, split: str) -> list[dict]:
    cands = sorted({s for d in docs for p in d for s in _sentences(p) if 8 <= len(s.split()) <= 30})
    out = []
    for s in _take(rng, cands, n, "cls", split):
        words = s.rstrip(".!?").split()
        if words[0][1:].islower() or len(words[0]) == 1:  # "The" -> "the"; acronyms ("XML") keep their case
            words[0] = words[0][:1].lower() + words[0][1:]
        label = "shuffled" if rng.random() < 0.5 else "original"
        if label == "shuffled":
            orig = list(words)
            while words == orig:
                rng.shuffle(words)
        text = " ".join(words)
        out.append({"text": text[:1].upper() + text[1:] + ".", "label": label})
    return out


def _word_kind(word: str) -> str | None:
    core = word.strip(_PUNCT)
    if _NUMBER.fullmatch(core):
        return "NUM"
    if _CODE.fullmatch(word.strip(",;:.!?\"'")):
        return "CODE"
    return None


def bio_tags(words: list[str]) -> list[str]:
    """The token_cls demo's tags for whitespace-split words (see the module docstring)."""
    tags, prev = [], None
    for w in words:
        kind = _word_kind(w)
        if kind is None:
            tags.append("O")
        elif kind == "CODE" and prev == "CODE":
            tags.append("I-CODE")
        else:
            tags.append(f"B-{kind}")
        prev = kind
    return tags


def token_cls_rows(docs: list[list[str]], n: int, rng: random.Random, split: str) -> list[dict]:
    cands = []
    for s in sorted({s for d in docs for p in d for s in _sentences(p)}):
        words = s.split()
        if 5 <= len(words) <= 40:
            tags = bio_tags(words)
            if any(t != "O" for t in tags):
                cands.append({"tokens": words, "tags": tags})
    return _take(rng, cands, n, "token_cls", split)


def _entities(words: list[str]) -> list[tuple[str, int, int]]:
    """(kind, first word, last word) of each NUM / CODE entity of `bio_tags(words)`."""
    out: list[tuple[str, int, int]] = []
    for i, tag in enumerate(bio_tags(words)):
        if tag.startswith("I-"):
            out[-1] = (out[-1][0], out[-1][1], i)
        elif tag.startswith("B-"):
            out.append((tag[2:], i, i))
    return out


def _answer_text(span: str) -> str:
    """An entity's words without the punctuation around them; brackets only when unbalanced, quotes in pairs:
    "os.path.join)." -> "os.path.join", "seek(0)," -> "seek(0)", "``repr()``" -> "repr()", "`verbose'" -> "verbose"."""
    a = span.strip(",;:.!?\"")
    while True:
        before = a
        if a[:2] == "``" and a[-2:] == "``":
            a = a[2:-2]
        elif a[:1] == "`" and a[-1:] in ("`", "'"):
            a = a[1:-1]
        elif a[:1] == "'" and a[-1:] == "'":
            a = a[1:-1]
        elif a[:1] + a[-1:] in ("()", "[]") and not any(ch in a[1:-1] for ch in "()[]"):
            a = a[1:-1]
        elif a[:1] in ("(", "[") and a.count(a[0]) > a.count({"(": ")", "[": "]"}[a[0]]):
            a = a[1:]
        elif a[-1:] in (")", "]") and a.count(a[-1]) > a.count({")": "(", "]": "["}[a[-1]]):
            a = a[:-1]
        a = a.strip(",;:.!?\"")
        if a == before:
            return a


QA_QUESTIONS = {"CODE": "Which Python name does the text mention?", "NUM": "Which number does the text mention?"}


def qa_rows(docs: list[list[str]], n: int, rng: random.Random, split: str) -> list[dict]:
    cands = []  # (context, kind, answer, answer_start): one per (paragraph, answer)
    for d in docs:
        for p in d:
            sents = _sentences(" ".join(p.split()))
            windows = sorted({" ".join(sents[i:j]) for i in range(len(sents))
                              for j in range(i + 1, min(i + 3, len(sents)) + 1)})
            rng.shuffle(windows)
            used = set()
            for ctx in windows:
                words = ctx.split()
                if not 12 <= len(words) <= 70:
                    continue
                ents = _entities(words)
                kinds = [k for k in QA_QUESTIONS if sum(e[0] == k for e in ents) == 1]
                if not kinds:
                    continue
                kind = rng.choice(kinds)
                _, a, b = next(e for e in ents if e[0] == kind)
                span = " ".join(words[a : b + 1])
                answer = _answer_text(span)
                if not answer or answer in used or ctx.count(answer) != 1:
                    continue
                used.add(answer)
                a_start = len(" ".join(words[:a])) + (1 if a else 0) + span.index(answer)
                assert ctx[a_start : a_start + len(answer)] == answer
                cands.append((ctx, kind, answer, a_start))
    cands = _take(rng, cands, n, "qa", split)
    return [{"id": f"{split}-{i}", "question": QA_QUESTIONS[kind], "context": ctx,
             "answers": {"text": [answer], "answer_start": [a_start]}}
            for i, (ctx, kind, answer, a_start) in enumerate(cands)]


def mc_rows(docs: list[list[str]], n: int, rng: random.Random, split: str, choices: int = 4) -> list[dict]:
    pairs = []  # (doc index, sentence, next sentence)
    pool = []  # (doc index, sentence): distractors
    for di, d in enumerate(docs):
        for p in d:
            sents = [s for s in _sentences(p) if 6 <= len(s.split()) <= 40]
            pool += [(di, s) for s in sents]
            pairs += [(di, a, b) for a, b in zip(sents, sents[1:])]
    pairs = _take(rng, pairs, n, "mc", split)
    out = []
    for di, ctx, nxt in pairs:
        endings = [nxt]
        while len(endings) < choices:
            dj, s = pool[rng.randrange(len(pool))]
            if dj != di and s not in endings:
                endings.append(s)
        rng.shuffle(endings)
        out.append({"context": ctx, "endings": endings, "label": endings.index(nxt)})
    return out


def build_demo(task, seed: int = 1337, train_size: int | None = None,
               val_size: int | None = None) -> dict[str, list[dict]]:
    """The demo examples of `task` (a built-in task's name or a `TaskData`) in memory: {"train": [...],
    "validation": [...]} by its recipe (`TaskData.demo_examples`), deterministic in `seed`."""
    data = task_data(task)
    n_train, n_val = train_size or data.demo_sizes[0], val_size or data.demo_sizes[1]
    train_docs, val_docs = _doc_split(seed)
    # separate generators per split: the validation set does not change when the training size does
    return {
        "train": data.demo_examples(train_docs, n_train, random.Random(f"{seed}-{data.name}-train"), "train"),
        "validation": data.demo_examples(val_docs, n_val, random.Random(f"{seed}-{data.name}-validation"),
                                         "validation"),
    }


def demo_files(task, cache_root: Path, seed: int = 1337, train_size: int | None = None,
               val_size: int | None = None) -> tuple[Path, Path]:
    """Build (once) and cache the demo jsonl files of `task` (a name or a `TaskData`); -> (train.jsonl,
    validation.jsonl)."""
    from data_pipelines.tokenizing import atomic_dir, publish_dir

    data = task_data(task)
    task = data.name
    sizes = (train_size or data.demo_sizes[0], val_size or data.demo_sizes[1])
    ident = {"version": DEMO_VERSION, "task": task, "seed": seed, "sizes": sizes, "corpus": corpus_fingerprint()}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(cache_root) / "task_demo" / f"{task}-{key}"
    if not (out / "validation.jsonl").exists():
        tmp = atomic_dir(out)
        for split, rows in build_demo(data, seed, *sizes).items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        (tmp / "meta.json").write_text(json.dumps(ident, indent=2, sort_keys=True, default=str) + "\n")
        publish_dir(tmp, out)
    return out / "train.jsonl", out / "validation.jsonl"
