"""GPT2Config: every field of the Hugging Face GPT-2 config, with HF's defaults, as a validated dataclass.

The JSON written by `save_pretrained` is a Hugging Face `config.json` (model_type "gpt2"), so a folder we write
loads in `transformers.GPT2Config.from_pretrained`, and one transformers wrote loads here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from .activations import ACT2FN
from .attention import ATTENTION_BACKENDS, DEFAULT_ATTENTION
from .hub import resolve_model_dir

# The names are the keys of the tables that hold the functions (gpt2/activations.py, gpt2/attention.py), so a name
# the config accepts always has a function behind it.
ACTIVATION_NAMES = tuple(ACT2FN)
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
SUMMARY_TYPES = ("last", "first", "mean", "cls_index")
DTYPES = ("float32", "float16", "bfloat16", "float64")

# Size presets. The four OpenAI sizes are from the GPT-2 paper (Table 2) / the hub configs;
# vocab 50257 and context 1024 are the HF defaults, so they are not repeated.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, n_positions=256),  # CPU tests (~0.4M non-embedding params)
    "demo": dict(n_layer=2, n_head=6, n_embd=192, n_positions=256),  # the CPU default run (~0.9M non-embedding params)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# Keys transformers writes that carry no information for us (or that we derive); dropped silently on load.
# Any other unknown key is ignored too (a config.json from a newer transformers must still load).
_HF_ONLY_KEYS = ("model_type", "transformers_version", "_name_or_path")


@dataclass
class GPT2Config:
    # --- architecture (HF GPT2Config fields and defaults, configuration_gpt2.py) ---
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None -> 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    summary_type: str = "cls_index"
    summary_use_proj: bool = True
    summary_activation: str | None = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float = 0.1
    scale_attn_weights: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    # Mistral stability flags (Stanford CRFM Mistral, https://github.com/stanford-crfm/mistral)
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False  # an HF field; cross-attention is not implemented here (validated False)
    tie_word_embeddings: bool = True
    # --- generic HF fields the heads need (PretrainedConfig) ---
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None  # GPT2ForTokenClassification; None -> 0.1 like HF
    architectures: list[str] | None = None
    dtype: str | None = None  # the dtype the weights were saved in ("float32", "bfloat16", ...)
    # --- ours ---
    attn_implementation: str = DEFAULT_ATTENTION  # a key of gpt2.ATTENTION_BACKENDS: a runtime choice, not in config.json
    # GPT2LMHeadModel with labels: > 0 computes the LM loss this many tokens at a time without the full logits
    # (gpt2/loss.py; the forward then returns logits=None); 0: transformers' loss on the full logits. A runtime
    # choice, not in the HF config.json.
    loss_chunk_size: int = 0

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"GPT2Config: {msg}")

        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}.")
        need(self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); pick n_head from the divisors of "
             f"n_embd.")
        need(self.n_inner is None or (isinstance(self.n_inner, int) and self.n_inner > 0),
             f"n_inner must be None (= 4*n_embd) or a positive integer, got {self.n_inner!r}.")
        need(self.activation_function in ACTIVATION_NAMES,
             f"unknown activation_function {self.activation_function!r}; choose one of {', '.join(ACTIVATION_NAMES)}.")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"):
            v = getattr(self, name)
            need(0.0 <= v < 1.0, f"{name} must be in [0, 1), got {v!r}.")
        need(self.classifier_dropout is None or 0.0 <= self.classifier_dropout < 1.0,
             f"classifier_dropout must be None or in [0, 1), got {self.classifier_dropout!r}.")
        need(self.layer_norm_epsilon > 0, f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}.")
        need(self.attn_implementation in ATTENTION_BACKENDS,
             f"unknown attn_implementation {self.attn_implementation!r}; choose one of "
             f"{', '.join(ATTENTION_BACKENDS)}.")
        need(isinstance(self.loss_chunk_size, int) and self.loss_chunk_size >= 0,
             f"loss_chunk_size must be an integer >= 0 (0: the unchunked loss), got {self.loss_chunk_size!r}.")
        need(self.summary_type in SUMMARY_TYPES,
             f"unknown summary_type {self.summary_type!r}; choose one of {', '.join(SUMMARY_TYPES)}.")
        need(self.problem_type in PROBLEM_TYPES,
             f"unknown problem_type {self.problem_type!r}; choose one of {PROBLEM_TYPES}.")
        need(not self.add_cross_attention,
             "add_cross_attention=True (encoder-decoder GPT-2) is not supported by gpt2-forge; set it to False.")
        need(self.dtype is None or self.dtype in DTYPES, f"dtype must be one of {DTYPES} or None, got {self.dtype!r}.")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and v >= 0), f"{name} must be None or an integer >= 0, got {v!r}.")

        # Labels: HF derives num_labels from id2label (config.json stores id2label, not num_labels).
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}  # JSON keys are strings
            if len(self.id2label) != self.num_labels:
                need(self.num_labels == 2,  # 2 is the default: the caller did not ask for another count
                     f"num_labels={self.num_labels} disagrees with id2label ({len(self.id2label)} labels); pass one "
                     f"of them.")
                self.num_labels = len(self.id2label)
        need(isinstance(self.num_labels, int) and self.num_labels >= 0,
             f"num_labels must be an integer >= 0, got {self.num_labels!r}.")
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {v: k for k, v in self.id2label.items()}

    # HF attribute_map aliases, so code written against transformers' config reads the same
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    # --- construction / serialization ---
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}  # JSON object keys are strings
        d["model_type"] = "gpt2"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "GPT2Config":
        d = {**d, **overrides}
        if "torch_dtype" in d:  # transformers < 4.56 name of "dtype"
            d.setdefault("dtype", d.pop("torch_dtype"))
        if "num_labels" in overrides and "id2label" not in overrides:  # an explicit label count wins over saved names
            d.pop("id2label", None), d.pop("label2id", None)
        names = {f.name for f in dataclasses.fields(cls)}
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"GPT2Config: this config is for model_type {model_type!r}, not 'gpt2'.")
        if isinstance(d.get("dtype"), str) and d["dtype"].startswith("torch."):
            d["dtype"] = d["dtype"][len("torch."):]
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json in the Hugging Face format (loadable by transformers.GPT2Config)."""
        os.makedirs(save_directory, exist_ok=True)
        d = self.to_dict()
        # attn_implementation and loss_chunk_size are runtime choices (any checkpoint runs with any), and not every
        # backend name is a value transformers accepts, so they stay out of the HF file.
        d.pop("attn_implementation")
        d.pop("loss_chunk_size")
        with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "GPT2Config":
        """Read config.json from a folder (or a hub id, via huggingface_hub), a path to the file itself."""
        if str(path).endswith(".json") and os.path.isfile(path):
            file = str(path)
        else:
            file = os.path.join(resolve_model_dir(path), "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json in {path!s}; point to a folder written by save_pretrained.")
        try:
            with open(file, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON ({e}); the folder is corrupt, re-export it.") from None
        return cls.from_dict(d, **overrides)


__all__ = ["GPT2Config", "PRESETS", "ACTIVATION_NAMES"]
