"""The engine's GPU-route logic on CPU, through a fake CUDA mover that performs each job as the real one would
(2-D DMA blocks emulated with strided views, staging jobs by their row maps): which path a region takes, how
chunks are grouped into one hop per layer (layered) or per route, byte-exact results, progress per layer, and
that device work still in flight is drained - never dropped - when a transfer fails or is cancelled."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from streamer import wire
from streamer.endpoints import Endpoint
from streamer.engine import Transfer
from streamer.errors import CancelledError, IntegrityError
from streamer.layout import PoolLayout, Region
from streamer.movers import MoveJob
from tests.streamer.helpers import fill_random, packed, run
from tests.streamer.test_engine import Env


class GpuLikeEndpoint(Endpoint):
    """A CPU endpoint the engine treats as a GPU pool (its memory stays in host RAM for the fake mover)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.is_cuda = True


class FakeGpuMover:
    """inline: groups of DMA-only jobs start at once on the caller's thread (start_now), as GpuMover's inline_dma."""

    def __init__(self, fail_chunk: int | None = None, hold_chunk: int | None = None, inline: bool = False) -> None:
        self.calls: list[list[int]] = []  # chunk indexes per start_many call (one hop each)
        self.now: list[list[int]] = []  # chunk indexes per start_now call that started its group
        self.direct: list[bool] = []
        self.finished: list[int] = []
        self.fail_chunk, self.hold_chunk, self.inline = fail_chunk, hold_chunk, inline
        self.release = asyncio.Event()
        self.holding = asyncio.Event()  # set whenever a wait on hold_chunk begins (settling it or draining it)

    def start_now(self, jobs: list[MoveJob]) -> list[Any] | None:
        if not (self.inline and all(j.blocks is not None and not j.checksum for j in jobs)):
            return None
        self.now.append([j.chunk.index for j in jobs])
        return self._do(jobs)

    async def start_many(self, jobs: list[MoveJob]) -> list[Any]:
        self.calls.append([j.chunk.index for j in jobs])
        return self._do(jobs)

    def _do(self, jobs: list[MoveJob]) -> list[Any]:
        for j in jobs:
            self.direct.append(j.blocks is not None)
            if j.blocks is not None:
                for b in j.blocks:
                    j.dst.flat.as_strided((b.height, b.width), (b.dst_pitch, 1), b.dst_off).copy_(
                        j.src.flat.as_strided((b.height, b.width), (b.src_pitch, 1), b.src_off))
            else:
                c = j.chunk
                assert j.index.dst is not None
                j.dst.rows.index_copy_(0, j.index.dst[c.r0: c.r1], j.src.rows.index_select(0, j.index.src[c.r0: c.r1]))
        return [j.chunk.index for j in jobs]

    async def finish(self, h: int, timeout: float) -> None:
        self.finished.append(h)  # every wait for a chunk's device work: settling it, or draining it
        if h == self.hold_chunk:
            self.holding.set()
            await self.release.wait()
        if h == self.fail_chunk:
            raise IntegrityError(f"chunk {h} arrived corrupt")


def _pools(tokens: int) -> tuple[PoolLayout, GpuLikeEndpoint, Endpoint]:
    lay = PoolLayout(0, 4, 4, tokens, 2, 64, torch.float16)  # 256-byte rows
    src = GpuLikeEndpoint("g", wire.POOL_STAGE, lay, fill_random(torch.empty(lay.nbytes, dtype=torch.uint8), 1), "t")
    dst = Endpoint("h", wire.POOL_SWAP, lay, torch.zeros(lay.nbytes, dtype=torch.uint8), "t")
    return lay, src, dst


def _transfer(env: Env, src: Endpoint, region: Region, dst: Endpoint, layered: bool,
              layers_done: list[int] | None = None) -> Transfer:
    async def on_layer(layer: int, n: int, nbytes: int) -> None:
        if layers_done is not None:
            layers_done.append(layer)

    return env.transfer(src, region, dst, region, layered=layered, checksum=False, on_layer=on_layer)


@pytest.mark.parametrize("inline", [False, True], ids=["gpu-thread", "inline"])
@pytest.mark.parametrize("layered", [False, True])
def test_long_pieces_go_direct_in_one_hop_per_layer_or_route(layered: bool, inline: bool) -> None:
    """Inline: the same groups, started at once by the loop (start_now) instead of by a hop (start_many)."""
    env = Env()
    gpu = env.rt.gpu = FakeGpuMover(inline=inline)
    lay, src, dst = _pools(1024)  # 1,000 tokens x 256 B = 250 KiB pieces: the direct path
    region = Region.uniform(range(3), (0, 4), 0, 1000)
    done: list[int] = []

    async def go() -> None:
        t = _transfer(env, src, region, dst, layered, done)
        task = asyncio.ensure_future(t.run())
        for layer in range(4):
            t.layer_ready(layer)
        await task

    try:
        run(go, timeout=30)
    finally:
        env.close()
    assert all(gpu.direct) and done == [0, 1, 2, 3]
    groups = [[0], [1], [2], [3]] if layered else [[0]]  # direct chunks are whole layers
    assert (gpu.now, gpu.calls) == ((groups, []) if inline else ([], groups))
    assert torch.equal(packed(dst.flat.view(lay.dtype).view(lay.shape), lay, region),
                       packed(src.flat.view(lay.dtype).view(lay.shape), lay, region))


