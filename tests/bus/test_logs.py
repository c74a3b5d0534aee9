"""Rate-limited warnings: what peers send cannot flood a log."""

from __future__ import annotations

import logging

from bus.logs import Throttled


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_one_line_per_peer_and_kind_per_interval_then_the_count(caplog) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    noisy = Throttled(logging.getLogger("t"), interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t"):
        for i in range(1000):
            clock.t = i * 0.001
            noisy.warning("bad-frame", "peer-a", "dropped %d", i)
        noisy.warning("other", "peer-a", "another kind")  # its own budget
        clock.t = 10.5
        noisy.warning("bad-frame", "peer-a", "dropped %d", 1000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["dropped 0", "another kind", "dropped 1000 (and 999 more like it left out)"]


def test_many_peers_cannot_flood_either(caplog) -> None:  # type: ignore[no-untyped-def]
    """Every new connection is a new peer: a kind gets at most per_kind lines per interval whoever sends."""
    clock = Clock()
    noisy = Throttled(logging.getLogger("t"), interval_s=10.0, per_kind=3, clock=clock)
    with caplog.at_level(logging.WARNING, "t"):
        for i in range(500):
            noisy.warning("bad-frame", f"peer-{i}", "from %s", f"peer-{i}")
        clock.t = 11.0
        noisy.warning("bad-frame", "peer-x", "from %s", "peer-x")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["from peer-0", "from peer-1", "from peer-2", "from peer-x (and 497 more like it left out)"]
