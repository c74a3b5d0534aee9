"""GPU paths of the streamer (run on the lent GPU machines; skipped in CI): checksums agree across devices,
GPU <-> pinned/pageable host and GPU -> GPU copies byte-exact (buffered and naive), the stage's "layer ready"
event really gates the copy, CUDA IPC pools through a real streamer process, NCCL between two streamer
processes, and an NCCL send to a frozen peer aborted within its deadline instead of hanging."""

from __future__ import annotations

import asyncio
import random
import signal
import tempfile
import time

import pytest
import torch

from streamer import wire
from streamer.errors import BadRequestError, PeerDeadError
from streamer.integrity import checksum_parts
from streamer.layout import PoolLayout, Region
from tests.streamer.helpers import DTYPES, StreamerProc, connect, fill_random, packed, random_region, run

pytestmark = pytest.mark.gpu


def need(gpus: int = 1, nccl: bool = False) -> None:
    from streamer.cuda import cuda_ready

    if not cuda_ready():
        pytest.skip("needs CUDA and CuPy")
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    if nccl:
        from streamer.nccl import nccl_ready

        if not nccl_ready():
            pytest.skip("needs CuPy with NCCL")


def gpu_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def test_checksum_is_the_same_on_gpu_and_cpu() -> None:
    """The GPU checksum - one fused kernel for whole-word sizes, the torch reductions otherwise - gives the CPU's
    parts bit for bit: sizes around the 4096-word blocks, a 64 MiB chunk, ragged tails, an odd address."""
    need()
    from streamer.cuda import checksum_parts_cuda

    for n in (0, 4, 6, 4096 * 4, 4096 * 4 * 7 + 2, 4096 * 4 * 3 + 8, 3 << 20, (64 << 20) + 12):
        t = fill_random(torch.empty(n, dtype=torch.uint8), n)
        g = t.cuda()
        assert checksum_parts(g).tolist() == checksum_parts(t).tolist(), n
        fused = checksum_parts_cuda(g)
        assert (fused is not None) == (n % 4 == 0), n
        if fused is not None:
            assert fused.tolist() == checksum_parts(t).tolist(), n
    t = fill_random(torch.empty(4096 * 4 * 2 + 6, dtype=torch.uint8), 9)
    assert checksum_parts_cuda(t.cuda()[2:]) is None  # not 4-byte aligned: the torch version
    assert checksum_parts(t.cuda()[2:]).tolist() == checksum_parts(t[2:]).tolist()
    rows = fill_random(torch.empty((64, 96), dtype=torch.int32), 10)
    assert checksum_parts(rows.cuda()[::2]).tolist() == checksum_parts(rows[::2].contiguous()).tolist()


def _lib(layer_wait: str = "host", inline_dma: bool = False):  # type: ignore[no-untyped-def]
    from bench.streamer_ops import Lib

    return Lib(True, staging_bytes=256 * 1024, lanes=2, layer_wait=layer_wait, inline_dma=inline_dma)


def _endpoints(lib, lay: PoolLayout, seed: int):  # type: ignore[no-untyped-def]
    """A random-filled source on cuda:0 and the destinations: pinned host, pageable host, cuda:0, cuda:1."""
    g0 = lib.endpoint("g0", lay, "cuda:0")
    g0.flat.copy_(fill_random(torch.empty(lay.nbytes, dtype=torch.uint8), seed).cuda())
    dests = [lib.endpoint("pin", lay, "pinned", wire.POOL_SWAP), lib.endpoint("page", lay, "cpu", wire.POOL_DISK),
             lib.endpoint("g0b", lay, "cuda:0")]
    if torch.cuda.device_count() > 1:
        dests.append(lib.endpoint("g1", lay, "cuda:1"))
    return g0, dests


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_and_host_round_trips_in_process(dtype: torch.dtype) -> None:
    """cuda:0 -> pinned host pool -> cuda:0 (other slots), cuda:0 -> pageable host, cuda:0 -> cuda:0,
    and cuda:0 -> cuda:1 when there are two GPUs; buffered and naive; checksums on."""
    need()
    rng = random.Random(str(dtype))
    lay = PoolLayout(1, 4, 6, 40, 2, 64, dtype)

    async def scenario() -> None:
        lib = _lib()
        await lib.start()
        try:
            g0, dests = _endpoints(lib, lay, seed=1)
            pinned = dests[0]
            for trial in range(4):
                src = random_region(rng, lay, nslots=3)
                lens = [b - a for a, b in src.tokens]
                for buffered in (True, False):
                    for dst in dests:
                        mid = random_region(rng, lay, lens=lens, layers=src.layers)
                        t = lib.transfer(g0, src, dst, mid, buffered, checksum=True)
                        await t.run()
                        want = packed(g0.flat.view(dtype).view(lay.shape).cpu(), lay, src)
                        got = packed(dst.flat.view(dtype).view(lay.shape).cpu(), lay, mid)
                        assert torch.equal(got, want), (trial, buffered, dst.name)
                        if dst is pinned:  # and back into the GPU pool, elsewhere
                            back = Region(tuple(s for s in range(lay.num_slots) if s not in src.slots)[:3],
                                          src.layers, tuple((0, n) for n in lens))
                            await lib.transfer(pinned, mid, g0, back, buffered, checksum=True).run()
                            assert torch.equal(packed(g0.flat.view(dtype).view(lay.shape).cpu(), lay, back), want)
        finally:
            await lib.close()

    run(scenario, timeout=300)


