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
from typing import Any

from bus.messages import KvSent, Msg, ReplicaTarget, StepRequest, Topology
from stages.peers import tell_peers
from streamer.client import LayerSignal, StreamerClient, TransferHandle
from streamer.errors import StreamerError
from streamer.layout import PoolLayout, Region
from streamer.regions import region_to_spec
from streamer.wire import PoolRef, Route

log = logging.getLogger(__name__)


def routes_for(step: StepRequest, layers: tuple[int, int], dests: list[ReplicaTarget]) -> tuple[Region, list[Route]]:
    """The pass's region in this stage's pool (prompt slots x its layers x each chunk's tokens) and one route per
    token stage that owns some of those layers, into the receive slots (same tokens)."""
    assert step.kv_to is not None
    tokens = tuple((c.start, c.start + c.length) for c in step.chunks)
    region = Region(tuple(c.slot for c in step.chunks), layers, tokens)
    routes = []
    for t in dests:
        a, b = max(layers[0], t.layers[0]), min(layers[1], t.layers[1])
        if a < b:
            dst = Region(tuple(step.kv_to), (a, b), tokens)
            routes.append(Route([a, b], PoolRef(t.pool, t.streamer), region_to_spec(dst)))
    return region, routes


class KvPusher:
    def __init__(self, client: StreamerClient, pool: str, memory: Any, layout: PoolLayout, streamer: str,
                 send: Callable[[Msg], Awaitable[None]]) -> None:
        self.client, self.pool, self.memory, self.streamer, self.send = client, pool, memory, streamer, send
        self.layers = (layout.first_layer, layout.first_layer + layout.num_layers)
        self.dests: list[ReplicaTarget] = []
        self.peers: dict[str, str] = {}
        self.running: dict[asyncio.Task[None], TransferHandle | None] = {}
        self.bytes = self.failures = 0
        client.on_reconnect.append(self.peers.clear)  # a restarted streamer knows no peers: the next epoch says

    async def configure(self, topo: Topology) -> None:
        """A new epoch: the old epoch's transfers end first (cancelled: nobody counts their KV any more), then the
        token stages' pools and their streamers are learnt."""
        for task, handle in list(self.running.items()):
            if handle is not None:
                await self._cancel(handle, "a new epoch began")
            task.cancel()
        if self.running:
            await asyncio.wait(list(self.running), timeout=5.0)
        await tell_peers(self.client, self.streamer, topo.peers, self.peers)
        self.dests = list(topo.kv_dest)

    async def open(self, step: StepRequest) -> tuple[TransferHandle | None, LayerSignal | None, str]:
        """Submit the pass's transfer before it runs: (its handle, the layer signal for the compute thread, "") or
        (None, None, why it cannot go)."""
        if not self.dests:
            return None, None, "this prompt stage was given no token stages to stream to"
        region, routes = routes_for(step, self.layers, self.dests)
        try:
            h = await self.client.stream(self.pool, region, routes, layered=True, tag=f"prompt {step.mb}/{step.step}")
        except StreamerError as e:
            return None, None, str(e)
        # through the client's own socket, behind the StreamRequest: the streamer never sees a layer signalled
        # before the transfer it belongs to
        return h, LayerSignal(self.client, self.memory, [h.xfer], direct=False), ""

    def after(self, step: StepRequest, handle: TransferHandle | None, ran: bool, why: str = "") -> None:
        """The pass ran (`ran`: its KV is written) or did not: report the transfer's outcome once it is over."""
        task = asyncio.ensure_future(self._report(step, handle, ran, why))
        self.running[task] = handle
        task.add_done_callback(lambda t: self.running.pop(t, None))

    async def _report(self, step: StepRequest, handle: TransferHandle | None, ran: bool, why: str) -> None:
        ok, nbytes = False, 0
        try:
            if handle is None:
                pass
            elif not ran:
                await self._cancel(handle, why or "the prompt pass did not run")
                why = why or "the prompt pass did not run"
            else:
                done = await handle.wait()
                ok, nbytes = True, done.nbytes
                self.bytes += nbytes
        except StreamerError as e:
            why = str(e)
        except asyncio.CancelledError:
            why = "a new epoch began"
        if not ok:
            self.failures += 1
            log.warning("[prompt] pass %d/%d: KV not streamed to the token stages: %s", step.mb, step.step, why)
        try:
            await self.send(KvSent(step.epoch, step.mb, step.step, ok, nbytes, why))
        except Exception as e:  # the controller socket is closing (shutdown): nothing waits for this report
            log.debug("[prompt] KvSent not sent: %s", e)

    async def _cancel(self, h: TransferHandle, why: str) -> None:
        try:
            await h.cancel(why)
            await h.wait(timeout=5.0)
        except StreamerError:
            pass

    async def close(self) -> None:
        for task in list(self.running):
            task.cancel()
