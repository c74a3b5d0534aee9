"""Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

Pre-norm decoder: RMSNorm -> attention (GQA, RoPE incl. Llama-3 scaling, optional q/k/v bias, explicit
head_dim, Mistral's sliding window) -> residual -> RMSNorm -> SwiGLU MLP -> residual. q|k|v and gate|up are
fused into one matmul each. Embeddings tied or untied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stages.batch import StepPlan
from stages.layers.activations import activation
from stages.layers.attention import attend, kv_written, write_kv
from stages.layers.fused import can_fuse_rope, rope_and_cache, silu_mul
from stages.layers.linear import Linear, MergedLinear, default_weight_loader
from stages.layers.norms import RMSNorm
from stages.layers.rotary import Rotary
from stages.models.base import Family, NormHead, WeightRef
from stages.models.spec import ModelSpec


class Embedding(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.vocab_size, spec.hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]

    def forward(self, ids: torch.Tensor, plan: StepPlan, ctx: Any) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        o = spec.options
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_dim, kv_dim = spec.num_heads * spec.head_dim, spec.kv_dim
        self.qkv = MergedLinear(spec.hidden_size, [("q", q_dim), ("k", kv_dim), ("v", kv_dim)], o["qkv_bias"])
        self.o_proj = Linear(q_dim, spec.hidden_size, o["o_bias"])
        self.splits = [q_dim, kv_dim, kv_dim]
        self.scale = spec.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, plan: StepPlan, k_cache: torch.Tensor, v_cache: torch.Tensor, rotary: Rotary
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x)
        if can_fuse_rope(qkv, k_cache, self.head_dim):
            q = rope_and_cache(qkv, rotary.cos, rotary.sin, plan.positions, plan.token_slots, k_cache, v_cache,
                               self.heads, self.kv_heads, self.head_dim, rotary.rot_dim)
            kv_written()
            return self.o_proj(attend(q, k_cache, v_cache, plan, self.scale))
        q, k, v = qkv.split(self.splits, dim=-1)
        q = rotary.apply(q.view(n, self.heads, self.head_dim), plan.positions)  # [N, H, D]
        k = rotary.apply(k.view(n, self.kv_heads, self.head_dim), plan.positions)  # [N, kvH, D]
        write_kv(k_cache, v_cache, k, v.view(n, self.kv_heads, self.head_dim), plan)
        return self.o_proj(attend(q, k_cache, v_cache, plan, self.scale))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        i, bias = spec.intermediate_size, spec.options["mlp_bias"]
        self.gate_up = MergedLinear(spec.hidden_size, [("gate", i), ("up", i)], bias)
        self.down = Linear(i, spec.hidden_size, bias)
        name = spec.options["hidden_act"]
        self.act = None if name in ("silu", "swish") else activation(name)  # None: the fused SiLU path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(silu_mul(self.gate_up(x), self.act))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        eps = spec.options["rms_norm_eps"]
        self.input_norm = RMSNorm(spec.hidden_size, eps)
        self.attn = Attention(spec)
        self.post_norm = RMSNorm(spec.hidden_size, eps)
        self.mlp = MLP(spec)

    def forward(
        self, h: torch.Tensor, plan: StepPlan, k_cache: torch.Tensor, v_cache: torch.Tensor, rotary: Rotary
    ) -> torch.Tensor:
        x, h = self.post_norm.add_forward(self.attn(self.input_norm(h), plan, k_cache, v_cache, rotary), h)
        return h + self.mlp(x)


def head(spec: ModelSpec) -> nn.Module:
    return NormHead(RMSNorm(spec.hidden_size, spec.options["rms_norm_eps"]), spec.hidden_size, spec.vocab_size)


def checkpoint_map(spec: ModelSpec, layers: range, first: bool, last: bool) -> list[WeightRef]:
    o = spec.options
    refs: list[WeightRef] = []
    if first:
        refs.append(WeightRef(("model.embed_tokens.weight",), "embed.weight"))
    for j, i in enumerate(layers):
        src, dst = f"model.layers.{i}", f"blocks.{j}"
        refs.append(WeightRef((f"{src}.input_layernorm.weight",), f"{dst}.input_norm.weight"))
        refs.append(WeightRef((f"{src}.post_attention_layernorm.weight",), f"{dst}.post_norm.weight"))
        for part in ("q", "k", "v"):
            refs.append(WeightRef((f"{src}.self_attn.{part}_proj.weight",), f"{dst}.attn.qkv.weight", part))
            if o["qkv_bias"]:
                refs.append(WeightRef((f"{src}.self_attn.{part}_proj.bias",), f"{dst}.attn.qkv.bias", part))
        refs.append(WeightRef((f"{src}.self_attn.o_proj.weight",), f"{dst}.attn.o_proj.weight"))
        if o["o_bias"]:
            refs.append(WeightRef((f"{src}.self_attn.o_proj.bias",), f"{dst}.attn.o_proj.bias"))
        for part in ("gate", "up"):
            refs.append(WeightRef((f"{src}.mlp.{part}_proj.weight",), f"{dst}.mlp.gate_up.weight", part))
            if o["mlp_bias"]:
                refs.append(WeightRef((f"{src}.mlp.{part}_proj.bias",), f"{dst}.mlp.gate_up.bias", part))
        refs.append(WeightRef((f"{src}.mlp.down_proj.weight",), f"{dst}.mlp.down.weight"))
        if o["mlp_bias"]:
            refs.append(WeightRef((f"{src}.mlp.down_proj.bias",), f"{dst}.mlp.down.bias"))
    if last:
        refs.append(WeightRef(("model.norm.weight",), "head.norm.weight"))
        # tied: the head IS the embedding (HF ignores a saved lm_head then); untied: lm_head must exist
        tied = ("model.embed_tokens.weight", "lm_head.weight")
        head_keys = tied if spec.tie_word_embeddings else ("lm_head.weight",)
        refs.append(WeightRef(head_keys, "head.lm_head.weight"))
    return refs


def context(spec: ModelSpec, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> Rotary:
    o = spec.options
    return Rotary(spec.head_dim, o["rot_dim"], max_seq_len, o["rope_theta"], o["rope_scaling"], dtype, device)


def attention_inputs(spec: ModelSpec, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, None]:
    """Attention's query: a new contiguous tensor, rotated (fused or not; see Family.attention_inputs)."""
    return torch.zeros(n, spec.num_heads, spec.head_dim, dtype=dtype, device=device), None



FAMILY = Family(
    name="llama",
    embedding=Embedding,
    block=Block,
    head=head,
    checkpoint_map=checkpoint_map,
    context=context,
    attention_inputs=attention_inputs,
)