@pytest.mark.parametrize(("checksum", "inline"), [(True, False), (False, False), (False, True)],
                         ids=["checksum", "dma", "dma-inline"])
def test_long_pieces_move_pool_to_pool_by_dma(checksum: bool, inline: bool) -> None:
    """Regions of long pieces take the direct path (2-D DMA blocks, no staging): cuda:0 -> pinned, pageable,
    cuda:0 and cuda:1, and pinned -> cuda:0, byte-exact, layered or not, with random slots and token ranges.
    dma-inline: the DMA-only copies are enqueued by the event loop's thread (inline_dma), the GPU thread's
    staged copies interleaving with them on the same lanes."""
    need()
    rng = random.Random(7)
    lay = PoolLayout(2, 3, 6, 1024, 4, 128, torch.bfloat16)  # 1 KiB rows: 512+ tokens = 512+ KiB pieces

    async def scenario() -> None:
        lib = _lib(inline_dma=inline)
        await lib.start()
        try:
            g0, dests = _endpoints(lib, lay, seed=3)
            pinned = dests[0]
            for trial in range(3):
                lens = [rng.randint(512, 1024) for _ in range(3)]
                src = random_region(rng, lay, lens=lens)
                for layered in (False, True):
                    for dst in dests:
                        mid = random_region(rng, lay, lens=lens, layers=src.layers)
                        t = lib.transfer(g0, src, dst, mid, True, layered=layered, checksum=checksum)
                        assert t.routes[0].blocks is not None  # the direct path, not staging
                        task = asyncio.ensure_future(t.run())
                        for layer in range(*src.layers):
                            t.layer_ready(layer)
                        await asyncio.wait_for(task, 60)
                        want = packed(g0.flat.view(lay.dtype).view(lay.shape).cpu(), lay, src)
                        got = packed(dst.flat.view(lay.dtype).view(lay.shape).cpu(), lay, mid)
                        assert torch.equal(got, want), (trial, layered, dst.name)
                        if dst is pinned:
                            back = Region(tuple(s for s in range(lay.num_slots) if s not in src.slots)[:3],
                                          src.layers, tuple((0, n) for n in lens))
                            await lib.transfer(pinned, mid, g0, back, True, checksum=checksum).run()
                            assert torch.equal(packed(g0.flat.view(lay.dtype).view(lay.shape).cpu(), lay, back), want)
        finally:
            await lib.close()

    run(scenario, timeout=300)


