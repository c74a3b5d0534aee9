"""A prompt stage's side of disaggregation (the paper's section 4, issue 19): each prompt pass's KV goes, layer by
layer as the pass writes it, into the token stages' pools - straight into the receive slots the controller
reserved for the pass's requests (StepRequest.kv_to). All of it through the host's streamer (streamer/api.py);
the library picks the transport by where the pools are (shared memory or CUDA IPC on one host, TCP or NCCL
across hosts).

The two pipelines may split the layers differently: the pass's region (its prompt slots, this stage's layers)
becomes one transfer with one route per token stage whose layers overlap this stage's (wire.Route), each route
landing in that stage's pool at the receive slots. It is submitted *before* the pass runs, `layered`; the
compute thread signals each layer as soon as it is written (KV hooks), so the copy overlaps the rest of the
pass and the last layer's copy is mostly done when the pass ends.

Every pass this stage ran is reported to the controller (KvSent): landed, or not (failed, cancelled, or the
pass itself failed), so the controller knows when no transfer can still write a receive slot. A new epoch
cancels the transfers of the old one before the stage acknowledges it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bus.messages import KvMove, KvSent, Msg, ReplicaTarget, StepRequest, Topology
from stages.peers import tell_peers
from streamer.client import LayerSignal, StreamerClient, TransferHandle
from streamer.errors import StreamerError
from streamer.layout import PoolLayout, Region
from streamer.regions import region_to_spec
from streamer.wire import PoolRef, Route

log = logging.getLogger(__name__)


def routes_for(step: StepRequest, layers: tuple[int, int], dests: list[ReplicaTarget]) -> tuple[Region, list[Route]]:
    """The region in this stage's pool of the pass's (or move's) chunks that have a receive slot (prompt slots x
    its layers x each chunk's tokens), and one route per token stage that owns some of those layers, into the
    receive slots (same tokens). No routes when no chunk has one (every request parked)."""
    assert step.kv_to is not None
    go = [(c, slot) for c, slot in zip(step.chunks, step.kv_to) if slot >= 0]
    tokens = tuple((c.start, c.start + c.length) for c, _ in go)
    region = Region(tuple(c.slot for c, _ in go), layers, tokens)
    routes = []
    for t in dests if go else ():
        a, b = max(layers[0], t.layers[0]), min(layers[1], t.layers[1])
        if a < b:
            dst = Region(tuple(slot for _, slot in go), (a, b), tokens)
            routes.append(Route([a, b], PoolRef(t.pool, t.streamer), region_to_spec(dst)))
    return region, routes


@dataclass(frozen=True)
class Pushing:
    """A pass's (or move's) transfer into the token stages' pools."""

    main: TransferHandle


class KvPusher:
    def __init__(self, client: StreamerClient, pool: str, memory: Any, layout: PoolLayout, streamer: str,
                 send: Callable[[Msg], Awaitable[None]]) -> None:
        self.client, self.pool, self.memory, self.streamer, self.send = client, pool, memory, streamer, send
        self.layers = (layout.first_layer, layout.first_layer + layout.num_layers)
        self.dests: list[ReplicaTarget] = []
        self.peers: dict[str, str] = {}
        self.running: dict[asyncio.Task[None], Pushing | None] = {}
        self.bytes = self.failures = 0
        client.on_reconnect.append(self.peers.clear)  # a restarted streamer knows no peers: the next epoch says

    async def configure(self, topo: Topology) -> None:
        """A new epoch: the old epoch's transfers end first (cancelled: nobody counts their KV any more), then the
        token stages' pools and their streamers are learnt."""
        for task, pushing in list(self.running.items()):
            if pushing is not None:
                await self._cancel(pushing, "a new epoch began")
            task.cancel()
        if self.running:
            await asyncio.wait(list(self.running), timeout=5.0)
        await tell_peers(self.client, self.streamer, topo.peers, self.peers)
        self.dests = list(topo.kv_dest)

    async def open(self, step: StepRequest, layered: bool = True) -> tuple[Pushing | None, LayerSignal | None, str]:
        """Submit the pass's transfers before it runs: (their handles, the layer signal for the compute thread, "")
        or (None, None, why it cannot go: "" when there is nothing to send, every request parked). layered=False:
        a move of KV written before (KvMove)."""
        if not self.dests:
            return None, None, "this prompt stage was given no token stages to stream to"
        region, routes = routes_for(step, self.layers, self.dests)
        if not routes:
            return None, None, ""
        tag = f"prompt {step.mb}/{step.step}"
        try:
            h = await self.client.stream(self.pool, region, routes, layered=layered, tag=tag)
        except StreamerError as e:
            return None, None, str(e)
        # through the client's own socket, behind the StreamRequest: the streamer never sees a layer signalled
        # before the transfer it belongs to
        return Pushing(h), LayerSignal(self.client, self.memory, [h.xfer], direct=False), ""

    async def move(self, msg: KvMove) -> None:
        """Parked prompts' KV (written by passes that ran before) into the receive slots now reserved for them."""
        step = StepRequest(msg.epoch, -1, msg.move, msg.chunks, [], [], kv_to=msg.kv_to)
        pushing, _, why = await self.open(step, layered=False)
        self.after(step, pushing, pushing is not None, why)

    def after(self, step: StepRequest, pushing: Pushing | None, ran: bool, why: str = "") -> None:
        """The pass ran (`ran`: its KV is written) or did not: report the transfers' outcome once they are over."""
        task = asyncio.ensure_future(self._report(step, pushing, ran, why))
        self.running[task] = pushing
        task.add_done_callback(lambda t: self.running.pop(t, None))

    async def _report(self, step: StepRequest, pushing: Pushing | None, ran: bool, why: str) -> None:
        ok, nbytes = False, 0
        try:
            if pushing is None:
                pass
            elif not ran:
                why = why or "the prompt pass did not run"
                await self._cancel(pushing, why)
            else:
                done = await pushing.main.wait()
                ok, nbytes = True, done.nbytes
                self.bytes += nbytes
        except StreamerError as e:
            why = str(e)
        except asyncio.CancelledError:
            why = "a new epoch began"
        if not ok:
            self.failures += 1
            what = f"move {step.step}" if step.mb < 0 else f"pass {step.mb}/{step.step}"
            log.warning("[prompt] %s: KV not streamed to the token stages: %s", what, why or "no transfer")
        try:
            await self.send(KvSent(step.epoch, step.mb, step.step, ok, nbytes, why))
        except Exception as e:  # the controller socket is closing (shutdown): nothing waits for this report
            log.debug("[prompt] KvSent not sent: %s", e)

    async def _cancel(self, pushing: Pushing, why: str) -> None:
        try:
            await pushing.main.cancel(why)
            await pushing.main.wait(timeout=5.0)
        except StreamerError:
            pass

    async def close(self) -> None:
        for task in list(self.running):
            task.cancel()
