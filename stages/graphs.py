"""CUDA graphs for decode steps: one replay instead of ~1,400 kernel launches from Python.

A decode step of a shard is host-bound in eager mode (an 8B-shaped model on an H100: ~19 ms of launches for
~8 ms of device work). `DecodeGraphs` captures the shard's forward once per shape and replays it:

- "range" graphs serve a step that decodes every slot of one microbatch range [s0, s0 + R) (the scheduler
  gives each microbatch a fixed, aligned range): keys are read through a fixed slice of the pool, no copy;
- "batch" graphs serve any other decode step, padded to a power-of-two batch; keys are gathered by slot
  index. Padding rows use a slot that is not in the step and write their K/V at position max_seq_len - 1
  (which every sequence writes before it ever reads it); their outputs are dropped.

Keys are read up to a bucket boundary (`bucket` tokens) and masked by position, so one graph serves every
step whose longest sequence fits its bucket. Static buffers live with their graph; a step's values are
copied in (one host-to-device copy), the graph replays, and a fresh output tensor comes back. All graphs
share one memory pool (they never run concurrently). Compute thread of a stage; CUDA only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stages.batch import AttnGroup, SeqChunk, StepPlan

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # [B] token ids (first shard) or [B, hidden]
    index: torch.Tensor  # [2, B]: row 0 = slot of each row, row 1 = its position
    output: torch.Tensor


Key = tuple[str, int, int]  # ("range", s0, keys) | ("batch", padded batch, keys)


class DecodeGraphs:
    def __init__(self, runtime, range_size: int, bucket: int = 256) -> None:  # type: ignore[no-untyped-def]
        self.rt = runtime
        self.range_size = range_size
        self.bucket = bucket
        self.graphs: dict[Key, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.max_seq = runtime.layout.max_seq_len
        self.num_slots = runtime.layout.num_slots

    def key(self, chunks: Sequence[SeqChunk]) -> Key | None:
        return decode_key(chunks, self.range_size, self.bucket, self.max_seq, self.num_slots)

    def prepare(self, key: Key) -> _Graph:
        """Graph `key`, captured now unless it was (a restored stage captures its microbatches' graphs before
        their first steps; a step captures its own on first use)."""
        g = self.graphs.get(key)
        if g is None:
            t0 = time.perf_counter()
            g = self.graphs[key] = self._capture(key)  # (its warm-up was waited for; the capture runs nothing)
            log.info("[graphs] captured %s in %.3f s (graph %d of this process)", key, time.perf_counter() - t0,
                     len(self.graphs))
        return g

    def run(self, key: Key, chunks: Sequence[SeqChunk], inputs: torch.Tensor) -> torch.Tensor:
        g = self.prepare(key)
        kind, a, _ = key
        b = g.inputs.shape[0]
        # one pinned host tensor (index rows 0-1, then the step's rows), built in Python lists and copied once:
        # pageable copies wait for the stream and stage their bytes, and per-row tensor ops cost host time the
        # GPU idles through (issue 20's lean step: bench/profile_step.py --gaps on a stage's trace)
        n = len(chunks)
        if kind == "range":
            rows = [c.slot - a for c in chunks]
            slots = list(range(a, a + b))
        else:
            rows = list(range(n))
            used = {c.slot for c in chunks}
            spare = next((s for s in range(self.num_slots) if s not in used), chunks[0].slot)
            slots = [c.slot for c in chunks] + [spare] * (b - n)  # padding rows (only exist when some slot is free)
        positions = [self.max_seq - 1] * b
        for r, c in zip(rows, chunks):
            positions[r] = c.start
        host = torch.tensor(slots + positions + rows, dtype=torch.long, pin_memory=True)
        dev = host.to(g.index.device, non_blocking=True)
        g.index.copy_(dev[: 2 * b].view(2, b))
        rows_dev = dev[2 * b :]
        g.inputs.index_copy_(0, rows_dev, inputs)
        g.graph.replay()
        return g.output.index_select(0, rows_dev)

    def _plan(self, key: Key, index: torch.Tensor) -> StepPlan:
        return decode_plan(key, index, self.rt.spec.sliding_window)

    def _capture(self, key: Key) -> _Graph:
        rt = self.rt
        dev = rt.device
        index = padding_index(key, self.range_size, self.max_seq, dev)
        b = index.shape[1]
        if rt.is_first:
            inputs = torch.zeros(b, dtype=torch.long, device=dev)
        else:
            inputs = torch.zeros(b, rt.spec.hidden_size, dtype=rt.dtype, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        t0 = time.perf_counter()
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up kernels and workspaces outside the capture
                rt.shard(inputs, self._plan(key, index), rt.pool)
        side.synchronize()
        log.info("[graphs] warm-up of %s: %.3f s", key, time.perf_counter() - t0)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = rt.shard(inputs, self._plan(key, index), rt.pool)
        return _Graph(graph, inputs, index, output)


def decode_key(chunks: Sequence[SeqChunk], range_size: int, bucket: int, max_seq: int, num_slots: int) -> Key | None:
    """The graph that serves a decode step of `chunks` (None: not a decode step)."""
    if not chunks or any(c.length != 1 for c in chunks):
        return None
    need = max(c.start for c in chunks) + 1
    keys = min(max_seq, -(-need // bucket) * bucket)
    slots = sorted(c.slot for c in chunks)
    s0 = slots[0]
    r = range_size
    if s0 % r == 0 and slots == list(range(s0, s0 + r)) and s0 + r <= num_slots:
        return ("range", s0, keys)
    padded = 1
    while padded < len(chunks):
        padded *= 2
    return ("batch", min(padded, num_slots), keys)


def padding_index(key: Key, range_size: int, max_seq: int, device: torch.device) -> torch.Tensor:
    """[2, B] (slot, position) of a graph's rows before any step: its own slots (range) or slot 0 (batch), at
    position max_seq - 1 (which every sequence writes before it ever reads it)."""
    kind, a, _ = key
    b = range_size if kind == "range" else a
    index = torch.empty(2, b, dtype=torch.long, device=device)
    index[0] = torch.arange(a, a + b, device=device) if kind == "range" else 0
    index[1] = max_seq - 1
    return index


def decode_plan(key: Key, index: torch.Tensor, sliding_window: int | None) -> StepPlan:
    """A decode plan whose tensors are the graph's static buffers (masks computed inside the graph)."""
    kind, a, keys = key
    slots, positions = index[0], index[1]
    b = slots.shape[0]
    dev = index.device
    k = torch.arange(keys, device=dev)[None, :]
    allowed = k <= positions[:, None]
    if sliding_window is not None:
        allowed &= k > positions[:, None] - sliding_window
    mask = allowed.view(b, 1, 1, keys)
    kv_slots: slice | torch.Tensor = slice(a, a + b) if kind == "range" else slots
    group = AttnGroup(batch=b, width=1, kv_slots=kv_slots, kv_len=keys, causal=False, mask=mask,
                      q_pos=positions.view(b, 1), view_shape=(b, 1))
    chunks = tuple(SeqChunk(i, 0, 1) for i in range(b))  # only their count is used downstream
    return StepPlan(chunks, b, positions, slots, torch.arange(b, device=dev), [group])
