"""The CUDA mover: chunks of packed rows between GPU pools and host memory, on the streamer's own streams.

Runs in the streamer process. CUDA calls are made on the one GPU thread (`executor`), except DMA-only chunks
(pool-to-pool 2-D blocks without checksums), which the event loop's thread enqueues itself when inline_dma is on
(the default; those calls never block). Completion: the loop polls a chunk's event while its copy is expected to
end soon (completion_spin_us), else a waiter thread blocks on it (streamer/cuda.wait_event). Paths (buffered; the naive ablation replaces gather/copy/scatter by one
cudaMemcpyAsync per contiguous piece):

    GPU a -> GPU a      gather (lane stream) -> scatter
    GPU a -> GPU b      gather on a -> one peer copy a->b -> scatter on b      (IPC pools; opened on their owner)
    GPU   -> host pool  gather -> cudaMemcpy2DAsync blocks straight into the host pool (no CPU scatter)
    host  -> GPU        cudaMemcpy2DAsync blocks into staging -> scatter
    GPU   -> bytes      gather -> one copy into a fresh pinned buffer (what a remote transport sends)
    bytes -> GPU        one copy into staging -> scatter (what a remote transport received)
    long blocks         any local pair above as 2-D DMA blocks pool to pool: no staging, no kernel (`_direct`);
                        a decode step's rows too, a block per slot (regions.slot_blocks)

Lanes. Each device has `lanes` (stream, staging buffer) pairs used round-robin, so chunk i+1 gathers while
chunk i copies. A staging buffer may be touched by a stream other than its lane's (the peer copy writes the
destination lane's buffer from the source stream; NCCL uses the link's stream); `Lane.use/used` chain those
uses with events so no stream ever touches a buffer another stream has not finished with.
The source stage's "layer ready" event is waited on by the source device's stream (its owner).
K and V: the packed order puts a layer's K and V next to each other, so one copy moves both; the paper put
them on separate streams to overlap their copies, which the lanes do here across consecutive chunks instead
(gather of chunk i+1 on one stream while chunk i is copied on another) without doubling the copy count.
Pageable host memory (disk pools) makes a copy synchronous on the GPU thread; pinned pools never do.
"""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from streamer.cuda import (
    D2D,
    D2H,
    DEFAULT,
    H2D,
    completion_event,
    copy_2d,
    curt,
    gather_blocks,
    on_device,
    scatter_blocks,
    wait_event,
)
from streamer.endpoints import Endpoint
from streamer.errors import TransferTimeoutError
from streamer.integrity import checksum_parts, digest, verify
from streamer.movers import MoveJob, RouteIndex
from streamer.regions import Block, common_runs, dma_blocks


