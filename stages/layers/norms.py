"""Normalisations: RMSNorm (Llama family) and LayerNorm (OPT, BLOOM), numerically as Hugging Face does them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.layers.fused import add_rms_norm, rms_norm
from stages.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the storage dtype, then back: what HF's LlamaRMSNorm does.
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) in one pass on CUDA."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.eps, self.dim = eps, dim
        if affine:
            self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
            self.bias = nn.Parameter(torch.empty(dim), requires_grad=False)
            self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]
            self.bias.weight_loader = default_weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
