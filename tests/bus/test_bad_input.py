"""Bad input against a running deployment: each gets a typed error to its sender only; everyone else keeps
being served; nothing is lost; no process restarts. Includes a fuzz test against every bound socket."""

from __future__ import annotations

import asyncio
import random

import msgspec
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message as recv_monitor_message_sync

from bus.client import AsyncClient
from bus.codec import Codec
from bus.errors import BadRequestError
from bus.messages import (
    ERR_BAD_MESSAGE,
    ERR_BAD_REQUEST,
    PROTOCOL_VERSION,
    Chunk,
    Envelope,
    ErrorReply,
    GenerateRequest,
    RequestFailed,
    Sampling,
    StepRequest,
    TensorMeta,
)
from bus.security import Keyring, as_client
from bus.security import load as load_keys
from bus.sockets import decode_frames
from recovery.launch import Deployment
from tests.conftest import start_deployment


@pytest.fixture(scope="module")
def dep(model_factory):  # type: ignore[no-untyped-def]
    d = start_deployment(model_factory("llama"), 2, "--microbatch-size", "4", "--max-seq-len", "64")
    yield d
    assert d.stop() == 0


async def raw_exchange(address: str, frames: list[bytes], timeout: float = 10.0):  # type: ignore[no-untyped-def]
    ctx = zmq.asyncio.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    try:
        await s.send_multipart(frames)
        reply = await asyncio.wait_for(s.recv_multipart(), timeout)
        return decode_frames(Codec("t"), reply)[1]
    finally:
        s.close(0)
        ctx.term()


def raw_body(body: bytes) -> bytes:
    return msgspec.msgpack.encode(Envelope(PROTOCOL_VERSION, 1, "fuzz", 0, 0, msgspec.Raw(body)))


@pytest.mark.parametrize(
    "frame",
    [
        b"not msgpack at all \xc1",
        b"",
        raw_body(b"\x92\x14"),  # truncated GenerateRequest
        raw_body(msgspec.msgpack.encode([250, 1, 2])),  # unknown type tag
        msgspec.msgpack.encode(Envelope(99, 1, "x", 0, 0, msgspec.Raw(b"\x90"))),  # wrong protocol version
        raw_body(msgspec.msgpack.encode([20, "r", None, [1, "two"]])),  # wrong field type
        b"\x00" * (9 * 1024 * 1024),  # over the 8 MiB request limit
    ],
    ids=["garbage", "empty", "truncated", "unknown-type", "version", "field-type", "oversized"],
)
def test_malformed_frames_get_error_reply(dep: Deployment, frame: bytes) -> None:
    msg = asyncio.run(raw_exchange(dep.address, [frame]))
    assert isinstance(msg.body, ErrorReply) and msg.body.code == ERR_BAD_MESSAGE


@pytest.mark.parametrize(
    "req,needle",
    [
        (GenerateRequest("a", prompt_token_ids=[5, 100000]), "vocabulary"),
        (GenerateRequest("b", prompt_token_ids=[-1]), "vocabulary"),
        (GenerateRequest("c", prompt_token_ids=[]), "empty"),
        (GenerateRequest("d", prompt_token_ids=[5] * 64), "too long"),
        (GenerateRequest("e", prompt_token_ids=[5], temperature=float("nan")), "temperature"),
        (GenerateRequest("f", prompt_token_ids=[5], top_p=0.0), "top_p"),
        (GenerateRequest("g", prompt_token_ids=[5], top_k=-3), "top_k"),
        (GenerateRequest("h", prompt_token_ids=[5], max_new_tokens=0), "max_new_tokens"),
        (GenerateRequest("i", prompt_token_ids=[5], stop_token_ids=[10**6]), "stop"),
        (GenerateRequest("j"), "exactly one"),
        (GenerateRequest("k", prompt="x", prompt_token_ids=[5]), "exactly one"),
    ],
)
def test_invalid_requests_get_typed_errors(dep: Deployment, req: GenerateRequest, needle: str) -> None:
    msg = asyncio.run(raw_exchange(dep.address, [Codec("t").encode(req)]))
    assert isinstance(msg.body, RequestFailed) and msg.body.code == ERR_BAD_REQUEST
    assert needle in msg.body.message


def test_client_api_raises_bad_request(dep: Deployment) -> None:
    async def scenario() -> None:
        async with AsyncClient(dep.address, timeout=30) as c:
            with pytest.raises(BadRequestError):
                await c.generate(prompt_token_ids=[5] * 80)
            ok = await c.generate(prompt_token_ids=[5, 6], max_new_tokens=4)
            assert len(ok.token_ids) == 4

    asyncio.run(scenario())


