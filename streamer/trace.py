"""Off-by-default event trace of the streamer's transfer paths, for finding where a transfer's wall time goes
across processes (bench/probe_remote.py). Set DEJAVU_STREAMER_TRACE=DIR in a streamer's environment: it records
(time.monotonic(), event, ids) at each step of a transfer and writes them to DIR/<name>-<pid>.jsonl when it
stops. The monotonic clock is shared by the processes of one host, so the files of two streamers merge into one
timeline. Callers test `ON` first, so a streamer without the variable pays one attribute read per step."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

DIR = os.environ.get("DEJAVU_STREAMER_TRACE", "")
ON = bool(DIR)
_events: list[tuple[float, str, tuple[Any, ...]]] = []


def mark(event: str, *ids: Any) -> None:
    _events.append((time.monotonic(), event, ids))


def dump(name: str) -> None:
    """Write what was recorded (the streamer's shutdown calls this)."""
    if not ON or not _events:
        return
    path = Path(DIR) / f"{name}-{os.getpid()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for t, event, ids in _events:
            f.write(json.dumps([t, event, list(ids)]) + "\n")
    _events.clear()
