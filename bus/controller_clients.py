"""The controller's client side: the client socket's receive loop, admitting requests (tokenizing a prompt on the
tokenizer's thread first), answering status queries, telling clients that the deployment stops, and delivering
what the core has to send (`_flush`: replies to clients, steps and KV moves to stages).

Runs in the controller process: a mixin of its shell (bus/controller_proc.py), which owns the sockets and the
state (`admitting`, `known_clients`, `stopping`, `told`, `unconfirmed`, `confirmed`, the core); kept apart so each
file says one thing. A decoding error or a failing handler is answered to that client only (ErrorReply); it
never stops the loop.

Stopping: when the supervisor gives up (FatalError: a process is past its restart budget, or another fatal
error) every request in flight fails at once with its message, and every client this controller knows is told
(ServerStopping), so none waits for a reconnection that will not come; on Shutdown (after FatalError, or a
plain stop) the same happens for whatever is left, and new requests are refused with the reason. Then the
controller waits - at most `flush_timeout` - until each client it told has confirmed (ServerStoppingAck), and
only then closes the client socket (with a linger of the same bound). Closing at once lost these last messages:
a client's socket (ZMQ_IMMEDIATE, bus/client.py) drops what it has received but not yet read when the
connection closes, and the client then waited out its reconnect_timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
import zmq

from bus.codec import Received
from bus.controller_status import redacted
from bus.errors import ProtocolError
from bus.messages import (
    ERR_BAD_MESSAGE,
    ERR_BAD_REQUEST,
    ERR_SERVER,
    CancelRequest,
    ErrorReply,
    GenerateRequest,
    KeepAlive,
    ServerStopping,
    ServerStoppingAck,
    StatusQuery,
)
from bus.sockets import decode_frames, recv_frames, send

log = logging.getLogger(__name__)


class ClientSide:
    """Methods of ControllerProcess (its attributes are the shell's)."""

    async def _client_loop(self) -> None:
        while True:
            frames = await recv_frames(self.clients)
            now = time.monotonic()
            try:
                route, msg = decode_frames(self.client_codec, frames, route_frames=1, sender_is_peer=False)
            except ProtocolError as e:
                if len(frames) >= 2:  # [identity, ...]: answer that peer only
                    ident = bytes(frames[0].bytes)
                    await send(self.clients, self.client_codec, ErrorReply(ERR_BAD_MESSAGE, str(e)), route=[ident],
                               reply_to=e.msg_id)
                continue
            self._heard_from(route[0])
            try:
                await self._on_client(route[0], msg, now, frames[1])
            except Exception as e:  # a handler that fails answers; it never takes the process down
                log.exception("[client] handling %s failed", type(msg.body).__name__)
                await send(self.clients, self.client_codec, ErrorReply(ERR_SERVER, f"internal error: {e}"),
                           route=route, reply_to=msg.env.msg_id)
            if self.stopping and route[0] not in self.told:  # a client first heard from while stopping
                await self._tell(route[0])
            await self._flush()

    async def _on_client(self, client: bytes, msg: Received, now: float, head: object) -> None:
        """`head`: the message's envelope frame as received (its properties say who sent it)."""
        body = msg.body
        if isinstance(body, GenerateRequest):
            if self.fatal or self.stopping:
                await send(self.clients, self.client_codec, ErrorReply(ERR_SERVER, self.fatal or self.stopping),
                           route=[client], reply_to=msg.env.msg_id)
                return
            key = (client, body.request_id)
            if key in self.admitting:
                if body.resume_token_ids is None:
                    self.core.refuse(client, body.request_id, ERR_BAD_REQUEST,
                                     f"request_id {body.request_id!r} is already running")
                    return
                self.admitting.pop(key).cancel()  # a resume replaces the request it resumes
            if body.prompt is None and self.tokenizer.done():
                self.core.submit(client, body, now)  # token ids: nothing slow to do first
            else:
                task = asyncio.ensure_future(self._admit(client, body))
                self.admitting[key] = task
                task.add_done_callback(lambda t, key=key: self.admitting.pop(key, None) if self.admitting.get(key) is t
                                       else None)
        elif isinstance(body, ServerStoppingAck):
            self.unconfirmed.discard(client)
            if not self.unconfirmed:
                self.confirmed.set()
        elif isinstance(body, CancelRequest):
            task = self.admitting.pop((client, body.request_id), None)
            if task is not None:
                task.cancel()
            self.core.cancel(client, body.request_id, now)
        elif isinstance(body, KeepAlive):
            self.core.touch(client, now, [r for r in body.request_ids if (client, r) not in self.admitting])
        elif isinstance(body, StatusQuery):
            reply = self._status() if self._is_admin(head) else redacted(self._status())
            await send(self.clients, self.client_codec, reply, route=[client], reply_to=msg.env.msg_id)
        else:
            await send(self.clients, self.client_codec,
                       ErrorReply(ERR_BAD_MESSAGE, f"{type(body).__name__} is not a client message"),
                       route=[client], reply_to=msg.env.msg_id)

    async def _admit(self, client: bytes, body: GenerateRequest) -> None:
        """A request whose admission needs slow work first: the tokenizer still loading (the first seconds after
        a start), or its text to tokenize - on the tokenizer's thread, so no prompt can stall this loop (its
        heartbeats, status, other clients). The text's size is bounded before any work."""
        await self.tokenizer
        if body.prompt is not None and body.prompt_token_ids is None:  # (both given: admission refuses it)
            limit = self.max_prompt_bytes
            size = len(body.prompt.encode("utf-8", "surrogatepass"))
            tokenizer = self.core.model.tokenizer
            if tokenizer is not None and size > limit:
                self.core.refuse(client, body.request_id, ERR_BAD_REQUEST,
                                 f"prompt text of {size} bytes is longer than any prompt that fits the maximum "
                                 f"sequence length {self.cfg.max_seq_len} tokens (at most {limit} bytes here)")
                await self._flush()
                return
            if tokenizer is not None:
                loop = asyncio.get_running_loop()
                try:
                    ids = await loop.run_in_executor(self.text_pool, tokenizer.encode, body.prompt)
                except Exception as e:  # the tokenizer refused this text
                    self.core.refuse(client, body.request_id, ERR_BAD_REQUEST, f"the tokenizer refused the prompt: {e}")
                    await self._flush()
                    return
                body = msgspec.structs.replace(body, prompt=None, prompt_token_ids=list(ids))
        if self.fatal or self.stopping:  # the deployment began to stop while this one was tokenized
            self.core.refuse(client, body.request_id, ERR_SERVER, self.fatal or self.stopping)
        else:
            self.core.submit(client, body, time.monotonic())
        await self._flush()

    def _heard_from(self, client: bytes) -> None:
        self.known_clients[client] = None
        self.known_clients.move_to_end(client)
        if len(self.known_clients) > self.cfg.max_known_clients:
            self.known_clients.popitem(last=False)

    async def _tell_clients(self, message: str) -> None:
        """The deployment stops: tell every client heard from (once). Requests in flight were failed already
        (RequestFailed goes before this on the same connection)."""
        if self.stopping:
            return
        self.stopping = message
        for client in list(self.known_clients):
            await self._tell(client)
        log.info("[shutdown] told %d client(s): %s", len(self.unconfirmed), message)
        if not self.unconfirmed:
            self.confirmed.set()

    async def _tell(self, client: bytes) -> None:
        """ServerStopping to one client, and wait for its confirmation - unless it is gone: sent with
        ROUTER_MANDATORY, a send to a client that is no longer connected fails at once (EHOSTUNREACH)."""
        self.told.add(client)
        self.clients.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            await self.clients.send_multipart([client, self.client_codec.encode(ServerStopping(self.stopping))],
                                              flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:  # gone (EHOSTUNREACH), or not reading at all (EAGAIN: its queue is full)
            return
        finally:
            self.clients.setsockopt(zmq.ROUTER_MANDATORY, 0)  # other sends to a client that is gone drop silently
        self.unconfirmed.add(client)
        self.confirmed.clear()

    async def _await_confirmations(self) -> None:
        """Until every client told has read ServerStopping (and so everything before it), at most flush_timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.confirmed.wait(), self.cfg.flush_timeout)
        if self.unconfirmed:
            log.warning("[shutdown] %d client(s) did not confirm that the deployment stops within flush_timeout "
                        "(%.1fs)", len(self.unconfirmed), self.cfg.flush_timeout)

    async def _flush(self) -> None:
        steps, out = self.core.outbox.drain()
        first_token = f"stage-{self.cfg.prompt_stages}".encode()  # the token pipeline's first stage
        for step in steps:
            to = first_token if self.disagg is not None and not self.disagg.is_prompt(step.mb) else b"stage-0"
            await send(self.internal, self.codec, step, route=[to])
        moves, self.core.outbox.moves = self.core.outbox.moves, []
        for mv in moves:  # every prompt stage moves its own layers of the parked prompts' KV
            for i in range(self.cfg.prompt_stages):
                await send(self.internal, self.codec, mv, route=[f"stage-{i}".encode()])
        for client, body in out:
            await send(self.clients, self.client_codec, body, route=[client])
