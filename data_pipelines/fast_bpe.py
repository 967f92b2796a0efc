"""Bulk document encoding: a byte-level BPE tokenizer of ours as a `tiktoken.Encoding` with the same ids.

`tokenizers` (our `GPT2TokenizerFast` backend) is the reference; `tiktoken` encodes the same byte-level BPE several
times faster per core (measured in benchmarks/RESULTS.md). The two engines run different
algorithms on different tables, so `to_tiktoken` only hands out an Encoding when it can show that, for this
tokenizer, every input gets the same ids from both — otherwise it raises `NotConvertible` with the reason, and
`DocumentEncoder` falls back to `tokenizers` (saying why, once).

The two algorithms, on one pre-token (both split text with GPT-2's regex first, and both see a document's
special-token strings as plain text here: `encode_ordinary` / `encode_special_tokens=True`):

- tokenizers' BPE: repeatedly merge the adjacent *pair listed in merges* with the lowest merge index (leftmost on a
  tie); a pre-token that is not reachable by merges is never emitted whole.
- tiktoken's BPE (tiktoken/src/lib.rs `byte_pair_merge`): a pre-token that is a vocabulary entry is emitted whole;
  otherwise repeatedly merge the adjacent pair *whose concatenation has the lowest rank* (leftmost on a tie), and
  a rank doubles as the token id.

They agree on every input when these hold (checked by `to_tiktoken` on the whole vocabulary; T = the 256 byte
tokens plus every token reachable by merges):

1. ranks are our ids, they grow with the merge index, and no token is made by two merges;
2. **round trip**: tokenizers' BPE (merges only, no whole-entry shortcut) on the bytes of every t in T gives [t].

Why that suffices. Take a state of tokenizers' run on a pre-token and two adjacent symbols x, y with x + y = t in T.
No merge so far crossed the edges of t's span (merges never split a symbol), so the merges inside the span were
exactly the first steps of tokenizers' run on t alone — which by (2) must go on from [x, y] to [t], so (x, y) is a
merge. Hence the pairs tiktoken may merge (concatenation in T) are exactly the pairs tokenizers may merge, by (1)
in the same order with the same leftmost tie-break: both runs take the same step every time. tiktoken's
whole-entry shortcut gives [t] for a pre-token t in T, as tokenizers does by (2). Tokens outside T (unreachable,
or with characters outside the byte alphabet, like "<|endoftext|>") never come out of tokenizers' BPE and are left
out of the Encoding. The regex engines (Oniguruma in tokenizers, fancy-regex in tiktoken) are compared on every
Unicode code point by tests/test_fast_bpe.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the worker processes import this module: keep it free of torch (gpt2/__init__)
    import tiktoken
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# GPT-2's pre-tokenizer regex as tiktoken spells it (tiktoken_ext/openai_public.py, "gpt2"); tokenizers' ByteLevel
# pre-tokenizer uses 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ — the same
# alternatives (the contractions reordered, which cannot change a leftmost match: each starts with a different
# letter after the apostrophe).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class NotConvertible(ValueError):
    """The tokenizer cannot be run by tiktoken with provably identical ids; the message says why."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 src/encoder.py): the alphabet of our vocab files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes | None:
    """A vocab string in the byte alphabet -> its bytes; None when a character is outside the alphabet."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return None


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    # tokenizer.json spells a merge as "a b" (tokenizers < 0.20) or ["a", "b"]
    return [tuple(m) if not isinstance(m, str) else tuple(m.split(" ", 1)) for m in merges]


def check_pipeline(spec: dict) -> None:
    """Raise NotConvertible unless the tokenizer.json pipeline is GPT-2's: no normalizer, ByteLevel pre-tokenizer
    with the GPT-2 regex and no prefix space, a plain BPE model, and no added token that is matched in text."""
    if spec.get("normalizer") is not None:
        raise NotConvertible(f"it has a normalizer ({spec['normalizer'].get('type')}), which tiktoken cannot run")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space", False):
        kind = pre.get("type") if pre.get("type") != "ByteLevel" else "ByteLevel without GPT-2's regex or with a prefix space"
        raise NotConvertible(f"its pre-tokenizer is {kind}, not GPT-2's ByteLevel regex")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise NotConvertible(f"its model is {model.get('type')}, not BPE")
    if model.get("dropout") not in (None, 0, 0.0):
        raise NotConvertible("its BPE has dropout (random merges)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("byte_fallback"):
        raise NotConvertible("its BPE uses a subword prefix/suffix or byte fallback, which byte-level BPE has not")
    plain = [t["content"] for t in spec.get("added_tokens", []) if not t.get("special")]
    if plain:
        raise NotConvertible(
            f"it has added tokens that tokenizers matches inside text ({', '.join(map(repr, plain[:3]))}), "
            f"which tiktoken's byte-level BPE cannot express"
        )


def mergeable_ranks(spec: dict) -> dict[bytes, int]:
    """tiktoken's `mergeable_ranks` for a tokenizer.json `spec`, after checking conditions 1-2 of the module
    docstring on the whole vocabulary. Raises NotConvertible naming the first token that breaks one."""
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    specials = {t["content"] for t in spec.get("added_tokens", [])}
    alphabet = bytes_to_unicode()
    missing = [b for b, c in alphabet.items() if c not in vocab]
    if missing:
        raise NotConvertible(f"its vocabulary lacks the byte token for 0x{missing[0]:02x}, so it is not byte-level")
    ranks: dict[bytes, int] = {bytes([b]): vocab[c] for b, c in alphabet.items()}  # T, with our ids
    merged: list[bytes] = []
    last_id = -1
    for i, (a, b) in enumerate(_merge_pairs(model["merges"])):
        ab, bb = _token_bytes(a), _token_bytes(b)
        if ab is None or bb is None:
            continue  # characters outside the byte alphabet: the pre-tokenizer never produces them, it never fires
        if ab not in ranks or bb not in ranks:
            raise NotConvertible(f"merge {i} ({a!r} {b!r}) uses a token that only a later merge makes")
        t = ab + bb
        if t in ranks:
            raise NotConvertible(f"the token {a + b!r} is made by two merges")
        tid = vocab.get(a + b)
        if tid is None:
            raise NotConvertible(f"merge {i} ({a!r} {b!r}) makes {a + b!r}, which is not in the vocabulary")
        if tid <= last_id:  # condition 1
            raise NotConvertible(f"token ids do not grow with the merge order at {a + b!r} (id {tid})")
        last_id = tid
        ranks[t] = tid
        merged.append(t)
    if model.get("ignore_merges"):
        # tokenizers then emits any vocabulary entry that is a whole pre-token, reachable by merges or not
        stray = [s for s in vocab if s not in specials and (b := _token_bytes(s)) is not None and b not in ranks]
        if stray:
            raise NotConvertible(f"its BPE emits whole vocabulary entries that no merge makes ({stray[0]!r})")
    # condition 2: every token round-trips through tokenizers' own BPE (the reference engine) as itself
    from tokenizers import models

    # a fresh BPE of the same tables with ignore_merges off: the round trip must hold for the merges alone
    bpe = models.BPE(vocab=vocab, merges=_merge_pairs(model["merges"]), dropout=None, fuse_unk=False)
    table = bytes_to_unicode()
    for t in merged:
        s = "".join(table[c] for c in t)
        got = [tok.value for tok in bpe.tokenize(s)]
        if got != [s]:
            raise NotConvertible(
                f"tokenizers encodes the vocabulary entry {s!r} as {got}, not as itself, so tiktoken (which emits "
                f"a whole-entry match as one token) would disagree"
            )
    return ranks


def to_tiktoken(backend: "Tokenizer", name: str | None = None) -> "tiktoken.Encoding":
    """The `tiktoken.Encoding` that gives `backend`'s ids on every text (proof in the module docstring).

    `backend`: a `tokenizers.Tokenizer` (`GPT2TokenizerFast.backend_tokenizer`). Ids are ours; special tokens
    (`<|endoftext|>`) become tiktoken special tokens, for `decode` and `eot_token`. Takes ~1 s for a 50k vocabulary
    (the round-trip check runs tokenizers' BPE once per entry). Raises NotConvertible (a ValueError) with the
    reason when the tokenizer is not a plain byte-level BPE with GPT-2's pre-tokenizer or fails a check.
    """
    import tiktoken

    spec = json.loads(backend.to_str())
    check_pipeline(spec)
    ranks = mergeable_ranks(spec)
    used = set(ranks.values())
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t["id"] not in used}
    digest = hashlib.sha256(backend.to_str().encode()).hexdigest()[:12]
    return tiktoken.Encoding(
        name=name or f"gpt2-forge-{digest}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special
    )


def reference_backend(backend: "Tokenizer") -> "Tokenizer":
    """A copy of `backend` that reads special-token strings in a document as plain text (tiktoken's
    `encode_ordinary`): a web page quoting "<|endoftext|>" must not cut itself into two documents."""
    from tokenizers import Tokenizer

    ref = Tokenizer.from_str(backend.to_str())
    ref.encode_special_tokens = True
    return ref


def _without_surrogates(doc: str) -> str:
    # JSON can carry lone surrogates ("\ud800"), which neither engine accepts; tiktoken's own encode() replaces
    # them with U+FFFD the same way (tiktoken/core.py), and so do both engines here.
    return doc.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class DocumentEncoder:
    """Documents -> token ids (no eos; the caller joins documents), with tiktoken when `to_tiktoken` accepts the
    tokenizer and with `tokenizers` otherwise; both give the same ids (`engine` says which one runs).

    `engine="auto"` picks tiktoken when possible and logs the reason when it cannot (once per tokenizer and
    process); "tokenizers" forces the reference; "tiktoken" raises NotConvertible when it cannot be used.
    Picklable: a worker process gets the ranks, not a rebuilt check.
    """

    _told: set[str] = set()

    def __init__(self, backend: "Tokenizer", engine: str = "auto"):
        if engine not in ("auto", "tiktoken", "tokenizers"):
            raise ValueError(f"engine={engine!r}; use auto, tiktoken or tokenizers.")
        self.reason: str | None = None
        self._tiktoken = None
        self._backend_json = backend.to_str()
        self._reference: Tokenizer | None = None
        if engine != "tokenizers":
            try:
                self._tiktoken = to_tiktoken(backend)
            except NotConvertible as e:
                if engine == "tiktoken":
                    raise
                self.reason = str(e)
                digest = hashlib.sha256(self._backend_json.encode()).hexdigest()
                if digest not in DocumentEncoder._told:
                    DocumentEncoder._told.add(digest)
                    log.warning("encoding with tokenizers instead of tiktoken (same ids, slower): %s.", self.reason)
        self.engine = "tiktoken" if self._tiktoken is not None else "tokenizers"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reference": None}

    @property
    def reference(self) -> "Tokenizer":
        if self._reference is None:
            from tokenizers import Tokenizer

            self._reference = reference_backend(Tokenizer.from_str(self._backend_json))
        return self._reference

    def encode(self, docs: list[str]) -> Iterator[np.ndarray]:
        """One uint32 id array per document, in order."""
        if self._tiktoken is not None:
            enc = self._tiktoken
            for doc in docs:
                try:
                    yield enc.encode_to_numpy(doc, disallowed_special=())  # = encode_ordinary, without a list
                except UnicodeEncodeError:
                    yield enc.encode_to_numpy(_without_surrogates(doc), disallowed_special=())
            return
        ref = self.reference
        encode = getattr(ref, "encode_batch_fast", ref.encode_batch)
        try:
            encs = encode(docs, add_special_tokens=False)
        except (TypeError, UnicodeEncodeError):  # a lone surrogate somewhere in the batch
            encs = encode([_without_surrogates(d) for d in docs], add_special_tokens=False)
        for e in encs:
            yield np.asarray(e.ids, dtype=np.uint32)


def encode_stream(
    encoder: DocumentEncoder, pieces: Iterable[tuple[str, bool]], eos: int, dtype: np.dtype, batch_chars: int
) -> Iterator[np.ndarray]:
    """(text piece, ends a document) pairs -> flat `dtype` arrays: each document's ids then `eos`, in order.

    Pieces of one document must be cut where the GPT-2 regex splits anyway (sources.py cuts so); work is flushed
    every ~`batch_chars` characters, so memory stays bounded whatever the document sizes.
    """
    buf: list[str] = []
    ends: list[bool] = []
    chars = 0

    def flush() -> np.ndarray:
        out: list[np.ndarray] = []
        eos_arr = np.array([eos], dtype=np.uint32)
        for ids, last in zip(encoder.encode(buf), ends):
            out.append(ids)
            if last:
                out.append(eos_arr)  # nanoGPT / GPT-2: every document ends with <|endoftext|>
        return np.concatenate(out).astype(dtype, copy=False) if out else np.empty(0, dtype)

    for piece, last in pieces:
        buf.append(piece)
        ends.append(last)
        chars += len(piece)
        if chars >= batch_chars:
            yield flush()
            buf, ends, chars = [], [], 0
    if buf:
        yield flush()


__all__ = [
    "GPT2_PATTERN", "NotConvertible", "DocumentEncoder", "to_tiktoken", "reference_backend", "bytes_to_unicode",
    "check_pipeline", "mergeable_ranks", "encode_stream",
]
