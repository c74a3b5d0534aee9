"""A stage's side of KV replication (the paper's section 5): every step's KV goes to a replica on another host,
and a stage that came back without its KV pulls it from there. All of it through the host's streamer
(streamer/api.py); this module only says what moves where, and tells the controller what landed.

Runs in the stage process, on its event loop (the compute thread only signals layers of a prompt pass).

- After each step the stage computed (for a pipeline still current), the rows that step wrote - its members'
  token ranges, every local layer - go to the replica pool as one transfer (`buffered`: many short rows). A
  prompt pass (a member with more than one token) is submitted *before* it runs, `layered`, and each layer
  moves as soon as the pass wrote it (KV hooks). When the streamer reports the transfer committed, the stage
  sends ReplicaAck(mb, step) to the controller, which keeps each request's replicated prefix per stage.
- `--replica-lag`: before a microbatch's next step, the stage waits until at most `lag` of that microbatch's
  transfers are still running (the wait is counted: stalls, stall_s). Replication never waits otherwise, but for
  the order of writes: a transfer starts only when nothing sent before it writes the same replica rows (a slot's
  previous occupant's last rows, a sync's), so no older row lands over a newer one (a prompt pass that waits on
  this is counted as a stall too).
- Disaggregated: a request's prompt KV reaches the token stage from the prompt stages, never its replica; the
  token stage is its replica's one writer and sends rows [0, end) of a chunk its step marks `joined`.
- A failed transfer (the replica's host lost, a full replica) marks replication broken: no more deltas (the
  replica misses rows from then on) until the next topology, which starts a whole-pool re-sync.
- ReplicaSync (a new replica: fresh pool, or on a new host): the whole KV the stage holds goes over once, in the
  background, acknowledged as `sync` with the last step of every microbatch it covers; deltas go on meanwhile.
- Restore: pull tokens [0, n) of each slot from the replica into the stage's own pool (the controller says how
  many: what it counts as replicated), before the epoch serves.
- Hosting: the stage allocates, on its own streamer, the replica pools of the stages the controller names
  (`exist_ok`: a restart of this stage keeps them; a new pool is reported `fresh`, i.e. empty). They are
  streamer pools: they outlive this stage, and are given back when the deployment stops.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from bus.logs import Throttled
from bus.messages import Msg, ReplicaAck, ReplicaTarget, Restore, Restored, StepRequest, Topology
from stages.peers import tell_peers
from streamer.client import LayerSignal, StreamerClient, TransferHandle
from streamer.errors import StreamerError
from streamer.layout import PoolLayout, Region
from streamer.wire import POOL_REPLICA, PoolRef

log = logging.getLogger(__name__)
noisy = Throttled(log)

RESTORE_DEADLINE_S = 60.0  # a restore pull of a whole stage's KV


MAX_IN_FLIGHT = 1  # per-step delta transfers a stage keeps running; later steps' rows wait and go together


@dataclass(eq=False)
class _Pending:
    """One transfer to the replica: a prompt pass's (layered, one step) or a batch of steps' deltas."""

    steps: list[StepRequest]
    target: ReplicaTarget | None
    delta: bool  # a batch of per-step deltas (else a prompt pass streamed layer by layer)
    rows: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot -> the rows [a, b) it writes
    handle: TransferHandle | None = None
    task: asyncio.Task[None] | None = None
    valid: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Replicator:
    def __init__(self, client: StreamerClient, pool: str, memory: Any, layout: PoolLayout, streamer: str, lag: int,
                 send: Callable[[Msg], Awaitable[None]]) -> None:
        self.client, self.pool, self.memory, self.layout = client, pool, memory, layout
        self.streamer, self.lag, self.send = streamer, lag, send
        self.layers = (layout.first_layer, layout.first_layer + layout.num_layers)
        self.target: ReplicaTarget | None = None
        self.queue: list[StepRequest] = []  # steps whose rows wait for a delta transfer (merged when they can)
        self.running: set[_Pending] = set()  # transfers in flight (layered prompt passes and delta batches)
        self.unacked: collections.Counter[int] = collections.Counter()  # mb -> its steps not replicated yet
        self.moved = asyncio.Event()  # a transfer finished (before_step waits on it)
        self.written = [0] * layout.num_slots  # per slot: tokens [0, n) this stage's pool holds
        self.last_step: dict[int, tuple[int, int]] = {}  # mb -> (epoch, step) of the latest step computed
        self.peers: dict[str, str] = {}  # what this host's streamer has been told
        self.broken = ""  # why deltas stopped (the replica misses rows until a re-sync)
        self.syncing: asyncio.Task[None] | None = None
        self.restoring: TransferHandle | None = None
        self.claims: list[dict[int, tuple[int, int]]] = []  # rows a whole-pool sync is writing now
        self.bytes = self.stalls = self.failures = 0
        self.stall_s = 0.0
        client.on_reconnect.append(self._streamer_back)

    def _streamer_back(self) -> None:
        """This host's streamer was restarted: it knows no peers (and the replica pools it kept for others are
        gone). The next epoch tells it again: the controller starts one while a replica stays broken."""
        self.peers.clear()

    # ------------------------------------------------------------------ topology

    async def configure(self, topo: Topology) -> tuple[list[int], dict[int, str]]:
        """A new epoch: learn the peers, allocate the hosted replica pools, take the new target. Returns
        (stages whose hosted pool is fresh, stages whose pool could not be allocated: why)."""
        if self.restoring is not None:  # an older epoch's restore: its pipeline is gone
            await self._cancel(self.restoring, "a new epoch began")
            self.restoring = None
        await tell_peers(self.client, self.streamer, topo.peers, self.peers)
        fresh, failed = [], {}
        for h in topo.hosted:
            a, b = h.layers
            layout = replace(self.layout, first_layer=a, num_layers=b - a)
            try:
                got = await self.client.alloc_pool(h.pool, POOL_REPLICA, layout, exist_ok=True)
            except StreamerError as e:
                failed[h.stage] = str(e)
                log.warning("[replica] cannot host stage %d's replica: %s", h.stage, e)
                continue
            if not got.existed:
                fresh.append(h.stage)
                log.info("[replica] hosting stage %d's replica (%s, %d bytes)", h.stage, h.pool, got.nbytes)
        old, self.target = self.target, topo.replica
        if self.target != old:  # transfers to the old replica (perhaps on a host that is gone) hold nothing up
            self._drop_pending("the replica moved")
            self._stop_sync()  # (its acknowledgement would count for the new replica what only the old one got)
        # deltas go on; the replica misses the rows of a broken spell (or is new): the controller, which saw
        # this in the stats, asks for a whole re-sync once the epoch serves (ReplicaSync)
        self.broken = ""
        return fresh, failed

    def _ref(self) -> PoolRef:
        assert self.target is not None
        return PoolRef(self.target.pool, self.target.streamer)

    # ------------------------------------------------------------------ per-step deltas

    @property
    def active(self) -> bool:
        return self.target is not None and not self.broken

    async def before_step(self, mb: int) -> None:
        """Wait while more than `lag` of this microbatch's steps are not replicated yet (counted). Every transfer
        ends within its deadline (done, failed, or cancelled), so this wait ends too."""
        if self.unacked[mb] <= self.lag:
            return
        t0 = time.monotonic()
        self.stalls += 1
        while self.unacked[mb] > self.lag:
            self.moved.clear()
            await self.moved.wait()
        self.stall_s += time.monotonic() - t0

    def is_prompt(self, step: StepRequest) -> bool:
        return any(c.length > 1 for c in step.chunks)

    @staticmethod
    def rows(step: StepRequest) -> dict[int, tuple[int, int]]:
        """Slot -> the rows [a, b) of the replica this step's transfer writes: the rows it computed, and for a
        chunk that joined (disaggregated: its prompt's KV came from the prompt stages) all of [0, b)."""
        joined = set(step.joined or ())
        return {c.slot: (0 if k in joined else c.start, c.start + c.length) for k, c in enumerate(step.chunks)}

    def _region(self, rows: dict[int, tuple[int, int]]) -> Region:
        slots = sorted(rows)
        return Region(tuple(slots), self.layers, tuple(rows[s] for s in slots))

    # One writer per replica row, in order. Transfers run concurrently (a prompt pass's layered one, a batch of
    # deltas, a whole-pool sync), and a slot changes hands: the rows of a request that ended may still be on the
    # way when the next occupant's rows are sent, and landing last they would overwrite them. So a transfer
    # starts only when no transfer running, and no step still queued, writes any of its rows.

    def _clashes(self, rows: dict[int, tuple[int, int]], queued: bool) -> bool:
        def overlap(other: dict[int, tuple[int, int]]) -> bool:
            return any(s in rows and other[s][0] < rows[s][1] and rows[s][0] < other[s][1] for s in other)
        if any(overlap(p.rows) for p in self.running) or any(overlap(c) for c in self.claims):
            return True
        return queued and any(overlap(self.rows(q)) for q in self.queue)

    async def _clear(self, rows: dict[int, tuple[int, int]], step: bool) -> None:
        """Wait until nothing sent before writes these rows (step: a step waits on it; counted as a stall). Every
        transfer ends within its deadline, so this wait ends too."""
        if not self._clashes(rows, True):
            return
        t0 = time.monotonic()
        while self._clashes(rows, True):
            self.moved.clear()
            await self.moved.wait()
        if step:
            self.stalls += 1
            self.stall_s += time.monotonic() - t0

    def _track(self, steps: list[StepRequest], submit: Callable[[], Awaitable[TransferHandle]],
               delta: bool, rows: dict[int, tuple[int, int]]) -> _Pending:
        p = _Pending(steps, self.target, delta, rows)
        self.running.add(p)
        p.task = asyncio.ensure_future(self._run(p, submit))
        return p

    async def open_layered(self, step: StepRequest) -> tuple[_Pending, LayerSignal] | None:
        """A prompt pass: submit its transfer before it runs; the compute thread signals each layer."""
        if not self.active:
            return None
        rows = self.rows(step)
        await self._clear(rows, True)  # (a slot's earlier occupant's last rows land first)
        if not self.active:
            return None
        region = self._region(rows)
        handle = await self.client.stream(self.pool, region, dst=self._ref(), dst_region=region, layered=True,
                                          tag=f"{step.mb}/{step.step}")
        self.unacked[step.mb] += 1
        p = self._track([step], lambda: _ready(handle), delta=False, rows=rows)
        # through the client's own socket (not the compute thread's): behind the StreamRequest on one connection,
        # so the streamer never sees a layer signalled before the transfer it belongs to
        return p, LayerSignal(self.client, self.memory, [handle.xfer], direct=False)

    def after_step(self, step: StepRequest, layered: _Pending | None, ok: bool) -> None:
        """The step ran (ok: for a pipeline still current, so its KV is what the controller counts)."""
        if ok:
            for c in step.chunks:
                self.written[c.slot] = c.start + c.length
            self.last_step[step.mb] = (step.epoch, step.step)
        if layered is not None:
            layered.valid.set_result(ok)
            return
        if ok and self.active:
            self.queue.append(step)
            self.unacked[step.mb] += 1
            self._kick()

    def _kick(self) -> None:
        """Send what waits, as few transfers as the rows allow: consecutive steps merge while each slot's rows
        stay one contiguous range (microbatches own disjoint slots; a decode step extends the previous one's
        range). Under load a transfer thus carries several steps: fewer, larger copies for the same bytes."""
        while self.queue and sum(p.delta for p in self.running) < MAX_IN_FLIGHT:
            ranges: dict[int, tuple[int, int]] = {}
            taken = 0
            for step in self.queue:
                rows = self.rows(step)
                if any(s in ranges and ranges[s][1] != a for s, (a, _) in rows.items()) or self._clashes(rows, False):
                    break  # (a clash: a layered pass or a sync writes these rows now; its end kicks again)
                for s, (a, b) in rows.items():
                    ranges[s] = (ranges[s][0] if s in ranges else a, b)
                taken += 1
            if not taken:
                return
            steps, self.queue = self.queue[:taken], self.queue[taken:]
            region = self._region(ranges)
            tag = f"{steps[0].mb}/{steps[0].step}+{len(steps) - 1}"
            p = self._track(steps, lambda r=region, t=tag: self.client.stream(
                self.pool, r, dst=self._ref(), dst_region=r, buffered=True, tag=t), delta=True, rows=ranges)
            p.valid.set_result(True)

    async def _run(self, p: _Pending, submit: Callable[[], Awaitable[TransferHandle]]) -> None:
        try:
            p.handle = await submit()
            if not await p.valid:  # a prompt pass whose pipeline went away under it: not the KV counted
                await self._cancel(p.handle, "the step's pipeline is gone")
                return
            done = await p.handle.wait()
            self.bytes += done.nbytes
            await self.send(ReplicaAck([[s.epoch, s.mb, s.step] for s in p.steps], False, done.nbytes))
        except StreamerError as e:
            self._failed(e, p.target)
        finally:
            self._settle(p)

    def _settle(self, p: _Pending) -> None:
        if p in self.running:
            self.running.discard(p)
            for s in p.steps:
                self.unacked[s.mb] -= 1
            self.moved.set()
            if self.active:
                self._kick()

    def _drop_pending(self, why: str) -> None:
        # the queue first: settling a running transfer kicks the queue, which would send the dropped steps (to the
        # new replica, when it moved - maybe before its host allocated the pool: replication broken for an epoch)
        for s in self.queue:
            self.unacked[s.mb] -= 1
        self.queue.clear()
        for p in list(self.running):
            if p.handle is not None and not p.handle.done.done():
                asyncio.ensure_future(self._cancel(p.handle, why))
            if p.task is not None:
                p.task.cancel()
            self._settle(p)
        self.moved.set()

    def _failed(self, e: Exception, target: ReplicaTarget | None) -> None:
        self.failures += 1
        if target != self.target:
            return  # a transfer to a replica given up already
        if not self.broken:
            self.broken = str(e)
            self._drop_pending("replication stopped")
            log.warning("[replica] replication to %s stopped: %s (re-synced at the next epoch)",
                        self.target.host if self.target else "?", e)

    async def _cancel(self, h: TransferHandle, why: str) -> None:
        try:
            await h.cancel(why)
        except StreamerError:
            pass

    # ------------------------------------------------------------------ whole-pool sync

    def start_sync(self, epoch: int) -> None:
        if self.target is None:
            return
        self._stop_sync()
        self.syncing = asyncio.ensure_future(self._sync(self.target, epoch))

    def _stop_sync(self) -> None:
        if self.syncing is not None and not self.syncing.done():
            self.syncing.cancel()
        self.syncing = None

    async def _sync(self, target: ReplicaTarget, epoch: int) -> None:
        marks = [[e, mb, step] for mb, (e, step) in sorted(self.last_step.items())]
        rows = {s: (0, n) for s, n in enumerate(self.written) if n > 0}
        t0 = time.monotonic()
        nbytes = 0
        try:
            if rows:
                await self._clear(rows, False)  # (rows on the way now would land after the sync's, older)
                self.claims.append(rows)
                try:
                    region = self._region(rows)
                    h = await self.client.stream(self.pool, region, dst=PoolRef(target.pool, target.streamer),
                                                 dst_region=region, tag="sync")
                    done = await h.wait()
                finally:
                    self.claims.remove(rows)
                    self.moved.set()
                    if self.active:
                        self._kick()
                nbytes = done.nbytes
                self.bytes += nbytes
            await self.send(ReplicaAck(marks, True, nbytes, epoch))
            log.info("[replica] re-synced %d bytes to %s in %.2fs", nbytes, target.host, time.monotonic() - t0)
        except StreamerError as e:
            self._failed(e, target)

    # ------------------------------------------------------------------ restore

    async def restore(self, msg: Restore) -> Restored:
        """Pull tokens [0, lengths[slot]) of every slot from the replica into this stage's pool."""
        slots = [(s, n) for s, n in enumerate(msg.lengths) if n > 0 and s < self.layout.num_slots]
        if not slots:
            return Restored(msg.epoch, True)
        src = msg.source
        if src.streamer != self.streamer and src.data and self.peers.get(src.streamer) != src.data:
            await self.client.set_peer(src.streamer, src.data)
            self.peers[src.streamer] = src.data
        region = Region(tuple(s for s, _ in slots), self.layers, tuple((0, n) for _, n in slots))
        t0 = time.monotonic()
        try:
            h = await self.client.stream(PoolRef(src.pool, src.streamer), region, dst=self.pool, dst_region=region,
                                         deadline_s=RESTORE_DEADLINE_S, tag="restore")
            self.restoring = h
            done = await h.wait()
        except StreamerError as e:
            log.warning("[replica] restore from %s failed: %s", src.host, e)
            return Restored(msg.epoch, False, time.monotonic() - t0, 0, str(e))
        finally:
            self.restoring = None
        for s, n in slots:
            self.written[s] = n
        seconds = time.monotonic() - t0
        log.info("[replica] restored %d bytes (%d slots) from %s in %.3fs", done.nbytes, len(slots), src.host,
                 seconds)
        return Restored(msg.epoch, True, seconds, done.nbytes)

    async def close(self) -> None:
        for p in self.running:
            if p.task is not None:
                p.task.cancel()
        if self.syncing is not None:
            self.syncing.cancel()


async def _ready(handle: TransferHandle) -> TransferHandle:
    return handle
