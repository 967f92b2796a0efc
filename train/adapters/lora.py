"""LoRA fine-tuning with the `peft` library (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

`wrap` is the one hook: `train.tasks.base.Task.training_model` hands it every model right after the task built it.
With peft=lora it injects peft's LoRA layers into the model's nn.Linear projections in place
(`peft.inject_adapter_in_model`: the model keeps its class, forward and config, so task and strategy code see the
same network) and wraps the task head in peft's `ModulesToSaveWrapper` (modules_to_save: trained in full); every
other weight is frozen (requires_grad=False), so the optimizer (train/module.py param_groups) holds state for the
adapters and the head only.

The head is every top-level module with parameters besides the trunk (`transformer`): score, classifier, qa_outputs,
multiple_choice_head, or a head of a user's own class. A tied lm_head is the trunk's token embedding (wte), not a head
of its own: it stays frozen with the base, as in peft's causal-LM recipes (wrapping it would untie it and train a
vocab x n_embd copy).

What a LoRA run writes (`save_adapter`, `merged_model`): run_dir/adapter/, a PEFT adapter folder (adapter_config.json
naming the base model, adapter_model.safetensors under transformers' GPT-2 key names with peft's "base_model.model."
prefix, Conv1D layout marked by fan_in_fan_out=true), which
`peft.PeftModel.from_pretrained(transformers.AutoModelFor<Head>.from_pretrained(base), run_dir/adapter)` loads, and
run_dir/hf/, the merged model. `load_adapter_model` reads an adapter folder back into our model (evaluate, generate).

peft imports transformers (~10 s on a cold cache): it is imported only when a run or a folder uses LoRA.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from train.config import ConfigError

ADAPTER_NAME = "default"  # peft's name for a model's single adapter
ADAPTER_CONFIG = "adapter_config.json"  # peft.utils.CONFIG_NAME
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
PEFT_PREFIX = "base_model.model."  # PeftModel's state-dict prefix of the wrapped model, as peft saves the keys
TRUNK = "transformer"


# ------------------------------------------------------------------------------------------------ the hook
def head_modules(model: nn.Module) -> list[str]:
    """The names of `model`'s task head: its top-level modules with parameters besides the trunk, minus a lm_head tied
    to wte (a dropout owns nothing to train)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return [name for name, m in model.named_children()
            if name != TRUNK and not (name == "lm_head" and tied) and any(True for _ in m.parameters())]


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """ConfigError when a peft.target_modules name matches no nn.Linear of the trunk (peft matches a module whose
    name is the target or ends with "." + target)."""
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(TRUNK + ".")}
    leaf = sorted({name.rsplit(".", 1)[-1] for name in linear})
    bad = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if bad:
        raise ConfigError(f"peft.target_modules names {bad}, which {type(model).__name__} does not have; use some of "
                          f"{leaf} (e.g. peft.target_modules=[c_attn,c_proj,c_fc]).")


def lora_config(peft_cfg: Any, model: nn.Module, base: Optional[str] = None, revision: Optional[str] = None,
                fan_in_fan_out: bool = False):
    """peft.LoraConfig of the peft group for `model`: its head in modules_to_save, `base` / `revision` the base model
    (peft's base_model_name_or_path / revision). fan_in_fan_out=True describes transformers' Conv1D layout (the
    adapter file), False our nn.Linear (training)."""
    import peft

    return peft.LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                           target_modules=list(peft_cfg.target_modules), modules_to_save=head_modules(model) or None,
                           fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base, revision=revision,
                           bias="none")


def wrap(model: nn.Module, peft_cfg: Any, base: Optional[str] = None, revision: Optional[str] = None) -> nn.Module:
    """The model a run trains: `model` itself with peft=none; with peft=lora the same object with LoRA layers injected
    on `peft_cfg.target_modules` (requires_grad only on the adapters and the head), its peft_config naming the base
    model `base` (`base_model`'s name of model.init_from) at hub commit `revision`. Raises ConfigError for a target
    module the model does not have."""
    if peft_cfg.method == "none":
        return model
    import peft

    check_targets(model, list(peft_cfg.target_modules))
    model = peft.inject_adapter_in_model(lora_config(peft_cfg, model, base, revision), model, adapter_name=ADAPTER_NAME)
    model.train()
    return model


