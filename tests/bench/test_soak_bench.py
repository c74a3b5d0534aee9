"""`dejavu-bench soak --quick` keeps working: a real deployment, rounds of clients, RSS of every process."""

from __future__ import annotations

import json

import pytest

from bench import soak_bench


@pytest.mark.slow  # a soak of the default model, ~20 s: with the slow runs (the default suite stays under 15 min)
def test_soak_quick(default_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    assert soak_bench.main(["--quick", "--model", str(default_model), "--clients", "20", "--idle", "0.5",
                            "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "soak_bench.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2, "idle"]
    assert all(r["tokens"] == 20 * 4 for r in report["rounds"][1:3])
    assert {"controller-0", "stage-0", "streamer-0", "supervisor-0"} <= set(report["summary"])
    assert report["summary"]["controller-0"]["last_round_mib"] > 0
    assert (tmp_path / "soak_bench.png").stat().st_size > 1000
