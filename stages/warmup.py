"""A restored stage's first steps, prepared before they run (issue 18).

A restarted GPU stage met every decode shape of its restored microbatches at its first steps: cuDNN compiled
their attention (a plan per shape and strides, ~0.4 s each) and the process captured their graphs, 1.8 s on an
OPT-13B H100 stage before its first token (bench/NOTES.md, the failure section). A `Restore`'s lengths name those
graphs (`first_step_keys`), so `RestoreWarmup` queues on the stage's compute thread, ahead of any step:
cuDNN's attention for each shape (`AttentionWarmup`: needs no weights, so it runs while they load and the KV
arrives), then the graphs' captures once the weights are in. PyTorch keeps cuDNN attention plans per thread
(aten/src/ATen/native/cudnn/MHA.cpp: `thread_local`), so all of it runs on the thread that runs the steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import torch

from stages.batch import SeqChunk
from stages.graphs import Key, decode_key, decode_plan, padding_index
from stages.kv_cache import KVPool
from stages.layers.attention import attend
from stages.models import load_spec
from stages.models.spec import ModelSpec
from stages.runtime import ShardConfig, ShardRuntime, pool_layout

log = logging.getLogger(__name__)


def first_step_keys(lengths: Sequence[int], range_size: int, bucket: int, max_seq: int, num_slots: int,
                    ahead: int = 8, in_place: bool = True) -> list[Key]:
    """The graphs of the first decode steps of microbatches whose slots hold `lengths` tokens (0: empty; one
    microbatch per range of `range_size` slots): each range's step now and `ahead` tokens on (a restore's replay
    may cross into the next key bucket), in order, once each. in_place: at the ranges' own slots; else every
    range as if at slot 0 (where it computes is not known: a swapped microbatch's frame)."""
    out: list[Key] = []
    for s0 in range(0, len(lengths), range_size):
        at = s0 if in_place else 0
        members = [(s, n) for s, n in enumerate(lengths[s0 : s0 + range_size], at) if n > 0]
        for extra in (0, ahead):
            key = decode_key([SeqChunk(s, min(n + extra, max_seq - 1), 1) for s, n in members], range_size, bucket,
                             max_seq, num_slots)
            if key is not None and key not in out:
                out.append(key)
    return out


class AttentionWarmup:
    """cuDNN's attention for decode graphs, compiled before the steps that need them: layer 0's attention of each
    graph's plan over the pool (read only: a zero query laid out as the family's block lays it out, nothing
    written). Call `warm` on the thread that runs the steps."""

    def __init__(self, family: Any, spec: ModelSpec, pool: KVPool, range_size: int, bucket: int) -> None:
        self.family = family
        self.spec = spec
        self.pool = pool
        self.range_size = range_size
        self.bucket = bucket
        self.max_seq = pool.layout.max_seq_len
        self.num_slots = pool.layout.num_slots
        self.done: set[tuple[str, int, int]] = set()  # (kind, batch, keys): what cuDNN keys a compile by

    def keys(self, lengths: Sequence[int], ahead: int = 8) -> list[Key]:
        """first_step_keys of `lengths` (per logical slot: with swapping, more than the pool holds - a range
        computes in a frame of the same size, so its graphs are those of a range at slot 0) whose attention is
        not warmed yet, one per layout."""
        out: list[Key] = []
        seen = set(self.done)
        for key in first_step_keys(lengths, self.range_size, self.bucket, self.max_seq, self.num_slots, ahead,
                                   in_place=False):
            ident = self._ident(key)
            if ident not in seen:
                seen.add(ident)
                out.append(key)
        return out

    def warm(self, key: Key) -> float:
        """Run the attention of graph `key` once, on its own stream (not behind a weight load's copies); seconds."""
        t0 = time.perf_counter()
        dev = self.pool.device
        index = padding_index(key, self.range_size, self.max_seq, dev)
        plan = decode_plan(key, index, self.spec.sliding_window)
        q, slopes = self.family.attention_inputs(self.spec, index.shape[1], self.pool.layout.dtype, dev)
        side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            attend(q, self.pool.k(0), self.pool.v(0), plan, self.spec.head_dim**-0.5, alibi_slopes=slopes)
        if side is not None:
            side.synchronize()
        self.done.add(self._ident(key))
        return time.perf_counter() - t0

    @staticmethod
    def _ident(key: Key) -> tuple[str, int, int]:
        kind, a, keys = key
        return (kind, 0 if kind == "range" else a, keys)  # every range has one layout: its slots' offset aside


class RestoreWarmup:
    """What a stage queues on its compute thread when a `Restore` comes: the attention warm-up of its
    microbatches' first decode shapes, then their graphs' captures (at once when the weights are in, else from
    `loaded`, before any step can run). Captures are left out with swapping: a microbatch's frame is not known."""

    def __init__(self, compute: Executor, shard: ShardConfig, attention: AttentionWarmup | None,
                 capture: bool) -> None:
        self.compute = compute
        self.shard = shard
        self.attention = attention
        self.capture = capture
        self.runtime: ShardRuntime | None = None
        self.due: list[Key] = []  # graphs to capture once the weights are in

    @classmethod
    def for_stage(cls, compute: Executor, shard: ShardConfig, pool_memory: torch.Tensor | None,
                  swapping: bool) -> RestoreWarmup | None:
        """For a CUDA stage with graphs (None elsewhere); cuDNN's warm-up where cuDNN may run (not "off") over
        the pool the stage computes in."""
        if not (shard.device.startswith("cuda") and shard.cuda_graphs):
            return None
        attention = None
        if shard.cudnn_attention != "off" and pool_memory is not None:
            family, spec = load_spec(Path(shard.model_dir))
            pool = KVPool(pool_layout(shard), pool_memory, pool_memory.device)
            attention = AttentionWarmup(family, spec, pool, shard.range_size or shard.num_slots, shard.graph_bucket)
        return cls(compute, shard, attention, not swapping)

    def restore(self, lengths: list[int]) -> Coroutine[None, None, None] | None:
        """Queue the preparation of the first steps of microbatches of `lengths` now; what logs the warm-up once
        done (None: nothing warmed). Event loop thread."""
        logged = self._warm(lengths) if self.attention is not None else None
        if self.capture:
            shard = self.shard
            self.due = first_step_keys(lengths, shard.range_size or shard.num_slots, shard.graph_bucket,
                                       shard.max_seq_len, shard.num_slots)
            self._capture_due()
        return logged

    def loaded(self, runtime: ShardRuntime) -> None:
        """The weights are in: the due captures are queued (before the stage lets any step run)."""
        self.runtime = runtime
        self._capture_due()

    def _warm(self, lengths: list[int]) -> Coroutine[None, None, None] | None:
        warmup = self.attention
        assert warmup is not None
        keys = warmup.keys(lengths)
        if not keys:
            return None
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        runs = [loop.run_in_executor(self.compute, warmup.warm, key) for key in keys]

        async def logged() -> None:
            results = await asyncio.gather(*runs, return_exceptions=True)
            failed = [(k, r) for k, r in zip(keys, results) if isinstance(r, BaseException)]
            for key, e in failed:  # a step compiles it on first use, as without the warm-up
                log.warning("[graphs] warm-up of decode attention %s failed: %r", key, e)
            took = ", ".join(f"{k[0]} {k[2]} keys {r:.3f} s" for k, r in zip(keys, results)
                             if not isinstance(r, BaseException))
            log.info("[graphs] decode attention of %d restored graph shape(s) warmed in %.3f s: %s",
                     len(keys) - len(failed), time.monotonic() - t0, took)

        return logged()

    def _capture_due(self) -> None:
        runtime = self.runtime
        if runtime is None or not self.due:
            return
        loop = asyncio.get_running_loop()
        for key in self.due:
            loop.run_in_executor(self.compute, runtime.prepare_graph, key).add_done_callback(
                lambda f, key=key: _capture_failed(key, f))
        self.due = []


def _capture_failed(key: Key, f: asyncio.Future[bool]) -> None:
    if not f.cancelled() and f.exception() is not None:  # the step captures it on first use
        log.warning("[graphs] capture of %s ahead of its first step failed: %r", key, f.exception())
