"""Linear layers with weight loaders, written so tensor-parallel column/row sharding slots in later.

A parameter carries a `weight_loader(param, tensor, shard_id)`; the checkpoint loader calls it with the full
Hugging Face tensor. Fused layers (q|k|v, gate|up) take their parts by `shard_id`, so one matmul replaces
three (or two) at run time. Today every layer is replicated (tp_size = 1); a ColumnParallel variant would
slice the output rows by rank in its loader, a RowParallel one the input columns plus an all-reduce.
Runs in the stage process; never touches sockets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stages.errors import ModelLoadError


def copy_into(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ModelLoadError(f"tensor {what}: checkpoint shape {tuple(src.shape)} != expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.to(dtype=dst.dtype, device=dst.device))


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    copy_into(param, loaded, "")


class Linear(nn.Module):
    """y = x W^T + b, replicated on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several linear maps of the same input fused along the output dim (q|k|v, gate|up).

    `parts` gives each part's name and output width; the checkpoint's tensors for a part land in its rows.
    A part whose checkpoint has no bias (o/qkv bias optional per family) is simply not declared as a
    shard of the bias.
    """

    def __init__(self, in_features: int, parts: Sequence[tuple[str, int]], bias: bool) -> None:
        super().__init__(in_features, sum(w for _, w in parts), bias)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, width in parts:
            self.offsets[name] = (start, start + width)
            start += width
        self.weight.weight_loader = self._load_part  # type: ignore[attr-defined]
        if self.bias is not None:
            self.bias.weight_loader = self._load_part  # type: ignore[attr-defined]

    def _load_part(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object) -> None:
        lo, hi = self.offsets[str(shard_id)]
        copy_into(param.narrow(0, lo, hi - lo), loaded, f"part {shard_id}")
