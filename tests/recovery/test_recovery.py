"""Failures of real processes: kill -9 of a stage mid-generation, a hung stage (SIGSTOP, caught by
heartbeats), the restart-intensity limit, and clean shutdown by SIGTERM. Every request either completes
with exactly the fault-free output or gets a typed error; nothing is repeated, changed or left running."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from bus.child import alive
from bus.client import AsyncClient
from bus.errors import DejaVuError
from bus.security import load as load_keys
from stages.generate import GenerationRequest, LocalPipeline, generate
from stages.layers.sampling import SamplingParams
from tests.conftest import start_deployment

MAX_SEQ = 160


def workload(vocab: int, n: int = 32) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(11)
    reqs = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (1 + (i * 5) % 30,), generator=g).tolist()
        sampling = SamplingParams(0.8, 20, 0.95, seed=1000 + i) if i % 3 == 0 else SamplingParams()
        if i % 4 == 1:  # a logit_bias, which every step (a replay's too) must carry: a ban and a lift
            sampling = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed,
                                      logit_bias=((5 + i % 7, -100.0), (17 + i % 11, 4.0)))
        if i % 5 == 2:  # penalties: the last stage must know every generated token, after any failure too
            sampling = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed,
                                      logit_bias=sampling.logit_bias, presence_penalty=0.6, frequency_penalty=0.3)
        reqs.append(GenerationRequest(prompt, 60 + (i * 13) % 60, sampling))
    return reqs


def reference(path, reqs: list[GenerationRequest]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    pipe = LocalPipeline(path, 1, num_slots=len(reqs), max_seq_len=MAX_SEQ)
    return [r.token_ids for r in generate(pipe, reqs)]


class Progress:
    """Tokens received so far by all of a run's streams; `reach(n)` waits (event-driven) until n have come."""

    def __init__(self) -> None:
        self.received = 0
        self._event = asyncio.Event()

    def add(self, n: int) -> None:
        self.received += n
        self._event.set()

    async def reach(self, n: int) -> None:
        while self.received < n:
            await self._event.wait()
            self._event.clear()


async def stream_exactly(c: AsyncClient, r: GenerationRequest, progress: Progress) -> list[int]:
    """One request's output, checking that every token arrives once and in order."""
    out: list[int] = []
    s = r.sampling
    async with c.stream(prompt_token_ids=r.prompt_ids, max_new_tokens=r.max_new_tokens, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, seed=s.seed, logit_bias=dict(s.logit_bias),
                        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty) as st:
        async for ev in st:
            assert ev.index == len(out), "tokens must arrive once, in order"
            out.extend(ev.token_ids)
            progress.add(len(ev.token_ids))
    return out


async def run_with_kills(address: str, reqs: list[GenerationRequest], kills: list[tuple[int, int]],
                         sig: int = signal.SIGKILL, role: str = "stage") -> tuple[list[list[int]], dict]:  # type: ignore[type-arg]
    """Stream every request; when `threshold` tokens have arrived in total, send `sig` to process (role, index)."""
    progress = Progress()
    pending = list(kills)

    async with AsyncClient(address, timeout=180) as c:
        async def killer() -> None:
            while pending:
                threshold, index = pending[0]
                await progress.reach(threshold)
                pending.pop(0)
                st = await c.status()
                os.kill(next(p["pid"] for p in st["processes"] if p["role"] == role and p["index"] == index), sig)

        kill_task = asyncio.create_task(killer())
        outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
        kill_task.cancel()
        assert not pending, "the failures were injected before generation ended"
        return outs, await c.status()


