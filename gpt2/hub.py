"""Where a model or tokenizer folder lives: a local folder that holds one, or a Hugging Face hub id fetched with
huggingface_hub.snapshot_download into its cache (HF_HUB_CACHE / HF_HOME; HF_HUB_OFFLINE=1 reads the cache only).

The lowest module of `gpt2` that touches the file system by name: config.py, hf_io.py, pipeline.py and tokenizer.py
all resolve folders through it, so none of them imports another for this.

A name that is a hub id ("gpt2", "openai-community/gpt2-xl") is read locally only when a folder of that name holds
what is asked for (config.json for a model; tokenizer.json or vocab.json + merges.txt for a tokenizer); any other
folder (e.g. this project's own package folder `gpt2/`, seen from the repository root) never shadows the hub id.
transformers reads any existing folder of that name instead (utils/hub.py cached_file), which fails on `gpt2/` here.
"""

from __future__ import annotations

import os
import re
from typing import Callable

# "org/name" or "name" as the Hugging Face hub spells repo ids (huggingface_hub.utils.validate_repo_id); anything
# else that is not a local folder is a mistyped local path and gets "does not exist" instead of a network error.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt"]  # config, weights (+ index), tokenizer files
# the files a tokenizer folder may hold (transformers' GPT2TokenizerFast: tokenizer.json or vocab.json + merges.txt,
# its config and special tokens, the legacy added_tokens.json)
TOKENIZER_PATTERNS = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json"]


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` is spelled as a hub repo id ("name" or "org/name"; no leading ".", "/" or "~", no "..")."""
    s = os.fspath(name)
    return bool(HUB_ID.match(s)) and ".." not in s and not s.endswith(".")


def holds_model(folder: str | os.PathLike) -> bool:
    """A model folder as save_pretrained writes it: config.json inside."""
    return os.path.isfile(os.path.join(folder, "config.json"))


def holds_tokenizer(folder: str | os.PathLike) -> bool:
    """A tokenizer folder as save_pretrained writes it: tokenizer.json, or vocab.json + merges.txt."""
    has = lambda f: os.path.isfile(os.path.join(folder, f))  # noqa: E731
    return has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))


def resolve_folder(name: str | os.PathLike, holds: Callable[[str], bool], patterns: list[str], what: str,
                   subfolder: str = "", **hub_kwargs) -> str:
    """The local folder of `name`: itself (or <name>/<subfolder>) when it holds(...) the files; else, when `name` is
    a hub id, the snapshot folder huggingface_hub.snapshot_download fetches (only `patterns`) or finds in its cache;
    else the existing folder as it is, for the caller to name what it lacks.

    what: the kind of folder, for messages ("model", "tokenizer"). hub_kwargs (revision, cache_dir, token,
    local_files_only, force_download): snapshot_download's arguments; None values are dropped.
    Raises FileNotFoundError in one sentence: a local path that does not exist, or a hub id that could not be
    fetched (naming the id, the revision, the cache and HF_HUB_OFFLINE).
    """
    path = os.path.expanduser(os.fspath(name))
    folder = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(folder) and holds(folder):
        return folder
    if not is_hub_id(os.fspath(name)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{what} folder {path!r} does not exist; check the path, or give a Hugging Face "
                                    f"hub id.")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"subfolder {subfolder!r} does not exist in {path}; check the path.")
        return folder
    try:
        from huggingface_hub import snapshot_download  # optional dependency, only for hub ids
    except ImportError:
        raise FileNotFoundError(f"{path!r} is not a local {what} folder, and loading it as a hub id needs "
                                f"huggingface_hub: pip install huggingface_hub, or give a local folder.") from None
    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    try:
        snapshot = snapshot_download(repo_id=path, allow_patterns=[f"{subfolder}/{p}" for p in patterns]
                                     if subfolder else patterns, **kwargs)
    except Exception as e:  # network, auth, missing repo or revision: one sentence naming the id and the fix
        raise FileNotFoundError(hub_error(path, e, what, os.path.isdir(path), **kwargs)) from e
    return os.path.join(snapshot, subfolder) if subfolder else snapshot


def hub_error(repo_id: str, err: BaseException, what: str, local_folder: bool = False, revision: str | None = None,
              cache_dir: str | os.PathLike | None = None, local_files_only: bool = False, **_) -> str:
    """One sentence for a hub id snapshot_download could not fetch (with these of its arguments): what was tried,
    why, and the fix."""
    from huggingface_hub import constants

    kind = type(err).__name__
    at = f" at revision {revision!r}" if revision not in (None, "main") else ""
    where = (f"the folder {repo_id!r} holds no {what} files, and the hub id {repo_id!r}{at}" if local_folder
             else f"{repo_id!r}{at} is not a local {what} folder, and as a hub id it")
    if kind == "RepositoryNotFoundError":
        why, fix = "no such repository on the Hugging Face hub (or it is private)", "check the id, or set HF_TOKEN"
    elif kind == "RevisionNotFoundError":
        why, fix = f"the repository has no revision {revision!r}", "give a branch, tag or commit it has"
    elif kind == "GatedRepoError":
        why, fix = "the repository is gated", "accept its terms on huggingface.co and set HF_TOKEN"
    elif kind == "LocalEntryNotFoundError":  # offline (HF_HUB_OFFLINE=1), or the hub could not be reached
        mode = ("HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "local_files_only=True" if local_files_only
                else "the hub could not be reached")
        why = f"it is not in the hub cache {cache_dir or constants.HF_HUB_CACHE} ({mode})"
        get = f"hf download {repo_id}" + (f" --revision {revision}" if at else "")
        fix = (f"download it where there is network (`{get}`) into that cache (HF_HUB_CACHE or HF_HOME) and run "
               f"with HF_HUB_OFFLINE=1, or give a local folder")
    else:  # transport and server errors: their first line (hub errors span several)
        lines = str(err).strip().splitlines()
        why = f"{kind}: {lines[0].rstrip('.') if lines else 'no message'}"
        fix = "check the id, your network and HF_TOKEN, or give a local folder"
    return f"{where} could not be fetched: {why}; {fix}."


def resolve_model_dir(path: str | os.PathLike, subfolder: str = "", **hub_kwargs) -> str:
    """A local model folder (config.json inside) as it is; otherwise a hub id fetched with
    huggingface_hub.snapshot_download (json, safetensors, txt: config, weights, tokenizer files).

    subfolder: the model lives in <folder>/<subfolder> (as transformers' argument). hub_kwargs (revision, cache_dir,
    token, local_files_only, force_download) go to snapshot_download for hub ids. Raises FileNotFoundError.
    """
    return resolve_folder(path, holds_model, MODEL_PATTERNS, "model", subfolder, **hub_kwargs)


def resolve_tokenizer_dir(name: str | os.PathLike, subfolder: str = "", **hub_kwargs) -> str:
    """A local tokenizer folder (tokenizer.json, or vocab.json + merges.txt) as it is; otherwise a hub id's tokenizer
    files fetched with huggingface_hub.snapshot_download (hub_kwargs as `resolve_model_dir`'s). A folder without them
    is returned as it is when `name` is no hub id. Raises FileNotFoundError."""
    return resolve_folder(name, holds_tokenizer, TOKENIZER_PATTERNS, "tokenizer", subfolder, **hub_kwargs)


__all__ = ["HUB_ID", "MODEL_PATTERNS", "TOKENIZER_PATTERNS", "holds_model", "holds_tokenizer", "hub_error", "is_hub_id",
           "resolve_folder", "resolve_model_dir", "resolve_tokenizer_dir"]