def is_lora(model: nn.Module) -> bool:
    """Whether `model` carries peft adapters (`wrap` with peft=lora, or `inject_like`)."""
    return ADAPTER_NAME in (getattr(model, "peft_config", None) or {})


def inject_like(src: nn.Module, net: nn.Module) -> nn.Module:
    """`net` (a fresh model of `src`'s class) with the adapters `src` has, so a full state dict of `src` loads into it
    (train.strategies.model_for_export); `net` as it is when `src` has none."""
    if not is_lora(src):
        return net
    import peft

    return peft.inject_adapter_in_model(copy.deepcopy(src.peft_config[ADAPTER_NAME]), net, adapter_name=ADAPTER_NAME)


def trainable_names(model: nn.Module) -> set[str]:
    """State-dict names of the parameters that train (requires_grad)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def trainable_only(state: dict[str, torch.Tensor], model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """`state` (names `prefix` + model names) cut to the trainable parameters when `model` is a LoRA model: what its
    checkpoints hold; `state` as it is otherwise."""
    if not is_lora(model):
        return state
    keep = {prefix + n for n in trainable_names(model)}
    return {k: v for k, v in state.items() if k in keep}


def run_meta(model: nn.Module) -> dict[str, Any]:
    """meta.json's "peft" of a LoRA model's checkpoints: the method, its settings and the base model (a local path or
    a hub id, and its hub commit); {} otherwise."""
    if not is_lora(model):
        return {}
    c = model.peft_config[ADAPTER_NAME]
    return {"peft": {"method": "lora", "r": c.r, "alpha": c.lora_alpha, "target_modules": sorted(c.target_modules),
                     "modules_to_save": list(c.modules_to_save or []), "base_model": c.base_model_name_or_path,
                     **({"base_revision": c.revision} if c.revision else {})}}


def base_model(init_from: Optional[str], init_dir: Optional[Path]) -> Optional[str]:
    """The base model a LoRA run of `model.init_from` names in meta.json and adapter_config.json (what transformers and
    peft load as `base_model_name_or_path`): a hub id as it is when `init_dir`, the folder it resolved to, is a hub
    snapshot; else the local folder's absolute path. None for a fresh model."""
    if not init_from or init_dir is None:
        return None
    local = Path(init_from).expanduser().resolve()
    return str(local) if local == Path(init_dir).resolve() else init_from


# ------------------------------------------------------------------------------------------------ merged model
def merged_model(model: nn.Module) -> nn.Module:
    """A plain copy of LoRA model `model` (same class, no peft layers): each adapted layer's weight + its LoRA update
    (peft's `merge`), each head its trained copy (peft's ModulesToSaveWrapper unload). `model` is left as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    net = copy.deepcopy(model)
    peft_layers = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    wrapped = [(name, m) for name, m in net.named_modules() if isinstance(m, peft_layers)]
    for name, m in wrapped:  # outer first: named_modules lists a parent before its children
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name)
        if getattr(parent, child) is not m:
            continue  # inside a module replaced already
        if isinstance(m, AuxiliaryTrainingWrapper):
            new = m.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        else:
            m.merge(adapter_names=[ADAPTER_NAME])
            new = m.get_base_layer()
        setattr(parent, child, new)
    if hasattr(net, "peft_config"):
        del net.peft_config
    for p in net.parameters():
        p.requires_grad_(True)
    return net


# ------------------------------------------------------------------------------------------------ adapter folders
def _hf_module(model: nn.Module, module: str) -> str:
    """Our module name (e.g. transformer.h.0.attn.c_attn) -> transformers' (hf_io's key map)."""
    from gpt2 import hf_io

    with_prefix = TRUNK in dict(model.named_children())
    return hf_io.hf_key(module + ".weight", with_prefix)[0][: -len(".weight")]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter file's tensors of LoRA model `model`: peft's `get_peft_model_state_dict` (lora_A / lora_B of each
    adapted layer, the head's weights) under transformers' names with peft's "base_model.model." prefix. LoRA's A
    (r, in) and B (out, r) are the same tensors for nn.Linear and Conv1D (peft reads Conv1D's in/out from its
    weight), so only the names change; the head keeps its nn.Linear layout in both."""
    from peft import get_peft_model_state_dict

    from gpt2 import hf_io

    out = {}
    with_prefix = TRUNK in dict(model.named_children())
    for key, t in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items():
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                module, _, rest = key.partition(part)
                name = _hf_module(model, module) + part + rest
                break
        else:
            name = hf_io.hf_key(key, with_prefix)[0]
        out[PEFT_PREFIX + name] = t.detach().to("cpu").contiguous()
    return out


