"""The transfer engine in-process over CPU endpoints: byte-exact round trips of random regions (buffered and
naive, every dtype), layer-by-layer gating and delivery order, cancellation, deadlines."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import zmq.asyncio

from streamer import wire
from streamer.config import StreamerConfig
from streamer.endpoints import Endpoint
from streamer.engine import Runtime, Transfer, local_route
from streamer.errors import (
    BadRequestError,
    CancelledError,
    IntegrityError,
    PeerDeadError,
    TransferTimeoutError,
)
from streamer.layout import PoolLayout, Region, region_rows
from streamer.movers import CpuMover, copy_rows_cpu
from streamer.peer import PeerNet
from tests.streamer.helpers import DTYPES, fill_random, packed, random_layout, random_region, run


def endpoint(name: str, layout: PoolLayout, kind: int = wire.POOL_STAGE, seed: int | None = None) -> Endpoint:
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    if seed is not None:
        fill_random(flat, seed)
    return Endpoint(name, kind, layout, flat, "test")


def typed(ep: Endpoint) -> torch.Tensor:
    return ep.flat.view(ep.layout.dtype).view(ep.layout.shape)


class Env:
    def __init__(self, **overrides: object) -> None:
        cfg = {"name": "h0", "control_address": "ipc://x", "data_address": "ipc://y", "staging_bytes": 64 * 1024,
               **overrides}
        self.config = StreamerConfig(**cfg)  # type: ignore[arg-type]
        self.cpu = ThreadPoolExecutor(1)
        self.ctx = zmq.asyncio.Context()
        self.rt = Runtime(self.config, CpuMover(self.cpu, self.config.staging_bytes),
                          None, PeerNet(self.ctx, "h0", None, 1.0, 1 << 20, {}), self.cpu, None)  # type: ignore[arg-type]

    def transfer(self, src: Endpoint, region: Region, dst: Endpoint, dst_region: Region, **kw: object) -> Transfer:
        layered = bool(kw.pop("layered", False))
        chunk = int(kw.pop("chunk_bytes", self.config.staging_bytes))  # type: ignore[call-overload]
        route = local_route(src, region, dst, dst_region, chunk, layered)
        opts = {"checksum": True, "buffered": True, "deadline_s": 10.0, "notify": [], **kw}
        return Transfer(self.rt, "test", 1, "", src, [route], layered=layered, **opts)  # type: ignore[arg-type]

    def close(self) -> None:
        self.cpu.shutdown()
        self.ctx.destroy(0)


@pytest.fixture
def env():  # type: ignore[no-untyped-def]
    e = Env()
    yield e
    e.close()


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_round_trips_are_byte_exact(env: Env, dtype: torch.dtype, buffered: bool) -> None:
    rng = random.Random(hash((str(dtype), buffered)) % 1000)
    for trial in range(6):
        lay_a = random_layout(rng, dtype, first_layer=rng.randint(0, 3))
        lay_b = random_layout(rng, dtype, first_layer=rng.randint(0, 3), kv_heads=lay_a.kv_heads,
                              head_dim=lay_a.head_dim, max_seq=rng.randint(lay_a.max_seq_len, 48),
                              slots=rng.randint(1, 6))
        a, b = endpoint("a", lay_a, seed=trial), endpoint("b", lay_b, wire.POOL_SWAP, seed=100 + trial)
        n = min(lay_a.num_slots, lay_b.num_slots)
        ra = random_region(rng, lay_a, nslots=rng.randint(1, n))
        lens = [t1 - t0 for t0, t1 in ra.tokens]
        la = ra.num_layers
        if la > lay_b.num_layers:
            ra = ra.sub_layers(ra.layers[0], ra.layers[0] + lay_b.num_layers)
            la = lay_b.num_layers
        b0 = rng.randint(lay_b.first_layer, lay_b.first_layer + lay_b.num_layers - la)
        rb = random_region(rng, lay_b, lens=lens, layers=(b0, b0 + la))
        before_b = b.flat.clone()
        out = env.transfer(a, ra, b, rb, buffered=buffered, chunk_bytes=rng.choice([lay_a.row_bytes, 64 * 1024]))
        run(out.run)
        assert torch.equal(packed(typed(b), lay_b, rb), packed(typed(a), lay_a, ra))
        # nothing outside the destination region changed
        mask = torch.ones(lay_b.nbytes // lay_b.row_bytes, dtype=torch.bool)
        mask[region_rows(lay_b, rb)] = False
        rows_now, rows_before = b.flat.view(-1, lay_b.row_bytes), before_b.view(-1, lay_b.row_bytes)
        assert torch.equal(rows_now[mask], rows_before[mask])
        back = random_region(rng, lay_a, lens=lens, layers=ra.layers)
        if not (set(back.slots) & set(ra.slots)):
            run(env.transfer(b, rb, a, back, buffered=buffered).run)
            assert torch.equal(packed(typed(a), lay_a, back), packed(typed(b), lay_b, rb))


def test_layers_move_only_when_ready_and_in_order(env: Env) -> None:
    lay = PoolLayout(2, 4, 3, 16, 2, 8, torch.float32)
    src, dst = endpoint("p", lay), endpoint("t", lay)
    region = Region.uniform((0, 2), (2, 6), 0, 12)
    ref = typed(endpoint("ref", lay, seed=5))  # what the "prompt pass" computes, layer by layer
    arrived: list[int] = []

    async def scenario() -> None:
        moved = asyncio.Queue()  # type: ignore[var-annotated]

        async def on_layer(layer: int, done: int, nbytes: int) -> None:
            arrived.append(layer)
            await moved.put(layer)

        t = env.transfer(src, region, dst, region, layered=True, on_layer=on_layer, chunk_bytes=lay.row_bytes * 5)
        task = asyncio.ensure_future(t.run())
        for layer in range(2, 6):
            typed(src)[layer - 2].copy_(ref[layer - 2])  # "compute" layer l, then signal it
            t.layer_ready(layer)
            assert await asyncio.wait_for(moved.get(), 5) == layer
            got = packed(typed(dst), lay, region.sub_layers(2, layer + 1))
            assert torch.equal(got, packed(ref, lay, region.sub_layers(2, layer + 1)))
            if layer < 5:  # later layers have not moved: still zero at the destination
                assert not packed(typed(dst), lay, region.sub_layers(layer + 1, 6)).any()
        await asyncio.wait_for(task, 5)

    run(scenario)
    assert arrived == [2, 3, 4, 5]
    assert torch.equal(packed(typed(dst), lay, region), packed(ref, lay, region))


def test_missing_layer_fails_within_layer_timeout() -> None:
    e = Env(layer_timeout_s=0.3)
    lay = PoolLayout(0, 3, 2, 8, 1, 4, torch.float16)
    src, dst = endpoint("p", lay), endpoint("t", lay)
    region = Region.uniform((0, 1), (0, 3), 0, 8)

    async def scenario() -> float:
        t = e.transfer(src, region, dst, region, layered=True)
        t.layer_ready(0)  # then the stage goes silent
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(PeerDeadError, match="layer 1.*layer_timeout_s"):
            await t.run()
        return loop.time() - t0

    try:
        assert 0.25 < run(scenario) < 2.0
    finally:
        e.close()


def test_overall_deadline_and_cancel(env: Env) -> None:
    lay = PoolLayout(0, 2, 2, 8, 1, 4, torch.float16)
    src, dst = endpoint("p", lay), endpoint("t", lay, wire.POOL_REPLICA)
    region = Region.uniform((0, 1), (0, 2), 0, 8)

    async def deadline() -> None:
        t = env.transfer(src, region, dst, region, layered=True, deadline_s=0.2)
        with pytest.raises(TransferTimeoutError, match="transfer_timeout_s"):
            await t.run()

    async def cancel() -> None:
        t = env.transfer(src, region, dst, region, layered=True)
        t.task = asyncio.ensure_future(t.run())
        t.layer_ready(0)
        await asyncio.sleep(0)  # let it start (order only; the outcome does not depend on timing)
        t.abort(CancelledError("transfer 1 cancelled: test"))
        with pytest.raises(CancelledError, match="test"):
            await t.task

    run(deadline)
    run(cancel)
    assert dst.filled == [0, 0]  # neither committed


def test_a_deadline_fails_its_own_transfer_only_and_leaves_the_caller_running(env: Env) -> None:
    """Deadlines are kept by one watchdog per loop (engine._Watchdog): the transfer past its deadline fails
    with TransferTimeoutError, a concurrent one in the same task group completes, the awaiting task carries on
    (no cancellation leaks out of run()), and nothing stays watched."""
    from streamer.engine import _watchdog

    lay = PoolLayout(0, 2, 2, 8, 1, 4, torch.float16)
    src = endpoint("p", lay, seed=5)
    late, ok = endpoint("t1", lay, wire.POOL_REPLICA), endpoint("t2", lay, wire.POOL_REPLICA)
    region = Region.uniform((0, 1), (0, 2), 0, 8)

    async def scenario() -> None:
        stuck = env.transfer(src, region, late, region, layered=True, deadline_s=0.2)  # no LayerReady ever
        fine = env.transfer(src, region, ok, region, layered=True, deadline_s=30.0)
        fine.layer_ready(0)
        fine.layer_ready(1)
        got = await asyncio.gather(stuck.run(), fine.run(), return_exceptions=True)
        assert isinstance(got[0], TransferTimeoutError) and isinstance(got[1], float)
        await asyncio.sleep(0)  # any await would deliver a cancellation left pending on this task
        assert not _watchdog(asyncio.get_running_loop())._live

    run(scenario)
    assert ok.filled == [8, 8] and late.filled == [0, 0]


def test_host_pool_fill_marks_commit_only_whole_transfers(env: Env) -> None:
    lay = PoolLayout(0, 2, 2, 16, 1, 4, torch.float32)
    src, dst = endpoint("s", lay, seed=1), endpoint("r", lay, wire.POOL_REPLICA)
    run(env.transfer(src, Region.uniform((0, 1), (0, 2), 0, 10), dst, Region.uniform((0, 1), (0, 2), 0, 10)).run)
    assert dst.filled == [10, 10]
    run(env.transfer(src, Region((0,), (0, 2), ((10, 11),)), dst, Region((0,), (0, 2), ((10, 11),))).run)
    assert dst.filled == [11, 10]  # one decode step appended
    run(env.transfer(src, Region((1,), (0, 2), ((12, 14),)), dst, Region((1,), (0, 2), ((12, 14),))).run)
    assert dst.filled == [11, 10]  # a gap: not contiguous with what is filled
    t = env.transfer(src, Region((0,), (0, 2), ((4, 8),)), dst, Region((0,), (0, 2), ((4, 8),)), layered=True,
                     deadline_s=0.2)
    with pytest.raises(TransferTimeoutError):
        run(t.run)
    assert dst.filled == [4, 10]  # an overwrite that failed invalidates what it started to overwrite


def test_checksum_catches_corruption_in_a_copy() -> None:
    lay = PoolLayout(0, 1, 2, 8, 1, 4, torch.float32)
    src, dst = endpoint("s", lay, seed=3), endpoint("d", lay)
    rows = torch.arange(16)
    # a destination whose memory flips a bit after every write (bad RAM, a racing writer)
    orig = dst.rows.index_copy_

    def corrupting(dim, index, source):  # type: ignore[no-untyped-def]
        orig(dim, index, source)
        dst.flat[3] ^= 0x10

    dst.rows.index_copy_ = corrupting  # type: ignore[method-assign]
    staging = torch.empty(1 << 12, dtype=dst.rows.dtype)
    with pytest.raises(IntegrityError):
        copy_rows_cpu(src, dst, rows, rows, staging, True, True)
    copy_rows_cpu(src, dst, rows, rows, staging, True, False)  # unchecked: the corruption goes unseen


def test_overlapping_request_is_refused(env: Env) -> None:
    lay = PoolLayout(0, 2, 2, 8, 1, 4, torch.float32)
    with pytest.raises(BadRequestError):
        env.transfer(endpoint("s", lay), Region((0,), (0, 2), ((0, 4),)), endpoint("d", lay),
                     Region((0,), (0, 1), ((0, 4),)))


@pytest.mark.parametrize("buffered", [True, False])
def test_long_runs_are_copied_directly_and_exactly(env: Env, buffered: bool) -> None:
    """A whole-microbatch region (runs of 64 x 2 KiB rows): the CPU mover copies run by run, byte-exact."""
    lay = PoolLayout(0, 3, 4, 80, 8, 128, torch.bfloat16)
    src, dst = endpoint("s", lay, seed=8), endpoint("d", lay, wire.POOL_SWAP)
    region, back = Region.uniform((0, 1), (0, 3), 0, 64), Region.uniform((3, 2), (0, 3), 10, 74)
    run(env.transfer(src, region, dst, back, buffered=buffered, chunk_bytes=1 << 20).run)
    assert torch.equal(packed(typed(dst), lay, back), packed(typed(src), lay, region))


@pytest.mark.parametrize("buffered", [True, False])
def test_frame_gather_and_scatter_are_exact_for_long_and_short_pieces(buffered: bool) -> None:
    """What leaves and lands as a frame (gather_cpu / scatter_cpu): long pieces copied one by one, short ones by
    one index kernel (buffered) - the bytes are those of the row maps either way, and nothing else is touched."""
    from streamer.movers import LONG_RUN_BYTES, gather_cpu, scatter_cpu
    from streamer.regions import common_runs

    lay = PoolLayout(0, 2, 4, 300, 8, 128, torch.bfloat16)  # 2 KiB rows
    for region, dst_region in ((Region.uniform((1, 3), (0, 2), 0, 260), Region.uniform((0, 2), (0, 2), 20, 280)),
                               (Region((0, 2), (1, 2), ((5, 6), (9, 12))), Region((3, 1), (1, 2), ((0, 1), (7, 10))))):
        src, dst = endpoint("s", lay, seed=11), endpoint("d", lay, seed=12)
        s_idx, d_idx = region_rows(lay, region), region_rows(lay, dst_region)
        runs = common_runs(s_idx, s_idx).shape[0]  # long: 520 KiB pieces; short: 1-3 rows
        assert (s_idx.numel() * lay.row_bytes >= LONG_RUN_BYTES * runs) == (region.tokens[0][1] > 100)
        buf = torch.empty(s_idx.numel() * lay.row_bytes, dtype=torch.uint8)
        data = gather_cpu(src, s_idx, buffered, buf)
        assert torch.equal(data, src.rows.index_select(0, s_idx))
        want = dst.rows.clone().index_copy_(0, d_idx, data)
        scatter_cpu(dst, d_idx, data, buffered)
        assert torch.equal(dst.rows, want)


class FakeLayerEvent:
    """What a GPU stage pool's interprocess layer event does for layer_wait="host": synchronize() blocks until the
    stage's kernels for the layer have run (here: until the test fires it)."""

    def __init__(self) -> None:
        import threading

        self.fired = threading.Event()
        self.waited_on = threading.Event()  # a waiter thread is inside synchronize()

    def synchronize(self) -> None:
        self.waited_on.set()
        assert self.fired.wait(10.0)


