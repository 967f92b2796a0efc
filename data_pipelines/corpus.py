"""The embedded default corpus: English technical prose that ships with every CPython install — no network, no download.

How it is built (`build_corpus()`), deterministically for a given Python version:

1. **pydoc_data topics.** `pydoc_data.topics.topics` is the dict of Language Reference sections that `help("if")`
   prints (~465 KB on CPython 3.11). One document per key, keys sorted.
2. **Standard-library docstrings.** Every `*.py` file under `sysconfig.get_paths()["stdlib"]` is walked in sorted order
   (directories and files sorted), skipping `site-packages`, `dist-packages`, tests (`test`, `tests`, `idlelib`,
   `lib2to3`, `tkinter`, `turtledemo`, `ensurepip`, `venv`, `config-*`, `__pycache__`). Each file is *parsed* with
   `ast` (never imported: no side effects, no platform-specific imports) and the docstrings of the module and of every
   class / function / async function (in `ast.walk` order) of at least `MIN_DOCSTRING_CHARS` characters, cleaned by
   `ast.get_docstring` (indentation removed), make one document per module, prefixed with the module's dotted name.
   Files that fail to parse or decode are skipped.
3. **Prose only** (`prose_paragraphs`, CORPUS_VERSION 2). Topics and docstrings are hard-wrapped at ~72 columns and
   full of code: a small model trained on them verbatim learns that "\n" is the likeliest next token, and the greedy
   samples of the 400-step default run of CORPUS_VERSION 1 were the prompt followed by 50 newlines. So each text is
   cut into blank-line-separated blocks, and a block is dropped when it is not prose: its first line is indented (a
   literal block, a grammar, an example; an indented bullet list is kept), a line is indented under plain text (an
   argument or definition list), a line starts like code or markup (">>>", "...", ".. directive", ":field:", "|",
   "+--" table, "#", "%", "$ ") or holds a "::=" production, or it has fewer than `MIN_PROSE_WORDS` words or less
   than `MIN_PROSE_LETTERS` letters and spaces. rST heading underlines are removed. The kept lines are re-flowed:
   one line per paragraph, a new line only where a bullet or numbered item starts ("- ", "* ", "1. ", "(2) "), a
   trailing rST "::" becomes ":".
4. **Each paragraph once.** In document order (topics, then modules), a paragraph seen before — a docstring inherited
   or copied into many classes — is dropped. Each document is its title (topic key or module name) and its
   paragraphs, separated by blank lines (so a paragraph never holds a blank line): ~0.23 MB of topics + ~1.14 MB of
   docstrings = 1.27 MB on CPython 3.11 (1.20-1.27 MB on 3.10-3.13; 1.95 MB before step 3).
5. The documents are shuffled with `random.Random(0)` so that the tail the pipeline holds out for validation
   (`val_fraction`) is a random sample of both parts, not the alphabetically-last modules.

`corpus_fingerprint()` identifies the corpus cheaply for cache keys (Python version + stdlib path + `CORPUS_VERSION`)
without building it; `corpus_sha256(docs)` is the content hash recorded in the cache's metadata.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import random
import re
import sys
import sysconfig
import textwrap
from pathlib import Path

CORPUS_VERSION = 2  # bump when the recipe above changes: invalidates cached tokenizers / token files
MIN_DOCSTRING_CHARS = 40  # shorter docstrings ("Return self.") are boilerplate, not prose
MIN_PROSE_WORDS = 4  # shorter blocks are headings ("Class Patterns"), labels ("Returns:") or lone names
MIN_PROSE_LETTERS = 0.8  # letters + spaces per character below this: a formula, a table row or a call signature
# a bullet / numbered list item ("* ", "- ", "1. ", "(2) "): its continuation lines may be indented to its text
_LIST_ITEM = re.compile(r"([-*+\u2022]|\d{1,2}[.)]|\(\d{1,2}\)|[a-z][.)])\s+")
_UNDERLINE = re.compile(r"([-=*~^#+_\"'`:.])\1{2,}")  # an rST heading underline / overline / transition
_CODE_LINE = re.compile(r">>>|\.\.\.( |$)|\.\. |:\w+:|\+[-=]|\||\$ |%|#")  # how a non-prose line starts
_SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo",
    "ensurepip", "venv", "__pycache__",
}


def prose_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a docstring or pydoc topic, in order: each re-flowed to one line (a list to one line
    per item); code, doctests, grammar, tables, field lists and headings are dropped (recipe step 3 above).

    Hand-written: docutils parses reStructuredText, but most stdlib docstrings are plain, Google- or numpy-style
    text rather than rST, and a new dependency for one filter over text we already hold is not worth it.
    """
    out = []
    for block in re.split(r"\n[ \t]*\n", text.expandtabs(8)):
        lines = [ln.rstrip() for ln in block.split("\n") if ln.strip() and not _UNDERLINE.fullmatch(ln.strip())]
        if not lines or any(_CODE_LINE.match(ln.lstrip()) or "::=" in ln for ln in lines):
            continue  # a doctest, a directive, a table, a grammar production
        if lines[0][:1] == " ":  # an indented block: a literal (code) block, unless it is an indented list
            if not _LIST_ITEM.match(lines[0].lstrip()):
                continue
            lines = textwrap.dedent("\n".join(lines)).split("\n")
        items: list[list[str]] = []
        for ln in lines:
            indent = len(ln) - len(ln.lstrip())
            if indent == 0 and (not items or _LIST_ITEM.match(ln)):
                items.append([ln])
            elif indent == 0 or (m := _LIST_ITEM.match(items[-1][0])) and 0 < indent <= m.end() + 1:
                items[-1].append(ln.strip())  # a wrapped line, or the continuation of a list item
            else:
                items = []  # indented under plain text: an argument list, a code sample, a definition list
                break
        if not items:
            continue
        para = "\n".join(re.sub(r"\s+", " ", " ".join(item)).strip() for item in items)
        para = para[:-1] if para.endswith("::") else para  # rST "example::" introduces a (dropped) literal block
        letters = sum(c.isalpha() or c.isspace() for c in para)
        if len(para.split()) >= MIN_PROSE_WORDS and letters >= MIN_PROSE_LETTERS * len(para):
            out.append(para)
    return out


