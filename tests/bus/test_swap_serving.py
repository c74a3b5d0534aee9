"""Microbatch swapping served through real processes (issue 20): with `--swap on`, each stage keeps 2 of its 6
microbatches in its own pool and the others in its streamer's swap pool; 24 concurrent requests equal Hugging Face
greedy, and status() says every stage swaps, why, and what moved. Disaggregated, the token stages swap: the prompt
stage pushes each prompt's KV into a token stage's receive pool, and the request's first step copies it into its
microbatch's frame (skipped, that step would compute on another request's rows)."""

from __future__ import annotations

import asyncio

import pytest

from tests.bus.test_serving import hf_greedy, run_all, workload
from tests.conftest import start_deployment
from tests.recovery.test_hosts import until

_REFS: dict[str, list[list[int]]] = {}  # HF greedy per model (the slowest part of these tests): computed once


def references(path, work):  # type: ignore[no-untyped-def]
    if str(path) not in _REFS:
        _REFS[str(path)] = hf_greedy(path, work)
    return _REFS[str(path)]


SWAP_ON = ("--swap", "on", "--microbatches", "6", "--microbatch-size", "4", "--max-seq-len", "96", "--log-level",
           "INFO")


async def serve(address: str, work):  # type: ignore[no-untyped-def]
    """Every request's result, and the status once every stage reported its swap figures (with its heartbeat)."""
    from bus.client import AsyncClient

    results = await run_all(address, work)
    async with AsyncClient(address) as c:
        # a report made after the last result: on a GPU the whole run can fit between two heartbeats, and a
        # report from its middle (write-backs done, no swap-in yet) read bytes_in 0 (seen on an H100)
        before = {p["index"]: p["uptime_s"] for p in (await c.status())["processes"] if p["role"] == "stage"}
        return results, await until(c, lambda s: all(
            p.get("swap") and (p["swap"]["bytes_out"] > 0 or not p["swap"]["on"]) and p["uptime_s"] > before[p["index"]]
            for p in s["processes"] if p["role"] == "stage"), 10, "every stage's swap figures, reported after the run")


@pytest.mark.parametrize("stages", [1, 2])
def test_swapped_microbatches_serve_hf_greedy(stages: int, model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    from stages.models import load_spec

    work = workload(load_spec(path)[1].vocab_size)[:24]
    refs = references(path, work)
    dep = start_deployment(path, stages, *SWAP_ON)

    try:
        results, st = asyncio.run(serve(dep.address, work))
        logs = dep.logs()
    finally:
        assert dep.stop() == 0
    for (prompt, _), res, ref in zip(work, results, refs):
        assert list(res.token_ids) == ref, f"prompt of {len(prompt)} tokens"
    swaps = [p["swap"] for p in st["processes"] if p["role"] == "stage"]
    assert len(swaps) == stages and all(s["on"] and s["mode"] == "on" and s["frames"] == 2 for s in swaps), swaps
    assert all(s["bytes_in"] > 0 and s["bytes_out"] > 0 and s["failures"] == 0 for s in swaps), swaps
    assert st["slots"] == 24
    assert "[swap] stage 0: swapping on (--swap on: 2 of 6 microbatches resident" in logs


@pytest.mark.parametrize("token_stages", [1, 2])
def test_swapping_token_stages_serve_hf_greedy(token_stages: int, model_factory) -> None:  # type: ignore[no-untyped-def]
    """`--prompt-stages 1 --token-stages N --swap on`: 6 token microbatches, 2 resident per token stage; prompts of
    1-40 tokens land in the receive pools by logical slot. Outputs equal HF greedy; the token stages swapped in
    (from the swap pool and the receive pool), the prompt stage does not swap."""
    path = model_factory("llama")
    from bus.client import AsyncClient
    from stages.models import load_spec

    work = workload(load_spec(path)[1].vocab_size)[:24]
    refs = references(path, work)
    dep = start_deployment(path, 1 + token_stages, "--prompt-stages", "1", "--token-stages", str(token_stages),
                           *SWAP_ON)

    async def scenario():  # type: ignore[no-untyped-def]
        results = await run_all(dep.address, work)
        async with AsyncClient(dep.address) as c:
            return results, await until(c, lambda s: all(
                p.get("swap") and p["swap"]["bytes_out"] > 0 for p in s["processes"]
                if p["role"] == "stage" and p["pipeline"] == "token"), 10, "every token stage's swap figures")

    try:
        results, st = asyncio.run(scenario())
        logs = dep.logs()
    finally:
        assert dep.stop() == 0
    for (prompt, _), res, ref in zip(work, results, refs):
        assert list(res.token_ids) == ref, f"prompt of {len(prompt)} tokens"
    stages = [p for p in st["processes"] if p["role"] == "stage"]
    assert [p["pipeline"] for p in stages] == ["prompt"] + ["token"] * token_stages
    assert not (stages[0].get("swap") or {}).get("on")
    swaps = [p["swap"] for p in stages[1:]]
    assert all(s["on"] and s["frames"] == 2 and s["swap_ins"] > 0 and s["bytes_in"] > 0 and s["failures"] == 0
               for s in swaps), swaps
    assert st["slots"] == 24 and st["kv_streamed_bytes"] > 0
    for i in range(1, 1 + token_stages):
        assert f"[swap] receive pool recv-stage-{i} allocated" in logs


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_cuda_swapping_serves_hf_greedy(mode: str, model_factory) -> None:  # type: ignore[no-untyped-def]
    """On a GPU the swap pool is pinned host memory and the frames a CUDA IPC pool; `on` serves exactly. `auto`
    measures: a tiny model's 6 microbatches all fit in the GPU's free memory, so it decides off and says why."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from stages.models import load_spec

    path = model_factory("llama")
    work = workload(load_spec(path)[1].vocab_size)[:24]
    refs = references(path, work)
    dep = start_deployment(path, 1, "--device", "cuda", *SWAP_ON[:1], mode, *SWAP_ON[2:])

    try:
        results, st = asyncio.run(serve(dep.address, work))
    finally:
        assert dep.stop() == 0
    mismatches = [i for i, (res, ref) in enumerate(zip(results, refs)) if list(res.token_ids) != ref]
    assert not mismatches, f"{len(mismatches)} of {len(refs)} differ: {mismatches[:5]}"
    (swap,) = [p["swap"] for p in st["processes"] if p["role"] == "stage"]
    if mode == "on":
        assert swap["on"] and swap["bytes_in"] > 0 and swap["failures"] == 0, swap
    else:
        assert not swap["on"] and "fit in device memory" in swap["reason"], swap
