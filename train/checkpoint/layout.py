"""Checkpoint folders, read without torch or Lightning: the layout of `run_dir/checkpoints/step-N/` (train/checkpoint/io.py
describes the format and writes it), finding the newest complete one, what a run may resume, and the checks a
checkpoint must pass before any weights are loaded (its meta.json and config.json, the safetensors header); and
run_dir/config.yaml, the run's resolved config.

Everything here reads small files only, so train/run.py, train/cli/export.py and train/cli/generate.py refuse a bad
checkpoint or run dir in well under a second, before they import torch and Lightning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from train.config import ConfigError

log = logging.getLogger(__name__)

FORMAT = "gpt2-forge-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_NAME = "training_state.pt"
META_NAME = "meta.json"
SHARDED_DIR = "sharded"  # FSDP2's DCP shards of model + optimizer inside a step dir
ZERO_DIR = "checkpoint"  # DeepSpeed's partitions inside a step dir (the tag Lightning's DeepSpeedStrategy saves under)
LAST_NAME = "last"
# Checkpoint families: which training state a step dir holds, as meta.json's "strategy" names it (the values are what
# the checkpoints on disk already say). A strategy of the same family loads it with its engine's own loader; any other
# through the universal form (train/checkpoint/universal.py). Each StrategySpec names its family with one of these.
FULL_FAMILY = "full"  # one training_state.pt with the whole optimizer state (single device, DDP)
DCP_FAMILY = "fsdp"  # torch.distributed.checkpoint shards of model + optimizer under SHARDED_DIR (FSDP2)
ZERO_FAMILY = "deepspeed"  # DeepSpeed ZeRO partitions under ZERO_DIR
# The LightningModule holds the network as `self.model`, so Lightning's state-dict keys are "model.<our key>".
MODULE_PREFIX = "model."
# Extra checkpoint keys our LightningModule adds in on_save_checkpoint; they go to config.json / meta.json.
MODEL_CONFIG_KEY = "gpt2_config"
META_KEY = "gpt2_forge_meta"

BEST_NAME = "best"

_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial, corrupt or not ours; the message names the file and the fix."""


def publish_dir(tmp: Path, path: Path) -> Path:
    """Move a fully written folder `tmp` to `path` by rename, replacing an existing `path` as a whole.

    Readers see the old folder or the new one, never a mix: checkpoints, `checkpoints/best` and HF exports are all
    written into a temporary sibling first and published here.
    """
    tmp, path = Path(tmp), Path(path)
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    return path



