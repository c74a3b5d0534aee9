"""DEJAVU_PROFILE_STEPS (stages/step_profiler.py): the stage profiles exactly the steps asked for and writes its
operator tables and a trace; a malformed setting profiles nothing."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.step_profiler import StepProfiler


def test_profiles_the_asked_steps_and_writes_tables_and_a_trace(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DEJAVU_PROFILE_STEPS", f"2,3,{tmp_path / 'prof'}")
    p = StepProfiler.from_env(4)
    assert p is not None
    a = torch.randn(64, 64)
    for step in range(8):
        p.before_step()
        assert (p.prof is not None) == (2 <= step < 5), step
        _ = a @ a
        p.after_step()
    assert p.done and p.prof is None
    table = (tmp_path / "prof" / "stage-4-profile.txt").read_text()
    assert "aten::mm" in table
    trace = json.loads((tmp_path / "prof" / "stage-4-trace.json").read_text())
    assert sum(1 for e in trace["traceEvents"] if e.get("name") == "aten::mm") == 3  # steps 2, 3 and 4


def test_no_setting_or_a_bad_one_profiles_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("DEJAVU_PROFILE_STEPS", raising=False)
    assert StepProfiler.from_env(0) is None
    monkeypatch.setenv("DEJAVU_PROFILE_STEPS", "five,2")
    assert StepProfiler.from_env(0) is None
