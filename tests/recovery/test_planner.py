"""The simulator (recovery/simulator.py) against closed forms and the paper's condition; the planner's tests join
these when it lands."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bus.loadgen import PAPER_OUTPUT, PAPER_PROMPT, LengthDist
from recovery.simulator import Failure, LayerTimes, Request, SimConfig, poisson_workload, simulate


def token_stages_formula(gpus: int, n_steps: float, t: float, y: float, m: float) -> float:
    return gpus * n_steps * t / (m * y + n_steps * t)


def disaggregation_pays(y: float, t: float, gpus: int, m: float) -> dict[str, Any]:
    denominator = gpus * (2 - m) - 1
    return {"pays": denominator > 0 and y / t > (gpus - 1) / denominator}


# ------------------------------------------------------------------ the simulator


def times(prompt_per_token: float = 2e-5, decode_fixed: float = 1e-3, per_seq: float = 1e-5) -> LayerTimes:
    return LayerTimes(0.0, prompt_per_token, decode_fixed, per_seq)


def same(n: int, prompt: int, output: int) -> list[Request]:
    return [Request(0.0, prompt, output) for _ in range(n)]


def test_one_saturated_stage_matches_the_closed_form() -> None:
    """One stage, one microbatch of B, every request P + N tokens, all waiting: the slots turn over together,
    so every N steps are one prompt pass of B*P tokens and N-1 decode steps at batch B."""
    t = LayerTimes(1e-4, 1e-6, 1e-3, 1e-5, step_overhead_s=2e-4, head_s=3e-4)
    B, L, P, N = 4, 6, 100, 10
    r = simulate(SimConfig("colocated", L, t, B, stages=1, microbatches=1), same(10 * B, P, N))
    step_p = L * (1e-4 + 1e-6 * B * P) + 2e-4 + 3e-4
    step_d = L * (1e-3 + 1e-5 * B) + 2e-4 + 3e-4
    assert r["makespan_s"] == pytest.approx(10 * (step_p + (N - 1) * step_d), rel=1e-9)
    assert r["tokens_per_s"] == pytest.approx(B * N / (step_p + (N - 1) * step_d), rel=1e-9)
    assert r["idle_fraction"]["per_stage"]["0"] == pytest.approx(0.0, abs=1e-9)
    assert r["normalized_latency_s"]["p50"] > 0 and r["ttft_s"]["max"] == pytest.approx(10 * step_p + 9 * (
        N - 1) * step_d, rel=1e-9)  # the last wave's first token comes after nine full waves


def compare(prompt: int, D: int = 4, L: int = 8, B: int = 8, N: int = 100, m: float = 1.0) -> tuple[bool, float, float]:
    """(the paper's condition, disaggregated and colocated steady tokens/s) for D GPUs, the formula's split."""
    t = times()
    y, step = L * t.prompt(B * prompt), L * t.decode(B)
    dt = min(D - 1, max(1, round(token_stages_formula(D, N - 1, step, y, m))))
    reqs = same(60 * B, prompt, N)
    dis = simulate(SimConfig("disaggregated", L, t, B, prompt_stages=D - dt, token_stages=dt, stream_slowdown=m), reqs)
    col = simulate(SimConfig("colocated", L, t, B, stages=D), reqs)
    return disaggregation_pays(y, step, D, m)["pays"], dis["steady_tokens_per_s"], col["steady_tokens_per_s"]


def test_disaggregation_beats_colocated_when_prompts_are_long_and_not_when_short() -> None:
    # Y/t ~ 150: prompt passes stall the colocated pipeline's decodes (~30% idle, as measured on 4 H100s), while
    # 2 + 2 stages are within the rounding of a balanced split
    pays, dis, col = compare(prompt=1000)
    assert pays and dis > 1.15 * col, (dis, col)
    pays, dis, col = compare(prompt=2)  # Y/t ~ 0.3: the prompt stage idles, colocated decodes on every GPU
    assert not pays and dis < col, (dis, col)


def test_back_pressure_keeps_the_token_side_within_its_receive_slots() -> None:
    slow_decode = LayerTimes(0.0, 1e-6, 5e-3, 1e-4)  # prompts are cheap, the token side is the bottleneck
    reqs = same(120, 50, 20)
    out = {}
    for slots in (1, 3):
        cfg = SimConfig("disaggregated", 2, slow_decode, 4, prompt_stages=1, token_stages=1, recv_slots=slots,
                        kv_bytes_per_token_layer=4096, link_gbps=10)
        r = out[slots] = simulate(cfg, reqs)
        assert r["completed"] == 120 and r["receive_slots"]["slots"] == slots
        assert r["receive_slots"]["max_in_use"] == slots  # filled, never exceeded
        assert r["token_slots"]["max_in_use"] <= r["token_slots"]["slots"] == 4
        assert r["receive_slots"]["prompt_stall_s"] > 0  # the prompt stage waited for a slot
    # more slots let the prompt side run further ahead; the token side's rate is the same
    assert out[3]["receive_slots"]["prompt_stall_s"] < out[1]["receive_slots"]["prompt_stall_s"]
    assert out[3]["steady_tokens_per_s"] == pytest.approx(out[1]["steady_tokens_per_s"], rel=0.02)


def test_a_failure_lowers_throughput_and_a_replica_recovers_faster_than_recompute() -> None:
    t = LayerTimes(0.0, 1e-4, 2e-3, 1e-5)
    reqs = poisson_workload(200, 4.0, LengthDist("fixed", 600), LengthDist("uniform", 100, 300), seed=3)
    cfg = SimConfig("colocated", 4, t, 8, stages=2, kv_bytes_per_token_layer=32768)
    clean = simulate(cfg, reqs)
    f = {mode: simulate(cfg, reqs, [Failure(20.0, stage=1, detect_s=1.0, restart_s=2.0, recovery=mode)])
         for mode in ("replica", "recompute")}
    rep, rec = f["replica"], f["recompute"]
    assert clean["completed"] == rep["completed"] == rec["completed"] == 200
    assert clean["generated_tokens"] == rep["generated_tokens"] == rec["generated_tokens"]  # nothing lost
    assert clean["tokens_per_s"] > rep["tokens_per_s"] > rec["tokens_per_s"]
    assert rep["normalized_latency_s"]["p95"] < rec["normalized_latency_s"]["p95"]
    a, b = rep["failures"][0], rec["failures"][0]
    assert a["restore_s"] > 0 and a["recomputed_tokens"] == 0 and a["in_flight_requests"] > 0
    assert b["restore_s"] == 0 and b["recomputed_tokens"] > 0 and b["recomputed_requests"] == b["in_flight_requests"]
    assert b["recomputed_tokens"] >= 600 * b["in_flight_requests"]  # each its prompt and committed tokens
    assert a["resumed_at_s"] == pytest.approx(20.0 + 3.0 + a["restore_s"])


def test_disaggregated_failures_of_either_pipeline_finish_every_request() -> None:
    reqs = poisson_workload(150, 6.0, LengthDist("fixed", 400), LengthDist("uniform", 20, 120), seed=1)
    cfg = SimConfig("disaggregated", 4, times(), 4, prompt_stages=1, token_stages=2, kv_bytes_per_token_layer=4096,
                    link_gbps=40)
    clean = simulate(cfg, reqs)
    for pipeline, stage in (("prompt", 0), ("token", 1)):
        for mode in ("replica", "recompute"):
            r = simulate(cfg, reqs, [Failure(5.0, stage=stage, pipeline=pipeline, detect_s=0.5, restart_s=1.0,
                                             recovery=mode)])
            assert r["completed"] == 150 and r["generated_tokens"] == clean["generated_tokens"], (pipeline, mode)
            assert r["makespan_s"] >= clean["makespan_s"] and r["failures"][0]["pipeline"] == pipeline


def test_the_simulator_is_deterministic_for_a_seed() -> None:
    cfg = SimConfig("disaggregated", 8, times(), 8, prompt_stages=1, token_stages=3, kv_bytes_per_token_layer=2048,
                    link_gbps=10)

    def run(seed: int) -> dict[str, Any]:
        r = simulate(cfg, poisson_workload(300, 5.0, PAPER_PROMPT, PAPER_OUTPUT, seed), [Failure(10.0)])
        r.pop("wall_s")
        return r

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_a_thousand_gpus_simulate_in_seconds() -> None:
    t = LayerTimes(2e-4, 4e-6, 3e-4, 5e-6)
    reqs = poisson_workload(2000, 300.0, PAPER_PROMPT, PAPER_OUTPUT, seed=0)
    for cfg in (SimConfig("colocated", 80, t, 8, stages=8, replicas=125),
                SimConfig("disaggregated", 80, t, 8, prompt_stages=2, token_stages=6, replicas=125,
                          kv_bytes_per_token_layer=327680, link_gbps=100)):
        t0 = time.perf_counter()
        r = simulate(cfg, reqs, [Failure(3.0, replica=7)])
        wall = time.perf_counter() - t0
        assert r["gpus"] == 1000 and r["completed"] == 2000 and len(r["idle_fraction"]["per_stage"]) == 8
        assert wall < 10.0, f"{cfg.mode}: {wall:.1f} s"


def test_bad_simulator_settings_are_refused() -> None:
    for kwargs in ({"stages": 0}, {"stages": 9}, {"stages": 2, "stream_slowdown": 0.5}, {"stages": 2, "overlap": 2}):
        with pytest.raises(ValueError):
            SimConfig("colocated", 8, times(), 8, **kwargs)
    with pytest.raises(ValueError, match="prompt and token"):
        SimConfig("disaggregated", 8, times(), 8, prompt_stages=0, token_stages=2)
    with pytest.raises(ValueError, match="recovery"):
        Failure(1.0, recovery="pray")
    with pytest.raises(ValueError, match="stage 5"):
        simulate(SimConfig("colocated", 8, times(), 8, stages=2), same(2, 4, 4), [Failure(0.1, stage=5)])
    with pytest.raises(ValueError):
        LayerTimes(-1.0, 0.0, 1.0, 0.0)
