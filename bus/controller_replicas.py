"""The controller's side of KV replication (issue 18; bus/replication.py keeps the book): where each stage's replica
lives each epoch, restoring a stage that came back without its KV before the epoch serves, re-syncing a replica
that moved or missed rows, healing one that stays broken, and the replicas' lines of status().

A mixin of the controller process shell (bus/controller_proc.py), which owns the state it reads and writes
(`book`, `targets`, `where`, `fresh`, `host_failed`, `restoring`, `syncing`, `streamers`, the stage registry) and
the sockets; kept apart so each file says one thing.
"""

from __future__ import annotations

import logging

from bus.messages import ReplicaInfo, ReplicaSync, ReplicaTarget, Restore
from bus.replication import Where, replica_holders
from bus.sockets import send

log = logging.getLogger(__name__)
REPLICA_HEAL_S = 5.0  # a replica broken this long while serving (a streamer restarted, a transfer failed): new epoch


class ReplicaOrchestration:
    """Methods of ControllerProcess (its attributes are the shell's)."""

    def _replica_status(self) -> list[ReplicaInfo]:
        if self.book is None:
            return []
        out, running = [], list(self.core.sched.running())
        for x in self._replicated():
            e, t = self.reg.stages.get(x), self.targets.get(x)
            st = e.stats if e is not None else None
            if e is None or t is None:
                out.append(ReplicaInfo(x, "", "starting", False))
                continue
            error = self.host_failed.get(x, "") or (st.replica_error if st else "")
            state = "broken" if error else "syncing" if x in self.syncing else "streaming"
            lag_steps, lag_tokens = self.book.lag(x, running)
            out.append(ReplicaInfo(x, t.host, state, t.host != e.host, lag_steps, lag_tokens,
                                   st.replica_bytes if st else 0, st.replica_stalls if st else 0,
                                   st.replica_stall_s if st else 0.0, st.replica_failures if st else 0, error))
        return out

    def _replicated(self) -> range:
        """The stages that have replicas: all, or a disaggregated deployment's token stages (a prompt stage's KV
        lives for one pass)."""
        return range(self.cfg.prompt_stages, self.cfg.num_stages)

    def _place_replicas(self) -> dict[int, list[ReplicaTarget]]:
        """This epoch's replica of every stage: on the streamer of the next host around the ring (a stage whose
        host's streamer is not known yet goes without one this epoch). Returns what each stage hosts."""
        self.targets = {}
        if self.book is None:
            return {}
        n = self.cfg.num_stages
        hosts = [self.reg.stages[i].host for i in range(n)]
        hosted: dict[int, list[ReplicaTarget]] = {}
        for x, j in enumerate(replica_holders(hosts)):
            if x not in self._replicated():
                continue
            s = self.streamers.get(hosts[j])
            if s is None:
                log.warning("[replica] no streamer known on host %s: stage %d has no replica this epoch", hosts[j], x)
                continue
            t = ReplicaTarget(x, f"replica-stage-{x}", s[0], s[1], hosts[j], list(self.reg.stages[x].layers))
            self.targets[x] = t
            hosted.setdefault(j, []).append(t)
        return hosted

    def _replica_alive(self, w: Where) -> bool:
        """The replica counted for a stage is still where it was filled (that host up, the same streamer process:
        a restarted streamer has lost its pools)."""
        s = self.streamers.get(w.host)
        dead = any(h.host_id == w.host and h.state == "dead" for h in self.reg.hosts)
        return s is not None and s[2] == w.pid and not dead

    async def _acked(self, now: float) -> None:
        """Every stage acknowledged the epoch. A stage that came back without its KV restores it from its replica
        first (pulling what this controller counts as replicated), when that replica is still there; then serve."""
        self.restoring, self.restore_lengths = {}, {}
        if self.book is not None and self.ever_ready:
            running = list(self.core.sched.running())
            for x, e in self.reg.stages.items():
                w = self.where.get(x)
                t = self.targets.get(x)
                if e.kv_intact or w is None or not self._replica_alive(w):
                    continue
                if self.swap_kept.get(x):
                    continue  # its swap pool is as current as the replica, or more: it swaps back in from there
                if x in self.fresh and t is not None and (t.host, t.pool) == (w.host, w.pool):
                    continue  # allocated anew where it was: what it held is gone
                lengths = [0] * self.core.sched.num_slots
                for req in running:
                    if req.slot is not None:
                        lengths[req.slot] = min(req.cached, self.book.valid(x, req))
                if not any(lengths):
                    continue
                s = self.streamers[w.host]
                src = ReplicaTarget(x, w.pool, w.streamer, s[1], w.host, list(e.layers))
                self.restoring[x], self.restore_lengths[x] = None, lengths
                await send(self.internal, self.codec, Restore(self.epoch, src, lengths), route=[f"stage-{x}".encode()])
            if self.restoring:
                self.restore_deadline = now + self.cfg.restore_timeout
                log.info("[recovery] epoch %d: stage(s) %s restore their KV from their replicas", self.epoch,
                         sorted(self.restoring))
                return
        await self._serving(now)

    async def _heal_replicas(self, now: float) -> None:
        """A replica that stays broken while the pipeline serves (a streamer restarted and lost its pools and
        peers, a transfer failed), or a stage left without one (its replica's streamer was down when the epoch
        began), is set up again by a new epoch: the stages tell their streamers the peers again, the hosting
        stages allocate the pools again (fresh: counted from nothing), and the stages re-sync."""
        broken = sorted(x for x, e in self.reg.stages.items() if self.cfg.pipeline(x) != "prompt" and (
            x in self.host_failed or x not in self.targets or (e.stats is not None and e.stats.replica_error)))
        if self.book is None or not broken or not self.core.ready or self.pending_acks or self.restoring:
            self.broken_since = None
            return
        if self.broken_since is None:
            self.broken_since = now
        elif now - self.broken_since > REPLICA_HEAL_S:
            log.warning("[replica] stage(s) %s have not replicated for %.0fs (%s): a new epoch sets their replicas up "
                        "again", broken, now - self.broken_since, self.host_failed.get(broken[0]) or
                        self.reg.stages[broken[0]].stats.replica_error)  # type: ignore[union-attr]
            self.broken_since = None
            self.core.pipeline_down()
            await self._relink()

    async def _renew_replicas(self) -> None:
        """A replica in a new place (its host changed, or its pool is new) counts nothing yet: the stage copies its
        whole KV there in the background (ReplicaSync), per-step deltas going on meanwhile. So does a replica that
        missed rows (its stage's replication was broken) or whose last sync did not finish: what it was
        acknowledged still counts, the sync fills the rest."""
        if self.book is None:
            return
        for x in self._replicated():
            t = self.targets.get(x)
            if t is None or x in self.host_failed:
                if x in self.host_failed:
                    log.warning("[replica] stage %d has no replica: %s", x, self.host_failed[x])
                self.book.reset(x)
                self.where.pop(x, None)
                continue
            s = self.streamers.get(t.host)
            w = Where(t.host, t.streamer, s[2] if s else 0, t.pool)
            st = self.reg.stages[x].stats
            moved = self.where.get(x) != w or x in self.fresh
            if moved or x in self.syncing or (st is not None and st.replica_error):
                if moved:
                    self.book.reset(x)
                    self.where[x] = w
                self.syncing.add(x)
                self.sync_epochs[x] = self.epoch
                await send(self.internal, self.codec, ReplicaSync(self.epoch), route=[f"stage-{x}".encode()])
                log.info("[replica] stage %d %s %s (%s)", x, "replicates to" if moved else "re-syncs its replica on",
                         t.host, "the same host: it does not survive that host's loss"
                         if t.host == self.reg.stages[x].host else "another host")
