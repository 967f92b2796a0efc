"""Autoregressive generation with a KV cache, with transformers 5.24's `generate` arguments, defaults and results.

What a call does follows transformers' GenerationMixin for decoder-only models, so that the same call gives the same
tokens (greedy: token for token; sampling: the same draws from torch's global RNG, or from `generator=`):
  * settings resolve as there: the call's arguments > the `generation_config=` passed > the model's generation config
    (generation_config.json of the folder, else bos/eos/pad of config.json) > transformers' global defaults
    (max_length=20, do_sample=False, temperature=1.0, top_k=50, top_p=1.0, ...). An argument passed as None switches
    its step off, as there (top_k=None or top_k=0: no top-k; eos_token_id=None: no eos stop);
  * lengths: max_new_tokens counts new tokens, max_length the prompt too; neither given -> 20 new tokens (with
    transformers' warning); min_new_tokens / min_length hold eos back;
  * logits processors in transformers' order (`_get_logits_processor`): repetition_penalty -> no_repeat_ngram_size
    -> bad_words_ids -> min length, then, when sampling, temperature -> top_k -> top_p; then argmax or
    torch.multinomial; finished rows continue with pad_token_id (else eos); left padding via the attention mask,
    inferred from pad tokens when not given (as `_prepare_attention_mask_for_generation`);
  * num_return_sequences (sampling) repeats each prompt's row; return_dict_in_generate gives `.sequences` and, when
    asked, `.scores` (processed) and `.logits` (raw).
Arguments that select something implemented only in transformers (beam search, assisted decoding, streamers, ...)
raise one sentence naming them, unless their value changes nothing (num_beams=1).

The sampling steps are written here rather than imported: transformers is a test-only dependency and `gpt2` imports
only torch/safetensors/tokenizers. Each step cites the transformers class it reproduces.

What makes it fast (benchmarks/generation.py measures it against transformers' generate):
  * a preallocated KV cache (cache.StaticKVCache) written in place — no torch.cat of the whole past per token;
  * the output ids and the attention mask are preallocated too; position ids advance by one per step instead of a
    cumsum over the whole mask; with no padding at all there is no mask (SDPA runs mask-free);
  * logits for the last position only (the trunk's last hidden state -> lm_head), under torch.inference_mode;
  * no host syncs per token on accelerators: "all rows finished" is recorded on the device and read every
    _SYNC_EVERY tokens (on CPU a read costs nothing, so it is read every token and no work is wasted);
  * on CPU at batch <= 3, the GEMVs run on cached (in, out) copies of the weights (see _T_LAYOUT_MAX_ROWS).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import StaticKVCache
from .compat import check_ids

# transformers' GenerationConfig._get_default_generation_params() for the settings implemented here: what applies when
# neither the call nor a generation config sets a value.
GLOBAL_DEFAULTS: dict[str, Any] = {
    "max_length": 20, "min_length": 0, "do_sample": False, "use_cache": True, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "num_return_sequences": 1, "output_scores": False, "output_logits": False, "return_dict_in_generate": False,
}
SUPPORTED = frozenset(GLOBAL_DEFAULTS) | {"max_new_tokens", "min_new_tokens", "bos_token_id", "eos_token_id",
                                         "pad_token_id", "stopping_criteria"}
# transformers generation settings not implemented here, with the value at which each changes nothing (accepted
# then): anything else raises, so a setting is never ignored in silence.
NO_EFFECT: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "length_penalty": 1.0, "early_stopping": False,
    "typical_p": 1.0, "min_p": None, "top_h": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "penalty_alpha": None,
    "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "renormalize_logits": False,
    "remove_invalid_values": False, "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "exponential_decay_length_penalty": None,
    "guidance_scale": None, "max_time": None, "stop_strings": None, "token_healing": False,
    "watermarking_config": None, "output_attentions": False, "output_hidden_states": False,
    "cache_implementation": None, "cache_config": None, "compile_config": None, "disable_compile": None,
    "prompt_lookup_num_tokens": None, "assistant_model": None, "streamer": None, "logits_processor": None,
    "prefix_allowed_tokens_fn": None, "synced_gpus": None, "negative_prompt_ids": None,
    "negative_prompt_attention_mask": None, "custom_generate": None, "decoder_start_token_id": None,
    "low_memory": None, "dola_layers": None, "num_assistant_tokens": None, "num_assistant_tokens_schedule": None,
    "assistant_confidence_threshold": None, "is_assistant": False, "max_matching_ngram_size": None,
    "assistant_early_exit": None, "assistant_lookbehind": None, "target_lookbehind": None, "constraints": None,
    "force_words_ids": None, "max_cache_len": None, "use_mtp": None, "prefill_chunk_size": None,
    "continuous_batching_config": None, "speculation_type": None, "assistant_ensemble_weight": None,
}
_SAMPLING_ONLY = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}  # (their no-op / default values)
_FILE_ONLY_KEYS = ("transformers_version", "_from_model_config", "_commit_hash", "trust_remote_code")


class GenerationConfig:
    """A model's generation settings: transformers' GenerationConfig keys as attributes, unset ones None.

    `GPT2LMHeadModel.from_pretrained(dir)` reads dir/generation_config.json into `model.generation_config` (else
    bos/eos/pad come from config.json, as transformers' `GenerationConfig.from_model_config`); `generate()` takes
    the settings it does not get as arguments from here, then from transformers' global defaults.
    """

    def __init__(self, **kwargs: Any):
        for key in _FILE_ONLY_KEYS:
            kwargs.pop(key, None)
        self.__dict__.update(kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None  # an unset setting reads as None, as in transformers

    @classmethod
    def from_model_config(cls, config: Any) -> "GenerationConfig":
        return cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                   pad_token_id=config.pad_token_id)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "GenerationConfig":
        """Read <folder>/generation_config.json. Raises FileNotFoundError / ValueError with the path."""
        path = os.path.join(os.fspath(folder), "generation_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object of generation settings")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The settings that are set (not None)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}

    to_diff_dict = to_dict

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(os.fspath(save_directory), "generation_config.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    def __repr__(self) -> str:
        return f"GenerationConfig({self.to_dict()})"


@dataclass
class GenerateDecoderOnlyOutput:
    """`generate(..., return_dict_in_generate=True)`: transformers' GenerateDecoderOnlyOutput fields we fill.

    sequences (B * num_return_sequences, T + n); scores / logits: one (B * num_return_sequences, V) float32 tensor
    per new token (processed scores / raw logits), when output_scores / output_logits.
    """

    sequences: torch.LongTensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: None = None
    hidden_states: None = None
    cache: None = None

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(v for v in (self.sequences, self.scores, self.logits) if v is not None)[key]


# ----------------------------------------------------------------------------------------------------------------
# Logits processors: each is the transformers class named in its docstring, on (B, cur) ids and (B, V) fp32 scores.


def _repetition_penalty(ids: torch.Tensor, scores: torch.Tensor, penalty: float,
                        prompt_pads: torch.Tensor | None) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor (CTRL, Keskar et al. 2019): the score of every token already in the row
    (left padding excluded) is divided by `penalty` if positive, multiplied if negative."""
    V = scores.size(-1)
    if prompt_pads is not None:  # left-padding positions point at the spare column V, dropped below
        positions = torch.arange(ids.size(1), device=ids.device)
        ids = ids.masked_fill(positions[None, :] < prompt_pads[:, None], V)
    ids = ids.clamp(max=V)
    padded = torch.nn.functional.pad(scores, (0, 1))  # (B, V + 1)
    score = torch.gather(padded, 1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return padded.scatter(1, ids, score)[..., :V]


def _no_repeat_ngram(ids: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """NoRepeatNGramLogitsProcessor (fairseq): ban every token that would complete an n-gram already in the row."""
    cur = ids.size(1)
    if cur < n:
        return scores
    prefix = ids[:, cur + 1 - n:]  # (B, n - 1): the n-gram the next token would complete starts with these
    windows = ids.unfold(dimension=1, size=n, step=1)  # (B, cur - n + 1, n)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # (B, cur - n + 1)
    V = scores.size(-1)
    banned = scores.new_zeros((scores.size(0), V + 1), dtype=torch.bool)  # column V: windows that ban nothing
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], -float("inf"))


def _bad_words(ids: torch.Tensor, scores: torch.Tensor, bad: list[tuple[int, ...]]) -> torch.Tensor:
    """NoBadWordsLogitsProcessor: a one-token bad word is never generated; a longer one's last token is banned in
    rows whose last tokens are the rest of it."""
    banned = torch.zeros_like(scores, dtype=torch.bool)
    for seq in bad:
        if len(seq) == 1:
            banned[:, seq[0]] = True
        elif len(seq) - 1 <= ids.size(1):
            prefix = torch.tensor(seq[:-1], device=ids.device)
            rows = (ids[:, ids.size(1) - len(prefix):] == prefix).all(dim=-1)  # (B,)
            banned[:, seq[-1]] |= rows
    return scores.masked_fill(banned, -float("inf"))


def _top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """TopKLogitsWarper: keep the k highest scores (ties with the k-th included)."""
    k = min(max(top_k, 1), scores.size(-1))
    kth = torch.topk(scores, k)[0][..., -1, None]  # (B, 1) the k-th largest score
    return scores.masked_fill(scores < kth, -float("inf"))


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """TopPLogitsWarper (nucleus sampling, Holtzman et al. 2019): drop the low tail holding at most 1 - top_p of the
    probability mass; the most likely token always stays."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))


@dataclass
class _Plan:
    """The resolved settings of one generate() call."""

    do_sample: bool
    temperature: float | None
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    no_repeat_ngram_size: int
    bad_words: list[tuple[int, ...]]
    min_length: int
    eos_ids: torch.Tensor  # (n_eos,) possibly empty
    pad_token_id: int
    prompt_pads: torch.Tensor | None  # (B,) left-padding lengths, for the repetition penalty
    output_scores: bool
    output_logits: bool
    # transformers' StoppingCriteria protocol: callables (input_ids (B, T + s), scores) -> bool | BoolTensor (B,),
    # called after every new token; a row they mark done is finished (lm-evaluation-harness' stop sequences use it)
    stopping_criteria: list = field(default_factory=list)

    @property
    def processes(self) -> bool:
        """Whether any step changes the scores (else greedy / sampling read the logits as they are)."""
        return bool(self.repetition_penalty not in (None, 1.0) or self.no_repeat_ngram_size > 0 or self.bad_words
                    or (self.min_length > 0 and len(self.eos_ids)) or self.do_sample)

    def process(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """transformers' _get_logits_processor order, then the sampling warpers."""
        if self.repetition_penalty not in (None, 1.0):
            scores = _repetition_penalty(ids, scores, self.repetition_penalty, self.prompt_pads)
        if self.no_repeat_ngram_size > 0:
            scores = _no_repeat_ngram(ids, scores, self.no_repeat_ngram_size)
        if self.bad_words:
            scores = _bad_words(ids, scores, self.bad_words)
        if len(self.eos_ids) and ids.size(1) < self.min_length:  # MinLength / MinNewTokensLengthLogitsProcessor
            scores = scores.index_fill(-1, self.eos_ids, -math.inf)
        if self.do_sample:
            if self.temperature is not None and self.temperature != 1.0:  # TemperatureLogitsWarper
                scores = scores / self.temperature
            if self.top_k is not None and self.top_k != 0:
                scores = _top_k(scores, self.top_k)
            if self.top_p is not None and self.top_p < 1.0:
                scores = _top_p(scores, self.top_p)
        return scores


# Accelerators: read the device-side "all finished" flag every this many tokens (each read is a host sync that
# stalls the launch queue); tokens computed past the stop are trimmed, so the output is the same.
_SYNC_EVERY = 16
# CPU decoding at 1-3 rows is a chain of GEMVs that stream every weight once per token, and MKL streams the (in, out)
# layout (HF's Conv1D) markedly faster than nn.Linear's (out, in): measured on a 2-core AMD EPYC, one thread, the
# gpt2 lm_head (50257 x 384) took 12.0 ms vs 4.2 ms per token, a 4 x 768 trunk ~10 % less; from 4 rows up MKL uses
# GEMM and both layouts are equal. So a CPU decode loop of enough tokens runs on (in, out) copies of the projection
# weights and the output embedding. The copies live for one generate() call only (a transpose copy costs ~100 ms
# for that lm_head, repaid after ~32 tokens): nothing outlives the call, so a model never silently holds its weights
# twice.
_T_LAYOUT_MAX_ROWS = 3
_T_LAYOUT_MIN_TOKENS = 32


def _decode_linears(model) -> list[torch.nn.Linear]:
    """The layers whose weights get an (in, out) decode copy: every block projection and the lm_head."""
    layers = []
    for block in model.transformer.h:
        layers += [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
    return layers + [model.lm_head]


def _use_t_layout(model, batch: int, new_tokens: int) -> bool:
    return (model.lm_head.weight.device.type == "cpu" and batch <= _T_LAYOUT_MAX_ROWS
            and new_tokens >= _T_LAYOUT_MIN_TOKENS)


class _TransposedLinear:
    """nn.Linear's product against an (in, out) copy of its weight: x @ W^T + b as addmm(b, x, W^T)."""

    def __init__(self, layer: torch.nn.Linear):
        self.weight_t = layer.weight.detach().t().contiguous()  # (out, in) -> (in, out)
        self.bias = layer.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1))  # (rows, in)
        y = x2 @ self.weight_t if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.view(*x.shape[:-1], self.weight_t.size(1))


