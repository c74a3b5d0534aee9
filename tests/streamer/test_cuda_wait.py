"""The device-completion wait (streamer/cuda.wait_event) is exercised here with a stand-in event, so the
mechanism - a daemon waiter thread blocked in synchronize(), the loop left free - is tested on CPU too."""

from __future__ import annotations

import asyncio
import threading

import pytest

from streamer.cuda import _Waiters, wait_event
from streamer.errors import TransferTimeoutError
from tests.streamer.helpers import run


class FakeEvent:
    def __init__(self) -> None:
        self.done = threading.Event()

    def query(self) -> bool:
        return self.done.is_set()

    def synchronize(self) -> None:
        self.done.wait()


def test_wait_returns_when_the_work_completes_and_the_loop_stays_free() -> None:
    async def scenario() -> None:
        ev = FakeEvent()
        waiter = asyncio.ensure_future(wait_event(ev, 5.0, "chunk", "transfer_timeout_s"))  # type: ignore[arg-type]
        ticks = 0
        for _ in range(20):  # the loop keeps running other tasks meanwhile
            await asyncio.sleep(0)
            ticks += 1
        assert not waiter.done() and ticks == 20
        ev.done.set()  # the "device" finishes
        await asyncio.wait_for(waiter, 5)

    run(scenario)


def test_wait_times_out_with_a_typed_error_naming_the_setting() -> None:
    async def scenario() -> None:
        ev = FakeEvent()
        with pytest.raises(TransferTimeoutError, match="peer_timeout_s"):
            await wait_event(ev, 0.2, "NCCL send", "peer_timeout_s")  # type: ignore[arg-type]
        ev.done.set()  # release the waiter thread
        done = FakeEvent()
        done.done.set()
        await wait_event(done, 0.2, "x", "y")  # type: ignore[arg-type]

    run(scenario)


def test_an_event_that_never_fires_holds_one_waiter_thread_not_the_waits_behind_it() -> None:
    """Elastic waiters: stuck waits (a stage that died mid-layer) each keep one thread; a later wait still gets
    a thread of its own at once, and threads beyond `keep` end once their waits are over."""
    waiters = _Waiters(2)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        stuck = [FakeEvent() for _ in range(5)]
        futs = [waiters.submit(ev, loop) for ev in stuck]
        ok = FakeEvent()
        ok.done.set()
        await asyncio.wait_for(waiters.submit(ok, loop), 5)
        assert not any(f.done() for f in futs) and waiters.threads >= 5
        for ev in stuck:
            ev.done.set()
        await asyncio.wait_for(asyncio.gather(*futs), 5)
        # the extra threads leave after settling their futures
        assert await asyncio.get_running_loop().run_in_executor(None, waiters.shrink_to, 2, 5.0)
        assert waiters.threads <= 2

    run(scenario)