@pytest.mark.parametrize("layered", [True, False], ids=["layered", "whole"])
@pytest.mark.parametrize("layer_wait", ["device", "host"])
@pytest.mark.parametrize("tokens", [64, 1024, -1024], ids=["staged", "direct", "direct-inline"])
def test_layer_ready_event_gates_the_copy(tokens: int, layer_wait: str, layered: bool) -> None:
    """The source layer is written by a slow kernel on the compute stream; the copy must wait for the
    stage's event (if it did not, it would copy the zeros that were there before). Short pieces go through
    staging, long ones pool to pool by DMA: both wait, whether the wait sits on the GPU or on a host thread.
    Layered: each layer's LayerReady is said at once after its kernels are enqueued. Whole: a transfer that
    is not layered (a replica or swap right after a step) is requested with all three layers still queued.
    direct-inline: long pieces without checksums, enqueued by the loop's thread (inline_dma)."""
    need()
    inline, tokens = tokens < 0, abs(tokens)
    lay = PoolLayout(0, 3, 2, tokens, 2, 64, torch.float16)

    async def scenario() -> None:
        lib = _lib(layer_wait, inline_dma=inline)
        await lib.start()
        try:
            src, dst = lib.endpoint("p", lay, "cuda:0"), lib.endpoint("t", lay, "pinned", wire.POOL_RECEIVE)
            region = Region.uniform((0, 1), (0, 3), 0, tokens)
            want = fill_random(torch.empty(lay.shape, dtype=lay.dtype), 5)
            want_gpu = want.cuda()
            torch.cuda.synchronize()
            compute = torch.cuda.Stream(0)
            typed = src.flat.view(lay.dtype).view(lay.shape)

            def layer(j: int) -> None:
                with torch.cuda.stream(compute):
                    torch.cuda._sleep(50_000_000)  # ~30 ms of "attention" before the layer's KV exists
                    typed[j].copy_(want_gpu[j])  # enqueued only: on the GPU it runs after the sleep
                    src.events[j].record(compute)

            if layered:
                t = lib.transfer(src, region, dst, region, buffered=True, layered=True, checksum=not inline)
                task = asyncio.ensure_future(t.run())
                for j in range(3):
                    layer(j)
                    t.layer_ready(j)  # said at once; the copy must still wait for the event
            else:
                for j in range(3):
                    layer(j)
                t = lib.transfer(src, region, dst, region, buffered=True, checksum=not inline)
                task = asyncio.ensure_future(t.run())
            await asyncio.wait_for(task, 60)
            got = packed(dst.flat.view(lay.dtype).view(lay.shape), lay, region)
            assert torch.equal(got, packed(want, lay, region))
        finally:
            await lib.close()

    run(scenario, timeout=120)


def test_ipc_pools_through_the_streamer_process() -> None:
    """The test process is the stage: GPU pools in their own allocations, exported over CUDA IPC to a real
    streamer, which swaps them out to pinned memory, back in, and (two GPUs) copies GPU 0 -> GPU 1."""
    need()
    from streamer.client import StreamerClient
    from streamer.cuda import GpuPoolMemory

    h0 = StreamerProc.start("g0", "--swap-gib", "0.05", "--peer-timeout", "2")
    lay = PoolLayout(0, 4, 4, 96, 2, 64, torch.bfloat16)
    try:
        async def scenario() -> None:
            c = StreamerClient(h0.control, "gstage")
            status = await connect(c, timeout=120)
            assert status.cuda
            mem0 = GpuPoolMemory(lay, 0)
            mem0.tensor.view(torch.uint8).copy_(fill_random(torch.empty_like(mem0.tensor, device="cpu"), 3)
                                                .view(torch.uint8).cuda())
            torch.cuda.synchronize()
            await c.register_pool("gp0", mem0)
            await c.alloc_pool("gswap", wire.POOL_SWAP, lay)
            region = Region((2, 0), (0, 4), ((0, 90), (10, 20)))
            into = Region((3, 1), (0, 4), ((5, 95), (0, 10)))
            for buffered in (True, False):
                await (await c.stream("gp0", region, dst="gswap", dst_region=region, buffered=buffered,
                                      checksum=True)).wait(60)
                await (await c.stream("gswap", region, dst="gp0", dst_region=into, buffered=buffered,
                                      checksum=True)).wait(60)
                torch.cuda.synchronize()
                assert torch.equal(packed(mem0.tensor.cpu(), lay, into), packed(mem0.tensor.cpu(), lay, region))
            if torch.cuda.device_count() > 1:
                mem1 = GpuPoolMemory(lay, 1)
                await c.register_pool("gp1", mem1)
                h = await c.stream("gp0", region, dst="gp1", dst_region=region, layered=True, progress=True,
                                   checksum=True)
                for j in range(4):
                    mem0.record(j)
                    await c.layer_ready([h.xfer], j)
                    assert (await h.next_progress(30)).layer == j
                await h.wait(60)
                assert torch.equal(packed(mem1.tensor.cpu(), lay, region), packed(mem0.tensor.cpu(), lay, region))
                await c.unregister_pool("gp1")
            sup = StreamerClient(h0.control, "gsup")
            await connect(sup)
            await sup.owner_down("gstage", "test")  # a GPU pool dies with its owner: the mapping is dropped
            with pytest.raises(BadRequestError):
                await sup.pool_info("gp0")
            assert (await sup.pool_info("gswap")).filled == [0, 0, 90, 0]  # the streamer's own pool stays
            await c.close()
            await sup.close()

        run(scenario, timeout=300)
        assert h0.stop() == 0, h0.tail()
    finally:
        h0.kill()


