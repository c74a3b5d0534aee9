"""NCCL activation links on CPU, with fake communicators: a link is aborted off the compute thread (the thread
that may be blocked on it), and a step that meets an aborted link is told apart from a link fault."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from stages.nccl_activation import LinkClosed, NcclActivations, _check, _link_errors
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


def test_epoch_over_aborts_only_the_links_of_that_epoch_or_older() -> None:
    """EpochOver(e): a link of epoch <= e is aborted at once (its peer's stage died); a link of a newer epoch,
    set up meanwhile (its LinkInit can overtake the controller's message), stays."""
    acts = NcclActivations(torch.device("cpu"), 1)
    old_out, new_in = FakeLink(1), FakeLink(2)
    acts.out, acts.out_epoch = old_out, 3
    acts.inc, acts.inc_epoch = new_in, 4
    asyncio.run(asyncio.wait_for(acts.close_epoch(3), 5.0))
    assert acts.out is None and old_out.closed
    assert acts.inc is new_in and not new_in.closed
    asyncio.run(asyncio.wait_for(acts.close_epoch(4), 5.0))
    assert acts.inc is None and new_in.closed


def test_a_link_closed_while_it_is_set_up_fails_as_closed_not_as_a_fault() -> None:
    """EpochOver during a Topology's link setup aborts the link being initialised: joining it then raises
    LinkClosed (the stage skips that epoch) instead of going on to a warm-up on a link that is gone."""
    acts = NcclActivations(torch.device("cpu"), 0)

    class SlowInit(FakeLink):
        """ncclCommInitRank waiting for a peer that never joins; an abort makes it return."""

        def __init__(self, link_id: int) -> None:
            super().__init__(link_id)
            self.entered, self.released = asyncio.Event(), asyncio.Event()

        async def init(self, uid: list[int], timeout: float) -> None:
            self.loop = asyncio.get_running_loop()
            self.entered.set()
            await asyncio.wait_for(self.released.wait(), timeout)

        def abort(self) -> None:
            super().abort()
            self.loop.call_soon_threadsafe(self.released.set)  # abort_link calls this on a thread of its own

    async def scenario() -> None:
        link = SlowInit(5)
        acts.out, acts.out_epoch, acts._uid = link, 7, [0]
        joining = asyncio.ensure_future(acts.join_out(5.0))
        await asyncio.wait_for(link.entered.wait(), 5.0)
        await acts.close_epoch(7)
        with pytest.raises(LinkClosed, match="closed while it was set up"):
            await asyncio.wait_for(joining, 5.0)

    asyncio.run(scenario())


@pytest.mark.gpu
def test_a_receive_never_writes_into_memory_that_queued_compute_still_reads() -> None:
    """Regression (4-stage OPT-66B shape on 4 H100s, device-side 'index out of bounds' asserts in a middle stage):
    the receive buffer was taken from the compute stream's share of the allocator, so NCCL (on the link stream)
    could overwrite a block whose last reader was still queued on the compute stream. Here the receiver frees a
    tensor whose copy is queued behind a sleep, then receives a message of the same size at once."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from bus.messages import TensorMeta
    from stages.frames import DTYPE_NAMES

    d0, d1 = torch.device("cuda:0"), torch.device("cuda:1")
    gpu0 = ThreadPoolExecutor(1, "gpu0", initializer=torch.cuda.set_device, initargs=(d0,))
    gpu1 = ThreadPoolExecutor(1, "gpu1", initializer=torch.cuda.set_device, initargs=(d1,))
    up, down = NcclActivations(d0, 0), NcclActivations(d1, 1)
    n = 4 << 20  # 16 MiB of float32: the allocator's large pool, where a freed block of one size is reused whole
    meta = TensorMeta(DTYPE_NAMES[torch.float32], [n])

    def receive() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.full((n,), 1.0, device=d1)
        torch.cuda._sleep(500_000_000)  # ~0.25 s of device time before the copy below may read x
        y = x.clone()
        del x  # freed on the host while its read is still queued
        out = down.recv(meta)
        torch.cuda.synchronize(d1)
        return y, out

    async def scenario() -> tuple[torch.Tensor, torch.Tensor]:
        loop = asyncio.get_running_loop()

        def on(pool):  # type: ignore[no-untyped-def]
            return lambda fn, *a: loop.run_in_executor(pool, fn, *a)

        uid = await up.open_out(on(gpu0), 60.0)
        await asyncio.gather(up.join_out(60.0), down.join_in(on(gpu1), uid, 60.0))
        got = loop.run_in_executor(gpu1, receive)
        await loop.run_in_executor(gpu0, lambda: up.send(torch.full((n,), 2.0, device=d0), lambda meta: None))
        y, out = await asyncio.wait_for(got, 60.0)
        await up.close_out()
        await down.close_in()
        return y, out

    try:
        y, out = asyncio.run(scenario())
    finally:
        gpu0.shutdown(wait=False)
        gpu1.shutdown(wait=False)
    assert bool((out == 2.0).all()), "the message arrived whole"
    assert bool((y == 1.0).all()), "the receive overwrote memory a queued kernel still had to read"
