"""The embedded default corpus: English technical prose that ships with every CPython install — no network, no download.

How it is built (`build_corpus()`), deterministically for a given Python version:

1. **pydoc_data topics.** `pydoc_data.topics.topics` is the dict of Language Reference sections that `help("if")`
   prints (~465 KB on CPython 3.11). One document per key, keys sorted.
2. **Standard-library docstrings.** Every `*.py` file under `sysconfig.get_paths()["stdlib"]` is walked in sorted order
   (directories and files sorted), skipping `site-packages`, `dist-packages`, tests (`test`, `tests`, `idlelib`,
   `lib2to3`, `tkinter`, `turtledemo`, `ensurepip`, `venv`, `config-*`, `__pycache__`). Each file is *parsed* with
   `ast` (never imported: no side effects, no platform-specific imports) and the docstrings of the module and of every
   class / function / async function (in `ast.walk` order) of at least `MIN_DOCSTRING_CHARS` characters, cleaned by
   `ast.get_docstring` (indentation removed), are concatenated — separated by a blank line — into one document per
   module, prefixed with the module's dotted name. Files that fail to parse or decode are skipped. (~1.5 MB on 3.11.)
3. The documents (topics first, then modules, each list sorted) are shuffled with `random.Random(0)` so that the
   tail the pipeline holds out for validation (`val_fraction`) is a random sample of both parts, not the
   alphabetically-last modules.

`corpus_fingerprint()` identifies the corpus cheaply for cache keys (Python version + stdlib path + `CORPUS_VERSION`)
without building it; `corpus_sha256(docs)` is the content hash recorded in the cache's metadata.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import random
import sys
import sysconfig
from pathlib import Path

CORPUS_VERSION = 1  # bump when the recipe above changes: invalidates cached tokenizers / token files
MIN_DOCSTRING_CHARS = 40  # shorter docstrings ("Return self.") are boilerplate, not prose
_SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo",
    "ensurepip", "venv", "__pycache__",
}  # fmt: skip


def topic_documents() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distro Pythons strip pydoc_data; the docstrings alone still make ~1.5 MB
        return []
    return [f"{key}\n\n{topics[key].strip()}" for key in sorted(topics) if topics[key].strip()]


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
                        pieces.append(doc.strip())
            if pieces:
                docs.append(_module_name(file.relative_to(root)) + "\n\n" + "\n\n".join(pieces))
    return docs


def build_corpus() -> list[str]:
    """The embedded corpus as a list of documents (deterministic for a given Python installation)."""
    return list(_build_corpus())


@functools.lru_cache(maxsize=1)  # ~2 s of parsing; tokenizer training and encoding both read it in one process
def _build_corpus() -> tuple[str, ...]:
    docs = topic_documents() + docstring_documents()
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
