"""The controller's record of what each stage's KV replica holds (issue 18). Pure: no sockets, no clocks.

Stages acknowledge replication by step (ReplicaAck: microbatch, step). The book keeps, for the last
`keep_steps` steps of each microbatch, which request fed which positions [start, end) - so an acknowledged step
tells, per member, which rows landed. A request's *replicated prefix* at stage x is the longest [0, n) all of
whose rows were acknowledged (deltas may land out of order: an interval that does not touch the prefix waits in
`gaps` until the ones before it land). A whole-pool re-sync acknowledges [0, end) at once.

Replicated rows stay valid while a request runs: they are the KV of its committed tokens (prompt + tokens
already sent to the client), which never change - a rollback rewinds what the stages *count*, not what the
tokens are. A replica that is replaced (its host lost, its pool allocated anew) starts a new generation for that
stage: everything recorded before counts for nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from bus.messages import StepRequest
from bus.requests import Request

MAX_GAPS = 64  # intervals a request may hold beyond its prefix at one stage (acks far out of order: dropped)


@dataclass
class Held:
    """One request's replicated positions at one stage."""

    gen: int
    prefix: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)

    def add(self, start: int, end: int) -> None:
        """Rows [start, end) landed. Intervals that touch are one (consecutive deltas while the prefix waits for
        a re-sync: one interval, not one per step - more than MAX_GAPS of those lost the newest, and the prefix
        then stopped for good at the hole)."""
        self.gaps.append((start, end))
        self.gaps.sort()
        keep: list[tuple[int, int]] = []
        for s, e in self.gaps:
            if s <= self.prefix:
                self.prefix = max(self.prefix, e)
            elif keep and s <= keep[-1][1]:
                keep[-1] = (keep[-1][0], max(keep[-1][1], e))
            else:
                keep.append((s, e))
        self.gaps = keep[:MAX_GAPS]


class ReplicaBook:
    def __init__(self, num_stages: int, keep_steps: int = 256) -> None:
        self.num_stages, self.keep_steps = num_stages, keep_steps
        self.gen = [0] * num_stages
        # mb -> step -> (its epoch, members' (request, start, end)); epochs are unique across controller restarts,
        # step numbers are not: an acknowledgement names both
        self.history: dict[int, OrderedDict[int, tuple[int, list[tuple[Request, int, int]]]]] = {}
        self.acked: list[dict[int, int]] = [{} for _ in range(num_stages)]  # stage -> mb -> latest step acked
        self.completed: dict[int, int] = {}  # mb -> latest step whose result came back

    def record(self, step: StepRequest, members: Iterable[tuple[Request, int, bool]]) -> None:
        """A step sent: which request feeds which positions (members in chunk order, as the scheduler built it)."""
        h = self.history.setdefault(step.mb, OrderedDict())
        joined = set(step.joined or ())  # (rows [0, end) go to the replica: the prompt's too)
        h[step.step] = (step.epoch, [(req, 0 if k in joined else c.start, c.start + c.length)
                                     for k, ((req, _, _), c) in enumerate(zip(members, step.chunks))])
        while len(h) > self.keep_steps:
            h.popitem(last=False)

    def complete(self, mb: int, step: int) -> None:
        self.completed[mb] = max(self.completed.get(mb, -1), step)

    def ack(self, stage: int, steps: Iterable[list[int]], sync: bool) -> None:
        if not 0 <= stage < self.num_stages:
            return
        for triple in steps:
            if len(triple) != 3:
                continue
            epoch, mb, step = triple
            got = self.history.get(mb, {}).get(step)
            if got is None or got[0] != epoch:  # older than the history, or another controller's: only makes the
                continue  # prefix shorter
            self.acked[stage][mb] = max(self.acked[stage].get(mb, -1), step)
            for req, start, end in got[1]:
                if not req.done:
                    self._held(stage, req).add(0 if sync else start, end)

    def _held(self, stage: int, req: Request) -> Held:
        h = req.replicated.get(stage)
        if h is None or h.gen != self.gen[stage]:
            h = req.replicated[stage] = Held(self.gen[stage])
        return h

    def valid(self, stage: int, req: Request) -> int:
        """Positions [0, n) of `req` committed in stage `stage`'s replica."""
        h = req.replicated.get(stage)
        return h.prefix if h is not None and h.gen == self.gen[stage] else 0

    def reset(self, stage: int) -> None:
        """Stage `stage`'s replica is new and empty."""
        self.gen[stage] += 1
        self.acked[stage] = {}

    def lag(self, stage: int, running: Iterable[Request]) -> tuple[int, int]:
        """(the most steps of any microbatch with members completed but not acknowledged, positions cached but not
        replicated over the running requests)."""
        steps, tokens, mbs = 0, 0, set()
        for req in running:
            tokens += max(0, req.cached - self.valid(stage, req))
            if req.mb is not None:
                mbs.add(req.mb)
        for mb in mbs:
            done = self.completed.get(mb)
            if done is None:
                continue
            acked = self.acked[stage].get(mb)
            if acked is None:
                h = self.history.get(mb)
                acked = next(iter(h)) - 1 if h else done
            steps = max(steps, done - acked)
        return steps, tokens


def replica_holders(hosts: list[str]) -> list[int]:
    """For each stage, the stage whose host keeps its replica: the next stage around the ring on another host
    (a ring of hosts, not of stages: with several stages per host, the replica still leaves the host). One host:
    the next stage (itself, with one stage): the replica then lives on the same streamer and dies with the host."""
    n = len(hosts)
    out = []
    for x in range(n):
        nxt = [(x + k) % n for k in range(1, n + 1)]
        out.append(next((j for j in nxt if hosts[j] != hosts[x]), nxt[0]))
    return out


@dataclass(frozen=True)
class Where:
    """Where a stage's replica was filled: its host, streamer (and that streamer process's pid: a restarted
    streamer has lost its pools) and pool."""

    host: str
    streamer: str
    pid: int
    pool: str
