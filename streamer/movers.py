"""Local movers: how one chunk of packed rows goes from a source endpoint to a destination endpoint in this
process. The CPU mover lives here; the CUDA mover (GPU <-> pinned host, GPU -> GPU by peer copy) in
streamer/cuda.py with the same two-call interface:

    handle = await mover.start(job)     # enqueue (GPU) or do (CPU) the copy; never blocks the event loop
    await mover.finish(handle, timeout) # returns once the bytes are in place and verified, or raises

Buffered (default): gather the chunk's rows into a reusable staging buffer with one kernel, scatter it with one
kernel (on GPU with one copy between). Naive (the ablation): one copy per contiguous piece, no staging.
Heavy CPU work runs on the mover's executor thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from streamer.endpoints import Endpoint
from streamer.integrity import checksum, verify
from streamer.layout import PoolLayout, Region
from streamer.regions import Chunk, PairBlock, common_runs, packed_rows


class RouteIndex:
    """Row maps of one route: packed row i of the route comes from pool row src[i] and goes to pool row dst[i]
    (dst None when the destination is remote). Built on first use - a route that moves pool to pool by DMA
    blocks never needs them (building them for a whole-microbatch swap costs milliseconds). Device copies are
    cached per device by the CUDA mover."""

    def __init__(self, src: torch.Tensor | None, dst: torch.Tensor | None,
                 lazy: tuple[PoolLayout, Region, PoolLayout | None, Region] | None = None) -> None:
        self._src, self._dst, self._lazy = src, dst, lazy
        self.device_cache: dict[Any, torch.Tensor] = {}

    @classmethod
    def build(cls, src: Endpoint, src_region: Region, dst: Endpoint | None, dst_region: Region) -> RouteIndex:
        return cls(None, None, (src.layout, src_region, dst.layout if dst is not None else None, dst_region))

    @property
    def src(self) -> torch.Tensor:
        if self._src is None:
            assert self._lazy is not None
            self._src = packed_rows(self._lazy[0], self._lazy[1])
        return self._src

    @property
    def dst(self) -> torch.Tensor | None:
        if self._dst is None and self._lazy is not None and self._lazy[2] is not None:
            self._dst = packed_rows(self._lazy[2], self._lazy[3])
        return self._dst


@dataclass(frozen=True)
class MoveJob:
    src: Endpoint
    dst: Endpoint
    index: RouteIndex
    chunk: Chunk
    buffered: bool
    checksum: bool
    wait_layer: int | None  # GPU source: wait for the stage's event of this layer before reading
    blocks: list[PairBlock] | None = None  # GPU, long pieces: 2-D DMA pool to pool instead of staging


LONG_RUN_BYTES = 64 * 1024  # on CPU, pieces at least this long are copied directly (see copy_rows_cpu)


def copy_rows_cpu(src: Endpoint, dst: Endpoint, s_idx: torch.Tensor, d_idx: torch.Tensor, staging: torch.Tensor,
                  buffered: bool, check: bool) -> None:
    """Copy packed rows between two CPU endpoints (runs on an executor thread).

    Buffered: gather into the staging buffer with one kernel, scatter with one kernel - unless the pieces are
    long: in host memory a gather + scatter moves every byte twice where a direct copy moves it once, so a
    region made of long runs (a whole microbatch swap) is copied run by run. Naive: always one copy per piece."""
    n, words = s_idx.numel(), src.rows.shape[1]
    runs = common_runs(s_idx, d_idx)
    direct = not buffered or n * src.layout.row_bytes >= LONG_RUN_BYTES * runs.shape[0]
    expected = None
    if direct:
        if check:
            expected = checksum(src.rows.index_select(0, s_idx))
        for s, d, k in runs.tolist():  # one copy per contiguous piece
            dst.rows[d: d + k].copy_(src.rows[s: s + k])
    else:
        packed = staging[: n * words].view(n, words)
        torch.index_select(src.rows, 0, s_idx, out=packed)  # gather: one kernel
        if check:
            expected = checksum(packed)
        dst.rows.index_copy_(0, d_idx, packed)  # scatter: one kernel
    if check:
        verify(expected, checksum(dst.rows.index_select(0, d_idx)), f"{src.name} -> {dst.name}")


def _runs_if_long(idx: torch.Tensor, row_bytes: int, buffered: bool) -> list[list[int]] | None:
    """The contiguous pieces (pool row, -, rows) to copy one by one: always when naive, and when buffered if
    they are long (LONG_RUN_BYTES on average) - a memcpy per long piece runs at the memory's speed where an
    index kernel over every row does not (CPU box: 10.2 vs 4.6 GB/s gathering a prompt layer, 10.2 vs 8.5
    scattering it). None: one index kernel."""
    runs = common_runs(idx, idx)
    if buffered and idx.numel() * row_bytes < LONG_RUN_BYTES * runs.shape[0]:
        return None
    return runs.tolist()


def gather_cpu(src: Endpoint, s_idx: torch.Tensor, buffered: bool, buf: torch.Tensor) -> torch.Tensor:
    """The packed rows, gathered into `buf` (uint8, large enough): the bytes of a frame leaving the process."""
    words = src.rows.shape[1]
    out = buf[: s_idx.numel() * words * src.rows.element_size()].view(src.rows.dtype).view(-1, words)
    runs = _runs_if_long(s_idx, src.layout.row_bytes, buffered)
    if runs is None:
        return torch.index_select(src.rows, 0, s_idx, out=out)
    at = 0
    for s, _, k in runs:
        out[at: at + k].copy_(src.rows[s: s + k])
        at += k
    return out


def scatter_cpu(dst: Endpoint, d_idx: torch.Tensor, packed: torch.Tensor, buffered: bool) -> None:
    runs = _runs_if_long(d_idx, dst.layout.row_bytes, buffered)
    if runs is None:
        dst.rows.index_copy_(0, d_idx, packed)
        return
    at = 0
    for _, d, k in runs:
        dst.rows[d: d + k].copy_(packed[at: at + k])
        at += k


class SendBuffers:
    """Reusable host buffers for outgoing frames. Fresh multi-MiB allocations are mmap'd and page-faulted on
    every use (measured: a 4 MiB gather into new memory took 12 ms, into a reused buffer under 1 ms). A
    buffer comes back only once its chunk was acknowledged (so ZeroMQ has long sent it); a buffer whose
    chunk failed is dropped instead (ZeroMQ may still be sending it)."""

    def __init__(self, nbytes: int, keep: int) -> None:
        self.nbytes, self.keep = nbytes, keep
        self._free: list[torch.Tensor] = []

    def acquire(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.nbytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        return self._free.pop() if self._free else torch.empty(self.nbytes, dtype=torch.uint8)

    def release(self, buf: torch.Tensor) -> None:
        if buf.numel() == self.nbytes and len(self._free) < self.keep:
            self._free.append(buf)


class CpuMover:
    """CPU endpoint -> CPU endpoint (shared-memory stage pools, host pools, memory-mapped disk pools)."""

    def __init__(self, executor: Executor, staging_bytes: int) -> None:
        self._executor = executor
        # one executor thread -> one staging buffer is enough and is reused by every chunk
        self._staging = torch.empty(-(-staging_bytes // 8), dtype=torch.int64)

    def _staging_for(self, src: Endpoint) -> torch.Tensor:
        return self._staging.view(torch.uint8).view(src.rows.dtype)

    async def start(self, job: MoveJob) -> None:
        c = job.chunk
        s_idx = job.index.src[c.r0: c.r1]
        assert job.index.dst is not None
        d_idx = job.index.dst[c.r0: c.r1]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, copy_rows_cpu, job.src, job.dst, s_idx, d_idx,
                                   self._staging_for(job.src), job.buffered, job.checksum)

    async def finish(self, handle: None, timeout: float) -> None:
        return None