@contextmanager
def _t_layout(model, enabled: bool):
    """For the duration of one decode loop, each projection computes on an (in, out) copy of its weight.

    The copy is the layer's `forward`, set as an instance attribute (it shadows nn.Linear.forward, hooks still run)
    and deleted after the loop, so the model's own forward — and every training or compiled forward — runs plain
    nn.Linear, and nothing outlives the call.
    """
    if not enabled:
        yield
        return
    layers = _decode_linears(model)
    with torch.no_grad():
        for layer in layers:
            layer.forward = _TransposedLinear(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


# ----------------------------------------------------------------------------------------------------------------
# generate()


def _settings(source: Any) -> dict[str, Any]:
    """The set (not None) entries of a GenerationConfig (ours or transformers'), a dict, or None."""
    if source is None:
        return {}
    if isinstance(source, dict):
        data = source
    elif hasattr(source, "to_dict"):
        data = source.to_dict()
    else:
        raise TypeError(f"generation_config must be a GenerationConfig or a dict, got {type(source).__name__}")
    return {k: v for k, v in data.items() if v is not None and k not in _FILE_ONLY_KEYS and not k.startswith("_")}


def _refuse_unsupported(settings: dict[str, Any], where: str) -> None:
    for key, value in settings.items():
        if key in SUPPORTED or key == "generation_config":
            continue
        if key in NO_EFFECT:
            no_effect = NO_EFFECT[key]
            if value is None or value == no_effect or (no_effect is None and value in (False, [], ())):
                continue
            raise ValueError(f"{where} sets {key}={value!r}, which gpt2's generate does not implement (greedy and "
                             f"sampling with temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size, "
                             f"bad_words_ids, min/max length); drop it, or generate with transformers.")
        raise ValueError(f"{where} has an unknown generation argument {key!r}; gpt2's generate takes input_ids, "
                         f"attention_mask, generation_config, generator and {', '.join(sorted(SUPPORTED))}.")


def generate(model, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
             generation_config: Any = None, generator: torch.Generator | None = None,
             **kwargs: Any) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """Prompt + generated tokens, (B * num_return_sequences, T + n) — see the module docstring for the semantics.

    input_ids (B, T) or (T,); None starts from bos_token_id. attention_mask (B, T), 1 = real token: left-padded
    batches work. generator: a torch.Generator for the sampling draws (default: torch's global RNG, like
    transformers). kwargs: transformers' generation arguments (max_new_tokens, max_length, min_new_tokens,
    min_length, do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size, bad_words_ids,
    num_return_sequences, eos_token_id, pad_token_id, bos_token_id, use_cache, return_dict_in_generate,
    output_scores, output_logits, stopping_criteria). Raises ValueError for settings transformers rejects, for
    unimplemented ones, for prompt ids outside the vocabulary, and when prompt + new tokens exceed n_positions.
    """
    if "inputs" in kwargs:  # transformers' name of the first argument
        if input_ids is not None:
            raise ValueError("pass the prompt once: input_ids or inputs, not both")
        input_ids = kwargs.pop("inputs")
    for key in ("token_type_ids", "position_ids", "inputs_embeds", "past_key_values"):
        if kwargs.get(key) is not None:
            raise ValueError(f"generate() does not take {key}; pass input_ids (and attention_mask) only, e.g. "
                             f"model.generate(**tokenizer(text, return_tensors='pt')).")
        kwargs.pop(key, None)
    s, default_max, default_min = _resolve_settings(model, generation_config, kwargs)
    eos = s.get("eos_token_id")
    eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) or torch.is_tensor(eos) and eos.dim() == 0
                                       else [int(e) for e in eos])
    pad_token_id = s.get("pad_token_id")
    if pad_token_id is None and eos_list:
        pad_token_id = eos_list[0]  # transformers pads finished rows with the first eos when no pad token is set
    input_ids, attention_mask = _prepare_inputs(model, input_ids, attention_mask, s, eos_list, pad_token_id)
    T = input_ids.size(1)
    max_length, min_length = _lengths(s, default_max, default_min, T, model.config.n_positions)
    # the decode loop runs the trunk's core forward, which does not check ids: the prompt is checked here, once
    check_ids(input_ids, "input_ids", model.transformer.wte.num_embeddings, "tokens")
    padded = bool((attention_mask == 0).any())
    plan = _Plan(
        do_sample=bool(s["do_sample"]), temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
        repetition_penalty=s["repetition_penalty"], no_repeat_ngram_size=s["no_repeat_ngram_size"] or 0,
        bad_words=[w for w in _bad_words_list(s["bad_words_ids"]) if not (len(w) == 1 and w[0] in eos_list)],
        min_length=min_length, eos_ids=torch.tensor(eos_list, device=input_ids.device, dtype=torch.long),
        pad_token_id=pad_token_id if pad_token_id is not None else 0,
        prompt_pads=(attention_mask != 0).int().argmax(dim=1) if padded else None,
        output_scores=bool(s["return_dict_in_generate"] and s["output_scores"]),
        output_logits=bool(s["return_dict_in_generate"] and s["output_logits"]),
        stopping_criteria=list(s.get("stopping_criteria") or ()),
    )
    was_training = model.training
    model.eval()
    try:
        ids, scores, logits = _generate(model, input_ids, attention_mask, padded, max_length - T, plan, generator)
    finally:
        model.train(was_training)
    ids = ids.clone()  # an ordinary tensor: inference-mode tensors cannot be saved for backward later
    if not s["return_dict_in_generate"]:
        return ids
    return GenerateDecoderOnlyOutput(sequences=ids, scores=tuple(x.clone() for x in scores) if scores else None,
                                     logits=tuple(x.clone() for x in logits) if logits else None)


