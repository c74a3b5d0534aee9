"""One client's work must not starve the controller's loop. A reliability probe took a deployment down with a
few 2.5 MiB text prompts: their tokenization ran on the controller's event loop (seconds each), heartbeats
stopped, and the supervisor killed the controller until its restart limit ran out. Now a prompt's text is
bounded before any work and tokenized on the tokenizer's own thread."""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from bus.client import AsyncClient
from bus.codec import Codec
from bus.messages import ERR_BAD_REQUEST, GenerateRequest, RequestFailed
from bus.sockets import decode_frames
from bus.text import load_tokenizer, longest_token_bytes
from tests.conftest import start_deployment

MAX_SEQ = 256


def test_a_storm_of_the_largest_prompts_leaves_status_answering_and_nothing_restarts(default_model) -> None:  # type: ignore[no-untyped-def]
    limit = MAX_SEQ * longest_token_bytes(load_tokenizer(default_model)) * 4  # what the controller allows
    storm = [GenerateRequest(f"max-{i}", prompt="a" * limit) for i in range(120)]  # tokenized, then too long
    storm += [GenerateRequest(f"huge-{i}", prompt="a" * (5 << 19)) for i in range(12)]  # refused unread
    dep = start_deployment(default_model, 1, "--max-seq-len", str(MAX_SEQ))

    async def scenario() -> tuple[list[float], dict[str, str], dict, str]:  # type: ignore[type-arg]
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(dep.address)
        codec = Codec("storm")
        try:
            async with AsyncClient(dep.address, timeout=60) as c:
                for body in storm:
                    await raw.send(codec.encode(body))
                latencies = []
                answers: dict[str, str] = {}
                deadline = time.monotonic() + 60
                while len(answers) < len(storm) and time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    await c.status()
                    latencies.append(time.perf_counter() - t0)
                    while await raw.poll(0):
                        _, msg = decode_frames(codec, await raw.recv_multipart(copy=False))
                        assert isinstance(msg.body, RequestFailed) and msg.body.code == ERR_BAD_REQUEST, msg.body
                        answers[msg.body.request_id] = msg.body.message
                    await asyncio.sleep(0.02)  # pacing of the status probes, not synchronisation
                served = await c.generate(prompt="after the storm", max_new_tokens=4)
                return latencies, answers, await c.status(), served.text or ""
        finally:
            raw.close(0)
            ctx.term()

    try:
        latencies, answers, status, text = asyncio.run(scenario())
        assert len(answers) == len(storm), f"{len(answers)} of {len(storm)} storm requests answered"
        assert all("too long" in answers[f"max-{i}"] for i in range(120))
        assert all("longer than any prompt that fits" in answers[f"huge-{i}"] for i in range(12))
        print(f"status during the storm: {len(latencies)} answers, max {max(latencies) * 1e3:.0f} ms")
        assert max(latencies) < 1.0, latencies  # a starved loop stalls for seconds (and gets killed at 3 s)
        assert {p["role"]: p["incarnation"] for p in status["processes"]}["controller"] == 0
        assert all(p["incarnation"] == 0 for p in status["processes"] if p["role"] == "stage")
        assert text
    finally:
        assert dep.stop() == 0
