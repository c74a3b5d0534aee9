"""`dejavu-bench disagg` (bench/disagg_bench.py, bench/disagg_summary.py): its arguments, which splits fit, the
summary's arithmetic on made-up sweeps, and one short real run (colocated and 1/1 on the tiny model, CPU)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from bench import disagg_bench, disagg_summary
from bench.pipeline_bench import write_model
from bus.loadgen import PAPER_OUTPUT, PAPER_PROMPT
from recovery.planner import lengths_of, model_facts
from stages.models.spec import read_spec


def test_splits_default_to_every_split_of_the_devices_and_bad_ones_are_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    assert disagg_bench.splits_arg("all", 2) == [(1, 1)]
    assert disagg_bench.splits_arg("all", 4) == [(1, 3), (2, 2), (3, 1)]
    assert disagg_bench.splits_arg("2/2,3/1", 4) == [(2, 2), (3, 1)]
    for bad in ("2/1", "0/4", "a/b", "4"):
        with pytest.raises(ValueError, match="DP/DT"):
            disagg_bench.splits_arg(bad, 4)
    args = disagg_bench.parser().parse_args([])
    assert (args.devices, args.splits, args.shape, args.plan, args.latency_bound) == (2, "all", "opt-13b", None, None)
    for argv, why in ((["--devices", "1"], "--devices must be 2"), (["--splits", "1/2"], "DP + DT = 2")):
        with pytest.raises(SystemExit) as e:  # refused before anything starts
            disagg_bench.main(argv)
        assert e.value.code == 2 and why in capsys.readouterr().err


def plan_of(shape: str, root: Path, gib: float) -> dict[str, Any]:
    """The parts of a dejavu-plan JSON that `fits` reads, for a shape on a device of `gib` GiB, paper workload."""
    facts = model_facts(read_spec(write_model(shape, root)), "bfloat16")
    ln = lengths_of(PAPER_PROMPT, PAPER_OUTPUT, facts.max_positions)
    return {"model": facts.to_json(), "workload": vars(ln), "memory": {"device_bytes": int(gib * 2**30), "safety": 0.9}}


def test_what_fits_on_80_and_140_gib(tmp_path: Path) -> None:
    """The GPU commands in bench/NOTES.md rest on this: OPT-13B 1/1 fits an H100, OPT-30B 1/1 only an H200; of
    OPT-66B on 4 GPUs only 2/2 (on H200s) - a lone prompt or token stage cannot hold its 64 layers."""
    def ok(shape: str, gib: float, devices: int) -> list[str]:
        plan = plan_of(shape, tmp_path, gib)
        return [s["name"] for s in (disagg_bench.setting(dp, devices - dp, devices) for dp in range(devices))
                if not disagg_bench.fits(s, plan, 8, 2048)]

    assert ok("opt-13b", 79.2, 2) == ["colocated", "1/1"]
    assert ok("opt-30b", 79.2, 2) == ["colocated"] and ok("opt-30b", 139.8, 2) == ["colocated", "1/1"]
    assert ok("opt-66b", 79.2, 4) == ["colocated"] and ok("opt-66b", 139.8, 4) == ["colocated", "2/2"]
    # the prompt stage of 1/3 holds (DP + 1) x 8 slots of 2,048 positions: the planner counts them as dejavu-serve
    # reserves them (the pools; the planner adds activations, dejavu-serve's figure the embedding or head)
    why = disagg_bench.fits(disagg_bench.setting(1, 3, 4), plan_of("opt-30b", tmp_path, 79.2), 8, 2048)
    assert "96.4 GiB by the planner's memory model and 98.4 GiB with dejavu-serve's pools" in why


def sweep_of(points: list[tuple[float, float | None, float | None]]) -> list[dict[str, Any]]:
    return [{"rate": r, "normalized_latency_s": {"p50": nl}, "tokens_per_s": tps} for r, nl, tps in points]


def test_throughput_at_a_latency_bound_is_interpolated_between_the_rates_around_the_crossing() -> None:
    rates = sweep_of([(1.0, 0.04, 100.0), (2.0, 0.05, 200.0), (4.0, 0.15, 300.0)])
    at = disagg_summary.at_latency(rates, 0.10)  # halfway from 0.05 to 0.15
    assert at["rate"] == pytest.approx(3.0) and at["tokens_per_s"] == pytest.approx(250.0)
    assert at["lower_bound"] is False and at["between_rates"] == [2.0, 4.0]
    never = disagg_summary.at_latency(rates, 0.5)  # never crossed: the highest rate, a lower bound
    assert (never["rate"], never["tokens_per_s"], never["lower_bound"]) == (4.0, 300.0, True)
    over = disagg_summary.at_latency(rates, 0.03)
    assert over["tokens_per_s"] is None and "lowest rate" in over["note"]
    lost = disagg_summary.at_latency(sweep_of([(1.0, 0.04, 100.0), (2.0, None, None)]), 0.1)  # nothing completed
    assert (lost["rate"], lost["lower_bound"]) == (1.0, True)
    # the default bound: 2x the slowest setting's p50 at its lowest rate, so every curve starts under it
    runs = [{"rates": rates}, {"rates": sweep_of([(1.0, 0.06, 100.0)])}]
    assert disagg_summary.default_bound(runs) == pytest.approx(0.12)


def made_up(name: str, points: list[tuple[float, float, float]]) -> dict[str, Any]:
    return {"name": name, "mode": "colocated" if name == "colocated" else "disaggregated", "rates": sweep_of(points)}


def test_summary_ratios_best_split_and_the_planners_pick() -> None:
    runs = [made_up("colocated", [(1.0, 0.05, 100.0), (2.0, 0.25, 150.0)]),
            made_up("1/3", [(1.0, 0.05, 100.0), (2.0, 0.15, 190.0)]),
            made_up("2/2", [(1.0, 0.04, 100.0), (2.0, 0.07, 200.0)]),
            made_up("3/1", [(1.0, 0.06, 100.0), (2.0, 0.30, 120.0)])]
    out = disagg_summary.summarize(runs, "1/3", bound=0.10)
    top = out["by_rate"][1]
    assert top["colocated_tokens_per_s"] == 150.0
    assert top["splits"]["2/2"]["tokens_per_s_ratio"] == pytest.approx(200 / 150)
    assert top["splits"]["3/1"]["normalized_latency_p50_ratio"] == pytest.approx(0.30 / 0.25)
    eq = out["equal_latency"]
    assert eq["bound_s"] == 0.10 and eq["bound_from"] == "--latency-bound" and "interpolated" in eq["method"]
    colocated = 100 + (0.10 - 0.05) / (0.25 - 0.05) * 50  # 112.5 tok/s at 1.25 req/s
    assert eq["settings"]["colocated"]["tokens_per_s"] == pytest.approx(colocated)
    assert eq["settings"]["2/2"]["lower_bound"] is True  # 0.07 at the highest rate: never crossed
    assert eq["settings"]["2/2"]["tokens_per_s_ratio_to_colocated"] == pytest.approx(200 / colocated)
    assert out["best_split"] == {"name": "2/2", "by": "tokens/s at equal normalized latency", "value": 200.0}
    one_three = 100 + 0.5 * 90  # 1/3 crosses 0.10 halfway: 145 tok/s, 0.725 of 2/2's
    assert out["planner"]["pick"] == "1/3" and out["planner"]["over_best"] == pytest.approx(one_three / 200)
    assert out["planner"]["within_10pct"] is False
    assert out["target"]["met"] is False and out["target"]["best_split_ratio_at_equal_latency"] == pytest.approx(
        200 / colocated)
    assert disagg_summary.summarize(runs, "2/2", bound=0.10)["planner"]["within_10pct"] is True
    assert disagg_summary.summarize(runs, None, bound=0.10)["planner"]["within_10pct"] is None


@pytest.mark.slow  # three deployments, ~17 s: with the slow runs (the default suite stays under 15 min)
def test_a_quick_run_measures_colocated_and_the_split_with_the_simulator_beside_them(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two real deployments of the tiny model on CPU (~30 s on 2 cores): one rate, few requests."""
    pytest.importorskip("matplotlib")
    scratch = tmp_path / "tmp"  # the run's temporary files (model config, deployment logs): removed at the end
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setitem(disagg_bench.QUICK, "rates", "16")
    monkeypatch.setitem(disagg_bench.QUICK, "num_requests", 8)
    assert disagg_bench.main(["--quick", "--quiet", "--out", str(tmp_path)]) == 0
    assert list(scratch.iterdir()) == [] and tempfile.tempdir == str(scratch)
    result = json.loads((tmp_path / "disagg_bench.json").read_text())
    assert result["partial"] is False and result["devices"] == 2 and result["card"] == "cpu"
    assert result["command"].startswith("bin/dejavu-bench disagg") and result["planner"]["pick"] == "1/1"
    colocated, split = result["runs"]
    assert (colocated["name"], split["name"], split["planner_pick"]) == ("colocated", "1/1", True)
    for s, pipelines in ((colocated, {"0": "colocated", "1": "colocated"}), (split, {"0": "prompt", "1": "token"})):
        (r,) = s["rates"]
        assert r["completed"] == r["requests"] == 8 and r["stage_pipeline"] == pipelines
        assert set(r["idle_fraction"]) == {"0", "1"} and r["restarts"] == {}
        (row,) = s["simulated"]["rates"]
        for k in ("calibrated", "uncalibrated"):
            assert row[k]["tokens_per_s"]["ratio"] > 0 and isinstance(row[k]["within_15pct"], bool)
    assert colocated["rates"][0]["kv"]["streamed_bytes"] == 0
    kv = split["rates"][0]["kv"]  # the accounting: every prompt token's K and V of every layer, once
    assert kv["streamed_bytes"] == kv["expected_bytes"] == kv["per_prompt_stage_bytes"]["0"] > 0
    assert split["rates"][0]["receive_waits"] >= 0 and "receive_slots_simulated" in row["calibrated"]
    summary = result["summary"]
    assert set(summary["by_rate"][0]["splits"]) == {"1/1"} and summary["best_split"]["name"] == "1/1"
    assert summary["planner"]["within_10pct"] is True
    assert (tmp_path / "disagg_bench.png").stat().st_size > 1000
    assert (tmp_path / "deployment-colocated.log").exists() and (tmp_path / "deployment-1p1t.log").exists()