# ------------------------------------------------------------------------------------------------ finding checkpoints
def write_config(run_dir: Path, cfg: Any, previous: Optional[dict[str, Any]] = None, rank: int = 0) -> dict[str, Any]:
    """run_dir/config.yaml (run_dir created if needed): the fully resolved config `cfg` (a structured config
    dataclass, train.config.Config), written before anything runs (tmp + replace). Returns it as plain containers:
    the hyper-parameters the loggers record. `previous`: the config of the checkpoint a run resumes (its meta.json's
    "config"); one log line lists the settings that differ from it (`config_changes`): each takes effect from the
    first resumed step (optim.*: train.module.apply_optim_config) or was refused by the up-front checks; only
    `rank` 0 (the launcher's rank of this process) says it, as every rank of a job runs this."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    node = OmegaConf.structured(cfg)
    tmp = run_dir / f"config.yaml.tmp-{os.getpid()}"
    tmp.write_text(OmegaConf.to_yaml(node, resolve=True))
    os.replace(tmp, run_dir / "config.yaml")
    hparams = OmegaConf.to_container(node, resolve=True)
    changed = config_changes(previous, hparams)
    if changed and rank == 0:
        log.info("resume: settings that differ from the checkpoint's: %s", "; ".join(changed))
    return hparams


# keys that name where a run is, not how it trains: never "changed" on resume
_RUN_PLACE_KEYS = ("run_dir", "resume")


def config_changes(old: Optional[dict[str, Any]], new: dict[str, Any]) -> list[str]:
    """The settings of `new` (a run's resolved config, plain containers) that differ from `old` (the config stored in
    the checkpoint it resumes: meta.json's "config"), as "key old -> new" in dotted keys; [] when `old` is None."""
    if not old:
        return []

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    before, after = flat(old), flat(new)
    keys = [k for k in after if k not in _RUN_PLACE_KEYS and before.get(k, "<unset>") != after[k]]
    return [f"{k} {before.get(k, '<unset>')} -> {after[k]}" for k in keys]


def check_same_optimizer(step_path: Path, meta: dict[str, Any], optim_name: str) -> None:
    """Refuse to resume optimizer state that another `optim` option wrote (adamw <-> muon: other parameter groups,
    other moments), in one sentence; meta: the checkpoint's meta.json (its "config" says what wrote it)."""
    saved = ((meta.get("config") or {}).get("optim") or {}).get("name")
    if saved and saved != optim_name:
        raise ConfigError(
            f"checkpoint {step_path} holds optim={saved} state and cannot be resumed with optim={optim_name}; resume "
            f"with optim={saved}, or start a new run_dir with model.init_from={step_path}."
        )


def check_same_peft(peft_cfg: Any, init_dir: Optional[Path], resume_from: Optional[Path], meta: dict) -> None:
    """Refuse, with one sentence, a LoRA setting the run dir or the base already show cannot work: a model.init_from
    that is a LoRA checkpoint (its weights are adapters only; its run's hf/ is the merged model), or a resume whose
    checkpoint was written with another peft method or adapter shape (`meta`: its meta.json). Reads small files only.
    Raises ConfigError."""
    if init_dir is not None and not is_hf_folder(init_dir):
        if read_meta(resolve_checkpoint(init_dir)).get("peft"):
            raise ConfigError(f"model.init_from={init_dir} holds LoRA adapters, not a base model; start from its "
                              f"merged model (the run's hf/ folder) or from the base it names.")
    if resume_from is None:
        return
    saved = meta.get("peft") or {"method": "none"}
    if saved["method"] != peft_cfg.method:
        raise ConfigError(f"checkpoint {resume_from} was trained with peft={saved['method']} and cannot be resumed "
                          f"with peft={peft_cfg.method}; resume with peft={saved['method']}, or start a new run_dir.")
    if peft_cfg.method == "lora":
        now = {"r": peft_cfg.r, "target_modules": sorted(peft_cfg.target_modules)}
        was = {k: saved.get(k) for k in now}
        if now != was:
            raise ConfigError(f"checkpoint {resume_from} holds adapters of peft.r={was['r']} on "
                              f"{was['target_modules']}, not peft.r={now['r']} on {now['target_modules']}; resume with "
                              f"the checkpoint's peft settings, or start a new run_dir.")


def family_of(meta: dict[str, Any]) -> str:
    """The checkpoint family (FULL_FAMILY, DCP_FAMILY, ZERO_FAMILY) of the checkpoint whose meta.json is `meta`."""
    return meta.get("strategy") or FULL_FAMILY


def read_meta(step_dir: Path) -> dict[str, Any]:
    step_dir = Path(step_dir)
    f = step_dir / META_NAME
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint {step_dir} does not exist or is not a folder.")
    if not f.is_file():
        raise CheckpointError(
            f"{step_dir} is not a gpt2-forge checkpoint ({META_NAME} missing); "
            f"pass a run_dir/checkpoints/step-N folder or a run dir."
        )
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt.") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{step_dir} is not a gpt2-forge checkpoint (format={meta.get('format')!r}).")
    return meta


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in run_dir, oldest first (partial `*.tmp-*` folders are not listed)."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META_NAME).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove folders a crashed save left behind (`step-N.tmp-<pid>`, `step-N.old-<pid>`)."""
    d = checkpoints_dir(run_dir)
    removed = []
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def write_last(run_dir: Path, step_path: Path) -> None:
    d = checkpoints_dir(run_dir)
    tmp = d / f"{LAST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(Path(step_path).name + "\n")
    os.replace(tmp, d / LAST_NAME)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint: the `last` pointer if it names one, else the highest complete step dir."""
    d = checkpoints_dir(run_dir)
    last = d / LAST_NAME
    if last.is_file():
        p = d / last.read_text().strip()
        if _STEP_RE.match(p.name) and (p / META_NAME).is_file():
            # a newer complete step dir can exist if the process died between rename and pointer update
            newer = list_checkpoints(run_dir)
            return newer[-1] if newer and _step_of(newer[-1]) > _step_of(p) else p
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _step_of(p: Path) -> int:
    m = _STEP_RE.match(Path(p).name)
    return int(m.group(1)) if m else -1


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step dir, or a run dir (-> its newest complete checkpoint), or a checkpoints/ dir."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist.")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file, not a folder; pass a run dir or one of its checkpoints/step-N folders.")
    if (p / META_NAME).is_file():
        read_meta(p)
        return p
    if p.name == "checkpoints":
        p = p.parent
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointError(
            f"{p} holds no complete checkpoint (looked for {checkpoints_dir(p)}/step-N/{META_NAME})."
        )
    return found


def retain(run_dir: Path, keep_last: int, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all); `protect`ed dirs are never deleted."""
    if keep_last <= 0:
        return []
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-keep_last:]) | {Path(p).resolve() for p in protect if p}
    removed = []
    for p in ckpts[:-keep_last]:
        if p.resolve() in keep or p in keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def tokenizer_dir_for(step_path: Path) -> Optional[Path]:
    """Where a checkpoint's tokenizer lives: meta.json's `tokenizer_dir` (relative to the step dir) or run_dir/tokenizer."""
    step_path = Path(step_path)
    candidates = []
    try:
        rel = read_meta(step_path).get("tokenizer_dir")
        if rel:
            candidates.append((step_path / rel).resolve())
    except CheckpointError:
        pass
    candidates += [step_path / "tokenizer", step_path.parent.parent / "tokenizer"]
    for c in candidates:
        if (c / "tokenizer.json").is_file() or (c / "vocab.json").is_file():
            return c
    return None


