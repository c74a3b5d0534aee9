"""Supervision policy, as pure data: child states, each process's restart budget (Erlang/OTP style restart
intensity: at most `max_restarts` restarts within `window` seconds, else the deployment shuts down with an
error) and its back-off (the delay before each restart). The supervisor (recovery/proc.py) keeps one budget and
one back-off per process: a process that keeps failing exhausts its own budget, and failures of different
processes spread over time never add up."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

STARTING, SERVING, RESTARTING, FAILED, STOPPED = "starting", "serving", "restarting", "failed", "stopped"


class RestartIntensity:
    """One process's restart budget: at most `max_restarts` restarts within any `window` seconds."""

    def __init__(self, max_restarts: int, window: float) -> None:
        self.max_restarts, self.window = max_restarts, window
        self.times: deque[float] = deque()
        self.failures = 0  # as of the last `allow`: failures within the window, the one it decided on included

    def allow(self, now: float) -> bool:
        """Record a restart at `now` if the budget allows it; False means: give up."""
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        if len(self.times) >= self.max_restarts:
            self.failures = len(self.times) + 1
            return False
        self.times.append(now)
        self.failures = len(self.times)
        return True


class Backoff:
    """One process's delay before each restart: none for the first, then `base`, 2 x base, 4 x base ... up to
    `cap` for each further restart in a row; a restart counts as "in a row" unless the process, since it said
    Hello, stayed up for `reset_after` seconds (then the next restart is immediate again). `base` 0: never wait.

    Pure (the caller passes the clock): the supervisor calls `up(now)` at each Hello and `next_delay(now)` when
    the process died and will be restarted."""

    def __init__(self, base: float, cap: float, reset_after: float) -> None:
        if base < 0 or cap < base or reset_after <= 0:
            raise ValueError("need 0 <= restart_backoff <= restart_backoff_max and restart_backoff_reset > 0")
        self.base, self.cap, self.reset_after = base, cap, reset_after
        self.streak = 0  # restarts in a row (since the process last stayed up for reset_after)
        self.up_since: float | None = None  # its current incarnation's Hello (None: it has not said Hello)

    def up(self, now: float) -> None:
        """The process said Hello at `now`."""
        self.up_since = now

    def next_delay(self, now: float) -> float:
        """The process died at `now` and is to be restarted: seconds to wait before starting it."""
        if self.up_since is not None and now - self.up_since >= self.reset_after:
            self.streak = 0
        self.up_since = None
        delay = 0.0 if self.streak == 0 else min(self.cap, self.base * 2.0 ** min(self.streak - 1, 64))
        self.streak += 1
        return delay


@dataclass
class ChildState:
    name: str
    incarnation: int = 0
    pid: int = 0
    state: str = STARTING
    last_beat: float = 0.0
    busy_s: float = 0.0  # from the last heartbeat: how long the current step has been running
    restarts: int = 0
    exits: list[int] = field(default_factory=list)
