"""Who gets in: the front's bounded queue, drain, and the deployment's health, decided before any work.

Pure (no sockets): the process shell feeds it the controller's status and the drain; the handlers ask `refusal()`
and hold a place while they run. At most slots + max_queue requests are in flight at once: the deployment runs
`slots` of them, the rest wait in its queue; one more is refused at once (429) - a queue without a bound only
turns overload into timeouts. While draining (SIGTERM, Shutdown) or while the deployment is degraded (a stage
has no host to run on) or stopping, new requests get 503; the ones in flight go on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bus.front.errors import ApiError, overloaded, unavailable

REFUSING_STATES = {"degraded": "a stage has no host to run on until a host joins",
                   "stopping": "the deployment is stopping"}


class Admission:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.in_flight = 0
        self.slots = 0  # from the deployment's status (0 until the first answer)
        self.state = "starting"  # the deployment's: starting | serving | degraded | stopping
        self.reachable = False  # the last status poll was answered
        self.draining = ""  # why the front stops admitting ("" = it does not)
        self.idle = asyncio.Event()  # nothing in flight
        self.idle.set()

    @property
    def limit(self) -> int:
        return self.slots + self.max_queue

    def update(self, status: dict[str, Any] | None) -> None:
        """The latest status poll: its answer, or None when the controller did not answer in time."""
        self.reachable = status is not None
        if status is not None:
            self.slots = int(status.get("slots", 0))
            self.state = str(status.get("state", "")) or "serving"

    def refusal(self, wanted: int = 1, held: int = 0) -> ApiError | None:
        """Why `wanted` places (a request's choices) cannot be had now, of which the asker holds `held` already;
        None: they can."""
        if self.draining:
            return unavailable(f"the server is draining ({self.draining}): it takes no new requests", "draining")
        why = REFUSING_STATES.get(self.state)
        if why is not None:
            return unavailable(f"the deployment is {self.state}: {why}; retry later", self.state)
        if self.in_flight - held + wanted > self.limit:
            also = f" for {wanted} more (n)" if wanted > 1 else ""
            return overloaded(f"{self.in_flight} requests in flight: {self.slots} slot(s) and a queue of "
                              f"{self.max_queue} (--max-queue) have no room{also}; retry later")
        return None

    @contextmanager
    def hold(self, places: int = 1) -> Iterator[None]:
        self.in_flight += places
        self.idle.clear()
        try:
            yield
        finally:
            self.in_flight -= places
            if self.in_flight == 0:
                self.idle.set()

    @property
    def ready(self) -> bool:
        return not self.draining and self.reachable and self.state == "serving"