def _nccl_pair() -> tuple[StreamerProc, StreamerProc]:
    d = tempfile.mkdtemp(prefix="dvg")
    common = ["--peer-timeout", "2", "--layer-timeout", "30"]
    h0 = StreamerProc.start("n0", "--peer", f"n1=ipc://{d}/n1.d", *common, directory=d)
    h1 = StreamerProc.start("n1", "--replica-gib", "0.05", "--peer", f"n0=ipc://{d}/n0.d", *common, directory=d)
    return h0, h1


async def _nccl_pools(h0: StreamerProc, h1: StreamerProc, names: tuple[str, str], lay: PoolLayout,
                      dst_lay: PoolLayout | None = None, seed: int | None = None):  # type: ignore[no-untyped-def]
    """Clients of both streamers (each named like the pool it registers), a GPU stage pool on cuda:0 registered
    with n0 (random bytes when `seed` is given) and one on cuda:1 registered with n1 (`dst_lay`, default `lay`).
    Returns (client of n0, client of n1, source memory, destination memory)."""
    from streamer.client import StreamerClient
    from streamer.cuda import GpuPoolMemory

    a, b = StreamerClient(h0.control, names[0]), StreamerClient(h1.control, names[1])
    hello = await connect(a, timeout=120)
    await connect(b, timeout=120)
    assert hello.nccl
    src, dst = GpuPoolMemory(lay, 0), GpuPoolMemory(dst_lay or lay, 1)
    if seed is not None:
        src.tensor.view(torch.uint8).copy_(fill_random(torch.empty(src.tensor.shape, dtype=lay.dtype), seed)
                                           .view(torch.uint8).cuda(0))
        torch.cuda.synchronize()
    await a.register_pool(names[0], src)
    await b.register_pool(names[1], dst)
    return a, b, src, dst


def test_nccl_between_two_streamers_and_frames_to_host() -> None:
    need(2, nccl=True)
    h0, h1 = _nccl_pair()
    lay = PoolLayout(0, 4, 4, 128, 8, 64, torch.bfloat16)
    try:
        async def scenario() -> None:
            a, b, src, dst = await _nccl_pools(h0, h1, ("pa", "tb"), lay, seed=4)
            region = Region((0, 1, 3), (0, 4), ((0, 120), (5, 70), (0, 1)))
            target = Region((2, 0, 1), (0, 4), ((8, 128), (0, 65), (3, 4)))
            h = await a.stream("pa", region, dst=wire.PoolRef("tb", "n1"), dst_region=target, layered=True,
                               progress=True, checksum=True, notify=["tb"])
            for j in range(4):
                src.record(j)
                await a.layer_ready([h.xfer], j)
                assert (await h.next_progress(60)).layer == j
            await h.wait(60)
            assert (await asyncio.wait_for(b.deliveries.get(), 10)).pool == "tb"
            torch.cuda.synchronize()
            assert torch.equal(packed(dst.tensor.cpu(), lay, target), packed(src.tensor.cpu(), lay, region))
            # GPU pool -> a remote host pool travels as frames; pull it back into other slots
            await b.alloc_pool("rep", wire.POOL_REPLICA, lay)
            for buffered in (True, False):
                await (await a.stream("pa", region, dst=wire.PoolRef("rep", "n1"), dst_region=target,
                                      buffered=buffered, checksum=True)).wait(60)
                home = Region((2, 3, 0), (0, 4), ((0, 120), (10, 75), (127, 128)))
                back = await a.stream(wire.PoolRef("rep", "n1"), target, dst="pa", dst_region=home, checksum=True)
                await back.wait(60)
                torch.cuda.synchronize()
                assert torch.equal(packed(src.tensor.cpu(), lay, home), packed(src.tensor.cpu(), lay, region))
            await a.close()
            await b.close()

        run(scenario, timeout=400)
        assert "NCCL link" in h0.log.read_text(errors="replace"), "the GPU -> GPU route did not use NCCL:\n" + h0.tail()
    finally:
        h0.kill()
        h1.kill()


