"""Hugging Face GPT-2 folders <-> our models: the key map and the transposed set are data; safetensors only.

An HF GPT-2 folder is config.json + model.safetensors (or model-0000i-of-0000n.safetensors + an index.json).
Differences from our state_dict, all listed below:
  * the four projections are HF `Conv1D` with weight (in, out) — the transpose of our nn.Linear (out, in);
  * a tied lm_head is not stored (it is wte);
  * old checkpoints carry causal-mask buffers (attn.bias, attn.masked_bias) that we rebuild on the fly;
  * the bare trunk (GPT2Model) is saved without the "transformer." prefix, heads with it.
Weights are never read with pickle (no torch.load): a folder holding only pytorch_model.bin is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .config import GPT2Config
from .generation import GenerationConfig
from .hub import resolve_model_dir

# ours -> HF, trunk-relative ("{i}" = block index). The names are identical by design (we kept transformers' names);
# the map is explicit so that renaming a module is a one-line change here and nowhere else.
TRUNK_KEY_MAP: dict[str, str] = {
    "wte.weight": "wte.weight",
    "wpe.weight": "wpe.weight",
    "h.{i}.ln_1.weight": "h.{i}.ln_1.weight",
    "h.{i}.ln_1.bias": "h.{i}.ln_1.bias",
    "h.{i}.attn.c_attn.weight": "h.{i}.attn.c_attn.weight",
    "h.{i}.attn.c_attn.bias": "h.{i}.attn.c_attn.bias",
    "h.{i}.attn.c_proj.weight": "h.{i}.attn.c_proj.weight",
    "h.{i}.attn.c_proj.bias": "h.{i}.attn.c_proj.bias",
    "h.{i}.ln_2.weight": "h.{i}.ln_2.weight",
    "h.{i}.ln_2.bias": "h.{i}.ln_2.bias",
    "h.{i}.mlp.c_fc.weight": "h.{i}.mlp.c_fc.weight",
    "h.{i}.mlp.c_fc.bias": "h.{i}.mlp.c_fc.bias",
    "h.{i}.mlp.c_proj.weight": "h.{i}.mlp.c_proj.weight",
    "h.{i}.mlp.c_proj.bias": "h.{i}.mlp.c_proj.bias",
    "ln_f.weight": "ln_f.weight",
    "ln_f.bias": "ln_f.bias",
}
# ours -> HF for the heads (model-relative, outside the trunk)
HEAD_KEY_MAP: dict[str, str] = {
    "lm_head.weight": "lm_head.weight",
    "score.weight": "score.weight",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
    "qa_outputs.weight": "qa_outputs.weight",
    "qa_outputs.bias": "qa_outputs.bias",
    "multiple_choice_head.summary.weight": "multiple_choice_head.summary.weight",
    "multiple_choice_head.summary.bias": "multiple_choice_head.summary.bias",
}
# HF Conv1D weights, stored (in, out) — transposed to/from nn.Linear's (out, in) (transformers pytorch_utils.Conv1D)
CONV1D_TRANSPOSED: frozenset[str] = frozenset({
    "h.{i}.attn.c_attn.weight",
    "h.{i}.attn.c_proj.weight",
    "h.{i}.mlp.c_fc.weight",
    "h.{i}.mlp.c_proj.weight",
})
# Buffers old transformers versions saved in checkpoints (the causal mask); accepted and dropped.
IGNORED_HF_KEYS: tuple[str, ...] = ("h.{i}.attn.bias", "h.{i}.attn.masked_bias", "h.{i}.crossattention.bias",
                                    "h.{i}.crossattention.masked_bias")

TRUNK_PREFIX = "transformer."
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def _match(key: str, table) -> tuple[str, str | None] | None:
    """Which template of `table` matches `key` -> (template, block index) or None."""
    for template in table:
        m = _pattern(template).match(key)
        if m:
            return template, (m.group(1) if m.groups() else None)
    return None


def _fill(template: str, i: str | None) -> str:
    return template.replace("{i}", i) if i is not None else template


_HF_TO_OURS_TRUNK = {v: k for k, v in TRUNK_KEY_MAP.items()}
_OUR_HEAD_MODULES = {key.split(".")[0] for key in HEAD_KEY_MAP}  # lm_head, score, classifier, ...
_HF_TO_OURS_HEAD = {v: k for k, v in HEAD_KEY_MAP.items()}


def _has_trunk_prefix(model) -> bool:
    return "transformer" in dict(model.named_children())  # head classes; the bare GPT2Model has no prefix


# ----------------------------------------------------------------------------------------------------------------
# state dicts


def hf_key(key: str, with_trunk_prefix: bool) -> tuple[str, bool]:
    """Our parameter name -> (HF name, whether the tensor is transposed on the way)."""
    prefix = TRUNK_PREFIX if with_trunk_prefix else ""
    if key.startswith(prefix) and not (prefix == "" and key in HEAD_KEY_MAP):
        hit = _match(key[len(prefix):], TRUNK_KEY_MAP)
        if hit is not None:
            template, i = hit
            return prefix + _fill(TRUNK_KEY_MAP[template], i), template in CONV1D_TRANSPOSED
    if key in HEAD_KEY_MAP and with_trunk_prefix:
        return HEAD_KEY_MAP[key], False
    if with_trunk_prefix and not key.startswith(prefix) and key.split(".")[0] not in _OUR_HEAD_MODULES:
        # a head of the model's own (a user's subclass of GPT2PreTrainedModel, not one of transformers' GPT-2
        # heads): no transformers class reads it, so it keeps its name in both formats (from_hf_state_dict)
        return key, False
    raise KeyError(f"no HF name for parameter {key!r}; add it to the key maps in gpt2/hf_io.py.")


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our model -> an HF-named state dict (Conv1D layout, tied lm_head omitted), contiguous, ready for safetensors."""
    with_prefix = _has_trunk_prefix(model)
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # the same tensor as wte; transformers re-ties it on load
        name, transposed = hf_key(key, with_prefix)
        t = t.detach()
        out[name] = (t.t() if transposed else t).contiguous()  # (out, in) -> Conv1D's (in, out)
    return out


