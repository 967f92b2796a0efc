"""GPT-2 byte-level BPE tokenizer on the Rust `tokenizers` library, file-compatible with transformers.

`GPT2TokenizerFast` reads and writes the Hugging Face tokenizer folder format (tokenizer.json, vocab.json +
merges.txt, tokenizer_config.json, special_tokens_map.json) and behaves like `transformers.GPT2TokenizerFast`
(transformers 5.x) for the calls a training framework makes: `tok(texts, padding=..., truncation=...)`,
`encode`/`decode`/`batch_decode`, offsets, left/right padding. `train_tokenizer` trains a new byte-level BPE.

Byte-level BPE (GPT-2 paper §2.2, Radford et al. 2019): the text is split by the GPT-2 regex, each piece is
mapped byte-by-byte onto 256 printable unicode characters, and BPE merges run on those. With all 256 bytes in the
base vocabulary any string round-trips exactly and there is never an unknown token.

Imports: stdlib, numpy and tokenizers only; torch (return_tensors="pt") and huggingface_hub (hub ids) are
imported lazily where needed. Never transformers.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = ["BatchEncoding", "GPT2TokenizerFast", "GPT2Tokenizer", "train_tokenizer", "VERY_LARGE_INTEGER"]

ENDOFTEXT = "<|endoftext|>"
# transformers' "no limit" model_max_length (tokenization_utils_base.VERY_LARGE_INTEGER); anything above
# LARGE_INTEGER means "unbounded": truncation=True without max_length then does not truncate, as in transformers.
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"  # legacy transformers file: {token: id} for tokens beyond vocab.json

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


# ----------------------------------------------------------------------------------------------------- BatchEncoding
class BatchEncoding(dict):
    """The result of `tokenizer(...)`: a dict (`enc["input_ids"]`) with attribute access (`enc.input_ids`),
    `.to(device)` for tensors, and `.encodings` (the backend `tokenizers.Encoding`s) like transformers'."""

    def __init__(self, data: Mapping[str, Any] | None = None, encodings: list | None = None):
        super().__init__(data or {})
        self.encodings = encodings

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key or attribute {name!r}; keys: {list(self)}") from None

    def __getstate__(self) -> dict:
        return {"data": dict(self), "encodings": self.encodings}

    def __setstate__(self, state: dict) -> None:
        self.update(state["data"])
        self.encodings = state["encodings"]

    def __getitem__(self, item: Any) -> Any:
        """enc["input_ids"] -> the values; enc[i] -> the i-th backend Encoding; enc[a:b] -> a dict of row slices."""
        if isinstance(item, str):
            return super().__getitem__(item)
        if isinstance(item, int) and self.encodings is not None:
            return self.encodings[item]
        if isinstance(item, slice):
            return {k: v[item] for k, v in self.items()}
        raise KeyError(f"BatchEncoding takes a key (str), a row index (int) or a slice, got {item!r}")

    def to(self, device: Any, *, non_blocking: bool = False) -> "BatchEncoding":
        """Move every tensor value to `device` (in place, returns self, as transformers does)."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device, non_blocking=non_blocking)
        return self

    def tokens(self, batch_index: int = 0) -> list[str]:
        return self.encodings[batch_index].tokens

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        return self.encodings[batch_index].word_ids

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """Per token: 0 (first text), 1 (text_pair) or None (special/pad), as transformers'."""
        return self.encodings[batch_index].sequence_ids

    def _row(self, batch_or_index: int, index: int | None) -> tuple[int, int]:
        return (0, batch_or_index) if index is None else (batch_or_index, index)

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None,
                      sequence_index: int = 0) -> int | None:
        b, c = self._row(batch_or_char_index, char_index)
        return self.encodings[b].char_to_token(c, sequence_index)

    def token_to_chars(self, batch_or_token_index: int, token_index: int | None = None) -> tuple[int, int] | None:
        b, t = self._row(batch_or_token_index, token_index)
        return self.encodings[b].token_to_chars(t)

    def token_to_word(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        b, t = self._row(batch_or_token_index, token_index)
        return self.encodings[b].token_to_word(t)

    def token_to_sequence(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        b, t = self._row(batch_or_token_index, token_index)
        return self.encodings[b].token_to_sequence(t)


# ------------------------------------------------------------------------------------------------ backend building
def _byte_level_bpe(vocab: dict[str, int] | str, merges: list | str, add_prefix_space: bool = False) -> Tokenizer:
    """The GPT-2 pipeline exactly as transformers 5 builds it (models/gpt2/tokenization_gpt2.py): BPE without
    unk/prefix/suffix, ByteLevel pre-tokenizer with the GPT-2 regex, ByteLevel decoder. The post-processor is the
    one of OpenAI's gpt2 tokenizer.json: adds no tokens and does not trim offsets (a token's span includes its
    leading space, as transformers reports it)."""
    if isinstance(vocab, str):
        bpe = models.BPE.from_file(vocab, merges, dropout=None, fuse_unk=False)
    else:
        bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict ({"content": ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return value["content"]
    raise ValueError(f"cannot read special token {value!r}: expected a string or a dict with a 'content' key")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save the tokenizer with save_pretrained") from e

def _file_in(folder: str, name: str) -> str | None:
    p = os.path.join(folder, name)
    return p if os.path.isfile(p) else None


def _saved_config(folder: str) -> dict[str, Any]:
    """tokenizer_config.json, overridden by the legacy special_tokens_map.json as in transformers (but a null there
    never erases a token)."""
    config: dict[str, Any] = {}
    if (p := _file_in(folder, TOKENIZER_CONFIG_FILE)) is not None:
        config.update(_read_json(p))
    if (p := _file_in(folder, SPECIAL_TOKENS_MAP_FILE)) is not None:
        config.update({k: v for k, v in _read_json(p).items() if v is not None})
    return config


def _init_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """GPT2TokenizerFast's keyword arguments from a saved tokenizer config."""
    init: dict[str, Any] = {}
    for name in SPECIAL_TOKEN_NAMES:
        if name in config:
            init[name] = _token_content(config[name])
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    if isinstance(extra, Mapping):  # transformers 5 may store model-specific tokens as {name: token}
        extra = list(extra.values())
    init["additional_special_tokens"] = [_token_content(t) for t in extra]
    for key in ("add_prefix_space", "add_bos_token", "add_eos_token", "padding_side", "truncation_side",
                "clean_up_tokenization_spaces"):
        if config.get(key) is not None:
            init[key] = config[key]
    if config.get("model_max_length") is not None:
        init["model_max_length"] = int(config["model_max_length"])
    return init


def _add_saved_tokens(backend: Tokenizer, config: dict[str, Any], folder: str) -> None:
    """Added tokens beyond vocab.json, in id order so each gets its recorded id: tokenizer_config.json's
    added_tokens_decoder (transformers >= 4.34), else the legacy added_tokens.json."""
    added: dict[int, Any] = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}
    if not added and (p := _file_in(folder, ADDED_TOKENS_FILE)) is not None:
        added = {int(i): {"content": t, "special": True} for t, i in _read_json(p).items()}
    for idx in sorted(added):
        spec = added[idx] if isinstance(added[idx], Mapping) else {"content": added[idx]}
        content = spec["content"]
        if backend.token_to_id(content) is None and backend.get_vocab_size(True) != idx:
            raise ValueError(f"added token {content!r} has id {idx} but would get id "
                             f"{backend.get_vocab_size(True)}: the tokenizer files disagree")
        kw = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in spec}
        token = AddedToken(content, special=bool(spec.get("special", True)), **kw)
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])


