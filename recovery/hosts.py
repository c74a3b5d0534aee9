"""The hosts of a deployment and where its stages run: pure bookkeeping, no sockets (the cluster supervisor,
recovery/proc.py, owns one `HostTable` and acts on what it decides).

A host is one agent process (`dejavu-agent`, or a simulated host started by dejavu-serve) known by its host id
and its `boot` (a random number fixed for the agent process's life). Its states: `spare` (joined, holding no
stage), `up` (holding stages), `dead` (its lease ran out or its process exited: that boot is fenced for good -
whatever it says later is answered with Fenced). A host id keeps its slot across boots: slot k's processes are
`agent-k` and `streamer-k`.

Placement. Initially, once enough hosts joined, stages go to the first hosts by slot: on CPU in contiguous blocks
(a host's "cpu" device takes any number of stages), on GPUs one stage per device, filling each host's devices in
order (neighbouring stages share a host, so most activations stay inside one machine). When a host is lost its
stages move together to a spare host that can take them all, else one by one to a live host with a free device
(on CPU: the one holding fewest stages), else they stay unplaced - the deployment is degraded - until a host
joins. Each placement of a stage starts a new generation of its incarnation numbers (generation << 16; restarts
in place count up from there), so a stage's processes on a fenced host are always older than its new ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bus.messages import HostInfo, HostProcess

SPARE, UP, DEAD = "spare", "up", "dead"
GENERATION_SHIFT = 16  # incarnation = generation << 16 | restarts in place


@dataclass
class Host:
    host_id: str
    slot: int
    boot: int
    route: bytes
    address: str
    devices: list[str]
    pid: int = 0
    hostname: str = ""
    local: bool = False
    spare_wanted: bool = False
    state: str = SPARE
    since: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic)
    stages: dict[int, str] = field(default_factory=dict)  # stage index -> device
    processes: list[HostProcess] = field(default_factory=list)

    def free_devices(self) -> list[str]:
        if self.devices == ["cpu"]:
            return ["cpu"]
        return [d for d in self.devices if d not in self.stages.values()]

    def info(self, now: float) -> HostInfo:
        return HostInfo(self.host_id, self.state, self.address, self.pid, self.boot, list(self.devices),
                        sorted(self.stages), now - self.since, self.hostname)


class HostTable:
    def __init__(self, num_stages: int, max_hosts: int) -> None:
        self.num_stages, self.max_hosts = num_stages, max_hosts
        self.hosts: dict[str, Host] = {}  # host id -> its current (or last) boot
        self.slots: dict[str, int] = {}  # host id -> slot, for good
        self.fenced: set[tuple[str, int]] = set()
        self.generation: dict[int, int] = {}  # stage -> placements so far
        self.placed_once = False
        self.unplaced: list[int] = []

    # ------------------------------------------------------------------ membership

    def slot_for(self, host_id: str, wanted: int | None = None) -> int:
        if host_id in self.slots:
            return self.slots[host_id]
        used = set(self.slots.values())
        if wanted is not None and wanted not in used and 0 <= wanted < self.max_hosts:
            slot = wanted
        else:
            free = [s for s in range(self.max_hosts) if s not in used]
            if not free:
                raise ValueError(f"no host slot left for {host_id!r}: at most {self.max_hosts} hosts")
            slot = free[0]
        self.slots[host_id] = slot
        return slot

    def live(self) -> list[Host]:
        return sorted((h for h in self.hosts.values() if h.state != DEAD), key=lambda h: h.slot)

    def by_route(self, route: bytes) -> Host | None:
        for h in self.hosts.values():
            if h.route == route and h.state != DEAD:
                return h
        return None

    def current(self, host_id: str, boot: int) -> Host | None:
        h = self.hosts.get(host_id)
        return h if h is not None and h.boot == boot and h.state != DEAD else None

    def join(self, host: Host) -> None:
        self.hosts[host.host_id] = host

    def lose(self, host: Host) -> dict[int, str]:
        """Declare `host` dead and fence its boot; returns the stages it held (index -> device)."""
        host.state, host.since = DEAD, time.monotonic()
        self.fenced.add((host.host_id, host.boot))
        orphans, host.stages = dict(host.stages), {}
        return orphans

    def is_fenced(self, host_id: str, boot: int) -> bool:
        return (host_id, boot) in self.fenced

    # ------------------------------------------------------------------ placement

    def where(self, stage: int) -> Host | None:
        for h in self.hosts.values():
            if h.state != DEAD and stage in h.stages:
                return h
        return None

    def incarnation(self, stage: int) -> int:
        """The first incarnation of the stage's current placement."""
        return self.generation.get(stage, 0) << GENERATION_SHIFT

    def last_incarnation(self, stage: int) -> int:
        """The highest incarnation the stage's current placement can have reached."""
        return ((self.generation.get(stage, 0) + 1) << GENERATION_SHIFT) - 1

    def _assign(self, stage: int, host: Host, device: str) -> None:
        self.generation[stage] = self.generation.get(stage, -1) + 1
        host.stages[stage] = device
        if host.state == SPARE:
            host.state, host.since = UP, time.monotonic()

    def place_initial(self, wanted_hosts: int) -> list[Host] | str:
        """Place every stage once `wanted_hosts` hosts have joined (local hosts that asked to be spares count last).
        Returns the hosts that got stages, or why it cannot yet (a message: waiting for hosts or devices)."""
        candidates = [h for h in self.live() if not h.spare_wanted]
        if len(candidates) < wanted_hosts:
            return f"waiting for hosts: {len(candidates)} of {wanted_hosts} joined"
        active = candidates[:wanted_hosts]
        n = self.num_stages
        if all(h.devices == ["cpu"] for h in active):
            plan = [(active[i * len(active) // n], "cpu") for i in range(n)]
        else:
            pairs = [(h, d) for h in active for d in h.free_devices() if d != "cpu"]
            if len(pairs) < n:
                return f"waiting for devices: {n} stages need {n} GPUs, the joined hosts offer {len(pairs)}"
            plan = pairs[:n]
        for stage, (host, device) in enumerate(plan):
            self._assign(stage, host, device)
        self.placed_once = True
        return sorted({h.host_id: h for h, _ in plan}.values(), key=lambda h: h.slot)

    def place(self, orphans: dict[int, str]) -> dict[str, list[int]]:
        """Place stages that have no host (a lost host's, or those waiting): returns host id -> stages it got; what
        cannot be placed stays in `unplaced`."""
        todo = sorted(set(orphans) | set(self.unplaced))
        wants_gpu = any(d != "cpu" for d in orphans.values()) or any(h.devices != ["cpu"] for h in self.live())
        got: dict[str, list[int]] = {}
        for spare in (h for h in self.live() if h.state == SPARE):
            free = spare.free_devices()
            if free == ["cpu"] and not wants_gpu:
                devices = ["cpu"] * len(todo)
            elif len(free) >= len(todo) and "cpu" not in free:
                devices = free[: len(todo)]
            else:
                continue
            for stage, device in zip(todo, devices):
                self._assign(stage, spare, device)
            got[spare.host_id] = list(todo)
            todo = []
            break
        left = []
        for stage in todo:
            up = [h for h in self.live() if h.state == UP and h.free_devices()]
            if wants_gpu:
                up = [h for h in up if "cpu" not in h.free_devices()]
            if not up:
                left.append(stage)
                continue
            host = min(up, key=lambda h: (len(h.stages), h.slot))
            self._assign(stage, host, host.free_devices()[0])
            got.setdefault(host.host_id, []).append(stage)
        self.unplaced = left
        return got

    def infos(self) -> list[HostInfo]:
        now = time.monotonic()
        return [h.info(now) for h in sorted(self.hosts.values(), key=lambda h: h.slot)]
