"""OPT family (OPTForCausalLM): learned positions (offset 2), LayerNorm before (125m, 1.3b+) or after (350m)
each sub-layer, biased projections, ReLU MLP, optional project_in/out when word_embed_proj_dim differs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stages.batch import StepPlan
from stages.layers.activations import activation
from stages.layers.attention import attend, write_kv
from stages.layers.linear import Linear, MergedLinear, default_weight_loader
from stages.layers.norms import LayerNorm
from stages.models.base import Family, WeightRef
from stages.models.spec import ModelSpec

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (a fairseq legacy)


def _param(*shape: int) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = default_weight_loader  # type: ignore[attr-defined]
    return p


class Embedding(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        proj = spec.options["proj_dim"]
        self.tokens = _param(spec.vocab_size, proj)
        self.positions = _param(spec.max_positions + POSITION_OFFSET, spec.hidden_size)
        self.project_in = Linear(proj, spec.hidden_size, bias=False) if proj != spec.hidden_size else None

    def forward(self, ids: torch.Tensor, plan: StepPlan, ctx: Any) -> torch.Tensor:
        h = nn.functional.embedding(ids, self.tokens)
        if self.project_in is not None:
            h = self.project_in(h)
        return h + nn.functional.embedding(plan.positions + POSITION_OFFSET, self.positions)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        o, d = spec.options, spec.hidden_size
        self.pre = o["pre_norm"]
        self.heads, self.head_dim = spec.num_heads, spec.head_dim
        self.qkv = MergedLinear(d, [("q", d), ("k", d), ("v", d)], o["bias"])
        self.out_proj = Linear(d, d, o["bias"])
        self.attn_norm = LayerNorm(d, 1e-5, o["affine"])
        self.fc1 = Linear(d, spec.intermediate_size, o["bias"])
        self.fc2 = Linear(spec.intermediate_size, d, o["bias"])
        self.mlp_norm = LayerNorm(d, 1e-5, o["affine"])
        self.act = activation(o["act"])
        self.scale = spec.head_dim**-0.5

    def _attn(self, x: torch.Tensor, plan: StepPlan, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).unbind(1)  # each [N, H, D]
        write_kv(k_cache, v_cache, k, v, plan)
        return self.out_proj(attend(q, k_cache, v_cache, plan, self.scale))

    def forward(
        self, h: torch.Tensor, plan: StepPlan, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Any
    ) -> torch.Tensor:
        if self.pre:
            h = h + self._attn(self.attn_norm(h), plan, k_cache, v_cache)
            return h + self.fc2(self.act(self.fc1(self.mlp_norm(h))))
        h = self.attn_norm(h + self._attn(h, plan, k_cache, v_cache))
        return self.mlp_norm(h + self.fc2(self.act(self.fc1(h))))


class Head(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        o, d = spec.options, spec.hidden_size
        self.norm = LayerNorm(d, 1e-5, o["affine"]) if o["final_norm"] else None
        self.project_out = Linear(d, o["proj_dim"], bias=False) if o["proj_dim"] != d else None
        self.lm_head = Linear(o["proj_dim"], spec.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.lm_head(h)


def checkpoint_map(spec: ModelSpec, layers: range, first: bool, last: bool) -> list[WeightRef]:
    o = spec.options
    ln = ("weight", "bias") if o["affine"] else ()
    lin = ("weight", "bias") if o["bias"] else ("weight",)
    pre = "model.decoder"
    refs: list[WeightRef] = []
    if first:
        refs.append(WeightRef((f"{pre}.embed_tokens.weight",), "embed.tokens"))
        refs.append(WeightRef((f"{pre}.embed_positions.weight",), "embed.positions"))
        if o["proj_dim"] != spec.hidden_size:
            refs.append(WeightRef((f"{pre}.project_in.weight",), "embed.project_in.weight"))
    for j, i in enumerate(layers):
        src, dst = f"{pre}.layers.{i}", f"blocks.{j}"
        for t in lin:
            for part in ("q", "k", "v"):
                refs.append(WeightRef((f"{src}.self_attn.{part}_proj.{t}",), f"{dst}.qkv.{t}", part))
            refs.append(WeightRef((f"{src}.self_attn.out_proj.{t}",), f"{dst}.out_proj.{t}"))
            refs.append(WeightRef((f"{src}.fc1.{t}",), f"{dst}.fc1.{t}"))
            refs.append(WeightRef((f"{src}.fc2.{t}",), f"{dst}.fc2.{t}"))
        for t in ln:
            refs.append(WeightRef((f"{src}.self_attn_layer_norm.{t}",), f"{dst}.attn_norm.{t}"))
            refs.append(WeightRef((f"{src}.final_layer_norm.{t}",), f"{dst}.mlp_norm.{t}"))
    if last:
        if o["final_norm"]:
            for t in ln:
                refs.append(WeightRef((f"{pre}.final_layer_norm.{t}",), f"head.norm.{t}"))
        if o["proj_dim"] != spec.hidden_size:
            refs.append(WeightRef((f"{pre}.project_out.weight",), "head.project_out.weight"))
        tied = (f"{pre}.embed_tokens.weight", "lm_head.weight")
        refs.append(WeightRef(tied if spec.tie_word_embeddings else ("lm_head.weight",), "head.lm_head.weight"))
    return refs


def context(spec: ModelSpec, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
    return None


def attention_inputs(spec: ModelSpec, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, None]:
    """Block._attn's query: one head-major third of the merged q|k|v projection (see Family.attention_inputs)."""
    return torch.zeros(n, 3, spec.num_heads, spec.head_dim, dtype=dtype, device=device).unbind(1)[0], None



FAMILY = Family(
    name="opt",
    embedding=Embedding,
    block=Block,
    head=Head,
    checkpoint_map=checkpoint_map,
    context=context,
    attention_inputs=attention_inputs,
)
