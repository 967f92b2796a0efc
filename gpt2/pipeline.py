"""`gpt2.pipeline("text-generation", model=dir)`: the Hugging Face GPT-2 page's first example, on our classes.

    pipe = gpt2.pipeline("text-generation", model="path/to/folder", dtype="auto")
    pipe("Plants create energy through a process known as photosynthesis.")  # -> [{"generated_text": "..."}]
"""

from __future__ import annotations

import json
import os

import torch

from .hub import resolve_model_dir
from .modeling import GPT2LMHeadModel

# transformers' TextGenerationPipeline defaults (pipelines/text_generation.py, _default_generation_config);
# a generation_config.json in the model folder overrides them, call arguments override both.
_PIPELINE_DEFAULTS = dict(max_new_tokens=256, do_sample=True, temperature=0.7)
_GENERATE_KEYS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                  "pad_token_id")


def _merge(base: dict, layer: dict) -> dict:
    """Overlay generation settings; a layer that names max_length but not max_new_tokens replaces the latter."""
    out = dict(base)
    if layer.get("max_length") is not None and layer.get("max_new_tokens") is None:
        out.pop("max_new_tokens", None)
    out.update({k: v for k, v in layer.items() if k in _GENERATE_KEYS})
    return out


class TextGenerationPipeline:
    def __init__(self, model: GPT2LMHeadModel, tokenizer, generation_defaults: dict | None = None, device=None):
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(device) if device is not None else model.device
        self.model.to(self.device).eval()
        self.generation_defaults = _merge(_PIPELINE_DEFAULTS, generation_defaults or {})

    def __call__(self, text_inputs: str | list[str], return_full_text: bool = True, num_return_sequences: int = 1,
                 seed: int | None = None, **generate_kwargs):
        unknown = set(generate_kwargs) - set(_GENERATE_KEYS)
        if unknown:
            raise TypeError(f"unknown generation arguments {sorted(unknown)}; accepted: {', '.join(_GENERATE_KEYS)}.")
        single = isinstance(text_inputs, str)
        texts = [text_inputs] if single else list(text_inputs)
        kwargs = _merge(self.generation_defaults, generate_kwargs)
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None

        results = []
        for text in texts:
            ids = torch.tensor([self.tokenizer.encode(text)] * num_return_sequences, device=self.device)
            if ids.size(1) == 0:
                raise ValueError("text-generation pipeline: the prompt is empty; pass some text.")
            call = dict(kwargs)
            if call.get("max_new_tokens") is not None:  # never run past the context window
                call["max_new_tokens"] = min(call["max_new_tokens"], self.model.config.n_positions - ids.size(1))
            out = self.model.generate(ids, generator=generator, **call)
            rows = []
            for seq in out:
                new = self.tokenizer.decode(seq[ids.size(1):].tolist(), skip_special_tokens=True)
                rows.append({"generated_text": text + new if return_full_text else new})
            results.append(rows)
        return results[0] if single else results


def pipeline(task: str, model, tokenizer=None, dtype="auto", device=None, **model_kwargs) -> TextGenerationPipeline:
    """Build a text-generation pipeline from a folder / hub id (model + tokenizer files) or from objects."""
    if task != "text-generation":
        raise ValueError(f"gpt2.pipeline supports only task='text-generation', got {task!r}.")
    defaults = {}
    if isinstance(model, (str, os.PathLike)):
        folder = resolve_model_dir(model)
        gen_file = os.path.join(folder, "generation_config.json")
        if os.path.isfile(gen_file):
            with open(gen_file, encoding="utf-8") as f:
                defaults = {k: v for k, v in json.load(f).items() if k in _GENERATE_KEYS}
        if tokenizer is None:
            tokenizer = folder
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype, **model_kwargs)
    if isinstance(tokenizer, (str, os.PathLike)):
        from .tokenizer import GPT2TokenizerFast

        tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer)
    if tokenizer is None:
        raise ValueError("pipeline(model=<model object>) also needs tokenizer=<GPT2TokenizerFast or folder>.")
    return TextGenerationPipeline(model, tokenizer, defaults, device=device)
