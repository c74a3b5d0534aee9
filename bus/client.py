"""The async client of a DéjàVu deployment: one DEALER socket to the controller's client ROUTER.

Runs in the user's process, on the caller's event loop (any asyncio loop; our scripts use uvloop). Four
background tasks: a receiver that dispatches the controller's messages — by request id (TokenChunk,
RequestDone, RequestFailed) or by envelope reply_to (StatusReply, ErrorReply) — to per-request queues; a
sender that writes every outgoing frame in order (so posting a message never awaits and works from
cancellation paths); a keep-alive that speaks while requests are in flight (the controller cancels the
requests of a silent client); a monitor of the connection. One request's side (argument checks, its token
stream, its result) is bus/stream.py.

When the connection to the controller breaks (a socket monitor sees it) the client waits for it to come back
(`reconnect_timeout`) - a supervisor restarts a dead controller at the same address - and then *resumes*
every request in flight: it sends the request again with the output tokens it already holds
(`resume_token_ids`), and the controller continues the output from there. Nothing is repeated to the caller,
changed or lost; chunks that a resumed request receives twice must repeat what it holds exactly and are
dropped. The socket has a fixed identity (so a controller that stayed up recognises the resume) and queues
messages only on a live connection.

When the deployment stops - a process failed past its restart budget, or it was stopped - the controller fails
every request in flight with the reason (RequestFailed: ServerError naming the process and the setting) and
then tells each client it knows (ServerStopping): the client fails whatever else it awaits with that reason at
once, refuses new requests (ServerError) until a controller answers at the address again, and confirms
(ServerStoppingAck) - the controller keeps the connection open until then, boundedly, since this socket drops
messages it has received but not yet read when the connection closes (ZMQ_IMMEDIATE). When the controller
itself is the process that failed for good, the supervisor stands in for it at the address for a moment
(recovery/proc.py): a client that reconnects to resume its requests is told the same way. Only a client that
does not come back within that moment - or finds nobody there - learns it when `reconnect_timeout` passes.

Keys: against a deployment started with `--keys DIR`, the client connects as a CurveZMQ client with DIR's
`client` (or `admin`) key and the deployment's `server` public key (bus/security.py). ZeroMQ reports a refused
handshake only to the socket monitor, and retries it forever: before the first connection, the monitor turns it
into AuthenticationError for everything awaited and every later call - at once for a key the deployment does not
admit or plaintext on one side only, after a few failures in a row where the deployment only drops the
connection (a server key other than its own: it cannot even read the handshake). bus/handshake.py judges.

It must never: wait without a deadline (requests: `timeout`; status and the connect probe: `connect_timeout`;
closing: `close_timeout`; a broken connection: `reconnect_timeout`), send a request twice except as a resume,
or accept a chunk that leaves a gap or contradicts tokens already received (ServerError instead of silently
wrong tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from bus.codec import Codec
from bus.errors import (
    AuthenticationError,
    BadRequestError,
    CancelledError,
    DejaVuError,
    ProtocolError,
    RequestTimeoutError,
    ServerError,
)
from bus.handshake import FAILED as HANDSHAKE_FAILED
from bus.handshake import Handshakes
from bus.logs import Throttled
from bus.messages import (
    CLIENT,
    ERR_SERVER,
    CancelRequest,
    Envelope,
    ErrorReply,
    GenerateRequest,
    KeepAlive,
    Msg,
    RequestDone,
    RequestFailed,
    ServerStopping,
    ServerStoppingAck,
    StatusQuery,
    StatusReply,
    TokenChunk,
)
from bus.security import CLIENT as CLIENT_KEY
from bus.security import SERVER, Keyring
from bus.security import load as load_keys
from bus.sockets import decode_frames, make_socket, recv_frames
from bus.stream import (
    GenerateResult,
    PendingRequest,
    TokenEvent,
    TokenStream,
    build_request,
    error_for,
    status_dict,
)

__all__ = ["AsyncClient", "GenerateResult", "TokenEvent", "TokenStream", "build_request", "error_for"]

log = logging.getLogger(__name__)
noisy = Throttled(log)  # warnings about what peers send: rate-limited per (kind, peer)


class AsyncClient:
    """`async with AsyncClient("tcp://127.0.0.1:5555") as c: r = await c.generate(prompt_token_ids=[1, 2])`.

    timeout: default deadline of a whole request, send to its last message (per call: `timeout=`).
    keepalive_interval: KeepAlive period while requests are in flight (keep it well under the server's
    client timeout, 10 s by default). connect_timeout: deadline for a StatusReply — the probe on entering
    (when `probe`) and `status()`. close_timeout: how long closing waits for the server to acknowledge the
    cancellation of requests still in flight. keys: the directory of the deployment's `dejavu-keys` files that
    this client holds (`<key_name>.key_secret` and `public.json`); key_name "admin" also sees pids, addresses and
    the model path in status(). A directory that lacks them raises KeysError (a ValueError) here.
    """

    def __init__(self, address: str, *, timeout: float = 600.0, keepalive_interval: float = 1.0,
                 connect_timeout: float = 10.0, close_timeout: float = 2.0, reconnect_timeout: float = 60.0,
                 probe: bool = True, keys: str | Path | None = None, key_name: str = CLIENT_KEY) -> None:
        if "://" not in address:
            raise ValueError(f"address must look like tcp://host:port, got {address!r}")
        for name, v in (("timeout", timeout), ("keepalive_interval", keepalive_interval),
                        ("connect_timeout", connect_timeout), ("close_timeout", close_timeout),
                        ("reconnect_timeout", reconnect_timeout)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {v!r}")
        self.address, self.timeout, self.keepalive_interval = address, timeout, keepalive_interval
        self.connect_timeout, self.close_timeout, self.probe = connect_timeout, close_timeout, probe
        self.reconnect_timeout = reconnect_timeout
        self._keys: Keyring | None = None
        if keys is not None:
            self._keys = load_keys(keys, key_name)
            self._keys.server_key(SERVER)  # the deployment's public key must be there too
        self._handshakes = Handshakes(address, "no keys" if keys is None else f"the {key_name!r} key of {keys}",
                                      keys is not None)
        self._denied = ""  # why the deployment refused this client's handshake ("" = it did not)
        self._lost_at: float | None = None  # when the connection broke (None: up, or never was)
        self._give_up: asyncio.TimerHandle | None = None
        self.server_info: dict[str, Any] | None = None  # the probe's status(), when probed
        self._state = "new"  # new -> open -> closed
        self._refusal = ""  # why new requests are refused although open ("" = they are not)
        self._stopped = ""  # the controller's ServerStopping: refused until a controller answers again ("" = not)
        self._closing = False
        self._requests: dict[str, PendingRequest] = {}
        self._by_msg_id: dict[int, str] = {}
        self._status_waiters: dict[int, asyncio.Future[StatusReply]] = {}
        self._env_dec = msgspec.msgpack.Decoder(Envelope)
        self._codec = Codec(f"client-{os.getpid()}-{uuid.uuid4().hex[:16]}", types=(ErrorReply, *CLIENT))

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> AsyncClient:
        if self._state != "new":
            raise RuntimeError("an AsyncClient is entered once; make a new one")
        self._loop = asyncio.get_running_loop()
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._busy, self._drained = asyncio.Event(), asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        self._sock = make_socket(self._ctx, zmq.DEALER, identity=self._codec.sender.encode(), keys=self._keys,
                                 server=SERVER)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # no frame is queued for a connection that is gone
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED)
        self._sock.connect(self.address)
        self._tasks = [asyncio.create_task(coro, name=f"dejavu-client-{name}") for name, coro in (
            ("recv", self._receive_loop()), ("send", self._send_loop()), ("keepalive", self._keepalive_loop()),
            ("monitor", self._monitor_loop()))]
        self._state = "open"
        if self.probe:
            try:
                self.server_info = await self._status(
                    self.connect_timeout, "AsyncClient(connect_timeout=...)",
                    " — is a controller serving at that address?")
            except BaseException:
                await self.close()
                raise
        log.debug("[client] connected to %s", self.address)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel in-flight requests on the server (waiting up to close_timeout for its acknowledgements),
        fail their local waiters with CancelledError, and release the socket."""
        if self._state == "new":
            self._state = "closed"
        if self._state != "open" or self._closing:
            return
        self._closing = True
        self._refusal = self._refusal or "it is closing"
        try:
            if self._requests:
                log.info("[client] closing: cancelling %d request(s) in flight", len(self._requests))
                for rid in list(self._requests):
                    self._post(CancelRequest(rid))
                try:
                    await asyncio.wait_for(self._drained.wait(), self.close_timeout)
                except TimeoutError:
                    log.warning("[client] %d request(s) not acknowledged as cancelled within %.1fs (setting: "
                                "AsyncClient(close_timeout=...))", len(self._requests), self.close_timeout)
        finally:
            self._fail_all(CancelledError("the client was closed while the request was in flight"))
            if self._give_up is not None:
                self._give_up.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)
            self._ctx.term()
            self._state = "closed"

    # ------------------------------------------------------------------ API

    def stream(self, prompt: str | None = None, prompt_token_ids: Iterable[int] | None = None,
               max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0, stop_token_ids: Iterable[int] = (), ignore_eos: bool = False,
               timeout: float | None = None, logprobs: int | None = None,
               logit_bias: Mapping[int, float] | None = None, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0) -> TokenStream:
        """An async iterator of TokenEvents as they are committed. Raises BadRequestError at once for
        obviously invalid arguments; server errors surface from the iteration. logprobs=N: every TokenEvent
        carries each token's log-probability and the N most likely alternatives' (TokenEvent.logprobs).
        logit_bias: token id -> a number in [-100, 100] added to its logit before sampling (-100 bans it).
        presence_penalty, frequency_penalty (each in [-2, 2]): OpenAI's, over the tokens generated so far."""
        self._check_open()
        req = build_request(prompt, prompt_token_ids, max_new_tokens, temperature, top_k, top_p, seed,
                            stop_token_ids, ignore_eos, logprobs, logit_bias, presence_penalty, frequency_penalty)
        t = self.timeout if timeout is None else timeout
        if not t > 0:
            raise BadRequestError(f"timeout must be > 0 seconds, got {t!r}")
        return TokenStream(self, req, t)

    async def generate(self, prompt: str | None = None, prompt_token_ids: Iterable[int] | None = None,
                       max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       seed: int = 0, stop_token_ids: Iterable[int] = (), ignore_eos: bool = False,
                       timeout: float | None = None, logprobs: int | None = None,
                       logit_bias: Mapping[int, float] | None = None, presence_penalty: float = 0.0,
                       frequency_penalty: float = 0.0) -> GenerateResult:
        """Run one request to its end. A request the server cancelled returns finish_reason "cancelled"."""
        async with self.stream(prompt, prompt_token_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids,
                               ignore_eos=ignore_eos, timeout=timeout, logprobs=logprobs, logit_bias=logit_bias,
                               presence_penalty=presence_penalty, frequency_penalty=frequency_penalty) as s:
            async for _ in s:
                pass
        return s.result

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The deployment's processes, queue counts and slots (requests it runs at once); see status_dict."""
        self._check_open()
        t = self.connect_timeout if timeout is None else timeout
        return await self._status(t, "status(timeout=...), default AsyncClient(connect_timeout=...)", "")

    async def _status(self, timeout: float, setting: str, hint: str) -> dict[str, Any]:
        fut: asyncio.Future[StatusReply] = self._loop.create_future()
        msg_id = self._post(StatusQuery())
        self._status_waiters[msg_id] = fut
        try:
            await asyncio.wait({fut}, timeout=timeout)  # does not raise: a reply's own error stays typed
        finally:  # under its first id, or the one a reconnection sent it again with
            for k in [k for k, v in self._status_waiters.items() if v is fut]:
                del self._status_waiters[k]
        if not fut.done():
            fut.cancel()
            raise RequestTimeoutError(
                f"no StatusReply from {self.address} within {timeout:.1f}s (setting: {setting}){hint}")
        return status_dict(fut.result())

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"the client is {self._state}: use it inside `async with AsyncClient(...)`")
        if self._denied:
            raise AuthenticationError(self._denied)
        if self._refusal:
            raise ServerError(f"the client takes no new requests: {self._refusal}")
        if self._stopped:
            raise ServerError(f"the deployment at {self.address} stopped: {self._stopped}")

    def _post(self, body: Msg) -> int:
        """Queue one message for the sender task; returns its envelope msg_id (for replies' reply_to)."""
        data = self._codec.encode(body)
        self._outbox.put_nowait(data)
        return self._env_dec.decode(data).msg_id  # Codec numbers envelopes internally: read the id back

    def _submit(self, req: GenerateRequest) -> PendingRequest:
        self._check_open()
        pending = PendingRequest(asyncio.Queue(), self._post(req), req, [])
        self._requests[req.request_id] = pending
        self._by_msg_id[pending.msg_id] = req.request_id
        self._busy.set()
        self._drained.clear()
        return pending

    def _forget(self, rid: str) -> PendingRequest | None:
        pending = self._requests.pop(rid, None)
        if pending is not None:
            self._by_msg_id.pop(pending.msg_id, None)
        if not self._requests:
            self._drained.set()
        return pending

    def _cancel(self, rid: str) -> None:
        """Stop listening for `rid` and ask the server to stop it (later messages for it are dropped)."""
        if self._forget(rid) is not None and self._state == "open":
            self._post(CancelRequest(rid))

    def _fail_all(self, err: DejaVuError) -> None:
        now = time.perf_counter()
        for rid in list(self._requests):
            pending = self._forget(rid)
            assert pending is not None
            pending.queue.put_nowait((now, err))
        for fut in self._status_waiters.values():
            if not fut.done():
                fut.set_exception(err)

    async def _send_loop(self) -> None:
        while True:
            data = await self._outbox.get()
            await self._sock.send(data, copy=False)

    async def _keepalive_loop(self) -> None:
        while True:
            await self._busy.wait()
            await asyncio.sleep(self.keepalive_interval)
            if self._requests:
                self._post(KeepAlive(list(self._requests)))
            else:
                self._busy.clear()

    async def _receive_loop(self) -> None:
        try:
            while True:
                frames = await recv_frames(self._sock)
                now = time.perf_counter()
                try:
                    _, rx = decode_frames(self._codec, frames)
                except ProtocolError as e:
                    noisy.warning("bad-frame", "controller", "[client] dropped an undecodable frame from the "
                                  "controller: %s", e)
                    continue
                self._dispatch(rx.env, rx.body, now)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the socket broke: nothing more will arrive for anyone
            log.error("[client] receiver stopped: %r", e)
            err = ServerError(f"the client's connection to {self.address} failed: {e!r}")
            self._refusal = self._refusal or str(err)
            self._fail_all(err)

    def _dispatch(self, env: Envelope, body: Msg, now: float) -> None:
        if isinstance(body, (TokenChunk, RequestDone, RequestFailed)):
            pending = self._requests.get(body.request_id)
            if pending is None:  # finished, cancelled or timed out here: late messages are expected
                log.debug("[client] %s for request %s (no longer awaited) dropped", type(body).__name__,
                          body.request_id)
                return
            if isinstance(body, TokenChunk):
                self._on_chunk(pending, body, now)
                return
            self._forget(body.request_id)
            if pending.resumes:  # the output ended; a resume still on its way must not run on for nothing
                self._post(CancelRequest(body.request_id))
            pending.queue.put_nowait((now, body))
        elif isinstance(body, StatusReply):
            fut = self._status_waiters.pop(env.reply_to, None)
            if fut is not None and not fut.done():
                fut.set_result(body)
        elif isinstance(body, ErrorReply):
            self._on_error_reply(env, body, now)
        elif isinstance(body, ServerStopping):
            self._on_stopping(body.message, now)
        else:
            log.warning("[client] unexpected %s from the controller dropped", type(body).__name__)

    def _on_stopping(self, message: str, now: float) -> None:
        """The controller's last word: the deployment stops. Whatever is still awaited would never be answered: it
        fails now, with the reason; new requests are refused until a controller answers at the address again."""
        log.error("[client] the deployment at %s stops: %s", self.address, message)
        self._stopped = message
        self._post(ServerStoppingAck())  # read: the controller may close the connection now
        for rid in list(self._requests):
            pending = self._forget(rid)
            assert pending is not None
            pending.queue.put_nowait((now, error_for(ERR_SERVER, message, rid)))
        err = ServerError(f"the deployment at {self.address} stopped: {message}")
        for fut in self._status_waiters.values():
            if not fut.done():
                fut.set_exception(err)

    def _on_chunk(self, pending: PendingRequest, chunk: TokenChunk, now: float) -> None:
        """Queue a chunk that continues the output exactly; drop one a resumed request receives twice (it must
        repeat the tokens held); anything else ends the request with ServerError."""
        held, i, k = len(pending.received), chunk.index, len(chunk.token_ids)
        if i == held:
            pending.received.extend(chunk.token_ids)
            pending.queue.put_nowait((now, chunk))
            return
        if pending.resumes and i < held and i + k <= held and pending.received[i:i + k] == chunk.token_ids:
            return  # sent before the resume took over, and again after it
        what = "gap" if i > held else "overlap"
        err = ServerError(
            f"request {chunk.request_id}: chunk at output index {i} with {k} token(s) but {held} token(s) "
            f"received so far ({what}); refusing a corrupted output")
        self._cancel(chunk.request_id)
        pending.queue.put_nowait((now, err))

    async def _monitor_loop(self) -> None:
        """The socket's connection events: a break starts the reconnect deadline; a new handshake after a
        break resumes every request in flight."""
        while True:
            message = parse_monitor_message(await self._monitor.recv_multipart())
            event = message["event"]
            if self._denied:
                continue
            if event & HANDSHAKE_FAILED:
                self._handshake_failed(event, int(message["value"]))
            elif event == zmq.EVENT_DISCONNECTED and self._lost_at is None and not self._closing:
                self._lost_at = time.perf_counter()
                if self._stopped:
                    log.info("[client] the connection to %s closed: the deployment stopped", self.address)
                elif not self._handshakes.connected_once:  # nothing broke (a refused handshake says why above)
                    log.debug("[client] a connection to %s closed before its handshake", self.address)
                else:
                    log.warning("[client] the connection to %s broke; %d request(s) in flight resume when it is "
                                "back (within reconnect_timeout %.0fs)", self.address, len(self._requests),
                                self.reconnect_timeout)
                self._give_up = self._loop.call_later(self.reconnect_timeout, self._reconnect_failed)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshakes.succeeded()
                if self._lost_at is None:
                    continue
                log.info("[client] reconnected to %s after %.1fs; resuming %d request(s)", self.address,
                         time.perf_counter() - self._lost_at, len(self._requests))
                self._lost_at = None
                self._stopped = ""  # a controller answers at the address again
                if self._give_up is not None:
                    self._give_up.cancel()
                    self._give_up = None
                self._resume_all()

    def _handshake_failed(self, event: int, value: int) -> None:
        """The deployment refused a handshake: for good when this client's keys are wrong or missing (see
        bus/handshake.py); after a connection, a warning, and reconnect_timeout decides as for any break."""
        why = self._handshakes.final(event, value)
        if why is None:
            if self._handshakes.connected_once:  # the keys were good: a restart with other keys, a stand-in
                noisy.warning("refused", self.address, "[client] reconnecting: %s; requests in flight fail if no "
                              "reconnection succeeds within reconnect_timeout (%.0fs)",
                              self._handshakes.why(event, value), self.reconnect_timeout)
            return
        self._denied = why
        log.info("[client] %s", why)  # the error every call raises from now on says it
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disconnect(self.address)  # no more attempts: nothing would change
        self._fail_all(AuthenticationError(why))

    def _resume_all(self) -> None:
        for old, fut in list(self._status_waiters.items()):  # a query sent before the break may be lost
            if not fut.done():
                del self._status_waiters[old]
                self._status_waiters[self._post(StatusQuery())] = fut
        for rid, pending in self._requests.items():
            resume = msgspec.structs.replace(pending.request, resume_token_ids=list(pending.received))
            self._by_msg_id.pop(pending.msg_id, None)
            pending.msg_id = self._post(resume)
            pending.resumes += 1
            self._by_msg_id[pending.msg_id] = rid

    def _reconnect_failed(self) -> None:
        self._give_up = None
        self._fail_all(ServerError(
            f"the connection to {self.address} broke and did not come back within {self.reconnect_timeout:.0f}s "
            "(setting: AsyncClient(reconnect_timeout=...))"))

    def _on_error_reply(self, env: Envelope, body: ErrorReply, now: float) -> None:
        fut = self._status_waiters.pop(env.reply_to, None)
        if fut is not None:
            if not fut.done():
                fut.set_exception(error_for(body.code, body.message))
            return
        rid = self._by_msg_id.get(env.reply_to)
        pending = self._forget(rid) if rid is not None else None
        if rid is not None and pending is not None:
            pending.queue.put_nowait((now, error_for(body.code, body.message, rid)))
            return
        log.warning("[client] controller error not tied to a pending request (reply_to=%d): %s [code %d]",
                    env.reply_to, body.message, body.code)