def _fuzz_frames(rng: random.Random, codec: Codec) -> list[list[bytes]]:
    valid = [
        codec.encode(GenerateRequest("fz", prompt_token_ids=[5, 6], max_new_tokens=2)),
        codec.encode(StepRequest(1, 0, 1, [Chunk(0, 0, 2)], [5, 6], [Sampling()], TensorMeta("float32", [2, 7]))),
    ]
    out = []
    for _ in range(60):
        kind = rng.randrange(4)
        if kind == 0:
            out.append([rng.randbytes(rng.randrange(0, 200))])
        elif kind == 1:
            v = rng.choice(valid)
            out.append([v[: rng.randrange(len(v))]])
        elif kind == 2:
            v = bytearray(rng.choice(valid))
            for _ in range(3):
                v[rng.randrange(len(v))] = rng.randrange(256)
            out.append([bytes(v), rng.randbytes(rng.randrange(0, 64))])
        else:
            out.append([rng.randbytes(8) for _ in range(rng.randrange(1, 5))])
    return out


async def _fuzz_one(ctx: zmq.asyncio.Context, kind: int, addr: str, batch: list[list[bytes]],
                    keys: tuple[Keyring, str] | None = None) -> bool:
    """Send every frame list of ``batch`` to ``addr`` from a fresh socket of ``kind`` (a CURVE client with `keys`
    = (a member's keyring, the server's process name), else plaintext); False when the peer refuses ours at the
    handshake: a socket type it does not pair with, or a security mechanism it does not accept (ZeroMQ reports a
    failure or a disconnect and drops the pipe; a send would then wait for a peer forever). The handshake's
    outcome is read from the socket monitor, under a deadline."""
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IMMEDIATE, 1)  # queue only on completed connections: a refused peer never takes a frame
    if keys is not None:
        as_client(s, *keys)
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    s.connect(addr)
    try:
        event = recv_monitor_message_sync(await asyncio.wait_for(mon.recv_multipart(), 30.0))
        if event["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return False
        for frames in batch:
            await asyncio.wait_for(s.send_multipart(frames), 30.0)
        await asyncio.sleep(0.2)  # let the peer drain what it got before the socket goes
        return True
    finally:
        s.disable_monitor()
        mon.close(0)
        s.close(0)


def test_fuzz_every_bound_socket_then_serve_exactly(dep: Deployment) -> None:
    async def scenario() -> None:
        async with AsyncClient(dep.address, timeout=60) as c:
            before = await c.status()
            baseline = await c.generate(prompt_token_ids=[9, 8, 7], max_new_tokens=8)
            targets = [(dep.address, "")]  # the client socket: plaintext (no keys given to this deployment)
            for p in before["processes"]:
                name = p["role"] if p["role"] in ("controller", "supervisor") else f"{p['role']}-{p['index']}"
                targets += [(a, name) for a in p["detail"].split() if a.startswith(("tcp://", "ipc://"))]
            assert len(targets) >= 7  # client, internal, supervisor, 2 stage data sockets, streamer control + data
            run_dir = next(a for a, _ in targets if a.startswith("ipc://")).removeprefix("ipc://").rsplit("/", 1)[0]
            member = load_keys(f"{run_dir}/keys", "stage-1")  # fuzzing as a member: past CURVE, into decoding
            ctx = zmq.asyncio.Context()
            rng = random.Random(1234)
            codec = Codec("fuzz")
            plain: dict[str, list[int]] = {}
            keyed: dict[str, list[int]] = {}
            try:
                for addr, server in targets:
                    for kind in (zmq.DEALER, zmq.PUSH):
                        plain.setdefault(addr, [])
                        if await _fuzz_one(ctx, kind, addr, _fuzz_frames(rng, codec)):
                            plain[addr].append(kind)
                        if server:
                            keyed.setdefault(addr, [])
                            if await _fuzz_one(ctx, kind, addr, _fuzz_frames(rng, codec), (member, server)):
                                keyed[addr].append(kind)
            finally:  # never left to the garbage collector: a context's term() there blocks a later test
                ctx.destroy(linger=0)
            # Each bound socket is a ROUTER or a PULL, so exactly one of the two kinds is compatible with it and
            # must have taken every frame; the other is refused at the ZMTP handshake (by design of ZeroMQ). Every
            # internal socket is a CURVE server: a plaintext peer is refused whatever its kind.
            assert len(plain[dep.address]) == 1, plain
            assert all(not kinds for addr, kinds in plain.items() if addr != dep.address), plain
            assert all(len(kinds) == 1 for kinds in keyed.values()), keyed
            after = await c.status()
            again = await c.generate(prompt_token_ids=[9, 8, 7], max_new_tokens=8)
            assert again.token_ids == baseline.token_ids
            inc_before = {(p["role"], p["index"]): p["incarnation"] for p in before["processes"]}
            inc_after = {(p["role"], p["index"]): p["incarnation"] for p in after["processes"]}
            assert inc_before == inc_after, "no process may crash or restart from bad input"
            # hundreds of bad frames, a handful of log lines: warnings about peers' input are rate-limited
            noise = [line for line in dep.logs().splitlines() if "bad frame" in line or "undecodable" in line]
            assert 0 < len(noise) <= 5 * len(targets), noise[:20]

    asyncio.run(scenario())
