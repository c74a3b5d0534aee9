"""Microbatch swapping across failures (issue 20): a swapping stage's microbatches wait in its streamer's swap pool,
which outlives the stage; killed (kill -9) while most of its microbatches are swapped out, the stage comes back
and swaps them in from there instead of recomputing them - the controller replays only the positions whose
write-back had not been acknowledged. Every output equals the fault-free run (greedy and seeded sampling)."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
import torch

from bus.client import AsyncClient
from stages.generate import GenerationRequest
from stages.layers.sampling import SamplingParams
from tests.conftest import start_deployment
from tests.recovery.test_hosts import until
from tests.recovery.test_recovery import MAX_SEQ, Progress, reference, stream_exactly
from tests.recovery.test_replication import kill_hosts, kill_stage, pid_of

ARGS = ("--swap", "on", "--microbatches", "6", "--microbatch-size", "2", "--max-seq-len",
        str(MAX_SEQ), "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3", "--log-level", "INFO")


def workload(vocab: int, n: int = 12) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(7)
    reqs = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (1 + (i * 5) % 20,), generator=g).tolist()
        sampling = SamplingParams(0.8, 20, 0.95, seed=500 + i) if i % 3 == 0 else SamplingParams()
        reqs.append(GenerationRequest(prompt, 30 + (i * 7) % 20, sampling))
    return reqs


def swap_run(path, args: tuple[str, ...], act, recoveries: int = 1, swapped_in: int | None = None,  # type: ignore[no-untyped-def]
             stages: int = 2):
    """Stream 12 requests over 2 swapping stages (or `stages`, as `args` split them); after 120 tokens (every
    microbatch has run decode steps, 4 of 6 are swapped out) run `act`. Returns outputs, references, the final
    status (once `recoveries` are reported and, with `swapped_in`, that stage reported swap-ins) and the logs."""
    reqs = workload(211)
    dep = start_deployment(path, stages, *ARGS, *args)

    async def scenario() -> tuple[list[list[int]], dict[str, Any]]:
        progress = Progress()
        async with AsyncClient(dep.address, timeout=120) as c:
            async def inject() -> None:
                await progress.reach(120)
                await act(c)

            injector = asyncio.create_task(inject())
            outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
            await asyncio.wait_for(injector, 60)
            st = await until(c, lambda s: len(s["recoveries"]) >= recoveries and s["state"] == "serving" and (
                swapped_in is None or any(p["role"] == "stage" and p["index"] == swapped_in and p.get("swap") and
                                          p["swap"]["bytes_in"] > 0 for p in s["processes"])), 60, "recovered")
            return outs, st

    try:
        outs, st = asyncio.run(scenario())
        logs = dep.logs()
    finally:
        assert dep.stop() == 0
    return outs, reference(path, reqs), st, logs


def few_replayed(rec: dict[str, Any]) -> None:
    # a recompute feeds every cached position again; the swap pool (or replica) lags a step or two behind at most
    assert 0 <= rec["tokens_replayed"] * 5 < rec["tokens_recompute"], rec


def test_a_killed_swapping_stage_swaps_back_in_from_the_swap_pool(model_factory) -> None:  # type: ignore[no-untyped-def]
    outs, refs, st, logs = swap_run(model_factory("llama"), ("--replicate", "off"), kill_stage(1), swapped_in=1)
    assert outs == refs
    (rec,) = st["recoveries"]
    assert (rec["stage"], rec["source"]) == (1, "swap"), rec
    few_replayed(rec)
    stage1 = next(p for p in st["processes"] if p["role"] == "stage" and p["index"] == 1)
    assert stage1["incarnation"] == 1 and stage1["swap"]["kept"] and stage1["swap"]["bytes_in"] > 0, stage1
    assert f"[recovery] stage 1 back on host-0 from swap in {rec['seconds']:.2f}s" in logs
    assert "[swap] swap pool swap-stage-1 kept from the previous incarnation" in logs


def test_a_swapping_stage_whose_host_is_lost_restores_its_swap_pool_from_the_replica(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Swapping with replication: each stage's replica is fed from its swap pool once a write-back landed (a
    swapped-out microbatch's replica is current, nothing is sent twice). Host-1 lost whole (its swap pool with
    it): stage 1 comes back on the spare host and restores its swap pool from its replica on host-0."""
    outs, refs, st, _ = swap_run(model_factory("llama"), ("--hosts", "2", "--spare-hosts", "1", "--replicate", "on"),
                                 kill_hosts("host-1"))
    assert outs == refs
    (rec,) = st["recoveries"]
    assert (rec["stage"], rec["host"], rec["source"]) == (1, "host-2", "replica"), rec
    assert rec["restored_bytes"] > 0
    few_replayed(rec)
    reps = {r["stage"]: r for r in st["replicas"]}  # (stage 0's replica was on host-1: it moved to host-2)
    assert (reps[0]["host"], reps[1]["host"]) == ("host-2", "host-0") and all(r["bytes"] > 0 for r in reps.values())


