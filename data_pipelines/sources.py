"""Document sources: each yields batches of documents (lists of str) and has a cheap identity for cache keys.

- default: the embedded CPython-documentation corpus (corpus.py).
- text/jsonl/csv/parquet: local files through `datasets.load_dataset("text"|"json"|"csv"|"parquet", data_files=...,
  streaming=True)`: one streaming pass straight from the files, no Arrow copy (we tokenize once and cache the tokens).
  A text file is one document (`sample_by="document"`); a jsonl/csv/parquet row's `text_column` is one document.
- hub: `datasets.load_dataset(name, config_name, split=split, streaming=streaming)`.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

from data_pipelines.config import FILE_BUILDERS, FILE_EXTENSIONS, DataConfig, Source
from data_pipelines.corpus import build_corpus, corpus_fingerprint

DOC_BATCH = 1024  # documents pulled from `datasets` per batch: big enough that per-batch overhead vanishes
PIECE_CHARS = 1 << 20  # a text file is read and encoded in pieces of about this many characters
HEAD_BYTES = 1 << 20  # what DocumentSource.check_head reads of each file before anything heavy is imported
HUB_ROWS_PER_UNIT = 100_000  # a downloaded hub split is read in contiguous row ranges of this size

# A cut right after a lone "\n" that sits between two non-space characters: GPT-2's pre-tokenizer regex
# ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) always ends a pre-token there — no pattern joins
# "\n" to a neighbour — and BPE merges never cross pre-tokens, so encoding the pieces gives the same ids.
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def split_document(doc: str, chunk_chars: int) -> list[str]:
    """Cut a long document at pre-tokenizer boundaries (see `SAFE_CUT`) into pieces of about `chunk_chars`."""
    if len(doc) <= chunk_chars:
        return [doc]
    pieces, start = [], 0
    while len(doc) - start > chunk_chars:
        m = SAFE_CUT.search(doc, start + chunk_chars)
        if m is None:
            break
        pieces.append(doc[start : m.start()])
        start = m.start()
    pieces.append(doc[start:])
    return pieces


def resolve_files(path: str, source: str, key: str = "data.path") -> list[Path]:
    """A file, a folder (its files with the source's extensions, recursively) or a glob -> sorted list of files."""
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"{key}={path} matches no files; check the glob pattern.")
        return files
    if not p.exists():
        raise FileNotFoundError(f"{key}={path} does not exist; point it at a {source} file, a folder or a glob.")
    if p.is_file():
        return [p]
    exts = FILE_EXTENSIONS[source]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(exts))
    if not files:
        raise FileNotFoundError(
            f"{key}={path} is a folder with no {'/'.join(exts)} files; point it at the {source} files."
        )
    return files


def _file_identity(files: list[Path]) -> list:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


