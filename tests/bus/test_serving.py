"""The running system, through real processes: outputs equal Hugging Face greedy for 1, 2 and 4 stages
with >= 32 concurrent requests of mixed lengths, for a Llama-family and an OPT model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from bus.client import AsyncClient
from tests.conftest import start_deployment
from tests.tiny_models import load_hf

N_REQUESTS = 36


def workload(vocab: int, seed: int = 5) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(N_REQUESTS):
        n = 1 + (i * 7) % 40
        out.append((torch.randint(3, vocab, (n,), generator=g).tolist(), 4 + (i * 5) % 20))
    return out


def hf_greedy(path, work):  # type: ignore[no-untyped-def]
    hf = load_hf(path)
    refs = []
    for prompt, new in work:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        refs.append(out[0, len(prompt) :].tolist())
    return refs


async def run_all(address: str, work: list[tuple[list[int], int]]):  # type: ignore[no-untyped-def]
    async with AsyncClient(address, timeout=120) as c:
        return await asyncio.gather(*(c.generate(prompt_token_ids=p, max_new_tokens=n) for p, n in work))


async def run_all_then_status(address: str, work: list[tuple[list[int], int]]):  # type: ignore[no-untyped-def]
    """run_all's results, and the deployment's status() once they are in."""
    results = await run_all(address, work)
    async with AsyncClient(address, timeout=60) as c:
        return results, await c.status()


@pytest.mark.parametrize("family,stages", [("llama", 1), ("llama", 2), ("llama", 4), ("opt", 1), ("opt", 2),
                                           ("opt", 4)])
def test_served_outputs_equal_hf_greedy(family: str, stages: int, model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory(family)
    from stages.models import load_spec

    work = workload(load_spec(path)[1].vocab_size)
    refs = hf_greedy(path, work)
    dep = start_deployment(path, stages, "--microbatch-size", "4", "--max-seq-len", "96")
    try:
        results = asyncio.run(run_all(dep.address, work))
    finally:
        assert dep.stop() == 0
    for (prompt, _), res, ref in zip(work, results, refs):
        assert list(res.token_ids) == ref, f"prompt of {len(prompt)} tokens"
        assert res.finish_reason in ("length", "stop")


def test_a_heavy_lm_head_leaves_its_stage_fewer_layers_and_outputs_exact(model_factory) -> None:  # type: ignore[no-untyped-def]
    """--layer-split balanced (the default): the LM head of this model weighs ~8 layers, so of 2 stages the last
    holds 1 layer of 4 (status' sizing and the agent say so), and every output still equals Hugging Face's."""
    path = model_factory("llama_bighead")
    from stages.models import load_spec

    work = workload(load_spec(path)[1].vocab_size)[:12]
    refs = hf_greedy(path, work)
    dep = start_deployment(path, 2, "--microbatch-size", "4", "--max-seq-len", "96", "--log-level", "INFO")
    try:
        results, st = asyncio.run(run_all_then_status(dep.address, work))
        logs = dep.logs()
    finally:
        assert dep.stop() == 0
    assert [list(r.token_ids) for r in results] == refs
    assert "layers by stage 0-2 | 3-3 (--layer-split balanced" in st["sizing"]
    assert "starting stage 0 (layers [0, 3])" in logs and "starting stage 1 (layers [3, 4])" in logs
