"""Forged messages from local processes that are not (or pretend to be another) member of the deployment.

A probe showed that any local process could forge a stage's Hello (a permanent outage), a StepResult (76 of 150
tokens replaced, no error), a StepFailed, a supervisor Heartbeat that gets a healthy stage killed, a step with
hidden states into a stage's activation input, and KV chunks into a stage's pool through the streamer's data
port. Every internal socket is now a CURVE server that admits the deployment's members only, and every message's
sender must be the authenticated process (bus/security.py). Each case is sent two ways while requests stream -
from a process without keys, and from a member's key naming another member as sender - and the deployment must
ignore it and serve every request exactly as the fault-free reference.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from bus.client import AsyncClient
from bus.codec import Codec
from bus.messages import (
    ERR_SERVER,
    VIA_FRAME,
    Chunk,
    Heartbeat,
    Hello,
    RegionSpec,
    RemoteChunk,
    RemoteOpen,
    Sampling,
    StepFailed,
    StepRequest,
    StepResult,
    TensorMeta,
)
from bus.security import Keyring, as_client
from bus.security import load as load_keys
from tests.conftest import start_deployment
from tests.recovery.test_recovery import MAX_SEQ, Progress, reference, stream_exactly, workload


def _name(p: dict) -> str:  # type: ignore[type-arg]
    return p["role"] if p["role"] in ("controller", "supervisor") else f"{p['role']}-{p['index']}"


async def forge(ctx: zmq.asyncio.Context, kind: int, address: str, messages: list[list[bytes]],
                keys: tuple[Keyring, str] | None) -> bool:
    """Send `messages` to `address` from a fresh socket (a CURVE client with `keys`, else plaintext); whether the
    connection's handshake succeeded (when it fails, nothing can be sent at all)."""
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IMMEDIATE, 1)
    if kind == zmq.DEALER:
        s.setsockopt(zmq.IDENTITY, b"forger")
    if keys is not None:
        as_client(s, *keys)
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    s.connect(address)
    try:
        event = parse_monitor_message(await asyncio.wait_for(mon.recv_multipart(), 30))["event"]
        if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return False
        for frames in messages:
            await asyncio.wait_for(s.send_multipart(frames), 10)
        await asyncio.sleep(0.2)  # let the peer read it before the socket goes (there is no answer to wait for)
        return True
    finally:
        s.disable_monitor()
        mon.close(0)
        s.close(0)


