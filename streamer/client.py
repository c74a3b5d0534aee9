"""`StreamerClient`: how a stage (or the controller, the supervisor, a benchmark) talks to its host's streamer.
Async, for the caller's one event loop; the API contract is documented in streamer/api.py.

Every call has a deadline. The client watches its connection: if the streamer process dies, every pending
call and transfer fails at once with StreamerDownError (the streamer's death is reported, never hidden).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from bus.codec import Codec
from bus.errors import ProtocolError
from bus.messages import ALL_MESSAGES, Envelope, ErrorReply, Msg
from bus.security import Keyring
from bus.sockets import Receiver, Sender, decode_frames, make_socket
from streamer import wire
from streamer.errors import StreamerDownError, StreamerError, error_for
from streamer.layout import PoolLayout, Region
from streamer.regions import layout_to_spec, region_to_spec

log = logging.getLogger(__name__)


@dataclass
class TransferHandle:
    """One submitted transfer. `await wait()` -> TransferDone, or raises its typed error."""

    client: StreamerClient
    xfer: int
    tag: str
    deadline_s: float
    done: asyncio.Future[wire.TransferDone] = field(repr=False)
    progress: asyncio.Queue[wire.TransferProgress] = field(default_factory=asyncio.Queue, repr=False)
    msg_id: int = 0  # of its StreamRequest (an outright refusal answers that)
    received_at: float = 0.0  # time.monotonic() when its TransferDone / TransferFailed arrived

    async def wait(self, timeout: float | None = None) -> wire.TransferDone:
        t = self.deadline_s + self.client.request_timeout_s if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(self.done), t)
        except TimeoutError:
            raise StreamerDownError(f"streamer reported nothing about transfer {self.xfer} within {t:.1f}s "
                                    f"(its deadline + request_timeout_s)") from None

    async def next_progress(self, timeout: float) -> wire.TransferProgress:
        """The next per-layer progress report (requires progress=True), within `timeout` seconds."""
        get = asyncio.ensure_future(self.progress.get())
        finished, _ = await asyncio.wait({get, self.done}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in finished:
            return get.result()
        get.cancel()
        if self.done.done():
            self.done.result()  # raises the transfer's error
            raise StreamerError(f"transfer {self.xfer} finished without more progress")
        raise StreamerDownError(f"no progress on transfer {self.xfer} within {timeout:.1f}s")

    async def cancel(self, reason: str = "") -> None:
        await self.client.cancel(self.xfer, reason)


class StreamerClient:
    def __init__(self, address: str, name: str, incarnation: int = 0, request_timeout_s: float = 5.0,
                 transfer_timeout_s: float = 60.0, ctx: zmq.asyncio.Context | None = None,
                 keys: Keyring | None = None, server: str = "") -> None:
        """keys / server: this process's deployment keys and the streamer's process name (bus/security.py: a
        CURVE client); without keys, plaintext. With keys, `name` must be this process's name."""
        self.address, self.name, self.request_timeout_s = address, name, request_timeout_s
        self._keys, self._server = keys, server
        self.transfer_timeout_s = transfer_timeout_s  # sent with every transfer that names no deadline
        self._own_ctx = ctx is None
        self._ctx = ctx if ctx is not None else zmq.asyncio.Context()
        self._codec = Codec(name, incarnation, types=ALL_MESSAGES)
        self._sock = make_socket(self._ctx, zmq.DEALER, identity=name.encode(), keys=keys, server=server)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        self._sock.connect(address)
        self._out = Sender(self._sock)  # every send on _sock goes through it (order)
        self._xfers = itertools.count(1)
        self._requests: dict[int, asyncio.Future[Msg]] = {}  # msg id -> answer
        self._transfers: dict[int, TransferHandle] = {}
        self._by_msg: dict[int, int] = {}  # StreamRequest msg id -> xfer
        self.deliveries: asyncio.Queue[wire.Delivered] = asyncio.Queue()
        self.down: str | None = None
        self.on_reconnect: list[Callable[[], None]] = []  # called when a streamer is back after a disconnect
        self._incarnation = incarnation
        self._signal_local = threading.local()  # each compute thread's own LayerReady socket (layer_ready_direct)
        self._signal_socks: list[_SignalSocket] = []
        self._signal_lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._tasks = [self._loop.create_task(self._read()), self._loop.create_task(self._watch())]

    # ------------------------------------------------------------------ plumbing

    def _encode(self, body: Msg) -> tuple[bytes, int]:
        """The frame and its msg id, so the answer's slot exists *before* the request is sent."""
        if self.down is not None:
            raise StreamerDownError(f"streamer at {self.address} is down: {self.down}")
        data = self._codec.encode(body)
        return data, msgspec.msgpack.decode(data, type=Envelope).msg_id

    async def _send(self, body: Msg) -> int:
        data, msg_id = self._encode(body)
        await self._out.send([data])
        return msg_id

    async def request(self, body: Msg, timeout: float | None = None) -> Msg:
        fut: asyncio.Future[Msg] = self._loop.create_future()
        data, msg_id = self._encode(body)
        self._requests[msg_id] = fut
        await self._out.send([data])
        t = self.request_timeout_s if timeout is None else timeout
        try:
            answer = await asyncio.wait_for(fut, t)
        except TimeoutError:
            raise StreamerDownError(f"streamer at {self.address} did not answer {type(body).__name__} within "
                                    f"{t:.1f}s (request_timeout_s)") from None
        finally:
            self._requests.pop(msg_id, None)
        if isinstance(answer, ErrorReply):
            raise error_for(answer.code, answer.message)
        return answer

    async def _read(self) -> None:
        inbox = Receiver(self._sock)
        while True:
            try:
                frames = await inbox.recv()
                _, got = decode_frames(self._codec, frames)
            except ProtocolError as e:
                log.warning("[stream] undecodable answer from the streamer: %s", e)
                continue
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            self._dispatch(got.env.reply_to, got.body)

    def _dispatch(self, reply_to: int, body: Msg) -> None:
        if isinstance(body, (wire.TransferDone, wire.TransferFailed, wire.TransferProgress)):
            h = self._transfers.get(body.xfer)
            if h is None:
                return
            if isinstance(body, wire.TransferProgress):
                h.progress.put_nowait(body)
                return
            self._transfers.pop(body.xfer, None)
            self._by_msg.pop(h.msg_id, None)
            h.received_at = time.monotonic()
            if not h.done.done():
                if isinstance(body, wire.TransferDone):
                    h.done.set_result(body)
                else:
                    h.done.set_exception(error_for(body.code, body.message))
            return
        if isinstance(body, wire.Delivered):
            self.deliveries.put_nowait(body)
            return
        if isinstance(body, ErrorReply) and reply_to in self._by_msg:  # a StreamRequest refused outright
            h = self._transfers.pop(self._by_msg.pop(reply_to), None)
            if h is not None and not h.done.done():
                h.done.set_exception(error_for(body.code, body.message))
            return
        fut = self._requests.get(reply_to)
        if fut is not None and not fut.done():
            fut.set_result(body)

    async def _watch(self) -> None:
        """Connection events: a disconnect means the streamer process is gone (or restarting)."""
        while True:
            try:
                event = parse_monitor_message(await self._monitor.recv_multipart())
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                back = self.down is not None
                self.down = None
                if back:  # a restarted streamer knows nothing of us: let the owner say again what it needs
                    for fn in list(self.on_reconnect):
                        fn()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._fail_all(f"connection to {self.address} lost")

    def _fail_all(self, reason: str) -> None:
        self.down = reason
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(StreamerDownError(f"streamer down: {reason}"))
        for h in self._transfers.values():
            if not h.done.done():
                h.done.set_exception(StreamerDownError(f"streamer down during transfer {h.xfer}: {reason}"))
        self._transfers.clear()

    async def close(self) -> None:
        """Call once no thread sends on this client any more (a compute thread's signal socket is closed here)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with self._signal_lock:
            self._closed = True
            for sig in self._signal_socks:
                sig.close()
            self._signal_socks.clear()
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)
        if self._own_ctx:
            self._ctx.destroy(0)

    # ------------------------------------------------------------------ pools

    async def status(self, timeout: float | None = None) -> wire.StreamerStatus:
        got = await self.request(wire.StreamerStatusQuery(), timeout)
        assert isinstance(got, wire.StreamerStatus)
        return got

    async def register_pool(self, name: str, memory: Any, replace: bool = False) -> int:
        """Share a stage pool: `memory` is a SharedPoolMemory (CPU) or a GpuPoolMemory (CUDA)."""
        import os

        if hasattr(memory, "registration"):
            msg = memory.registration(name, replace)
            msg = msgspec.structs.replace(msg, pid=os.getpid())
        else:
            msg = wire.RegisterPool(name, layout_to_spec(memory.layout), wire.MEM_SHM, path=str(memory.path),
                                    replace=replace, pid=os.getpid())
        got = await self.request(msg)
        assert isinstance(got, wire.PoolRegistered)
        return got.nbytes

    async def unregister_pool(self, name: str) -> None:
        await self.request(wire.UnregisterPool(name))

    async def alloc_pool(self, name: str, kind: int, layout: PoolLayout, exist_ok: bool = False) -> wire.PoolAllocated:
        got = await self.request(wire.AllocPool(name, kind, layout_to_spec(layout), exist_ok))
        assert isinstance(got, wire.PoolAllocated)
        return got

    async def free_pool(self, name: str) -> None:
        await self.request(wire.FreePool(name))

    async def pool_info(self, name: str) -> wire.PoolInfo:
        got = await self.request(wire.PoolQuery(name))
        assert isinstance(got, wire.PoolInfo)
        return got

    async def set_peer(self, name: str, data_address: str) -> None:
        await self.request(wire.PeerInfo(name, data_address))

    async def owner_down(self, owner: str, reason: str = "") -> None:
        await self.request(wire.OwnerDown(owner, reason))

    # ------------------------------------------------------------------ transfers

    async def stream(self, src: str | wire.PoolRef, region: Region, routes: Sequence[wire.Route] = (), *,
                     dst: str | wire.PoolRef | None = None, dst_region: Region | None = None, layered: bool = False,
                     checksum: bool | None = None, buffered: bool | None = None, deadline_s: float = 0.0,
                     tag: str = "", notify: Sequence[str] = (), progress: bool = False,
                     timeline: bool = False) -> TransferHandle:
        """Submit a transfer; returns once it is sent (does not wait for the copy). Either give `routes`, or a
        single destination `dst` + `dst_region` for all of the region's layers. `timeline`: TransferDone then
        carries when each layer was signalled, cleared to move, issued and landed (wire.LayerTimes)."""
        src_ref = wire.PoolRef(src) if isinstance(src, str) else src
        if not routes:
            if dst is None or dst_region is None:
                raise ValueError("give routes, or dst and dst_region")
            dst_ref = wire.PoolRef(dst) if isinstance(dst, str) else dst
            routes = [wire.Route(list(region.layers), dst_ref, region_to_spec(dst_region))]
        xfer = next(self._xfers)
        deadline_s = deadline_s or self.transfer_timeout_s  # both sides then agree on when it fails
        h = TransferHandle(self, xfer, tag, deadline_s, self._loop.create_future())
        h.done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if never awaited
        self._transfers[xfer] = h
        req = wire.StreamRequest(xfer, src_ref, region_to_spec(region), list(routes), layered, checksum, buffered,
                                 deadline_s, tag, list(notify), progress, timeline)
        data, msg_id = self._encode(req)
        h.msg_id = msg_id
        self._by_msg[msg_id] = xfer
        try:
            await self._out.send([data])
        except BaseException:
            self._transfers.pop(xfer, None)
            self._by_msg.pop(msg_id, None)
            raise
        return h

    async def layer_ready(self, xfers: Sequence[int], layer: int) -> None:
        """Global layer `layer` is computed (GPU: record the pool's event for it first, see LayerSignal)."""
        await self._send(wire.LayerReady(list(xfers), layer))

    def layer_ready_threadsafe(self, xfers: Sequence[int], layer: int) -> None:
        """Same, callable from the stage's compute thread (the send happens on the client's loop)."""
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.layer_ready(xfers, layer)))

    def layer_ready_direct(self, xfers: Sequence[int], layer: int) -> None:
        """Same, sent at once from the calling thread (the stage's compute thread) on a socket that thread owns,
        with no hop through the event loop: a hop wakes the loop thread, which then competes for the interpreter
        lock with the thread launching the next layer's kernels. Never blocks; raises StreamerDownError if the
        streamer is down or has stopped reading (its queue for this socket is full)."""
        if self.down is not None:
            raise StreamerDownError(f"streamer at {self.address} is down: {self.down}")
        sig = getattr(self._signal_local, "sig", None)
        if sig is None:
            with self._signal_lock:
                if self._closed:
                    raise StreamerDownError(f"client of the streamer at {self.address} is closed")
                sig = _SignalSocket(self, len(self._signal_socks) + 1)
                self._signal_socks.append(sig)
            self._signal_local.sig = sig
        sig.send(wire.LayerReady(list(xfers), layer))

    async def cancel(self, xfer: int, reason: str = "") -> None:
        await self.request(wire.CancelTransfer(xfer, reason))