def _gated_source(layer_timeout_s: float) -> tuple[Env, PoolLayout, list[FakeLayerEvent], Endpoint, Endpoint, Region]:
    """layer_wait="host": a 2-layer stage pool whose layer events the test fires, a destination, the region."""
    e = Env(layer_wait="host", layer_timeout_s=layer_timeout_s)
    lay = PoolLayout(0, 2, 2, 8, 1, 4, torch.float32)
    events = [FakeLayerEvent(), FakeLayerEvent()]
    src = Endpoint("p", wire.POOL_STAGE, lay, torch.zeros(lay.nbytes, dtype=torch.uint8), "test",
                   events=events)  # type: ignore[arg-type]
    dst = endpoint("t", lay)
    region = Region.uniform((0, 1), (0, 2), 0, 8)
    return e, lay, events, src, dst, region


def test_host_layer_wait_moves_a_layer_only_once_its_compute_has_finished() -> None:
    """layer_wait="host": LayerReady alone (kernels launched, not yet run) does not start the layer's copy; the
    event having fired does. A layer whose event never fires fails the transfer within layer_timeout_s."""
    e, lay, events, src, dst, region = _gated_source(0.5)
    ref = typed(endpoint("ref", lay, seed=9))

    async def scenario() -> None:
        moved: asyncio.Queue[int] = asyncio.Queue()

        async def on_layer(layer: int, done: int, nbytes: int) -> None:
            await moved.put(layer)

        t = e.transfer(src, region, dst, region, layered=True, on_layer=on_layer)
        task = asyncio.ensure_future(t.run())
        typed(src)[0].copy_(ref[0])
        t.layer_ready(0)  # launched, not computed
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, events[0].waited_on.wait, 5.0)  # the engine waits on the event
        assert moved.empty() and not typed(dst).any()  # ... and has issued no copy before it fires
        events[0].fired.set()
        assert await asyncio.wait_for(moved.get(), 5) == 0
        t.layer_ready(1)  # layer 1's event never fires: the stage died mid-layer
        with pytest.raises(PeerDeadError, match="layer 1 .*not computed.*layer_timeout_s"):
            await asyncio.wait_for(task, 5)
        events[1].fired.set()  # release the waiter thread

    try:
        run(scenario)
    finally:
        e.close()
    assert torch.equal(packed(typed(dst), lay, region.sub_layers(0, 1)), packed(ref, lay, region.sub_layers(0, 1)))


