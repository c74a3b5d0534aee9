"""The streamer process through its real sockets: every CPU transport byte-exact (shared memory <-> host pool,
disk, TCP push and pull between two streamer processes), layer-by-layer delivery, capacity refusal, duplicate
and corrupt input refused, and failures - a peer streamer, a stage, the streamer itself killed for real."""

from __future__ import annotations

import asyncio
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
import zmq.asyncio

from bus.messages import ErrorReply
from stages.kv_cache import KVPool
from streamer import wire
from streamer.client import StreamerClient
from streamer.config import SHM_DIR, SHM_PREFIX
from streamer.errors import BadRequestError, CapacityError, OwnerDownError, PeerDeadError, StreamerDownError
from streamer.integrity import checksum
from streamer.layout import PoolLayout, Region
from streamer.memory import SharedPoolMemory
from streamer.proc import streamer_codec
from streamer.regions import layout_to_spec, region_to_spec
from tests.streamer import fake_stage
from tests.streamer.helpers import (
    DTYPES,
    ROOT,
    StreamerProc,
    child_env,
    connect,
    fill_random,
    packed,
    random_region,
    run,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[StreamerProc, StreamerProc]]:
    d = tempfile.mkdtemp(prefix="dv")
    common = ["--peer-timeout", "1.0", "--layer-timeout", "5", "--tcp-chunk-mib", "0.02", "--staging-mib", "0.0625"]
    h0 = StreamerProc.start("h0", "--swap-gib", str(4 / 1024), "--receive-gib", str(2 / 1024), "--disk-dir",
                            f"{d}/disk", "--disk-gib", str(4 / 1024), "--peer", f"h1=ipc://{d}/h1.d", *common,
                            directory=d)
    h1 = StreamerProc.start("h1", "--replica-gib", str(4 / 1024), "--peer", f"h0=ipc://{d}/h0.d", *common,
                            directory=d)
    yield h0, h1
    for h in (h0, h1):
        assert h.stop() == 0, h.tail()  # Shutdown by SIGTERM: clean exit, pools released


