"""Hugging Face folders in and out: `export_hf` writes one from a trained model (`python train/cli/export.py` and
the end of every run), `load_for_export` / `load_model_and_tokenizer` read a checkpoint, run dir or HF folder back.

The folder holds config.json, model.safetensors (HF key names and Conv1D layout, via gpt2's save_pretrained),
the tokenizer files and generation_config.json, and works as it is in transformers: the Auto* classes and the
text-generation / text-classification / token-classification pipelines load it without a warning, batch it
(the tokenizer carries the pad token config.json names), truncate at the model's context (model_max_length =
n_positions), and `generate(max_new_tokens=...)` does not warn. It is written into a temporary folder next to
<out-dir> and renamed into place, so an interrupted export leaves no half folder.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

HF_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json")


def generation_config(model_config: Any, pad_token_id: Optional[int]) -> dict[str, Any]:
    """generation_config.json: only the special-token ids, as OpenAI's gpt2 folder on the hub has them.

    No max_length (transformers warns on every generate(max_new_tokens=...) when a folder sets it) and no do_sample
    (transformers counts do_sample=false as set, which turns off its text-generation pipeline's sampling default):
    generate() and the pipeline keep transformers' own defaults.
    """
    return {
        "bos_token_id": model_config.bos_token_id,
        "eos_token_id": model_config.eos_token_id,
        "pad_token_id": pad_token_id,
    }


def pad_token_id_for(model_config: Any, tokenizer: Any = None) -> Optional[int]:
    """The pad token of the export's tokenizer and generation_config.json: config.json's pad_token_id (a fine-tuned
    head was trained with it and finds each row's last token by it), else the tokenizer's, else eos (GPT-2 has no pad
    token; padding with <|endoftext|> is what the HF docs advise).

    config.json itself is left as the model has it: an LM's stays without pad_token_id, because transformers warns
    about "padded input_ids without an attention_mask" on every forward whose first or last id is config.json's pad
    token, and eos is both (lm-evaluation-harness' hf backend calls the model so).
    """
    for pad in (model_config.pad_token_id, getattr(tokenizer, "pad_token_id", None), model_config.eos_token_id):
        if pad is not None:
            return int(pad)
    return None


def export_tokenizer(tokenizer: Any, model_config: Any, pad_token_id: Optional[int]) -> Any:
    """A copy of the run's tokenizer made for transformers: its pad token is config.json's pad_token_id (so
    `tokenizer(texts, padding=True)` and the pipelines' batching work) and model_max_length is n_positions (so
    truncation=True cuts at the model's context). The run's own tokenizer is left as it is."""
    tok = copy.deepcopy(tokenizer)
    if pad_token_id is not None and tok.pad_token_id != pad_token_id:
        tok.pad_token_id = pad_token_id
    tok.model_max_length = int(model_config.n_positions)
    return tok


# Everything an export writes (the model's save_pretrained, the tokenizer's, generation_config.json): a folder holding
# anything else (a training checkpoint's meta.json / training_state.pt, a user's notes or eval results) is not one.
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                          "merges.txt", "added_tokens.json", "chat_template.jinja"})
# the shard names gpt2.hf_io.save_pretrained writes (and removes before a save); spelled here, not imported from
# there, because check_export_dir runs before torch is imported
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# train/cli/evaluate.py's results for an HF folder outside a run: <hf-dir>/eval/<timestamp>.json. Part of an export:
# a new export into the folder keeps them (a record of results over time, as a run dir's eval/ holds every step's)
EVAL_DIR = "eval"


def is_hf_export(d: Path) -> bool:
    """Whether folder `d` is an earlier export that a new one may replace without --force: it has config.json and
    weights, and nothing but the files an export writes and an eval/ folder of evaluation results."""
    if not ((d / "config.json").is_file() and any((d / m).is_file() for m in HF_MARKERS[1:])):
        return False
    return all((p.is_file() and (p.name in EXPORT_FILES or _SHARD.fullmatch(p.name)))
               or (p.name == EVAL_DIR and p.is_dir()) for p in d.iterdir())


def check_export_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The export folder as a Path, or FileExistsError when writing there would replace something that is not an
    earlier HF export (a file, or a non-empty folder without overwrite=True / --force). Reads the folder only."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file; choose another output folder.")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or is_hf_export(out)):
        raise FileExistsError(
            f"{out} is not empty and holds no earlier export; choose an empty folder or pass --force to replace it."
        )
    return out


def export_hf(model: Any, tokenizer: Any, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` (+ tokenizer) as an HF folder at out_dir, atomically (tmp folder + rename).

    An existing out_dir is replaced only when it is an earlier HF export (or empty), or with overwrite=True; its
    eval/ folder of evaluation results is kept.
    """
    out = check_export_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    from train.checkpoint.layout import publish_dir

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        was_training = model.training
        model.eval()
        model.save_pretrained(str(tmp))
        model.train(was_training)
        pad = pad_token_id_for(model.config, tokenizer)
        if tokenizer is not None:
            export_tokenizer(tokenizer, model.config, pad).save_pretrained(str(tmp))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(model.config, pad), indent=2) + "\n")
        if (out / EVAL_DIR).is_dir():  # the evaluation results kept in the folder stay with it (EVAL_DIR)
            shutil.copytree(out / EVAL_DIR, tmp / EVAL_DIR)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _clean_stale(out: Path) -> None:
    """Remove `.<out>.tmp-<pid>` / `.old-<pid>` folders an export killed mid-write left (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and p.is_dir() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_for_export(src: str | os.PathLike):
    """(model, tokenizer, step_dir) from a checkpoint step dir or a run dir (-> its newest complete checkpoint)."""
    from train.checkpoint.layout import (
        WEIGHTS_NAME,
        CheckpointError,
        check_weights_file,
        resolve_checkpoint,
        tokenizer_dir_for,
    )

    # what the folder shows is checked before torch and Lightning are imported (~5 s)
    step = resolve_checkpoint(src)
    check_weights_file(step / WEIGHTS_NAME)
    tok_dir: Optional[Path] = tokenizer_dir_for(step)
    if tok_dir is None:
        raise CheckpointError(
            f"no tokenizer found for {step} (looked in its run dir's tokenizer/ folder); copy the run's tokenizer/ "
            f"folder next to checkpoints/."
        )
    from gpt2 import GPT2TokenizerFast

    from train.tasks.model import load_checkpoint_model

    model = load_checkpoint_model(step)
    return model, GPT2TokenizerFast.from_pretrained(str(tok_dir)), step


def load_adapter_and_tokenizer(folder: Path):
    """(merged LM, tokenizer) of a PEFT LoRA adapter folder: the base model its adapter_config.json names, the adapter
    merged in (train.adapters.lora.load_adapter_model); the tokenizer files of the folder, else of its base, else of
    the run dir it sits in. Raises FileNotFoundError (base or tokenizer missing)."""
    from gpt2 import GPT2LMHeadModel, GPT2TokenizerFast

    from train.adapters.lora import adapter_base, load_adapter_model

    base = Path(adapter_base(folder))
    for d in (folder, base, folder.parent / "tokenizer"):
        if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file():
            return load_adapter_model(folder, GPT2LMHeadModel), GPT2TokenizerFast.from_pretrained(str(d))
    raise FileNotFoundError(f"no tokenizer files next to {folder} or its base {base}.")


def not_a_language_model(where: Any, what: str, note: str = "a fine-tuned task head") -> ValueError:
    """The one sentence for a model generate / evaluate cannot use: `where` holds `what` (`note`)."""
    return ValueError(f"{where} holds a {what} ({note}), not a language model; generate and evaluate take an LM "
                      f"run's hf/ or adapter/ folder, a checkpoint or a run dir.")


def load_model_and_tokenizer(src: str | os.PathLike):
    """(LM, tokenizer) of an HF folder (config.json + weights + tokenizer files), a PEFT LoRA adapter folder
    (adapter_config.json: its base model with the adapter merged in), a hub id (fetched into, or read from, the
    huggingface_hub cache), or a checkpoint / run dir of ours. Raises FileNotFoundError / ValueError /
    CheckpointError in one sentence (nothing there, no tokenizer files, a task head that does not generate)."""
    from train.checkpoint.layout import init_source

    p = init_source(str(src), label=str(src))
    if (p / "adapter_config.json").is_file():  # a PEFT adapter folder (a LoRA run's adapter/): on its base
        head = json.loads((p / "adapter_config.json").read_text()).get("modules_to_save") or []
        if head:  # a fine-tune's adapter: its head (score, classifier, ...) trained in full beside the adapters
            raise not_a_language_model(p, "LoRA adapter", f"with the fine-tuned task head {', '.join(head)}")
        return load_adapter_and_tokenizer(p)
    if (p / "config.json").is_file() and not (p / "meta.json").is_file():
        if not ((p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()):
            raise FileNotFoundError(f"{p} has no tokenizer files (tokenizer.json or vocab.json + merges.txt).")
        heads = json.loads((p / "config.json").read_text()).get("architectures") or []
        if heads and not any(h.endswith(("LMHeadModel", "ForCausalLM")) for h in heads):  # e.g. a cls export
            raise not_a_language_model(p, heads[0])
        import torch

        from gpt2 import GPT2LMHeadModel, GPT2TokenizerFast

        return GPT2LMHeadModel.from_pretrained(str(p), dtype=torch.float32), GPT2TokenizerFast.from_pretrained(str(p))
    from train.checkpoint.export import load_for_export

    model, tok, step = load_for_export(p)  # checks the folder before it imports torch
    from gpt2 import GPT2LMHeadModel

    if not isinstance(model, GPT2LMHeadModel):
        raise not_a_language_model(step, type(model).__name__)
    return model, tok