def test_host_layer_wait_holds_a_whole_region_copy_until_its_last_layer_is_computed() -> None:
    """layer_wait="host", a transfer that is not layered (a replica or swap right after a step): nothing is
    read before the stage's event of the region's last layer has fired (the events fire in layer order)."""
    e, lay, events, src, dst, region = _gated_source(5.0)
    ref = typed(endpoint("ref", lay, seed=10))

    async def scenario() -> None:
        t = e.transfer(src, region, dst, region)
        task = asyncio.ensure_future(t.run())
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, events[1].waited_on.wait, 5.0)  # waits on the last layer's event
        assert not events[0].waited_on.is_set() and not typed(dst).any() and not task.done()
        typed(src).copy_(ref)  # the step's kernels run ...
        events[1].fired.set()  # ... and its last layer's event fires
        await asyncio.wait_for(task, 5)

    try:
        run(scenario)
    finally:
        e.close()
    assert torch.equal(packed(typed(dst), lay, region), packed(ref, lay, region))


def test_a_cuda_error_on_the_stage_event_fails_the_transfer_as_a_dead_peer() -> None:
    """The stage's context is gone (its process died): waiting on its interprocess event raises; the transfer
    fails with PeerDeadError naming the layer, at once."""
    e, lay, events, src, dst, region = _gated_source(5.0)

    class Broken(FakeLayerEvent):
        def synchronize(self) -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    src.events = [events[0], Broken()]  # type: ignore[list-item]
    try:
        with pytest.raises(PeerDeadError, match="layer 1 of test failed: CUDA error"):
            run(lambda: asyncio.wait_for(e.transfer(src, region, dst, region).run(), 5))
    finally:
        e.close()


