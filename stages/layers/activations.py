"""Activation functions by their Hugging Face config names."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from stages.models.spec import ACTIVATIONS as NAMES
from stages.models.spec import check_activation

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


assert set(ACTIVATIONS) == set(NAMES), "stages/models/spec.py's ACTIVATIONS names exactly these"


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    check_activation(name)
    return ACTIVATIONS[name]
