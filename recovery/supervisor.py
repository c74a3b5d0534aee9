"""Supervision policy, as pure data: child states and the restart-intensity limit (Erlang/OTP style:
at most `max_restarts` restarts within `window` seconds, else the deployment shuts down with an error)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

STARTING, READY, SERVING, RESTARTING, FAILED, STOPPED = (
    "starting", "ready", "serving", "restarting", "failed", "stopped"
)


class RestartIntensity:
    def __init__(self, max_restarts: int, window: float) -> None:
        self.max_restarts, self.window = max_restarts, window
        self.times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Record a restart at `now` if the limit allows it; False means: give up."""
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        if len(self.times) >= self.max_restarts:
            return False
        self.times.append(now)
        return True


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