def test_layer_wait_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="layer_wait"):
        StreamerConfig(name="h0", control_address="ipc://x", data_address="ipc://y", layer_wait="sometimes")


@pytest.mark.parametrize(("policy", "asked", "want"), [
    # (local pinned/shared host pool, local disk pool, remote): verified or not
    ("remote", None, (False, True, True)),
    ("all", None, (True, True, True)),
    ("off", None, (False, False, False)),
    ("remote", True, (True, True, True)),  # a request may always ask for checksums ...
    ("all", False, (False, False, False)),  # ... or turn them off
])
def test_checksum_policy_by_route(policy: str, asked: bool | None, want: tuple[bool, bool, bool]) -> None:
    """StreamerConfig.checksums decides for requests that do not say: "remote" verifies bytes that pass through
    software on their way (frames or NCCL to a peer streamer, memory-mapped disk pools) and trusts local DMA
    and memory copies; TransferDone.checksummed is true only when every route was verified."""
    from streamer.engine import RemoteRoute
    from streamer.movers import RouteIndex
    from streamer.planning import transfer_options

    e = Env(checksums=policy)
    try:
        lay = PoolLayout(0, 2, 2, 8, 1, 4, torch.float32)

        def ep(name: str, kind: int) -> Endpoint:
            return Endpoint(name, kind, lay, torch.zeros(lay.nbytes, dtype=torch.uint8), "t")

        src, host, disk = ep("s", wire.POOL_STAGE), ep("h", wire.POOL_SWAP), ep("d", wire.POOL_DISK)
        region = Region.uniform((0,), (0, 2), 0, 4)
        req = wire.StreamRequest(1, wire.PoolRef("s"), wire.RegionSpec([0], [0, 2], [[0, 4]]), [], checksum=asked)
        check, _, _ = transfer_options(e.config, req)
        assert check == ({"all": True, "off": False}.get(policy) if asked is None else asked)
        remote = RemoteRoute(region, "h1", "p", region, RouteIndex(None, None), [])
        routes = [local_route(src, region, host, region, 1 << 16, False),
                  local_route(src, region, disk, region, 1 << 16, False), remote]
        t = Transfer(e.rt, "test", 1, "", src, routes, layered=False, checksum=check, buffered=True,
                     deadline_s=1.0, notify=[])
        assert tuple(t.checks(r) for r in routes) == want
        assert t.checksummed == all(want)
        # a disk pool as the source counts too
        assert Transfer(e.rt, "test", 2, "", disk, routes[:1], layered=False, checksum=check, buffered=True,
                        deadline_s=1.0, notify=[]).checks(routes[0]) == (want[1] if asked is None else asked)
    finally:
        e.close()


