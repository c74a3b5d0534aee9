"""`DecoderShard`: layers [a, b) of a decoder-only model, plus the embedding on the first shard and the final
norm + LM head on the last. Families (one file each) supply the pieces through a `Family` record.

Forward contract (flat layout, see stages/batch.py):
    first shard:   inputs = token ids [N] (long)      else: hidden states [N, hidden]
    last shard:    returns logits [B, vocab] for each chunk's last token (or [N, vocab] with all_logits)
    other shards:  returns hidden states [N, hidden]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stages.batch import StepPlan
from stages.kv_cache import KVPool
from stages.layers.attention import kv_listener
from stages.models.spec import ModelSpec


@dataclass(frozen=True)
class WeightRef:
    """One checkpoint tensor -> one parameter (part). `keys` are candidates, first present wins (tied heads)."""

    keys: tuple[str, ...]
    param: str
    shard_id: str | None = None


@dataclass(frozen=True)
class Family:
    name: str  # as in stages/models/spec.py's ARCHITECTURES (which also parses the family's config.json)
    embedding: Callable[[ModelSpec], nn.Module]
    block: Callable[[ModelSpec, int], nn.Module]
    head: Callable[[ModelSpec], nn.Module]
    checkpoint_map: Callable[[ModelSpec, range, bool, bool], list[WeightRef]]
    # Per-shard tables shared by all layers (rotary cos/sin, ALiBi slopes): (spec, max_seq, dtype, device) -> ctx
    context: Callable[[ModelSpec, int, torch.dtype, torch.device], Any]
    # What a block hands `attend` for N tokens, from zeros: (query [N, H, D] with the block's own strides, ALiBi
    # slopes or None). cuDNN compiles its attention per shape *and strides*, so a warm-up ahead of a step
    # (stages/warmup.AttentionWarmup) must pass the very layout the block will.
    attention_inputs: Callable[[ModelSpec, int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor | None]]


class NormHead(nn.Module):
    """Final norm + LM head, for families whose head is just that (Llama: RMSNorm, BLOOM: LayerNorm)."""

    def __init__(self, norm: nn.Module, hidden: int, vocab: int) -> None:
        super().__init__()
        from stages.layers.linear import Linear

        self.norm = norm
        self.lm_head = Linear(hidden, vocab, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


class DecoderShard(nn.Module):
    def __init__(self, family: Family, spec: ModelSpec, layers: range) -> None:
        super().__init__()
        self.family, self.spec, self.layers = family, spec, layers
        self.is_first = layers.start == 0
        self.is_last = layers.stop == spec.num_layers
        self.embed = family.embedding(spec) if self.is_first else None
        self.blocks = nn.ModuleList([family.block(spec, i) for i in layers])
        self.head = family.head(spec) if self.is_last else None
        self.ctx: Any = None
        # called with the local layer j right after block j wrote its KV of the step (before its attention and
        # MLP run): how a prompt pass streams its KV layer by layer (streamer.client.attach_kv_hooks). Not
        # called while a CUDA graph is being captured.
        self.kv_hooks: list[Callable[[int], None]] = []

    def setup(self, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        self.ctx = self.family.context(self.spec, max_seq_len, dtype, device)

    def _kv_written(self, j: int) -> None:
        for fn in list(self.kv_hooks):
            fn(j)

    def weight_refs(self) -> Sequence[WeightRef]:
        return self.family.checkpoint_map(self.spec, self.layers, self.is_first, self.is_last)

    @torch.inference_mode()
    def forward(  # type: ignore[override]
        self, inputs: torch.Tensor, plan: StepPlan, pool: KVPool, all_logits: bool = False
    ) -> torch.Tensor:
        h = self.embed(inputs, plan, self.ctx) if self.embed is not None else inputs
        hooks = self.kv_hooks and not (h.is_cuda and torch.cuda.is_current_stream_capturing())
        for j, block in enumerate(self.blocks):
            if hooks:
                with kv_listener(lambda j=j: self._kv_written(j)):  # type: ignore[misc]
                    h = block(h, plan, pool.k(j), pool.v(j), self.ctx)
            else:
                h = block(h, plan, pool.k(j), pool.v(j), self.ctx)
        if self.head is None:
            return h
        if not all_logits:
            h = h.index_select(0, plan.last_rows)
        return self.head(h)