def save_adapter(model: nn.Module, out: str | os.PathLike, base: Optional[str]) -> Path:
    """Write LoRA model `model` as a PEFT adapter folder at `out` (adapter_config.json naming `base`,
    adapter_model.safetensors), atomically (tmp folder + rename). Returns `out`."""
    from gpt2.hf_io import save_safetensors

    from train.checkpoint.layout import publish_dir

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        c = model.peft_config[ADAPTER_NAME]
        cfg = copy.deepcopy(c)
        cfg.base_model_name_or_path = base
        cfg.fan_in_fan_out = True  # transformers' GPT-2 projections are Conv1D (in, out)
        cfg.inference_mode = True
        cfg.target_modules = sorted(c.target_modules)
        cfg.modules_to_save = list(c.modules_to_save or [])  # hf_io keeps the heads' names
        cfg.save_pretrained(str(tmp))
        save_safetensors(adapter_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a PEFT adapter folder (adapter_config.json + adapter weights)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and (p / ADAPTER_WEIGHTS).is_file()


def base_folder(base: Optional[str], revision: Optional[str], label: str) -> Optional[Path]:
    """The folder of the base model a LoRA adapter or checkpoint names: a local folder as it is, a hub id's snapshot in
    the huggingface_hub cache at `revision` (train.checkpoint.layout.init_source; FileNotFoundError in one sentence,
    naming `label`, when it cannot be had); None when `base` is empty or a local path that does not exist (the
    caller's message says which file to fix)."""
    from gpt2.hub import is_hub_id
    from train.checkpoint.layout import init_source

    if not base or not (Path(base).expanduser().exists() or is_hub_id(base)):
        return None
    return init_source(base, revision, label=label)


def adapter_base(path: str | os.PathLike) -> str:
    """The base model folder an adapter folder names (adapter_config.json's base_model_name_or_path: a local folder,
    or a hub id read from the huggingface_hub cache at its `revision`); FileNotFoundError naming the fix when it is
    missing or cannot be had."""
    p = Path(path)
    config = json.loads((p / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    folder = base_folder(base, config.get("revision"), label=f"the base model {base} of {p}")
    if folder is None:
        raise FileNotFoundError(f"{p / ADAPTER_CONFIG} names base model {base!r}, which does not exist here; set its "
                                f"base_model_name_or_path to the base model's HF folder.")
    return str(folder)


def load_adapter_model(path: str | os.PathLike, cls: type) -> nn.Module:
    """Our `cls` model of an adapter folder's base (its HF folder) with the adapter merged in, in eval mode.
    Raises FileNotFoundError when the base is not there, ValueError when the adapter does not fit the base."""
    import peft
    from safetensors.torch import load_file

    p = Path(path)
    with warnings.catch_warnings():  # a head is not in the base: it comes from the adapter (modules_to_save)
        warnings.filterwarnings("ignore", message=".*newly initialized")
        model = cls.from_pretrained(adapter_base(p), dtype=torch.float32)
    cfg = peft.LoraConfig.from_pretrained(str(p))
    cfg.fan_in_fan_out = False  # our projections are nn.Linear
    cfg.inference_mode = False
    model = peft.inject_adapter_in_model(cfg, model, adapter_name=ADAPTER_NAME)
    from peft.tuners.lora import LoraLayer

    ours = {_hf_module(model, n): n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    sd = {}
    for key, t in load_file(str(p / ADAPTER_WEIGHTS)).items():
        key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                module, _, rest = key.partition(part)
                key = ours.get(module, module) + part + rest
                break
        sd[key] = t
    result = peft.set_peft_model_state_dict(model, sd, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ADAPTER_NAME in k and (".lora_" in k or "modules_to_save" in k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{p} does not fit {type(model).__name__} of its base (missing {missing[:3]}, unexpected "
                         f"{list(result.unexpected_keys)[:3]}).")
    return merged_model(model).eval()


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_base",
    "adapter_state_dict",
    "base_folder",
    "base_model",
    "check_targets",
    "head_modules",
    "inject_like",
    "is_adapter_folder",
    "is_lora",
    "load_adapter_model",
    "lora_config",
    "merged_model",
    "run_meta",
    "save_adapter",
    "trainable_names",
    "trainable_only",
    "wrap",
]
