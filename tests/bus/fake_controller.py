"""A scripted stand-in for the controller's client side: a ROUTER on an ephemeral loopback port, driven by the
test's asyncio loop, speaking the real codec. Used by the client, CLI and load-generator tests.

Every message it receives goes to `inbox` (tests await what they expect with a deadline, never sleep).
StatusQuery is answered from `status`; GenerateRequest runs `on_generate` as its own task (default `echo`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import zmq

from bus.codec import Codec
from bus.messages import (
    Envelope,
    GenerateRequest,
    Msg,
    ProcessInfo,
    RequestDone,
    StatusQuery,
    StatusReply,
    TokenChunk,
)
from bus.sockets import bound_address, context, decode_frames, make_socket

Handler = Callable[["FakeController", bytes, Envelope, GenerateRequest], Awaitable[None]]

STATUS = StatusReply(
    processes=[ProcessInfo("controller", 0, 100, 0, "serving", "h", ""),
               ProcessInfo("stage", 0, 101, 0, "serving", "h", "layers [0, 2)"),
               ProcessInfo("stage", 1, 102, 1, "serving", "h", "layers [2, 4)")],
    model="fake", stages=2, epoch=3, waiting=0, running=0,
)


def tokens_for(req: GenerateRequest) -> list[int]:
    """The fake model's output: deterministic in the prompt."""
    base = sum(req.prompt_token_ids or [len(req.prompt or "")])
    return [(base + i) % 256 for i in range(req.max_new_tokens)]


async def echo(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
    """Answer with max_new_tokens tokens in chunks of up to two, with text when `fake.text`, then done."""
    out = tokens_for(req)
    for i in range(0, len(out), 2):
        ids = out[i:i + 2]
        await fake.send(route, TokenChunk(req.request_id, i, ids, "".join(f"<{t}>" for t in ids) if fake.text
                                          else None))
    await fake.send(route, RequestDone(req.request_id, "length", len(req.prompt_token_ids or [1]), len(out)))


class FakeController:
    def __init__(self, on_generate: Handler = echo, *, text: bool = False, answer_status: bool = True) -> None:
        self.on_generate, self.text, self.answer_status = on_generate, text, answer_status
        self.codec = Codec("controller")
        self.inbox: asyncio.Queue[tuple[bytes, Envelope, Msg]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeController:
        self.ctx = context()
        self.sock = make_socket(self.ctx, zmq.ROUTER, bind="tcp://127.0.0.1:0")
        self.address = bound_address(self.sock)
        self._main = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in (self._main, *self._tasks):
            t.cancel()
        await asyncio.gather(self._main, *self._tasks, return_exceptions=True)
        self.sock.close(0)
        self.ctx.term()

    async def restart(self, come_back: bool = True) -> None:
        """Drop every connection, as a controller that dies does, and (come_back) bind the same address again,
        as its restarted incarnation does. Requests being answered are dropped with the old socket."""
        for t in (self._main, *self._tasks):
            t.cancel()
        await asyncio.gather(self._main, *self._tasks, return_exceptions=True)
        self.sock.close(0)
        if come_back:
            async with asyncio.timeout(5.0):  # ZeroMQ closes the old listener on its I/O thread, a moment later
                while True:
                    try:
                        self.sock = make_socket(self.ctx, zmq.ROUTER, bind=self.address)
                        break
                    except zmq.ZMQError as e:
                        if e.errno != zmq.EADDRINUSE:
                            raise
                        await asyncio.sleep(0.01)
            self._main = asyncio.create_task(self._serve())
        else:
            self.sock = make_socket(self.ctx, zmq.ROUTER)  # bound nowhere: what __aexit__ closes

    async def send(self, route: bytes, body: Msg, reply_to: int = 0) -> None:
        await self.sock.send_multipart([route, self.codec.encode(body, reply_to)])

    async def expect(self, kind: type[Msg], timeout: float = 5.0) -> tuple[bytes, Envelope, Any]:
        """The next received message of type `kind` (others are skipped), within `timeout`."""
        async with asyncio.timeout(timeout):
            while True:
                route, env, body = await self.inbox.get()
                if isinstance(body, kind):
                    return route, env, body

    async def _serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            route, rx = decode_frames(self.codec, frames, route_frames=1)
            self.inbox.put_nowait((route[0], rx.env, rx.body))
            if isinstance(rx.body, StatusQuery) and self.answer_status:
                await self.send(route[0], STATUS, reply_to=rx.env.msg_id)
            elif isinstance(rx.body, GenerateRequest):
                task = asyncio.create_task(self.on_generate(self, route[0], rx.env, rx.body))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)


async def never_answer(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
    """Takes the request and says nothing, ever."""
