"""`dejavu-bench plan` (bench/plan_bench.py): a "measured" run that is itself a simulation of the tiny shape with a
known step overhead comes back at ratio 1 once calibrated from its decode-only TPOT, and too fast without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import plan_bench
from bus.loadgen import PAPER_OUTPUT, PAPER_PROMPT, parse_length
from recovery.simulator import LayerTimes, SimConfig, layer_split, loadgen_workload, simulate


def test_a_simulated_measurement_is_reproduced_once_calibrated(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    times = LayerTimes(1e-4, 2e-6, 5e-4, 2e-5, head_s=1e-4)
    overhead, S, B = 3e-4, 2, 4
    settings = {"microbatch_size": str(B), "prompt_len": "24", "output_len": "4:12", "vocab": "256", "dtype": "float32"}
    truth = LayerTimes(**{**vars(times), "step_overhead_s": overhead})
    rates = []
    for rate in (20.0, 60.0):
        reqs = loadgen_workload(30, rate, parse_length("24", PAPER_PROMPT), parse_length("4:12", PAPER_OUTPUT), 256)
        r = simulate(SimConfig("colocated", 4, truth, B, stages=S), reqs)
        r["idle_fraction"] = {k: v for k, v in r["idle_fraction"]["per_stage"].items()}  # as the pipeline bench
        rates.append({**r, "rate": rate, "requests": 30})
    tpot = sum(truth.stage_steps(layer_split(4, S), 0, B))  # every slot busy: a token per trip through the stages
    measured = {"shape": "tiny", "card": "cpu", "settings": settings,
                "runs": [{"stages": S, "hosts": 1, "baseline_step": {"median_s": 2 * times.decode(B)},
                          "overhead": {"tpot_median_s": tpot}, "rates": rates}]}
    (tmp_path / "measured.json").write_text(json.dumps(measured))
    (tmp_path / "profile.json").write_text(json.dumps({"tiny": {
        "prompt": [[24, times.prompt(24)], [96, times.prompt(96)]], "decode": [[1, times.decode(1)], [B, times.decode(B)]],
        "head_s": times.head_s, "card": "cpu"}}))
    assert plan_bench.main(["--measured", str(tmp_path / "measured.json"), "--profile", str(tmp_path / "profile.json"),
                            "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "plan_bench.json").read_text())
    (run,) = result["runs"]
    assert run["calibration"]["step_overhead_s"] == pytest.approx(overhead)
    assert run["profile_vs_measured_runtime"]["ratio"] == pytest.approx(1.0)
    for row in run["rates"]:
        c, u = row["calibrated"], row["uncalibrated"]
        assert c["within_15pct"] and c["tokens_per_s"]["ratio"] == pytest.approx(1.0)
        assert c["normalized_latency_p50_s"]["ratio"] == pytest.approx(1.0)
        assert u["tokens_per_s"]["ratio"] > 1.0  # compute alone is faster than the deployment
    assert result["all_within_15pct"]["calibrated"] and (tmp_path / "out" / "plan_bench.png").stat().st_size > 0