def _resolve_folder(name_or_path: str | os.PathLike, subfolder: str = "", **hub_kwargs: Any) -> str:
    """A tokenizer.json file, or a local folder that holds tokenizer files, as is; otherwise a hub id downloaded with
    huggingface_hub (gpt2.hub.resolve_folder; hub_kwargs: cache_dir, force_download, local_files_only, token,
    revision). A folder without tokenizer files (e.g. the package folder `gpt2/`) never shadows a hub id."""
    from .hub import resolve_tokenizer_dir  # imported here: this module also loads on its own (no package)

    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isfile(path):
        return path
    return resolve_tokenizer_dir(name_or_path, subfolder, **hub_kwargs)


# ------------------------------------------------------------------------------------------------------- tokenizer
class GPT2TokenizerFast:
    """GPT-2 byte-level BPE tokenizer with the transformers `GPT2TokenizerFast` interface.

    `<|endoftext|>` is bos, eos and unk (as for OpenAI's GPT-2); there is no pad token until you set one
    (`tok.pad_token = tok.eos_token`). GPT-2 adds no special tokens when encoding.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        tokenizer_object: Tokenizer | None = None,
        *,
        tokenizer_file: str | os.PathLike | None = None,
        vocab_file: str | os.PathLike | None = None,
        merges_file: str | os.PathLike | None = None,
        unk_token: str | None = ENDOFTEXT,
        bos_token: str | None = ENDOFTEXT,
        eos_token: str | None = ENDOFTEXT,
        pad_token: str | None = None,
        additional_special_tokens: Iterable[str] = (),
        add_prefix_space: bool = False,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        model_max_length: int = VERY_LARGE_INTEGER,
        padding_side: str = "right",
        truncation_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
    ):
        if tokenizer_object is not None:
            if not isinstance(tokenizer_object, Tokenizer):
                raise TypeError(
                    f"tokenizer_object must be a tokenizers.Tokenizer, got {type(tokenizer_object).__name__}"
                )
            # a private copy: padding/added tokens set here must not leak into the caller's object (transformers
            # deep-copies too)
            backend = Tokenizer.from_str(tokenizer_object.to_str())
        elif tokenizer_file is not None:
            backend = Tokenizer.from_file(os.fspath(tokenizer_file))
        elif vocab_file is not None and merges_file is not None:
            backend = _byte_level_bpe(os.fspath(vocab_file), os.fspath(merges_file), add_prefix_space)
        else:
            raise ValueError(
                "GPT2TokenizerFast needs a tokenizer_object, a tokenizer_file, or vocab_file + merges_file; "
                "to load a folder use GPT2TokenizerFast.from_pretrained(dir), to make a new one use "
                "train_tokenizer(...)"
            )
        # Padding/truncation baked into a tokenizer.json would silently apply to encode(); we do both per call.
        file_padding = backend.padding
        if file_padding is not None:
            pad_token = pad_token or file_padding.get("pad_token")
            padding_side = file_padding.get("direction", padding_side)
        backend.no_padding()
        backend.no_truncation()
        self._tokenizer = backend
        self.name_or_path = os.fspath(name_or_path)
        self.add_prefix_space = add_prefix_space
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._special: dict[str, str | None] = dict.fromkeys(SPECIAL_TOKEN_NAMES)
        # Special tokens become "added tokens" of the backend so "<|endoftext|>" in text is one token, never split
        # into bytes (transformers' TokenizersBackend.__init__ does the same); a token already in the vocabulary
        # keeps its id.
        self.additional_special_tokens = [t for t in additional_special_tokens if t is not None]
        named = {"unk_token": unk_token, "bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self._add_special([t for t in [*named.values(), *self.additional_special_tokens] if t is not None])
        for name, token in named.items():
            setattr(self, name, token)
        if add_bos_token or add_eos_token:
            self._set_template(add_bos_token, add_eos_token)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *init_inputs: Any,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str = "main",
        subfolder: str = "",
        trust_remote_code: bool = False,
        use_fast: bool = True,
        **kwargs: Any,
    ) -> "GPT2TokenizerFast":
        """Load a tokenizer folder (tokenizer.json, or vocab.json + merges.txt; plus tokenizer_config.json /
        special_tokens_map.json when present), a tokenizer.json file, or a Hugging Face hub id.

        transformers' loading arguments: cache_dir / force_download / local_files_only / token / revision go to
        huggingface_hub for hub ids; subfolder reads <folder>/<subfolder>; trust_remote_code and use_fast change
        nothing (there is no remote code, and this is the fast tokenizer). Other keyword arguments override what the
        folder's config says (e.g. `padding_side="left"`, `add_prefix_space=True`, `pad_token="<|endoftext|>"`).
        """
        if init_inputs:
            raise TypeError(f"from_pretrained takes the folder and keyword arguments only, got {len(init_inputs)} "
                            "extra positional argument(s); pass settings as keywords, e.g. padding_side='left'")
        hub = dict(cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only,
                   token=token, revision=revision)
        path = _resolve_folder(pretrained_model_name_or_path, subfolder, **hub)  # <folder>/<subfolder> when given
        folder, tokenizer_json = (os.path.dirname(path), path) if os.path.isfile(path) else (path, None)
        tokenizer_json = tokenizer_json or _file_in(folder, TOKENIZER_FILE)
        vocab, merges = _file_in(folder, VOCAB_FILE), _file_in(folder, MERGES_FILE)
        if tokenizer_json is None and (vocab is None or merges is None):
            present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            raise FileNotFoundError(
                f"no tokenizer files in {folder!r} (found: {present or 'nothing'}): it needs tokenizer.json, or "
                "vocab.json + merges.txt; write them with GPT2TokenizerFast.save_pretrained(dir)"
            )
        config = _saved_config(folder)
        init: dict[str, Any] = {"name_or_path": os.fspath(pretrained_model_name_or_path), **_init_kwargs(config)}
        init.update(kwargs)
        if tokenizer_json is not None:
            try:
                backend = Tokenizer.from_file(tokenizer_json)
            except Exception as e:
                raise ValueError(f"cannot parse {tokenizer_json} as a tokenizers file ({e}); re-save it with "
                                 "save_pretrained") from e
        else:
            try:
                backend = _byte_level_bpe(vocab, merges, bool(init.get("add_prefix_space", False)))
            except Exception as e:
                raise ValueError(f"cannot read {vocab} + {merges} as a GPT-2 BPE vocabulary ({e})") from e
            _add_saved_tokens(backend, config, folder)
        if "add_prefix_space" in init and isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
            # transformers' GPT2Tokenizer rebuilds its pre-tokenizer from add_prefix_space (folder config or call),
            # whatever tokenizer.json says; so does this loader.
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(init["add_prefix_space"]),
                                                             use_regex=True)
        return cls(backend, **init)

    # ------------------------------------------------------------------------------------------------- saving
    def save_vocabulary(self, save_directory: str | os.PathLike, filename_prefix: str | None = None) -> tuple[str, str]:
        """Write vocab.json and merges.txt (the files OpenAI's GPT-2 release and transformers' slow tokenizer read)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"save_vocabulary needs a folder, but {save_directory!r} is a file")
        if not isinstance(self._tokenizer.model, models.BPE):
            raise ValueError(f"save_vocabulary writes BPE files; this tokenizer's model is "
                             f"{type(self._tokenizer.model).__name__}")
        os.makedirs(save_directory, exist_ok=True)
        files = self._tokenizer.model.save(save_directory, filename_prefix)
        vocab = next(f for f in files if f.endswith(VOCAB_FILE))
        merges = next(f for f in files if f.endswith(MERGES_FILE))
        return vocab, merges

    def save_pretrained(self, save_directory: str | os.PathLike, legacy_format: bool | None = None,
                        filename_prefix: str | None = None, push_to_hub: bool = False) -> tuple[str, ...]:
        """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json:
        a folder that both this class and `transformers.GPT2TokenizerFast.from_pretrained` load. Returns the paths.

        filename_prefix names the files "<prefix>-tokenizer.json" etc., as transformers does. legacy_format is
        accepted and changes nothing: both the fast (tokenizer.json) and the legacy (vocab.json + merges.txt) files
        are always written. push_to_hub=True raises: upload the folder with huggingface_hub instead.
        """
        if push_to_hub:
            raise ValueError("push_to_hub=True is not supported here; save the folder, then upload it with "
                             "huggingface_hub.upload_folder(repo_id=..., folder_path=save_directory)")
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"save_pretrained needs a folder, but {save_directory!r} is a file")
        os.makedirs(save_directory, exist_ok=True)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        tokenizer_json = os.path.join(save_directory, prefix + TOKENIZER_FILE)
        self._tokenizer.save(tokenizer_json)
        written = [tokenizer_json, *self.save_vocabulary(save_directory, filename_prefix)]

        added = {idx: {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                       "single_word": t.single_word, "special": t.special}
                 for idx, t in sorted(self._tokenizer.get_added_tokens_decoder().items())}
        config = {
            # "GPT2Tokenizer": transformers 4 maps it to GPT2TokenizerFast when tokenizer.json exists; 5 has one class
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": self.add_prefix_space,
            **{name: self._special[name] for name in SPECIAL_TOKEN_NAMES},
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "errors": "replace",
            "added_tokens_decoder": {str(i): spec for i, spec in added.items()},
        }
        if self.additional_special_tokens:
            config["additional_special_tokens"] = list(self.additional_special_tokens)
        if self.add_bos_token or self.add_eos_token:
            config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        special_map = {k: v for k, v in self.special_tokens_map.items()}
        legacy_added = {t["content"]: i for i, t in added.items() if i >= self.vocab_size}
        for name, content in [(TOKENIZER_CONFIG_FILE, config), (SPECIAL_TOKENS_MAP_FILE, special_map)] + (
            [(ADDED_TOKENS_FILE, legacy_added)] if legacy_added else []
        ):
            path = os.path.join(save_directory, prefix + name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            written.append(path)
        return tuple(written)

    # ------------------------------------------------------------------------------------------ special tokens
    def _add_special(self, tokens: list[str]) -> int:
        existing = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        new = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens) if t not in existing]
        return self._tokenizer.add_special_tokens(new) if new else 0

    def _set_template(self, add_bos: bool, add_eos: bool) -> None:
        # the post-processor transformers builds for add_bos_token/add_eos_token (update_post_processor)
        bos, eos = self.bos_token, self.eos_token
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = ([(bos, self.bos_token_id)] if add_bos else []) + ([(eos, self.eos_token_id)] if add_eos else [])
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    def _set_special(self, name: str, token: str | None) -> None:
        if token is not None:
            token = _token_content(token)
            if self._tokenizer.token_to_id(token) is None:
                raise ValueError(
                    f"cannot set {name}={token!r}: it is not in the vocabulary; use an existing token "
                    f"(e.g. tokenizer.{name} = tokenizer.eos_token) or add it first with "
                    f"tokenizer.add_special_tokens({{'{name}': {token!r}}}) and resize the model's embeddings"
                )
        self._special[name] = token

    def _special_id(self, name: str) -> int | None:
        token = self._special[name]
        return None if token is None else self._tokenizer.token_to_id(token)

    bos_token = property(lambda self: self._special["bos_token"], lambda self, v: self._set_special("bos_token", v))
    eos_token = property(lambda self: self._special["eos_token"], lambda self, v: self._set_special("eos_token", v))
    unk_token = property(lambda self: self._special["unk_token"], lambda self, v: self._set_special("unk_token", v))
    pad_token = property(lambda self: self._special["pad_token"], lambda self, v: self._set_special("pad_token", v))
    bos_token_id = property(lambda self: self._special_id("bos_token"),
                            lambda self, i: self._set_special("bos_token", None if i is None else self._id_token(i)))
    eos_token_id = property(lambda self: self._special_id("eos_token"),
                            lambda self, i: self._set_special("eos_token", None if i is None else self._id_token(i)))
    unk_token_id = property(lambda self: self._special_id("unk_token"),
                            lambda self, i: self._set_special("unk_token", None if i is None else self._id_token(i)))
    pad_token_id = property(lambda self: self._special_id("pad_token"),
                            lambda self, i: self._set_special("pad_token", None if i is None else self._id_token(i)))

    def _id_token(self, index: int) -> str:
        token = self._tokenizer.id_to_token(int(index))
        if token is None:
            raise ValueError(f"token id {index} is out of range for a vocabulary of {len(self)} tokens")
        return token

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self._special.items() if v is not None}
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    @property
    def all_special_tokens(self) -> list[str]:
        named = [v for v in self._special.values() if v is not None]
        return list(dict.fromkeys(named + list(self.additional_special_tokens)))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._tokenizer.token_to_id(t) for t in self.all_special_tokens]

    def add_special_tokens(self, special_tokens_dict: Mapping[str, Any]) -> int:
        """`{"pad_token": "[PAD]", "additional_special_tokens": [...]}` -> number of tokens new to the vocabulary
        (resize the model's embeddings by that much)."""
        n_before = len(self)
        for name, value in special_tokens_dict.items():
            if name == "additional_special_tokens":
                tokens = [_token_content(t) for t in value]
                self._add_special(tokens)
                self.additional_special_tokens = list(dict.fromkeys([*self.additional_special_tokens, *tokens]))
            elif name in SPECIAL_TOKEN_NAMES:
                self._add_special([_token_content(value)])
                setattr(self, name, value)
            else:
                raise ValueError(f"unknown special token name {name!r}; use one of "
                                 f"{[*SPECIAL_TOKEN_NAMES, 'additional_special_tokens']}")
        return len(self) - n_before

    def add_tokens(self, tokens: str | Iterable[str], special_tokens: bool = False) -> int:
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        if special_tokens:
            return self._add_special(tokens)
        return self._tokenizer.add_tokens([AddedToken(t) for t in tokens])

    # -------------------------------------------------------------------------------------------- vocabulary
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without tokens added later (transformers' meaning)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Full vocabulary size including added tokens: the number of rows the model's embedding needs."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Unknown tokens map to unk_token_id (`<|endoftext|>` for GPT-2), as in transformers."""
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self._tokenizer.id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in map(int, _as_list(ids)) if i not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._tokenizer.decoder.decode(tokens)

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False,
                 **kwargs: Any) -> list[str]:
        """Token strings of `text` (and of `pair` after it), as transformers' `tokenize`: no special tokens unless
        asked; other keyword arguments are `__call__`'s."""
        return self(text, pair, add_special_tokens=add_special_tokens, **kwargs).tokens()

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens encoding adds to one text (or a pair): 0 for GPT-2 unless add_bos/eos_token."""
        return self._tokenizer.num_special_tokens_to_add(pair)

    @property
    def pad_token_type_id(self) -> int:
        return 0

    # ------------------------------------------------------------------------------------------------ encoding
    def __call__(
        self,
        text: str | list[str] | list[list[str]] | None = None,
        text_pair: str | list[str] | list[list[str]] | None = None,
        text_target: str | list[str] | None = None,
        text_pair_target: str | list[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        split_special_tokens: bool = False,
        max_target_length: int | None = None,
    ) -> BatchEncoding:
        """Tokenize one text or a batch, or pairs (`text`, `text_pair`), with transformers 5's signature and results.

        One str gives lists of ints; a list gives lists of lists, or (B, T) tensors with return_tensors="pt"/"np".
        Pairs are concatenated as transformers' GPT-2 tokenizer does (no separator: GPT-2 adds no special tokens),
        with token_type_ids 0 for the first text and 1 for the second when return_token_type_ids=True.
        Padding/truncation follow `tokenization_utils_base._get_padding_truncation_strategies`: max_length alone
        truncates, padding=True pads to the longest, truncation=True without max_length cuts at model_max_length.
        Like transformers' fast tokenizer, the padding, truncation (longest_first / only_first / only_second, stride,
        overflowing windows) and pair handling are the Rust `tokenizers` pipeline's, set for this call only.
        text_target adds `labels` (the target's input_ids). Raises ValueError for inputs transformers rejects (no pad
        token when padding, an unknown strategy, texts that are not str), with one sentence naming the fix.
        """
        if tokenizer_kwargs:  # transformers merges them over the explicit arguments
            args = {k: v for k, v in locals().items() if k not in ("self", "tokenizer_kwargs")}
            return self(**{**args, **dict(tokenizer_kwargs)})
        if text is None and text_target is None:
            raise ValueError("nothing to tokenize: pass the text, e.g. tokenizer('Hello world') (or text_target=... "
                             "for labels)")
        common = dict(
            add_special_tokens=add_special_tokens, padding=padding, truncation=truncation, stride=stride,
            is_split_into_words=is_split_into_words, pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side, return_tensors=return_tensors, return_token_type_ids=return_token_type_ids,
            return_attention_mask=return_attention_mask, return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask, return_offsets_mapping=return_offsets_mapping,
            return_length=return_length, verbose=verbose, split_special_tokens=split_special_tokens,
        )
        encoded = self._encode_plus(text, text_pair, max_length=max_length, **common) if text is not None else None
        if text_target is None:
            return encoded
        target_length = max_target_length if max_target_length is not None else max_length
        target = self._encode_plus(text_target, text_pair_target, max_length=target_length, **common)
        if encoded is None:
            return target
        encoded["labels"] = target["input_ids"]
        return encoded

    def _encode_plus(self, text, text_pair, *, add_special_tokens, padding, truncation, max_length, stride,
                     is_split_into_words, pad_to_multiple_of, padding_side, return_tensors, return_token_type_ids,
                     return_attention_mask, return_overflowing_tokens, return_special_tokens_mask,
                     return_offsets_mapping, return_length, verbose, split_special_tokens) -> BatchEncoding:
        """transformers' TokenizersBackend._encode_plus: one backend encode_batch with this call's settings."""
        pad_to, strategy, max_length = self._padding_truncation(padding, truncation, max_length, pad_to_multiple_of,
                                                                verbose)
        _check_text_input(text, "text")
        if text_pair is not None:
            _check_text_input(text_pair, "text_pair")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        if is_split_into_words:
            batched = bool(isinstance(text, (list, tuple)) and text and isinstance(text[0], (list, tuple)))
        else:
            batched = isinstance(text, (list, tuple))
        if batched:
            if isinstance(text_pair, str):
                raise TypeError("when tokenizing a batch, text_pair must be a list as long as text, not one str")
            if text_pair is not None and len(text) != len(text_pair):
                raise ValueError(f"text has {len(text)} items but text_pair has {len(text_pair)}; pass one pair "
                                 "text per text")
            inputs = list(zip(text, text_pair)) if text_pair is not None else list(text)
        else:
            inputs = [(text, text_pair)] if text_pair else [text]  # an empty text_pair means no pair, as in HF
        side = padding_side if padding_side is not None else self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}")

        backend = self._tokenizer
        try:
            if strategy is not None:
                backend.enable_truncation(max_length, stride=stride, strategy=strategy, direction=self.truncation_side)
            if pad_to is not None:
                backend.enable_padding(direction=side, pad_id=self.pad_token_id, pad_type_id=self.pad_token_type_id,
                                       pad_token=self.pad_token, pad_to_multiple_of=pad_to_multiple_of,
                                       length=max_length if pad_to == "max_length" else None)
            backend.encode_special_tokens = bool(split_special_tokens)
            encodings = backend.encode_batch(inputs, add_special_tokens=add_special_tokens,
                                             is_pretokenized=is_split_into_words)
        except Exception as e:  # the Rust pipeline's errors (e.g. "Truncation error: ...") as one sentence
            if type(e) is not Exception:
                raise
            raise ValueError(f"cannot encode this input: {e}") from None
        finally:  # never leave this call's settings on the backend (encode_batch() and the data pipeline use it)
            backend.no_truncation()
            backend.no_padding()
            backend.encode_special_tokens = False

        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        rows, sample_of_row = [], []
        for i, enc in enumerate(encodings):  # overflowing windows become extra rows, as in transformers
            group = [enc, *enc.overflowing] if return_overflowing_tokens else [enc]
            rows += group
            sample_of_row += [i] * len(group)
        data: dict[str, list] = {"input_ids": [e.ids for e in rows]}
        if return_token_type_ids:
            data["token_type_ids"] = [e.type_ids for e in rows]
        if return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in rows]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [e.special_tokens_mask for e in rows]
        if return_offsets_mapping:
            data["offset_mapping"] = [e.offsets for e in rows]
        if return_length:
            data["length"] = [len(e.ids) for e in rows]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = sample_of_row
        if return_tensors is not None:
            data = {k: _to_tensor(k, v, return_tensors) for k, v in data.items()}
        elif not batched and not return_overflowing_tokens:
            data = {k: v[0] if v and isinstance(v[0], list) else v for k, v in data.items()}
        return BatchEncoding(data, rows)

    def _padding_truncation(self, padding, truncation, max_length, pad_to_multiple_of=None, verbose=True):
        """-> (pad_to: None | "longest" | "max_length", truncation strategy or None, max_length), as transformers'
        `_get_padding_truncation_strategies` (transformers' PaddingStrategy/TruncationStrategy enums are str
        enums, so they compare equal to these strings)."""
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
                                       or max_length < 0):
            raise ValueError(f"max_length must be an int >= 0, got {max_length!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"  # transformers: "if you only set max_length, it activates truncation"
        if padding is True or padding == "longest":
            no_truncation = truncation in (None, False, "do_not_truncate")
            if padding is True and verbose and max_length is not None and no_truncation:
                warnings.warn("`max_length` is ignored when `padding`=`True` and there is no truncation strategy. "
                              "To pad to max length, use `padding='max_length'`.", stacklevel=4)
            pad_to = "longest"
        elif padding == "max_length":
            pad_to = "max_length"
        elif padding is False or padding is None or padding == "do_not_pad":
            pad_to = None
        else:
            raise ValueError(f"padding={padding!r} is not a padding strategy; use True or 'longest', 'max_length', "
                             "or False")
        if truncation is True:
            strategy = "longest_first"
        elif truncation is False or truncation is None or truncation == "do_not_truncate":
            strategy = None
        elif truncation in ("longest_first", "only_first", "only_second"):
            strategy = str(getattr(truncation, "value", truncation))
        else:
            raise ValueError(f"truncation={truncation!r} is not a truncation strategy; use True or 'longest_first', "
                             "'only_first', 'only_second', or False")
        if max_length is None:  # unbounded model_max_length: nothing to pad or truncate to, as in transformers
            if pad_to == "max_length":
                unbounded = self.model_max_length > LARGE_INTEGER
                pad_to, max_length = (None, None) if unbounded else (pad_to, self.model_max_length)
            if strategy is not None:
                if self.model_max_length > LARGE_INTEGER:
                    strategy = None
                else:
                    max_length = self.model_max_length
        if pad_to is not None and self.pad_token_id is None:
            raise ValueError(
                "Asking to pad but the tokenizer has no pad token (GPT-2 has none); set one first, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token`"
            )
        if (strategy is not None and pad_to is not None and pad_to_multiple_of is not None and max_length is not None
                and max_length % pad_to_multiple_of):
            raise ValueError(f"truncation length max_length={max_length} is not a multiple of pad_to_multiple_of="
                             f"{pad_to_multiple_of}; pick a max_length that is")
        return pad_to, strategy, max_length

    def encode(
        self,
        text: str | list[str],
        text_pair: str | list[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> list[int] | Any:
        """Token ids of one text (or pair): a list of ints, or a (1, T) tensor with return_tensors="pt"; a list of
        texts gives a list of id lists, as transformers 5's encode. Other keyword arguments are `__call__`'s."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                    max_length=max_length, stride=stride, padding_side=padding_side, return_tensors=return_tensors,
                    return_attention_mask=False, **kwargs)["input_ids"]

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Ids of many texts at once, tokenized in parallel by the Rust backend (the dataset-preparation fast
        path): no padding, no truncation, and no special tokens unless asked."""
        texts = texts if isinstance(texts, list) else list(texts)
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking: ~30% faster, same ids
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]

    def pad(
        self,
        encoded_inputs: Mapping[str, Any] | list[Mapping[str, Any]],
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Pad already-encoded inputs (one `{"input_ids": [...]}`, a dict of lists, or a list of such dicts, e.g. as a
        DataLoader collate_fn), as transformers' `pad`: input_ids with the pad token, attention_mask with 0,
        token_type_ids with 0, special_tokens_mask with 1, on `padding_side`. Tensor inputs give tensors back."""
        if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], Mapping):
            encoded_inputs = {key: [ex[key] for ex in encoded_inputs] for key in encoded_inputs[0].keys()}
        if not isinstance(encoded_inputs, Mapping) or "input_ids" not in encoded_inputs:
            keys = list(encoded_inputs.keys()) if isinstance(encoded_inputs, Mapping) else type(encoded_inputs).__name__
            raise ValueError(f"pad() needs encodings holding input_ids (a dict or a list of dicts), got {keys}")
        data = dict(encoded_inputs)
        required = data["input_ids"]
        if required is None or len(required) == 0:
            if return_attention_mask:
                data["attention_mask"] = []
            return BatchEncoding(data)
        first = required[0]
        if isinstance(first, (list, tuple)):
            first = next((row[0] for row in required if len(row)), first)
        if not isinstance(first, (int, list, tuple)):  # tensors / arrays: pad as lists, give the same type back
            if type(first).__module__.startswith("torch"):
                return_tensors = return_tensors or "pt"
            elif isinstance(first, (np.ndarray, np.generic)):
                return_tensors = return_tensors or "np"
            else:
                raise ValueError(f"pad() reads lists, numpy arrays or torch tensors of ids, got {type(first).__name__}")
            data = {k: (v.tolist() if hasattr(v, "tolist") else [x.tolist() if hasattr(x, "tolist") else x for x in v])
                    for k, v in data.items()}
        pad_to, _, max_length = self._padding_truncation(padding, None, max_length, None, verbose)
        required = data["input_ids"]
        if required and not isinstance(required[0], (list, tuple)):  # one example
            out = self._pad_one(data, max_length, pad_to, pad_to_multiple_of, padding_side, return_attention_mask)
            return BatchEncoding({k: _to_tensor(k, v, return_tensors) for k, v in out.items()} if return_tensors
                                 else out)
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"pad() got keys with different batch sizes: {lengths}")
        if pad_to == "longest":
            pad_to, max_length = "max_length", max(len(row) for row in required)
        batch: dict[str, list] = {}
        for i in range(len(required)):
            out = self._pad_one({k: v[i] for k, v in data.items()}, max_length, pad_to, pad_to_multiple_of,
                                padding_side, return_attention_mask)
            for k, v in out.items():
                batch.setdefault(k, []).append(v)
        if return_tensors:
            batch = {k: _to_tensor(k, v, return_tensors) for k, v in batch.items()}
        return BatchEncoding(batch)

    def _pad_one(self, inputs: dict, max_length, pad_to, pad_to_multiple_of, padding_side, return_attention_mask):
        """transformers' `_pad` for one example."""
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        inputs = dict(inputs)
        ids = list(inputs["input_ids"])
        if pad_to == "longest":
            max_length = len(ids)
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if return_attention_mask and "attention_mask" not in inputs:
            inputs["attention_mask"] = [1] * len(ids)
        if pad_to is None or len(ids) == max_length:
            return inputs
        n = max(max_length - len(ids), 0)
        side = padding_side if padding_side is not None else self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": self.pad_token_type_id,
                 "special_tokens_mask": 1}
        for key, fill in fills.items():
            if key in inputs and (key != "attention_mask" or return_attention_mask):
                row = list(inputs[key])
                inputs[key] = row + [fill] * n if side == "right" else [fill] * n + row
        return inputs

    # ------------------------------------------------------------------------------------------------ decoding
    def decode(
        self,
        token_ids: int | Iterable[int] | Iterable[Iterable[int]] | Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **_: Any,
    ) -> str | list[str]:
        """Text of a sequence of ids (int, list, numpy array, 1-D tensor); a batch (list of lists, 2-D tensor) gives
        a list of texts, as transformers 5's decode. Byte-level BPE round-trips exactly: decode(encode(s)) == s.
        Bytes that do not form valid UTF-8 (a cut multi-byte character) become U+FFFD. Other keyword arguments are
        accepted and ignored, as transformers' fast tokenizer does."""
        if isinstance(token_ids, Mapping):
            token_ids = token_ids["input_ids"]
        ids = _as_list(token_ids)
        self._check_clean_up(clean_up_tokenization_spaces)
        if ids and (isinstance(ids[0], (list, tuple)) or getattr(ids[0], "ndim", 0) >= 1):  # a batch of sequences
            seqs = [[int(i) for i in _as_list(s)] for s in ids]
            return self._tokenizer.decode_batch(seqs, skip_special_tokens=skip_special_tokens)
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self,
        sequences: Iterable[Iterable[int]] | Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Texts of a batch of id sequences (list of lists, 2-D tensor); one flat sequence gives a one-text list,
        as in transformers."""
        if isinstance(sequences, Mapping):
            sequences = sequences["input_ids"]
        seqs = _as_list(sequences)
        if len(seqs) == 0:
            return []
        out = self.decode(seqs, skip_special_tokens, clean_up_tokenization_spaces, **kwargs)
        return [out] if isinstance(out, str) else out

    def _check_clean_up(self, flag: bool | None) -> None:
        # transformers 5 skips the WordPiece-era clean-up (" ." -> ".") for BPE tokenizers even when asked, because
        # it corrupts byte-level text, and warns; so do we (the folder's flag, which transformers 4 wrote as true into
        # many GPT-2 folders, is kept and saved but never applied). A per-call True gets the same true warning.
        if flag:
            warnings.warn("Ignoring clean_up_tokenization_spaces=True: the clean-up step is for WordPiece tokenizers "
                          "and corrupts byte-level BPE text, so (as in transformers 5) it is not applied.",
                          stacklevel=3)

    # ------------------------------------------------------------------------------------------------------ misc
    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"len={len(self)}, model_max_length={self.model_max_length}, padding_side={self.padding_side!r}, "
            f"truncation_side={self.truncation_side!r}, special_tokens={self.special_tokens_map})"
        )


# GPT-2 has one tokenizer class here; transformers 5 also made GPT2TokenizerFast and GPT2Tokenizer the same class.
GPT2Tokenizer = GPT2TokenizerFast


def _check_text_input(t: Any, name: str) -> None:
    """transformers' `_is_valid_text_input`: a str, a list of str, or a list of lists of str (pre-split words)."""
    ok = isinstance(t, str) or (isinstance(t, (list, tuple)) and (
        len(t) == 0 or isinstance(t[0], str) or (isinstance(t[0], (list, tuple)) and (
            len(t[0]) == 0 or isinstance(t[0][0], str)
            or (isinstance(t[0][0], (list, tuple)) and (len(t[0][0]) == 0 or isinstance(t[0][0][0], str)))))))
    if not ok:
        raise ValueError(f"{name} must be a str, a list of str, or a list of lists of str (with is_split_into_words="
                         f"True), got {type(t).__name__}"
                         + (f" of {type(t[0]).__name__}" if isinstance(t, (list, tuple)) else ""))


