"""`dejavu-bench startup --quick`: one real launch of `dejavu-serve --model default` timed to its ready line and
from SIGINT to its exit, against `python -c "import torch"` measured in the same run; JSON + PNG in --out, no
temporary file or process left."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from bench import startup_bench
from recovery.launch import descendants


def _positive(x: object) -> bool:
    return isinstance(x, float) and x > 0


def test_quick_run_writes_json_and_plot(tmp_path: Path, default_model: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "out"
    before = descendants(os.getpid())  # other tests' processes, if any, are not this run's
    argv = ["--quick", "--warmup", "0", "--cache-dir", str(default_model.parent), "--out", str(out)]
    assert startup_bench.main(argv) == 0

    r = json.loads((out / "startup_bench.json").read_text())
    assert r["command"] == "bin/dejavu-bench startup " + " ".join(argv) and r["date"].startswith("20")
    m = r["machine"]
    assert m["cpu_count"] == os.cpu_count() and m["platform"] and m["python"] and m["torch"]
    assert r["settings"]["quick"] is True and r["settings"]["stages"] == [1] and r["settings"]["repeats"] == 1
    assert r["model_dir"] == str(default_model) and r["model_written_by_warmup"] is False and r["warmup"] == []
    assert r["target_s"] == 5.0
    f = r["floor"]
    assert "import torch" in f["command"] and len(f["samples_s"]) == 1
    assert _positive(f["median_s"]) and f["min_s"] <= f["median_s"] <= f["max_s"]
    (s,) = r["startup"]
    assert s["stages"] == 1 and "--model default --stages 1" in s["command"] and "ready tcp://" in s["ready_line"]
    assert s["processes"] >= 3  # supervisor, controller, a stage (and the streamer)
    for key in ("ready", "stop", "stop_all_processes"):
        assert len(s[key]["samples_s"]) == 1 and _positive(s[key]["median_s"]), key
    assert s["stop_all_processes"]["median_s"] >= s["stop"]["median_s"]
    assert s["ready_over_floor"] == pytest.approx(s["ready"]["median_s"] / f["median_s"])
    assert s["meets_target"] == (s["ready"]["median_s"] < 5.0)
    assert (out / "startup_bench.png").read_bytes().startswith(b"\x89PNG")

    assert list(scratch.iterdir()) == [], "temporary files left behind"
    assert descendants(os.getpid()) <= before, "processes left behind"


def test_defaults_and_quick() -> None:
    full = startup_bench.parse_args([])
    assert (full.stages, full.repeats, full.warmup, full.out) == ([1, 2], 5, 1, Path("dejavu-bench-results"))
    quick = startup_bench.parse_args(["--quick"])
    assert (quick.stages, quick.repeats) == ([1], 1)
    assert startup_bench.parse_args(["--quick", "--stages", "2,3"]).stages == [2, 3]
    with pytest.raises(SystemExit):
        startup_bench.parse_args(["--stages", "0"])