def convert_hf_state_dict(sd: dict[str, torch.Tensor], with_trunk_prefix: bool):
    """HF-named tensors -> (our-named tensors, unexpected HF keys). Accepts keys with or without "transformer."."""
    prefix = TRUNK_PREFIX if with_trunk_prefix else ""
    out, unexpected = {}, []
    for hf_key, t in sd.items():
        rel = hf_key[len(TRUNK_PREFIX):] if hf_key.startswith(TRUNK_PREFIX) else hf_key
        if _match(rel, IGNORED_HF_KEYS):
            continue
        hit = _match(rel, _HF_TO_OURS_TRUNK)
        if hit is not None:
            template, i = hit
            ours = _HF_TO_OURS_TRUNK[template]
            if ours in CONV1D_TRANSPOSED:
                t = t.t()  # (in, out) -> (out, in)
            out[prefix + _fill(ours, i)] = t
        elif hf_key in _HF_TO_OURS_HEAD and with_trunk_prefix:
            out[_HF_TO_OURS_HEAD[hf_key]] = t
        else:
            unexpected.append(hf_key)  # e.g. an lm_head loaded into the bare trunk, or another head's weights
    return out, unexpected


def from_hf_state_dict(model, sd: dict[str, torch.Tensor], strict: bool = False):
    """Load an HF-named state dict into `model` (copying into its tensors). Returns (missing, unexpected) keys."""
    ours, unexpected = convert_hf_state_dict(sd, _has_trunk_prefix(model))
    own = dict(model.named_parameters())  # a head of the model's own keeps its name in the HF file (hf_key)
    ours.update({k: sd[k] for k in unexpected if k in own and k.split(".")[0] not in _OUR_HEAD_MODULES})
    unexpected = [k for k in unexpected if k not in ours]
    _check_shapes(model, ours)
    res = model.load_state_dict(ours, strict=False)
    missing = [k for k in res.missing_keys if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if strict and (missing or unexpected):
        raise ValueError(f"state dict does not match {type(model).__name__}: missing {missing}, unexpected "
                         f"{unexpected}.")
    model.tie_weights()
    return missing, unexpected


def _check_shapes(model, ours: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    for k, t in ours.items():
        if k in expected and tuple(expected[k].shape) != tuple(t.shape):
            raise ValueError(f"checkpoint tensor {k!r} has shape {tuple(t.shape)} but the model expects "
                             f"{tuple(expected[k].shape)}: config.json does not describe these weights.")


# ----------------------------------------------------------------------------------------------------------------
# folders


def _read_umask() -> int:
    umask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(umask)
    return umask


# Read once, at import, before any checkpoint-writer thread exists: setting the umask to read it while another thread
# creates a file would give that file mode 0666.
_UMASK = _read_umask()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str,
                     metadata: Optional[dict[str, str]] = None) -> None:
    """`safetensors.torch.save_file`, then the file mode any file this process creates gets (0666 minus the umask
    the process had when this module was imported).

    safetensors (0.8) writes its file with mode 0600, readable by its owner alone, unlike the JSON and tokenizer files
    beside it; on a shared cluster another user (or a separate evaluation account) could not load the weights.
    """
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_UMASK)


