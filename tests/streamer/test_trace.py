"""streamer/trace.py: the off-by-default step trace that bench/probe_remote.py merges across two streamers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from streamer import trace


def test_trace_records_steps_and_writes_them_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "DIR", str(tmp_path))
    monkeypatch.setattr(trace, "ON", True)
    trace.mark("open", 7, 3)
    trace.mark("acked", 7, 3, 0)
    trace.dump("h0")
    lines = (tmp_path / f"h0-{os.getpid()}.jsonl").read_text().splitlines()
    got = [json.loads(x) for x in lines]
    assert [(e, ids) for _, e, ids in got] == [("open", [7, 3]), ("acked", [7, 3, 0])]
    assert got[0][0] <= got[1][0]  # monotonic clock, shared by the processes of a host
    trace.dump("h0-again")  # nothing recorded since: no file
    assert not (tmp_path / f"h0-again-{os.getpid()}.jsonl").exists()


def test_trace_is_off_without_its_variable() -> None:
    assert trace.ON == bool(os.environ.get("DEJAVU_STREAMER_TRACE"))
