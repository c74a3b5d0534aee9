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