def test_forged_messages_are_ignored_and_every_request_stays_exact(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    reqs = workload(211, n=12)
    refs = reference(path, reqs)
    dep = start_deployment(path, 2, "--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ))
    progress = Progress()
    handshakes: dict[str, list[bool]] = {}

    async def scenario() -> tuple[list[list[int]], dict]:  # type: ignore[type-arg]
        async with AsyncClient(dep.address, timeout=120) as c:
            st = await c.status()
            procs = {_name(p): p for p in st["processes"]}
            addr = {n: [a for a in p.get("detail", "").split() if a.startswith(("tcp://", "ipc://"))]
                    for n, p in procs.items()}
            # the cluster supervisor's run directory holds every process's key; the host agent's, its local socket
            (run_dir,) = Path("/tmp").glob(f"dejavu-{procs['supervisor']['pid']}-*")
            insider = load_keys(f"{run_dir}/keys", "streamer-0")  # a real member's key, speaking for others
            (agent_dir,) = Path("/tmp").glob(f"dejavu-{procs['agent-0']['pid']}-*")
            addr["agent-0"] = [f"ipc://{agent_dir}/agent.sock"]

            def as_(sender: str, body, *buffers: bytes) -> list[bytes]:  # type: ignore[no-untyped-def]
                return [Codec(sender, procs.get(sender, {}).get("incarnation", 0)).encode(body), *buffers]

            epoch = st["epoch"]
            steps = [(mb, step) for mb in range(2) for step in range(1, 300)]  # hits whatever is in flight
            cases = [  # (what, address, server, socket kind, messages)
                ("Hello as stage-1", addr["controller"][0], "controller", zmq.DEALER,
                 [as_("stage-1", Hello("stage", 1, 1, "h", {"data": "tcp://127.0.0.1:9"}, [4, 8], 8))]),
                ("StepResults as stage-1", addr["controller"][0], "controller", zmq.DEALER,
                 [as_("stage-1", StepResult(epoch, mb, step, [7] * 4)) for mb, step in steps]),
                ("StepFailed as stage-1", addr["controller"][0], "controller", zmq.DEALER,
                 [as_("stage-1", StepFailed(epoch, mb, step, ERR_SERVER, "forged")) for mb, step in steps]),
                ("Heartbeat as stage-1", addr["agent-0"][0], "agent-0", zmq.DEALER,
                 [as_("stage-1", Heartbeat(99, "serving", busy_s=1e9))]),  # would be killed as hung
                ("steps into stage-1's activations", addr["stage-1"][0], "stage-1", zmq.PUSH,
                 [as_("stage-0", StepRequest(epoch, mb, step, [Chunk(0, 0, 1)], [5], [Sampling()],
                                             TensorMeta("float32", [1, 64])), bytes(256)) for mb, step in steps]),
                ("KV chunks into the streamer's data port", addr["streamer-0"][1], "streamer-0", zmq.DEALER,
                 [as_("streamer-9", RemoteOpen(1, "kv-stage-0", RegionSpec([0], [0, 1], [[0, 1]]), 1, 64,
                                               "float32", 64, False, VIA_FRAME)),
                  as_("streamer-9", RemoteChunk(1, 0, [0, 1], 64), bytes(64))]),
            ]

            async def forger() -> None:
                await progress.reach(200)
                ctx = zmq.asyncio.Context()
                try:
                    for what, address, server, kind, messages in cases:
                        handshakes[what] = [await forge(ctx, kind, address, messages, None),
                                            await forge(ctx, kind, address, messages, (insider, server))]
                finally:
                    ctx.destroy(linger=0)

            task = asyncio.create_task(forger())
            outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
            await asyncio.wait_for(task, 30)
            return outs, await c.status()

    try:
        outs, after = asyncio.run(scenario())
        assert outs == refs
        # without the deployment's keys no connection is even made; with a member's key it is, and the message
        # naming another sender is refused at decoding
        assert all(plain is False and insider is True for plain, insider in handshakes.values()), handshakes
        assert all(p["incarnation"] == 0 for p in after["processes"] if p["role"] != "supervisor"), after
        logs = dep.logs()
        assert "came from 'streamer-0': refused" in logs
    finally:
        assert dep.stop() == 0


def test_a_process_without_keys_cannot_reach_any_internal_socket(model_factory) -> None:  # type: ignore[no-untyped-def]
    """...and the client socket (no keys given to this deployment) still serves plaintext clients on loopback."""
    dep = start_deployment(model_factory("llama"), 1, "--max-seq-len", str(MAX_SEQ))

    async def scenario() -> dict[str, bool]:
        async with AsyncClient(dep.address, timeout=60) as c:
            st = await c.status()
            out = {}
            ctx = zmq.asyncio.Context()
            try:
                for p in st["processes"]:
                    for a in p.get("detail", "").split():
                        if a.startswith(("tcp://", "ipc://")):
                            kind = zmq.PUSH if p["role"] == "stage" else zmq.DEALER
                            out[f"{_name(p)} {a}"] = await forge(ctx, kind, a, [[b"x"]], None)
            finally:
                ctx.destroy(linger=0)
            assert len((await c.generate(prompt_token_ids=[5, 6], max_new_tokens=3)).token_ids) == 3
            return out

    try:
        reached = asyncio.run(scenario())
        assert len(reached) >= 5 and not any(reached.values()), reached
        os.kill(dep.proc.pid, signal.SIGINT)
        assert dep.proc.wait(30) == 0
    finally:
        if dep.proc.poll() is None:
            dep.stop()