def weight_files(folder: str) -> list[str]:
    """The safetensors files of an HF folder: model.safetensors, or every shard its index lists.

    Raises FileNotFoundError (no weights, or a shard missing) and ValueError (pickle-only weights, never loaded)."""
    index = os.path.join(folder, SAFE_INDEX)
    single = os.path.join(folder, SAFE_WEIGHTS)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [p for p in files if not os.path.isfile(os.path.join(folder, p))]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in the folder: {missing}; the copy is "
                                    f"incomplete.")
        return [os.path.join(folder, p) for p in files]
    if any(os.path.isfile(os.path.join(folder, n)) for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ValueError(f"{folder} has only pickle weights (pytorch_model.bin), which gpt2-forge never loads (pickle "
                         f"can run code); convert them once with transformers: "
                         f"model.save_pretrained(dir, safe_serialization=True).")
    raise FileNotFoundError(f"no {SAFE_WEIGHTS} or {SAFE_INDEX} in {folder}.")


def read_weights(files: list[str]) -> dict[str, torch.Tensor]:
    """All tensors of `files` under their HF key names (memory-mapped by safetensors); ValueError if one is corrupt."""
    sd = {}
    for file in files:
        try:
            sd.update(load_file(file))
        except Exception as e:  # safetensors raises its own error types for truncated / foreign files
            raise ValueError(f"cannot read {file}: {e}; the file is corrupt or not safetensors.") from None
    return sd


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _resolve_dtype(dtype, config: GPT2Config, sd: dict[str, torch.Tensor]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if config.dtype is not None:
            return _DTYPES[config.dtype]
        # no dtype in config.json: the dtype the floating tensors were saved in
        return next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype must be 'auto', None or a torch dtype, got {dtype!r}.")


def _contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as a contiguous tensor of `dtype` with at most one copy: the Conv1D transpose and a dtype change happen in
    the same copy_; a tensor that needs neither stays the memory-mapped one safetensors returned (no copy at all).
    (`t.to(dtype).contiguous()` copies twice; `t.to(memory_format=...)` returns a non-contiguous `t` unchanged.)"""
    if t.dtype == dtype:
        return t.contiguous()
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


# torch.nn.init's in-place initializers, made no-ops while a model is built on the meta device (`_no_init`)
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def _no_init():
    """torch.nn.init's initializers as no-ops inside the block (transformers' `no_init_weights` does the same).

    For a build on the meta device: there is nothing to initialize there, and torch's meta kernels for `normal_` /
    `uniform_` run through torch._refs, whose first call imports torch._dynamo (seconds of every `from_pretrained`).
    Not thread-safe (it swaps module attributes), as transformers' is not.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_pretrained(cls, path, dtype="auto", config: GPT2Config | None = None, subfolder: str = "",
                    hub_kwargs: dict | None = None, **config_overrides):
    folder = resolve_model_dir(path, subfolder, **(hub_kwargs or {}))
    if config is not None:  # transformers' config= argument: this config instead of the folder's config.json
        config = GPT2Config.from_dict(config.to_dict(), **config_overrides)
    else:
        config = GPT2Config.from_pretrained(folder, **config_overrides)
    files = weight_files(folder)
    hf_sd = read_weights(files)
    target = _resolve_dtype(dtype, config, hf_sd)
    # Build on the meta device (no memory, no init) and assign the loaded tensors; only a head the folder lacks
    # (a classifier loaded from an LM folder) needs a real build + init.
    with _no_init(), torch.device("meta"):
        probe = cls(config)
    ours, unexpected = convert_hf_state_dict(hf_sd, with_trunk_prefix=_has_trunk_prefix(probe))
    del hf_sd

    expected = set(probe.state_dict().keys())
    tied = "lm_head.weight" if probe.config.tie_word_embeddings else None
    wte = next((k for k in ("transformer.wte.weight", "wte.weight") if k in expected), None)
    if tied and wte and wte not in ours and tied in ours:
        # the tied matrix stored under the head's name only: it is the embedding (transformers loads either name)
        ours[wte] = ours.pop(tied)
    missing = sorted(expected - set(ours) - {tied})
    if missing:
        model = cls(config)
        warnings.warn(f"{cls.__name__}: weights not in {path!s} were newly initialized: {missing}; train them first.",
                      stacklevel=3)
    else:
        model = probe
    _check_shapes(probe, ours)
    ours = {k: _contiguous_as(t, target) for k, t in ours.items()}
    model.load_state_dict(ours, strict=False, assign=not missing)
    model.to(target)
    model.tie_weights()
    model.config.dtype = str(target).replace("torch.", "")
    if hasattr(model, "generation_config") and os.path.isfile(os.path.join(folder, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(folder)  # generate()'s defaults, as transformers
    skipped = [k for k in unexpected if not k.startswith(("lm_head.", "score.", "classifier.", "qa_outputs.",
                                                           "multiple_choice_head."))]
    if skipped:
        warnings.warn(f"{cls.__name__}: ignored {len(skipped)} unknown tensors in {path!s}: {skipped[:5]}",
                      stacklevel=3)
    return model.eval()  # like transformers: loaded models start in eval mode (dropout off)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be an int (bytes) or like '5GB' / '500MB', got {size!r}.")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** {"K": 1, "M": 2, "G": 3}[unit[0]])


def save_pretrained(model, save_directory, safe_serialization: bool = True, max_shard_size: int | str = "5GB") -> None:
    if not safe_serialization:
        raise ValueError("gpt2-forge writes safetensors only (pickle files can run code); use safe_serialization=True.")
    os.makedirs(save_directory, exist_ok=True)
    sd = to_hf_state_dict(model)
    limit = _parse_size(max_shard_size)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():  # greedy: start a new shard when this tensor would overflow the current one
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n

    # remove weights of an earlier save so a stale shard cannot be picked up
    for name in os.listdir(save_directory):
        if name == SAFE_WEIGHTS or name == SAFE_INDEX or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name):
            os.remove(os.path.join(save_directory, name))
    metadata = {"format": "pt"}  # what transformers expects in the safetensors header
    if len(shards) == 1:
        save_safetensors(shards[0], os.path.join(save_directory, SAFE_WEIGHTS), metadata=metadata)
    else:
        weight_map = {}
        for j, shard in enumerate(shards, 1):
            name = f"model-{j:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, os.path.join(save_directory, name), metadata=metadata)
            weight_map.update({k: name for k in shard})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(save_directory, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")

    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    config.save_pretrained(save_directory)
    # generate()'s settings travel with the weights when they say more than config.json's bos/eos/pad (e.g. a model
    # loaded with a generation_config.json, or given settings), as transformers' save_pretrained writes them
    settings = getattr(model, "generation_config", None)
    if settings is not None and settings.to_dict() != GenerationConfig.from_model_config(config).to_dict():
        settings.save_pretrained(save_directory)


# ----------------------------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained of the model classes (transformers' PreTrainedModel methods), mixed into
# gpt2.modeling.GPT2PreTrainedModel

# transformers' from_pretrained arguments that only matter for hub ids (passed to huggingface_hub.snapshot_download)
_HUB_ARGUMENTS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


class PretrainedIO:
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, config=None,
                        dtype="auto", device_map=None, subfolder: str = "", **kwargs):
        """Load an HF GPT-2 folder (config.json + model.safetensors, or a sharded index) or hub id.

        dtype: "auto" keeps the dtype the folder was saved in; a torch.dtype converts; None -> float32.
        config: a GPT2Config to use instead of the folder's config.json. device_map: a device ("cpu", "cuda:0", 0,
        a torch.device) or "auto" (the first GPU, else the CPU) to put the whole model on; subfolder: the model sits in
        <folder>/<subfolder>; revision / cache_dir / token / local_files_only / force_download: for hub ids.
        trust_remote_code, low_cpu_mem_usage and use_safetensors=True change nothing here (no remote code; the
        weights are always loaded without a second copy, from safetensors). Other keyword arguments override config
        fields (e.g. attn_implementation, num_labels=3); anything else raises one sentence naming it.
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes the folder and keyword arguments only; got "
                            f"{len(model_args)} extra positional argument(s).")
        if "torch_dtype" in kwargs:  # the transformers < 4.56 spelling
            dtype = kwargs.pop("torch_dtype")
        hub = {k: kwargs.pop(k) for k in _HUB_ARGUMENTS if k in kwargs}
        for key in ("trust_remote_code", "low_cpu_mem_usage"):
            kwargs.pop(key, None)
        if kwargs.pop("use_safetensors", None) is False:
            raise ValueError("use_safetensors=False: gpt2 loads safetensors only (never pickle); convert the folder "
                             "with transformers' save_pretrained(safe_serialization=True).")
        config_fields = {f.name for f in dataclasses.fields(GPT2Config)} | {"torch_dtype"}
        unknown = sorted(k for k in kwargs if k not in config_fields)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got {unknown}, which are neither GPT2Config fields nor "
                            f"loading options gpt2 implements (config, dtype, device_map, subfolder, "
                            f"{', '.join(_HUB_ARGUMENTS)}).")
        model = load_pretrained(cls, pretrained_model_name_or_path, dtype=dtype, config=config,
                                      subfolder=subfolder, hub_kwargs=hub, **kwargs)
        if device_map is not None:
            if isinstance(device_map, dict):
                raise ValueError("device_map as a dict (layers spread over devices) is not supported; pass one "
                                 "device, e.g. device_map='cuda:0', or 'auto'.")
            if device_map == "auto":
                device_map = "cuda:0" if torch.cuda.is_available() else "cpu"
            model.to(torch.device(device_map) if not isinstance(device_map, int) else torch.device("cuda", device_map))
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        max_shard_size: int | str = "5GB") -> None:
        """Write an HF GPT-2 folder that transformers.GPT2*.from_pretrained loads with identical outputs."""
        save_pretrained(self, save_directory, safe_serialization=safe_serialization, max_shard_size=max_shard_size)