def test_kill_9_stage_mid_generation_loses_nothing(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    reqs = workload(211)
    refs = reference(path, reqs)
    dep = start_deployment(path, 3, "--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ))
    try:
        outs, status = asyncio.run(run_with_kills(dep.address, reqs, [(150, 1), (900, 2)]))
        assert outs == refs
        stages = {p["index"]: p for p in status["processes"] if p["role"] == "stage"}
        assert stages[1]["incarnation"] == 1 and stages[2]["incarnation"] == 1 and stages[0]["incarnation"] == 0
        assert all(p["state"] == "serving" for p in stages.values())
        # new requests are served afterwards, still exactly
        again, _ = asyncio.run(run_with_kills(dep.address, reqs[:4], []))
        assert again == refs[:4]
        logs = dep.logs()
        assert "[recovery]" in logs
        # at each death the two survivors were told at once that the epoch was over (links closed, steps dropped)
        assert logs.count("is over (a stage died)") == 4
        # each restarted stage took its pool over from the streamer: requests went on where they were
        assert logs.count("taken over with its KV") == 2 and "resuming from the KV the stages kept" in logs
        assert "recomputed" not in logs
    finally:
        assert dep.stop() == 0


def test_kill_9_controller_mid_generation_clients_resume_exactly(model_factory) -> None:  # type: ignore[no-untyped-def]
    """The controller holds every request's state and dies with it: the supervisor restarts it at the same
    addresses, the stages register again when it asks, and each client resumes its requests from the tokens
    it holds - outputs equal the fault-free run, token for token, each token delivered once."""
    path = model_factory("llama")
    reqs = workload(211, n=24)
    refs = reference(path, reqs)
    dep = start_deployment(path, 2, "--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ),
                           "--heartbeat-interval", "0.2", "--heartbeat-timeout", "3")
    try:
        outs, status = asyncio.run(run_with_kills(dep.address, reqs, [(300, 0)], role="controller"))
        assert outs == refs
        roles = {(p["role"], p["index"]): p for p in status["processes"]}
        assert roles[("controller", 0)]["incarnation"] == 1
        assert [roles[("stage", i)]["incarnation"] for i in range(2)] == [0, 0]  # stages were not restarted
        assert all(roles[("stage", i)]["state"] == "serving" for i in range(2))
        assert ("streamer", 0) in roles and ("supervisor", 0) in roles  # re-announced to the new controller
        again, _ = asyncio.run(run_with_kills(dep.address, reqs[:4], []))
        assert again == refs[:4]
        assert "resumes" in dep.logs()
    finally:
        assert dep.stop() == 0


def test_controller_restart_keeps_streamed_text_exact_and_status_answers(default_model) -> None:  # type: ignore[no-untyped-def]
    """Text prompts (the default model has a tokenizer): the text streamed across a controller restart equals
    the fault-free text, and a status() asked while the controller is down is answered by its successor."""
    dep = start_deployment(default_model, 2, "--microbatch-size", "4", "--max-seq-len", "128",
                           "--heartbeat-interval", "0.2", "--heartbeat-timeout", "3")
    prompts = [f"Request {i} asks about pipelines and caches" for i in range(8)]

    async def serve(kill: bool) -> tuple[list[tuple[tuple[int, ...], str | None]], int]:
        async with AsyncClient(dep.address, timeout=120) as c:
            first = asyncio.Event()
            incarnation = -1

            async def one(p: str) -> tuple[tuple[int, ...], str | None]:
                nonlocal incarnation
                async with c.stream(prompt=p, max_new_tokens=40, ignore_eos=True) as s:
                    async for ev in s:
                        if kill and ev.index >= 10 and not first.is_set():
                            first.set()
                            st = await c.status()
                            os.kill(next(q["pid"] for q in st["processes"] if q["role"] == "controller"),
                                    signal.SIGKILL)
                            st = await c.status()  # sent into the break: answered once it is back
                            incarnation = next(q["incarnation"] for q in st["processes"] if q["role"] == "controller")
                return s.result.token_ids, s.result.text

            outs = await asyncio.gather(*(one(p) for p in prompts))
            return outs, incarnation

    try:
        clean, _ = asyncio.run(serve(kill=False))
        restarted, incarnation = asyncio.run(serve(kill=True))
        assert incarnation == 1
        assert restarted == clean and all(text for _, text in clean)
    finally:
        assert dep.stop() == 0


def chaos(path, seed: int, kills: int, n: int) -> None:  # type: ignore[no-untyped-def]
    """`kills` kill -9s of randomly chosen stages, controller and streamer (one every 100-300 tokens, a process
    sometimes killed again while it restarts), over `n` streamed requests: every output equals the fault-free
    run, each token delivered once, whichever recovery path each failure took."""
    rng = random.Random(seed)
    reqs = workload(211, n=n)
    refs = reference(path, reqs)
    dep = start_deployment(path, 3, "--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ),
                           "--heartbeat-interval", "0.2", "--heartbeat-timeout", "3", "--max-restarts", "20")
    progress = Progress()

    async def scenario() -> tuple[list[list[int]], list[str]]:
        async with AsyncClient(dep.address, timeout=240) as c:
            async def chaos() -> list[str]:
                killed = []
                for _ in range(kills):
                    await progress.reach(progress.received + rng.randint(100, 300))
                    st = await c.status()
                    victim = rng.choice([p for p in st["processes"]
                                         if p["role"] in ("controller", "stage", "streamer") and p["pid"] > 0])
                    try:
                        os.kill(victim["pid"], signal.SIGKILL)
                        killed.append(f"{victim['role']}-{victim['index']}")
                    except ProcessLookupError:  # already dead: it is being restarted
                        killed.append("gone")
                return killed

            killer = asyncio.create_task(chaos())
            outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
            assert killer.done(), "the failures were injected before generation ended"
            return outs, killer.result()

    try:
        outs, killed = asyncio.run(scenario())
        assert outs == refs, killed
        assert {k.split("-")[0] for k in killed} >= {"stage", "controller"}, killed
    finally:
        assert dep.stop() == 0


@pytest.mark.slow  # ~20 s; the default suite keeps a deterministic kill -9 of each kind of process (above, below)
def test_random_kills_of_every_kind_of_process_lose_nothing(model_factory) -> None:  # type: ignore[no-untyped-def]
    chaos(model_factory("llama"), seed=4, kills=5, n=24)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [5, 6, 7, 8])
def test_long_random_kills_lose_nothing(model_factory, seed: int) -> None:  # type: ignore[no-untyped-def]
    """The chaos run at length: more requests, more kills, other seeds (`.ci/run` runs these when time allows)."""
    chaos(model_factory("llama"), seed=seed, kills=9, n=40)


def test_hung_stage_is_killed_by_heartbeat_timeout_and_replaced(model_factory) -> None:  # type: ignore[no-untyped-def]
    """A SIGSTOP'd stage is caught by heartbeats and replaced; without a streamer to keep its pool, the requests
    in flight are recomputed from prompt + committed tokens - and still come out exactly."""
    path = model_factory("llama")
    reqs = workload(211, n=12)
    refs = reference(path, reqs)
    dep = start_deployment(path, 2, "--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ),
                           "--heartbeat-interval", "0.2", "--heartbeat-timeout", "2", "--no-streamer")
    try:
        outs, status = asyncio.run(run_with_kills(dep.address, reqs, [(100, 0)], sig=signal.SIGSTOP))
        assert outs == refs
        stage0 = next(p for p in status["processes"] if p["role"] == "stage" and p["index"] == 0)
        assert stage0["incarnation"] == 1
        assert "[health]" in dep.logs()
        # no streamer kept the pool: the replacement starts empty and every request in flight is recomputed
        assert "every request in flight is recomputed" in dep.logs()
    finally:
        assert dep.stop() == 0


def test_restart_intensity_limit_shuts_down_with_a_clear_error(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    dep = start_deployment(path, 2, "--microbatch-size", "2", "--max-seq-len", "64", "--max-restarts", "1")

    async def scenario() -> None:
        async with AsyncClient(dep.address, timeout=60) as c:
            for expected_incarnation in (0, 1):
                st = await c.status()
                stage = next(p for p in st["processes"] if p["role"] == "stage" and p["index"] == 1)
                assert stage["incarnation"] == expected_incarnation
                os.kill(stage["pid"], signal.SIGKILL)
                if expected_incarnation == 0:  # wait for the replacement to serve
                    r = await c.generate(prompt_token_ids=[5, 6, 7], max_new_tokens=3)
                    assert len(r.token_ids) == 3

    asyncio.run(scenario())
    code = dep.proc.wait(60)
    assert code == 1
    assert "max_restarts" in dep.logs()


async def _process(address: str, role: str, index: int) -> dict:  # type: ignore[type-arg]
    async with AsyncClient(address, timeout=30) as c:
        st = await c.status()
    return next(p for p in st["processes"] if p["role"] == role and p["index"] == index)


def test_sigterm_stops_everything(model_factory) -> None:  # type: ignore[no-untyped-def]
    from recovery.launch import descendants
    from streamer.config import SHM_DIR, SHM_PREFIX

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists: the supervisor of an earlier deployment killed with -9
    orphan = SHM_DIR / f"{SHM_PREFIX}-d{dead.pid}-stage0-1-abc"
    orphan.write_bytes(b"kv")
    dep = start_deployment(model_factory("llama"), 2)
    assert not orphan.exists(), "a new deployment sweeps the pools of deployments that are gone"
    tree = descendants(dep.proc.pid)
    assert len(tree) >= 3  # controller + 2 stages
    # the stages' KV pools in shared memory (stages/kv_home.py), named after their host agent's pid
    agent = asyncio.run(_process(dep.address, "agent", 0))["pid"]
    pools = f"{SHM_PREFIX}-d{agent}-*"
    assert len(list(SHM_DIR.glob(pools))) == 2
    dep.proc.send_signal(signal.SIGTERM)
    assert dep.proc.wait(30) == 0
    assert not [p for p in tree if alive(p)]
    assert not list(SHM_DIR.glob(pools)), "no shared memory left behind either"


def test_client_sees_typed_error_when_the_deployment_dies(model_factory) -> None:  # type: ignore[no-untyped-def]
    dep = start_deployment(model_factory("llama"), 1, "--max-restarts", "0")

    async def scenario() -> None:
        async with AsyncClient(dep.address, timeout=30) as c:
            st = await c.status()
            pid = next(p["pid"] for p in st["processes"] if p["role"] == "stage")
            stream = c.stream(prompt_token_ids=[5, 6], max_new_tokens=100000 // 1000)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(DejaVuError):
                async with stream as s:
                    async for _ in s:
                        pass
                # a finished stream is fine too if the kill came late; then a new one must fail
                await c.generate(prompt_token_ids=[5, 6], max_new_tokens=5, timeout=15)

    asyncio.run(scenario())
    try:
        assert dep.proc.wait(60) == 1
    except subprocess.TimeoutExpired:
        dep.proc.kill()
        raise


def test_after_a_streamer_restart_a_killed_stage_still_comes_back_with_its_kv(model_factory) -> None:  # type: ignore[no-untyped-def]
    """The streamer that kept the stages' pools dies and is restarted: each stage registers its pool with the
    new one, so a stage killed afterwards still takes its KV over and requests go on where they were."""
    path = model_factory("llama")
    reqs = workload(211, n=12)
    refs = reference(path, reqs)
    dep = start_deployment(path, 2, "--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ))

    async def kill_streamer() -> None:
        async with AsyncClient(dep.address, timeout=60) as c:
            st = await c.status()
            os.kill(next(p["pid"] for p in st["processes"] if p["role"] == "streamer"), signal.SIGKILL)

    try:
        asyncio.run(kill_streamer())
        for _ in range(300):  # polling the log, a bounded number of times: both pools registered again
            if dep.logs().count("registered again with the restarted streamer") == 2:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the stages did not register their pools with the restarted streamer")
        outs, _ = asyncio.run(run_with_kills(dep.address, reqs, [(150, 1)]))
        assert outs == refs
        logs = dep.logs()
        assert "taken over with its KV" in logs and "resuming from the KV the stages kept" in logs
    finally:
        assert dep.stop() == 0


def test_streamer_is_supervised_and_restarted(model_factory) -> None:  # type: ignore[no-untyped-def]
    """The supervisor starts the host's KV streamer, reports it in status(), and restarts it when it dies;
    serving goes on meanwhile."""
    dep = start_deployment(model_factory("llama"), 1, "--microbatch-size", "2", "--max-seq-len", "64")

    async def scenario() -> None:
        async with AsyncClient(dep.address, timeout=60) as c:
            st = await c.status()
            (streamer,) = [p for p in st["processes"] if p["role"] == "streamer"]
            assert streamer["pid"] > 0 and streamer["incarnation"] == 0 and "tcp://" in streamer["detail"]
            os.kill(streamer["pid"], signal.SIGKILL)
            r = await c.generate(prompt_token_ids=[5, 6, 7], max_new_tokens=4)
            assert len(r.token_ids) == 4
            for _ in range(200):  # the restarted streamer says Hello within seconds
                st = await c.status()
                (streamer,) = [p for p in st["processes"] if p["role"] == "streamer"]
                if streamer["incarnation"] == 1 and streamer["state"] == "serving":
                    return
                await asyncio.sleep(0.1)  # polling status() with a bounded number of tries
            raise AssertionError(f"streamer not restarted: {streamer}")

    try:
        asyncio.run(scenario())
    finally:
        assert dep.stop() == 0


def test_a_client_that_does_not_resume_learns_its_requests_fate_from_a_restarted_controller(model_factory) -> None:  # type: ignore[no-untyped-def]
    """A plain socket client (no automatic resume) streams a request; the controller is killed with -9 and
    restarted. The client only keeps saying KeepAlive(its request ids): the new controller does not know the
    request and answers it with RequestFailed instead of leaving the client waiting forever."""
    import zmq
    import zmq.asyncio

    from bus.codec import Codec
    from bus.messages import ERR_SERVER, GenerateRequest, KeepAlive, RequestFailed, TokenChunk
    from bus.sockets import decode_frames

    dep = start_deployment(model_factory("llama"), 1, "--max-seq-len", str(MAX_SEQ), "--heartbeat-interval", "0.2")

    async def scenario() -> RequestFailed:
        ctx = zmq.asyncio.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(dep.address)
        codec = Codec("plain")
        try:
            async with AsyncClient(dep.address, timeout=60) as c:
                await s.send(codec.encode(GenerateRequest("r", prompt_token_ids=[5, 6], max_new_tokens=150)))
                _, first = decode_frames(codec, await asyncio.wait_for(s.recv_multipart(copy=False), 60))
                assert isinstance(first.body, TokenChunk)
                st = await c.status()
                os.kill(next(p["pid"] for p in st["processes"] if p["role"] == "controller"), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await s.send(codec.encode(KeepAlive(["r"])))
                if await s.poll(500):
                    _, msg = decode_frames(codec, await s.recv_multipart(copy=False))
                    if isinstance(msg.body, RequestFailed):
                        return msg.body
            raise AssertionError("no word on the request within 60 s")
        finally:
            s.close(0)
            ctx.term()

    try:
        failed = asyncio.run(scenario())
        assert failed.request_id == "r" and failed.code == ERR_SERVER
        assert "unknown to this controller" in failed.message
    finally:
        assert dep.stop() == 0


async def _exited(pid: int, timeout: float) -> None:
    """Wait (on a pidfd: an event, not a poll) until process `pid` has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@pytest.mark.parametrize("moment", ["while_the_streamer_is_down", "before_it_registers_again"])
def test_a_stage_killed_across_a_streamer_restart_comes_back_with_its_kv(model_factory, moment: str) -> None:  # type: ignore[no-untyped-def]
    """The streamer dies mid-generation and a stage dies before it could register its pool with the restarted
    streamer - killed in the same breath, or stopped first and killed only once the new streamer answers. The
    new streamer adopts the pools its predecessor recorded (their shared memory survived it), so the stage
    still takes its KV over: no request is recomputed, and every output equals the fault-free run."""
    from streamer.client import StreamerClient

    path = model_factory("llama")
    reqs = workload(211, n=12)
    refs = reference(path, reqs)
    # heartbeats would catch the stopped stage only after 30 s: the test kills it itself, once it has seen the
    # restarted streamer's pool table
    dep = start_deployment(path, 2, "--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ),
                           "--heartbeat-interval", "0.5", "--heartbeat-timeout", "30")
    progress = Progress()
    seen: list[list[str]] = []

    async def scenario() -> list[list[int]]:
        async with AsyncClient(dep.address, timeout=180) as c:
            async def killer() -> None:
                await progress.reach(150)
                st = await c.status()
                (streamer,) = [p for p in st["processes"] if p["role"] == "streamer"]
                stage = next(p["pid"] for p in st["processes"] if p["role"] == "stage" and p["index"] == 1)
                control = next(a for a in streamer["detail"].split() if a.startswith("ipc://"))
                if moment == "before_it_registers_again":
                    os.kill(stage, signal.SIGSTOP)  # it cannot register with the next streamer
                os.kill(streamer["pid"], signal.SIGKILL)
                if moment == "while_the_streamer_is_down":
                    os.kill(stage, signal.SIGKILL)
                    return
                await _exited(streamer["pid"], 10)
                # the streamer admits the deployment's members only: the test speaks as the host agent (which
                # never talks to the streamer's control socket itself), with its key from the agent's run directory
                run_dir = control.removeprefix("ipc://").rsplit("/", 1)[0]
                probe = StreamerClient(control, "agent-0", keys=load_keys(f"{run_dir}/keys", "agent-0"),
                                       server=streamer["role"] + "-0")
                try:
                    got = await probe.status(timeout=60)  # queued until the restarted streamer answers
                    assert got.incarnation == 1
                    seen.append(sorted(got.pools))
                finally:
                    await probe.close()
                os.kill(stage, signal.SIGKILL)

            kill_task = asyncio.create_task(killer())
            outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
            await asyncio.wait_for(kill_task, 10)  # done long before: its failures were injected mid-generation
            return outs

    try:
        outs = asyncio.run(scenario())
        assert outs == refs
        if seen:  # the stopped stage never registered with it: its pool was adopted from the manifest
            assert seen == [["kv-stage-0", "kv-stage-1"]]
        logs = dep.logs()
        assert "taken over with its KV" in logs and "resuming from the KV the stages kept" in logs
        assert "every request in flight is recomputed" not in logs
    finally:
        assert dep.stop() == 0
