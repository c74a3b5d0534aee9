"""`dejavu-bench pipeline --quick` keeps working: a real 2-stage deployment, overhead run, two rates."""

from __future__ import annotations

import json

import pytest

from bus import pipeline_bench


def test_pipeline_bench_quick(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    assert pipeline_bench.main(["--quick", "--stages", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "pipeline_bench.json").read_text())
    (run,) = result["runs"]
    assert run["stages"] == 2 and run["baseline_step"]["median_s"] > 0
    assert set(run["overhead"]["stage_decode_step_s"]) == {"0", "1"}
    assert [r["rate"] for r in run["rates"]] == [4.0, 8.0]
    for r in run["rates"]:
        assert r["completed"] == r["requests"] and set(r["idle_fraction"]) == {"0", "1"}
        assert all(0.0 <= f <= 1.0 for f in r["idle_fraction"].values())
    assert (tmp_path / "pipeline_bench.png").stat().st_size > 1000