def kill_streamer_then(later, after: list[list[int]]):  # type: ignore[no-untyped-def]
    """A scenario: kill -9 of the host's streamer, then, once it is back, the `later` requests served one by one
    (their outputs appended to `after`): they run once the pools were allocated again."""

    async def kill_streamer(c: AsyncClient) -> None:
        os.kill(pid_of(await c.status(), "streamer", 0), signal.SIGKILL)
        await until(c, lambda s: any(p["role"] == "streamer" and p["incarnation"] == 1 and p["state"] == "serving"
                                     for p in s["processes"]), 60, "the streamer back")
        for r in later:
            after.append((await c.generate(prompt_token_ids=r.prompt_ids, max_new_tokens=r.max_new_tokens,
                                           temperature=r.sampling.temperature, top_k=r.sampling.top_k,
                                           top_p=r.sampling.top_p, seed=r.sampling.seed,
                                           logit_bias=dict(r.sampling.logit_bias),
                                           presence_penalty=r.sampling.presence_penalty,
                                           frequency_penalty=r.sampling.frequency_penalty)).token_ids)

    return kill_streamer


def test_a_restarted_streamer_loses_the_swap_pools_and_the_microbatches_are_recomputed_exactly(model_factory) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of the host's streamer: the swap pools die with it. Swaps fail until it is back (each microbatch
    that cannot swap in is recomputed from its committed tokens: SwapFailed), then each stage allocates its swap
    pool anew and swaps again. Every output is exact, before and after."""
    later = workload(211, n=4)
    after: list[list[int]] = []
    path = model_factory("llama")
    outs, refs, st, logs = swap_run(path, ("--replicate", "off"), kill_streamer_then(later, after), recoveries=0)
    assert outs == refs and [list(a) for a in after] == reference(path, later)
    assert st["recoveries"] == []
    assert "is recomputed (step" in logs and "swap pool swap-stage-0 allocated anew" in logs


DISAGG = ("--prompt-stages", "1", "--token-stages", "1")


def test_a_killed_swapping_token_stage_swaps_back_in_with_disaggregation(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Disaggregated (a prompt stage, a swapping token stage whose prompts land in its receive pool): kill -9 of the
    token stage mid-run. It comes back with its swap pool and swaps in from there; a request that had joined but
    whose first step had not run is recomputed (its prompt's rows were in the receive pool only, which the controller
    does not count). Every output exact."""
    outs, refs, st, logs = swap_run(model_factory("llama"), (*DISAGG, "--replicate", "off"), kill_stage(1),
                                    swapped_in=1)
    assert outs == refs
    (rec,) = st["recoveries"]
    assert (rec["stage"], rec["source"]) == (1, "swap"), rec
    assert rec["tokens_replayed"] < rec["tokens_recompute"], rec
    stage1 = next(p for p in st["processes"] if p["role"] == "stage" and p["index"] == 1)
    assert stage1["pipeline"] == "token" and stage1["incarnation"] == 1 and stage1["swap"]["kept"], stage1
    assert "[swap] receive pool recv-stage-1 kept from the previous incarnation" in logs


