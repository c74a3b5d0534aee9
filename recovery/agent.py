"""The host agent: one per machine (`dejavu-agent`, under systemd) or per simulated host (started by
`dejavu-serve --hosts H`). It joins the deployment's cluster supervisor, runs this host's KV streamer and the
stages it is assigned, watches and restarts them (recovery/children.py), and holds the host's lease.

Joining: AgentHello every heartbeat interval (CURVE, with the `agent` key of the user's keys directory) until
HostWelcome names this host's slot and brings the keys of its processes (`agent-<slot>`, `streamer-<slot>`, then
each assigned stage's with its Assign) and the supervision policy, so dejavu-serve's flags govern every host.
The agent writes those keys into its own run directory (0700), binds its children's socket there (ipc://) and
starts its streamer; its stages bind their activation sockets on the advertised address.
Assign names the whole set of stages this host runs: missing ones start (at the incarnation it gives), others
stop. Every heartbeat interval the agent sends HostBeat (its processes and their states) and expects the
supervisor's Heartbeat back.
The lease, both ways: the supervisor declares a host silent for `heartbeat_timeout` dead, fences that boot and
moves its stages; the agent, silent to itself for as long (a cut link, a controller host gone), fences itself:
it kills its processes at once and exits with EXIT_FENCED, as it does when told Fenced. Whatever restarts it
(systemd; dejavu-serve for a simulated host) starts a new boot, which joins as a fresh host. So a frozen host
that wakes up never runs its old stages beside their new ones for longer than a heartbeat.
Its processes die with it (PR_SET_PDEATHSIG) and its janitor sweeps its run directory and shared memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
import zmq

from bus import security
from bus.child import decode_config, encode_config
from bus.codec import Codec, Received
from bus.errors import ProtocolError
from bus.messages import (
    AgentHello,
    Assign,
    FatalError,
    Fenced,
    Hello,
    HostBeat,
    HostProcess,
    HostWelcome,
    ProcessDown,
    Shutdown,
)
from bus.sockets import bound_address, context, decode_frames, make_socket, recv_frames, send
from recovery.children import (
    Child,
    ChildSupervisor,
    make_run_dir,
    start_janitor,
    sweep,
    sweep_dead_deployments,
)
from recovery.hosts import GENERATION_SHIFT
from recovery.specs import ChildSpec, HostPolicy
from recovery.standby import Standby, keeps_standby
from stages.config import StageProcConfig
from streamer.config import SHM_PREFIX, StreamerConfig

log = logging.getLogger(__name__)

EXIT_FENCED = 3  # the agent was fenced (or fenced itself): restart it, and it joins as a new host
AGENT_KEY, SERVER_KEY = "agent", "server"  # the user's keys directory (dejavu-keys generate)
WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")


def as_reached(address: str, join: str) -> str:
    """A socket of the controller host (tcp://HOST:PORT) as this host reaches it. Bound on a wildcard
    (`dejavu-serve --agent-bind tcp://0.0.0.0:PORT`: the controller's internal socket binds where the agents'
    does), it names no address a peer can connect to - another machine connecting to 0.0.0.0 reaches itself - so
    the host this agent joined at stands in: it reaches the controller host, whose sockets listen on every
    interface."""
    if not address.startswith("tcp://"):
        return address
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    if host not in WILDCARD_HOSTS:
        return address
    return f"tcp://{join.removeprefix('tcp://').rsplit(':', 1)[0]}:{port}"


@dataclass(frozen=True)
class AgentConfig:
    join: str  # the cluster supervisor's agent address, tcp://HOST:PORT
    host_id: str
    keys_dir: str  # the user's keys (agent keypair, the server's public key)
    devices: tuple[str, ...] = ("cpu",)
    advertise: str = "127.0.0.1"  # the address this host's processes bind for their peers
    log_dir: str = ""
    log_level: str = "WARNING"
    parent_pid: int | None = None  # a simulated host dies with its dejavu-serve
    local: bool = False
    spare: bool = False
    slot: int = -1  # the slot a simulated host asks for (-1: any)
    threads: int = 0  # torch threads per CPU stage (0: this machine's cores / its stages)
    incarnation: int = 0  # restarts of this agent by dejavu-serve (a simulated host); the boot is what counts


class HostAgent(ChildSupervisor):
    def __init__(self, cfg: AgentConfig) -> None:
        super().__init__(HostPolicy(), cfg.log_dir)
        self.cfg = cfg
        self.boot = random.getrandbits(62) | 1
        self.ctx = context()
        self.up_codec = Codec(AGENT_KEY, self.boot)
        self.welcome: HostWelcome | None = None
        self.welcomed = asyncio.Event()
        self.heard = time.monotonic()  # the cluster supervisor's last word
        self.exit_code = 0
        self.assigned: dict[int, tuple[int, str]] = {}  # stage -> (first incarnation here, device)
        self.auth = None

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop, f"signal {signal.Signals(sig).name}")
        sweep_dead_deployments()
        self.run_dir = make_run_dir()
        self.shm_prefix = f"d{os.getpid()}"  # this host's shared-memory KV pools: dejavu-kv-d<agent pid>-*
        self.janitor = start_janitor(self.run_dir, f"{SHM_PREFIX}-{self.shm_prefix}-*")
        join_keys = security.load(cfg.keys_dir, AGENT_KEY)
        self.up = make_socket(self.ctx, zmq.DEALER, connect=cfg.join, keys=join_keys, server=SERVER_KEY,
                              identity=f"agent:{cfg.host_id}:{self.boot}".encode())
        tasks = [asyncio.ensure_future(self._uplink()), asyncio.ensure_future(self._join_and_beat())]
        log.info("[agent] host %s (boot %x) joining %s, offering %s", cfg.host_id, self.boot, cfg.join,
                 ",".join(cfg.devices))
        try:
            await self.stop.wait()
        finally:
            await self._shutdown(self.fatal or "stopping")
            for t in tasks:
                t.cancel()
            for t in list(self.tasks):
                t.cancel()
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy(linger=0)
            sweep(self.run_dir, self.shm_prefix)
            self.janitor.kill()
            self.janitor.wait()
        if self.exit_code:
            return self.exit_code
        return (2 if self.fatal_config else 1) if self.fatal else 0

    async def _shutdown(self, reason: str) -> None:
        self.stopping = True
        for standby in self.standbys.values():
            await standby.close()
        if self.exit_code == EXIT_FENCED:
            self._kill_all()  # fenced: not one moment longer
            await self._reap(list(self.children.values()), self.policy.kill_timeout, None)
            return
        await self._stop_children(list(self.children.values()), reason)
        if self.fatal:  # the cluster supervisor stops the deployment with this message
            with contextlib.suppress(zmq.ZMQError):
                await send(self.up, self.up_codec, FatalError(self.fatal, self.fatal_config))
            self.up.close(linger=2000)

    def _fence(self, why: str) -> None:
        if self.exit_code != EXIT_FENCED:
            log.error("[fenced] host %s: %s; stopping every process of this host", self.cfg.host_id, why)
            self.exit_code = EXIT_FENCED
            self._kill_all()
        self.stop.set()

    # ------------------------------------------------------------------ the cluster supervisor

    async def _join_and_beat(self) -> None:
        cfg, p = self.cfg, self.policy
        hello = AgentHello(cfg.host_id, self.boot, os.getpid(), cfg.advertise, list(cfg.devices),
                           socket.gethostname(), cfg.local, cfg.spare)
        while not self.welcomed.is_set():
            await send(self.up, self.up_codec, hello)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.welcomed.wait(), p.heartbeat_interval)
        seq = 0
        while True:
            p = self.policy
            seq += 1
            await send(self.up, self.up_codec, HostBeat(cfg.host_id, self.boot, seq, self._processes()))
            before = time.monotonic()
            await asyncio.sleep(p.heartbeat_interval)
            if time.monotonic() - before > 2 * p.heartbeat_interval:
                # this process's own loop stalled: the answers wait unread, the silence is ours - start over
                log.warning("[agent] event loop stalled for %.1fs: the lease starts over", time.monotonic() - before)
                self.heard = time.monotonic()
                continue
            silent = time.monotonic() - self.heard
            if silent > p.heartbeat_timeout:
                self._fence(f"no word from the cluster supervisor for {silent:.1f}s (> heartbeat_timeout "
                            f"{p.heartbeat_timeout:g}s): its lease ran out")
                return

    def _processes(self) -> list[HostProcess]:
        return [HostProcess(c.spec.role, c.spec.index, c.state.pid, c.state.incarnation, c.state.state)
                for c in self.children.values()]

    async def _uplink(self) -> None:
        while True:
            frames = await recv_frames(self.up)
            try:
                _, msg = decode_frames(self.up_codec, frames)
            except ProtocolError as e:
                log.warning("[agent] dropped a bad frame from the cluster supervisor: %s", e)
                continue
            self.heard = time.monotonic()
            body = msg.body
            try:
                if isinstance(body, HostWelcome) and body.boot == self.boot and not self.welcomed.is_set():
                    await self._welcome(body)
                elif isinstance(body, Assign) and body.boot == self.boot and self.welcomed.is_set():
                    await self._assign(body)
                elif isinstance(body, Fenced) and body.boot == self.boot:
                    self._fence(f"the cluster supervisor fenced this host ({body.reason})")
                elif isinstance(body, Shutdown):
                    self._request_stop(f"the cluster supervisor asked ({body.reason})")
            except Exception:
                log.exception("[agent] handling %s failed", type(body).__name__)
                self._fail(f"host {self.cfg.host_id}: handling {type(body).__name__} failed (see its log)")

    async def _welcome(self, w: HostWelcome) -> None:
        cfg = self.cfg
        self.welcome = w
        self.policy = decode_config(HostPolicy, w.policy)
        self.slot = w.slot
        self.name = f"agent-{w.slot}"
        self.streamer_name = f"streamer-{w.slot}"
        self.keys_dir = f"{self.run_dir}/keys"
        security.install(self.keys_dir, w.public, dict(w.secrets))
        self.keys = security.load(self.keys_dir, self.name)
        self.auth = security.start_authenticator(self.ctx, self.keys)
        self.codec = Codec(self.name, self.boot)
        self.sock = make_socket(self.ctx, zmq.ROUTER, bind=f"ipc://{self.run_dir}/agent.sock", keys=self.keys)
        self.address = bound_address(self.sock)
        self.tasks.add(asyncio.ensure_future(self._receive()))
        self.tasks.add(asyncio.ensure_future(self._watchdog()))
        self.welcomed.set()
        logging.getLogger().setLevel(cfg.log_level)
        log.info("[agent] host %s is slot %d", cfg.host_id, w.slot)
        if self.policy.streamer:
            p = self.policy
            sc = StreamerConfig(
                name=self.streamer_name, index=w.slot, host_id=cfg.host_id,
                control_address=self.streamer_address, data_address=f"tcp://{cfg.advertise}:0",
                keys_dir=self.keys_dir, manifest=f"{self.run_dir}/{self.streamer_name}.pools.json",
                swap_bytes=p.swap_bytes, replica_bytes=p.replica_bytes, receive_bytes=p.receive_bytes,
                heartbeat_interval_s=p.heartbeat_interval, supervisor_address=self.address,
                supervisor_pid=os.getpid(), supervisor_name=self.name, log_level=cfg.log_level,
            )
            # a new boot's streamer counts on from the last boot's (HostWelcome.generation): its peers drop what
            # an older incarnation sends, and take ids from a newer one as new
            self._spawn(self._child(ChildSpec("streamer", w.slot, "streamer", sc)), w.generation << GENERATION_SHIFT)

    @property
    def streamer_address(self) -> str:
        # a fixed local address: stages connect before it is up, and a restarted streamer binds it again - and
        # adopts the stage pools its predecessor recorded beside it (their shared memory outlives a streamer)
        return f"ipc://{self.run_dir}/streamer.control" if self.policy.streamer else ""

    async def _assign(self, a: Assign) -> None:
        cfg = self.cfg
        wanted = {s.index: s for s in a.stages}
        for index, child in [(c.spec.index, c) for c in self.children.values() if c.spec.role == "stage"]:
            if index not in wanted and not child.retired:
                log.info("[agent] stage %d leaves this host", index)
                self.assigned.pop(index, None)
                task = asyncio.ensure_future(self._retire(child))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, len(wanted)))
        for index, s in wanted.items():
            if self.assigned.get(index) == (s.incarnation, s.device):
                continue  # running already (a repeated Assign)
            self.assigned[index] = (s.incarnation, s.device)
            name = f"stage-{index}"
            security.install(self.keys_dir, dict(self.welcome.public), {name: s.secret})
            base = decode_config(StageProcConfig, s.config)
            st = replace(
                base, incarnation=s.incarnation, device=s.device, supervisor_address=self.address,
                supervisor_pid=os.getpid(), supervisor_name=self.name, host_id=cfg.host_id,
                controller_address=as_reached(base.controller_address, cfg.join),
                streamer_address=self.streamer_address, streamer_name=self.streamer_name, shm_prefix=self.shm_prefix,
                keys_dir=self.keys_dir, bind_host=cfg.advertise, threads=base.threads or (threads if s.device == "cpu" else 0),
            )
            old = self.children.get(name)
            if old is not None and not old.retired:
                old.retired = True
                await self._stop_children([old], "moved")
            log.info("[agent] starting stage %d (layers %s) on %s, incarnation %d", index, list(st.layers), s.device,
                     s.incarnation)
            child = self._child(ChildSpec("stage", index, "stages.proc", st))
            child.state.restarts = 0
            self._spawn(child, s.incarnation)
            if keeps_standby(self.policy.standby, s.device):  # for the next restart here (after this start's imports)
                standby = self.standbys.get(s.device)
                if standby is None:  # (it warms its device for the first stage placed there)
                    warm = json.dumps({"stage": encode_config(st), "fraction": self.policy.gpu_memory_fraction}) \
                        if self.policy.standby_warmup else ""
                    standby = self.standbys[s.device] = Standby(self.log_dir, warm=warm)
                standby.want()

    async def _report_down(self, child: Child, incarnation: int, reason: str, restarting: bool) -> bool:
        with contextlib.suppress(zmq.ZMQError):
            await send(self.up, self.up_codec, ProcessDown(child.spec.role, child.spec.index, incarnation,
                                                           f"{reason} (host {self.cfg.host_id})", restarting))
        return True

    # ------------------------------------------------------------------ this host's processes

    async def _dispatch(self, route: bytes, msg: Received) -> None:
        child = self._from_child(route, msg)
        if child is not None and child.spec.role == "streamer" and isinstance(msg.body, Hello):
            # for status(): the controller lists every process
            fwd = msgspec.structs.replace(msg.body, incarnation=child.state.incarnation, host=self.cfg.host_id)
            await send(self.up, self.up_codec, fwd)


def run_agent(cfg: AgentConfig) -> int:
    from bus.child import install_uvloop, setup_child

    setup_child(f"dejavu: agent {cfg.host_id}", cfg.log_level, cfg.parent_pid)
    if cfg.log_dir:
        Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
    install_uvloop()
    return asyncio.run(HostAgent(cfg).run())


def main(argv: list[str] | None = None) -> int:
    """`python -m recovery.agent '<AgentConfig json>'`: how dejavu-serve starts a simulated host."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    return run_agent(decode_config(AgentConfig, args[0]))


if __name__ == "__main__":
    import sys

    sys.exit(main())