class _SignalSocket:
    """A synchronous DEALER socket used by one thread only, for LayerReady (StreamerClient.layer_ready_direct).
    Its own codec: msg ids only have to be unique per sender socket, and nothing answers a LayerReady."""

    def __init__(self, client: StreamerClient, number: int) -> None:
        # a synchronous socket (the project's socket factory) on the client's ZeroMQ context; sends queue until
        # the connection is up
        self._sock = make_socket(zmq.Context.shadow(client._ctx.underlying), zmq.DEALER, connect=client.address,
                                 identity=f"{client.name}{wire.SIGNAL_SEP}{number}".encode(), keys=client._keys,
                                 server=client._server)
        self._codec = Codec(client.name, client._incarnation, types=ALL_MESSAGES)
        self.address = client.address

    def send(self, msg: Msg) -> None:
        try:
            self._sock.send(self._codec.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            raise StreamerDownError(f"streamer at {self.address} does not take LayerReady signals "
                                    "(its queue is full)") from None
        except zmq.ZMQError as e:
            raise StreamerDownError(f"LayerReady to the streamer at {self.address} failed: {e}") from None

    def close(self) -> None:
        self._sock.close(0)


class LayerSignal:
    """Per-layer "ready" for the compute thread: records the GPU pool's event for the layer (if any) on the
    current stream, then tells the streamer. Call it right after local layer j's kernels are launched.
    `direct`: send from the compute thread itself (layer_ready_direct) instead of through the client's loop."""

    def __init__(self, client: StreamerClient, memory: Any, xfers: Sequence[int], direct: bool = False) -> None:
        self.client, self.memory, self.xfers = client, memory, list(xfers)
        self._send = client.layer_ready_direct if direct else client.layer_ready_threadsafe

    def __call__(self, local_layer: int) -> None:
        if hasattr(self.memory, "record"):
            self.memory.record(local_layer)
        self._send(self.xfers, self.memory.layout.first_layer + local_layer)


class _KvHook:
    def __init__(self, shard: Any, fn: Any) -> None:
        self.shard, self.fn = shard, fn
        shard.kv_hooks.append(fn)

    def remove(self) -> None:
        if self.fn in self.shard.kv_hooks:
            self.shard.kv_hooks.remove(self.fn)


def attach_kv_hooks(shard: Any, fn: Any) -> list[Any]:
    """Call fn(local_layer) as soon as each block of a DecoderShard (`runtime.shard`) has written its KV of the
    step - before that block's attention and MLP run, so the layer's copy overlaps the rest of the layer and
    the next ones, and the last layer's copy is mostly done when the pass ends. Returns handles (call .remove()
    on each to detach). This is how a prompt pass streams its KV layer by layer."""
    return [_KvHook(shard, fn)]


def attach_layer_hooks(shard: torch.nn.Module, fn: Any) -> list[Any]:
    """Call fn(local_layer) after each block of a DecoderShard (`runtime.shard`) has run, as a whole: later than
    attach_kv_hooks (the A/B in the streamer bench); returns hook handles (.remove() detaches)."""
    return [block.register_forward_hook(lambda *_, j=j: fn(j)) for j, block in enumerate(shard.blocks)]