# Warnings of the helpers below point at the caller of model.generate(): helper <- generate <- model.generate <- user.
_STACKLEVEL = 4


def _resolve_settings(model, generation_config: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """(settings, max_length is the global default, min_length is the global default): the call's arguments over
    `generation_config` over the model's generation config over transformers' defaults, checked as transformers
    checks them."""
    model_settings = _settings(getattr(model, "generation_config", None))
    user_settings = _settings(generation_config)
    # what is unsupported is judged on the value that wins (a call's num_beams=1 overrides a file's num_beams=4)
    layers = [(kwargs, "this generate() call"), (user_settings, "generation_config"),
              (model_settings, "the model's generation_config.json")]
    for i, (layer, where) in enumerate(layers):
        overridden = set().union(*(higher for higher, _ in layers[:i]))
        _refuse_unsupported({k: v for k, v in layer.items() if v is not None and k not in overridden}, where)
    kwargs = {k: v for k, v in kwargs.items() if k in SUPPORTED}
    s = {**GLOBAL_DEFAULTS, **model_settings, **user_settings, **kwargs}  # a None in kwargs switches a step off
    default_max = all(d.get("max_length") is None for d in (kwargs, user_settings, model_settings))
    default_min = all(d.get("min_length") is None for d in (kwargs, user_settings, model_settings))
    do_sample = bool(s["do_sample"])
    passed_sampling = [k for k in _SAMPLING_ONLY if k in kwargs and kwargs[k] not in (None, _SAMPLING_ONLY[k])]
    if not do_sample and passed_sampling:
        warnings.warn(f"do_sample is not True, so {', '.join(f'{k}={kwargs[k]}' for k in passed_sampling)} has no "
                      f"effect (it only shapes sampling); pass do_sample=True to sample.", stacklevel=_STACKLEVEL)
    n_seq = s["num_return_sequences"] or 1
    if n_seq > 1 and not do_sample:
        raise ValueError(f"num_return_sequences={n_seq} needs do_sample=True: greedy decoding (do_sample=False) gives "
                         f"one sequence per prompt, as in transformers.")
    if do_sample:
        if s["temperature"] is not None and not s["temperature"] > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {s['temperature']}; for greedy decoding "
                             f"pass do_sample=False.")
        if s["top_k"] is not None and s["top_k"] < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k filtering), got {s['top_k']}.")
        if s["top_p"] is not None and not 0 <= s["top_p"] <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {s['top_p']}.")
    if s["repetition_penalty"] is not None and not s["repetition_penalty"] > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = no penalty), got {s['repetition_penalty']}.")
    _bad_words_list(s["bad_words_ids"])  # raises on a malformed list before any input is prepared
    return s, default_max, default_min