def test_a_swapping_token_stage_whose_host_is_lost_restores_from_its_replica(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Disaggregated with replication on 2 hosts (the prompt stage on host-0, the token stage on host-1): the token
    stage's replica is fed from its swap pool, whose joined rows [0, end) its first step wrote; host-1 lost whole
    (swap and receive pools with it), the token stage comes back on the spare host restored from the replica."""
    outs, refs, st, _ = swap_run(model_factory("llama"), (*DISAGG, "--hosts", "2", "--spare-hosts", "1",
                                                          "--replicate", "on"), kill_hosts("host-1"))
    assert outs == refs
    (rec,) = st["recoveries"]
    assert (rec["stage"], rec["host"], rec["source"]) == (1, "host-2", "replica"), rec
    assert rec["restored_bytes"] > 0 and rec["tokens_replayed"] < rec["tokens_recompute"], rec


def test_a_restarted_streamer_loses_the_receive_pool_and_the_token_stage_recomputes_exactly(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Disaggregated: kill -9 of the streamer holding the token stage's swap and receive pools. Serving pauses until
    it is back; the pools are allocated anew and every microbatch is recomputed once (requests that had joined lose
    their prompt's rows with the receive pool). Every output exact, and later requests too."""
    later = workload(211, n=4)
    after: list[list[int]] = []
    path = model_factory("llama")
    outs, refs, st, logs = swap_run(path, (*DISAGG, "--replicate", "off"), kill_streamer_then(later, after),
                                    recoveries=0)
    assert outs == refs and [list(a) for a in after] == reference(path, later)
    assert "swap pool swap-stage-1 and receive pool recv-stage-1 allocated anew" in logs


def randomized_kills(path, seed: int, count: int, args: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """`count` kill -9s of a random stage at random moments (a prompt pass, a swap-in, a write-back, a request's
    first step after joining: whatever runs then), each once the previous one's recovery was reported; 16 requests.
    Every output exact."""
    import random

    rng = random.Random(seed)
    reqs = workload(211, n=16)
    dep = start_deployment(path, 2, *ARGS, "--replicate", "off", "--max-restarts", "30", *args)
    moments = sorted(rng.randint(30, 420) for _ in range(count))
    done: list[str] = []

    async def scenario() -> tuple[list[list[int]], dict[str, Any]]:
        progress = Progress()
        async with AsyncClient(dep.address, timeout=120) as c:
            async def inject() -> None:
                for k, at in enumerate(moments):
                    await progress.reach(at)
                    if k:
                        await until(c, lambda s, k=k: len(s["recoveries"]) >= k and s["state"] == "serving", 60,
                                    f"recovery {k}")
                    done.append(await kill_stage(rng.randrange(2))(c))

            injector = asyncio.create_task(inject())
            outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
            await asyncio.wait_for(injector, 120)
            return outs, await c.status()

    try:
        outs, st = asyncio.run(scenario())
    finally:
        assert dep.stop() == 0
    assert outs == reference(path, reqs), done
    # every kill of a swapping stage came back from its swap pool, replaying fewer positions than a recompute (a
    # kill just after a prompt pass, before its write-back landed, rightly replays that prompt); disaggregated, a
    # prompt stage swaps nothing (its KV lives for one pass)
    swapping = [r for r in st["recoveries"] if not (args and r["stage"] == 0)]
    assert [r["source"] for r in swapping] == ["swap"] * len(swapping), (done, st["recoveries"])
    assert all(r["tokens_replayed"] < r["tokens_recompute"] for r in swapping), st["recoveries"]
    assert len(st["recoveries"]) == count


@pytest.mark.slow  # ~14 s; the default suite keeps the deterministic kill of a swapping stage (above)
def test_random_kills_of_swapping_stages_are_exact(model_factory) -> None:  # type: ignore[no-untyped-def]
    randomized_kills(model_factory("llama"), seed=3, count=2)


@pytest.mark.slow  # ~16 s; the default suite keeps the deterministic kill of a swapping token stage (above)
def test_random_kills_with_disaggregation_are_exact(model_factory) -> None:  # type: ignore[no-untyped-def]
    randomized_kills(model_factory("llama"), seed=5, count=3, args=DISAGG)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [21, 22, 23, 24])
def test_long_random_kills_of_swapping_stages_are_exact(model_factory, seed: int) -> None:  # type: ignore[no-untyped-def]
    randomized_kills(model_factory("llama"), seed=seed, count=4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [31, 32, 33, 34])
def test_long_random_kills_with_disaggregation_are_exact(model_factory, seed: int) -> None:  # type: ignore[no-untyped-def]
    randomized_kills(model_factory("llama"), seed=seed, count=4, args=DISAGG)
