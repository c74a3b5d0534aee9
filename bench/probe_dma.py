"""Where does a prompt-layer transfer's time go? Device time of the direct path's 2-D DMA blocks alone (peer
and device-to-host) against one contiguous copy of the same bytes, then the library's transfer (one, and 8 in
flight) and the host time of its enqueue, split into the thread hops, the enqueue, the driver calls and the
waiter's hop, and 8 in flight with their plans made before the clock starts. Run on a 2-GPU machine:
python3 bench/probe_dma.py
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.streamer_ops import Lib  # noqa: E402
from streamer import cuda  # noqa: E402
from streamer.layout import (
    PoolLayout,
    Region,  # noqa: E402
)
from streamer.movers import MoveJob  # noqa: E402
from streamer.regions import pair_blocks  # noqa: E402


def device_time(fn, stream: torch.cuda.Stream, reps: int = 20) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(stream)
    for _ in range(reps):
        fn()
    b.record(stream)
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def host_us(fn, reps: int = 50) -> float:  # type: ignore[no-untyped-def]
    fn()
    xs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return sorted(xs)[reps // 2] * 1e6


async def host_us_async(fn, reps: int = 50) -> float:  # type: ignore[no-untyped-def]
    await fn()
    xs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        await fn()
        xs.append(time.perf_counter() - t0)
    return sorted(xs)[reps // 2] * 1e6


async def main() -> None:
    lay = PoolLayout(0, 16, 16, 1024, 8, 128, torch.bfloat16)
    region = Region.uniform(range(8), (8, 9), 0, 1000)
    nbytes = region.nbytes(lay)
    lib = Lib(True, staging_bytes=16 << 20, inline_dma=False)  # the GPU-thread baseline; "_inline" below
    await lib.start()
    src = lib.endpoint("s", lay, "cuda:0")
    dst = lib.endpoint("d", lay, "cuda:1")
    host = lib.endpoint("h", lay, "pinned")
    blocks = pair_blocks(lay, region, lay, region)
    s0 = torch.cuda.Stream(0)
    out = {"bytes": nbytes, "blocks": len(blocks)}

    def run_blocks(d: torch.Tensor, kind: int) -> None:
        for b in blocks:
            cuda.copy_2d(d.data_ptr() + b.dst_off, b.dst_pitch, src.flat.data_ptr() + b.src_off, b.src_pitch,
                         b.width, b.height, kind, s0)

    flat_a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    flat_b = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    flat_h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    with torch.cuda.device(0), torch.cuda.stream(s0):
        out["peer_2d_gbps"] = nbytes / device_time(lambda: run_blocks(dst.flat, cuda.DEFAULT), s0) / 1e9
        out["peer_1d_gbps"] = nbytes / device_time(lambda: flat_b.copy_(flat_a, non_blocking=True), s0) / 1e9
        out["d2h_2d_gbps"] = nbytes / device_time(lambda: run_blocks(host.flat, cuda.D2H), s0) / 1e9
        out["d2h_1d_gbps"] = nbytes / device_time(lambda: flat_h.copy_(flat_a, non_blocking=True), s0) / 1e9
    async def transfers(name: str, d: Any, suffix: str) -> None:
        lat, steps = [], []
        for _ in range(12):
            lib.sync()
            t = lib.transfer(src, region, d, region, True)
            t.times = {}
            t0, m0 = time.perf_counter(), time.monotonic()
            await t.run()
            lat.append(time.perf_counter() - t0)
            end = time.monotonic()
            lt = t.timeline()[-1]
            steps.append((lt.fired - m0, lt.issued - lt.fired, lt.landed - lt.issued, end - lt.landed))
        out[f"{name}_transfer_latency_us{suffix}"] = sorted(lat)[6] * 1e6
        # where one transfer's time goes: cleared to move (planning, gate), copies issued (GPU thread hop and
        # enqueue), landed (device work + completion wait), returned (task wind-down)
        out[f"{name}_transfer_steps_us{suffix}"] = dict(zip(
            ("cleared", "issued", "landed", "returned"), (sorted(x)[6] * 1e6 for x in zip(*steps))))
        lib.sync()
        t0 = time.perf_counter()
        await asyncio.gather(*(lib.transfer(src, region, d, region, True).run() for _ in range(8)))
        lib.sync()
        out[f"{name}_8_in_flight_gbps{suffix}"] = 8 * nbytes / (time.perf_counter() - t0) / 1e9

    for name, d in (("peer", dst), ("host", host)):
        await transfers(name, d, "")
        t0 = time.perf_counter()
        for _ in range(20):
            lib.transfer(src, region, d, region, True)
        out[f"{name}_plan_us"] = (time.perf_counter() - t0) / 20 * 1e6
    # the same with DMA-only copies enqueued on the loop's thread (StreamerConfig.inline_dma): no thread hops
    lib.rt.gpu.inline_dma = True
    try:
        for name, d in (("peer", dst), ("host", host)):
            await transfers(name, d, "_inline")
    finally:
        lib.rt.gpu.inline_dma = False
    # the issue step's parts, host time: the hop to the GPU thread and back (a no-op), one enqueue of the direct
    # path (on this thread), the driver calls alone, the waiter-thread hop for an event already complete
    loop = asyncio.get_running_loop()

    async def hop() -> None:
        await loop.run_in_executor(lib.gpu_exec, lambda: None)

    out["gpu_thread_hop_us"] = await host_us_async(hop)
    done = torch.cuda.Event(blocking=True)
    done.record(torch.cuda.current_stream(0))
    done.synchronize()
    out["waiter_hop_us"] = await host_us_async(lambda: cuda.synchronize_async(done))
    with torch.cuda.device(0), torch.cuda.stream(s0):
        out["copy2d_calls_us_peer"] = host_us(lambda: run_blocks(dst.flat, cuda.DEFAULT))
        out["copy2d_calls_us_host"] = host_us(lambda: run_blocks(host.flat, cuda.D2H))
        out["event_record_us"] = host_us(lambda: torch.cuda.Event(blocking=True).record(s0))
    def device_switch() -> None:
        with cuda.on_device(0), torch.cuda.stream(s0):
            pass

    out["on_device_and_stream_us"] = host_us(device_switch)
    out["loop"] = type(loop).__module__
    for name, d in (("peer", dst), ("host", host)):
        r = lib.transfer(src, region, d, region, True).routes[0]
        job = MoveJob(src, r.dst, r.index, r.chunks[0], True, False, r.chunks[0].layer, r.blocks[0])
        out[f"enqueue_us_{name}"] = host_us(lambda j=job: lib.rt.gpu._enqueue(j))
        torch.cuda.synchronize(0)
        # 8 in flight with the plans made before the clock starts (the stream's copy path alone)
        ts = [lib.transfer(src, region, d, region, True) for _ in range(8)]
        lib.sync()
        t0 = time.perf_counter()
        await asyncio.gather(*(t.run() for t in ts))
        lib.sync()
        out[f"{name}_8_in_flight_preplanned_gbps"] = 8 * nbytes / (time.perf_counter() - t0) / 1e9
    # a stream as the bench runs it (32 transfers, 8 in flight, each planned in its turn), inline DMA: its rate
    # and the loop thread's CPU time per transfer, with completions polled while expected (the default), parked
    # on waiter threads (a waiter's completion needs the GIL the busy loop holds), or always polled
    lib.rt.gpu.inline_dma = True

    async def stream(d: Any, n: int = 32, window: int = 8) -> tuple[float, float]:
        gate = asyncio.Semaphore(window)

        async def one() -> None:
            async with gate:
                await lib.transfer(src, region, d, region, True).run()

        lib.sync()
        t0, c0 = time.perf_counter(), time.thread_time()
        await asyncio.gather(*(one() for _ in range(n)))
        lib.sync()
        return n * nbytes / (time.perf_counter() - t0) / 1e9, (time.thread_time() - c0) / n * 1e6

    import streamer.cuda_mover as cm

    async def poll_wait(event: Any, timeout: float, what: str, setting: str, spin_s: float = 0.0) -> None:
        while not event.query():
            await asyncio.sleep(0)

    spin = lib.rt.gpu.spin_s  # the default: polled for up to completion_spin_us when expected to end by then
    for name, d in (("peer", dst), ("host", host)):
        for label, spin_s, poll in (("", spin, False), ("_park", 0.0, False), ("_poll", 0.0, True)):
            lib.rt.gpu.spin_s = spin_s  # "_park": every wait on a waiter thread (the earlier default)
            if poll:  # "_poll": every wait polled by the loop, however long (an upper bound; burns a core)
                cm.wait_event = poll_wait  # type: ignore[assignment]
            try:
                await stream(d)
                runs = [await stream(d) for _ in range(5)]
            finally:
                cm.wait_event = cuda.wait_event
                lib.rt.gpu.spin_s = spin
            out[f"{name}_stream32_gbps{label}"] = sorted(r[0] for r in runs)[2]
            out[f"{name}_stream32_loop_cpu_us_per_transfer{label}"] = sorted(r[1] for r in runs)[2]
    prof = cProfile.Profile()
    prof.enable()
    await stream(dst)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    await lib.close()
    print(json.dumps(out))


if __name__ == "__main__":
    try:  # the streamer runs on uvloop; so does the probe where it is installed
        import uvloop
    except ImportError:
        uvloop = None
    (uvloop.run if uvloop is not None else asyncio.run)(main())