def load_model_config_dict(step_path: Path) -> dict[str, Any]:
    f = Path(step_path) / CONFIG_NAME
    if not f.is_file():
        raise CheckpointError(f"{f} is missing; the checkpoint is incomplete.")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt.") from e


# ------------------------------------------------------------------------------------------------ model.init_from
def init_source(init_from: str, revision: Optional[str] = None, label: Optional[str] = None) -> Path:
    """The folder `model.init_from` (or a command's model argument) names: a local HF folder, checkpoint or run dir
    as it is; else a hub id's snapshot folder in the huggingface_hub cache, fetched (config, weights, tokenizer files)
    at `revision` (None: main) as `from_pretrained` does (gpt2.hub.resolve_model_dir). A folder of the hub id's name
    that holds none of those (e.g. the package folder `gpt2/` seen from the repository root) does not shadow the hub
    id. `label`: how messages name the input (default "model.init_from=<init_from>").

    Raises FileNotFoundError in one sentence: a local path that does not exist, a hub id that could not be fetched
    (naming HF_HUB_OFFLINE and the cache), or a revision given for a local folder.
    """
    from gpt2 import hub  # torch-free: os, re and (for hub ids) huggingface_hub

    label = label or f"model.init_from={init_from}"
    src = Path(init_from).expanduser()
    local = src.is_file() or any((src / name).is_file() for name in ("config.json", "adapter_config.json", META_NAME)) \
        or src.name == "checkpoints" or checkpoints_dir(src).is_dir()  # adapter_config.json: a PEFT adapter folder
    if not local and hub.is_hub_id(init_from):
        try:
            return Path(hub.resolve_model_dir(init_from, revision=revision))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{label}: {e}") from None
    if revision is not None:
        raise FileNotFoundError(
            f"model.revision={revision} is a hub revision, but model.init_from={init_from} is a local folder; drop "
            f"model.revision (or name the hub id)."
        )
    if not src.exists():
        raise FileNotFoundError(f"{label} does not exist; give an HF folder, a checkpoint, a run dir or a hub id.")
    return src


