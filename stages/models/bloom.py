"""BLOOM family (BloomForCausalLM): ALiBi instead of positions, LayerNorm after the embedding, fused
query_key_value laid out [heads, 3, head_dim], tanh-GeLU MLP, tied head."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from stages.batch import StepPlan
from stages.layers.attention import attend, write_kv
from stages.layers.linear import Linear, default_weight_loader
from stages.layers.norms import LayerNorm
from stages.models.base import Family, NormHead, WeightRef
from stages.models.spec import ModelSpec


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes [H] (float32), as BLOOM was trained with (also for non-powers of two)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(torch.tensor(base, dtype=torch.float32), torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(
            torch.tensor(extra_base, dtype=torch.float32), torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32)
        )
        slopes = torch.cat([slopes, extra])
    return slopes


class Embedding(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.vocab_size, spec.hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]
        self.norm = LayerNorm(spec.hidden_size, spec.options["eps"])

    def forward(self, ids: torch.Tensor, plan: StepPlan, ctx: Any) -> torch.Tensor:
        return self.norm(nn.functional.embedding(ids, self.weight))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        d, eps = spec.hidden_size, spec.options["eps"]
        self.post_ln_residual = spec.options["post_ln_residual"]
        self.heads, self.head_dim = spec.num_heads, spec.head_dim
        self.input_norm = LayerNorm(d, eps)
        self.qkv = Linear(d, 3 * d, bias=True)
        self.dense = Linear(d, d, bias=True)
        self.post_norm = LayerNorm(d, eps)
        self.up = Linear(d, 4 * d, bias=True)
        self.down = Linear(4 * d, d, bias=True)
        self.scale = spec.head_dim**-0.5

    def forward(
        self, h: torch.Tensor, plan: StepPlan, k_cache: torch.Tensor, v_cache: torch.Tensor, slopes: torch.Tensor
    ) -> torch.Tensor:
        n = h.shape[0]
        x = self.input_norm(h)
        residual = x if self.post_ln_residual else h
        q, k, v = self.qkv(x).view(n, self.heads, 3, self.head_dim).unbind(2)  # each [N, H, D]
        write_kv(k_cache, v_cache, k, v, plan)
        h = self.dense(attend(q, k_cache, v_cache, plan, self.scale, alibi_slopes=slopes)) + residual
        x = self.post_norm(h)
        residual = x if self.post_ln_residual else h
        return self.down(nn.functional.gelu(self.up(x), approximate="tanh")) + residual


def head(spec: ModelSpec) -> nn.Module:
    return NormHead(LayerNorm(spec.hidden_size, spec.options["eps"]), spec.hidden_size, spec.vocab_size)


def checkpoint_map(spec: ModelSpec, layers: range, first: bool, last: bool) -> list[WeightRef]:
    refs: list[WeightRef] = []
    wb = ("weight", "bias")
    if first:
        refs.append(WeightRef(("transformer.word_embeddings.weight",), "embed.weight"))
        for t in wb:
            refs.append(WeightRef((f"transformer.word_embeddings_layernorm.{t}",), f"embed.norm.{t}"))
    for j, i in enumerate(layers):
        src, dst = f"transformer.h.{i}", f"blocks.{j}"
        for t in wb:
            refs.append(WeightRef((f"{src}.input_layernorm.{t}",), f"{dst}.input_norm.{t}"))
            refs.append(WeightRef((f"{src}.self_attention.query_key_value.{t}",), f"{dst}.qkv.{t}"))
            refs.append(WeightRef((f"{src}.self_attention.dense.{t}",), f"{dst}.dense.{t}"))
            refs.append(WeightRef((f"{src}.post_attention_layernorm.{t}",), f"{dst}.post_norm.{t}"))
            refs.append(WeightRef((f"{src}.mlp.dense_h_to_4h.{t}",), f"{dst}.up.{t}"))
            refs.append(WeightRef((f"{src}.mlp.dense_4h_to_h.{t}",), f"{dst}.down.{t}"))
    if last:
        for t in wb:
            refs.append(WeightRef((f"transformer.ln_f.{t}",), f"head.norm.{t}"))
        tied = ("transformer.word_embeddings.weight", "lm_head.weight")
        refs.append(WeightRef(tied if spec.tie_word_embeddings else ("lm_head.weight",), "head.lm_head.weight"))
    return refs


def context(spec: ModelSpec, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return alibi_slopes(spec.num_heads).to(device=device, dtype=dtype)


def attention_inputs(spec: ModelSpec, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Block's query: a slice of the head-interleaved q|k|v projection, and the ALiBi slopes (see
    Family.attention_inputs)."""
    q = torch.zeros(n, spec.num_heads, 3, spec.head_dim, dtype=dtype, device=device).unbind(2)[0]
    return q, context(spec, 0, dtype, device)



FAMILY = Family(
    name="bloom",
    embedding=Embedding,
    block=Block,
    head=head,
    checkpoint_map=checkpoint_map,
    context=context,
    attention_inputs=attention_inputs,
)