def topic_documents() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distro Pythons strip pydoc_data; the docstrings alone still make ~1.1 MB
        return []
    docs = []
    for key in sorted(topics):
        paras = prose_paragraphs(topics[key])
        if paras:
            docs.append("\n\n".join([key, *paras]))
    return docs


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def docstring_documents(stdlib: str | None = None) -> list[str]:
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place, sorted: os.walk then visits sub-directories in a deterministic order
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            file = Path(dirpath) / fn
            try:
                tree = ast.parse(file.read_bytes(), filename=str(file))
            except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
                continue
            pieces = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=True)
                    if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                        pieces += prose_paragraphs(doc)
            if pieces:
                docs.append(_module_name(file.relative_to(root)) + "\n\n" + "\n\n".join(pieces))
    return docs


def build_corpus() -> list[str]:
    """The embedded corpus as a list of documents (deterministic for a given Python installation)."""
    return list(_build_corpus())


@functools.lru_cache(maxsize=1)  # ~2 s of parsing; tokenizer training and encoding both read it in one process
def _build_corpus() -> tuple[str, ...]:
    docs, seen = [], set()
    for doc in topic_documents() + docstring_documents():
        title, *paras = doc.split("\n\n")  # a paragraph holds no blank line: this is the split made above
        kept = []
        for para in paras:  # the first occurrence of each paragraph (recipe step 4)
            if para not in seen:
                seen.add(para)
                kept.append(para)
        if kept:
            docs.append("\n\n".join([title, *kept]))
    random.Random(0).shuffle(docs)
    return tuple(docs)


def corpus_sha256(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def corpus_fingerprint() -> dict:
    """Cheap identity for cache keys: the corpus is a pure function of these (plus the stdlib files they name)."""
    return {
        "corpus_version": CORPUS_VERSION,
        "python": sys.version,
        "stdlib": sysconfig.get_paths()["stdlib"],
    }
