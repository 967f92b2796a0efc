"""Activation functions by the names a GPT-2 config may carry: the keys of transformers' ACT2FN (activations.py).

A compatibility table: GPT-2 itself uses one activation, gelu_new. gelu_new / gelu_fast / gelu_accurate /
gelu_python_tanh are all the tanh approximation 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))), written out in Python by
transformers; F.gelu(approximate="tanh") is the same formula in one fused kernel (equal to ~1e-7), which is what makes
our MLP cheaper than transformers' on CPU.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACT2FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_10": lambda x: torch.clamp(F.gelu(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "hardswish": F.hardswish,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "leaky_relu": F.leaky_relu,
    "linear": lambda x: x,
    "mish": F.mish,
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
}

__all__ = ["ACT2FN"]