def hub_commit(folder: Path) -> Optional[str]:
    """The commit hash of a huggingface_hub snapshot folder (<cache>/models--org--name/snapshots/<commit>), else
    None (a local folder)."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.name
    return None


def is_hf_folder(src: Path) -> bool:
    """An HF model folder (config.json, no meta.json) rather than one of our checkpoints or run dirs."""
    return (src / "config.json").is_file() and not (src / META_NAME).is_file()



def tokenizer_source(tokenizer: Optional[str], init_dir: Optional[Path], resume_from: Optional[Path]) -> Optional[str]:
    """The tokenizer a run uses: `data.tokenizer` when set, else the one of the checkpoint it resumes, else the one
    that came with model.init_from (`init_dir`, what `init_source` resolved: an HF folder's or hub snapshot's own
    tokenizer files, or a checkpoint's / run dir's tokenizer/ folder): the ids index the embedding table of those
    weights, so a fine-tune keeps it, and a resume onto another corpus encodes it with the checkpoint's tokenizer (a
    BPE trained on the new corpus would give other ids). None: train (or reuse the cached) BPE on the data source.
    (The token cache is keyed by the tokenizer's content, so the same BPE given as a folder reuses the cached files.)

    A data.tokenizer that is a hub id and no local tokenizer folder is fetched here (gpt2.hub.resolve_tokenizer_dir:
    into the huggingface_hub cache, where the data pipeline then finds it), so an unreachable one ends the run
    before anything is built. Raises FileNotFoundError in one sentence.
    """
    if tokenizer:
        from gpt2 import hub  # torch-free

        if not hub.holds_tokenizer(Path(tokenizer).expanduser()) and hub.is_hub_id(tokenizer):
            try:
                hub.resolve_tokenizer_dir(tokenizer)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"data.tokenizer={tokenizer}: {e}") from None
        return tokenizer
    if resume_from is not None:
        d = tokenizer_dir_for(resume_from)
        return str(d) if d else None
    if init_dir is not None:
        if (init_dir / "tokenizer.json").is_file() or (init_dir / "vocab.json").is_file():
            return str(init_dir)
        if init_dir.exists():
            d = tokenizer_dir_for(resolve_checkpoint(init_dir))
            return str(d) if d else None
    return None


# ------------------------------------------------------------------------------------------------ resuming
def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """The checkpoint a run continues from (`resume`: null | auto | <step dir or run dir>), or None for a fresh start.

    resume=auto: the newest complete checkpoint of run_dir, or None (a fresh start) when it holds none. A fresh start
    (resume=null) in a run_dir that already holds checkpoints is refused (it would mix two runs); resume=<path> that
    does not exist or holds no checkpoint is refused. Partial folders a crashed save left behind are removed first.
    Raises ConfigError / CheckpointError naming the fix.
    """
    if resume is None:
        existing = list_checkpoints(run_dir)
        if existing:
            raise ConfigError(
                f"run_dir={run_dir} already holds checkpoints (newest {existing[-1].name}); pass resume=auto to "
                f"continue that run or choose another run_dir."
            )
        return None
    clean_partial(run_dir)
    if resume == "auto":
        # None: nothing to continue, a fresh start (litgpt's resume="auto", Lightning's ckpt_path="last"), so the
        # one command a restarting launcher repeats (torchrun --max-restarts, a requeued job) is valid from step 0
        return latest_checkpoint(run_dir)
    return resolve_checkpoint(resume)


def model_shape(model_cfg) -> dict[str, Any]:
    """The shape fields a `model` config group fixes before any data is read (vocab_size only when it is set): what
    `check_compatible` compares against a checkpoint before torch is imported."""
    shape = {k: getattr(model_cfg, k) for k in ("n_positions", "n_embd", "n_layer", "n_head", "n_inner")}
    if model_cfg.vocab_size is not None:
        shape["vocab_size"] = model_cfg.vocab_size
    return shape


def check_compatible(step_path: Path, meta: dict[str, Any], model_config, model_class: Optional[str] = None,
                     compared: Sequence[str] = ()) -> None:
    """A checkpoint of another model size or task head fails here with the difference named, not deep in
    load_state_dict.

    Args:
        step_path: the checkpoint; meta: its meta.json (`read_meta`, read once by the caller).
        model_config: what this run builds: a GPT2Config, or a dict of some of its shape fields (`model_shape`:
            the fields the config fixes, checked before the tokenizer is known); fields it lacks are not compared.
        model_class: the class name this run builds (meta.json "task" names the checkpoint's).
        compared: shape fields an earlier call compared already (the training job checks the config's shape before
            torch is imported, then the built model's other fields); they are not compared again.
    Raises:
        ConfigError: naming the field, both values and the fix.
    """
    fields = model_config if isinstance(model_config, dict) else vars(model_config)
    fields = {k: v for k, v in fields.items() if k not in compared}
    saved_task = meta.get("task")
    if model_class and saved_task and saved_task != model_class:
        raise ConfigError(
            f"checkpoint {step_path} holds a {saved_task} (another task head), but this run builds a {model_class}; "
            f"resume with the task it was trained with, or start a new run_dir with model.init_from={step_path}."
        )
    saved = load_model_config_dict(step_path)
    n_saved = saved.get("num_labels", len(saved["id2label"]) if isinstance(saved.get("id2label"), dict) else None)
    if n_saved is not None and n_saved != fields.get("num_labels", n_saved):
        raise ConfigError(
            f"checkpoint {step_path} has a head of num_labels={n_saved}, but this run builds "
            f"num_labels={fields['num_labels']}; resume with the same task settings."
        )
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings"):
        if key in saved and key in fields and saved[key] != fields[key]:
            raise ConfigError(
                f"checkpoint {step_path} was written by a model with {key}={saved[key]}, but this run builds "
                f"{key}={fields[key]}; resume with the same model settings."
            )


# ------------------------------------------------------------------------------------------------ checkpoints/best
def best_dir(run_dir: str | os.PathLike) -> Path:
    """run_dir/checkpoints/best: a fine-tuning task's model at the best value of its monitored metric."""
    return checkpoints_dir(Path(run_dir)) / BEST_NAME



# ------------------------------------------------------------------------------------------------ weights
def corrupt_weights_error(path: Path, err: BaseException) -> CheckpointError:
    """The one sentence for a weights file safetensors cannot read (truncated, garbage, not safetensors)."""
    return CheckpointError(f"{path} is not a readable safetensors file ({err}); the checkpoint is corrupt.")


def check_weights_file(path: Path) -> None:
    """Refuse a missing `model.safetensors` or one whose header safetensors cannot parse, without loading a tensor.

    Reads only the 8-byte length and the JSON header (safetensors' `safe_open`, numpy framework: no torch import),
    so a corrupt checkpoint is named before a run or an export imports torch + Lightning. Raises CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete.")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for truncated / garbage headers
        raise corrupt_weights_error(path, e) from e