def test_copy_settings_are_validated_and_set_from_the_command_line() -> None:
    from streamer.__main__ import parse_args as parse_config

    with pytest.raises(ValueError, match="checksums must be one of"):
        StreamerConfig("h0", "ipc://a", "ipc://b", checksums="sometimes")
    base = ["--name", "h0", "--control", "ipc://a", "--data", "ipc://b"]
    assert parse_config(base).checksums == "remote" and parse_config(base).inline_dma
    assert parse_config([*base, "--checksums", "all"]).checksums == "all"
    assert parse_config([*base, "--no-checksums"]).checksums == "off"
    assert not parse_config([*base, "--no-inline-dma"]).inline_dma
    assert parse_config(base).completion_spin_us == 1000.0
    assert parse_config([*base, "--completion-spin-us", "0"]).completion_spin_us == 0.0
    with pytest.raises(ValueError, match="completion_spin_us"):
        StreamerConfig("h0", "ipc://a", "ipc://b", completion_spin_us=-1.0)
    assert (parse_config(base).frame_threads, parse_config(base).switch_interval_us) == (4, 200.0)
    got = parse_config([*base, "--frame-threads", "2", "--switch-interval-us", "5000"])
    assert (got.frame_threads, got.switch_interval_us) == (2, 5000.0)
    for bad in ({"frame_threads": 0}, {"switch_interval_us": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StreamerConfig("h0", "ipc://a", "ipc://b", **bad)  # type: ignore[arg-type]
