"""`dejavu-bench failure --quick`: both settings on real deployments (tiny model, 2 simulated hosts), a stage
killed in each, the decode phase's queue-free cost figures beside the Poisson run's; JSON + PNG in --out."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from bench import failure_bench


@pytest.mark.slow  # two deployments, each with a decode phase, a fault-free run and a failure run: ~1-2 min
def test_quick_run_measures_both_settings(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "out"
    assert failure_bench.main(["--quick", "--quiet", "--cost-repeats", "1", "--out", str(out)]) == 0
    r = json.loads((out / "failure_bench.json").read_text())
    assert (out / "failure_bench.png").stat().st_size > 0
    for setting in ("off", "on"):
        run = r["runs"][setting]
        assert run["lost"] == 0 and run["fault_free"]["lost"] == 0
        d = run["decode_phase"]
        assert len(d["each"]) == 1 and d["tokens_per_s"] > 0 and d["tpot_s"] > 0 and d["stage_step_s"] > 0
        assert run["recovery"]["source"] == ("replica" if setting == "on" else "recompute")
        assert run["split"]["kill_to_first_token_s"] > 0
    cost = r["replication_cost"]
    assert cost["decode_tokens_per_s_on_over_off"] > 0 and cost["decode_tpot_on_over_off"] > 0
    assert isinstance(cost["decode_within_2pct"], bool)


def _run(setting: str, tps: list[float], inflation: list[float] | None) -> dict:  # type: ignore[type-arg]
    run = {"setting": setting, "decode_phase": {"tokens_per_s": sorted(tps)[len(tps) // 2],
                                                "each": [{"tokens_per_s": t, "tpot_s": 1 / t} for t in tps]}}
    if inflation is not None:
        run.update(fault_free={"tokens_per_s": sum(tps), "tpot_s": {"p50": 1 / sum(tps)}},
                   latency_inflation={"each": inflation})
    return run


def test_repeated_settings_are_pooled() -> None:
    """--settings off,on,off,on: the cost is the pooled medians of every decode phase per setting, with each
    alternated pair's ratio beside it; the inflation is the median of every in-flight request of a setting's
    runs; --cost-only runs (no kill) give the cost alone."""
    runs = {"off": _run("off", [100, 102, 98], [1.3, 1.1]), "on": _run("on", [99, 97, 101], [1.05]),
            "off-2": _run("off", [104, 100, 96], [1.2]), "on-2": _run("on", [95, 99, 103], [1.0, 1.02, 1.5])}
    got = failure_bench.compare(runs)
    cost = got["replication_cost"]
    assert cost["decode_tokens_per_s_on_over_off"] == pytest.approx(99 / 100)
    assert cost["decode_tpot_on_over_off"] == pytest.approx(100 / 99)
    assert cost["decode_within_2pct"] and cost["decode_phases"] == {"on": 6, "off": 6}
    assert cost["decode_tokens_per_s_on_over_off_each_pair"] == pytest.approx([99 / 100, 99 / 100])
    assert got["inflation_replica_vs_recompute"] == pytest.approx([1.035, 1.2])
    assert got["in_flight_at_kills"] == {"on": 4, "off": 3}
    only = failure_bench.compare({k: _run(r["setting"], [e["tokens_per_s"] for e in r["decode_phase"]["each"]], None)
                                  for k, r in runs.items()})
    assert set(only) == {"replication_cost"} and "tokens_per_s_on_over_off" not in only["replication_cost"]
    assert failure_bench.compare({"on": _run("on", [1.0], None)}) == {}
