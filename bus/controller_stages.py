"""The controller's stage side: the internal socket's receive loop, the stage registry, epochs and topology, and
serving again once every stage has acknowledged an epoch (resuming from the KV the stages kept, or replaying
from replicas or swap pools, or recomputing).

Runs in the controller process: a mixin of its shell (bus/controller_proc.py), which owns the internal socket and
the state (the registry `reg`, `epoch`, `pending_acks`, `asked`, the replication and swap books, the core); kept
apart so each file says one thing. A bad frame is logged (rate-limited per peer) and dropped; a failing
handler is logged; neither stops the loop.

Stage registry: a stage is known by index; its Hello carries its incarnation (in the envelope), its
activation address and whether its KV pool is its predecessor's (kv_intact). Messages from an older
incarnation than the registered one are dropped; a stage this controller does not know (it was restarted) is
asked to say Hello again (Rehello). Whenever the set of live stages is complete and some stage is new, the
controller starts a new epoch: it sends every stage a Topology and, once all have acknowledged it (within
`topology_timeout`, which the shell's timer enforces), serves again - going on from the cached positions when
every stage kept its KV, else recomputing. Epoch numbers start at incarnation << 20, so a restarted controller
never reuses one. (When a stage is reported down, bus/controller_supervisor.py tells the survivors at once.)
"""

from __future__ import annotations

import logging
import time

from bus.codec import Received
from bus.controller_config import StageEntry
from bus.errors import ProtocolError
from bus.logs import Throttled, peer_of
from bus.messages import (
    ERR_STEP_VOID,
    DeploymentReady,
    Hello,
    KvSent,
    RecoveryInfo,
    Rehello,
    ReplicaAck,
    ReplicaTarget,
    Restored,
    StageStats,
    StepFailed,
    StepResult,
    SwapAck,
    SwapFailed,
    Topology,
    TopologyAck,
    Welcome,
)
from bus.sockets import decode_frames, recv_frames, send

log = logging.getLogger(__name__)
noisy = Throttled(log)  # warnings about what stages send: rate-limited per (kind, peer)