def layout_for(dtype: torch.dtype) -> PoolLayout:
    return PoolLayout(2, 4, 5, 24, 2, 8, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trips_through_every_cpu_transport(pair, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    h0, h1 = pair
    lay = layout_for(dtype)
    rng = random.Random(str(dtype))
    name = f"st-{str(dtype)[6:]}"

    async def scenario() -> None:
        stage, ctl = StreamerClient(h0.control, name), StreamerClient(h1.control, f"ctl-{name}")
        await connect(stage)
        await connect(ctl)
        mem = SharedPoolMemory.create(lay)
        fill_random(mem.tensor, 11)
        await stage.register_pool(name, mem)
        await stage.alloc_pool(f"{name}-swap", wire.POOL_SWAP, lay)
        await stage.alloc_pool(f"{name}-disk", wire.POOL_DISK, lay)
        await ctl.alloc_pool(f"{name}-rep", wire.POOL_REPLICA, lay)
        for trial in range(3):
            src = random_region(rng, lay, nslots=2)
            lens = [b - a for a, b in src.tokens]
            for hop, (pool, ref) in enumerate([(f"{name}-swap", wire.PoolRef(f"{name}-swap")),
                                               (f"{name}-disk", wire.PoolRef(f"{name}-disk")),
                                               (f"{name}-rep", wire.PoolRef(f"{name}-rep", "h1"))]):
                mid = random_region(rng, lay, lens=lens, layers=src.layers)
                back = random_region(rng, lay, lens=lens, layers=src.layers)
                if set(back.slots) & set(src.slots):  # keep the source intact for comparison
                    back = Region(tuple(s for s in range(lay.num_slots) if s not in src.slots)[:2], back.layers,
                                  back.tokens)
                buffered = rng.random() < 0.5
                out = await stage.stream(name, src, dst=ref, dst_region=mid, buffered=buffered, tag=f"out{hop}")
                assert (await out.wait(10)).nbytes == src.nbytes(lay)
                # a pull when the pool is on the peer; a local copy otherwise
                back_src = ref if ref.streamer else pool
                home = await stage.stream(back_src, mid, dst=name, dst_region=back, buffered=buffered)
                await home.wait(10)
                assert torch.equal(packed(mem.tensor, lay, back), packed(mem.tensor, lay, src)), (trial, hop)
                fill_random(mem.tensor[:, :, list(back.slots)], trial)  # scribble for the next round
        await stage.close()
        await ctl.close()

    run(scenario)


def test_layered_push_arrives_layer_by_layer_and_notifies(pair) -> None:  # type: ignore[no-untyped-def]
    h0, h1 = pair
    lay = layout_for(torch.float16)
    region = Region((4, 0, 2), (2, 6), ((0, 20), (3, 24), (10, 11)))
    dst_region = Region((0, 1, 2), (2, 6), ((0, 20), (0, 21), (5, 6)))
    ref = fill_random(torch.empty(lay.shape, dtype=lay.dtype), 3)

    async def scenario() -> None:
        p, t = StreamerClient(h0.control, "prompt0"), StreamerClient(h1.control, "token0")
        await connect(p)
        await connect(t)
        mem = SharedPoolMemory.create(lay)
        await p.register_pool("prompt0", mem)
        await t.alloc_pool("recv-t0", wire.POOL_REPLICA, lay)
        h = await p.stream("prompt0", region, dst=wire.PoolRef("recv-t0", "h1"), dst_region=dst_region,
                           layered=True, progress=True, notify=["token0"], tag="req7")
        for j, layer in enumerate(range(2, 6)):
            mem.tensor[j].copy_(ref[j])  # the prompt pass computes layer l ...
            await p.layer_ready([h.xfer], layer)  # ... and says so
            got = await h.next_progress(5)
            assert (got.layer, got.layers_done) == (layer, j + 1)
        done = await h.wait(5)
        assert done.nbytes == region.nbytes(lay) and done.checksummed
        note = await asyncio.wait_for(t.deliveries.get(), 5)
        assert (note.pool, note.tag, note.region) == ("recv-t0", "req7", region_to_spec(dst_region))
        assert (await t.pool_info("recv-t0")).filled == [20, 21, 0, 0, 0]  # slot 2 got [5, 6): a gap
        await p.alloc_pool("check", wire.POOL_SWAP, lay)
        back = await p.stream(wire.PoolRef("recv-t0", "h1"), dst_region, dst="check", dst_region=dst_region)
        await back.wait(5)
        home = Region((1, 3, 0), (2, 6), ((0, 20), (0, 21), (5, 6)))
        await (await p.stream("check", dst_region, dst="prompt0", dst_region=home)).wait(5)
        assert torch.equal(packed(mem.tensor, lay, home), packed(ref, lay, region))
        await p.free_pool("check")
        await p.close()
        await t.close()

    run(scenario)


def test_layer_ready_sent_from_the_compute_thread_itself_drives_a_layered_transfer(pair) -> None:  # type: ignore[no-untyped-def]
    """layer_ready_direct: the compute thread signals on a socket of its own (no hop through the client's loop);
    the streamer files the signal under the client's identity, layer by layer, and a closed client refuses it."""
    from concurrent.futures import ThreadPoolExecutor

    h0, _ = pair
    lay = layout_for(torch.float32)
    region = Region((1, 3), (2, 6), ((0, 20), (4, 24)))
    ref = fill_random(torch.empty(lay.shape, dtype=lay.dtype), 11)

    async def scenario() -> None:
        c = StreamerClient(h0.control, "direct0")
        await connect(c)
        mem = SharedPoolMemory.create(lay)
        await c.register_pool("direct0", mem)
        await c.alloc_pool("direct-rx", wire.POOL_SWAP, lay)
        h = await c.stream("direct0", region, dst="direct-rx", dst_region=region, layered=True, progress=True,
                           timeline=True)
        compute = ThreadPoolExecutor(1)  # the stage's compute thread
        loop = asyncio.get_running_loop()

        def layer(j: int, g: int) -> None:
            mem.tensor[j].copy_(ref[j])
            c.layer_ready_direct([h.xfer], g)

        for j, g in enumerate(range(2, 6)):
            await loop.run_in_executor(compute, layer, j, g)
            got = await h.next_progress(5)
            assert (got.layer, got.layers_done) == (g, j + 1)
        done = await h.wait(5)
        assert done.nbytes == region.nbytes(lay)
        # the timeline: each layer signalled, cleared, issued, landed in that order, the next one signalled only
        # after this one's progress came back (the loop above)
        assert [t.layer for t in done.timeline] == [2, 3, 4, 5]
        for t, nxt in zip(done.timeline, [*done.timeline[1:], None]):
            assert 0 < t.ready <= t.fired <= t.issued <= t.landed
            assert nxt is None or nxt.ready > t.landed
        assert done.timeline[-1].landed <= done.sent_at <= time.monotonic()
        back = await c.stream("direct-rx", region, dst="direct0", dst_region=region)
        mem.tensor.zero_()
        await back.wait(5)
        assert torch.equal(packed(mem.tensor, lay, region), packed(ref, lay, region))
        await c.unregister_pool("direct0")
        await c.free_pool("direct-rx")
        await c.close()
        with pytest.raises(StreamerDownError, match="closed"):
            await loop.run_in_executor(ThreadPoolExecutor(1), c.layer_ready_direct, [h.xfer], 2)
        compute.shutdown()

    run(scenario)


async def _pusher(h0: Any, h1: Any, name: str, lay: PoolLayout, seed: int) -> tuple[Any, Any, Any]:
    """Clients of both streamers, a source pool "<name>-src" of random bytes registered with h0 and a replica
    pool "<name>-rep" at h1: (source client, destination client, source memory)."""
    p, t = StreamerClient(h0.control, f"{name}-src"), StreamerClient(h1.control, f"{name}-dst")
    await connect(p)
    await connect(t)
    mem = SharedPoolMemory.create(lay)
    fill_random(mem.tensor, seed)
    await p.register_pool(f"{name}-src", mem)
    await t.alloc_pool(f"{name}-rep", wire.POOL_REPLICA, lay)
    return p, t, mem


async def _pull_back_and_compare(p: Any, name: str, mem: Any, lay: PoolLayout, at_peer: Region, into: Region,
                                 original: Region) -> None:
    """Pull `at_peer` of the replica "<name>-rep" back into `into` of "<name>-src": it must hold `original`."""
    back = await p.stream(wire.PoolRef(f"{name}-rep", "h1"), at_peer, dst=f"{name}-src", dst_region=into)
    await back.wait(10)
    assert torch.equal(packed(mem.tensor, lay, into), packed(mem.tensor, lay, original))


def test_a_push_the_peer_refuses_fails_typed_and_the_next_one_goes_through(pair) -> None:  # type: ignore[no-untyped-def]
    """Frames follow a remote open without waiting for its answer: a refused open (no such pool there, or a
    region the pool cannot hold) must still surface as the refusal, and the link stays usable."""
    h0, h1 = pair
    lay = layout_for(torch.float32)
    region = Region((0, 1), (2, 4), ((0, 10), (2, 12)))

    async def scenario() -> None:
        p, t, mem = await _pusher(h0, h1, "refused", lay, 5)
        with pytest.raises(BadRequestError, match="no-such-pool"):
            await (await p.stream("refused-src", region, dst=wire.PoolRef("no-such-pool", "h1"),
                                  dst_region=region)).wait(10)
        too_far = Region((0, 1), (2, 4), ((20, 30), (2, 12)))  # tokens past the pool's 24 positions
        with pytest.raises(BadRequestError):
            await (await p.stream("refused-src", region, dst=wire.PoolRef("refused-rep", "h1"),
                                  dst_region=too_far)).wait(10)
        done = await (await p.stream("refused-src", region, dst=wire.PoolRef("refused-rep", "h1"),
                                     dst_region=region)).wait(10)
        assert done.nbytes == region.nbytes(lay)
        await _pull_back_and_compare(p, "refused", mem, lay, region, Region((3, 4), (2, 4), ((0, 10), (2, 12))), region)
        await p.close()
        await t.close()

    run(scenario)


def test_pushes_to_one_peer_may_open_out_of_order_of_their_requests(pair) -> None:  # type: ignore[no-untyped-def]
    """A push's open rides with its first chunk, so it is sent when that chunk is ready - after later pushes'
    opens, if its layer comes later. The peer takes a sender's opens only in increasing order, so the order
    number is drawn when the open is sent: the late one must not be refused as a replay."""
    h0, h1 = pair
    lay = layout_for(torch.float32)
    region = Region((0, 1), (2, 4), ((0, 10), (2, 12)))

    async def scenario() -> None:
        p, t, mem = await _pusher(h0, h1, "order", lay, 11)
        other = Region((3, 4), (2, 4), ((0, 10), (2, 12)))
        late = await p.stream("order-src", region, dst=wire.PoolRef("order-rep", "h1"), dst_region=region,
                              layered=True)  # waits for its layers
        early = await p.stream("order-src", region, dst=wire.PoolRef("order-rep", "h1"), dst_region=other)
        await early.wait(10)  # opened and delivered while the first push still waits
        await p.layer_ready([late.xfer], 2)
        await p.layer_ready([late.xfer], 3)
        await late.wait(10)
        await _pull_back_and_compare(p, "order", mem, lay, other, Region((2, 4), (2, 4), ((0, 10), (2, 12))), region)
        await p.close()
        await t.close()

    run(scenario)


def test_capacity_is_explicit_and_refused_when_exceeded(pair) -> None:  # type: ignore[no-untyped-def]
    h0, _ = pair
    big = PoolLayout(0, 8, 8, 64, 8, 16, torch.float32)  # 4 MiB: the whole swap capacity
    small = PoolLayout(0, 1, 1, 64, 8, 16, torch.float32)

    async def scenario() -> None:
        c = StreamerClient(h0.control, "cap")
        await connect(c)
        before = {i.kind: i for i in (await c.status()).capacity}[wire.POOL_SWAP]
        with pytest.raises(CapacityError, match="swap_bytes"):
            await c.alloc_pool("too-big", wire.POOL_SWAP, PoolLayout(0, 9, 8, 64, 8, 16, torch.float32))
        got = await c.alloc_pool("s-a", wire.POOL_SWAP, small)
        assert got.free_bytes == before.capacity - before.used - 64 * 1024
        with pytest.raises(CapacityError):
            await c.alloc_pool("s-b", wire.POOL_SWAP, big)
        with pytest.raises(CapacityError, match="receive_bytes"):
            await c.alloc_pool("r-a", wire.POOL_RECEIVE, big)
        with pytest.raises(CapacityError, match="raise replica_bytes"):
            await c.alloc_pool("p-a", wire.POOL_REPLICA, small)  # h0 has no replica store at all
        await c.free_pool("s-a")
        again = await c.alloc_pool("s-a", wire.POOL_SWAP, small)
        assert again.free_bytes == got.free_bytes
        assert (await c.alloc_pool("s-a", wire.POOL_SWAP, small, exist_ok=True)).existed
        await c.free_pool("s-a")
        await c.close()

    run(scenario)


async def raw_exchange(address: str, identity: str, bodies: list[object], frames: list[list[bytes]] | None = None,
                       answers: int = 1, incarnation: int = 0) -> list[object]:
    """Send messages from a raw DEALER (a misbehaving client or peer) and collect `answers` replies."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    codec = streamer_codec(identity, incarnation)
    try:
        for i, body in enumerate(bodies):
            await sock.send_multipart([codec.encode(body), *((frames or [[]] * len(bodies))[i])])
        out = []
        for _ in range(answers):
            got = await asyncio.wait_for(sock.recv_multipart(), 5)
            out.append(codec.decode(got[0]).body)
        return out
    finally:
        sock.close(0)
        ctx.destroy(0)


def test_duplicate_requests_are_refused(pair) -> None:  # type: ignore[no-untyped-def]
    h0, _ = pair
    lay = PoolLayout(0, 1, 2, 8, 1, 4, torch.float32)

    async def scenario() -> None:
        c = StreamerClient(h0.control, "dup")
        await connect(c)
        await c.alloc_pool("dup-a", wire.POOL_SWAP, lay)
        await c.alloc_pool("dup-b", wire.POOL_SWAP, lay)
        r = region_to_spec(Region((0,), (0, 1), ((0, 8),)))
        req = wire.StreamRequest(5, wire.PoolRef("dup-a"), r, [wire.Route([0, 1], wire.PoolRef("dup-b"), r)])
        answers = await raw_exchange(h0.control, "dup-raw", [req, req, wire.StreamRequest(
            4, wire.PoolRef("dup-a"), r, [wire.Route([0, 1], wire.PoolRef("dup-b"), r)])], answers=3)
        done = [a for a in answers if isinstance(a, wire.TransferDone)]
        refused = [a for a in answers if isinstance(a, ErrorReply)]
        assert len(done) == 1 and done[0].xfer == 5  # delivered once
        assert len(refused) == 2 and all(a.code == wire.XFER_DUPLICATE for a in refused)  # replay and older id
        await c.free_pool("dup-a")
        await c.free_pool("dup-b")
        await c.close()

    run(scenario)


async def _holds_then_free(c: StreamerClient, pool: str, lay: PoolLayout, region: Region, data: torch.Tensor) -> None:
    """`region` of host pool `pool` holds exactly `data` (copied out into a fresh pool to look); then the pool
    is freed and the client closed."""
    mem = SharedPoolMemory.create(lay)
    await c.register_pool(f"{pool}-check", mem)
    await (await c.stream(pool, region, dst=f"{pool}-check", dst_region=region)).wait(5)
    assert torch.equal(packed(mem.tensor, lay, region).reshape(-1), data)
    await c.unregister_pool(f"{pool}-check")
    await c.free_pool(pool)
    await c.close()


def test_corrupt_and_duplicate_chunks_from_a_peer_are_refused(pair) -> None:  # type: ignore[no-untyped-def]
    h0, _ = pair
    lay = PoolLayout(0, 2, 2, 8, 1, 4, torch.float32)  # 16-byte rows
    region = Region((1,), (0, 2), ((0, 8),))  # 32 rows = 512 bytes
    data = fill_random(torch.empty(512, dtype=torch.uint8), 9)
    half = [data[:256].numpy().tobytes(), data[256:].numpy().tobytes()]

    def opening(rseq: int) -> wire.RemoteOpen:
        return wire.RemoteOpen(rseq, "rx", region_to_spec(region), 2, 512, "float32", 16, True, wire.VIA_FRAME)

    def piece(rseq: int, i: int, good: bool = True) -> wire.RemoteChunk:
        return wire.RemoteChunk(rseq, i, [16 * i, 16 * i + 16], 256, checksum(data[256 * i: 256 * i + 256]) + (0 if good else 1))

    async def scenario() -> None:
        c = StreamerClient(h0.control, "rx-owner")
        await connect(c)
        await c.alloc_pool("rx", wire.POOL_RECEIVE, lay)
        a = await raw_exchange(h0.data, "evil", [opening(1), piece(1, 0, good=False), piece(1, 1)],
                               [[], [half[0]], [half[1]]], answers=3)
        assert isinstance(a[0], wire.RemoteOpened) and a[0].ok
        by_chunk = {x.chunk: x for x in a[1:]}
        assert not by_chunk[0].ok and by_chunk[0].code == wire.XFER_CORRUPT
        assert not any(x.committed for x in a[1:])  # dropped with its corrupt chunk: never committed
        assert (await c.pool_info("rx")).filled == [0, 0]
        a = await raw_exchange(h0.data, "evil", [opening(2), piece(2, 0), piece(2, 1), piece(2, 1), opening(2)],
                               [[], [half[0]], [half[1]], [half[1]], []], answers=5)
        acks = [x for x in a if isinstance(x, wire.RemoteChunkAck)]
        assert sum(x.committed for x in acks) == 1  # delivered once
        assert [x.code for x in acks if not x.ok] == [wire.XFER_DUPLICATE]
        reopen = [x for x in a if isinstance(x, wire.RemoteOpened)]
        assert [x.ok for x in reopen] == [True, False] and reopen[1].code == wire.XFER_DUPLICATE
        assert (await c.pool_info("rx")).filled == [0, 8]
        await _holds_then_free(c, "rx", lay, region, data)

    run(scenario)


def test_a_chunk_carried_by_its_open_is_applied_once_and_a_mismatched_one_refused(pair) -> None:  # type: ignore[no-untyped-def]
    """RemoteOpen.first: chunk 0 rides with its transfer's open and is applied as if it came next (no answer to
    the open itself: the chunks' acks say it). A carried chunk that names another transfer is refused, nothing
    of that transfer commits, and the streamer goes on serving."""
    h0, _ = pair
    lay = PoolLayout(0, 2, 2, 8, 1, 4, torch.float32)  # 16-byte rows
    region = Region((1,), (0, 2), ((0, 8),))  # 32 rows = 512 bytes
    data = fill_random(torch.empty(512, dtype=torch.uint8), 13)
    half = [data[:256].numpy().tobytes(), data[256:].numpy().tobytes()]

    def piece(rseq: int, i: int) -> wire.RemoteChunk:
        return wire.RemoteChunk(rseq, i, [16 * i, 16 * i + 16], 256, checksum(data[256 * i: 256 * i + 256]))

    def opening(rseq: int, first: wire.RemoteChunk) -> wire.RemoteOpen:
        return wire.RemoteOpen(rseq, "rx2", region_to_spec(region), 2, 512, "float32", 16, True, wire.VIA_FRAME,
                               answer=False, first=first)

    async def scenario() -> None:
        c = StreamerClient(h0.control, "rx2-owner")
        await connect(c)
        await c.alloc_pool("rx2", wire.POOL_RECEIVE, lay)
        a = await raw_exchange(h0.data, "carrier", [opening(1, piece(7, 0))], [[half[0]]], answers=1)
        assert isinstance(a[0], wire.RemoteChunkAck) and not a[0].ok and not a[0].committed
        assert (await c.pool_info("rx2")).filled == [0, 0]
        a = await raw_exchange(h0.data, "carrier", [opening(2, piece(2, 0)), piece(2, 1)], [[half[0]], [half[1]]],
                               answers=2)
        assert all(isinstance(x, wire.RemoteChunkAck) and x.ok for x in a)
        assert sum(x.committed for x in a) == 1  # delivered once, no RemoteOpened for the quiet open
        assert (await c.pool_info("rx2")).filled == [0, 8]
        await _holds_then_free(c, "rx2", lay, region, data)

    run(scenario)


def test_peer_death_fails_transfers_within_the_deadline(pair) -> None:  # type: ignore[no-untyped-def]
    h0, _ = pair
    d = tempfile.mkdtemp(prefix="dv")
    h2 = StreamerProc.start("h2", "--replica-gib", str(1 / 1024), directory=d)
    lay = PoolLayout(0, 3, 2, 8, 1, 4, torch.float32)
    region = Region.uniform((0, 1), (0, 3), 0, 8)
    try:
        async def scenario() -> None:
            c, r = StreamerClient(h0.control, "pd"), StreamerClient(h2.control, "pd-ctl")
            await connect(c)
            await connect(r)
            await c.set_peer("h2", h2.data)
            await r.alloc_pool("pd-rep", wire.POOL_REPLICA, lay)
            mem = SharedPoolMemory.create(lay)
            await c.register_pool("pd", mem)
            dst = wire.PoolRef("pd-rep", "h2")
            await (await c.stream("pd", region, dst=dst, dst_region=region)).wait(5)  # the link works
            h = await c.stream("pd", region, dst=dst, dst_region=region, layered=True, progress=True)
            await c.layer_ready([h.xfer], 0)
            await h.next_progress(5)  # layer 0 acknowledged by h2 ...
            h2.kill()  # ... then h2 dies for real
            t0 = time.monotonic()
            await c.layer_ready([h.xfer], 1)
            with pytest.raises(PeerDeadError, match="h2.*peer_timeout_s"):
                await h.wait(10)
            assert time.monotonic() - t0 < 1.0 + 1.5  # peer_timeout_s = 1.0, plus scheduling slack
            t0 = time.monotonic()
            with pytest.raises(PeerDeadError):  # a push to the dead peer
                await (await c.stream("pd", region, dst=dst, dst_region=region)).wait(10)
            assert time.monotonic() - t0 < 1.0 + 1.5
            t0 = time.monotonic()
            with pytest.raises(PeerDeadError):  # and a pull from it
                await (await c.stream(dst, region, dst="pd", dst_region=region)).wait(10)
            assert time.monotonic() - t0 < 1.0 + 1.5
            await c.unregister_pool("pd")
            await c.close()
            await r.close()

        run(scenario)
    finally:
        h2.kill()


def _start_fake_stage(control: str, name: str, seed: int) -> tuple[subprocess.Popen[bytes], Path]:
    """tests/streamer/fake_stage.py, once it registered its pool (and a layered transfer is under way)."""
    stage = subprocess.Popen([sys.executable, "-m", "tests.streamer.fake_stage", control, name, str(seed)],
                             cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sel = selectors.DefaultSelector()
    assert stage.stdout is not None
    sel.register(stage.stdout, selectors.EVENT_READ)
    assert sel.select(timeout=60), "fake stage never got ready"
    line = stage.stdout.readline().decode()
    assert line.startswith("READY"), line + stage.stdout.read().decode()
    return stage, Path(line.split()[1])


def test_dead_stage_fails_its_transfers_and_its_pools_survive(pair) -> None:  # type: ignore[no-untyped-def]
    h0, _ = pair
    stage, shm_path = _start_fake_stage(h0.control, "dying", 77)
    try:
        stage.send_signal(signal.SIGKILL)
        stage.wait(10)
        lay, region = fake_stage.LAYOUT, fake_stage.REGION
        expected = fill_random(torch.empty(lay.shape, dtype=lay.dtype), 77)

        async def scenario() -> None:
            c = StreamerClient(h0.control, "rescuer")
            await connect(c)
            deadline = time.monotonic() + 5  # the streamer watches the stage's pid: it knows at once
            while (await c.pool_info("dying")).owner_alive:
                assert time.monotonic() < deadline, "streamer did not notice the stage's death"
            assert (await c.status()).active_transfers == 0  # its layered transfer failed, not left hanging
            mem = SharedPoolMemory.create(lay)
            await c.register_pool("rescued", mem)
            for src in ("dying-swap", "dying"):  # the swapped-out copy, and the orphaned pool itself
                mem.tensor.zero_()
                await (await c.stream(src, region, dst="rescued", dst_region=region)).wait(5)
                assert torch.equal(packed(mem.tensor, lay, region), packed(expected, lay, region)), src
                assert (await c.pool_info("dying-swap")).filled == [0, 0, 0, 9]  # slots 1 and 0 start past 0
            restarted = SharedPoolMemory.create(lay)
            await c.register_pool("dying", restarted, replace=True)  # the replacement takes over the name
            assert not shm_path.exists()  # the orphan's shared memory was released with it
            for name in ("dying", "rescued"):
                await c.unregister_pool(name)
            for name in ("dying-swap", "dying-recv"):
                await c.free_pool(name)
            await c.close()

        run(scenario)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait(5)


def test_a_restarted_stage_maps_its_predecessors_pool_and_takes_it_over(pair) -> None:  # type: ignore[no-untyped-def]
    """How a CPU stage comes back with its KV: pool_info names the orphan's shared-memory file; the new process
    maps it and registers it under the same name (replace=True) - the streamer keeps the pool as it is (same
    file, same bytes) instead of dropping it. While its owner lives, that is refused and nothing is unlinked."""
    h0, _ = pair
    stage, shm_path = _start_fake_stage(h0.control, "comeback", 78)
    lay = fake_stage.LAYOUT
    expected = fill_random(torch.empty(lay.shape, dtype=lay.dtype), 78)
    try:
        async def alive_owner() -> None:
            c = StreamerClient(h0.control, "impostor")
            await connect(c)
            info = await c.pool_info("comeback")
            assert info.path == str(shm_path) and info.owner_alive
            with pytest.raises(BadRequestError, match="alive"):
                await c.register_pool("comeback", SharedPoolMemory.attach(lay, info.path), replace=True)
            assert shm_path.exists()
            await c.close()

        run(alive_owner)
        stage.send_signal(signal.SIGKILL)
        stage.wait(10)

        async def comeback() -> None:
            c = StreamerClient(h0.control, "comeback-2")
            await connect(c)
            info = await c.pool_info("comeback")
            mem = SharedPoolMemory.attach(lay, info.path)
            await c.register_pool("comeback", mem, replace=True)
            assert shm_path.exists() and torch.equal(mem.tensor.view(torch.int16), expected.view(torch.int16))  # its KV
            after = await c.pool_info("comeback")
            assert after.owner == "comeback-2" and after.owner_alive and after.path == str(shm_path)
            mem.tensor[0].zero_()  # the new owner computes into the very memory the streamer maps
            await c.alloc_pool("comeback-check", wire.POOL_SWAP, lay)
            await (await c.stream("comeback", fake_stage.REGION, dst="comeback-check",
                                  dst_region=fake_stage.REGION)).wait(5)
            await c.unregister_pool("comeback")
            assert not shm_path.exists()  # the streamer still owns the name: unregistering releases it
            for name in ("comeback-swap", "comeback-recv", "comeback-check"):
                await c.free_pool(name)
            await c.close()

        run(comeback)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait(5)


def test_owner_down_from_the_supervisor_fails_that_stages_transfers(pair) -> None:  # type: ignore[no-untyped-def]
    h0, _ = pair
    lay = PoolLayout(0, 2, 1, 8, 1, 4, torch.float32)
    region = Region.uniform((0,), (0, 2), 0, 8)

    async def scenario() -> None:
        stage, sup = StreamerClient(h0.control, "od-stage"), StreamerClient(h0.control, "od-supervisor")
        await connect(stage)
        await connect(sup)
        mem = SharedPoolMemory.create(lay)
        await stage.register_pool("od", mem)
        await stage.alloc_pool("od-rx", wire.POOL_RECEIVE, lay)
        h = await stage.stream("od", region, dst="od-rx", dst_region=region, layered=True)
        other = await sup.stream("od", region, dst="od-rx", dst_region=region)  # not the dead stage's request
        await other.wait(5)
        await sup.owner_down("od-stage", "missed 3 heartbeats")
        with pytest.raises(OwnerDownError, match="missed 3 heartbeats"):
            await h.wait(5)
        info = await sup.pool_info("od")
        assert not info.owner_alive  # kept (CPU pool), marked orphaned
        await sup.unregister_pool("od")
        await sup.free_pool("od-rx")
        await stage.close()
        await sup.close()

    run(scenario)


def test_streamer_death_is_reported_not_hidden() -> None:
    h3 = StreamerProc.start("h3", "--receive-gib", str(1 / 1024))
    lay = PoolLayout(0, 2, 1, 8, 1, 4, torch.float32)
    try:
        async def scenario() -> None:
            c = StreamerClient(h3.control, "orphan")
            await connect(c)
            mem = SharedPoolMemory.create(lay)
            await c.register_pool("orphan", mem)
            await c.alloc_pool("orphan-rx", wire.POOL_RECEIVE, lay)
            region = Region.uniform((0,), (0, 2), 0, 8)
            h = await c.stream("orphan", region, dst="orphan-rx", dst_region=region, layered=True)
            h3.kill()
            t0 = time.monotonic()
            with pytest.raises(StreamerDownError):
                await h.wait(30)
            assert time.monotonic() - t0 < 2.0  # seen through the socket, not after a long timeout
            with pytest.raises(StreamerDownError):
                await c.status(timeout=30)
            mem.unlink()  # the streamer owned the name; it is dead, so the stage cleans up
            await c.close()

        run(scenario)
    finally:
        h3.kill()


def test_pool_contents_never_move_without_request(pair) -> None:  # type: ignore[no-untyped-def]
    """Registering, querying and failed requests leave a stage's memory untouched."""
    h0, _ = pair
    lay = PoolLayout(0, 2, 2, 8, 1, 4, torch.float32)

    async def scenario() -> None:
        c = StreamerClient(h0.control, "quiet")
        await connect(c)
        mem = SharedPoolMemory.create(lay)
        fill_random(mem.tensor, 4)
        before = mem.tensor.clone()
        await c.register_pool("quiet", mem)
        for path in ("/etc/hostname", "/dev/shm/../etc/passwd", str(mem.path) + "-x"):
            with pytest.raises(BadRequestError):  # the streamer maps (and later unlinks) only KV segments
                await c.request(wire.RegisterPool("evil", layout_to_spec(lay), wire.MEM_SHM, path=path))
        bad = Region((0,), (0, 2), ((0, 9),))  # past max_seq_len
        with pytest.raises(Exception, match="outside"):
            await (await c.stream("quiet", bad, dst="quiet", dst_region=bad)).wait(5)
        assert torch.equal(KVPool(lay, mem.tensor).data.view(torch.uint8), before.view(torch.uint8))
        await c.unregister_pool("quiet")
        await c.close()

    run(scenario)


def _manifest_entries(path: Path) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in json.loads(path.read_text())["pools"]}


def test_a_restarted_streamer_adopts_the_pools_of_its_manifest_and_refuses_bad_entries() -> None:
    """A streamer records every shared-memory stage pool it maps; killed and started again with the same
    manifest, it maps those whose file still exists before it serves: an orphan (its stage died while no
    streamer ran) is taken over by the restarted stage with its bytes, a pool whose stage still runs stays that
    stage's (an impostor is refused; the owner registering again is not). Entries that do not check out - a
    layout larger than the file, a file outside /dev/shm or gone, a name or a file taken twice, a malformed
    entry - are refused one by one without touching their files, and the streamer starts and serves anyway."""
    d = tempfile.mkdtemp(prefix="dv")
    manifest = Path(d) / "h4.pools.json"
    args = ("--manifest", str(manifest), "--swap-gib", str(1 / 1024), "--receive-gib", str(1 / 1024))
    h4 = StreamerProc.start("h4", *args, directory=d)
    lay = PoolLayout(0, 2, 2, 8, 1, 4, torch.float32)
    big = SHM_DIR / f"{SHM_PREFIX}-test{time.monotonic_ns()}-big"  # a layout 4096x larger than this file
    stage, files = None, [big]  # what a failure midway must not leave in /dev/shm
    try:
        stage, gone_path = _start_fake_stage(h4.control, "gone", 81)
        live_mem = SharedPoolMemory.create(lay)
        files += [gone_path, live_mem.path]
        fill_random(live_mem.tensor, 82)

        async def register_live() -> None:
            c = StreamerClient(h4.control, "live")
            await connect(c)
            await c.register_pool("live", live_mem)
            await c.close()

        run(register_live)
        entries = _manifest_entries(manifest)
        assert sorted(entries) == ["gone", "live"]
        assert (entries["gone"]["path"], entries["gone"]["pid"]) == (str(gone_path), stage.pid)
        assert (entries["live"]["path"], entries["live"]["pid"]) == (str(live_mem.path), os.getpid())

        h4.kill()
        stage.send_signal(signal.SIGKILL)  # its stage dies while no streamer runs
        stage.wait(10)
        big.write_bytes(bytes(4096))
        doc = json.loads(manifest.read_text())
        spec = entries["live"]["layout"]
        junk = [
            {**entries["live"], "name": "oversized", "path": str(big), "layout": [0, 64, 64, 16, 1, 4, "float32"]},
            {**entries["live"], "name": "outside", "path": "/etc/hostname"},
            {**entries["live"], "name": "vanished", "path": str(SHM_DIR / f"{SHM_PREFIX}-test-no-such-file")},
            {**entries["live"], "name": "same-file"},  # live's file under a second name: two owners would unlink it
            {**entries["gone"], "path": str(big), "layout": spec},  # gone's name twice
            {"name": 5, "layout": "nonsense"},
            {**entries["live"], "name": "zero", "path": str(big), "layout": [0, 0, 1, 1, 1, 1, "float32"]},
        ]
        doc["pools"] = [entries["gone"], entries["live"], *junk]
        manifest.write_text(json.dumps(doc))

        h4 = StreamerProc.start("h4", *args, directory=d)  # the same addresses and manifest
        expected = fill_random(torch.empty(fake_stage.LAYOUT.shape, dtype=fake_stage.LAYOUT.dtype), 81)

        async def adopted() -> None:
            c = StreamerClient(h4.control, "gone-2", incarnation=1)
            await connect(c)
            assert sorted((await c.status()).pools) == ["gone", "live"]  # not the junk, nor the arena pools
            assert sorted(_manifest_entries(manifest)) == ["gone", "live"]  # rewritten as adopted
            info = await c.pool_info("gone")
            assert (info.path, info.owner, info.owner_alive, info.owner_incarnation) == (str(gone_path), "gone",
                                                                                        False, 0)
            mem = SharedPoolMemory.attach(fake_stage.LAYOUT, info.path)
            await c.register_pool("gone", mem, replace=True)  # the restarted stage takes its KV over
            assert torch.equal(mem.tensor.view(torch.int16), expected.view(torch.int16))
            after = await c.pool_info("gone")
            assert (after.owner, after.owner_alive, after.owner_incarnation) == ("gone-2", True, 1)

            live = await c.pool_info("live")
            assert live.owner_alive and live.path == str(live_mem.path)  # this very process still runs
            with pytest.raises(BadRequestError, match="alive"):
                await c.register_pool("live", SharedPoolMemory.attach(lay, live.path), replace=True)
            owner = StreamerClient(h4.control, "live")
            await connect(owner)
            await owner.register_pool("live", live_mem, replace=True)  # its owner registering it again
            await owner.alloc_pool("live-check", wire.POOL_SWAP, lay)
            region = Region.uniform((0, 1), (0, 2), 0, 8)
            await (await owner.stream("live", region, dst="live-check", dst_region=region)).wait(5)  # mapped
            await owner.free_pool("live-check")
            await owner.close()

            await c.unregister_pool("gone")
            assert not gone_path.exists()  # the adopting streamer owns the name
            assert sorted(_manifest_entries(manifest)) == ["live"]
            await c.close()

        run(adopted)
        assert big.exists() and big.stat().st_size == 4096  # refused, and left alone
        log = h4.tail()
        for name in ("oversized", "outside", "vanished", "same-file", "gone", "zero"):
            assert f"manifest entry '{name}' not adopted" in log, name
        assert "entry 7 refused" in log  # the malformed one (name 5 is no string)
        assert h4.stop() == 0
        assert not live_mem.path.exists() and not manifest.exists()  # a clean stop releases what it adopted
    finally:
        if stage is not None and stage.poll() is None:
            stage.kill()
            stage.wait(5)
        h4.kill()
        for f in files:
            f.unlink(missing_ok=True)


def test_a_manifest_that_is_not_one_is_ignored() -> None:
    d = tempfile.mkdtemp(prefix="dv")
    manifest = Path(d) / "h5.pools.json"
    manifest.write_bytes(b"\x00{not json")
    h5 = StreamerProc.start("h5", "--manifest", str(manifest), directory=d)
    try:
        async def scenario() -> None:
            c = StreamerClient(h5.control, "m")
            await connect(c)
            assert (await c.status()).pools == []
            assert json.loads(manifest.read_text())["pools"] == []  # replaced by what it holds: nothing
            await c.close()

        run(scenario)
        assert "is not a manifest" in h5.tail()
        assert h5.stop() == 0
    finally:
        h5.kill()