class CountingEvent(FakeEvent):
    """Completes on its `after`-th query (device work the loop sees finish while it polls)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.queries, self.synced = after, 0, 0
        self.parked = threading.Event()  # set once a waiter thread blocks in synchronize()

    def query(self) -> bool:
        self.queries += 1
        if self.queries >= self.after:
            self.done.set()
        return super().query()

    def synchronize(self) -> None:
        self.synced += 1
        self.parked.set()
        super().synchronize()


def test_a_short_wait_is_polled_by_the_loop_without_a_waiter_thread() -> None:
    """spin_s: the loop polls (one query per turn, other tasks running between) and never parks the wait."""
    async def scenario() -> None:
        ev = CountingEvent(after=5)
        others = 0

        async def other() -> None:
            nonlocal others
            while not ev.done.is_set():
                others += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(other())
        await wait_event(ev, 5.0, "chunk", "transfer_timeout_s", spin_s=10.0)  # type: ignore[arg-type]
        await task
        assert ev.queries == 5 and ev.synced == 0 and others >= 3

    run(scenario)


def test_a_wait_longer_than_the_spin_parks_on_a_waiter_thread() -> None:
    async def scenario() -> None:
        ev = CountingEvent(after=10**9)  # never seen done by a query
        waiter = asyncio.ensure_future(wait_event(ev, 5.0, "chunk", "transfer_timeout_s", spin_s=0.002))  # type: ignore[arg-type]
        # polled ~2 ms, then handed to a thread blocked in synchronize()
        assert await asyncio.to_thread(ev.parked.wait, 5.0)
        polled = ev.queries
        for _ in range(20):  # loop turns: a wait still spinning would query on each
            await asyncio.sleep(0)
        assert ev.queries == polled and not waiter.done()  # parked: the loop polls no more
        ev.done.set()
        await asyncio.wait_for(waiter, 5)

    run(scenario)


def test_the_mover_spins_only_for_copies_expected_to_end_within_the_spin() -> None:
    import torch

    from streamer import wire
    from streamer.cuda_mover import GpuMover
    from streamer.endpoints import Endpoint
    from streamer.layout import PoolLayout

    lay = PoolLayout(0, 1, 1, 4, 1, 4, torch.float32)

    class Ep(Endpoint):
        def __init__(self, name: str, device: str) -> None:
            super().__init__(name, wire.POOL_STAGE, lay, torch.zeros(lay.nbytes, dtype=torch.uint8), "t")
            self.device = torch.device(device)  # where it claims to live (no GPU here)
            self.is_cuda = self.device.type == "cuda"

    g0, g0b, g1, host = Ep("a", "cuda:0"), Ep("b", "cuda:0"), Ep("c", "cuda:1"), Ep("h", "cpu")
    mover = GpuMover([], 1 << 20, 1, None, None, spin_s=1e-3)  # type: ignore[arg-type]
    MiB = 1 << 20
    assert mover.spin_for(31 * MiB, g0, g1) == 1e-3  # a prompt layer to a peer GPU: ~0.1-0.2 ms
    assert mover.spin_for(31 * MiB, g0, g0b) == 1e-3
    assert mover.spin_for(MiB // 2, g0, host) == 1e-3  # a decode step's KV to pinned host
    assert mover.spin_for(31 * MiB, g0, host) == 0.0  # a prompt layer over PCIe: ~0.6 ms, parked at once
    assert mover.spin_for(500 * MiB, g0, g1) == 0.0
    assert GpuMover([], 1 << 20, 1, None, None).spin_for(MiB, g0, g1) == 0.0  # type: ignore[arg-type]


def test_waits_on_one_stream_are_polled_oldest_first_by_one_poller() -> None:
    """Waits sharing a key (the stream their events were recorded on) complete in order: while the oldest is
    not done, the ones queued behind it are not queried; all settle as they complete, none parks."""
    async def scenario() -> None:
        evs = [CountingEvent(after=10**9) for _ in range(3)]
        waits = [asyncio.ensure_future(wait_event(ev, 5.0, "chunk", "transfer_timeout_s", spin_s=10.0, key="lane"))  # type: ignore[arg-type]
                 for ev in evs]
        for _ in range(10):
            await asyncio.sleep(0)
        assert evs[0].queries > 5 and evs[1].queries == evs[2].queries == 1  # one query each: wait_event's own
        evs[0].done.set()
        evs[1].done.set()
        await asyncio.wait_for(asyncio.gather(*waits[:2]), 5)
        assert not waits[2].done()
        evs[2].done.set()
        await asyncio.wait_for(waits[2], 5)
        assert sum(ev.synced for ev in evs) == 0

    run(scenario)


def test_a_cancelled_wait_leaves_the_poller_and_does_not_hold_up_its_stream() -> None:
    async def scenario() -> None:
        first, second = CountingEvent(after=10**9), CountingEvent(after=10**9)
        a = asyncio.ensure_future(wait_event(first, 5.0, "a", "s", spin_s=10.0, key=1))  # type: ignore[arg-type]
        b = asyncio.ensure_future(wait_event(second, 5.0, "b", "s", spin_s=10.0, key=1))  # type: ignore[arg-type]
        for _ in range(3):
            await asyncio.sleep(0)
        a.cancel()  # its transfer failed: the wait goes, its event is never queried again
        second.done.set()
        await asyncio.wait_for(b, 5)
        polled = first.queries
        for _ in range(5):
            await asyncio.sleep(0)
        assert first.queries == polled and a.cancelled()

    run(scenario)


def test_a_queued_wait_spins_from_when_the_work_ahead_of_it_completed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two waits on one stream, each spinning 0.5 s (on a clock the test moves): the second's work ends 0.6 s
    after both were queued - past its own spin counted from then, but within the spin counted from when the
    first completed (0.3 s). It is still polled, never parked on a waiter thread."""
    import types

    from streamer import cuda

    clock = [0.0]
    monkeypatch.setattr(cuda, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    async def turns(n: int = 5) -> None:
        for _ in range(n):
            await asyncio.sleep(0)  # loop turns: the poller ticks once each

    async def scenario() -> None:
        first, second = CountingEvent(after=10**9), CountingEvent(after=10**9)
        waits = [asyncio.ensure_future(wait_event(ev, 5.0, "chunk", "peer_timeout_s", spin_s=0.5, key="link"))  # type: ignore[arg-type]
                 for ev in (first, second)]
        await turns()
        clock[0] = 0.3
        first.done.set()
        await turns()
        assert waits[0].done() and not waits[1].done()
        clock[0] = 0.6  # past the second's spin from its queueing, within it from the first's completion
        await turns()
        assert not waits[1].done() and second.synced == 0  # still polled, not parked
        second.done.set()
        await asyncio.wait_for(asyncio.gather(*waits), 5)
        assert first.synced == second.synced == 0

    run(scenario)


def test_nccl_chunks_of_a_whole_prompt_spin_and_larger_ones_park() -> None:
    from streamer.cuda_mover import GpuMover

    MiB = 1 << 20
    mover = GpuMover([], 1 << 20, 1, None, None, spin_s=1e-3)  # type: ignore[arg-type]
    assert mover.spin_nccl(31 * MiB) == mover.spin_nccl(64 * MiB) == 1e-3
    assert mover.spin_nccl(128 * MiB) == 0.0
    assert GpuMover([], 1 << 20, 1, None, None).spin_nccl(MiB) == 0.0  # type: ignore[arg-type]
