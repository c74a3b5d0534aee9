"""The planner (recovery/planner.py, recovery/profiler.py) and the simulator (recovery/simulator.py): the paper's
formulas against hand-computed cases, parameter counts against the runtime's modules, `dejavu-plan` end to end on
a tiny random model profiled on this CPU, and the simulator against closed forms and the paper's condition."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.pipeline_bench import write_model
from bus.loadgen import PAPER_OUTPUT, PAPER_PROMPT, LengthDist
from recovery.plan_cli import main as plan_main
from recovery.planner import (
    Lengths,
    Memory,
    ModelFacts,
    PlanSettings,
    colocated_tokens_per_s,
    disaggregation_pays,
    embed_head_params,
    largest,
    layer_params,
    model_facts,
    paper_minimums,
    serve_command,
    token_stages_formula,
)
from recovery.simulator import Failure, LayerTimes, Request, SimConfig, poisson_workload, simulate

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------ the paper's closed forms, by hand


def test_the_split_formula_and_the_condition_by_hand() -> None:
    # D=8, N=100 steps of t=20 ms, Y=1 s, m=1: Dt = 8*100*0.02 / (1 + 2) = 16/3
    assert token_stages_formula(8, 100, 0.02, 1.0, 1.0) == pytest.approx(16 / 3)
    # m=1.5 slows the prompt side: Dt = 16 / (1.5 + 2)
    assert token_stages_formula(8, 100, 0.02, 1.0, 1.5) == pytest.approx(16 / 3.5)
    # Y/t = 50 > (8-1)/(8*(2-1)-1) = 1
    c = disaggregation_pays(1.0, 0.02, 8, 1.0)
    assert c == {"y_over_t": pytest.approx(50.0), "threshold": pytest.approx(1.0), "pays": True}
    # D=4, m=1.2: threshold 3/(4*0.8-1) = 3/2.2; Y/t = 1.3 is below it, 1.4 above
    assert disaggregation_pays(1.3, 1.0, 4, 1.2)["threshold"] == pytest.approx(3 / 2.2)
    assert not disaggregation_pays(1.3, 1.0, 4, 1.2)["pays"] and disaggregation_pays(1.4, 1.0, 4, 1.2)["pays"]
    # one machine, or a streaming slowdown that eats the gain: never
    assert disaggregation_pays(1000.0, 1.0, 1, 1.0) == {"y_over_t": 1000.0, "threshold": None, "pays": False}
    assert not disaggregation_pays(1000.0, 1.0, 4, 1.9)["pays"]


def test_the_memory_minimums_by_hand() -> None:
    # L=80, M=800, W0=16, C0=4, K0=2: a prompt machine holds floor(800/20)=40 layers -> Dp >= 2; a token machine
    # keeps 80*(4+2)=480 for the KV of all microbatches and holds floor(320/16)=20 layers -> Dt >= 4
    assert paper_minimums(80, 800, 16, 4, 2) == (2, 4)
    assert paper_minimums(80, 800, 16, 4, 4) == (2, 8)  # floor((800-640)/16) = 10 layers a machine -> 8
    assert paper_minimums(80, 800, 16, 4, 6) == (2, None)  # the KV alone fills a token machine
    assert paper_minimums(80, 15, 16, 4, 2) == (None, None)  # not one layer fits


def facts(layers: int = 8, layer_bytes: int = 1000) -> ModelFacts:
    """A model whose bytes are chosen by hand: no embedding/head reserve, no activations (hidden = ffn = 0),
    one byte of KV per token and layer."""
    return ModelFacts("opt", "OPTForCausalLM", layers, 0, 1, 1, 1, 0, 1, 0, "float32", layer_bytes, 0, 0, 1)


def test_microbatch_sizes_from_the_memory_model_by_hand() -> None:
    mem = Memory(facts(), Lengths(10, 6, 10, 6), device_bytes=10000, safety=0.9)  # budget 9,000
    assert mem.budget == 9000
    # colocated, 2 stages of 4 layers, 2 microbatches: 4*1000 + 4*2*(10b + 6b) = 4000 + 128b <= 9000 -> b = 39
    assert largest(lambda b: mem.colocated(2, b) <= mem.budget, 64) == 39
    # token side, 2 stages: 4000 + 4*2*16b = 4000 + 128b -> 39 (a receive slot is one of the token slots);
    # prompt side, 2 stages and so 3 prompt microbatches, slots of the longest sequence: 4000 + 4*3*16b -> 26
    assert largest(lambda b: mem.token_stage(2, b, 2) <= mem.budget, 64) == 39
    assert largest(lambda b: mem.prompt_stage(2, b) <= mem.budget, 64) == 26
    assert largest(lambda b: mem.colocated(1, b) <= mem.budget, 64) == 7  # 8*1000 + 8*1*16b <= 9000
    assert largest(lambda b: mem.colocated(1, b) <= mem.budget - 900, 64) == 0  # 8,100 > 8,000 + 128
    # without receive slots the search agrees with the paper's minimum (L divisible, no reserves)
    dp, dt = paper_minimums(8, mem.budget, 1000, mem.c0(24), mem.k0(24))
    assert dt == next(d for d in range(1, 9) if mem.token_stage(d, 24, 0) <= mem.budget)
    assert dp == next(d for d in range(1, 9) if mem.prompt_stage(d, 24) <= mem.budget)


CONFIGS: dict[str, dict[str, Any]] = {
    "llama-gqa": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 211, "hidden_size": 72,
                  "intermediate_size": 100, "num_hidden_layers": 3, "num_attention_heads": 6,
                  "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False},
    "qwen2-bias": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 197, "hidden_size": 48,
                   "intermediate_size": 88, "num_hidden_layers": 3, "num_attention_heads": 6,
                   "num_key_value_heads": 3, "tie_word_embeddings": True},
    "opt-proj": {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 199, "hidden_size": 64,
                 "ffn_dim": 120, "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 128,
                 "word_embed_proj_dim": 40, "do_layer_norm_before": False},
    "bloom": {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": 211, "hidden_size": 72,
              "n_layer": 3, "n_head": 6},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts_match_the_runtimes_modules(name: str, tmp_path: Path) -> None:
    import torch

    from stages.models import load_spec
    from stages.models.base import DecoderShard

    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    family, spec = load_spec(tmp_path)
    with torch.device("meta"):
        shard = DecoderShard(family, spec, range(0, spec.num_layers))

    def count(m: torch.nn.Module | None) -> int:
        return sum(p.numel() for p in m.parameters()) if m is not None else 0

    assert layer_params(spec) == count(shard.blocks[0]) == count(shard.blocks[1])
    assert embed_head_params(spec) == (count(shard.embed), count(shard.head))


def test_planning_and_simulating_import_no_torch() -> None:
    """recovery/ modules start without torch (tests/test_layering.py); only profiling imports it, when it runs."""
    code = ("import sys, recovery.plan_cli, recovery.planner, recovery.simulator, recovery.profiler; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------------------------ dejavu-plan end to end on the tiny model


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """`bin/dejavu-plan` as a user runs it: profiles the tiny OPT shape on this CPU and plans 4 GPUs."""
    root = tmp_path_factory.mktemp("plan")
    model = write_model("tiny", root)
    out = subprocess.run([sys.executable, str(ROOT / "bin" / "dejavu-plan"), "--model", str(model), "--gpus", "4",
                          "--prompt-len", "48", "--output-len", "8:24", "--memory-gib", "0.01", "--repeats", "3"],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("dejavu-plan: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    (root / "plan.json").write_text(out.stdout)
    return model, root / "plan.json", json.loads(out.stdout)


def test_the_planner_profiles_the_tiny_model_and_prints_a_valid_plan(tiny_plan: tuple[Path, Path, dict]) -> None:
    model, _, out = tiny_plan
    prof = out["profile"]
    assert prof["device"] == "cpu" and prof["layers_timed"] == 2 and prof["source"] == "measured"
    assert all(v >= 0 for v in prof["layer_times"].values())
    assert prof["layer_bytes_measured"] == out["model"]["layer_bytes"]  # the spec's count is the runtime's
    plan = out["plan"]
    if plan["mode"] == "disaggregated":
        assert plan["prompt_stages"] >= 1 and plan["token_stages"] >= 1
        assert plan["prompt_stages"] + plan["token_stages"] == 4
    else:
        assert plan["stages"] == 4 and plan["prompt_stages"] == plan["token_stages"] == 0
    assert 1 <= plan["microbatch_size"] <= 64 and plan["max_seq_len"] == 48 + 24
    assert plan["predicted_tokens_per_s"] > 0 and plan["model_tokens_per_s"] > 0
    cmd = plan["serve_command"]
    assert cmd[:3] == ["dejavu-serve", "--model", str(model)] and len(cmd) % 2 == 1
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert flags["--microbatch-size"] == str(plan["microbatch_size"]) and flags["--device"] == "cpu"
    assert all(v.isdigit() and int(v) >= 1 for k, v in flags.items() if k.endswith(("stages", "size", "len")))
    # every option considered carries both predictions; the plan is the best simulated one
    usable = [o for o in out["options"] if "infeasible" not in o]
    assert {o["mode"] for o in out["options"]} == {"colocated", "disaggregated"}
    assert all(o["model_tokens_per_s"] > 0 and o["simulated_tokens_per_s"] > 0 for o in usable)
    assert plan["predicted_tokens_per_s"] == max(o["simulated_tokens_per_s"] for o in usable)
    f = out["formula"]
    assert 0 < f["token_stages_real"] < 4 and f["prompt_pass_s"] > 0 and f["decode_step_s"] > 0
    assert isinstance(f["condition"]["pays"], bool)
    splits = [o["token_stages"] for o in usable if o["mode"] == "disaggregated"]
    assert splits and all(abs(dt - f["token_stages_real"]) < 3 for dt in splits)


def test_a_colocated_plans_command_is_one_dejavu_serve_accepts(tiny_plan: tuple[Path, Path, dict]) -> None:
    from recovery.serve_cli import parser

    plan = {"mode": "colocated", "stages": 3, "prompt_stages": 0, "token_stages": 0, "microbatch_size": 12,
            "max_seq_len": 1100}
    args = parser().parse_args(serve_command(plan, str(tiny_plan[0]), "cuda:0", "bfloat16")[1:])
    assert (args.stages, args.microbatch_size, args.max_seq_len, args.device, args.dtype) == (
        3, 12, 1100, "cuda", "bfloat16")
    disagg = serve_command({**plan, "mode": "disaggregated", "prompt_stages": 1, "token_stages": 2}, "M", "cpu",
                           "float32")
    assert disagg[3:7] == ["--prompt-stages", "1", "--token-stages", "2"]


def run_plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = plan_main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_impossible_settings_are_refused_in_one_line(tiny_plan: tuple[Path, Path, dict],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    model, saved, _ = tiny_plan
    base = ["--model", str(model), "--profile", str(saved)]
    for argv, words in [(["--gpus", "0"], "--gpus"),
                        (["--gpus", "2", "--prompt-len", "2000", "--output-len", "100"], "positions"),
                        (["--gpus", "2", "--memory-gib", "0.00001"], "does not fit"),
                        (["--gpus", "2", "--output-len", "5:3"], "bad length"),
                        (["--gpus", "2", "--profile", str(model / "config.json")], "layer_times")]:
        rc, out, err = run_plan(capsys, *base, *argv)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and words in err, (argv, err)
        assert err.startswith("dejavu-plan: error: ")
    rc, out, err = run_plan(capsys, "--model", str(model / "missing"), "--gpus", "2", "--profile", str(saved))
    assert rc == 2 and "config.json" in err


def test_one_gpu_falls_back_to_colocated_and_says_why(tiny_plan: tuple[Path, Path, dict],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, saved, _ = tiny_plan
    rc, out, err = run_plan(capsys, "--model", str(model), "--profile", str(saved), "--gpus", "1", "--memory-gib",
                            "0.01")
    assert rc == 0, err
    plan = json.loads(out)["plan"]
    assert plan["mode"] == "colocated" and plan["stages"] == 1
    assert any("at least 2 GPUs" in n for n in plan["notes"])
    # more GPUs than a deployment of 4 layers can use: the colocated pipeline takes 4, and says so
    rc, out, err = run_plan(capsys, "--model", str(model), "--profile", str(saved), "--gpus", "9", "--memory-gib",
                            "0.01")
    result = json.loads(out)
    assert rc == 0 and result["plan"]["mode"] == "colocated" and result["plan"]["stages"] == 4
    assert "5 GPU(s) left unused" in result["options"][0]["note"] and "8 GPUs" in result["plan"]["notes"][0]


def test_simulate_takes_the_printed_plan(tiny_plan: tuple[Path, Path, dict], capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    model, saved, out = tiny_plan
    rc, stdout, err = run_plan(capsys, "simulate", "--profile", str(saved), "--gpus", "8", "--rate", "400",
                               "--num-requests", "300", "--failure-at", "0.2", "--recovery", "recompute")
    assert rc == 0, err
    r = json.loads(stdout)
    per = out["plan"]["stages"]
    assert r["mode"] == out["plan"]["mode"] and r["replicas"] == 8 // per and r["completed"] == 300
    assert r["tokens_per_s"] > 0 and r["failures"][0]["recovery"] == "recompute"
    assert err.startswith("dejavu-plan simulate: ") and "tok/s" in err
    # a bare profile (no plan in it) with the model: the shape must be given
    (tmp_path / "profile.json").write_text(json.dumps(out["profile"]))
    bare = ["simulate", "--profile", str(tmp_path / "profile.json"), "--model", str(model), "--num-requests", "50"]
    rc, _, err = run_plan(capsys, *bare, "--mode", "disaggregated")
    assert rc == 2 and "--prompt-stages" in err
    rc, stdout, err = run_plan(capsys, *bare, "--mode", "disaggregated", "--prompt-stages", "1", "--token-stages", "2",
                               "--gpus", "7")
    r = json.loads(stdout)
    assert rc == 0 and (r["replicas"], r["unused_gpus"], r["completed"]) == (2, 1, 50)


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


def test_the_colocated_throughput_model_is_the_simulators_in_the_one_stage_case() -> None:
    t = times()
    ln = Lengths(200, 50, 200, 50)
    r = simulate(SimConfig("colocated", 4, t, 8, stages=1), poisson_workload(800, 0, LengthDist("fixed", 200),
                                                                             LengthDist("fixed", 50)))
    # with staggered slots the model's binomial mix of prompts per step is a mean-field view: within 10%
    assert colocated_tokens_per_s(t, 4, 1, 8, ln) == pytest.approx(r["steady_tokens_per_s"], rel=0.10)


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
        # prompt slots, as dejavu-serve keeps them: `slots` passes of 4 prompts, each held until it joins
        assert r["completed"] == 120 and r["receive_slots"]["slots"] == slots * 4
        assert r["receive_slots"]["max_in_use"] == slots * 4  # filled, never exceeded
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


def test_a_thousand_gpus_simulate_with_a_failure() -> None:
    """1,000 GPUs, 2,000 requests, a replica failing (how long it takes is the planner's business, not a test's:
    README quotes ~2 s on the 2-core box)."""
    t = LayerTimes(2e-4, 4e-6, 3e-4, 5e-6)
    reqs = poisson_workload(2000, 300.0, PAPER_PROMPT, PAPER_OUTPUT, seed=0)
    for cfg in (SimConfig("colocated", 80, t, 8, stages=8, replicas=125),
                SimConfig("disaggregated", 80, t, 8, prompt_stages=2, token_stages=6, replicas=125,
                          kv_bytes_per_token_layer=327680, link_gbps=100)):
        r = simulate(cfg, reqs, [Failure(3.0, replica=7)])
        assert r["gpus"] == 1000 and r["completed"] == 2000 and len(r["idle_fraction"]["per_stage"]) == 8


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
    assert math.isfinite(PlanSettings(2, 1).safety)


def test_the_simulator_and_the_planner_split_the_layers_as_the_deployment_does(model_factory) -> None:  # type: ignore[no-untyped-def]
    """--layer-split balanced: a head of ~8 layers' bytes leaves the last of 2 stages 1 layer of 4; the planner's
    facts weigh it as resolve() does, and a simulated pipeline split that way runs at its slower stage's pace - faster
    than the even split, whose last stage carries 2 layers and the head."""
    from recovery.sim_config import layer_split
    from recovery.sizing import resolve
    from recovery.specs import DeploymentConfig
    from stages.models.spec import read_spec

    path = model_factory("llama_bighead")
    spec = read_spec(path)
    facts = model_facts(spec, "float32")
    cfg, _ = resolve(DeploymentConfig(str(path), num_stages=2, microbatch_size=4), spec)
    assert facts.head_layers == cfg.head_layers
    assert layer_split(4, 2, facts.head_layers) == [p.layers[1] - p.layers[0] for p in cfg.stage_plan(4)] == [3, 1]
    assert layer_split(4, 2) == [2, 2]
    t = LayerTimes(0.0, 1e-6, 1e-3, 0.0, head_s=facts.head_layers * 1e-3)  # the head's time as its bytes say
    reqs = same(64, 8, 40)
    even = simulate(SimConfig("colocated", 4, t, 8, stages=2), reqs)
    balanced = simulate(SimConfig("colocated", 4, t, 8, stages=2, head_layers=facts.head_layers), reqs)
    slowest = (2 + facts.head_layers) / (1 + facts.head_layers)  # even's last stage over balanced's, in layers
    assert balanced["steady_tokens_per_s"] / even["steady_tokens_per_s"] == pytest.approx(slowest, rel=0.03)
    ln = Lengths(8, 40, 8, 40)  # (the closed form mixes prompt steps in, which the split helps less)
    assert colocated_tokens_per_s(t, 4, 2, 8, ln, facts.head_layers) > 1.05 * colocated_tokens_per_s(t, 4, 2, 8, ln)
