"""gpt2: the GPT-2 model library of gpt2-forge — pure torch + safetensors + tokenizers, parity with transformers.

    from gpt2 import GPT2LMHeadModel, GPT2TokenizerFast
    model = GPT2LMHeadModel.from_pretrained("path/to/hf-folder", dtype="auto")
"""

from importlib import import_module

# The registry of attention backends is read by config validation before torch is imported, so it is imported here
# and everything else on first use (PEP 562): `import gpt2` costs nothing until a model, tokenizer or config is used.
from .attention import ATTENTION_BACKENDS, DEFAULT_ATTENTION, AttentionBackend

_HOMES = {
    "config": ("PRESETS", "GPT2Config"),
    "generation": ("GenerateDecoderOnlyOutput", "GenerationConfig"),
    "modeling": ("CausalLMOutput", "GPT2DoubleHeadsModel", "GPT2DoubleHeadsModelOutput", "GPT2ForQuestionAnswering",
                 "GPT2ForSequenceClassification", "GPT2ForTokenClassification", "GPT2LMHeadModel", "GPT2Model",
                 "GPT2ModelOutput", "GPT2PreTrainedModel", "QuestionAnsweringModelOutput", "SequenceClassifierOutput",
                 "TokenClassifierOutput", "flops_per_token"),
    "pipeline": ("pipeline",),
    "tokenizer": ("GPT2Tokenizer", "GPT2TokenizerFast", "train_tokenizer"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    """The public names (and submodules) of the package, imported on first use."""
    if name in _HOME_OF:
        value = getattr(import_module(f".{_HOME_OF[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # a dependency of an existing submodule is missing: say that
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME_OF))


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "DEFAULT_ATTENTION",
    "PRESETS",
    "GPT2Config",
    "GenerationConfig",
    "GenerateDecoderOnlyOutput",
    "GPT2PreTrainedModel",
    "GPT2Model",
    "GPT2LMHeadModel",
    "GPT2DoubleHeadsModel",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GPT2ForQuestionAnswering",
    "GPT2ModelOutput",
    "CausalLMOutput",
    "GPT2DoubleHeadsModelOutput",
    "SequenceClassifierOutput",
    "TokenClassifierOutput",
    "QuestionAnsweringModelOutput",
    "flops_per_token",
    "pipeline",
    "GPT2TokenizerFast",
    "GPT2Tokenizer",
    "train_tokenizer",
]