def test_nccl_transfers_follow_their_open_and_a_refused_one_leaves_the_link_in_step() -> None:
    """Once a link carried a transfer, the next ones announce their chunks without waiting for the open's answer
    (long pieces gathered and scattered by DMA, short ones by index kernels; checked ones with the digest in its
    own message). A transfer the receiver refuses (a region outside its pool) fails fast with the typed error -
    its announced chunks are received into scratch, not left to time out - and the same link then carries the
    next transfers byte-exact, checked and not."""
    need(2, nccl=True)
    h0, h1 = _nccl_pair()
    lay = PoolLayout(0, 4, 4, 512, 8, 64, torch.bfloat16)
    small = PoolLayout(0, 4, 2, 512, 8, 64, torch.bfloat16)  # the receiver's pool has 2 slots
    try:
        async def scenario() -> None:
            a, b, src, dst = await _nccl_pools(h0, h1, ("ra", "rb"), lay, small, seed=7)
            long = Region.uniform((0, 1), (0, 4), 0, 500)  # pieces of 500 rows: DMA blocks
            short = Region((2, 3), (1, 3), ((3, 4), (9, 11)))  # a few rows: index kernels
            into_short = Region((1, 0), (1, 3), ((100, 101), (7, 9)))
            for check in (False, True):
                for s_reg, d_reg in ((long, long), (short, into_short)):
                    await (await a.stream("ra", s_reg, dst=wire.PoolRef("rb", "n1"), dst_region=d_reg,
                                          checksum=check)).wait(60)
                    torch.cuda.synchronize()
                    assert torch.equal(packed(dst.tensor.cpu(), small, d_reg), packed(src.tensor.cpu(), lay, s_reg))
            bad = Region.uniform((2, 3), (0, 4), 0, 500)  # slots 2 and 3 do not exist at the receiver
            t0 = time.monotonic()
            with pytest.raises(BadRequestError):
                await (await a.stream("ra", long, dst=wire.PoolRef("rb", "n1"), dst_region=bad)).wait(60)
            assert time.monotonic() - t0 < 1.5  # refused at once, not after peer_timeout_s (2 s) and an abort
            src.tensor.view(torch.uint8).copy_(fill_random(torch.empty(src.tensor.shape, dtype=lay.dtype), 8)
                                               .view(torch.uint8).cuda(0))
            torch.cuda.synchronize()
            for check in (True, False):
                await (await a.stream("ra", long, dst=wire.PoolRef("rb", "n1"), dst_region=long,
                                      checksum=check)).wait(60)
                torch.cuda.synchronize()
                assert torch.equal(packed(dst.tensor.cpu(), small, long), packed(src.tensor.cpu(), lay, long))
            # to a host pool on the peer: frames, read from the GPU pool by DMA blocks (long pieces, unchecked)
            await b.alloc_pool("rep", wire.POOL_REPLICA, lay)
            for check in (False, True):
                await (await a.stream("ra", long, dst=wire.PoolRef("rep", "n1"), dst_region=long,
                                      checksum=check)).wait(60)
                back = Region.uniform((2, 3), (0, 4), 0, 500)
                src.tensor[:, :, 2:4].zero_()  # what comes back must be this round's
                torch.cuda.synchronize()
                await (await a.stream(wire.PoolRef("rep", "n1"), long, dst="ra", dst_region=back)).wait(60)
                torch.cuda.synchronize()
                assert torch.equal(packed(src.tensor.cpu(), lay, back), packed(src.tensor.cpu(), lay, long))
            await a.unregister_pool("ra")
            await b.unregister_pool("rb")
            await a.close()
            await b.close()

        run(scenario, timeout=300)
        log = h0.log.read_text(errors="replace")
        assert log.count(" up (rank 0") == 1, "the refused transfer must not cost the link:\n" + h0.tail()
    finally:
        h0.kill()
        h1.kill()


def test_nccl_send_to_a_frozen_peer_is_aborted_not_waited_on() -> None:
    need(2, nccl=True)
    h0, h1 = _nccl_pair()
    lay = PoolLayout(0, 3, 2, 64, 8, 64, torch.bfloat16)
    try:
        async def scenario() -> None:
            a, b, src, dst = await _nccl_pools(h0, h1, ("fa", "fb"), lay)
            region = Region.uniform((0, 1), (0, 3), 0, 64)
            h = await a.stream("fa", region, dst=wire.PoolRef("fb", "n1"), dst_region=region, layered=True,
                               progress=True)
            src.record(0)
            await a.layer_ready([h.xfer], 0)
            await h.next_progress(60)  # the link works and layer 0 arrived ...
            h1.proc.send_signal(signal.SIGSTOP)  # ... then the receiving streamer freezes mid-transfer
            try:
                t0 = time.monotonic()
                src.record(1)
                await a.layer_ready([h.xfer], 1)
                with pytest.raises(PeerDeadError):
                    await h.wait(60)
                assert time.monotonic() - t0 < 2.0 + 5.0  # peer_timeout_s = 2, plus NCCL abort time
            finally:
                h1.proc.send_signal(signal.SIGCONT)
            await a.close()
            await b.close()

        run(scenario, timeout=300)
        assert h0.proc.poll() is None, "the sending streamer must survive its peer's failure"
    finally:
        h0.kill()
        h1.kill()
