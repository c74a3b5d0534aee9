"""Microbatch swapping (the paper's section 4.2), the stage's side: its own KV pool holds `frames` microbatches
(2: the one computing and the next one, prefetched); every microbatch's KV lives in a swap pool of the host's
streamer (POOL_SWAP: pinned host memory on a GPU host, shared memory on CPU), laid out by *logical* slot as the
controller numbers them. The controller and its scheduler know nothing of frames: this module maps a step's
logical slots to the frame its microbatch is resident in (`acquire` returns the step the runtime computes).

Runs in the stage process, on its event loop; every copy goes through the streamer (streamer/api.py).

- Swap-in: a microbatch that is not resident gets a frame - a free one, else the least recently used one whose
  microbatch is not the next expected - once that frame's previous microbatch is written back; its rows [0, n)
  come from the swap pool. It starts as soon as a step of that microbatch is queued (`expect`), or, with nothing
  queued, for the microbatch the round-robin order predicts; `acquire` waits for it (deadline: swap_timeout).
- Write-back: after each step the rows it wrote go to the swap pool (`buffered`: short rows), a delta, so the swap
  copy is current up to the last write-back without copying whole microbatches. A microbatch's next step, and
  its frame's next owner, wait for its write-backs (ordering: two transfers never write the same rows at once).
  Each committed write-back is acknowledged to the controller (SwapAck), which keeps what the swap pool holds per
  request - so a restarted stage (kill -9) swaps back in instead of recomputing: the swap pool outlives it.
- Disaggregation (a token stage): the prompt stages push a prompt's KV by logical slot into this stage's *receive
  pool* (POOL_RECEIVE on its streamer, which only this stage reads). A request's first step after joining marks its
  chunk `joined` (StepRequest.joined): rows [0, start) of it come from the receive pool into the frame (with the
  microbatch's swap-in when the step was queued in time, else in `acquire`), and that step's write-back sends
  [0, end) to the swap pool, so the swap copy - and the replica fed from it - is whole, each row with one writer.
- Failures: a swap-in that fails or misses its deadline, or a microbatch whose write-back failed (its swap copy
  lacks rows), raises SwapError for its next step: the stage drops the step and says SwapFailed; the controller
  recomputes that microbatch from its committed tokens (a step starting every member at 0 needs no KV, and its
  write-back makes the swap copy whole again).

Never: computes, or blocks the loop on a copy.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bus.messages import Chunk, Msg, StepRequest, SwapAck, SwapInfo
from stages.errors import StageError
from stages.swap_policy import SwapDecision
from streamer.client import StreamerClient
from streamer.errors import StreamerError
from streamer.layout import PoolLayout, Region

log = logging.getLogger(__name__)


class SwapError(StageError):
    """A microbatch's KV could not be brought back (or its swap copy is incomplete): recompute it."""


