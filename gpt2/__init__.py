"""gpt2: the GPT-2 model library of gpt2-forge — pure torch + safetensors + tokenizers, parity with transformers.

    from gpt2 import GPT2LMHeadModel, GPT2TokenizerFast
    model = GPT2LMHeadModel.from_pretrained("path/to/hf-folder", dtype="auto")
"""

from .attention import ATTENTION_BACKENDS
from .config import PRESETS, GPT2Config
from .generation import GenerateDecoderOnlyOutput, GenerationConfig
from .modeling import (
    CausalLMOutput,
    GPT2DoubleHeadsModel,
    GPT2DoubleHeadsModelOutput,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2ModelOutput,
    GPT2PreTrainedModel,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
    flops_per_token,
)
from .pipeline import pipeline
from .tokenizer import GPT2Tokenizer, GPT2TokenizerFast, train_tokenizer

__all__ = [
    "ATTENTION_BACKENDS",
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
