"""`gpt2.pipeline("text-generation", model=dir)`: transformers 5.24's TextGenerationPipeline on our classes.

    pipe = gpt2.pipeline("text-generation", model="path/to/folder", dtype="auto")
    pipe("Plants create energy through a process known as photosynthesis.")  # -> [{"generated_text": "..."}]

Same arguments, defaults and results as transformers' (pipelines/text_generation.py + pipelines/base.py):
  * generation defaults max_new_tokens=256, do_sample=True, temperature=0.7 apply to the settings that neither the call
    nor the model's generation_config.json sets (the sampling ones only when sampling), and the tokenizer's pad token
    is the pad_token_id; a call's generation arguments go to `generate` (gpt2/generation.py), as do those given to
    `pipeline(...)` itself, for every call;
  * a str gives [{"generated_text": ...}, ...] (num_return_sequences dicts); a list gives one such list per prompt;
    each prompt is tokenized on its own; batch_size > 1 left-pads groups of prompts (the tokenizer is switched to left
    padding, as transformers does) and needs a pad token;
  * return_full_text (default True: prompt + continuation), return_text / return_tensors ({"generated_token_ids"}),
    prefix, skip_special_tokens (default True), clean_up_tokenization_spaces, handle_long_generation="hole",
    add_special_tokens / truncation / padding / max_length / tokenizer_encode_kwargs for the tokenizer.
Chats (lists of {"role", "content"} messages), stop_sequence and assistant models raise one sentence: they need chat
templates / stop strings / assisted decoding, which gpt2 does not implement. `seed=` (ours) seeds the sampling.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from .generation import GLOBAL_DEFAULTS, NO_EFFECT, SUPPORTED
from .hub import resolve_model_dir
from .modeling import GPT2LMHeadModel

# transformers' TextGenerationPipeline._default_generation_config
_PIPELINE_DEFAULTS = dict(max_new_tokens=256, do_sample=True, temperature=0.7)
_SAMPLING_PARAMS = {"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"}
_GENERATE_KEYS = SUPPORTED | set(NO_EFFECT) | {"generation_config"}
_TOKENIZER_KEYS = ("add_special_tokens", "truncation", "padding", "max_length")
_POSTPROCESS_KEYS = ("return_full_text", "return_text", "return_tensors", "return_type", "clean_up_tokenization_spaces",
                     "skip_special_tokens")
_NOT_SUPPORTED = {
    "stop_sequence": "stop strings",
    "continue_final_message": "chat templates",
    "tools": "chat templates",
    "documents": "chat templates",
    "assistant_model": "assisted decoding",
    "assistant_tokenizer": "assisted decoding",
}


class TextGenerationPipeline:
    """transformers' TextGenerationPipeline for a GPT2LMHeadModel and a GPT2TokenizerFast (see the module docstring).

    Call with a prompt (str) or prompts (list of str); returns a list of {"generated_text": str} dicts per prompt
    ({"generated_token_ids": list[int]} with return_tensors=True).
    """

    def __init__(self, model: GPT2LMHeadModel, tokenizer, device: Any = None, batch_size: int | None = None,
                 **kwargs: Any):
        self.model, self.tokenizer = model, tokenizer
        if device is not None:
            self.device = torch.device("cpu" if device == -1 else f"cuda:{device}" if isinstance(device, int) else device)
            self.model.to(self.device)
        else:
            self.device = model.device
        self.model.eval()
        if tokenizer.padding_side == "right":  # decoder-only models need left padding for batched generation
            tokenizer.padding_side = "left"
        self.batch_size = batch_size
        self._generate_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _GENERATE_KEYS}
        self._call_kwargs = kwargs  # pipeline parameters given at construction apply to every call
        self._check(kwargs)

    @staticmethod
    def _check(kwargs: Mapping[str, Any]) -> None:
        for key in kwargs:
            if key in _NOT_SUPPORTED:
                raise ValueError(f"{key} needs {_NOT_SUPPORTED[key]}, which gpt2's pipeline does not implement; use "
                                 f"transformers' pipeline for it.")
            allowed = {*_TOKENIZER_KEYS, *_POSTPROCESS_KEYS, "prefix", "handle_long_generation",
                       "tokenizer_encode_kwargs", "seed", "num_workers", "batch_size"}
            if key not in allowed and key not in _GENERATE_KEYS:
                raise TypeError(f"text-generation pipeline got an unknown argument {key!r}; it takes generate's "
                                f"arguments and {', '.join(sorted(allowed))}.")

    def __call__(self, text_inputs: str | list[str], batch_size: int | None = None, num_workers: int | None = None,
                 seed: int | None = None, **kwargs: Any) -> list:
        kwargs = {**self._call_kwargs, **kwargs}
        self._check(kwargs)
        seed = kwargs.pop("seed", None) if seed is None else seed
        kwargs.pop("seed", None)
        kwargs.pop("num_workers", None)  # DataLoader workers in transformers: the results do not depend on them
        if isinstance(text_inputs, Mapping) or (isinstance(text_inputs, (list, tuple)) and text_inputs
                                                and isinstance(text_inputs[0], (Mapping, list, tuple))):
            raise ValueError("chat inputs (lists of {'role', 'content'} messages) need a chat template, which gpt2's "
                             "pipeline does not implement; pass the prompt text as a str.")
        single = isinstance(text_inputs, str)
        texts = [text_inputs] if single else list(text_inputs)
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("text-generation pipeline takes a str or a list of str")
        post = self._postprocess_params(kwargs)
        tok_kwargs = {k: kwargs.pop(k) for k in _TOKENIZER_KEYS if k in kwargs}
        tok_kwargs = {k: v for k, v in tok_kwargs.items() if v is not None}  # None: the tokenizer's default
        tok_kwargs.update(kwargs.pop("tokenizer_encode_kwargs", None) or {})
        if "max_length" in tok_kwargs:  # transformers hands max_length to both the tokenizer and generate
            kwargs["max_length"] = tok_kwargs["max_length"]
        prefix = kwargs.pop("prefix", None) or ""
        hole = kwargs.pop("handle_long_generation", None)
        if hole not in (None, "hole"):
            raise ValueError(f"handle_long_generation={hole!r} is not a strategy; use None or 'hole'.")
        gen_kwargs = self._generate_args({k: v for k, v in kwargs.items() if k in _GENERATE_KEYS})
        if prefix:  # a total length has to include the prefix (transformers' _forward)
            n_prefix = len(self.tokenizer(prefix, padding=False, add_special_tokens=tok_kwargs.get(
                "add_special_tokens", False))["input_ids"])
            set_params = {**self.model.generation_config.to_dict(), **gen_kwargs}
            for length, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
                if length in set_params and new not in set_params:
                    gen_kwargs[length] = set_params[length] + n_prefix
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None

        encoded = [self._preprocess(prefix + t, tok_kwargs, hole, gen_kwargs) for t in texts]
        size = batch_size if batch_size is not None else (self.batch_size or 1)
        if size > 1 and len(encoded) > 1 and self.tokenizer.pad_token_id is None:
            raise ValueError("Pipeline with tokenizer without pad_token cannot do batching. You can try to set it with "
                             "`pipe.tokenizer.pad_token_id = model.config.eos_token_id`.")
        results = []
        for start in range(0, len(encoded), size):
            group = encoded[start: start + size]
            results += self._generate_group(group, texts[start: start + size], gen_kwargs, generator, post)
        return results[0] if single else results

    def _postprocess_params(self, kwargs: dict) -> dict:
        """transformers' _sanitize_parameters for the output: FULL_TEXT by default."""
        full, text, tensors = (kwargs.pop(k, None) for k in ("return_full_text", "return_text", "return_tensors"))
        kind = kwargs.pop("return_type", None)
        if kind is None and full is not None:
            if text is not None:
                raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
            if tensors is not None:
                raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
            kind = "full_text" if full else "new_text"
        if kind is None and tensors is not None:
            if text is not None:
                raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
            kind = "tensors"
        kind = getattr(kind, "name", kind)  # transformers' ReturnType enum
        kind = {"FULL_TEXT": "full_text", "NEW_TEXT": "new_text", "TENSORS": "tensors"}.get(kind, kind) or "full_text"
        skip = kwargs.pop("skip_special_tokens", None)
        return dict(kind=kind, skip_special_tokens=True if skip is None else skip,
                    clean_up_tokenization_spaces=kwargs.pop("clean_up_tokenization_spaces", None))

    def _generate_args(self, call: dict) -> dict:
        """transformers' Pipeline._prepare_generate_kwargs: the call's arguments over those given at construction,
        plus the pipeline defaults for what neither they nor the model's generation config set."""
        generate_kwargs = call if "generation_config" in call else {**self._generate_kwargs, **call}
        set_params = dict(self.model.generation_config.to_dict())
        if generate_kwargs.get("generation_config") is not None:
            gc = generate_kwargs["generation_config"]
            set_params.update(gc.to_dict() if hasattr(gc, "to_dict") else dict(gc))
        set_params.update(generate_kwargs)
        defaults = dict(_PIPELINE_DEFAULTS)
        if self.tokenizer.pad_token_id is not None:
            defaults["pad_token_id"] = self.tokenizer.pad_token_id
        added = {k: v for k, v in defaults.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in _SAMPLING_PARAMS}
        return {**generate_kwargs, **added}

    def _preprocess(self, prompt: str, tok_kwargs: dict, hole: str | None, gen_kwargs: dict) -> dict:
        inputs = self.tokenizer(prompt, return_tensors="pt", **tok_kwargs)
        if hole == "hole":  # keep the prompt's tail so that prompt + new tokens fit model_max_length
            cur = inputs["input_ids"].shape[-1]
            new = gen_kwargs.get("max_new_tokens")
            if new is None:
                new = {**GLOBAL_DEFAULTS, **self.model.generation_config.to_dict(), **gen_kwargs}["max_length"] - cur
                if new < 0:
                    raise ValueError("We cannot infer how many new tokens are expected")
            if cur + new > self.tokenizer.model_max_length:
                keep = self.tokenizer.model_max_length - new
                if keep <= 0:
                    raise ValueError("We cannot use `hole` to handle this generation the number of desired tokens "
                                     "exceeds the models max length")
                inputs = {k: v[:, -keep:] for k, v in inputs.items()}
        return {"input_ids": inputs["input_ids"][0].tolist(), "attention_mask": inputs["attention_mask"][0].tolist()}

    def _generate_group(self, group: list[dict], prompts: list[str], gen_kwargs: dict, generator, post: dict) -> list:
        if len(group) == 1:
            ids = torch.tensor([group[0]["input_ids"]], dtype=torch.long)
            mask = torch.tensor([group[0]["attention_mask"]], dtype=torch.long)
        else:  # transformers' pad_collate_fn: pad to the longest with the pad token, on the tokenizer's side
            padded = self.tokenizer.pad(group, return_tensors="pt")
            ids, mask = padded["input_ids"], padded["attention_mask"]
        ids, mask = ids.to(self.device), mask.to(self.device)
        empty = ids.shape[1] == 0  # an empty prompt starts from bos, as in transformers
        out = self.model.generate(None if empty else ids, attention_mask=None if empty else mask, generator=generator,
                                  **gen_kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        in_b = 1 if empty else ids.shape[0]
        sequences = sequences.reshape(in_b, sequences.shape[0] // in_b, -1)
        prompt_len = 0 if empty else ids.shape[1]
        results = []
        for prompt, rows in zip(prompts, sequences.tolist()):
            records = []
            for seq in rows:
                if post["kind"] == "tensors":
                    records.append({"generated_token_ids": seq})
                    continue
                text = self.tokenizer.decode(seq[prompt_len:], skip_special_tokens=post["skip_special_tokens"],
                                             clean_up_tokenization_spaces=post["clean_up_tokenization_spaces"])
                records.append({"generated_text": prompt + text if post["kind"] == "full_text" else text})
            results.append(records)
        return results


def pipeline(task: str, model: Any, tokenizer: Any = None, dtype: Any = "auto", device: Any = None,
             model_kwargs: dict | None = None, torch_dtype: Any = None, **kwargs: Any) -> TextGenerationPipeline:
    """Build a text-generation pipeline from a folder / hub id (model + tokenizer files) or from objects.

    As transformers' `pipeline`: model_kwargs go to from_pretrained (e.g. {"attn_implementation": ...});
    batch_size, generation arguments (max_new_tokens, do_sample, ...) and pipeline parameters (return_full_text, ...)
    given here apply to every call. device: -1 / "cpu" / 0 / "cuda:0" / a torch.device.
    """
    if task != "text-generation":
        raise ValueError(f"gpt2.pipeline supports only task='text-generation', got {task!r}; the other tasks run in "
                         f"transformers.pipeline on an exported folder.")
    if torch_dtype is not None:  # the transformers < 4.56 spelling
        dtype = torch_dtype
    for ignored in ("trust_remote_code", "use_fast"):
        kwargs.pop(ignored, None)  # no remote code here; the tokenizer is always the fast one
    if isinstance(model, (str, os.PathLike)):
        folder = resolve_model_dir(model)
        if tokenizer is None:
            tokenizer = folder
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype, **(model_kwargs or {}))
    elif model_kwargs:
        raise ValueError("model_kwargs apply when the model is loaded from a folder; pass a folder, or configure the "
                         "model object yourself.")
    if isinstance(tokenizer, (str, os.PathLike)):
        from .tokenizer import GPT2TokenizerFast

        tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer)
    if tokenizer is None:
        raise ValueError("pipeline(model=<model object>) also needs tokenizer=<GPT2TokenizerFast or folder>.")
    return TextGenerationPipeline(model, tokenizer, device=device, **kwargs)
