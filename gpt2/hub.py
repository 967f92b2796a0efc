"""Where a model folder lives: a local path as is, or a Hugging Face hub id fetched with huggingface_hub.

The lowest module of `gpt2` that touches the file system by name: config.py, hf_io.py and pipeline.py all resolve
folders through it, so none of them imports another for this.
"""

from __future__ import annotations

import os


def resolve_model_dir(path: str | os.PathLike) -> str:
    """A local folder as is; otherwise a hub id fetched with huggingface_hub.snapshot_download (safetensors + json)."""
    path = str(path)
    if os.path.isdir(path):
        return path
    if path.startswith((".", "/", "~")) or os.sep + os.sep in path or path.count("/") > 1:
        raise FileNotFoundError(f"model folder {path!r} does not exist; check the path.")
    try:
        from huggingface_hub import snapshot_download  # optional dependency, only for hub ids
    except ImportError:
        raise FileNotFoundError(f"{path!r} is not a local folder, and huggingface_hub (needed to download a hub id) "
                                f"is not installed; pip install huggingface_hub or pass a local folder.") from None
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as e:
        raise FileNotFoundError(f"{path!r} is neither a local folder nor a downloadable hub model ({e}).") from None


__all__ = ["resolve_model_dir"]