def test_short_pieces_take_staging_chunks_enqueued_together() -> None:
    env = Env()  # staging 64 KiB = 256 rows per chunk
    gpu = env.rt.gpu = FakeGpuMover()
    lay, src, dst = _pools(64)
    region = Region((0, 2, 3), (0, 4), ((0, 40), (10, 64), (5, 6)))
    try:
        run(lambda: _transfer(env, src, region, dst, False).run(), timeout=30)
    finally:
        env.close()
    assert not any(gpu.direct)
    assert len(gpu.calls) == 1 and gpu.calls[0] == list(range(len(gpu.calls[0])))  # one hop for all chunks
    assert torch.equal(packed(dst.flat.view(lay.dtype).view(lay.shape), lay, region),
                       packed(src.flat.view(lay.dtype).view(lay.shape), lay, region))


@pytest.mark.parametrize(("layered", "tokens", "inline"), [(False, 32, False), (True, 64, False), (True, 1024, True)],
                         ids=["staged", "staged-layered", "direct-layered-inline"])
def test_failed_chunk_fails_the_transfer_after_draining_what_was_enqueued(layered: bool, tokens: int,
                                                                          inline: bool) -> None:
    env = Env()
    gpu = env.rt.gpu = FakeGpuMover(fail_chunk=1, inline=inline)
    lay, src, dst = _pools(tokens)
    # staged: 4 layers x 2 x 4 x 32 rows = 1,024 rows: 4 chunks (a slot's 8 pieces, 64 KiB, are short of one
    # DMA block); staged-layered: 8 chunks; direct: one chunk per layer
    region = Region.uniform(range(4), (0, 4), 0, min(tokens, 1000))

    async def go() -> None:
        t = _transfer(env, src, region, dst, layered)
        task = asyncio.ensure_future(t.run())
        for layer in range(4):
            t.layer_ready(layer)
        with pytest.raises(IntegrityError):
            await task

    try:
        run(go, timeout=30)
    finally:
        env.close()
    started = [i for call in gpu.calls + gpu.now for i in call]
    assert bool(gpu.now) == inline
    assert gpu.finished.count(1) == 2  # settled (it failed), then drained like everything started after it
    assert set(started) - {0, 1} <= set(gpu.finished[gpu.finished.index(1) + 1:])


@pytest.mark.parametrize("inline", [False, True], ids=["gpu-thread", "inline"])
def test_cancel_while_waiting_for_the_device_drains_the_chunk(inline: bool) -> None:
    env = Env()
    gpu = env.rt.gpu = FakeGpuMover(hold_chunk=0, inline=inline)
    lay, src, dst = _pools(1024)
    region = Region.uniform(range(2), (0, 1), 0, 1000)  # one direct chunk: the single-group path

    async def go() -> None:
        t = _transfer(env, src, region, dst, False)
        t.task = asyncio.ensure_future(t.run())
        await asyncio.wait_for(gpu.holding.wait(), 10)  # settling chunk 0: waiting for the device
        gpu.holding.clear()
        t.abort(CancelledError("cancelled by the test"))
        await asyncio.wait_for(gpu.holding.wait(), 10)  # the cancelled chunk is drained: waited for again
        assert not t.task.done()  # still draining: the device has not finished with the memory
        gpu.release.set()
        with pytest.raises(CancelledError):
            await t.task

    try:
        run(go, timeout=30)
    finally:
        env.close()
    assert gpu.finished == [0, 0]  # the settle that was cancelled, then the drain that waited for the device
    assert len(gpu.now if inline else gpu.calls) == 1


@pytest.mark.parametrize("inline", [True, False])
def test_inline_dma_enqueues_only_dma_only_jobs_on_the_loop_thread(inline: bool) -> None:
    """GpuMover(inline_dma=True): a group of DMA-only jobs (2-D blocks, no checksum, device or pinned memory on
    both ends) is enqueued on the event loop's thread; any other group - staging, checksums, pageable memory
    on one end - still goes to the GPU thread, as does everything with inline_dma off."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from streamer.cuda_mover import GpuMover
    from streamer.movers import RouteIndex
    from streamer.regions import Chunk

    gpu = ThreadPoolExecutor(1, thread_name_prefix="gpu")
    mover = GpuMover([], 1 << 20, 1, gpu, gpu, inline_dma=inline)
    mover._enqueue = lambda job: threading.current_thread().name  # type: ignore[method-assign]
    lay = PoolLayout(0, 1, 1, 4, 1, 4, torch.float32)

    def ep(name: str, async_dma: bool) -> Endpoint:
        e = Endpoint(name, wire.POOL_STAGE, lay, torch.zeros(lay.nbytes, dtype=torch.uint8), "test")
        e._async_dma = async_dma  # what a device or pinned (True) / pageable (False) pool reports
        return e

    fast, slow = ep("fast", True), ep("slow", False)
    index, chunk = RouteIndex(torch.arange(4), torch.arange(4)), Chunk(0, 0, 4, 0, (0,))

    def job(src: Endpoint, dst: Endpoint, blocks: Any = (), checksum: bool = False) -> MoveJob:
        return MoveJob(src, dst, index, chunk, True, checksum, None, list(blocks) if blocks is not None else None)

    async def scenario() -> None:
        loop_thread = threading.current_thread().name
        dma = job(fast, fast)
        assert await mover.start_many([dma, dma]) == [loop_thread if inline else "gpu_0"] * 2
        for other in (job(fast, fast, blocks=None), job(fast, fast, checksum=True), job(fast, slow), job(slow, fast)):
            assert await mover.start_many([dma, other]) == ["gpu_0", "gpu_0"]

    try:
        run(scenario)
    finally:
        gpu.shutdown()
