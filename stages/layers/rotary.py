"""Rotary position embeddings (RoPE) with the scalings Llama-family checkpoints use: default, linear, llama3.

Tables of cos/sin are built once per shard for every position up to the KV pool's maximum length, in
float32 (as Hugging Face computes them) and stored in the model dtype. Applied to the flattened tokens of a
step with one gather by position, so prompts and decode steps of any lengths share one code path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from stages.errors import UnsupportedArchitectureError


def rope_inv_freq(dim: int, theta: float, scaling: Mapping[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (float32) and the attention scaling applied to cos/sin."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if rope_type == "default":
        return inv_freq, 1.0
    assert scaling is not None
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise UnsupportedArchitectureError(
        f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


class Rotary:
    """cos/sin tables [max_positions, rot_dim] and their application to q and k."""

    def __init__(
        self,
        head_dim: int,
        rot_dim: int,
        max_positions: int,
        theta: float,
        scaling: Mapping[str, Any] | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.head_dim, self.rot_dim = head_dim, rot_dim
        inv_freq, attn_scale = rope_inv_freq(rot_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, rot]
        self.cos = (emb.cos() * attn_scale).to(dtype=dtype, device=device)
        self.sin = (emb.sin() * attn_scale).to(dtype=dtype, device=device)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [N, heads, head_dim], positions [N] -> rotated x (new tensor)."""
        cos = self.cos[positions].unsqueeze(1)  # [N, 1, rot]
        sin = self.sin[positions].unsqueeze(1)
        if self.rot_dim == self.head_dim:
            return x * cos + _rotate_half(x) * sin
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim :]
        return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
