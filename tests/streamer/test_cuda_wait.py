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
