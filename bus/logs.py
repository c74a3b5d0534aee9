"""Rate-limited warnings for what peers send: one line per (kind, peer) per interval, at most `per_kind` lines of
one kind per interval whatever the number of peers (each new connection is a new peer), and a count of the
lines left out with the next line that is logged. A reliability probe sent 70,000 malformed messages and got
63,000 log lines (10 MB) back; a socket anyone can reach must not let them fill a disk or drown the one line
that matters.

Pure (a clock is passed in for tests); used by every process's receive loops.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

DEFAULT_INTERVAL_S = 10.0
MAX_KEYS = 1024  # (kind, peer) pairs remembered; the least recently logged is forgotten first


class Throttled:
    def __init__(self, logger: logging.Logger, interval_s: float = DEFAULT_INTERVAL_S, per_kind: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval_s, self.per_kind, self.clock = logger, interval_s, per_kind, clock
        self._peers: OrderedDict[Hashable, float] = OrderedDict()  # (kind, peer) -> last logged
        self._kinds: dict[str, list[float]] = {}  # kind -> [interval start, lines in it, left out since a line]

    def warning(self, kind: str, peer: object, message: str, *args: object) -> None:
        """Log `message % args` unless this (kind, peer) was logged within the interval, or this kind has had
        `per_kind` lines in it; count it then, and say the count with the next line of this kind."""
        now = self.clock()
        k = self._kinds.setdefault(kind, [now, 0, 0])
        if now - k[0] >= self.interval_s:
            k[0], k[1] = now, 0
        last = self._peers.get((kind, peer))
        if (last is not None and now - last < self.interval_s) or k[1] >= self.per_kind:
            k[2] += 1
            return
        if k[2]:
            message += " (and %d more like it left out)"
            args = (*args, int(k[2]))
        self.logger.warning(message, *args)
        k[1] += 1
        k[2] = 0
        self._peers[(kind, peer)] = now
        self._peers.move_to_end((kind, peer))
        while len(self._peers) > MAX_KEYS:
            self._peers.popitem(last=False)


def peer_of(frames: list) -> str:  # type: ignore[type-arg]
    """A ROUTER message's sender for logs: its routing identity (the first frame), printable or hex."""
    if not frames:
        return "?"
    ident = bytes(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0])
    return ident.decode() if ident.isascii() and ident.decode().isprintable() else ident.hex()[:16]
