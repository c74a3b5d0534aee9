"""The one socket factory of the project, and deadline-bounded send/receive helpers.

Every socket gets: LINGER 0 (closing never blocks shutdown), a maximum inbound message size (an oversized
message makes ZeroMQ drop that peer's connection — other peers are unaffected), bounded queues, and
loopback binding unless the caller names another interface. Sockets are asyncio sockets (zmq.asyncio); use
them only from the process's one event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from bus.codec import Codec, Received
from bus.errors import DeadlineError
from bus.messages import Msg
from bus.security import ZAP_DOMAIN, Keyring, as_client, as_server, peer_of_frame

DEFAULT_MAX_MESSAGE = 1 << 30  # activation frames can be large; control frames are checked by the codec
DEFAULT_HWM = 10_000


def context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context()


def make_socket(
    ctx: zmq.asyncio.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    identity: bytes | None = None,
    max_message: int = DEFAULT_MAX_MESSAGE,
    hwm: int = DEFAULT_HWM,
    keys: Keyring | None = None,
    server: str = "",
    domain: str = ZAP_DOMAIN,
) -> zmq.asyncio.Socket:
    """A configured socket, bound or connected. `bind` may end in ':0' / ':*' for an ephemeral port.

    keys: this process's deployment keys (bus/security.py): a bound socket becomes a CURVE server that admits the
    deployment's members only (the process runs the authenticator), a connecting one a CURVE client of process
    `server`. None: plaintext (standalone tools, tests of one piece). domain: the ZAP domain a bound socket
    admits (security.CLIENT_DOMAIN: the controller's client socket)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer with the same identity takes over
    if keys is not None:
        if server:
            as_client(sock, keys, server)
        else:
            as_server(sock, keys, domain)
    try:
        if bind is not None:
            if bind.endswith(":0"):
                bind = bind[:-2] + ":*"
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
    except zmq.ZMQError:
        sock.close(0)
        raise
    return sock


def bound_address(sock: zmq.asyncio.Socket) -> str:
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


async def recv_frames(sock: zmq.asyncio.Socket) -> list[Any]:
    """The next multipart message (zero-copy frames). zmq.asyncio can find a message announced and then gone:
    its connection closed in between (a peer relinking, a restart), and recv raises EAGAIN; wait for the next."""
    while True:
        try:
            return await sock.recv_multipart(copy=False)
        except zmq.Again:
            continue


async def recv_within(
    sock: zmq.asyncio.Socket, timeout: float, what: str, setting: str
) -> list[Any]:
    """Receive one multipart message within `timeout` seconds or raise DeadlineError naming `setting`."""
    try:
        return await asyncio.wait_for(recv_frames(sock), timeout)
    except TimeoutError:
        raise DeadlineError(f"no {what} within {timeout:.1f}s (setting: {setting})") from None


async def send(sock: zmq.asyncio.Socket, codec: Codec, body: Msg, *, reply_to: int = 0,
               route: Sequence[bytes] = (), buffers: Sequence[Any] = ()) -> None:
    """Send envelope + raw buffers; `route` = ROUTER identity frames to prepend."""
    frames: list[Any] = [*route, codec.encode(body, reply_to), *buffers]
    await sock.send_multipart(frames, copy=False)


def _rescan(sock: zmq.asyncio.Socket) -> None:
    """After an operation on the raw socket: have zmq.asyncio look at the socket's events again, as it does after
    its own operations. ZeroMQ's notification descriptor is edge-triggered and any send or receive may consume
    its edge, so a receive waiting in zmq.asyncio would otherwise sleep through a message that a raw send let in
    (or a send waiting for room through a raw receive). Cheap: nothing unless zmq.asyncio waits on something."""
    sock._schedule_remaining_events()  # pyzmq's own hook for exactly this (zmq/_future.py)


_RAW_OK = hasattr(zmq.asyncio.Socket, "_schedule_remaining_events")  # else: every operation through zmq.asyncio


class Receiver:
    """The receive side of a socket read by one loop: a message already queued is taken with a non-blocking
    call on the raw socket; only when none is queued does it wait through zmq.asyncio. A queued message costs
    ~5 us this way against ~25 us through zmq.asyncio's futures and event registration (CPU box; the
    streamer's loops receive several messages per transfer). Only this reader receives on the socket, so
    zmq.asyncio has no receive pending whenever the raw call runs; a send it may have pending is woken by
    `_rescan`."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self._sock = sock
        self._raw = zmq.Socket.shadow(sock.underlying)  # the same ZeroMQ socket; never closed through this

    async def recv(self) -> list[Any]:
        if _RAW_OK:
            try:
                frames = self._raw.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            else:
                _rescan(self._sock)
                return frames
        return await recv_frames(self._sock)


class Sender:
    """The send side of a socket written by one loop: a message goes out with one non-blocking call on the raw
    socket when ZeroMQ can queue it now - the usual case - and only otherwise (its send queue full, or with
    ZMQ_IMMEDIATE no peer connected yet) through zmq.asyncio, which waits for room. Order is kept: while any
    send waits there, later ones queue behind it. zmq.asyncio makes the same non-blocking attempt first, but
    builds a future and its bookkeeping per message; the streamer's loops send several messages per transfer
    (the receive side: Receiver). All sends on the socket must go through this object."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self._sock = sock
        self._raw = zmq.Socket.shadow(sock.underlying)  # the same ZeroMQ socket; never closed through this
        self._waiting = 0

    def send_now(self, frames: Sequence[Any]) -> bool:
        """Queue `frames` with ZeroMQ now if it has room and no earlier send waits; False: use `send`. ZeroMQ
        queues a multipart message whole or not at all."""
        if self._waiting or not _RAW_OK:
            return False
        try:
            self._raw.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        _rescan(self._sock)
        return True

    def queue(self, frames: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue `frames` behind the sends already waiting, now (in call order), through zmq.asyncio; the future
        settles when ZeroMQ took the message (cancel it to give up)."""
        self._waiting += 1
        fut = self._sock.send_multipart(frames, copy=False)
        fut.add_done_callback(self._sent)
        return fut

    def _sent(self, _: Any) -> None:
        self._waiting -= 1

    async def send(self, frames: Sequence[Any]) -> None:
        if not self.send_now(frames):
            await self.queue(frames)


def decode_frames(codec: Codec, frames: Sequence[Any], route_frames: int = 0,
                  sender_is_peer: bool = True) -> tuple[list[bytes], Received]:
    """Split off `route_frames` identity frames and decode the rest. Raises ProtocolError, also for a message
    whose envelope names another sender than the authenticated peer - unless `sender_is_peer` is False: the
    client socket, where a client names itself as it likes and the User-Id ("client", "admin") only says which
    key it holds (security.peer_of_frame reads it)."""
    from bus.errors import ProtocolError

    if len(frames) <= route_frames:
        raise ProtocolError(f"message of {len(frames)} frame(s) lacks an envelope")
    route = [bytes(f.bytes if hasattr(f, "bytes") else f) for f in frames[:route_frames]]
    head = frames[route_frames]
    data = head.buffer if hasattr(head, "buffer") else head
    got = codec.decode(data, frames[route_frames + 1 :])
    peer = peer_of_frame(head)  # set on CURVE server sockets: the authenticated process
    if sender_is_peer and peer is not None and got.env.sender != peer:
        raise ProtocolError(f"a message naming sender {got.env.sender!r} came from {peer!r}: refused", got.env.msg_id)
    return route, got