def _as_list(x: Any) -> list:
    if hasattr(x, "tolist"):  # torch tensors and numpy arrays (a 0-d one gives a scalar)
        x = x.tolist()
    if isinstance(x, (int, np.integer)):
        return [x]
    return x if isinstance(x, list) else list(x)


def _to_tensor(key: str, rows: list, return_tensors: str) -> Any:
    if rows and isinstance(rows[0], (list, tuple)):
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise ValueError(
                f"cannot make a tensor of {key}: the sequences have different lengths {sorted(lengths)}; pass "
                "padding=True (and set tokenizer.pad_token = tokenizer.eos_token) or truncation=True with max_length"
            )
    if return_tensors == "pt":
        import torch  # lazy: the tokenizer itself does not need torch

        return torch.tensor(rows, dtype=torch.long)
    if return_tensors == "np":
        return np.asarray(rows, dtype=np.int64)
    raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")


# --------------------------------------------------------------------------------------------------------- training
def train_tokenizer(
    files_or_iterator: str | os.PathLike | Iterable[str | os.PathLike] | Iterator[str],
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Iterable[str] = (ENDOFTEXT,),
    show_progress: bool = False,
) -> GPT2TokenizerFast:
    """Train a new GPT-2-style byte-level BPE.

    `files_or_iterator`: a text file path, a list of paths, or an iterable of strings. The base vocabulary is
    the special tokens (ids 0..k-1, in order) then all 256 byte symbols, so any text round-trips even if the
    training text never contained a byte; merges fill the rest up to `vocab_size` (fewer if the text runs out
    of pairs seen `min_frequency` times). `<|endoftext|>` (or the first special token) is bos/eos/unk.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte tokens + {len(special_tokens)} "
            f"special token(s) = {minimum}; pass vocab_size >= {minimum}"
        )
    if min_frequency < 0:
        raise ValueError(f"min_frequency must be >= 0, got {min_frequency}")

    backend = Tokenizer(models.BPE(dropout=None, fuse_unk=False))
    # Same pipeline as _byte_level_bpe / transformers' GPT2Tokenizer, so the saved tokenizer.json encodes the same
    # in transformers (which rebuilds the pre-tokenizer and decoder itself and only keeps our vocab and merges).
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=show_progress,
    )

    files = _training_files(files_or_iterator)
    if files is not None:
        if all(os.path.getsize(f) == 0 for f in files):
            raise ValueError(f"cannot train a tokenizer: the training file(s) {files} are empty")
        try:
            backend.train(files, trainer)
        except Exception as e:
            raise ValueError(f"could not train a tokenizer on {files} ({e}); the files must be UTF-8 text") from e
    else:
        n_texts = 0

        def counted() -> Iterator[str]:
            nonlocal n_texts
            for i, t in enumerate(files_or_iterator):
                if not isinstance(t, str):
                    raise TypeError(f"train_tokenizer's iterator must yield str; item {i} is {type(t).__name__}")
                n_texts += bool(t)
                yield t

        backend.train_from_iterator(counted(), trainer)
        if n_texts == 0:
            raise ValueError("cannot train a tokenizer: the text iterator yielded no (non-empty) text")

    named = ENDOFTEXT if ENDOFTEXT in special_tokens else (special_tokens[0] if special_tokens else None)
    return GPT2TokenizerFast(
        backend,
        unk_token=named,
        bos_token=named,
        eos_token=named,
        additional_special_tokens=[t for t in special_tokens if t != named],
    )


def _training_files(source: Any) -> list[str] | None:
    """The file list for `source`, or None if it is an iterable of texts. A str/PathLike is always a path, so a
    typo fails loudly instead of training on the file name; a list is paths when its items name files."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training file {path!r} does not exist; pass a text file, a list of files, "
                                    "or an iterator of strings")
        return [path]
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("cannot train a tokenizer: the list of files/texts is empty")
        is_file = [isinstance(s, (str, os.PathLike)) and os.path.isfile(os.fspath(s)) for s in source]
        looks_like_path = [
            isinstance(s, os.PathLike) or (isinstance(s, str) and not any(c.isspace() for c in s)
                                           and (os.sep in s or re.search(r"\.(txt|text|md|json|jsonl|csv)$", s)))
            for s in source
        ]
        if all(is_file):
            return [os.fspath(s) for s in source]
        if any(is_file) or all(looks_like_path):
            missing = [os.fspath(s) for s, ok in zip(source, is_file) if not ok]
            raise FileNotFoundError(f"training file(s) {missing} do not exist; pass existing text files or an "
                                    "iterator of strings")
    return None
