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
        self.on_reconnect: list[Any] = []

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


# ---------------------------------------------------------------- disaggregation: the receive pool


def make_token(fs: FakeStreamer, sent: list[Any]) -> Swapper:
    """A disaggregated token stage's Swapper: prompts' KV lands in the receive pool `recv`, by logical slot."""
    fs.pools["recv"] = KVPool(LOGICAL)

    async def send(msg: Any) -> None:
        sent.append(msg)

    return Swapper(fs, "kv", "swap", RESIDENT, SIZE, FRAMES, 2.0, SwapDecision(True, "test", "on"), send,  # type: ignore[arg-type]
                   LOGICAL, "recv")


def land(fs: FakeStreamer, slot: int, n: int, mark: int = 0) -> None:
    """What the prompt stages push for a prompt of n tokens in logical slot `slot` (values name slot and position,
    as `compute` writes them; `mark` tells one occupant of the slot from another)."""
    for t in range(n):
        fs.pools["recv"].data[:, :, slot, t] = slot * 100 + t + mark


def joined(mb: int, n: int, rows: list[tuple[int, int, int]], which: list[int]) -> StepRequest:
    s = step(mb, n, rows)
    return StepRequest(s.epoch, s.mb, s.step, s.chunks, s.token_ids, s.sampling, joined=which)


def test_a_joined_request_gets_its_prompt_from_the_receive_pool_and_its_write_back_is_whole() -> None:
    """Slot 0 of microbatch 0 held an earlier request (written back 9 rows); a new request joins there with a 4-token
    prompt the prompt stages pushed into the receive pool. Its first step must read rows [0, 4) from the receive
    pool - the frame and the swap pool hold the previous occupant's rows there (a skipped copy computes on them) -
    and its write-back sends [0, 5) to the swap pool, so the swap copy is whole without the prompt stages writing
    it; later steps swap in from there as usual."""
    async def scenario() -> None:
        fs, sent = FakeStreamer(), []
        sw = make_token(fs, sent)
        old = step(0, 1, [(0, 0, 9)])
        compute(fs, await sw.acquire(old), old)  # (values slot*100+t: the new prompt's marked +1000)
        sw.after_step(old, True)
        await settle(sw)
        land(fs, 0, 4, mark=1000)
        s = joined(0, 2, [(0, 4, 1)], [0])
        local = await sw.acquire(s)
        assert sw.have[0] == 4
        kv = fs.pools["kv"].data
        for t in range(4):
            assert torch.all(kv[:, :, local.chunks[0].slot, t] == t + 1000), t
        assert [(src, dst) for src, dst, *_ in fs.log][-1] == ("recv", "kv")
        compute(fs, local, s)  # (row 4; rows [0, 4) stay the prompt's)
        for t in range(4):
            kv[:, :, local.chunks[0].slot, t] = t + 1000
        sw.after_step(s, True)
        await settle(sw)
        src, dst, region, dst_region = fs.log[-1]
        assert (src, dst, dst_region.slots, dst_region.tokens) == ("kv", "swap", (0,), ((0, 5),))
        swap = fs.pools["swap"].data
        assert all(torch.all(swap[:, :, 0, t] == t + 1000) for t in range(4)) and torch.all(swap[:, :, 0, 4] == 4)
        n = len(fs.log)
        for mb in (1, 2, 3):  # (they take the frames: microbatch 0 is swapped out, and prefetched again after 3)
            other = step(mb, 1, [(0, 0, 4)])
            compute(fs, await sw.acquire(other), other)
            sw.after_step(other, True)
            await settle(sw)
        ins = {(src, r.slots, r.tokens) for src, dst, r, _ in fs.log[n:] if dst == "kv" and 0 in r.slots}
        assert ins == {("swap", (0,), ((0, 5),))}, ins
        nxt = step(0, 3, [(0, 5, 1)])
        local = await sw.acquire(nxt)
        assert all(torch.all(kv[:, :, local.chunks[0].slot, t] == t + 1000) for t in range(4))
        await sw.close()

    asyncio.run(scenario())


def test_a_queued_joined_step_brings_its_prompt_with_the_swap_in() -> None:
    """A joined step queued while another microbatch computes: its microbatch's swap-in copies the joined slot's
    rows from the receive pool (never from the swap pool: two copies never write the same rows) and the other
    members' from the swap pool; acquire then copies nothing more."""
    async def scenario() -> None:
        fs, sent = FakeStreamer(), []
        sw = make_token(fs, sent)
        await first_steps(sw, fs, 3)  # slot 0 of microbatches 0-2: 4 rows each; round robin guessed microbatch 0
        assert set(sw.resident) == {2, 0}
        first = step(1, 2, [(0, 4, 1)])
        local = await sw.acquire(first)  # microbatch 1 computes in microbatch 0's frame
        land(fs, 1, 6, mark=1000)  # microbatch 0's slot 1 (logical 1) joins with a 6-token prompt
        nxt = joined(0, 2, [(0, 4, 1), (1, 6, 1)], [1])
        sw.expect(nxt)
        await settle(sw)
        copies = [(src, dst_region.slots, dst_region.tokens) for src, dst, _, dst_region in fs.log if dst == "kv"]
        assert ("recv", (sw.frame_slot(sw.resident[0], 1),), ((0, 6),)) == copies[-1], copies
        assert all(src == "swap" and 1 not in [s % SIZE for s in slots] for src, slots, _ in copies[-2:-1]), copies
        compute(fs, local, first)
        sw.after_step(first, True)
        n = len(fs.log)
        local = await sw.acquire(nxt)
        assert len(fs.log) == n  # nothing more to copy
        kv = fs.pools["kv"].data
        assert all(torch.all(kv[:, :, local.chunks[1].slot, t] == 1 * 100 + t + 1000) for t in range(6))
        expect_rows(fs, StepRequest(1, 0, 2, local.chunks[:1], [], []), StepRequest(1, 0, 2, nxt.chunks[:1], [], []))
        await sw.close()

    asyncio.run(scenario())


