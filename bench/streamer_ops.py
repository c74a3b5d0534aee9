"""Measurement primitives of `dejavu-bench streamer` (bench/streamer_bench.py): hardware ceilings, the library's
operations run in this process, and the overhead of layer-by-layer streaming on a real prompt pass.

The library is exercised in-process (`Lib`: the streamer's own movers and transfer engine over endpoints this
process allocates), so figures are the copy paths themselves; bench/streamer_e2e.py adds end-to-end figures
through real streamer processes (and the prompt-pass overhead). Every figure is a median of repeats after a
warm-up.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import zmq
import zmq.asyncio

from streamer import cuda, wire
from streamer.config import StreamerConfig
from streamer.endpoints import Endpoint
from streamer.engine import Runtime, Transfer, local_route
from streamer.layout import PoolLayout, Region
from streamer.movers import CpuMover
from streamer.peer import PeerNet
from streamer.proc import streamer_codec

MiB = 1 << 20


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], Any], sync: Callable[[], Any], warmup: int = 1, repeats: int = 5) -> float:
    for _ in range(warmup):
        fn()
        sync()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return median(out)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


# ------------------------------------------------------------------ ceilings


def ceiling_memcpy(nbytes: int, repeats: int) -> float:
    a, b = torch.empty(nbytes, dtype=torch.uint8).fill_(1), torch.empty(nbytes, dtype=torch.uint8)
    return gbps(nbytes, timed(lambda: b.copy_(a), lambda: None, repeats=repeats))


def ceiling_copy(kind: str, nbytes: int, repeats: int, a: int = 0, b: int = 1) -> float:
    """GPU copy ceilings with the driver's own copies: peer (a -> b), h2d / d2h (pinned), hbm (a -> a, read +
    write bytes counted, as DESIGN.md section 8 reports it); up to 8 copies back to back per timing."""
    if kind == "peer":
        src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{a}")
        dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{b}")
    elif kind == "h2d":
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{a}")
    elif kind == "d2h":
        src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{a}")
        dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{a}")
        dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{a}")

    def sync() -> None:
        torch.cuda.synchronize(a)
        if kind == "peer":
            torch.cuda.synchronize(b)

    # k copies back to back, one wait: the engines' sustained rate - what the operations' streams (many transfers
    # in flight) are measured against - without a host round trip per copy (30 us of a 90 us 31 MiB peer copy)
    k = max(1, min(8, (256 * MiB) // max(1, nbytes)))

    def copies() -> None:
        for _ in range(k):
            dst.copy_(src, non_blocking=True)

    t = timed(copies, sync, warmup=2, repeats=repeats)
    return gbps(k * nbytes * (2 if kind == "hbm" else 1), t)


class NcclPair:
    """NCCL send a -> recv b, one process driving both ranks in group calls (the same P2P transport two
    processes use); the communicators are built once for all sizes."""

    def __init__(self, a: int = 0, b: int = 1) -> None:
        from cupy.cuda import nccl

        self.nccl, self.a, self.b = nccl, a, b
        self.comms = nccl.NcclCommunicator.initAll([a, b])

    def gbps(self, nbytes: int, repeats: int) -> float:
        nccl, a, b = self.nccl, self.a, self.b
        src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{a}")
        dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{b}")
        sa, sb = torch.cuda.current_stream(a), torch.cuda.current_stream(b)

        def once() -> None:
            nccl.groupStart()
            self.comms[0].send(src.data_ptr(), nbytes, nccl.NCCL_UINT8, 1, sa.cuda_stream)
            self.comms[1].recv(dst.data_ptr(), nbytes, nccl.NCCL_UINT8, 0, sb.cuda_stream)
            nccl.groupEnd()

        def sync() -> None:
            torch.cuda.synchronize(a)
            torch.cuda.synchronize(b)

        return gbps(nbytes, timed(once, sync, warmup=2, repeats=repeats))

    def close(self) -> None:
        for c in self.comms:
            c.destroy()


async def ceiling_zmq(nbytes: int, repeats: int, count: int = 8) -> float:
    """ZeroMQ over TCP loopback, `count` frames of `nbytes` in flight: what the frame transport can reach."""
    ctx = zmq.asyncio.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    payload = memoryview(bytearray(nbytes))
    try:
        out = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for _ in range(count):
                await push.send(payload, copy=False)
            for _ in range(count):
                await asyncio.wait_for(pull.recv(copy=False), 30)
            if i:
                out.append(time.perf_counter() - t0)
        return gbps(nbytes * count, median(out))
    finally:
        push.close(0)
        pull.close(0)
        ctx.destroy(0)


async def ceiling_zmq_best(nbytes: int, repeats: int) -> tuple[float, int]:
    """The frame transport's ceiling for moving `nbytes` (8 of them in flight): the best over frame sizes up to
    `nbytes` (1, 4, 8, 16 MiB and `nbytes` itself, at most 64 MiB), since a sender chooses its chunking (the
    streamer's tcp_chunk_bytes) and one huge frame is slower than several smaller ones (4xH200: 3.2 GB/s in
    16 MiB frames, 1.4 GB/s in 64 MiB ones). Returns (GB/s, the frame size that reached it)."""
    total = 8 * min(nbytes, 64 * MiB)
    sizes = sorted({s for s in (MiB, 4 * MiB, 8 * MiB, 16 * MiB) if s < nbytes} | {min(nbytes, 64 * MiB)})
    best = (0.0, 0)
    for s in sizes:
        best = max(best, (await ceiling_zmq(s, repeats, count=max(8, total // s)), s))
    return best


# ------------------------------------------------------------------ the library in this process


class Lib:
    """The streamer's movers and transfer engine over endpoints allocated here (no sockets, no IPC)."""

    def __init__(self, use_cuda: bool, staging_bytes: int = 8 * MiB, lanes: int = 3, layer_wait: str = "host",
                 inline_dma: bool = True, spin_us: float | None = None) -> None:
        self.config = StreamerConfig("bench", "inproc://c", "inproc://d", staging_bytes=staging_bytes,
                                     staging_lanes=lanes, transfer_timeout_s=600.0, layer_wait=layer_wait,
                                     inline_dma=inline_dma,
                                     completion_spin_us=StreamerConfig.completion_spin_us if spin_us is None else spin_us)
        self.gpu_exec, self.cpu_exec = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        self.ctx = zmq.asyncio.Context()
        gm = None
        self.devices = list(range(torch.cuda.device_count())) if use_cuda else []
        if use_cuda:
            from streamer.cuda_mover import GpuMover

            gm = GpuMover(self.devices, staging_bytes, lanes, self.gpu_exec, self.cpu_exec,
                          device_layer_waits=layer_wait == "device", inline_dma=inline_dma,
                          spin_s=self.config.completion_spin_us * 1e-6)
        peers = PeerNet(self.ctx, "bench", streamer_codec("bench", 0), 5.0, 1 << 30, {})
        self.rt = Runtime(self.config, CpuMover(self.cpu_exec, staging_bytes), gm, peers, self.cpu_exec,
                          self.on_gpu, None, set())

    async def on_gpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.gpu_exec, fn, *args)

    async def start(self) -> None:
        # the streamer process's interpreter-lock switch interval (StreamerConfig.switch_interval_us), restored
        # by close(): the library's threads hand work to the loop here as they do there
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(self.config.switch_interval_us * 1e-6)
        if self.rt.gpu is not None:
            await self.on_gpu(cuda.enable_peer_access, self.devices)
            await self.on_gpu(self.rt.gpu.setup)
        gc.collect()  # as the streamer process does after start-up (streamer/proc.py)
        gc.freeze()

    def endpoint(self, name: str, layout: PoolLayout, where: str, kind: int = wire.POOL_STAGE) -> Endpoint:
        """where: "cpu", "pinned", or "cuda:N". GPU stage endpoints get one event per layer, as IPC pools do."""
        if where.startswith("cuda"):
            flat = torch.zeros(layout.nbytes, dtype=torch.uint8, device=where)
            events = [torch.cuda.Event() for _ in range(layout.num_layers)]
            return Endpoint(name, kind, layout, flat, "bench", events=events)
        flat = torch.zeros(layout.nbytes, dtype=torch.uint8, pin_memory=(where == "pinned"))
        return Endpoint(name, kind, layout, flat, "bench")

    def transfer(self, src: Endpoint, region: Region, dst: Endpoint, dst_region: Region, buffered: bool,
                 layered: bool = False, checksum: bool = False) -> Transfer:
        route = local_route(src, region, dst, dst_region, self.config.staging_bytes, layered)
        return Transfer(self.rt, "bench", 0, "", src, [route], layered=layered, checksum=checksum,
                        buffered=buffered, deadline_s=self.config.transfer_timeout_s, notify=[])

    def sync(self) -> None:
        for d in self.devices:
            torch.cuda.synchronize(d)

    async def measure(self, src: Endpoint, region: Region, dst: Endpoint, dst_region: Region, buffered: bool,
                      repeats: int, concurrent: int = 8,
                      stream_of: list[tuple[Region, Region]] | None = None) -> dict[str, float]:
        """Latency of one transfer (wall clock, host overhead included) and the throughput of a stream of
        transfers with `concurrent` in flight (what a stream of layers sustains): 32 of them (8 of 64 MiB and
        more), each planned when its turn comes, so one's planning and issue overlap the others' copies as in a
        prompt pass streamed layer by layer; the stream's start and end are inside the clock. `stream_of`: the
        (source, destination) regions the stream takes in turn - a stage's layers one after another, as a
        prompt pass sends them (the same region over and over has the copies in flight write the same memory);
        then the same-region stream is reported too (stream_gbps_same_region).

        The stream is `concurrent` workers, each starting its next transfer when its last one is done (as
        bench/probe_remote.py drives it): the harness adds a task per worker, not one per transfer plus a
        semaphore wait, to the loop whose time per transfer is what these figures measure. One stream is run
        untimed first; the figure is the median of `repeats` streams (each only ~3 ms for prompt layers, so
        one host hiccup moves a single sample: stream_gbps_min / _max show the spread)."""
        nbytes = region.nbytes(src.layout)
        count = 32 if nbytes < 64 * MiB else concurrent

        async def batch(k: int, window: int, regions: list[tuple[Region, Region]]) -> float:
            todo = iter(range(k))

            async def worker() -> None:
                for i in todo:  # shared: a worker takes the next transfer when its last one is done
                    a, b = regions[i % len(regions)]
                    await self.transfer(src, a, dst, b, buffered).run()

            self.sync()
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(min(window, k))))
            self.sync()
            return time.perf_counter() - t0

        async def streams(regions: list[tuple[Region, Region]]) -> list[float]:
            await batch(count, concurrent, regions)  # warm-up of the stream (events and lanes of 8 in flight)
            return [await batch(count, concurrent, regions) for _ in range(max(1, repeats))]

        same = [(region, dst_region)]
        await batch(1, 1, same)  # warm-up (index upload, allocator)
        single = median([await batch(1, 1, same) for _ in range(repeats)])
        timed = await streams(stream_of or same)
        out = {"bytes": nbytes, "latency_us": single * 1e6, "gbps": gbps(nbytes, single),
               "stream_gbps": gbps(nbytes * count, median(timed)), "stream_transfers": count,
               "in_flight": concurrent, "stream_samples": len(timed),
               "stream_gbps_min": gbps(nbytes * count, max(timed)),
               "stream_gbps_max": gbps(nbytes * count, min(timed))}
        if stream_of:
            out["stream_regions"] = len(stream_of)
            out["stream_gbps_same_region"] = gbps(nbytes * count, median(await streams(same)))
        return out

    async def close(self) -> None:
        sys.setswitchinterval(getattr(self, "_switch", sys.getswitchinterval()))
        gc.unfreeze()
        self.gpu_exec.shutdown()
        self.cpu_exec.shutdown()
        self.ctx.destroy(0)