def _prepare_inputs(model, input_ids, attention_mask, s: dict[str, Any], eos_list: list[int],
                    pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B * num_return_sequences, T): the prompt (bos when none), checked against
    the vocabulary, and its mask (inferred from pad tokens when not given, as transformers'
    _prepare_attention_mask_for_generation)."""
    if input_ids is None:
        if s.get("bos_token_id") is None:
            raise ValueError("generate() without input_ids starts from bos_token_id, which is not set; pass input_ids "
                             "or bos_token_id.")
        input_ids = torch.full((1, 1), int(s.get("bos_token_id")), dtype=torch.long, device=model.lm_head.weight.device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
    if attention_mask is None:
        # pad tokens in the prompt are padding, unless the pad token is also an eos token (then nothing can be
        # inferred)
        attention_mask = torch.ones_like(input_ids)
        if pad_token_id is not None and pad_token_id not in eos_list and bool((input_ids == pad_token_id).any()):
            attention_mask = input_ids.ne(pad_token_id).long()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}.")
    if attention_mask.dtype == torch.bool or attention_mask.is_floating_point():
        attention_mask = attention_mask.long()
    if input_ids.size(0) > 1 and bool((attention_mask[:, -1] == 0).any()):
        warnings.warn("generate(): a row ends with padding; decoder-only models need left padding "
                      "(tokenizer.padding_side = 'left') or generated text follows pad tokens.", stacklevel=_STACKLEVEL)
    n_seq = s["num_return_sequences"] or 1
    if n_seq > 1:  # each prompt's copies next to each other, as transformers' _expand_inputs_for_generation
        input_ids = input_ids.repeat_interleave(n_seq, dim=0)
        attention_mask = attention_mask.repeat_interleave(n_seq, dim=0)
    return input_ids, attention_mask


def _lengths(s: dict[str, Any], default_max: bool, default_min: bool, T: int, n_positions: int) -> tuple[int, int]:
    """(max_length, min_length) counting the prompt: transformers' _prepare_generated_length and
    _validate_generated_length."""
    max_new_tokens, max_length = s.get("max_new_tokens"), s["max_length"]
    if max_new_tokens is not None:
        if max_new_tokens <= 0:
            raise ValueError(f"`max_new_tokens` must be greater than 0, but is {max_new_tokens}.")
        if not default_max and max_length is not None:
            warnings.warn(f"Both `max_new_tokens` (={max_new_tokens}) and `max_length`(={max_length}) seem to have "
                          f"been set. `max_new_tokens` will take precedence.", stacklevel=_STACKLEVEL)
        max_length = max_new_tokens + T
    elif default_max or max_length is None:
        max_length = min(GLOBAL_DEFAULTS["max_length"] + T, n_positions)
        warnings.warn(f"Using the model-agnostic default `max_length` (={max_length}) to control the generation "
                      f"length. We recommend setting `max_new_tokens` to control the maximum length of the "
                      f"generation.", stacklevel=_STACKLEVEL)
    min_length = s["min_length"] or 0
    if s.get("min_new_tokens") is not None:
        if not default_min:
            warnings.warn(f"Both `min_new_tokens` (={s['min_new_tokens']}) and `min_length`(={min_length}) seem to "
                          f"have been set. `min_new_tokens` will take precedence.", stacklevel=_STACKLEVEL)
        min_length = s["min_new_tokens"] + T
    if T >= max_length:
        raise ValueError(f"Input length of input_ids is {T}, but `max_length` is set to {max_length}; raise "
                         f"max_length or, better, set max_new_tokens.")
    if max_length > n_positions:
        raise ValueError(f"prompt ({T} tokens) + {max_length - T} new tokens exceeds the model's n_positions "
                         f"({n_positions}); shorten the prompt or generate fewer tokens.")
    if min_length > max_length:
        warnings.warn(f"Unfeasible length constraints: the minimum length ({min_length}) is larger than the maximum "
                      f"possible length ({max_length}); generation stops at the maximum length.",
                      stacklevel=_STACKLEVEL)
    return max_length, min_length


def _bad_words_list(value: Any) -> list[tuple[int, ...]]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not value or any(not isinstance(w, (list, tuple)) or not w
                                                                for w in value):
        raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {value!r}; "
                         f"e.g. tokenizer(words, add_special_tokens=False).input_ids.")
    if any(not isinstance(i, int) or i < 0 for w in value for i in w):
        raise ValueError(f"bad_words_ids must hold token ids >= 0, got {value!r}.")
    return [tuple(w) for w in value]


@torch.inference_mode()
def _generate(model, input_ids, attention_mask, padded, max_new_tokens, plan: _Plan, generator):
    B, T = input_ids.shape
    total, device = T + max_new_tokens, input_ids.device
    ids = torch.full((B, total), plan.pad_token_id, dtype=torch.long, device=device)  # (B, T + n), step by step
    ids[:, :T] = input_ids
    if padded:  # padding needs a mask and mask-derived positions
        mask = torch.ones((B, total), dtype=attention_mask.dtype, device=device)  # new tokens are never padding
        mask[:, :T] = attention_mask
        # left padding: positions count from each row's first real token (transformers' generate does the same)
        pos = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, T)
    else:
        mask = None  # no padding anywhere: causal prefill, then mask-free single-token decoding
        pos = torch.arange(T, device=device).unsqueeze(0)  # (1, T)
    cache = StaticKVCache(model.config, B, total)
    scores = [] if plan.output_scores else None
    logits = [] if plan.output_logits else None
    with _t_layout(model, _use_t_layout(model, B, max_new_tokens)):
        n_new = _decode(model, ids, input_ids, mask, pos, cache, max_new_tokens, plan, generator, scores, logits)
    if scores is not None:
        del scores[n_new:]
    if logits is not None:
        del logits[n_new:]
    return ids[:, : T + n_new], scores, logits


def _decode(model, ids, step_ids, mask, pos, cache, max_new_tokens, plan: _Plan, generator, scores_out,
            logits_out) -> int:
    """The token loop: fills ids[:, T:] in place; returns how many new tokens count (fewer when all rows hit eos)."""
    B, T = step_ids.shape
    device = ids.device
    sync_every = 1 if device.type == "cpu" else _SYNC_EVERY
    check_eos = len(plan.eos_ids) > 0
    check_stop = check_eos or bool(plan.stopping_criteria)
    processes = plan.processes
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    all_done = torch.zeros(max(max_new_tokens, 1), dtype=torch.bool, device=device)  # after step s: every row ended
    for s in range(max_new_tokens):
        step_mask = mask[:, : cache.length + step_ids.size(1)] if mask is not None else None
        # the trunk's core forward: the prompt's ids were checked once in generate(), the rest are our own
        h = model.transformer.core_forward(step_ids, step_mask, cache, position_ids=pos)[:, -1]  # (B, C)
        raw = model.lm_head(h).float()  # (B, V): only the last position's logits
        scores = plan.process(ids[:, : T + s], raw) if processes else raw
        if scores_out is not None:
            scores_out.append(scores)
        if logits_out is not None:
            logits_out.append(raw)
        if plan.do_sample:
            next_ids = torch.multinomial(scores.softmax(-1), num_samples=1, generator=generator).squeeze(1)
        else:
            next_ids = scores.argmax(dim=-1)  # (B,)
        if check_eos:  # finished rows continue with the pad token (transformers: only when eos can stop a row)
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, plan.pad_token_id))
        ids[:, T + s] = next_ids
        step_ids, pos = next_ids[:, None], pos[:, -1:] + 1  # (B, 1), (B or 1, 1)
        if check_stop:  # transformers' _sample: unfinished &= ~stopping_criteria(input_ids, scores)
            if check_eos:
                unfinished &= ~torch.isin(next_ids, plan.eos_ids)
            for criterion in plan.stopping_criteria:  # scores: the stored ones (output_scores), else None, as there
                done = criterion(ids[:, : T + s + 1], tuple(scores_out) if scores_out is not None else None)
                unfinished &= ~torch.as_tensor(done, device=device, dtype=torch.bool)
            all_done[s] = ~unfinished.any()  # stays on the device
            if (s + 1) % sync_every == 0 or s == max_new_tokens - 1:
                if bool(all_done[: s + 1].any()):  # the host sync
                    return int(all_done.int().argmax()) + 1  # the first step after which every row had ended
    return max_new_tokens