def test_no_swap_in_counts_while_a_restarted_streamers_pools_may_be_new() -> None:
    """The streamer came back (its receive and swap pools may be allocated anew: zeros): until the stage knows, a
    step that needs KV is a SwapError (the controller recomputes it); once both pools are new, every microbatch is
    recomputed once and the controller is told to count nothing the old pools held."""
    async def scenario() -> None:
        fs, sent = FakeStreamer(), []
        sw = make_token(fs, sent)
        await first_steps(sw, fs, 1)
        allocated: list[tuple[str, int]] = []

        class Got:
            existed = False

        async def alloc_pool(name: str, kind: int, layout: Any, exist_ok: bool) -> Got:
            allocated.append((name, kind))
            return Got()

        fs.alloc_pool = alloc_pool  # type: ignore[attr-defined]
        sw._streamer_back()
        assert sw.reopening
        land(fs, 1, 3)
        with pytest.raises(SwapError, match="streamer came back|restarted"):
            await sw.acquire(joined(0, 2, [(0, 4, 1), (1, 3, 1)], [1]))
        await settle(sw)
        from streamer.wire import POOL_RECEIVE, POOL_SWAP

        assert allocated == [("swap", POOL_SWAP), ("recv", POOL_RECEIVE)] and not sw.reopening
        assert any(isinstance(m, SwapAck) and m.fresh for m in sent)
        with pytest.raises(SwapError, match="its swap pool is new"):
            await sw.acquire(step(0, 3, [(0, 4, 1)]))
        again = step(0, 4, [(0, 0, 5)])  # the recompute
        compute(fs, await sw.acquire(again), again)
        sw.after_step(again, True)
        await sw.close()

    asyncio.run(scenario())


def test_a_joined_step_on_a_stage_without_a_receive_pool_is_a_swap_error() -> None:
    async def scenario() -> None:
        fs, sent = FakeStreamer(), []
        sw = make(fs, sent)
        with pytest.raises(SwapError, match="no receive pool"):
            await sw.acquire(joined(0, 1, [(0, 4, 1)], [0]))
        await sw.close()

    asyncio.run(scenario())


async def spin() -> None:
    """Let the Swapper's tasks run as far as they can (some wait on transfers held back)."""
    for _ in range(20):
        await asyncio.sleep(0)


class SlowWriteBacks(FakeStreamer):
    """Write-backs (frame -> swap pool) land only when released, in any order; every other copy at once."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[asyncio.Event, Any]] = []

    async def stream(self, src: str, region: Region, *, dst: str, dst_region: Region, **kw: Any) -> Handle:
        if (src, dst) != ("kv", "swap"):
            return await super().stream(src, region, dst=dst, dst_region=dst_region, **kw)
        self.log.append((src, dst, region, dst_region))
        data, gate = self.pools[src].read(region).clone(), asyncio.Event()
        self.held.append((gate, lambda: self.pools[dst].write(dst_region, data)))
        return Handle(region.nbytes(self.pools[src].layout), None, gate)

    def release(self, k: int) -> None:
        gate, land_it = self.held[k]
        land_it()
        gate.set()


def test_a_microbatch_prefetched_again_waits_for_its_own_write_back() -> None:
    """Microbatch 0 computes, then 1; their write-backs are slow. Steps of 2 and 0 are queued: 2 takes 0's frame and
    0 is prefetched again into 1's, once 1's write-back landed - but 0's own may still run: its swap-in must wait
    for it, or it reads rows the swap pool does not hold yet."""
    async def scenario() -> None:
        fs, sent = SlowWriteBacks(), []
        sw = make(fs, sent)
        a, b = step(0, 1, [(0, 0, 4)]), step(1, 1, [(0, 0, 4)])
        for s in (a, b):
            compute(fs, await sw.acquire(s), s)
            sw.after_step(s, True)
        await spin()
        c, again = step(2, 1, [(0, 0, 4)]), step(0, 2, [(0, 4, 1)])
        sw.expect(c)
        sw.expect(again)
        assert sw.resident == {2: 0, 0: 1}
        fs.release(1)  # 1's write-back lands: its frame is free for 0 ...
        await spin()
        assert not [r for src, _, r, _ in fs.log if src == "swap"]  # ... which still waits for its own
        fs.release(0)
        local = await sw.acquire(c)
        compute(fs, local, c)
        sw.after_step(c, True)
        await spin()
        fs.release(2)
        expect_rows(fs, await sw.acquire(again), again)
        await sw.close()

    asyncio.run(scenario())
