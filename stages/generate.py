"""Offline generation through N chained shards in one process — the project's reference path.

Every prompt gets its own KV slot; one prompt pass for all of them, then batched decode steps over the
sequences still running. Shard i runs on `cuda:i` when several GPUs are visible and --device cuda, else
all shards share the one device. Used by `bin/dejavu-generate` and as the in-process baseline of benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bus.stopping import finish_reason
from stages.batch import SeqChunk
from stages.errors import CapacityError, InvalidRequestError
from stages.layers.sampling import SamplingParams, penalize, sample, token_counts
from stages.models.spec import split_layers
from stages.runtime import ShardConfig, ShardRuntime


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str


class LocalPipeline:
    """N shards of one model, chained in this process."""

    def __init__(
        self,
        model_dir: Path,
        stages: int,
        *,
        num_slots: int,
        max_seq_len: int,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        from stages.models import load_spec

        _, spec = load_spec(Path(model_dir))
        ranges = split_layers(spec.num_layers, stages)
        devices = [device] * stages
        if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() >= stages:
            devices = [f"cuda:{i}" for i in range(stages)]
        self.shards = [
            ShardRuntime(ShardConfig(Path(model_dir), r, num_slots, max_seq_len, dtype, d))
            for r, d in zip(ranges, devices)
        ]
        self.spec = spec

    @property
    def max_seq_len(self) -> int:
        return self.shards[0].layout.max_seq_len

    def step(self, chunks: Sequence[SeqChunk], token_ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Run one step through every shard; logits [B, V] (or [N, V]) on the last shard's device."""
        x = self.shards[0].embed_input(token_ids)
        for shard in self.shards:
            x = shard.forward(chunks, x.to(shard.device, non_blocking=True), all_logits=all_logits)
        return x


def validate_request(req: GenerationRequest, vocab: int, max_seq_len: int) -> None:
    if not req.prompt_ids:
        raise InvalidRequestError("empty prompt: give at least one token")
    bad = [t for t in req.prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
    if bad:
        raise InvalidRequestError(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    if len(req.prompt_ids) >= max_seq_len:
        raise InvalidRequestError(
            f"prompt of {len(req.prompt_ids)} tokens leaves no room to generate: the maximum sequence length is "
            f"{max_seq_len}"
        )
    if req.max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")


def generate(pipe: LocalPipeline, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    if len(requests) > pipe.shards[0].layout.num_slots:
        raise CapacityError(f"{len(requests)} requests but only {pipe.shards[0].layout.num_slots} KV slots")
    for r in requests:
        validate_request(r, pipe.spec.vocab_size, pipe.max_seq_len)
    eos = set(pipe.spec.eos_token_ids)
    out = [GenerationResult(list(r.prompt_ids), [], "") for r in requests]
    seq_len = [len(r.prompt_ids) for r in requests]
    live = list(range(len(requests)))
    chunks = [SeqChunk(i, 0, seq_len[i]) for i in live]
    inputs = [t for i in live for t in requests[i].prompt_ids]
    while live:
        logits = pipe.step(chunks, inputs)
        rows = [k for k, i in enumerate(live) if requests[i].sampling.penalized]
        if rows:
            params = [requests[live[k]].sampling for k in rows]
            counts = token_counts([out[live[k]].token_ids for k in rows], logits.shape[1], logits.device)
            logits = penalize(logits, rows, counts, [p.presence_penalty for p in params],
                              [p.frequency_penalty for p in params])
        tokens = sample(logits, [requests[i].sampling for i in live], [seq_len[i] for i in live]).tolist()
        still = []
        for i, tok in zip(live, tokens):
            req, res = requests[i], out[i]
            res.token_ids.append(tok)
            seq_len[i] += 1
            reason = finish_reason(tok, len(res.token_ids), req.max_new_tokens, seq_len[i], pipe.max_seq_len,
                                   eos | set(req.stop_token_ids))
            if reason is None:
                still.append(i)
            else:
                res.finish_reason = reason
        live = still
        chunks = [SeqChunk(i, seq_len[i] - 1, 1) for i in live]
        inputs = [out[i].token_ids[-1] for i in live]
    return out