class Lane:
    def __init__(self, device: int, nbytes: int) -> None:
        self.device = device
        with on_device(device):
            self.stream = torch.cuda.Stream(device)
            self.buf = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", device))
        self.ptr = self.buf.data_ptr()
        self._last: torch.cuda.Event | None = None
        self._last_stream = 0

    def packed(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """[rows, row_words] view of the staging buffer in the dtype of `like` (an endpoint's rows)."""
        words = like.shape[1]
        nbytes = rows * words * like.element_size()
        if nbytes > self.buf.numel():  # plans keep chunks within staging_bytes; never overrun silently
            raise ValueError(f"chunk of {nbytes} bytes exceeds the {self.buf.numel()}-byte staging buffer")
        return self.buf[:nbytes].view(like.dtype).view(rows, words)

    def use(self, stream: torch.cuda.Stream) -> None:
        if self._last is not None and self._last_stream != stream.cuda_stream:
            stream.wait_event(self._last)

    def used(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        ev = completion_event()
        ev.record(stream)
        self._last, self._last_stream = ev, stream.cuda_stream
        return ev


@dataclass
class GpuHandle:
    event: torch.cuda.Event  # all device work of the chunk is done when this completes
    what: str
    nbytes: int
    parts: torch.Tensor | None = None  # pinned int32 [2, 4]: source / destination checksum parts
    cpu_src: Any = None  # callables computing a host-side checksum after completion (host endpoints)
    cpu_dst: Any = None
    result: torch.Tensor | None = None  # GPU -> bytes: the pinned packed rows
    keep: list[Any] = field(default_factory=list)  # everything the device work touches stays alive until done
    lane: Lane | None = None
    spin_s: float = 0.0  # how long the loop polls for completion before parking the wait on a thread
    gathered: Any = None  # NCCL sends: the gather's event (its digest is read once it completes)
    key: Any = None  # the stream `event` was recorded on, when known (wait_event: in-order polling)


# Conservative copy rates (bytes/s) for guessing how long a chunk's device work takes (GpuMover.spin_for): lower
# than measured (H100/H200: HBM ~3 TB/s, NVLink peer 260-390 GB/s, pinned PCIe ~55 GB/s), so a guess errs long
# and a long copy parks its wait on a thread instead of spinning.
_RATE_SAME_DEVICE, _RATE_PEER, _RATE_HOST = 500e9, 200e9, 20e9
_RATE_NCCL = 150e9  # one host's GPUs over NVLink: 167-358 GB/s for 16 MiB-1 GiB (4xH200); across hosts far less


class GpuMover:
    def __init__(self, devices: list[int], staging_bytes: int, lanes: int, gpu: Executor, cpu: Executor,
                 timeout_setting: str = "transfer_timeout_s", device_layer_waits: bool = True,
                 inline_dma: bool = False, spin_s: float = 0.0) -> None:
        self.devices, self.staging_bytes, self.nlanes = devices, staging_bytes, lanes
        self.spin_s = spin_s  # see StreamerConfig.completion_spin_us and spin_for
        # False (layer_wait="host", the streamer's default): the engine has already seen each layer's event fire
        # before it asks for the layer's copies, so no wait on a stage's event is enqueued here
        self.device_layer_waits = device_layer_waits
        self.inline_dma = inline_dma  # see StreamerConfig.inline_dma and start_many
        self._gpu, self._cpu, self._setting = gpu, cpu, timeout_setting
        self.lanes: dict[int, list[Lane]] = {}
        self._rr: dict[int, itertools.count] = {}
        self._retired: list[Any] = []

    def setup(self) -> None:
        """Create lanes, and build the checksum kernel for every device now rather than inside the first checked
        transfer (GPU thread)."""
        for d in self.devices:
            self.lanes[d] = [Lane(d, self.staging_bytes) for _ in range(self.nlanes)]
            self._rr[d] = itertools.count()
            with on_device(d):
                checksum_parts(torch.zeros(1 << 14, dtype=torch.uint8, device=torch.device("cuda", d)))
            torch.cuda.synchronize(d)

    def lane(self, device: int) -> Lane:
        return self.lanes[device][next(self._rr[device]) % self.nlanes]

    async def _on_gpu(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._gpu, fn, *args)

    # ------------------------------------------------------------------ local moves

    async def start(self, job: MoveJob) -> GpuHandle:
        return await self._on_gpu(self._enqueue, job)

    async def start_many(self, jobs: list[MoveJob]) -> list[GpuHandle]:
        """Enqueue several chunks in one hop to the GPU thread (the device orders them; nothing waits) - or,
        with inline_dma, DMA-only chunks right here on the loop's thread: cudaMemcpy2DAsync between device or
        pinned memory and an event record never block, and they touch no lane staging state (`_direct`), so
        they may interleave with the GPU thread's work (CUDA streams take calls from any thread)."""
        now = self.start_now(jobs)
        if now is not None:
            return now
        return await self._on_gpu(lambda: [self._enqueue(j) for j in jobs])

    def start_now(self, jobs: list[MoveJob]) -> list[GpuHandle] | None:
        """With inline_dma, a group of DMA-only chunks enqueued on the calling (loop) thread at once: their
        handles. None: the group goes to the GPU thread (start_many)."""
        if self.inline_dma and all(self._dma_only(j) for j in jobs):
            return [self._enqueue(j) for j in jobs]
        return None

    @staticmethod
    def _dma_only(job: MoveJob) -> bool:
        return job.blocks is not None and not job.checksum and job.src.async_dma and job.dst.async_dma

    def spin_for(self, nbytes: int, src: Endpoint, dst: Endpoint) -> float:
        """The loop polls for a chunk's completion (up to spin_s) when its copy alone is expected to take at most
        a quarter of the spin at a conservative rate for its path - the rest covers the copies queued ahead of it
        when several are in flight (8 prompt layers in flight over 3 lanes wait up to ~3 copies); longer ones
        park on a waiter thread at once."""
        if self.spin_s <= 0:
            return 0.0
        if src.is_cuda and dst.is_cuda:
            rate = _RATE_SAME_DEVICE if src.device == dst.device else _RATE_PEER
        else:
            rate = _RATE_HOST
        return self.spin_s if nbytes / rate <= self.spin_s / 4 else 0.0

    def spin_nccl(self, nbytes: int) -> float:
        """spin_for an NCCL chunk - its send, or its receive + scatter: polled when it is expected to take at
        most half the spin at a conservative rate (a 31 MiB prompt layer and the 64 MiB chunks of a whole prompt
        spin; 128 MiB parks). The chunks of a link run one after another on its stream, and a wait's spin counts
        from when the one ahead completed (cuda._Poller), so no allowance for queued chunks is needed beyond
        that. Polled like a copy for the same reason: a waiter thread's hand-off to a busy loop took longer than
        the transfer (bench/probe_remote.py)."""
        return self.spin_s if self.spin_s > 0 and nbytes / _RATE_NCCL <= self.spin_s / 2 else 0.0

    async def finish(self, handle: GpuHandle, timeout: float) -> None:
        try:
            await wait_event(handle.event, timeout, handle.what, self._setting, handle.spin_s, handle.key)
        except TransferTimeoutError:
            if handle.lane is not None:
                await self._on_gpu(self._retire, handle)
            raise
        if handle.parts is not None or handle.cpu_src is not None or handle.cpu_dst is not None:
            await asyncio.get_running_loop().run_in_executor(self._cpu, self._verify, handle)

    def _verify(self, h: GpuHandle) -> None:
        src = h.cpu_src() if h.cpu_src is not None else h.parts[0].tolist()  # type: ignore[index]
        dst = h.cpu_dst() if h.cpu_dst is not None else h.parts[1].tolist()  # type: ignore[index]
        verify(digest(src, h.nbytes), digest(dst, h.nbytes), h.what)

    def _retire(self, handle: GpuHandle) -> None:
        """A lane whose work never finished (a hung source) is replaced; its memory is kept, never reused."""
        lane = handle.lane
        assert lane is not None
        lanes = self.lanes[lane.device]
        if lane in lanes:
            lanes[lanes.index(lane)] = Lane(lane.device, self.staging_bytes)
        self._retired.append(handle)

    def device_index(self, index: RouteIndex, device: int, which: str) -> torch.Tensor:
        key = (device, which)
        t = index.device_cache.get(key)
        if t is None:
            src = index.src if which == "src" else index.dst
            assert src is not None
            # a blocking copy on the default stream (which our non-blocking lane streams never wait for): the
            # indices are on the device before any lane uses them, and no lane's pending work delays the copy
            t = index.device_cache[key] = self._upload(src, device)
        return t

    @staticmethod
    def _upload(t: torch.Tensor, device: int) -> torch.Tensor:
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.default_stream(device)):
            return t.to(torch.device("cuda", device))

    def wait_source(self, stream: torch.cuda.Stream, src: Endpoint, layer: int | None) -> None:
        if layer is not None and self.device_layer_waits:
            ev = src.layer_event(layer)
            if ev is not None:
                stream.wait_event(ev)  # the stage's "layer ready", waited on its own device

    def _parts(self, h: GpuHandle, row: int, t: torch.Tensor) -> None:
        if h.parts is None:
            h.parts = torch.empty((2, 4), dtype=torch.int32, pin_memory=True)
        h.parts[row].copy_(checksum_parts(t), non_blocking=True)

    def _enqueue(self, job: MoveJob) -> GpuHandle:
        src, dst, c = job.src, job.dst, job.chunk
        rb = src.layout.row_bytes
        what = f"{src.name} -> {dst.name} rows [{c.r0}, {c.r1})"
        # the memory itself, not just the endpoints: a pool closed while this work runs stays mapped until done
        h = GpuHandle(completion_event(), what, c.rows * rb, keep=[job, src.flat, dst.flat])
        h.spin_s = self.spin_for(h.nbytes, src, dst)
        if job.blocks is not None:
            self._direct(job, h)
        elif src.is_cuda and dst.is_cuda:
            self._gpu_to_gpu(job, h)
        elif src.is_cuda:
            self._gpu_to_host(job, h)
        else:
            self._host_to_gpu(job, h)
        return h

    def _gpu_to_gpu(self, job: MoveJob, h: GpuHandle) -> None:
        src, dst, c = job.src, job.dst, job.chunk
        a, b = src.device.index, dst.device.index
        la = self.lane(a)
        sa = la.stream
        h.lane = la
        with on_device(a), torch.cuda.stream(sa):
            self.wait_source(sa, src, job.wait_layer)
            s_idx = self.device_index(job.index, a, "src")[c.r0: c.r1]
            if not job.buffered:
                self._naive_copy(job, h, sa, a, b)
                return
            la.use(sa)
            packed_a = la.packed(c.rows, src.rows)
            torch.index_select(src.rows, 0, s_idx, out=packed_a)  # gather: one kernel
            if job.checksum:
                self._parts(h, 0, packed_a)
            if a == b:
                d_idx = self.device_index(job.index, b, "dst")[c.r0: c.r1]
                dst.rows.index_copy_(0, d_idx, packed_a)  # scatter: one kernel
                if job.checksum:
                    self._parts(h, 1, dst.rows.index_select(0, d_idx))
                h.event = la.used(sa)
                return
            lb = self.lane(b)
            lb.use(sa)
            curt.memcpyPeerAsync(lb.ptr, b, la.ptr, a, h.nbytes, sa.cuda_stream)  # one copy over NVLink
            la.used(sa)
            lb.used(sa)
        sb = lb.stream
        with on_device(b), torch.cuda.stream(sb):
            lb.use(sb)
            packed_b = lb.packed(c.rows, dst.rows)
            if job.checksum:
                self._parts(h, 1, packed_b)
            d_idx = self.device_index(job.index, b, "dst")[c.r0: c.r1]
            dst.rows.index_copy_(0, d_idx, packed_b)
            h.event = lb.used(sb)

    def _direct(self, job: MoveJob, h: GpuHandle) -> None:
        """Long pieces: 2-D DMA blocks straight from pool to pool on a lane stream of the source's device (the
        destination's when the source is host memory). No staging and no kernel: only copy engines run, so
        the stage computing on the same GPU keeps every SM (this is what keeps layer-by-layer streaming off a
        prompt pass's critical path) and a peer copy is pushed over NVLink by the source's engine."""
        src, dst, c = job.src, job.dst, job.chunk
        assert job.blocks is not None
        dev = src.device.index if src.is_cuda else dst.device.index
        lane = self.lane(dev)
        st = lane.stream
        h.lane = lane  # a hung source (its layer event never fires) gets this lane's stream replaced
        kind = (D2D if src.device == dst.device else DEFAULT) if src.is_cuda and dst.is_cuda else \
            (D2H if src.is_cuda else H2D)
        if not job.checksum:  # DMA and one event record only: no current device or stream needed (see _dma)
            self._dma(job, h, st, kind)
            return
        # checksummed: digests of the source and of what landed, on the devices (host side: after completion).
        # Row maps are built for checksums only (0.6 ms of host time per prompt layer, measured).
        sp, dp = src.flat.data_ptr(), dst.flat.data_ptr()
        s_cpu, d_cpu = job.index.src[c.r0: c.r1], job.index.dst[c.r0: c.r1]
        with on_device(dev), torch.cuda.stream(st):
            if src.is_cuda:
                self.wait_source(st, src, job.wait_layer)
                self._parts(h, 0, src.rows.index_select(0, self.device_index(job.index, dev, "src")[c.r0: c.r1]))
            else:
                h.cpu_src = lambda: checksum_parts(src.rows.index_select(0, s_cpu)).tolist()
            for b in job.blocks:
                copy_2d(dp + b.dst_off, b.dst_pitch, sp + b.src_off, b.src_pitch, b.width, b.height, kind, st)
            h.event.record(st)
        if not dst.is_cuda:
            h.cpu_dst = lambda: checksum_parts(dst.rows.index_select(0, d_cpu)).tolist()
            return
        b_dev = dst.device.index
        sb = st if b_dev == dev else self.lane(b_dev).stream
        with on_device(b_dev), torch.cuda.stream(sb):
            sb.wait_event(h.event)
            self._parts(h, 1, dst.rows.index_select(0, self.device_index(job.index, b_dev, "dst")[c.r0: c.r1]))
            h.event = completion_event()
            h.event.record(sb)

    def _dma(self, job: MoveJob, h: GpuHandle, st: torch.cuda.Stream, kind: int) -> None:
        """The direct path without checksums - every prompt layer streamed by default - in as little host time
        as it takes (it is most of a 31 MiB peer transfer's 90 us on H200): a copy may be issued to a stream of
        a device that is not current (CUDA programming guide, "Stream and Event Behavior"; only kernel launches
        and event records need the stream's device, and torch's record and wait switch to it themselves), so
        neither the device nor torch's current stream is switched (those context managers cost ~21 us)."""
        if job.src.is_cuda:
            self.wait_source(st, job.src, job.wait_layer)  # torch's wait switches to the stream's device itself
        sp, dp = job.src.flat.data_ptr(), job.dst.flat.data_ptr()
        for b in job.blocks or ():
            copy_2d(dp + b.dst_off, b.dst_pitch, sp + b.src_off, b.src_pitch, b.width, b.height, kind, st)
        h.event.record(st)
        h.key = id(st)

    def _naive_copy(self, job: MoveJob, h: GpuHandle, stream: torch.cuda.Stream, a: int, b: int) -> None:
        """One cudaMemcpy(Peer)Async per contiguous piece, source pool to destination pool (no staging)."""
        src, dst, c = job.src, job.dst, job.chunk
        rb = src.layout.row_bytes
        assert job.index.dst is not None
        s_cpu, d_cpu = job.index.src[c.r0: c.r1], job.index.dst[c.r0: c.r1]
        if job.checksum:
            self._parts(h, 0, src.rows.index_select(0, self.device_index(job.index, a, "src")[c.r0: c.r1]))
        sp, dp = src.flat.data_ptr(), dst.flat.data_ptr()
        for s, d, k in common_runs(s_cpu, d_cpu).tolist():
            if a == b:
                curt.memcpyAsync(dp + d * rb, sp + s * rb, k * rb, D2D, stream.cuda_stream)
            else:
                curt.memcpyPeerAsync(dp + d * rb, b, sp + s * rb, a, k * rb, stream.cuda_stream)
        ev = completion_event()
        ev.record(stream)
        if job.checksum:
            with on_device(b):
                sb = self.lane(b).stream
                sb.wait_event(ev)
                with torch.cuda.stream(sb):
                    self._parts(h, 1, dst.rows.index_select(0, self.device_index(job.index, b, "dst")[c.r0: c.r1]))
                ev = completion_event()
                ev.record(sb)
        h.event = ev

    def _gpu_to_host(self, job: MoveJob, h: GpuHandle) -> None:
        src, dst, c = job.src, job.dst, job.chunk
        a, rb = src.device.index, src.layout.row_bytes
        assert job.index.dst is not None
        d_cpu = job.index.dst[c.r0: c.r1]
        la = self.lane(a)
        sa = la.stream
        h.lane = la
        host = dst.flat.data_ptr()
        with on_device(a), torch.cuda.stream(sa):
            self.wait_source(sa, src, job.wait_layer)
            s_idx = self.device_index(job.index, a, "src")[c.r0: c.r1]
            if job.buffered:
                la.use(sa)
                packed = la.packed(c.rows, src.rows)
                torch.index_select(src.rows, 0, s_idx, out=packed)
                if job.checksum:
                    self._parts(h, 0, packed)
                # the host side is written by the copy engine, in place
                scatter_blocks(host, la.ptr, dma_blocks(d_cpu, rb), D2H, sa)
                h.event = la.used(sa)
            else:
                if job.checksum:
                    self._parts(h, 0, src.rows.index_select(0, s_idx))
                sp = src.flat.data_ptr()
                for s, d, k in common_runs(job.index.src[c.r0: c.r1], d_cpu).tolist():
                    curt.memcpyAsync(host + d * rb, sp + s * rb, k * rb, D2H, sa.cuda_stream)
                h.event.record(sa)
        if job.checksum:
            h.cpu_dst = lambda: checksum_parts(dst.rows.index_select(0, d_cpu)).tolist()

    def _host_to_gpu(self, job: MoveJob, h: GpuHandle) -> None:
        src, dst, c = job.src, job.dst, job.chunk
        b, rb = dst.device.index, src.layout.row_bytes
        s_cpu = job.index.src[c.r0: c.r1]
        lb = self.lane(b)
        sb = lb.stream
        h.lane = lb
        host = src.flat.data_ptr()
        with on_device(b), torch.cuda.stream(sb):
            d_idx = self.device_index(job.index, b, "dst")[c.r0: c.r1]
            if job.buffered:
                lb.use(sb)
                packed = lb.packed(c.rows, dst.rows)
                gather_blocks(lb.ptr, host, dma_blocks(s_cpu, rb), H2D, sb)
                if job.checksum:
                    self._parts(h, 1, packed)
                dst.rows.index_copy_(0, d_idx, packed)
                h.event = lb.used(sb)
            else:
                assert job.index.dst is not None
                dp = dst.flat.data_ptr()
                for s, d, k in common_runs(s_cpu, job.index.dst[c.r0: c.r1]).tolist():
                    curt.memcpyAsync(dp + d * rb, host + s * rb, k * rb, H2D, sb.cuda_stream)
                if job.checksum:
                    self._parts(h, 1, dst.rows.index_select(0, d_idx))
                h.event.record(sb)
        if job.checksum:
            h.cpu_src = lambda: checksum_parts(src.rows.index_select(0, s_cpu)).tolist()

    # ------------------------------------------------------------------ to / from bytes (remote transports)

    async def read(self, src: Endpoint, index: RouteIndex, r0: int, r1: int, buffered: bool, check: bool,
                   wait_layer: int | None, blocks: list[Block] | None = None) -> GpuHandle:
        """Packed rows [r0, r1) of `src` into pinned host memory. `blocks`: the chunk's DMA blocks when its pieces
        are long (regions.region_blocks, planned once per region shape), used when buffered; then no digest is
        made here even when `check` (finish_read's is None): the caller digests the host bytes on a CPU thread."""
        return await self._on_gpu(self._read, src, index, r0, r1, buffered, check, wait_layer, blocks)

    def _read(self, src: Endpoint, index: RouteIndex, r0: int, r1: int, buffered: bool, check: bool,
              wait_layer: int | None, blocks: list[Block] | None) -> GpuHandle:
        a, rb = src.device.index, src.layout.row_bytes
        la = self.lane(a)
        sa = la.stream
        out = torch.empty((r1 - r0) * rb, dtype=torch.uint8, pin_memory=True)
        h = GpuHandle(completion_event(), f"{src.name} rows [{r0}, {r1}) -> host", out.numel(), result=out, lane=la,
                      keep=[src.flat])
        with on_device(a), torch.cuda.stream(sa):
            self.wait_source(sa, src, wait_layer)
            if blocks is not None and buffered:  # long pieces: pool -> pinned buffer by DMA, no kernel of ours
                gather_blocks(out.data_ptr(), src.flat.data_ptr(), blocks, D2H, sa)  # on the stage's GPU: checked,
                h.event.record(sa)  # the caller digests the landed bytes on the CPU (finish_read returns None)
                return h
            s_idx = self.device_index(index, a, "src")[r0:r1]
            if buffered:
                la.use(sa)
                packed = la.packed(r1 - r0, src.rows)
                torch.index_select(src.rows, 0, s_idx, out=packed)
                if check:
                    self._parts(h, 0, packed)
                curt.memcpyAsync(out.data_ptr(), la.ptr, out.numel(), D2H, sa.cuda_stream)
                h.event = la.used(sa)
            else:
                if check:
                    self._parts(h, 0, src.rows.index_select(0, s_idx))
                sp, at = src.flat.data_ptr(), 0
                for s, _, k in common_runs(index.src[r0:r1], index.src[r0:r1]).tolist():
                    curt.memcpyAsync(out.data_ptr() + at, sp + s * rb, k * rb, D2H, sa.cuda_stream)
                    at += k * rb
                h.event.record(sa)
        return h

    async def finish_read(self, h: GpuHandle, timeout: float) -> tuple[torch.Tensor, int | None]:
        await wait_event(h.event, timeout, h.what, self._setting)
        assert h.result is not None
        return h.result, (digest(h.parts[0].tolist(), h.nbytes) if h.parts is not None else None)

    async def write(self, dst: Endpoint, d_idx_cpu: torch.Tensor, data: torch.Tensor, buffered: bool,
                    check: bool) -> GpuHandle:
        return await self._on_gpu(self._write, dst, d_idx_cpu, data, buffered, check)

    def _write(self, dst: Endpoint, d_idx_cpu: torch.Tensor, data: torch.Tensor, buffered: bool,
               check: bool) -> GpuHandle:
        b, rb = dst.device.index, dst.layout.row_bytes
        lb = self.lane(b)
        sb = lb.stream
        n = d_idx_cpu.numel()
        h = GpuHandle(completion_event(), f"host -> {dst.name} ({n} rows)", n * rb, keep=[data, dst.flat], lane=lb)
        d_idx = self._upload(d_idx_cpu, b)
        h.keep.append(d_idx)
        with on_device(b), torch.cuda.stream(sb):
            if buffered:
                lb.use(sb)
                if n * rb <= lb.buf.numel():
                    packed = lb.packed(n, dst.rows)
                else:  # the sender chunks by its own settings: a chunk larger than our staging gets its own
                    packed = torch.empty((n, dst.rows.shape[1]), dtype=dst.rows.dtype, device=dst.device)
                    h.keep.append(packed)
                curt.memcpyAsync(packed.data_ptr(), data.data_ptr(), n * rb, H2D, sb.cuda_stream)
                if check:
                    self._parts(h, 1, packed)
                dst.rows.index_copy_(0, d_idx, packed)
                h.event = lb.used(sb)
            else:
                dp, at = dst.flat.data_ptr(), 0
                for _, d, k in common_runs(d_idx_cpu, d_idx_cpu).tolist():
                    curt.memcpyAsync(dp + d * rb, data.data_ptr() + at, k * rb, H2D, sb.cuda_stream)
                    at += k * rb
                if check:
                    self._parts(h, 1, dst.rows.index_select(0, d_idx))
                h.event.record(sb)
        return h

    async def finish_write(self, h: GpuHandle, timeout: float) -> int | None:
        """Wait for a write; the destination-side checksum (of what landed), for the caller to verify."""
        await wait_event(h.event, timeout, h.what, self._setting)
        return digest(h.parts[1].tolist(), h.nbytes) if h.parts is not None else None