class Swapper:
    def __init__(self, client: StreamerClient, pool: str, swap_pool: str, layout: PoolLayout, mb_size: int,
                 frames: int, timeout: float, decision: SwapDecision, send: Callable[[Msg], Awaitable[None]],
                 logical: PoolLayout | None = None, receive_pool: str | None = None) -> None:
        """layout: the stage's own (resident) pool, `frames * mb_size` slots; the swap pool (`logical`) has the
        same layers and one slot per logical slot, and so has the receive pool (a disaggregated token stage's)."""
        self.client, self.pool, self.swap_pool, self.layout = client, pool, swap_pool, layout
        self.logical, self.receive_pool = logical, receive_pool
        self.size, self.frames, self.timeout, self.decision, self.send = mb_size, frames, timeout, decision, send
        self.layers = (layout.first_layer, layout.first_layer + layout.num_layers)
        self.owner: list[int | None] = [None] * frames  # frame -> logical microbatch
        self.ready: list[asyncio.Future[None] | None] = [None] * frames  # frame -> its swap-in (done: resident)
        self.used = [0] * frames  # frame -> when last computed (LRU)
        # frame -> (epoch, step) of the queued step whose joined rows its swap-in brought from the receive pool
        self.fed: list[tuple[int, int] | None] = [None] * frames
        self.resident: dict[int, int] = {}  # mb -> frame
        self.have: dict[int, int] = {}  # logical slot of a resident mb -> tokens [0, n) its frame holds
        self.written: dict[int, int] = {}  # logical slot -> tokens [0, n) written back (the prefetch's guess)
        self.wb: dict[int, set[asyncio.Task[None]]] = collections.defaultdict(set)  # mb -> write-backs running
        self.poisoned: dict[int, str] = {}  # mb -> why its swap copy lacks rows (recompute it)
        # queued steps, in order (bounded: steps dropped unrun - an old epoch's - leave with the next epoch)
        self.expected: collections.deque[StepRequest] = collections.deque(maxlen=4096)
        self.epoch = -1  # the newest epoch a step came with
        self.seen: dict[int, int] = {}  # mb -> the tick of its latest step (round-robin prediction)
        self.tick = 0
        self.busy: int | None = None  # the microbatch of the step being made resident or computing now
        self.kept = False  # the swap pool existed when this incarnation started (a predecessor filled it)
        # the streamer came back and this stage does not know yet whether its pools survived: nothing swapped in now
        # counts (a pool allocated anew reads zeros)
        self.reopening = False
        self.bytes_in = self.bytes_out = self.swap_ins = self.stalls = self.failures = 0
        self.stall_s = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        # called with each step whose write-back committed (replication then copies its rows from the swap pool:
        # a swapped-out microbatch's replica is current, and nothing is sent twice)
        self.on_written: Callable[[StepRequest], None] | None = None
        if logical is not None:
            client.on_reconnect.append(self._streamer_back)

    # ------------------------------------------------------------------ mapping

    def frame_slot(self, frame: int, slot: int) -> int:
        return frame * self.size + slot % self.size

    def _slots(self, mb: int) -> range:
        return range(mb * self.size, (mb + 1) * self.size)

    def local(self, step: StepRequest, frame: int) -> StepRequest:
        chunks = [Chunk(self.frame_slot(frame, c.slot), c.start, c.length) for c in step.chunks]
        return StepRequest(step.epoch, step.mb, step.step, chunks, step.token_ids, step.sampling, step.hidden,
                           step.kv_to)

    @staticmethod
    def joined(step: StepRequest) -> dict[int, int]:
        """{logical slot: start} of the step's chunks that joined with KV in the receive pool (rows [0, start))."""
        return {step.chunks[k].slot: step.chunks[k].start for k in step.joined or ()
                if 0 <= k < len(step.chunks) and step.chunks[k].start > 0}

    # ------------------------------------------------------------------ prefetch

    def expect(self, step: StepRequest) -> None:
        """A step was queued: bring its microbatch in while the steps before it compute."""
        if step.epoch > self.epoch:
            self.epoch = step.epoch
            self.expected = collections.deque((s for s in self.expected if s.epoch >= step.epoch), maxlen=4096)
        self.expected.append(step)
        self._prefetch()

    def _prefetch(self) -> None:
        """Start the swap-in of the first queued step's microbatch that is neither resident nor coming; with nothing
        queued, of the microbatch after the latest one in round-robin order. Only into a frame whose microbatch no
        queued step before it needs (so a prefetch never evicts what is about to compute)."""
        upcoming: list[int] = []
        first: dict[int, StepRequest] = {}  # mb -> its first queued step (what its swap-in brings)
        for s in self.expected:
            if s.mb not in upcoming:
                upcoming.append(s.mb)
                first[s.mb] = s
        if not upcoming and self.seen:
            active = sorted(self.seen)
            last = max(self.seen, key=lambda m: self.seen[m])
            upcoming = [next((m for m in active if m > last), active[0])]
        keep: set[int] = set()
        for mb in upcoming:
            if mb not in self.resident:
                f = self._victim(keep)
                if f is not None:
                    step = first.get(mb)
                    joined = self.joined(step) if step is not None else {}
                    self._claim(f, mb, {s: self.written.get(s, 0) for s in self._slots(mb) if s not in joined},
                                joined, step)
                return
            keep.add(mb)
            if len(keep) >= self.frames:
                return

    def _victim(self, keep: set[int]) -> int | None:
        """A frame to (re)fill: free, else the least recently used one not computing and not holding `keep`."""
        free = [f for f in range(self.frames) if self.owner[f] is None]
        if free:
            return free[0]
        ok = [f for f in range(self.frames) if self.owner[f] != self.busy and self.owner[f] not in keep]
        return min(ok, key=lambda f: self.used[f]) if ok else None

    def _claim(self, frame: int, mb: int, lengths: dict[int, int], joined: dict[int, int] | None = None,
               step: StepRequest | None = None) -> None:
        """`frame` becomes `mb`'s now (no await between choosing and claiming); the copy runs in a task. lengths:
        rows [0, n) per logical slot from the swap pool; joined: rows [0, n) per slot from the receive pool (the
        joined chunks of `step`; never a slot of `lengths`: two copies never write the same rows)."""
        old, before = self.owner[frame], self.ready[frame]
        if old is not None:
            self.resident.pop(old, None)
            for s in self._slots(old):
                self.have.pop(s, None)
        self.owner[frame] = mb
        self.fed[frame] = None
        self.resident[mb] = frame
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if nobody waits
        self.ready[frame] = fut
        self._spawn(self._swap_in(frame, mb, old, before, lengths, fut, joined or {}, step))

    async def _swap_in(self, frame: int, mb: int, old: int | None, before: asyncio.Future[None] | None,
                       lengths: dict[int, int], fut: asyncio.Future[None], joined: dict[int, int],
                       step: StepRequest | None) -> None:
        try:
            if before is not None:  # the frame's previous swap-in: its destination rows are that transfer's
                await asyncio.wait({before}, timeout=2 * self.timeout + self.client.request_timeout_s)
            if old is not None and not await self._drained(old):
                self.poisoned.setdefault(old, "its write-back did not finish before its frame was reused")
            if not await self._drained(mb):  # (evicted right after a step, then prefetched again: the rows this
                # swap-in reads may still be that step's write-back's)
                raise SwapError(f"microbatch {mb}'s write-back did not finish within swap_timeout")
            got = await self._copy_in(frame, {s: (0, n) for s, n in lengths.items() if n > 0}, f"in {mb}")
            if joined:
                got.update(await self._receive(frame, joined, f"recv {mb}"))
            if self.ready[frame] is fut:  # (still this frame's: not claimed again meanwhile)
                for s in self._slots(mb):
                    self.have[s] = got.get(s, 0)
                if joined and step is not None:
                    self.fed[frame] = (step.epoch, step.step)
            fut.set_result(None)
        except (StreamerError, TimeoutError, SwapError) as e:
            self.failures += 1
            fut.set_exception(SwapError(f"swap-in of microbatch {mb} failed: {e}"))
        except asyncio.CancelledError:
            fut.set_exception(SwapError(f"swap-in of microbatch {mb} cancelled"))
            raise

    async def _copy_in(self, frame: int, ranges: dict[int, tuple[int, int]], tag: str,
                       source: str | None = None) -> dict[int, int]:
        """Copy rows ranges[slot] = [a, b) of logical slots from the swap pool (or `source`, laid out the same) into
        `frame`; {slot: b}."""
        slots = sorted(s for s, (a, b) in ranges.items() if b > a)
        if not slots:
            return {}
        tokens = tuple(ranges[s] for s in slots)
        src = Region(tuple(slots), self.layers, tokens)
        dst = Region(tuple(self.frame_slot(frame, s) for s in slots), self.layers, tokens)
        h = await self.client.stream(source or self.swap_pool, src, dst=self.pool, dst_region=dst, buffered=True,
                                     deadline_s=self.timeout, tag=tag)
        done = await h.wait()
        self.bytes_in += done.nbytes
        self.swap_ins += 1
        return {s: ranges[s][1] for s in slots}

    async def _receive(self, frame: int, joined: dict[int, int], tag: str) -> dict[int, int]:
        """Rows [0, n) of joined slots from the receive pool into `frame` (the prompt stages pushed them there)."""
        if self.receive_pool is None:
            raise SwapError(f"a step names joined chunks {sorted(joined)} but this stage has no receive pool (only a "
                            "disaggregated token stage has one)")
        return await self._copy_in(frame, {s: (0, n) for s, n in joined.items()}, tag, self.receive_pool)

    # ------------------------------------------------------------------ a step

    async def acquire(self, step: StepRequest) -> StepRequest:
        """Make the step's microbatch resident (its rows [0, start) of every member) and return the step in frame
        slots. Raises SwapError when that cannot be done in time (the caller says SwapFailed). Until after_step, no
        prefetch may take this microbatch's frame (`busy`)."""
        try:
            self.expected.remove(step)
        except ValueError:
            pass
        mb = step.mb
        self.busy = mb
        try:
            return await self._acquire(step)
        except BaseException:
            self.busy = None
            raise

    async def _acquire(self, step: StepRequest) -> StepRequest:
        mb = step.mb
        fresh = all(c.start == 0 for c in step.chunks)  # a (re)computation from the first token needs no KV
        if mb in self.poisoned and not fresh:
            raise SwapError(f"microbatch {mb}'s swap copy is incomplete ({self.poisoned[mb]})")
        t0 = time.monotonic()
        if not await self._drained(mb):
            self.failures += 1
            raise SwapError(f"microbatch {mb}'s write-back did not finish within swap_timeout ({self.timeout:.0f}s)")
        joined = {} if fresh else self.joined(step)
        frame = self.resident.get(mb)
        if frame is None:
            f = self._victim(set())
            assert f is not None  # nothing else computes between steps
            self._claim(f, mb, {} if fresh else {c.slot: c.start for c in step.chunks if c.slot not in joined},
                        joined, step)
            frame = f
        fut = self.ready[frame]
        assert fut is not None
        if not fut.done():
            done, _ = await asyncio.wait({fut}, timeout=self.timeout)
            if not done:
                self.failures += 1
                self._evict(frame)
                raise SwapError(f"microbatch {mb} was not swapped in within swap_timeout ({self.timeout:.0f}s)")
        err = fut.exception()
        if err is not None:
            self._evict(frame)
            if not fresh:
                raise err
            self._claim(frame, mb, {})  # a fresh step needs no rows: the frame is simply its
            again = self.ready[frame]
            assert again is not None
            await asyncio.wait({again}, timeout=self.timeout)
        if not fresh:
            # a joined chunk's rows are in the receive pool only, whatever the frame holds for its slot (a previous
            # occupant's rows, guessed by a prefetch): copied unless this very step's swap-in brought them
            fed = self.fed[frame] == (step.epoch, step.step)
            short = {c.slot: (self.have.get(c.slot, 0), c.start) for c in step.chunks
                     if c.slot not in joined and self.have.get(c.slot, 0) < c.start}
            try:  # (bounded: each transfer's deadline is swap_timeout, and the client's wait ends after it)
                if joined and not fed:
                    self.have.update(await self._receive(frame, joined, f"recv {mb}+"))
                    self.fed[frame] = (step.epoch, step.step)
                if short:  # the prefetch guessed fewer rows (a restart: it knows no lengths), or none came yet
                    self.have.update(await self._copy_in(frame, short, f"in {mb}+"))
            except (StreamerError, TimeoutError, SwapError) as e:
                self.failures += 1
                self._evict(frame)
                raise SwapError(f"swap-in of microbatch {mb} failed: {e}") from None
            why = "the streamer came back and its pools may be new" if self.reopening else self.poisoned.get(mb)
            if why is not None:  # (the rows brought meanwhile may be a new pool's zeros)
                self._evict(frame)
                raise SwapError(f"microbatch {mb} cannot be swapped in: {why}")
        stall = time.monotonic() - t0
        if stall > 1e-3:
            self.stalls += 1
            self.stall_s += stall
        self.tick += 1
        self.used[frame] = self.tick
        self.seen[mb] = self.tick
        for m in [m for m, t in self.seen.items() if self.tick - t > 4 * max(2, len(self.seen))]:
            del self.seen[m]  # finished microbatches drop out of the round-robin guess
        return self.local(step, frame)

    def _evict(self, frame: int) -> None:
        """The frame holds nothing valid. Its swap-in may still run (past its deadline here, not yet at the
        streamer's): `ready` keeps it, and the frame's next swap-in waits for it first."""
        mb = self.owner[frame]
        if mb is not None:
            self.resident.pop(mb, None)
            for s in self._slots(mb):
                self.have.pop(s, None)
        self.owner[frame] = None
        self.fed[frame] = None

    def after_step(self, step: StepRequest, ran: bool) -> None:
        """The step (logical slots) finished computing in the frame `acquire` gave. ran: for a pipeline still
        current - its rows go to the swap pool; else its rows are not counted (the next epoch rewrites them)."""
        self.busy = None
        frame = self.resident.get(step.mb)
        if frame is None:
            return
        for c in step.chunks:
            self.have[c.slot] = c.start + c.length if ran else min(self.have.get(c.slot, 0), c.start)
        if not ran:
            self._prefetch()
            return
        if all(c.start == 0 for c in step.chunks):
            self.poisoned.pop(step.mb, None)
        for c in step.chunks:
            self.written[c.slot] = c.start + c.length
        joined = self.joined(step)  # (their prompt's rows came from the receive pool: the swap copy gets them too)
        rows = [(c.slot, 0 if c.slot in joined else c.start, c.start + c.length) for c in step.chunks
                if c.length > 0 or c.slot in joined]
        if rows:
            task = self._spawn(self._write_back(frame, step, rows))
            self.wb[step.mb].add(task)
            task.add_done_callback(self.wb[step.mb].discard)
        self._prefetch()

    async def _write_back(self, frame: int, step: StepRequest, rows: list[tuple[int, int, int]]) -> None:
        tokens = tuple((a, b) for _, a, b in rows)
        src = Region(tuple(self.frame_slot(frame, s) for s, _, _ in rows), self.layers, tokens)
        dst = Region(tuple(s for s, _, _ in rows), self.layers, tokens)
        try:
            h = await self.client.stream(self.pool, src, dst=self.swap_pool, dst_region=dst, buffered=True,
                                         deadline_s=self.timeout, tag=f"out {step.mb}/{step.step}")
            done = await h.wait()
        except StreamerError as e:
            self.failures += 1
            self.poisoned[step.mb] = f"the write-back of step {step.step} failed: {e}"
            log.warning("[swap] write-back of microbatch %d step %d failed: %s (the microbatch is recomputed)",
                        step.mb, step.step, e)
            return
        self.bytes_out += done.nbytes
        if step.mb in self.poisoned:  # (its frame was reused before this landed: these rows may be another's)
            return
        if self.on_written is not None:
            self.on_written(step)
        await self.send(SwapAck([[step.epoch, step.mb, step.step]], done.nbytes))

    async def _drained(self, mb: int) -> bool:
        """Wait for mb's write-backs (at most swap_timeout); False if some still run then."""
        pending = set(self.wb.get(mb, ()))
        if not pending:
            return True
        _, left = await asyncio.wait(pending, timeout=self.timeout)
        return not left

    def _streamer_back(self) -> None:
        """The host's streamer was restarted: the swap pool (and the receive pool) died with it. Allocate them again;
        every microbatch's swap copy is gone, and so are the prompts pushed for requests whose first step has not
        run (each microbatch is recomputed at its next step), and the controller counts nothing the old pool held.
        Until that is known, no swap-in counts (`reopening`: set here, synchronously, before any transfer can read
        a pool allocated anew)."""
        self.reopening = True
        self._spawn(self._reopen())

    async def _reopen(self) -> None:
        from streamer.wire import POOL_RECEIVE, POOL_SWAP

        assert self.logical is not None
        try:
            new = []
            for what, name, kind in (("swap", self.swap_pool, POOL_SWAP), ("receive", self.receive_pool, POOL_RECEIVE)):
                if name is None:
                    continue
                try:
                    got = await self.client.alloc_pool(name, kind, self.logical, exist_ok=True)
                except StreamerError as e:
                    log.warning("[swap] the restarted streamer has no pool %s for this stage (%s): every swap fails, "
                                "and its microbatches are recomputed", name, e)
                    got = None
                if got is None or not got.existed:
                    new.append(f"{what} pool {name}")
            if not new:
                return  # the connection dropped, the streamer did not
            for mb in range(self.logical.num_slots // self.size):
                self.poisoned[mb] = "the streamer was restarted: its swap pool is new"
            self.written.clear()
        finally:
            self.reopening = False
        await self.send(SwapAck([], 0, fresh=True))
        log.warning("[swap] streamer restarted: %s allocated anew (microbatches are recomputed once)", " and ".join(new))

    # ------------------------------------------------------------------ status, end

    def info(self) -> SwapInfo:
        return SwapInfo(self.decision.mode, True, self.decision.reason, self.frames, self.bytes_in, self.bytes_out,
                        self.swap_ins, self.stalls, self.stall_s, self.failures, self.kept)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