class StageSide:
    """Methods of ControllerProcess (its attributes are the shell's)."""

    async def _internal_loop(self) -> None:
        while True:
            frames = await recv_frames(self.internal)
            try:
                route, msg = decode_frames(self.codec, frames, route_frames=1)
            except ProtocolError as e:
                noisy.warning("bad-frame", peer_of(frames), "[stage] dropped a bad frame from %s: %s",
                              peer_of(frames), e)
                continue
            try:
                await self._on_internal(route[0], msg)
            except Exception:
                log.exception("[stage] handling %s from %s failed", type(msg.body).__name__, msg.env.sender)
            await self._flush()

    def _stage_index(self, msg: Received) -> int | None:
        sender = msg.env.sender
        if not sender.startswith("stage-"):
            return None
        try:
            return int(sender[6:])
        except ValueError:
            return None

    async def _on_internal(self, ident: bytes, msg: Received) -> None:
        body, now = msg.body, time.monotonic()
        index = self._stage_index(msg)
        if index is None or not 0 <= index < self.cfg.num_stages:
            noisy.warning("unknown-sender", ident, "[stage] message from unknown sender %r", msg.env.sender)
            return
        entry = self.reg.stages.get(index)
        if isinstance(body, Hello):
            await self._on_stage_hello(ident, msg, body, index, entry)
            return
        if entry is None:  # this controller was restarted since the stage said Hello: ask it again (once: its
            if index not in self.asked:  # heartbeats queued while no controller listened arrive in a burst)
                self.asked.add(index)
                log.info("[stage] %s unknown to controller incarnation %d: asking for its Hello", msg.env.sender,
                         self.cfg.incarnation)
                await send(self.internal, self.codec, Rehello(self.cfg.incarnation), route=[ident])
            return
        if msg.env.incarnation != entry.incarnation:
            return  # a stale incarnation's frame
        if isinstance(body, TopologyAck):
            if body.epoch == self.epoch and index in self.pending_acks:
                self.pending_acks.discard(index)
                self.fresh.update(body.fresh)
                self.host_failed.update(body.failed)
                if not self.pending_acks:
                    await self._acked(now)
        elif isinstance(body, StepResult):
            self.core.on_result(body, now)
        elif isinstance(body, ReplicaAck):
            if self.book is not None and not (body.sync and body.sync_epoch != self.sync_epochs.get(index)):
                # (a sync answering an older ReplicaSync filled a replica since replaced: it counts for nothing)
                self.book.ack(index, body.steps, body.sync)
                if body.sync:
                    self.syncing.discard(index)
        elif isinstance(body, Restored):
            if body.epoch == self.epoch and self.restoring.get(index, 0) is None:
                self.restoring[index] = body
                if all(r is not None for r in self.restoring.values()):
                    await self._serving(now)
        elif isinstance(body, StageStats):
            entry.stats = body
        elif isinstance(body, SwapAck):
            if self.swap_book is not None:
                if body.fresh:
                    self.swap_book.reset(index)
                self.swap_book.ack(index, body.steps, False)
        elif isinstance(body, SwapFailed):
            if body.epoch == self.core.sched.epoch:
                self.core.recompute_microbatch(body.mb, body.step, now)
        elif isinstance(body, KvSent):
            if 0 <= index < self.cfg.prompt_stages:
                self.core.on_kv_sent(index, body, now)
        elif isinstance(body, StepFailed):
            if body.epoch == self.core.sched.epoch and body.code == ERR_STEP_VOID:
                self.core.void_step(body.mb, body.step, now)
            elif body.epoch == self.core.sched.epoch:
                if self.disagg is not None and self.disagg.is_prompt(body.mb):
                    self.disagg.prompt_failed(body.mb, body.step, index)
                self.core.fail_microbatch(body.mb, body.step, body.code, f"stage {index}: {body.message}")
                self.core.schedule(now)

    async def _on_stage_hello(self, ident: bytes, msg: Received, body: Hello, index: int,
                              entry: StageEntry | None) -> None:
        """A stage (re)started, or said Hello again: registered (its KV counted as kept or not), welcomed, and a new
        epoch formed once every stage is up."""
        if entry is not None and msg.env.incarnation < entry.incarnation:
            return
        if entry is not None and msg.env.incarnation == entry.incarnation and \
                body.addresses.get("data", "") == entry.data:  # said twice (Rehello raced a heartbeat)
            await send(self.internal, self.codec, Welcome(self.epoch), route=[ident], reply_to=msg.env.msg_id)
            return
        self.asked.discard(index)
        # A pool taken over is what this controller counts only if the predecessor's was: an incarnation that
        # started fresh and died before serving left a pool without the KV of the requests in flight.
        intact = body.kv_intact and (entry is None or entry.kv_intact)
        self.reg.stages[index] = StageEntry(msg.env.incarnation, body.pid, body.host, body.addresses.get("data", ""),
                                            kv_intact=intact, layers=list(body.layers),
                                            returned=self.ever_ready, receive_pool=body.receive_pool)
        log.info("[stage] stage %d incarnation %d up (pid %d)", index, msg.env.incarnation, body.pid)
        self.swap_kept[index] = body.swap_kept
        if self.swap_book is not None and not body.swap_kept:
            self.swap_book.reset(index)  # a new swap pool: what the old one held counts for nothing
        await send(self.internal, self.codec, Welcome(self.epoch), route=[ident], reply_to=msg.env.msg_id)
        self.core.pipeline_down()
        await self._relink()

    async def _relink(self) -> None:
        """If every stage is up, start a new epoch: send each its downstream address."""
        if len(self.reg.stages) < self.cfg.num_stages or any(e.state in ("restarting", "failed") for e in self.reg.stages.values()):
            return
        kv_dest = self._kv_destinations()
        if kv_dest is None:
            return
        self.epoch += 1
        self.pending_acks = set(range(self.cfg.num_stages))
        self.linking_since = time.monotonic()
        self.fresh, self.host_failed, self.restoring = set(), {}, {}
        hosted = self._place_replicas()
        peers = {name: data for name, data, _ in self.streamers.values()}
        for i in range(self.cfg.num_stages):
            down = "" if self.cfg.last_of_pipeline(i) else self.reg.stages[i + 1].data
            prompt = self.cfg.pipeline(i) == "prompt"
            topo = Topology(self.epoch, down, self.targets.get(i), hosted.get(i, []), peers,
                            kv_dest if prompt else [])
            await send(self.internal, self.codec, topo, route=[f"stage-{i}".encode()])
        log.info("[topology] epoch %d sent to %d stages", self.epoch, self.cfg.num_stages)

    def _kv_destinations(self) -> list[ReplicaTarget] | None:
        """Disaggregated: every token stage's pool (a swapping one's receive pool, by logical slot), where the prompt
        stages stream their KV - None while a token stage's host has no streamer known (its Hello relinks).
        Colocated: nothing."""
        if self.disagg is None:
            return []
        out = []
        for x in range(self.cfg.prompt_stages, self.cfg.num_stages):
            e = self.reg.stages[x]
            s = self.streamers.get(e.host)
            if s is None:
                log.info("[topology] waiting for the streamer of %s (token stage %d's KV pool is with it)", e.host, x)
                return None
            out.append(ReplicaTarget(x, e.receive_pool or f"kv-stage-{x}", s[0], s[1], e.host, list(e.layers)))
        return out

    async def _serving(self, now: float) -> None:
        # Every stage kept its KV (survivors, and restarted CPU stages that took their pool over): requests go
        # on where they were. A stage that restored from its replica holds each request's replicated prefix:
        # every request goes back to what all stages hold, and the committed tokens after it are fed again.
        # Otherwise they are recomputed from prompt + committed tokens.
        # (a prompt stage's KV lives for one pass: prompts in flight run again whatever it kept)
        keep = all(e.kv_intact for x, e in self.reg.stages.items() if self.cfg.pipeline(x) != "prompt")
        restored = {x: r for x, r in self.restoring.items() if r is not None and r.ok}
        lost = [x for x, e in self.reg.stages.items() if not e.kv_intact and self.cfg.pipeline(x) != "prompt"]

        swap = self.swap_book

        def valid(req):  # type: ignore[no-untyped-def]
            n = req.cached
            for x in lost:
                n = min(n, self.restore_lengths[x][req.slot] if x in restored and req.slot is not None else
                        swap.valid(x, req) if swap is not None and self.swap_kept.get(x) else 0)
            return n

        running = list(self.core.sched.running())
        before = {id(r): r.cached for r in running}
        self.core.pipeline_up(self.epoch, now, keep_cache=keep,
                              valid=valid if (self.book is not None or swap is not None) and not keep else None)
        replayed = sum(before[id(r)] - r.cached for r in running)
        if self.ever_ready:
            for x, e in sorted(self.reg.stages.items()):
                if not e.returned:
                    continue
                r = restored.get(x)
                source = "kept" if e.kv_intact else "replica" if r is not None else \
                    "swap" if swap is not None and self.swap_kept.get(x) else "recompute"
                down = self.down_at.pop(x, now)
                wall = time.time()
                rec = RecoveryInfo(x, e.host, source, now - down, replayed, sum(before.values()),
                                   r.seconds if r else 0.0, r.nbytes if r else 0, self.epoch, wall - (now - down),
                                   max(0.0, e.hello_at - down), wall)
                self.recoveries.append(rec)
                log.info("[recovery] stage %d back on %s from %s in %.2fs: %d cached token(s) replayed (a recompute: "
                         "%d)%s", x, e.host, source, rec.seconds, replayed, rec.tokens_recompute,
                         f"; restore {r.nbytes} bytes in {r.seconds:.3f}s" if r else "")
        for e in self.reg.stages.values():
            e.state = "serving"
            e.kv_intact = True  # from now on its pool is what this controller counts
            e.returned = False
        self.restoring = {}
        await self._renew_replicas()
        log.info("[topology] epoch %d: serving (%s)", self.epoch,
                 "resuming from the KV the stages kept" if keep and self.ever_ready else
                 f"{replayed} cached token(s) replayed" if restored else
                 "every request in flight is recomputed" if self.ever_ready else "first epoch")
        if not self.ever_ready:
            self.ever_ready = True
            await self.tokenizer
            await send(self.sup.sock, self.codec, DeploymentReady(self.epoch))
