"""NCCL activation links on CPU, with fake communicators: a link is aborted off the compute thread (the thread
that may be blocked on it), and a step that meets an aborted link is told apart from a link fault."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bus.nccl_activation import LinkClosed, NcclActivations, _check, _link_errors
from streamer.errors import PeerDeadError


class FakeComm:
    def __init__(self) -> None:
        self.aborted = threading.Event()  # what a pending NCCL kernel polls: abort makes it return

    def abort(self) -> None:
        self.aborted.set()

    def check_async_error(self) -> None:
        pass

    def send(self, *args: object) -> None:
        raise RuntimeError("NCCL error: invalid argument (communicator freed)")


class FakeLink:
    def __init__(self, link_id: int) -> None:
        self.link_id, self.peer, self.comm = link_id, "stage-x", FakeComm()
        self.dead = self.closed = False
        self.abort_thread = ""

    def abort(self) -> None:
        self.abort_thread = threading.current_thread().name
        self.dead = self.closed = True
        self.comm.abort()

    def check(self) -> None:
        if self.dead:
            raise PeerDeadError("down")


def test_close_releases_a_compute_thread_blocked_on_the_link() -> None:
    """The compute thread waits on the incoming link (a synchronize on a receive whose sender died); closing
    the link for a new epoch must not queue behind that wait: it aborts on its own thread, which releases it."""
    compute = ThreadPoolExecutor(1, thread_name_prefix="compute")
    acts = NcclActivations(torch.device("cpu"), 1)
    link = acts.inc = FakeLink(7)

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        inside = threading.Event()

        def wait_on_link() -> bool:
            inside.set()
            return link.comm.aborted.wait(30.0)

        blocked = loop.run_in_executor(compute, wait_on_link)
        assert await loop.run_in_executor(None, inside.wait, 5.0)
        await asyncio.wait_for(acts.close_in(), 5.0)
        return await asyncio.wait_for(blocked, 5.0)

    try:
        assert asyncio.run(scenario()) is True
    finally:
        compute.shutdown(wait=False)
    assert acts.inc is None and link.closed
    assert link.abort_thread.startswith("nccl-abort-") and not link.abort_thread.startswith("compute")


def test_a_step_on_an_aborted_link_is_stale_and_a_failing_live_link_is_a_fault() -> None:
    link = FakeLink(3)
    with pytest.raises(PeerDeadError):  # a live link whose NCCL call fails: the stage must not go on
        with _link_errors(link):
            link.comm.send(0, 1)
    link.closed = True
    with pytest.raises(LinkClosed):  # the same failure after a deliberate abort: drop the step
        with _link_errors(link):
            link.comm.send(0, 1)
    with pytest.raises(LinkClosed):
        _check(link)
