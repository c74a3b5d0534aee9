"""The stage's Swapper (stages/swap.py) against an in-memory streamer: logical slots map to resident frames, a
microbatch's rows come back from the swap pool exactly, the next queued microbatch is prefetched while one computes,
every step's rows are written back (and acknowledged), and a failed swap is a SwapError until the microbatch is
recomputed from its first token."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from bus.messages import Chunk, Sampling, StepRequest, SwapAck, TransferDone
from stages.kv_cache import KVPool
from stages.swap import SwapError, Swapper
from stages.swap_policy import SwapDecision
from streamer.errors import TransferTimeoutError
from streamer.layout import PoolLayout, Region

SIZE, FRAMES, MBS = 2, 2, 4
LOGICAL = PoolLayout(0, 2, SIZE * MBS, 16, 1, 4, torch.float32)
RESIDENT = PoolLayout(0, 2, SIZE * FRAMES, 16, 1, 4, torch.float32)


class Handle:
    def __init__(self, nbytes: int, fail: Exception | None, gate: asyncio.Event) -> None:
        self.nbytes, self.fail, self.gate = nbytes, fail, gate

    async def wait(self) -> TransferDone:
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return TransferDone(0, "", self.nbytes, 0.0, False)


class FakeStreamer:
    """Copies between named pools at once (when `gate` is open); `fail` makes the next transfers fail."""

    def __init__(self) -> None:
        self.pools = {"kv": KVPool(RESIDENT), "swap": KVPool(LOGICAL)}
        self.log: list[tuple[str, str, Region, Region]] = []
        self.fail: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.request_timeout_s = 0.1

    async def stream(self, src: str, region: Region, *, dst: str, dst_region: Region, **_: Any) -> Handle:
        self.log.append((src, dst, region, dst_region))
        if self.fail is None:
            self.pools[dst].write(dst_region, self.pools[src].read(region))
        return Handle(region.nbytes(self.pools[src].layout), self.fail, self.gate)


def step(mb: int, n: int, rows: list[tuple[int, int, int]], epoch: int = 1) -> StepRequest:
    """rows: (slot within the microbatch, start, length)."""
    chunks = [Chunk(mb * SIZE + i, a, k) for i, a, k in rows]
    return StepRequest(epoch, mb, n, chunks, [], [Sampling()] * len(chunks))


def compute(fs: FakeStreamer, local: StepRequest, logical: StepRequest) -> None:
    """What the model does to the pool: write rows [start, start + length) of each chunk, a value that names the
    logical slot and position (so a row landing in the wrong place shows)."""
    kv = fs.pools["kv"]
    for c, lc in zip(local.chunks, logical.chunks):
        for t in range(c.start, c.start + c.length):
            kv.data[:, :, c.slot, t] = lc.slot * 100 + t


def expect_rows(fs: FakeStreamer, local: StepRequest, logical: StepRequest) -> None:
    kv = fs.pools["kv"]
    for c, lc in zip(local.chunks, logical.chunks):
        for t in range(c.start):
            assert torch.all(kv.data[:, :, c.slot, t] == lc.slot * 100 + t), (lc.slot, t)


def make(fs: FakeStreamer, sent: list[Any]) -> Swapper:
    async def send(msg: Any) -> None:
        sent.append(msg)

    return Swapper(fs, "kv", "swap", RESIDENT, SIZE, FRAMES, 2.0, SwapDecision(True, "test", "on"),  # type: ignore[arg-type]
                   send)


async def settle(sw: Swapper) -> None:
    while any(not t.done() for t in sw._tasks):
        await asyncio.sleep(0)


async def first_steps(sw: Swapper, fs: FakeStreamer, mbs: int) -> None:
    """A 4-token prompt in the first slot of microbatches 0..mbs-1, one after another."""
    for mb in range(mbs):
        s = step(mb, 1, [(0, 0, 4)])
        compute(fs, await sw.acquire(s), s)
        sw.after_step(s, True)
        await settle(sw)


def test_microbatches_round_robin_through_two_frames_with_their_kv_intact() -> None:
    async def scenario() -> None:
        fs, sent = FakeStreamer(), []
        sw = make(fs, sent)
        n = 0
        for rnd in range(4):  # 4 microbatches, 2 frames: every round swaps each one out and in again
            for mb in range(MBS):
                n += 1
                s = step(mb, n, [(0, 0, 5), (1, 0, 3)] if rnd == 0 else [(0, 4 + rnd, 1), (1, 2 + rnd, 1)])
                local = await sw.acquire(s)
                assert all(c.slot // SIZE < FRAMES for c in local.chunks)
                expect_rows(fs, local, s)
                compute(fs, local, s)
                sw.after_step(s, True)
                await settle(sw)
        assert sw.swap_ins > 0 and sw.bytes_in > 0 and sw.failures == 0
        assert len([m for m in sent if isinstance(m, SwapAck)]) == 4 * MBS
        await sw.close()

    asyncio.run(scenario())


def test_a_queued_step_is_prefetched_while_another_computes() -> None:
    async def scenario() -> None:
        fs, sent = FakeStreamer(), []
        sw = make(fs, sent)
        await first_steps(sw, fs, 3)  # (nothing queued after mb 2: round-robin predicts mb 0 and swaps it in)
        assert set(sw.resident) == {2, 0}
        first = step(1, 2, [(0, 4, 1)])
        local = await sw.acquire(first)  # mb 1 computes (in mb 0's frame, the least recently used) ...
        assert set(sw.resident) == {2, 1}
        nxt = step(0, 2, [(0, 4, 1)])
        sw.expect(nxt)  # ... while mb 0's step is queued: its swap-in starts now, into mb 2's frame
        await settle(sw)
        assert 0 in sw.resident and 2 not in sw.resident and sw.have[0] == 4
        compute(fs, local, first)
        sw.after_step(first, True)
        before = sw.swap_ins
        local = await sw.acquire(nxt)  # nothing to wait for
        assert sw.swap_ins == before
        expect_rows(fs, local, nxt)
        await sw.close()

    asyncio.run(scenario())


def test_a_failed_swap_in_is_a_swap_error_until_the_microbatch_is_recomputed() -> None:
    async def scenario() -> None:
        fs, sent = FakeStreamer(), []
        sw = make(fs, sent)
        await first_steps(sw, fs, 4)
        assert 1 not in sw.resident
        fs.fail = TransferTimeoutError("the streamer lost it")
        with pytest.raises(SwapError, match="swap-in of microbatch 1 failed"):
            await sw.acquire(step(1, 2, [(0, 4, 1)]))
        assert sw.failures == 1
        fs.fail = None
        again = step(1, 3, [(0, 0, 5)])  # the controller's recompute: every member from its first token
        local = await sw.acquire(again)
        compute(fs, local, again)
        sw.after_step(again, True)
        await settle(sw)
        s = step(1, 4, [(0, 5, 1)])
        expect_rows(fs, await sw.acquire(s), s)
        await sw.close()

    asyncio.run(scenario())


def test_a_failed_write_back_makes_the_microbatch_recomputed() -> None:
    async def scenario() -> None:
        fs, sent = FakeStreamer(), []
        sw = make(fs, sent)
        s = step(0, 1, [(0, 0, 4)])
        compute(fs, await sw.acquire(s), s)
        fs.fail = TransferTimeoutError("no room")
        sw.after_step(s, True)
        await settle(sw)
        fs.fail = None
        with pytest.raises(SwapError, match="swap copy is incomplete"):
            await sw.acquire(step(0, 2, [(0, 4, 1)]))
        assert not [m for m in sent if isinstance(m, SwapAck)]
        await sw.close()

    asyncio.run(scenario())


def test_a_swap_in_that_never_lands_misses_its_deadline() -> None:
    async def scenario() -> None:
        fs, sent = FakeStreamer(), []
        sw = make(fs, sent)
        sw.timeout = 0.2
        await first_steps(sw, fs, 4)
        fs.gate.clear()  # the streamer stops answering
        with pytest.raises(SwapError, match="within swap_timeout"):
            await sw.acquire(step(1, 2, [(0, 4, 1)]))
        fs.gate.set()
        await sw.close()

    asyncio.run(scenario())
