"""Memory-sized slots on GPUs (issue 20): `--microbatch-size auto` measures each stage's GPU and gives a tiny
model far more than the old fixed 8 per microbatch; the split adds up under each stage's budget, the
deployment serves exactly (HF greedy) at that size, and a stage's measured memory stays within its budget."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from bus.client import AsyncClient
from tests.bus.test_serving import hf_greedy, run_all_then_status, workload
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
        results, st = asyncio.run(run_all_then_status(dep.address, work))
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


def test_auto_survives_its_largest_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An OPT-1.3B-shaped model (random weights, float16) sized by auto at --max-seq-len 2048, then its worst
    step: every slot of the microbatch feeds a prompt of nearly 2048 tokens at once. It must run (the plan
    reserved that step's activations) and the GPU's memory stay under the fraction."""
    import json
    import subprocess
    import threading

    path = tmp_path / "opt-1.3b"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 50272, "max_position_embeddings": 2048,
        "do_layer_norm_before": True, "activation_function": "relu", "word_embed_proj_dim": 2048, "hidden_size": 2048,
        "num_hidden_layers": 24, "num_attention_heads": 32, "ffn_dim": 8192, "bos_token_id": 2, "eos_token_id": 2,
        "dejavu_random_weights": {"seed": 0, "std": 0.02}}))
    dep = start_deployment(path, 1, "--device", "cuda", "--dtype", "float16", "--max-seq-len", "2048")
    peak, done, at_peak = [0], threading.Event(), [""]

    def sample() -> None:  # the GPU's used memory, as the driver counts it (every process, the context included)
        while not done.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                                  "0"], capture_output=True, text=True)
            if out.returncode == 0 and int(out.stdout.split()[0]) << 20 > peak[0]:
                peak[0] = int(out.stdout.split()[0]) << 20
                apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                                       "--format=csv,noheader", "-i", "0"], capture_output=True, text=True)
                at_peak[0] = apps.stdout.strip().replace("\n", "; ")  # whose memory it is, when a peak is exceeded

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        async def scenario():  # type: ignore[no-untyped-def]
            async with AsyncClient(dep.address, timeout=600) as c:
                st = await c.status()
                b = st["microbatch_size"]
                work = [[3 + (i * 7 + j) % 50000 for j in range(2040)] for i in range(b)]
                res = await asyncio.gather(*(c.generate(prompt_token_ids=p, max_new_tokens=4) for p in work))
                return st, res

        st, results = asyncio.run(scenario())
    finally:
        done.set()
        sampler.join()
        assert dep.stop() == 0
    m = st["memory"][0]
    print(f"microbatch {st['microbatch_size']}; plan {json.dumps(m)}; peak used {peak[0] / 2**30:.2f} GiB "
          f"({at_peak[0]})")
    print("\n".join(line for line in dep.logs().splitlines() if "[startup]" in line or "[memory]" in line))
    assert st["microbatch_size"] > 8 and all(len(r.token_ids) == 4 for r in results)
    assert peak[0] <= 0.9 * m["total"] + 2**30  # nvidia-smi's MiB rounding and its own context: a little slack
