"""PeerLink.answer: each wait for a peer's answer has its deadline, kept by the link's one timer."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq.asyncio

from streamer import wire
from streamer.errors import PeerDeadError
from streamer.peer import CHECK_S, PeerLink
from streamer.proc import streamer_codec
from tests.streamer.helpers import run


def test_an_unanswered_wait_fails_at_its_deadline_and_an_answered_one_returns() -> None:
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        link = PeerLink(ctx, "me", "h9", "tcp://127.0.0.1:9", streamer_codec("me", 0), 5.0, 1 << 20)  # nobody there
        try:
            slow, fast, later = link.expect(("open", 1)), link.expect(("open", 2)), link.expect(("open", 3))
            t0 = time.monotonic()
            waits = [asyncio.ensure_future(link.answer(slow, "open of transfer 1", timeout=0.1)),
                     asyncio.ensure_future(link.answer(fast, "open of transfer 2", timeout=5.0)),
                     asyncio.ensure_future(link.answer(later, "open of transfer 3", timeout=0.4))]
            await asyncio.sleep(0)
            fast.set_result(wire.RemoteOpened(2, True))  # what the reader does when the answer comes
            assert (await waits[1]).rseq == 2
            with pytest.raises(PeerDeadError, match="h9 did not answer open of transfer 1 within 0.1s.*peer_timeout_s"):
                await waits[0]
            assert 0.1 <= time.monotonic() - t0 < 0.1 + CHECK_S + 0.2
            with pytest.raises(PeerDeadError, match="transfer 3"):
                await waits[2]
            assert 0.4 <= time.monotonic() - t0 < 0.4 + CHECK_S + 0.2
            assert not link._deadlines
        finally:
            link.close()
            ctx.destroy(0)

    run(scenario)


def test_a_post_that_finds_no_peer_is_queued_in_order_and_given_up_after_the_timeout() -> None:
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        link = PeerLink(ctx, "me", "h9", "tcp://127.0.0.1:9", streamer_codec("me", 0), 0.2, 1 << 20)  # nobody there
        try:
            first = link.post(wire.RemoteAbort(1, 20, "x"))
            second = link.post(wire.RemoteAbort(2, 20, "y"))  # behind the first, never ahead of it
            assert first is not None and second is not None
            t0 = time.monotonic()
            await asyncio.wait([first, second], timeout=5)
            assert first.cancelled() and second.cancelled() and time.monotonic() - t0 < 1.0
        finally:
            link.close()
            ctx.destroy(0)

    run(scenario)
