"""The sending half of the streamer <-> streamer data plane: one DEALER per peer streamer, and the futures its
answers resolve. Runs on the streamer's event loop.

A peer is reached at its data ROUTER; our DEALER's identity is our streamer name, so the peer answers us on the
same connection. Answers are matched by what they answer (open rseq, chunk, pull id, NCCL link id), never by
position. Every wait for an answer has the `peer_timeout_s` deadline: a dead or wedged peer turns into a
PeerDeadError naming the peer, never a hang. Sockets use ZMQ_IMMEDIATE, so nothing queues up for a peer that
is not connected (a send then waits, under the same deadline).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import zmq
import zmq.asyncio

from bus.codec import Codec
from bus.errors import ProtocolError
from bus.messages import Msg
from bus.security import Keyring
from bus.sockets import Receiver, Sender, decode_frames, make_socket
from streamer import wire
from streamer.errors import BadRequestError, PeerDeadError, error_for

log = logging.getLogger(__name__)


def frame_tensor(frame: Any) -> torch.Tensor:
    """Zero-copy uint8 view of a received frame (read-only memory: only ever read)."""
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if len(buf) == 0:
        return torch.zeros(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we never write it
        return torch.frombuffer(buf, dtype=torch.uint8)


def tensor_frame(t: torch.Tensor) -> memoryview:
    """Zero-copy frame of a CPU tensor's bytes (ZeroMQ holds the view, and so the tensor, until sent)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


CHECK_S = 0.05  # how often the deadlines of answers waited for are checked (PeerLink.answer)


class PeerLink:
    def __init__(self, ctx: zmq.asyncio.Context, me: str, name: str, address: str, codec: Codec, timeout: float,
                 max_message: int, keys: Keyring | None = None) -> None:
        self.name, self.address, self.timeout = name, address, timeout
        self._codec = codec
        self.sock = make_socket(ctx, zmq.DEALER, identity=me.encode(), max_message=max_message, keys=keys,
                                server=name)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.connect(address)
        self._out = Sender(self.sock)
        self._rseq = itertools.count(1)
        self._waiting: dict[tuple[Any, ...], asyncio.Future[Msg]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._deadlines: dict[asyncio.Future[Msg], tuple[float, str, float]] = {}  # answer(): end, what, timeout
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"peer-{self.name}")

    def next_rseq(self) -> int:
        return next(self._rseq)

    async def _read(self) -> None:
        inbox = Receiver(self.sock)
        while not self.closed:
            try:
                frames = await inbox.recv()
                _, got = decode_frames(self._codec, frames)
            except ProtocolError as e:
                log.warning("[stream] undecodable answer from peer %s: %s", self.name, e)
                continue
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            key = _answer_key(got.body)
            fut = self._waiting.pop(key, None) if key is not None else None
            if fut is not None and not fut.done():
                fut.set_result(got.body)
            else:
                log.debug("[stream] unmatched answer from %s: %s", self.name, type(got.body).__name__)

    def expect(self, key: tuple[Any, ...]) -> asyncio.Future[Msg]:
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        return fut

    def forget(self, key: tuple[Any, ...]) -> None:
        fut = self._waiting.pop(key, None)
        if fut is not None and not fut.done():
            fut.cancel()

    def post(self, body: Msg, buffers: Sequence[Any] = ()) -> asyncio.Future[Any] | None:
        """Send now when ZeroMQ has room (None), else queue behind the sends already waiting and return the
        queued send's future, cancelled if it has not left within peer_timeout_s. Never waits: what is posted
        leaves in the order it was posted."""
        if self.closed:
            raise PeerDeadError(f"link to peer streamer {self.name} is closed")
        frames = [self._codec.encode(body), *buffers]
        if self._out.send_now(frames):
            return None
        fut = self._out.queue(frames)
        timer = asyncio.get_running_loop().call_later(self.timeout, fut.cancel)
        fut.add_done_callback(lambda _: timer.cancel())
        return fut

    async def send(self, body: Msg, buffers: Sequence[Any] = ()) -> None:
        if self.closed:
            raise PeerDeadError(f"link to peer streamer {self.name} is closed")
        frames = [self._codec.encode(body), *buffers]
        if self._out.send_now(frames):
            return
        try:
            await asyncio.wait_for(self._out.queue(frames), self.timeout)  # queued now: order kept
        except TimeoutError:
            raise PeerDeadError(f"could not send to peer streamer {self.name} at {self.address} within "
                                f"{self.timeout:.1f}s (setting: peer_timeout_s)") from None

    async def answer(self, fut: asyncio.Future[Msg], what: str, timeout: float | None = None) -> Msg:
        """The answer `fut` (from `expect`) within `timeout` (peer_timeout_s) from now, else PeerDeadError. The
        deadlines of all waits are checked by one timer every CHECK_S (a wait fails at most that late): a timer
        per wait (asyncio.wait_for) is measurable when every chunk of a transfer waits for its ack."""
        if fut.done():
            return fut.result()
        t = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        self._deadlines[fut] = (loop.time() + t, what, t)
        if self._timer is None:
            self._timer = loop.call_later(CHECK_S, self._check)
        try:
            return await fut
        finally:
            self._deadlines.pop(fut, None)

    def _check(self) -> None:
        now = asyncio.get_running_loop().time()
        for fut, (end, what, t) in list(self._deadlines.items()):
            if end <= now:
                del self._deadlines[fut]
                if not fut.done():
                    fut.set_exception(PeerDeadError(f"peer streamer {self.name} did not answer {what} within "
                                                    f"{t:.1f}s (setting: peer_timeout_s)"))
        self._timer = asyncio.get_running_loop().call_later(CHECK_S, self._check) if self._deadlines else None

    async def request(self, body: Msg, key: tuple[Any, ...], what: str, buffers: Sequence[Any] = (),
                      timeout: float | None = None) -> Msg:
        fut = self.expect(key)
        try:
            await self.send(body, buffers)
            return await self.answer(fut, what, timeout)
        finally:
            self.forget(key)

    def fail_all(self, reason: str) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(PeerDeadError(reason))
        self._waiting.clear()

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.fail_all(f"link to peer streamer {self.name} closed")
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(0)