class DocumentSource:
    """One split of one source. `identity()` keys the cache; `batches()` yields lists of non-empty documents."""

    def __init__(self, cfg: DataConfig, split: str = "train"):
        self.cfg = cfg
        self.split = split  # "train" or "val" (only when a val file / val split is configured)
        src = cfg.source.value
        self.kind = src
        self.files: list[Path] = []
        if src in FILE_BUILDERS:
            path = cfg.path if split == "train" else cfg.val_path
            key = "data.path" if split == "train" else "data.val_path"
            self.files = resolve_files(path, src, key)
            for f in self.files:
                if f.stat().st_size == 0 and len(self.files) == 1:
                    raise ValueError(f"{key}={path} is an empty file; give a file with text in it.")

    def check_head(self, head_bytes: int = HEAD_BYTES) -> None:
        """Refuse a file whose first `head_bytes` show it cannot be read as this source, before torch, Lightning or
        `datasets` is imported: text that is not UTF-8, data=jsonl that is not JSON objects or lacks `text_column`.

        Only what is certain from the head is refused (a file that passes may still fail later, where the full read
        raises the same messages). Compressed files and csv / parquet are left to that full read.
        Raises ValueError naming the file and the fix.
        """
        for f in self.files:
            if f.name.lower().endswith(".gz"):
                continue
            if self.kind == "text":
                found = _first_utf8_error(f, limit=head_bytes)
                if found is not None:
                    raise ValueError(_not_utf8_message(f, *found))
            elif self.kind == "jsonl":
                self._check_jsonl_head(f, head_bytes)

    def _check_jsonl_head(self, file: Path, head_bytes: int) -> None:
        with open(file, "rb") as fh:
            head = fh.read(head_bytes)
        text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
        first = text.lstrip()[:1]
        if first and first not in "[{":  # not a JSON object per line, nor one JSON document (which datasets reads too)
            line = text.lstrip().splitlines()[0]
            raise ValueError(
                f"{file} is not JSON lines (line 1 starts {line[:40]!r}); data=jsonl reads one JSON object per line "
                f"- convert the file, or use data=text for plain text."
            )
        rows = []
        for line in text.splitlines()[:-1] if len(head) == head_bytes else text.splitlines():  # whole lines only
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                return  # maybe one JSON document over many lines: the full read decides
            if isinstance(row, dict):
                rows.append(row)
        column = self.cfg.text_column
        if rows and not any(column in r for r in rows):
            raise ValueError(self._missing_column_message(column, dict.fromkeys(k for r in rows for k in r)))

    def _missing_column_message(self, column: str, columns) -> str:
        key = "data.path" if self.files else "data.name"
        return (
            f"{self.label()} has no column {column!r} (columns: {', '.join(map(str, columns)) or 'none'}); "
            f"set data.text_column=<one of them> (checked for {key})."
        )

    def label(self) -> str:
        if self.files:
            return ", ".join(str(f) for f in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
        if self.kind == "hub":
            return f"hub dataset {self.cfg.name}" + (f" ({self.cfg.config_name})" if self.cfg.config_name else "")
        return "the embedded default corpus"

    def identity(self) -> dict:
        cfg = self.cfg
        ident: dict = {"source": self.kind, "split": self.split, "max_documents": cfg.max_documents}
        if self.kind == "default":
            ident.update(corpus_fingerprint())
        elif self.files:
            ident["files"] = _file_identity(self.files)
            if self.kind != "text":
                ident["text_column"] = cfg.text_column
        elif self.kind == "hub":
            hub_split = cfg.split if self.split == "train" else cfg.val_split
            ident.update(name=cfg.name, config_name=cfg.config_name, hub_split=hub_split, text_column=cfg.text_column)
        return ident

    # ------------------------------------------------------------------ reading
    def batches(self) -> Iterator[list[str]]:
        """Yield lists of documents; stops after `cfg.max_documents`; raises a clear error on bad data."""
        limit = self.cfg.max_documents
        n = 0
        for batch in self._raw_batches():
            docs = [d for d in batch if d]
            if limit is not None and n + len(docs) >= limit:
                docs = docs[: limit - n]
                if docs:
                    yield docs
                return
            n += len(docs)
            if docs:
                yield docs

    def _raw_batches(self) -> Iterator[list[str]]:
        if self.kind == "default":
            docs = build_corpus()
            for i in range(0, len(docs), DOC_BATCH):
                yield docs[i : i + DOC_BATCH]
            return
        yield from self._hf_batches()

    # ------------------------------------------------------------------ units (sharded preparation)
    # A unit is a part of the source that a process can open on its own and read in order: a file, a contiguous
    # range of rows of a downloaded hub split, or one of a streamed hub dataset's data-file shards. Concatenating
    # the units' documents in unit order gives exactly `batches()`. With `max_documents` (a limit over the whole
    # stream) or the embedded corpus there is one unit.
    def num_units(self) -> int:
        if self.cfg.max_documents is not None or self.kind == "default":
            return 1
        if self.files:
            return len(self.files)
        ds = self._load()
        if self.cfg.streaming:
            return max(1, ds.num_shards)
        return max(1, math.ceil(len(ds) / HUB_ROWS_PER_UNIT))

    def unit_pieces(self, unit: int, cut_text: bool = False) -> Iterator[tuple[str, bool]]:
        """(text, ends a document) pairs of one unit, in order; empty documents are skipped.

        cut_text: read a text file in ~PIECE_CHARS pieces cut at `SAFE_CUT` points (only valid for GPT-2's
        pre-tokenizer; the caller knows) instead of as one string, so a 10 GB file needs no 10 GB of memory.
        """
        if self.cfg.max_documents is not None or self.kind == "default":
            for batch in self.batches():
                for doc in batch:
                    yield doc, True
            return
        if self.kind == "text":
            yield from self._text_pieces(self.files[unit], PIECE_CHARS if cut_text else None)
            return
        if self.files:
            ds = self._load(files=[self.files[unit]])
        else:
            ds = self._load()
            n = max(1, ds.num_shards if self.cfg.streaming else math.ceil(len(ds) / HUB_ROWS_PER_UNIT))
            ds = ds.shard(num_shards=n, index=unit, contiguous=True)  # contiguous: unit order = stream order
        for batch in self._hf_batches(ds):
            for doc in batch:
                if doc:
                    yield doc, True

    def _text_pieces(self, file: Path, piece_chars: int | None) -> Iterator[tuple[str, bool]]:
        # open() in text mode translates universal newlines, exactly as datasets' "text" builder reads a document
        try:
            with open(file, encoding="utf-8") as f:
                if piece_chars is None:
                    text = f.read()
                    if text:
                        yield text, True
                    return
                buf = ""
                while chunk := f.read(piece_chars):
                    buf += chunk
                    while len(buf) > piece_chars and (m := SAFE_CUT.search(buf, piece_chars)):
                        yield buf[: m.start()], False
                        buf = buf[m.start() :]
                if buf:
                    yield buf, True
        except UnicodeDecodeError as e:
            raise ValueError(self._decode_error_message(e, file)) from None

    def _load(self, files: list[Path] | None = None):
        import datasets

        datasets.disable_progress_bars()
        cfg = self.cfg
        if self.files:
            builder = FILE_BUILDERS[self.kind]
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            return datasets.load_dataset(
                builder, data_files=[str(f) for f in files or self.files], split="train", streaming=True, **kwargs
            )
        split = cfg.split if self.split == "train" else cfg.val_split
        try:
            return datasets.load_dataset(cfg.name, cfg.config_name, split=split, streaming=cfg.streaming)
        except (ConnectionError, FileNotFoundError) as e:  # unreachable / not cached, or no such dataset
            raise FileNotFoundError(hub_dataset_error(self.label(), e)) from e

    def _hf_batches(self, ds=None) -> Iterator[list[str]]:
        column = "text" if self.kind == "text" else self.cfg.text_column
        ds = self._load() if ds is None else ds
        it = ds.iter(batch_size=DOC_BATCH)
        first = True
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise ValueError(self._decode_error_message(e)) from None
            except Exception as e:  # datasets wraps builder errors (e.g. DatasetGenerationError)
                cause = e.__cause__ or e.__context__
                if isinstance(cause, UnicodeDecodeError):
                    raise ValueError(self._decode_error_message(cause)) from None
                raise
            if first:
                first = False
                if column not in batch:
                    raise ValueError(self._missing_column_message(column, batch))
            col = batch[column]
            for d in col:
                if d is not None and not isinstance(d, str):
                    raise ValueError(
                        f"column {column!r} of {self.label()} holds {type(d).__name__} values, not text; "
                        f"set data.text_column to a text column."
                    )
            yield col

    def _decode_error_message(self, err: UnicodeDecodeError, bad: Path | None = None) -> str:
        where, offset, byte, reason = bad or self.label(), err.start, err.object[err.start : err.start + 1], err.reason
        for f in self.files if bad is None else [bad]:  # find the culprit: datasets' error does not name the file
            found = _first_utf8_error(f)
            if found is not None:
                where, (offset, byte, reason) = f, found
                break
        return _not_utf8_message(where, offset, byte, reason)


def hub_dataset_error(label: str, err: BaseException,
                      local: str = "data=jsonl data.path=<file or folder> (or data=text / csv / parquet)") -> str:
    """One sentence for a hub dataset `datasets.load_dataset` could not load: no such dataset (DatasetNotFoundError),
    or not reachable and not in the datasets cache (ConnectionError: offline, or no network); the fix for each.
    `local`: the overrides that name local files instead (the LM data group's by default)."""
    import datasets

    lines = str(err).strip().splitlines()
    reason = lines[0].rstrip(".") if lines else type(err).__name__
    if isinstance(err, datasets.exceptions.DatasetNotFoundError):
        return (f"{label} was not found on the Hugging Face hub ({reason}); check data.name (a private or gated "
                f"dataset needs HF_TOKEN), or give local files: {local}.")
    offline = datasets.config.HF_DATASETS_OFFLINE
    mode = "offline mode: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE" if offline else "no network"
    return (f"{label} could not be loaded: it is not in the datasets cache {datasets.config.HF_DATASETS_CACHE} and "
            f"the hub cannot be reached ({mode}: {reason}); load it once where there is network into that cache "
            f"(HF_DATASETS_CACHE or HF_HOME) and run with HF_DATASETS_OFFLINE=1, or give local files: {local}.")


def _not_utf8_message(where, offset: int, byte: bytes, reason: str) -> str:
    return (
        f"{where} is not valid UTF-8 (byte 0x{byte.hex() or '?'} at offset {offset}: {reason}); "
        f"re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`."
    )


def _first_utf8_error(file: Path, chunk: int = 1 << 24, limit: int | None = None) -> tuple[int, bytes, str] | None:
    """(file offset, byte, reason) of the first invalid UTF-8 byte, read in chunks (bounded memory); None if valid.
    limit: read only the first `limit` bytes (a character cut at the limit is not an error)."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    with open(file, "rb") as f:
        while True:
            if limit is not None and pos >= limit:
                return None
            data = f.read(chunk if limit is None else min(chunk, limit - pos))
            try:
                dec.decode(data, final=not data)
            except UnicodeDecodeError as e:
                # the decoder may hold up to 3 bytes of an unfinished character from the previous chunk
                held = len(e.object) - len(data)
                return pos - held + e.start, e.object[e.start : e.start + 1], e.reason
            if not data:
                return None
            pos += len(data)


def check_source(cfg: DataConfig) -> None:
    """Refuse LM data that cannot work, reading only the file system and each file's first MiB: a path that does not
    exist, an empty file, text that is not UTF-8, data=jsonl that is not JSON lines or has no `data.text_column`.

    Cheap and import-light (no torch, Lightning or `datasets`): train/job.py calls it before the training stack is
    imported, so a wrong path or file gets its one sentence in well under a second. The same checks run again where
    the data is read (DocumentSource, its batches), which also catch what a file's head cannot show.
    Raises FileNotFoundError / ValueError naming the key or file and the fix.
    """
    for split in ("train", "val") if cfg.val_path else ("train",):
        DocumentSource(cfg, split).check_head()


def iter_texts(source: DocumentSource, max_chars: int | None = None) -> Iterator[str]:
    """Documents one by one (for BPE training), stopping after about `max_chars` characters."""
    total = 0
    for batch in source.batches():
        for d in batch:
            yield d
            total += len(d)
            if max_chars is not None and total >= max_chars:
                return


__all__ = ["DocumentSource", "check_source", "hub_dataset_error", "resolve_files", "iter_texts", "Source"]
