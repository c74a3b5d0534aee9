"""Memory-sized slots on GPUs (issue 20): `--microbatch-size auto` measures each stage's GPU and gives a tiny
model far more than the old fixed 8 per microbatch; the split adds up under each stage's budget, the
deployment serves exactly (HF greedy) at that size, and a stage's measured memory stays within its budget."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from bus.client import AsyncClient
from tests.bus.test_serving import hf_greedy, run_all, workload
from tests.conftest import start_deployment

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stages", [1, 2])
def test_auto_on_the_gpu_sizes_from_its_memory(stages: int, model_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if torch.cuda.device_count() < stages:
        pytest.skip(f"needs {stages} GPUs")
    from stages.models import load_spec

    path = model_factory("llama")
    work = workload(load_spec(path)[1].vocab_size)
    refs = hf_greedy(path, work)
    logs = tmp_path / "logs"
    dep = start_deployment(path, stages, "--device", "cuda", "--max-seq-len", "256", "--log-dir", str(logs))
    try:
        results = asyncio.run(run_all(dep.address, work))

        async def status():  # type: ignore[no-untyped-def]
            async with AsyncClient(dep.address, timeout=60) as c:
                return await c.status()

        st = asyncio.run(status())
    finally:
        assert dep.stop() == 0
    mismatches = [i for i, (res, ref) in enumerate(zip(results, refs)) if list(res.token_ids) != ref]
    assert not mismatches, f"{len(mismatches)} of {len(refs)} differ: {mismatches[:5]}"
    b = st["microbatch_size"]
    assert b > 8 and st["slots"] == stages * b and "auto" in st["sizing"]
    assert [m["stage"] for m in st["memory"]] == list(range(stages))
    for m in st["memory"]:
        assert m["device"] == f"cuda:{m['stage']}" and m["slots"] == stages * b and m["fits"] >= b
        assert m["margin"] == round(0.1 * m["total"]) and m["budget"] == m["free"] - m["margin"]
        used = m["weights"] + m["activations"] + m["graphs"] + m["slots"] * m["kv_per_slot"]
        assert 0 < used <= m["budget"] < m["total"]
        # what the stage measured once its weights and KV pool were allocated is within what was planned for them
        line = next(x for x in (logs / f"stage-{m['stage']}.log").read_text().splitlines() if "memory on cuda" in x)
        allocated = float(re.search(r"([0-9.]+) GiB allocated", line).group(1)) * 2**30
        assert allocated <= m["weights"] + m["slots"] * m["kv_per_slot"] + 2**20 * 64, line
