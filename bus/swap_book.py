"""The controller's record of what each stage's swap pool holds (microbatch swapping, stages/swap.py). Pure.

A swapping stage writes each step's rows back to a swap pool of its host's streamer, which outlives the stage, and
acknowledges every committed write-back (SwapAck: epoch, microbatch, step). This is the replica book
(bus/replication.py) over other acknowledgements: per request and stage, the longest prefix [0, n) all of whose
rows landed. A stage restarted on the same streamer finds its swap pool (Hello.swap_kept) and the controller
replays only the positions after that prefix; a swap pool allocated anew (another host, a restarted streamer)
starts a new generation, counting nothing.

A request's held positions live in `req.replicated` like its replicas', under the key -1 - stage (replicas use
the stage index), so one request carries both without another field.
"""

from __future__ import annotations

from bus.replication import Held, ReplicaBook
from bus.requests import Request


class SwapBook(ReplicaBook):
    def _held(self, stage: int, req: Request) -> Held:
        key = -1 - stage
        h = req.replicated.get(key)
        if h is None or h.gen != self.gen[stage]:
            h = req.replicated[key] = Held(self.gen[stage])
        return h

    def valid(self, stage: int, req: Request) -> int:
        """Positions [0, n) of `req` committed in stage `stage`'s swap pool."""
        h = req.replicated.get(-1 - stage)
        return h.prefix if h is not None and h.gen == self.gen[stage] else 0