def _answer_key(body: Msg) -> tuple[Any, ...] | None:
    if isinstance(body, wire.RemoteOpened):
        return ("open", body.rseq)
    if isinstance(body, wire.RemoteChunkAck):
        return ("chunk", body.rseq, body.chunk)
    if isinstance(body, wire.PullFailed):
        return ("pull", body.pull)
    if isinstance(body, wire.NcclAccepted):
        return ("nccl", body.link)
    return None


def raise_if_refused(body: Msg, what: str) -> None:
    """Turn a negative answer (ok=False with a code) into its typed error."""
    ok = getattr(body, "ok", True)
    if not ok:
        code, message = getattr(body, "code", wire.XFER_INTERNAL), getattr(body, "message", "")
        raise error_for(code, f"{what}: {message}")


class PeerNet:
    """All our links to peer streamers, created on first use from the known addresses."""

    def __init__(self, ctx: zmq.asyncio.Context, me: str, codec: Codec, timeout: float, max_message: int,
                 addresses: dict[str, str], keys: Keyring | None = None) -> None:
        self._ctx, self.me, self._codec, self._timeout, self._max = ctx, me, codec, timeout, max_message
        self._keys = keys  # with keys: a peer is reached as the process of its name (CURVE), no one else
        self.addresses = dict(addresses)
        self.links: dict[str, PeerLink] = {}

    def set_address(self, name: str, address: str) -> None:
        old = self.addresses.get(name)
        self.addresses[name] = address
        if old is not None and old != address and name in self.links:
            self.links.pop(name).close()  # the peer moved (restarted elsewhere): reconnect on next use

    def link(self, name: str) -> PeerLink:
        got = self.links.get(name)
        if got is not None and not got.closed:
            return got
        address = self.addresses.get(name)
        if address is None:
            raise BadRequestError(f"unknown peer streamer {name!r}; known: {sorted(self.addresses)} (send PeerInfo)")
        link = PeerLink(self._ctx, self.me, name, address, self._codec, self._timeout, self._max, self._keys)
        link.start()
        self.links[name] = link
        return link

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
