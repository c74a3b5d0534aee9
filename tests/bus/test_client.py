"""AsyncClient and dejavu-client against a scripted fake controller (tests/bus/fake_controller.py).

No sleeps: every wait is on a message or an event, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import zmq

from bus.client import AsyncClient
from bus.errors import BadRequestError, CancelledError, RequestTimeoutError, ServerError
from bus.messages import (
    ERR_BAD_MESSAGE,
    ERR_BAD_REQUEST,
    ERR_CANCELLED,
    ERR_OVERLOADED,
    ERR_SERVER,
    ERR_TIMEOUT,
    CancelRequest,
    Envelope,
    ErrorReply,
    GenerateRequest,
    KeepAlive,
    RequestDone,
    RequestFailed,
    ServerStopping,
    ServerStoppingAck,
    StatusQuery,
    TokenChunk,
)
from bus.sockets import bound_address, context, make_socket
from tests.bus.fake_controller import FakeController, echo, never_answer, tokens_for

ROOT = Path(__file__).resolve().parents[2]


def run(coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def test_generate_collects_chunks() -> None:
    async def body() -> None:
        async with FakeController(text=True) as fake, AsyncClient(fake.address) as c:
            r = await c.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=5, seed=7, stop_token_ids=[9])
            _, _, req = await fake.expect(GenerateRequest)
        assert req.prompt_token_ids == [1, 2, 3] and req.seed == 7 and req.stop_token_ids == [9]
        assert req.request_id == r.request_id and len(r.request_id) == 32
        want = tokens_for(req)
        assert r.token_ids == tuple(want) and r.num_generated == 5
        assert r.text == "".join(f"<{t}>" for t in want)
        assert (r.finish_reason, r.num_prompt_tokens) == ("length", 3)
        assert len(r.token_times) == 5 and list(r.token_times) == sorted(r.token_times)
        assert r.ttft_s is not None and 0 <= r.ttft_s <= r.latency_s
        assert r.tpot_s is not None and r.normalized_latency_s == pytest.approx(r.latency_s / 5)

    run(body())


def test_text_is_none_without_tokenizer() -> None:
    async def body() -> None:
        async with FakeController(text=False) as fake, AsyncClient(fake.address) as c:
            r = await c.generate(prompt_token_ids=[4], max_new_tokens=3)
        assert r.text is None and r.token_ids == (4, 5, 6)

    run(body())


async def _two_chunks_then_silence(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
    await fake.send(route, TokenChunk(req.request_id, 0, [7], "a"))
    await fake.send(route, TokenChunk(req.request_id, 1, [8, 9], "bc"))


def test_stream_in_order_and_aclose_sends_cancel() -> None:
    async def body() -> None:
        async with FakeController(_two_chunks_then_silence) as fake, AsyncClient(fake.address) as c:
            s = c.stream(prompt_token_ids=[1], max_new_tokens=10)
            events = [await s.__anext__(), await s.__anext__()]
            assert [(e.index, e.token_ids, e.text) for e in events] == [(0, (7,), "a"), (1, (8, 9), "bc")]
            assert events[0].t <= events[1].t
            await s.aclose()
            _, _, cancel = await fake.expect(CancelRequest)
            assert cancel.request_id == s.request_id
            with pytest.raises(StopAsyncIteration):
                await s.__anext__()
            with pytest.raises(RuntimeError):
                s.result  # noqa: B018

    run(body())


def test_break_out_of_stream_sends_cancel() -> None:
    async def body() -> None:
        async with FakeController(_two_chunks_then_silence) as fake, AsyncClient(fake.address) as c:
            async for ev in c.stream(prompt_token_ids=[1], max_new_tokens=10):
                assert ev.index == 0
                break
            _, _, req = await fake.expect(GenerateRequest)
            _, _, cancel = await fake.expect(CancelRequest)
            assert cancel.request_id == req.request_id

    run(body())


def test_status_parses() -> None:
    async def body() -> None:
        async with FakeController() as fake, AsyncClient(fake.address) as c:
            st = await c.status()
        assert c.server_info == st
        assert (st["model"], st["stages"], st["epoch"], st["waiting"], st["running"]) == ("fake", 2, 3, 0, 0)
        stages = [p for p in st["processes"] if p["role"] == "stage"]
        assert [p["index"] for p in stages] == [0, 1] and stages[1]["incarnation"] == 1
        assert {"role", "index", "pid", "incarnation", "state", "host", "detail"} <= set(stages[0])

    run(body())


@pytest.mark.parametrize("code,exc", [
    (ERR_BAD_REQUEST, BadRequestError), (ERR_SERVER, ServerError), (ERR_OVERLOADED, ServerError),
    (ERR_TIMEOUT, RequestTimeoutError), (ERR_CANCELLED, CancelledError), (99, ServerError),
])
def test_request_failed_maps_to_typed_error(code: int, exc: type[Exception]) -> None:
    async def fail(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
        await fake.send(route, RequestFailed(req.request_id, code, "nope"))

    async def body() -> None:
        async with FakeController(fail) as fake, AsyncClient(fake.address) as c:
            with pytest.raises(exc, match="nope"):
                await c.generate(prompt_token_ids=[1])

    run(body())


def test_error_reply_to_the_request_envelope() -> None:
    async def reject(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
        await fake.send(route, ErrorReply(ERR_BAD_MESSAGE, "undecodable"), reply_to=env.msg_id)

    async def body() -> None:
        async with FakeController(reject) as fake, AsyncClient(fake.address) as c:
            with pytest.raises(BadRequestError, match="undecodable"):
                await c.generate(prompt_token_ids=[1])
            fake.on_generate = echo  # one refused request leaves the client usable
            assert (await c.generate(prompt_token_ids=[1], max_new_tokens=2)).token_ids == (1, 2)

    run(body())


def test_silent_server_times_out_within_deadline() -> None:
    async def body() -> None:
        async with FakeController(never_answer) as fake, AsyncClient(fake.address) as c:
            t0 = time.monotonic()
            with pytest.raises(RequestTimeoutError, match="timeout=") as ei:
                await c.generate(prompt_token_ids=[1], timeout=0.3)
            assert 0.25 <= time.monotonic() - t0 < 3.0
            assert "0.3s" in str(ei.value)
            _, _, cancel = await fake.expect(CancelRequest)  # the server is told to stop it
            assert not c._requests

    run(body())


def test_unreachable_controller_fails_the_probe() -> None:
    async def body() -> None:
        ctx = context()
        sock = make_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:0")
        address = bound_address(sock)
        sock.close(0)
        ctx.term()
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="connect_timeout"):
            async with AsyncClient(address, connect_timeout=0.3):
                pass
        assert time.monotonic() - t0 < 3.0

    run(body())


@pytest.mark.parametrize("chunks", [[(0, [1]), (2, [3])], [(0, [1, 2]), (1, [3])]], ids=["gap", "overlap"])
def test_index_discontinuity_is_a_server_error(chunks: list[tuple[int, list[int]]]) -> None:
    async def bad(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
        for index, ids in chunks:
            await fake.send(route, TokenChunk(req.request_id, index, ids))

    async def body() -> None:
        async with FakeController(bad) as fake, AsyncClient(fake.address) as c:
            with pytest.raises(ServerError, match="gap|overlap"):
                await c.generate(prompt_token_ids=[1], max_new_tokens=3)
            await fake.expect(CancelRequest)  # the server is told to stop a request the client gave up

    run(body())


def test_done_count_mismatch_is_a_server_error() -> None:
    async def short(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
        await fake.send(route, TokenChunk(req.request_id, 0, [1]))
        await fake.send(route, RequestDone(req.request_id, "length", 1, 2))

    async def body() -> None:
        async with FakeController(short) as fake, AsyncClient(fake.address) as c:
            with pytest.raises(ServerError, match="truncated"):
                await c.generate(prompt_token_ids=[1], max_new_tokens=2)

    run(body())


def test_keepalive_while_in_flight() -> None:
    async def after_keepalive(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
        await fake.expect(KeepAlive, timeout=5.0)  # answer only once the client has spoken again
        await fake.send(route, TokenChunk(req.request_id, 0, [5]))
        await fake.send(route, RequestDone(req.request_id, "stop", 1, 1))

    async def body() -> None:
        async with FakeController(after_keepalive) as fake, AsyncClient(fake.address, keepalive_interval=0.05) as c:
            r = await c.generate(prompt_token_ids=[1], timeout=5.0)
        assert (r.token_ids, r.finish_reason) == ((5,), "stop")

    run(body())


def test_close_cancels_in_flight_requests() -> None:
    got = asyncio.Event()

    async def ack_cancel(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
        await fake.send(route, TokenChunk(req.request_id, 0, [3]))
        got.set()
        _, _, cancel = await fake.expect(CancelRequest)
        await fake.send(route, RequestDone(cancel.request_id, "cancelled", 1, 1))

    async def body() -> None:
        async with FakeController(ack_cancel) as fake:
            async with AsyncClient(fake.address) as c:
                task = asyncio.create_task(c.generate(prompt_token_ids=[1], max_new_tokens=50))
                await got.wait()
            with pytest.raises(CancelledError, match="after 1 token"):  # it did not finish: not a result
                await task
            with pytest.raises(RuntimeError):
                c.stream(prompt_token_ids=[1])

    run(body())


def test_close_without_ack_fails_waiters_in_bounded_time() -> None:
    async def body() -> None:
        async with FakeController(never_answer) as fake:
            async with AsyncClient(fake.address, close_timeout=0.2) as c:
                task = asyncio.create_task(c.generate(prompt_token_ids=[1]))
                await fake.expect(GenerateRequest)
            with pytest.raises(CancelledError, match="closed"):
                await task

    run(body())


@pytest.mark.parametrize("kwargs", [
    {}, {"prompt": "hi", "prompt_token_ids": [1]}, {"prompt": ""}, {"prompt_token_ids": []},
    {"prompt_token_ids": [1, -2]}, {"prompt_token_ids": [1.5]}, {"prompt_token_ids": "12"},
    {"prompt_token_ids": [1], "max_new_tokens": 0}, {"prompt_token_ids": [1], "temperature": -1.0},
    {"prompt_token_ids": [1], "temperature": float("nan")}, {"prompt_token_ids": [1], "top_p": 0.0},
    {"prompt_token_ids": [1], "top_k": -1}, {"prompt_token_ids": [1], "seed": -1},
    {"prompt_token_ids": [1], "stop_token_ids": [-1]}, {"prompt_token_ids": [1], "timeout": 0},
])
def test_obvious_nonsense_is_refused_before_sending(kwargs: dict[str, Any]) -> None:
    async def body() -> None:
        async with FakeController() as fake, AsyncClient(fake.address) as c:
            with pytest.raises(BadRequestError):
                await c.generate(**kwargs)
            await c.status()  # the fake saw only StatusQuery messages
            while not fake.inbox.empty():
                assert isinstance(fake.inbox.get_nowait()[2], StatusQuery)

    run(body())


# ---------------------------------------------------------------- the CLI, as a subprocess


async def _cli(fake: FakeController, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bin" / "dejavu-client"), "--address", fake.address, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_cli_prints_the_stream() -> None:
    async def body() -> None:
        async with FakeController(text=True) as fake:
            rc, out, err = await _cli(fake, "--prompt-ids", "1,2,3", "--max-new-tokens", "4")
            assert rc == 0, err
            assert out.splitlines()[0] == "<6><7><8><9>"
            assert "finish_reason=length" in out and "generated=4" in out
            fake.text = False
            rc, out, err = await _cli(fake, "--prompt-ids", "1", "--max-new-tokens", "3")
            assert rc == 0, err
            assert out.splitlines()[0] == "1 2 3"

    run(body(), timeout=30)


def test_cli_status_and_typed_error_exit_code() -> None:
    async def fail(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
        await fake.send(route, RequestFailed(req.request_id, ERR_BAD_REQUEST, "prompt too long"))

    async def body() -> None:
        async with FakeController(fail) as fake:
            rc, out, err = await _cli(fake, "--status")
            assert rc == 0, err
            assert json.loads(out)["stages"] == 2
            rc, out, err = await _cli(fake, "--prompt-ids", "1")
            assert rc == 2 and "BadRequestError" in err and "prompt too long" in err

    run(body(), timeout=30)


def test_a_broken_connection_resumes_requests_with_the_tokens_held() -> None:
    """The controller goes away after two tokens and comes back at the same address knowing nothing: the client
    sends the request again with the two tokens it holds; a repeat of a held token is dropped, and the caller
    sees each token once, in order."""
    resumes: list[list[int] | None] = []

    async def script(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
        resumes.append(req.resume_token_ids)
        if req.resume_token_ids is None:
            await fake.send(route, TokenChunk(req.request_id, 0, [10], "a"))
            await fake.send(route, TokenChunk(req.request_id, 1, [11], "b"))
            return  # and then the controller dies
        await fake.send(route, TokenChunk(req.request_id, 1, [11], "b"))  # sent twice across the break
        await fake.send(route, TokenChunk(req.request_id, 2, [12], "c"))
        await fake.send(route, RequestDone(req.request_id, "length", 1, 3))

    async def body() -> None:
        async with FakeController(script) as fake, AsyncClient(fake.address) as c:
            events = []
            async with c.stream(prompt_token_ids=[1], max_new_tokens=3) as s:
                async for ev in s:
                    events.append(ev)
                    if len(events) == 2:
                        await fake.restart()
            assert [(e.index, e.token_ids) for e in events] == [(0, (10,)), (1, (11,)), (2, (12,))]
            assert s.result.token_ids == (10, 11, 12) and s.result.text == "abc"
            assert resumes == [None, [10, 11]]

    run(body())


def test_a_resumed_chunk_that_contradicts_held_tokens_is_a_server_error() -> None:
    async def script(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
        if req.resume_token_ids is None:
            await fake.send(route, TokenChunk(req.request_id, 0, [10]))
            return
        await fake.send(route, TokenChunk(req.request_id, 0, [99]))  # not what the client holds

    async def body() -> None:
        async with FakeController(script) as fake, AsyncClient(fake.address) as c:
            async with c.stream(prompt_token_ids=[1], max_new_tokens=3) as s:
                with pytest.raises(ServerError, match="overlap"):
                    async for _ in s:
                        await fake.restart()

    run(body())


def test_a_connection_that_does_not_come_back_fails_in_flight_requests_in_bounded_time() -> None:
    async def script(fake: FakeController, route: bytes, env: Envelope, req: GenerateRequest) -> None:
        await fake.send(route, TokenChunk(req.request_id, 0, [10]))

    async def body() -> None:
        async with FakeController(script) as fake, AsyncClient(fake.address, reconnect_timeout=0.5) as c:
            t0 = time.perf_counter()
            with pytest.raises(ServerError, match="reconnect_timeout"):
                async for _ in c.stream(prompt_token_ids=[1], max_new_tokens=3):
                    await fake.restart(come_back=False)
            assert time.perf_counter() - t0 < 5.0

    run(body())


def test_server_stopping_fails_everything_at_once_refuses_new_requests_and_is_confirmed() -> None:
    """The controller's last word when the deployment gives up: the request in flight and the status() waiting fail
    at once with its reason (not after reconnect_timeout), a new request is refused with it, and the client
    confirms that it read it (the controller keeps the connection open until then)."""
    reason = ("stage-1 killed by SIGKILL: failed 3 times within 60s, past its budget of 2 restarts (settings: "
              "max_restarts / restart_window, per process): the deployment stopped")

    async def body() -> None:
        async with FakeController(never_answer, answer_status=False) as fake, \
                AsyncClient(fake.address, probe=False, reconnect_timeout=60) as c:
            first = asyncio.ensure_future(c.stream(prompt_token_ids=[1], max_new_tokens=3).__anext__())
            route, _, _ = await fake.expect(GenerateRequest)
            status = asyncio.ensure_future(c.status(timeout=60))
            await fake.expect(StatusQuery)
            await fake.send(route, ServerStopping(reason))
            with pytest.raises(ServerError, match=r"stage-1 killed by SIGKILL.*max_restarts / restart_window"):
                await first
            with pytest.raises(ServerError, match=r"the deployment at .* stopped: stage-1 killed"):
                await status
            with pytest.raises(ServerError, match=r"stopped: stage-1 killed"):
                await c.generate(prompt_token_ids=[1], max_new_tokens=1)
            await fake.expect(ServerStoppingAck)

    run(body())
