"""Where a model folder lives: a local path as is, or a Hugging Face hub id fetched with huggingface_hub.

The lowest module of `gpt2` that touches the file system by name: config.py, hf_io.py and pipeline.py all resolve
folders through it, so none of them imports another for this.
"""

from __future__ import annotations

import os


def resolve_model_dir(path: str | os.PathLike, subfolder: str = "", **hub_kwargs) -> str:
    """A local folder as is; otherwise a hub id fetched with huggingface_hub.snapshot_download (safetensors + json).

    subfolder: the model lives in <folder>/<subfolder> (as transformers' argument). hub_kwargs (revision, cache_dir,
    token, local_files_only, force_download) go to snapshot_download for hub ids.
    """
    path = str(path)
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"subfolder {subfolder!r} does not exist in {path}; check the path.")
        return folder
    if path.startswith((".", "/", "~")) or os.sep + os.sep in path or path.count("/") > 1:
        raise FileNotFoundError(f"model folder {path!r} does not exist; check the path.")
    try:
        from huggingface_hub import snapshot_download  # optional dependency, only for hub ids
    except ImportError:
        raise FileNotFoundError(f"{path!r} is not a local folder, and huggingface_hub (needed to download a hub id) "
                                f"is not installed; pip install huggingface_hub or pass a local folder.") from None
    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        folder = snapshot_download(path, allow_patterns=[f"{subfolder}/{p}" for p in patterns] if subfolder else
                                   patterns, **{k: v for k, v in hub_kwargs.items() if v is not None})
    except Exception as e:
        raise FileNotFoundError(f"{path!r} is neither a local folder nor a downloadable hub model ({e}).") from None
    return os.path.join(folder, subfolder) if subfolder else folder


__all__ = ["resolve_model_dir"]
