"""Hosts on separate networks: each host agent (`dejavu-agent`) runs in its own network namespace, joined to the
controller host (`dejavu-serve` in this test's namespace) by a veth pair on a bridge - the nearest thing to
separate machines on one. Cutting one host's link (`ip link set ... down`) while long requests stream: the
controller host declares it dead within the heartbeat timeout and moves its stage to the spare host, every
request finishes exactly as the fault-free run, and the cut-off agent fences itself (exit code 3, every process
of its host gone). With the link back, that host's agent starts again and rejoins as a spare. And a controller
host listening on every interface (`--agent-bind tcp://0.0.0.0:PORT`) is reached by the stages of other hosts.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN: `ip netns add`, bridges, veths); skipped where that is refused.
Every name this test makes carries its pid (namespaces dj-<pid>-<k>, links djv<pid>...), so parallel runs do
not collide, and leftovers of runs whose pid is gone are swept first. Everything is removed in a `finally`."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from bus import security
from bus.child import alive
from bus.client import AsyncClient
from recovery.agent import as_reached
from recovery.launch import ROOT, Deployment, descendants
from tests.conftest import start_deployment
from tests.recovery.test_hosts import hosts_of, until
from tests.recovery.test_recovery import MAX_SEQ, Progress, reference, stream_exactly, workload

AGENT = ROOT / "bin" / "dejavu-agent"
NS_RE = re.compile(r"^dj-(\d+)-\w+$")  # this test's namespaces: dj-<pid>-<host>, dj-<pid>-probe
LINK_RE = re.compile(r"^djv(\d+)[bh]\d*$")  # its bridge djv<pid>b and veth root ends djv<pid>h<host>
HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT = 0.5, 3.0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def namespaces_refused() -> str | None:
    """Why this process cannot make network namespaces, bridges and veths (None: it can)."""
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2's `ip` and util-linux's `unshare`"
    r = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, timeout=15)
    if r.returncode:
        return f"cannot create a network namespace (`unshare -n true`: {r.stderr.strip()})"
    probe = f"dj-{os.getpid()}-probe"
    r = ip("netns", "add", probe, check=False)
    if r.returncode:
        return f"cannot create a named network namespace (`ip netns add`: {r.stderr.strip()})"
    ip("netns", "del", probe, check=False)
    for kind, extra in (("bridge", ()), ("veth", ("peer", "name", f"djv{os.getpid()}n0"))):
        r = ip("link", "add", f"djv{os.getpid()}h0", "type", kind, *extra, check=False)
        if r.returncode:
            return f"cannot create a {kind} (`ip link add ... type {kind}`: {r.stderr.strip()})"
        ip("link", "del", f"djv{os.getpid()}h0", check=False)
    return None


def sweep_leftovers() -> None:
    """Remove the namespaces and links of earlier runs of this test whose process is gone."""
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = NS_RE.match(name)
        if m and not alive(int(m.group(1))):
            for pid in ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", name, check=False)
    for line in ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        m = LINK_RE.match(name)
        if m and not alive(int(m.group(1))):
            ip("link", "del", name, check=False)


class Network:
    """A bridge in this namespace holding the controller host's address (<subnet>.1) and, per host k, a namespace
    dj-<pid>-k whose end of a veth pair has <subnet>.(10+k); the other end is on the bridge."""

    def __init__(self, hosts: int) -> None:
        pid = os.getpid()
        self.hosts, self.bridge = hosts, f"djv{pid}b"
        self.ns = [f"dj-{pid}-{k}" for k in range(hosts)]
        self.root_end = [f"djv{pid}h{k}" for k in range(hosts)]
        self.subnet = ""

    def up(self) -> None:
        # The /24 is picked and taken under a lock: two runs at once never pick the same one.
        with open("/run/lock/dejavu-test-netns.lock" if os.path.isdir("/run/lock") else "/tmp/dejavu-test-netns.lock",
                  "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = ip("-o", "-4", "addr", "show").stdout + ip("-4", "route", "show", "table", "all").stdout
            third = next(n % 250 for n in range(os.getpid(), os.getpid() + 250) if f"10.231.{n % 250}." not in used)
            self.subnet = f"10.231.{third}"
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.controller}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for k in range(self.hosts):
            ns, host_end = self.ns[k], f"djv{os.getpid()}n{k}"
            ip("netns", "add", ns)
            ip("link", "add", self.root_end[k], "type", "veth", "peer", "name", host_end)
            ip("link", "set", host_end, "netns", ns)
            ip("link", "set", self.root_end[k], "master", self.bridge)
            ip("link", "set", self.root_end[k], "up")
            ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", host_end)
            ip("-n", ns, "link", "set", host_end, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    @property
    def controller(self) -> str:
        return f"{self.subnet}.1"

    def address(self, k: int) -> str:
        return f"{self.subnet}.{10 + k}"

    def link(self, k: int, state: str) -> None:
        ip("link", "set", self.root_end[k], state)

    def down(self) -> None:
        for k in range(self.hosts):
            for pid in ip("netns", "pids", self.ns[k], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", self.ns[k], check=False)
            ip("link", "del", self.root_end[k], check=False)  # and its peer, wherever it is
        ip("link", "del", self.bridge, check=False)


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class Cluster:
    """One run's network, keys, host agents (`dejavu-agent`, each in its host's namespace, stderr to a file per
    start) and `dejavu-serve` (in this namespace; clients reach it on loopback). `close()` removes all of it."""

    def __init__(self, tmp_path: Path, hosts: int) -> None:
        self.net, self.tmp = Network(hosts), tmp_path
        self.keys = tmp_path / "keys"
        security.generate(self.keys, ["server", "agent", "client", "admin"])
        self.agents: dict[int, subprocess.Popen[bytes]] = {}
        self.files: list[Path] = []
        self.dep: Deployment | None = None
        self.serve_logs = ""

    def up(self) -> None:
        self.net.up()
        # agents start before dejavu-serve prints its address (its ready line needs them): the port is chosen here
        self.port = free_port(self.net.controller)
        self.join = f"tcp://{self.net.controller}:{self.port}"

    def start_agent(self, k: int) -> subprocess.Popen[bytes]:
        log = self.tmp / f"host-{k}.{len(self.files)}.log"
        self.files.append(log)
        with log.open("wb") as err:  # the child keeps its own descriptor
            self.agents[k] = subprocess.Popen(
                ["ip", "netns", "exec", self.net.ns[k], sys.executable, str(AGENT), "--join", self.join,
                 "--host-id", f"host-{k}", "--keys", str(self.keys), "--advertise", self.net.address(k),
                 "--device", "cpu", "--stage-threads", "1", "--log-level", "INFO"],
                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)  # `ip netns exec` execs: the pid is the agent's
        return self.agents[k]

    def serve(self, model: Path, stages: int, bind_host: str, *args: str) -> Deployment:
        """dejavu-serve with no local host: the agents started so far (they retry AgentHello until it binds)."""
        self.dep = start_deployment(
            model, stages, "--hosts", "0", "--keys", str(self.keys), "--agent-bind", f"tcp://{bind_host}:{self.port}",
            "--host", "127.0.0.1", "--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ),
            "--heartbeat-interval", str(HEARTBEAT_INTERVAL), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), *args)
        return self.dep

    def stop(self) -> list[int]:
        """Stop dejavu-serve (exit code 0 expected), then the exit codes of the agents it told to stop."""
        assert self.dep is not None
        self.serve_logs = self.dep.logs()
        code, self.dep = self.dep.stop(), None
        return [code, *(asyncio.run(exited(p, 15)) for _, p in sorted(self.agents.items()))]

    def dump(self, out: IO[str]) -> None:
        logs = self.dep.logs() if self.dep is not None else self.serve_logs
        print(f"----- dejavu-serve -----\n{logs[-12000:]}", file=out)
        for f in self.files:
            print(f"----- {f.name} -----\n{f.read_text(errors='replace')[-6000:]}", file=out)

    def close(self) -> None:
        if self.dep is not None:
            with contextlib.suppress(Exception):
                self.dep.stop()
        for p in self.agents.values():
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        self.net.down()


@contextlib.contextmanager
def cluster(tmp_path: Path, hosts: int) -> Iterator[Cluster]:
    why = namespaces_refused()
    if why:
        pytest.skip(why)
    sweep_leftovers()
    c = Cluster(tmp_path, hosts)
    try:
        c.up()
        yield c
    except BaseException:
        c.dump(sys.stderr)
        raise
    finally:
        c.close()


async def exited(p: subprocess.Popen[bytes], within: float) -> int:
    deadline = time.monotonic() + within
    while p.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"agent pid {p.pid} still runs {within}s later")
        await asyncio.sleep(0.05)
    return p.returncode


def stage_of(status: dict[str, Any], index: int) -> dict[str, Any]:
    return next(p for p in status["processes"] if p["role"] == "stage" and p["index"] == index)


def test_a_host_cut_off_its_network_is_declared_dead_its_stage_moves_and_it_fences_itself(
        model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    reqs = workload(211, n=16)
    seen: dict[str, Any] = {}
    with cluster(tmp_path, 3) as cl:
        net, t = cl.net, {"start": time.monotonic()}
        for k in (0, 1):  # they hold the stages (--min-hosts 2)
            cl.start_agent(k)
        dep = cl.serve(path, 2, net.controller, "--min-hosts", "2")
        t["ready"] = time.monotonic()
        cl.start_agent(2)  # joins after the stages were placed: the spare

        async def scenario() -> list[list[int]]:
            progress = Progress()
            # --keys governs the client socket too; the admin key sees the hosts' addresses
            async with AsyncClient(dep.address, timeout=180, keys=cl.keys, key_name="admin") as c:
                st = await until(c, lambda s: hosts_of(s).get("host-2", {}).get("state") == "spare", 30,
                                 "host-2 joined as a spare")
                hosts = hosts_of(st)
                # host-0 and host-1 joined together: which holds stage 0 is the order their Hellos arrived in
                assert {h: v["address"] for h, v in hosts.items()} == {f"host-{k}": net.address(k) for k in range(3)}
                assert sorted(v["stages"] for v in hosts.values()) == [[], [0], [1]] and hosts["host-2"]["stages"] == []
                seen["victim"] = victim = next(int(h[-1]) for h, v in hosts.items() if v["stages"] == [1])
                assert stage_of(st, 1)["detail"].startswith(f"tcp://{net.address(victim)}:")  # on its host's address

                async def cut() -> None:
                    await progress.reach(150)
                    proc = cl.agents[victim]
                    seen["tree"] = tree = [proc.pid, *descendants(proc.pid)]
                    assert len(tree) >= 3, tree  # the agent, its streamer and stage 1 at least
                    t0 = time.monotonic()
                    net.link(victim, "down")
                    await until(c, lambda s: hosts_of(s)[f"host-{victim}"]["state"] == "dead", 30,
                                f"host-{victim} declared dead")
                    seen["declared_dead_s"] = time.monotonic() - t0
                    seen["agent_exit"] = await exited(proc, 15)
                    seen["fenced_s"] = time.monotonic() - t0
                    deadline = time.monotonic() + 5
                    while [p for p in tree if alive(p)] and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    seen["left"] = [p for p in tree if alive(p)]

                t["spare"] = time.monotonic()
                failer = asyncio.create_task(cut())
                outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
                await asyncio.wait_for(failer, 60)
                t["streamed"] = time.monotonic()
                seen["after"] = after = await c.status()
                # the link is back: the host's agent starts again (a new boot, as systemd would) and rejoins as a spare
                net.link(victim, "up")
                cl.start_agent(victim)
                boot = hosts_of(after)[f"host-{victim}"]["boot"]
                seen["rejoined"] = await until(c, lambda s: hosts_of(s)[f"host-{victim}"]["state"] == "spare"
                                               and hosts_of(s)[f"host-{victim}"]["boot"] != boot, 30,
                                               f"host-{victim} back as a spare")
                t["rejoined"] = time.monotonic()
                return outs

        outs = asyncio.run(scenario())
        codes = cl.stop()  # the victim's agent is its new boot
        victim = seen["victim"]
        print(f"host-{victim}'s link cut -> declared dead in {seen['declared_dead_s']:.2f}s; its agent fenced itself "
              f"(exit {seen['agent_exit']}) {seen['fenced_s']:.2f}s after the cut (heartbeat timeout "
              f"{HEARTBEAT_TIMEOUT:g}s)")
        print("seconds: " + ", ".join(f"{b} {t[b] - t[a]:.1f}" for a, b in zip(t, list(t)[1:])))
        assert outs == reference(path, reqs)  # every request finished, each token once, equal to the fault-free run
        hosts = hosts_of(seen["after"])
        assert hosts[f"host-{victim}"]["state"] == "dead"
        assert hosts["host-2"]["state"] == "up" and hosts["host-2"]["stages"] == [1]
        stage1 = stage_of(seen["after"], 1)
        assert stage1["host"] == "host-2" and stage1["state"] == "serving"
        assert stage1["detail"].startswith(f"tcp://{net.address(2)}:")
        # silence counts from the host's last heartbeat, up to an interval before the cut
        assert HEARTBEAT_TIMEOUT - HEARTBEAT_INTERVAL - 0.1 <= seen["declared_dead_s"] < HEARTBEAT_TIMEOUT + 2.5
        assert seen["agent_exit"] == 3 and seen["fenced_s"] < HEARTBEAT_TIMEOUT + 3
        assert seen["left"] == [], "every process of the fenced host stopped"
        assert f"[hosts] host-{victim} ({net.address(victim)}) declared dead: silent for" in cl.serve_logs
        assert hosts_of(seen["rejoined"])[f"host-{victim}"]["address"] == net.address(victim)
        assert codes == [0, 0, 0, 0], "dejavu-serve stops cleanly, and its agents with it"


def test_a_wildcard_address_of_the_controller_host_is_reached_where_the_agent_joined() -> None:
    assert as_reached("tcp://0.0.0.0:5000", "tcp://10.0.0.1:7000") == "tcp://10.0.0.1:5000"
    assert as_reached("tcp://[::]:5000", "tcp://[fd00::1]:7000") == "tcp://[fd00::1]:5000"
    assert as_reached("tcp://10.0.0.9:5000", "tcp://10.0.0.1:7000") == "tcp://10.0.0.9:5000"  # a real address stays
    assert as_reached("ipc:///run/x.sock", "tcp://10.0.0.1:7000") == "ipc:///run/x.sock"


def test_stages_on_other_machines_reach_a_controller_host_listening_on_every_interface(
        model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`--agent-bind tcp://0.0.0.0:PORT`: the controller's internal socket listens on every interface too, and a
    stage on another machine reaches it at the address its agent joined at, not at 0.0.0.0 (its own machine)."""
    path = model_factory("llama")
    reqs = workload(211, n=4)
    with cluster(tmp_path, 2) as cl:
        cl.start_agent(0)
        cl.start_agent(1)
        dep = cl.serve(path, 2, "0.0.0.0", "--min-hosts", "2", "--startup-timeout", "30", "--no-streamer")

        async def scenario() -> tuple[list[list[int]], dict[str, Any]]:
            progress = Progress()
            async with AsyncClient(dep.address, timeout=60, keys=cl.keys, key_name="admin") as c:
                outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
                return outs, await c.status()

        outs, st = asyncio.run(scenario())
        assert sorted(h["address"] for h in st["hosts"]) == [cl.net.address(0), cl.net.address(1)]
        assert cl.stop() == [0, 0, 0]
        assert outs == reference(path, reqs)
