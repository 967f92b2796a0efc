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
- qa ("id", "question", "context", "answers"; random-span EM ≈ 0.04): context = a paragraph of 20-80 words; the answer is a
  span of 3 consecutive words (outer punctuation stripped, >= 8 characters, no '"') that occurs exactly once in it;
  the question quotes it between spaces, 'Where does the text say <span> ?', so its words have the same token ids
  as in the context (a '"' before the first word would merge with it in byte-level BPE). The model must find the span
  and mark its exact boundaries; guessing a 3-word span scores EM 0.035, F1 0.13 on the validation set. (Harder
  variants — "which word follows <phrase>" (induction/copying) and the span quoted lower-cased — stayed near those
  random-guess levels after 200-400 steps of the tiny model, so they are not the demo.)
  Contexts longer than the window exercise the document stride.
- mc ("context", "endings", "label"; chance 25 %): context = a sentence (6-40 words), the 4 endings = its true next
  sentence in the same paragraph and 3 sentences drawn from OTHER documents, shuffled; label = the true one's index.

Measured learnability (seed 1337, default sizes; the 4 x 128 model pre-trained 800 steps on the default corpus —
LM loss 4.45 — then fine-tuned with AdamW, plain torch loop, batch 32 (mc 16), held-out validation split):
cls 250 steps: accuracy 0.73 (chance 0.50); token_cls 200 steps: entity F1 0.69, token accuracy 0.95 (all-"O": F1 0,
accuracy 0.91); mc 200 steps (mc loss + 0.5 LM loss): accuracy 0.54 (chance 0.25); qa 500 steps (lr 1e-3): EM 0.36,
F1 0.56 after post-processing (a random 3-word span: EM 0.035, F1 0.13). qa needs the most steps: span boundaries
are learnt late (EM 0.03 / F1 0.20 after 200 steps at lr 2e-3 on the lower-cased variant).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from pathlib import Path

from data_pipelines.corpus import build_corpus, corpus_fingerprint

DEMO_VERSION = 5  # bump when a recipe above changes: invalidates cached demo files
DEMO_SIZES = {  # (train, validation) examples: ~1 minute of CPU fine-tuning for the 4 x 128 tiny model
    "cls": (2000, 400),
    "token_cls": (1500, 300),
    "qa": (2000, 300),
    "mc": (1500, 300),
}
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
def _cls(docs: list[list[str]], n: int, rng: random.Random, split: str) -> list[dict]:
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


def _token_cls(docs: list[list[str]], n: int, rng: random.Random, split: str) -> list[dict]:
    cands = []
    for s in sorted({s for d in docs for p in d for s in _sentences(p)}):
        words = s.split()
        if 5 <= len(words) <= 40:
            tags = bio_tags(words)
            if any(t != "O" for t in tags):
                cands.append({"tokens": words, "tags": tags})
    return _take(rng, cands, n, "token_cls", split)


def _qa(docs: list[list[str]], n: int, rng: random.Random, split: str) -> list[dict]:
    paras = sorted({" ".join(p.split()) for d in docs for p in d if 20 <= len(p.split()) <= 80})
    rng.shuffle(paras)
    out = []
    for p in paras:
        if len(out) == n:
            break
        words = p.split()
        starts, pos = [], 0  # character offset of every word in p (words are single-space separated)
        for w in words:
            starts.append(pos)
            pos += len(w) + 1
        ks = list(range(len(words) - 2))
        rng.shuffle(ks)
        for k in ks:
            # the answer: 3 consecutive words, outer punctuation stripped, starting and ending in a letter/digit
            span = " ".join(words[k : k + 3])
            answer = span.strip(_PUNCT)
            if (len(answer) < 8 or '"' in answer or not answer[0].isalnum() or not answer[-1].isalnum()
                    or p.count(answer) != 1):  # fmt: skip
                continue
            a_start = starts[k] + span.index(answer)
            assert p[a_start : a_start + len(answer)] == answer
            out.append({"id": f"{split}-{len(out)}", "question": f"Where does the text say {answer} ?",
                        "context": p, "answers": {"text": [answer], "answer_start": [a_start]}})  # fmt: skip
            break
    if len(out) < n:
        _take(rng, out, n, "qa", split)  # raises the "too few candidates" error
    return out


def _mc(docs: list[list[str]], n: int, rng: random.Random, split: str, choices: int = 4) -> list[dict]:
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


RECIPES = {"cls": _cls, "token_cls": _token_cls, "qa": _qa, "mc": _mc}


def build_demo(task: str, seed: int = 1337, train_size: int | None = None,
               val_size: int | None = None) -> dict[str, list[dict]]:  # fmt: skip
    """The demo examples of `task` in memory: {"train": [...], "validation": [...]} (deterministic in `seed`)."""
    if task not in RECIPES:
        raise ValueError(f"no demo dataset for task {task!r}; demos exist for {', '.join(RECIPES)}.")
    n_train, n_val = DEMO_SIZES[task]
    n_train, n_val = train_size or n_train, val_size or n_val
    train_docs, val_docs = _doc_split(seed)
    recipe = RECIPES[task]
    # separate generators per split: the validation set does not change when the training size does
    return {
        "train": recipe(train_docs, n_train, random.Random(f"{seed}-{task}-train"), "train"),
        "validation": recipe(val_docs, n_val, random.Random(f"{seed}-{task}-validation"), "validation"),
    }


def demo_files(task: str, cache_root: Path, seed: int = 1337, train_size: int | None = None,
               val_size: int | None = None) -> tuple[Path, Path]:  # fmt: skip
    """Build (once) and cache the demo jsonl files; -> (train.jsonl, validation.jsonl)."""
    from data_pipelines.tokenizing import atomic_dir, publish_dir

    sizes = (train_size or DEMO_SIZES.get(task, (0, 0))[0], val_size or DEMO_SIZES.get(task, (0, 0))[1])
    ident = {"version": DEMO_VERSION, "task": task, "seed": seed, "sizes": sizes, "corpus": corpus_fingerprint()}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(cache_root) / "task_demo" / f"{task}-{key}"
    if not (out / "validation.jsonl").exists():
        data = build_demo(task, seed, *sizes)
        tmp = atomic_dir(out)
        for split, rows in data.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        (tmp / "meta.json").write_text(json.dumps(ident, indent=2, sort_keys=True, default=str) + "\n")
        publish_dir(tmp, out)
    return out / "train.jsonl", out / "validation.jsonl"
