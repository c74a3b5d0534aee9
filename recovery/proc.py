"""The cluster supervisor, `dejavu-serve`'s process: it runs the controller, starts the local host agents
(simulated hosts), admits remote ones, places the stages on the hosts and moves them when a host is lost.
`run_supervisor(config, on_ready)` is what `bin/dejavu-serve` calls.

Processes: the controller (a child of this process, watched and restarted like any child: recovery/children.py)
and one host agent per host (recovery/agent.py), which runs that host's KV streamer and stages. `--hosts H`
starts H agents here as simulated hosts (each its own loopback address 127.0.0.<2+k>, streamer, shared-memory
namespace and run directory; a lone host uses 127.0.0.1), `--spare-hosts K` K more that hold no stage until one
is needed; agents on other machines join at `--agent-bind` (they need the user's keys: `--keys`).
Keys: every process has its own CURVE keypair (bus/security.py), made here at start; an agent receives those of
its processes when it joins, over its CURVE link authenticated with the user's `agent` key (or, without --keys,
one made here for the local agents only). The supervisor's key is the user's `server` key.
Start: bind the agent socket, start the janitor, the controller and the local agents at once; place the stages
once `--min-hosts` hosts joined (default: the local ones; recovery/hosts.py decides where), then wait for the
controller's DeploymentReady and the streamers' Hellos -> `on_ready(address)`.
Hosts: a host silent for `heartbeat_timeout` (or whose local agent process exited) is declared dead: its boot is
fenced (whatever it says later is answered Fenced, and it stops its processes), the controller hears that its
stages are down, and they move to a spare host, else to live hosts with a free device, else the deployment is
`degraded` until a host joins. A restarted agent (a new boot) joins as a fresh host.
Stopping and failures: as recovery/children.py says; a process past its restart budget stops the deployment -
the controller fails every request in flight with that message and tells every client it knows
(ServerStopping) before it exits. When the controller itself is gone for good, the supervisor stands in for it
at the client address for `stop_notice_timeout` seconds and answers each client that comes back with
ServerStopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import msgspec
import zmq

from bus import security
from bus.child import STARTED, encode_config
from bus.codec import Codec, Received
from bus.controller_config import ControllerConfig
from bus.errors import DeadlineError, ProtocolError
from bus.logs import Throttled
from bus.messages import (
    AgentHello,
    Assign,
    DeploymentReady,
    FatalError,
    Fenced,
    Heartbeat,
    Hello,
    HostBeat,
    HostsUpdate,
    HostWelcome,
    ProcessDown,
    ServerStopping,
    ServerStoppingAck,
    Shutdown,
    StageAssignment,
)
from bus.security import CONTROLLER, SUPERVISOR
from bus.sockets import bound_address, context, decode_frames, make_socket, recv_frames, send
from recovery.agent import AGENT_KEY, EXIT_FENCED, SERVER_KEY, AgentConfig
from recovery.children import (
    Child,
    ChildSupervisor,
    DeploymentError,
    StartAborted,
    make_run_dir,
    start_janitor,
    sweep,
    sweep_dead_deployments,
)
from recovery.front_child import front_spec
from recovery.hosts import DEAD, Host, HostTable
from recovery.preflight import pool_bytes
from recovery.sizing import planned_swap
from recovery.specs import MAX_HOSTS, ChildSpec, DeploymentConfig, StagePlan
from stages.config import StageProcConfig
from stages.models.spec import read_spec

log = logging.getLogger(__name__)
noisy = Throttled(log)  # warnings about what peers send: rate-limited per (kind, peer)

__all__ = ["DeploymentError", "SupervisorProcess", "run_supervisor"]


def local_address(k: int, total: int) -> str:
    """Simulated host k's own loopback address (a lone host keeps 127.0.0.1)."""
    return "127.0.0.1" if total == 1 else f"127.0.0.{2 + k}"


def tcp_host(address: str) -> str:
    """The host part of tcp://HOST:PORT."""
    return address.removeprefix("tcp://").rsplit(":", 1)[0]


class SupervisorProcess(ChildSupervisor):
    def __init__(self, cfg: DeploymentConfig, on_ready: Callable[[str, str, str], None] | None = None) -> None:
        super().__init__(cfg.policy(), cfg.log_dir)
        self.cfg = cfg
        self.on_ready = on_ready or (lambda client, agents, http: None)
        self.codec = Codec(SUPERVISOR, 0)
        self.ctx = context()
        self.ready = asyncio.Event()
        self.controller_hello = asyncio.Event()
        self.streamers_up = asyncio.Event()
        self.addresses: dict[str, str] = {}
        self.forwarded: dict[tuple[str, int], Hello] = {}  # other processes' Hellos the controller lists in status()
        self.table = HostTable(cfg.num_stages, MAX_HOSTS)
        self.placement_note = ""
        self.boots: dict[str, int] = {}
        self.local_hosts = cfg.hosts + cfg.spare_hosts
        self.auth = None
        self.client_keys: security.Keyring | None = None
        self.front_hello = asyncio.Event()  # the HTTP front (--http-port) listens
        self.http_address = ""

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop, f"signal {signal.Signals(sig).name}")
        sweep_dead_deployments()
        self.run_dir = make_run_dir()
        self.janitor = start_janitor(self.run_dir, f"dejavu-kv-d{os.getpid()}-*")
        try:
            self._make_keys()
            # the users' client keys too: when the controller is gone for good this process stands in for it at
            # the client address (_stand_in), as a CURVE server like the controller's client socket
            self.client_keys = security.load_client_side(self.cfg.keys_dir) if self.cfg.keys_dir else None
            self.auth = security.start_authenticator(self.ctx, self.keys, self.client_keys)
            self.sock = make_socket(self.ctx, zmq.ROUTER, bind=self.cfg.agent_bind, keys=self.keys)
        except (security.KeysError, zmq.ZMQError) as e:
            self.fatal, self.fatal_config = f"cannot listen for agents at {self.cfg.agent_bind}: {e}", True
            self._close()
            raise DeploymentError(self.fatal, True) from None
        self.address = bound_address(self.sock)
        receiver = asyncio.ensure_future(self._receive())
        watchdog = asyncio.ensure_future(self._watchdog())
        leases = asyncio.ensure_future(self._leases())
        try:
            await self._start()
            self.on_ready(self.addresses["client"], self.address, self.http_address)
            await self.stop.wait()
        except StartAborted:
            pass
        except DeadlineError as e:
            self.fatal = f"{e}{f' ({self.placement_note})' if self.placement_note else ''}"
        finally:
            await self._shutdown(self.fatal or "stopping")
            for t in (receiver, watchdog, leases):
                t.cancel()
            self._close()
        if self.fatal:
            raise DeploymentError(self.fatal, self.fatal_config)
        return 0

    def _close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=0)
        sweep(self.run_dir, "")
        self.janitor.kill()  # swept: nothing is left for it (closing its pipe would make it sweep again)
        self.janitor.wait()

    def _make_keys(self) -> None:
        """The agents' keys: the user's (--keys DIR: `server` for this process, `agent` for every agent), else a
        pair made here for the local agents. Every process's own keypair: made here, in the run directory."""
        cfg = self.cfg
        self.join_keys = cfg.keys_dir or f"{self.run_dir}/join"
        if not cfg.keys_dir:
            security.generate(self.join_keys, [SERVER_KEY, AGENT_KEY])
        join_table = security.read_table(self.join_keys)
        self.keys_dir = f"{self.run_dir}/keys"
        # this process speaks as "supervisor" with the server key; agents as "agent" with the agent key
        security.install(self.keys_dir, {SUPERVISOR: join_table[SERVER_KEY], AGENT_KEY: join_table[AGENT_KEY]},
                         {SUPERVISOR: security.read_secret(self.join_keys, SERVER_KEY)})
        names = [CONTROLLER, *(f"stage-{i}" for i in range(cfg.num_stages)),
                 *(f"{role}-{k}" for k in range(MAX_HOSTS) for role in ("agent", "streamer")), "front"]
        security.generate(self.keys_dir, names)
        self.keys = security.load(self.keys_dir, SUPERVISOR)
        self.public = security.read_table(self.keys_dir)

    async def _start(self) -> None:
        """Start the controller and the local agents at once (each spends seconds importing torch and loading;
        ZeroMQ delivers once the binder is up); place the stages once enough hosts joined; wait for the
        controller's DeploymentReady."""
        cfg, pid = self.cfg, os.getpid()
        self.spec = spec = read_spec(Path(cfg.model_dir))
        if cfg.replicating:
            # a host may keep the replica of every stage (a lost host's replicas move; one that moved away stays
            # until the end, so a stage may still restore from it): room for all of them, pages touched lazily
            need = pool_bytes(cfg, spec) + cfg.num_stages * (1 << 20)
            self.policy = replace(self.policy, replica_bytes=max(self.policy.replica_bytes, need))
        self.swap_plan = planned_swap(cfg)  # auto settled where no stage's figures are needed (a size auto chose)
        may_swap = cfg.swap_mode != "off" and (self.swap_plan is None or self.swap_plan.on)
        if self.swap_plan is not None and cfg.swap_mode == "auto":
            log.info("[swap] %s", self.swap_plan.reason)
        if may_swap:
            # every stage's swap pool (all its microbatches) may sit on one host's streamer (pages touched lazily)
            need = pool_bytes(cfg, spec) + cfg.num_stages * (1 << 20)
            self.policy = replace(self.policy, swap_bytes=max(self.policy.swap_bytes, need))
            if cfg.disaggregated:  # and a swapping token stage's receive pool (the prompts' KV, by logical slot)
                need = pool_bytes(cfg, spec, "token") + cfg.token_stages * (1 << 20)
                self.policy = replace(self.policy, receive_bytes=max(self.policy.receive_bytes, need))
        internal = f"tcp://{tcp_host(self.address)}:0"  # stages on any host reach it
        ctl_cfg = ControllerConfig(
            model_dir=cfg.model_dir, vocab_size=spec.vocab_size, eos_token_ids=spec.eos_token_ids,
            num_stages=cfg.num_stages, microbatch_size=cfg.microbatch_size,
            num_microbatches=cfg.microbatches, max_seq_len=cfg.max_seq_len, supervisor_address=self.address,
            client_bind=f"tcp://{cfg.host}:{cfg.port}", internal_bind=internal, prefill_chunk=cfg.prefill_chunk,
            max_waiting=cfg.max_waiting, client_timeout=cfg.client_timeout, step_timeout=cfg.step_timeout,
            queue_timeout=cfg.queue_timeout,
            heartbeat_interval=cfg.heartbeat_interval, supervisor_pid=pid, log_level=cfg.log_level,
            flush_timeout=cfg.stop_notice_timeout, keys_dir=self.keys_dir,
            client_keys_dir=cfg.keys_dir, replicate=cfg.replicating, prompt_stages=cfg.prompt_stages,
            prompt_microbatches=cfg.prompt_microbatches, prompt_microbatch_size=cfg.prompt_batch,
            memory_plan=cfg.memory_plan,
            swap=may_swap,
            lookahead=cfg.lookahead_on and not may_swap,
        )
        self._spawn(self._child(ChildSpec("controller", 0, "bus.controller_proc", ctl_cfg)))
        per_host = -(-cfg.num_stages // max(1, cfg.hosts))  # GPUs of a simulated host: its block of stages
        for k in range(self.local_hosts):
            devices = ("cpu",) if cfg.device == "cpu" else tuple(
                f"cuda:{g}" for g in range(k * per_host, (k + 1) * per_host))
            ac = AgentConfig(
                join=self.address, host_id=f"host-{k}", keys_dir=self.join_keys, devices=devices,
                advertise=local_address(k, self.local_hosts), log_dir=cfg.log_dir, log_level=cfg.log_level,
                parent_pid=pid, local=True, spare=k >= cfg.hosts, slot=k,
                threads=cfg.threads_per_stage() if cfg.device == "cpu" else 0,
            )
            self.table.slot_for(ac.host_id, k)
            self._spawn(self._child(ChildSpec("agent", k, "recovery.agent", ac), watched=False))
        await self._wait(self.controller_hello, "the controller's Hello")
        if cfg.http_port is not None:  # a client of the controller: started once it listens
            self._spawn(self._child(front_spec(cfg, self.addresses["client"], self.address, self.keys_dir, pid)))
        await self._wait(self.ready, "DeploymentReady from the controller (all stages placed, loaded and linked)")
        if cfg.streamer:  # up before serving starts, so status() always lists them
            await self._wait(self.streamers_up, "the streamers' Hellos")
        if cfg.http_port is not None:
            await self._wait(self.front_hello, "the HTTP front's Hello")

    # ------------------------------------------------------------------ hosts

    def _stage_config(self, index: int, plan: StagePlan, host: Host) -> str:
        cfg = self.cfg
        st = StageProcConfig(
            index=index, num_stages=cfg.num_stages, incarnation=0, model_dir=cfg.model_dir, layers=plan.layers,
            num_slots=plan.num_slots, max_seq_len=cfg.max_seq_len, supervisor_address="",
            controller_address=self.addresses["internal"], dtype=cfg.dtype,
            heartbeat_interval=cfg.heartbeat_interval, log_level=cfg.log_level,
            threads=cfg.stage_threads if not host.local else (cfg.threads_per_stage() if cfg.device == "cpu" else 0),
            microbatch_size=plan.microbatch_size, transport=cfg.transport,
            cuda_graphs=cfg.cuda_graphs and plan.pipeline != "prompt",  # graphs are for decode steps
            cudnn_attention=cfg.cudnn_attention, replicate=cfg.replicating, replica_lag=cfg.replica_lag,
            kv_takeover=cfg.kv_takeover, pipeline=plan.pipeline, first_index=plan.first, last_index=plan.last,
            swap=("on" if self.swap_plan is not None and self.swap_plan.on else cfg.swap_mode)
            if plan.pipeline != "prompt" else "off", swap_bandwidth=cfg.swap_bandwidth,
            swap_step_ms=cfg.swap_step_ms,
            swap_settled=self.swap_plan.reason if self.swap_plan is not None and cfg.swap_mode == "auto" else "",
            defer_tokens=None if cfg.defer_tokens == "auto" else cfg.defer_tokens == "on",
        )
        return encode_config(st)

    async def _send_assign(self, host: Host) -> None:
        splits = self.cfg.stage_plan(self.spec.num_layers)
        secrets = {i: security.read_secret(self.keys_dir, f"stage-{i}") for i in host.stages}
        stages = [StageAssignment(i, self.table.incarnation(i), device, self._stage_config(i, splits[i], host),
                                  secrets[i]) for i, device in sorted(host.stages.items())]
        await send(self.sock, self.codec, Assign(host.host_id, host.boot, stages), route=[host.route])

    async def _place(self, orphans: dict[int, str] | None = None) -> None:
        """Place what has no host yet (initially every stage, once enough hosts joined); send the hosts that got
        stages their Assign; tell the controller."""
        if "internal" not in self.addresses:
            return  # the controller's internal address goes into every stage's configuration
        if not self.table.placed_once:
            got = self.table.place_initial(self.cfg.wanted_hosts)
            if isinstance(got, str):
                if got != self.placement_note:
                    log.info("[hosts] %s", got)
                self.placement_note = got
                return
            self.placement_note = ""
            for host in got:
                log.info("[hosts] %s (%s) runs stages %s", host.host_id, host.address,
                         ", ".join(f"{i} on {d}" for i, d in sorted(host.stages.items())))
                await self._send_assign(host)
        elif orphans or self.table.unplaced:
            for host_id, stages in self.table.place(orphans or {}).items():
                host = self.table.hosts[host_id]
                log.warning("[hosts] stages %s now run on %s (%s)", stages, host_id, host.address)
                await self._send_assign(host)
            if self.table.unplaced:
                log.error("[hosts] degraded: no host can take stages %s; waiting for a host to join",
                          self.table.unplaced)
        await self._hosts_update()

    async def _hosts_update(self) -> None:
        await self._to_controller(HostsUpdate(self.table.infos(), list(self.table.unplaced)))
        self._check_streamers()

    def _check_streamers(self) -> None:
        if self.table.placed_once and all(("streamer", h.slot) in self.forwarded for h in self.table.live()
                                          if h.stages):
            self.streamers_up.set()

    async def _on_agent_hello(self, route: bytes, body: AgentHello) -> None:
        t = self.table
        if t.is_fenced(body.host_id, body.boot):
            await send(self.sock, self.codec, Fenced(body.host_id, body.boot, "this boot was declared dead"),
                       route=[route])
            return
        current = t.hosts.get(body.host_id)
        if current is not None and current.state != DEAD:
            if current.boot == body.boot:
                return  # said twice before our welcome reached it: the welcome is on its way
            await self._lose(current, f"a new agent process (boot {body.boot:x}) joined as {body.host_id}")
        try:
            slot = t.slot_for(body.host_id)
        except ValueError as e:
            noisy.warning("no-slot", body.host_id, "[hosts] refused %s: %s", body.host_id, e)
            await send(self.sock, self.codec, Fenced(body.host_id, body.boot, str(e)), route=[route])
            return
        host = Host(body.host_id, slot, body.boot, route, body.address, list(body.devices), body.pid,
                    body.hostname, body.local, body.spare)
        t.join(host)
        secrets = {n: security.read_secret(self.keys_dir, n) for n in (f"agent-{slot}", f"streamer-{slot}")}
        self.boots[body.host_id] = self.boots.get(body.host_id, -1) + 1  # this host id's agent processes so far
        await send(self.sock, self.codec, HostWelcome(host.host_id, host.boot, slot, self.public, secrets,
                                                      encode_config(self.policy), self.boots[body.host_id]),
                   route=[route])
        log.info("[hosts] %s joined (slot %d, %s, %s, pid %d)", host.host_id, slot, host.address,
                 ",".join(host.devices), host.pid)
        hello = Hello("agent", slot, body.pid, body.host_id, {"agent": body.address},
                      incarnation=self.boots[body.host_id], started=time.time())
        self.forwarded[("agent", slot)] = hello
        await self._to_controller(hello)
        await self._place()

    async def _lose(self, host: Host, why: str) -> None:
        """Declare `host` dead: fence its boot, tell the controller its processes are down, move its stages."""
        if host.state == DEAD:
            return
        t = self.table
        was = {i: t.last_incarnation(i) for i in host.stages}
        orphans = t.lose(host)
        log.error("[hosts] %s (%s) declared dead: %s; %s", host.host_id, host.address, why,
                  f"its stages {sorted(orphans)} move" if orphans else "it held no stage")
        await send(self.sock, self.codec, Fenced(host.host_id, host.boot, why), route=[host.route])
        for role in ("agent", "streamer"):
            if (role, host.slot) in self.forwarded:
                del self.forwarded[(role, host.slot)]
                await self._to_controller(ProcessDown(role, host.slot, 1 << 62, f"host {host.host_id} lost: {why}",
                                                      False))
        for i in sorted(orphans):
            await self._to_controller(ProcessDown("stage", i, was[i], f"host {host.host_id} lost: {why}", True))
        await self._place(orphans)

    async def _leases(self) -> None:
        """A host silent for heartbeat_timeout is dead (a real host cannot be killed from here: it is fenced)."""
        p = self.policy
        tick = time.monotonic()
        while True:
            await asyncio.sleep(p.heartbeat_interval / 4)
            now, last = time.monotonic(), tick
            tick = now
            if now - last > p.heartbeat_interval:
                # this process's own loop stalled (a loaded machine): the hosts' beats wait unread in the socket,
                # so their silence is ours; every lease starts over rather than a healthy host being fenced
                log.warning("[hosts] the supervisor's event loop stalled for %.1fs: host leases start over", now - last)
                for host in self.table.live():
                    host.last_beat = now
                continue
            for host in self.table.live():
                silent = now - host.last_beat
                if silent > p.heartbeat_timeout and not self.stopping:
                    await self._lose(host, f"silent for {silent:.1f}s (> heartbeat_timeout {p.heartbeat_timeout:g}s)")

    # ------------------------------------------------------------------ children (controller, local agents)

    async def _report_down(self, child: Child, incarnation: int, reason: str, restarting: bool) -> bool:
        if child.spec.role == "agent":
            host = self.table.hosts.get(child.spec.config.host_id)  # type: ignore[attr-defined]
            if host is not None and host.state != DEAD and host.pid == child.state.pid:
                await self._lose(host, f"its agent process {reason}")
            return True
        if child.spec.role == "controller" and "client" not in self.addresses:
            self._fail(f"{child.spec.name} {reason}: it died before it said where it listens: the deployment stopped")
            return False
        await self._to_controller(ProcessDown(child.spec.role, child.spec.index, incarnation, reason, restarting))
        return True

    def _respawn_spec(self, child: Child) -> ChildSpec:
        if child.spec.role == "controller":
            # The new incarnation binds where its predecessor did: clients and stages reconnect by themselves.
            # Clients resume their requests from the tokens they hold; stages say Hello again when it asks.
            cfg = replace(child.spec.config, client_bind=self.addresses["client"],  # type: ignore[type-var]
                          internal_bind=self.addresses["internal"])
            return replace(child.spec, config=cfg)
        if child.spec.role == "front" and self.http_address:  # the port it had: HTTP clients come back there
            port = int(self.http_address.rsplit(":", 1)[1])
            return replace(child.spec, config=replace(child.spec.config, port=port))  # type: ignore[type-var]
        return child.spec

    def _silent(self, child: Child, silent_s: float) -> None:
        """A local agent's silence is its host's: the lease (_leases) decides; it is never killed from here."""

    async def _on_exit(self, child: Child, incarnation: int, code: int) -> None:
        if child.spec.role == "agent" and code == EXIT_FENCED:
            # a fenced simulated host (as systemd would restart a real one): a new boot, a fresh host; not a
            # failure of the agent's own
            await self._report_down(child, incarnation, "was fenced", True)
            if not self.stopping and not self.stop.is_set():
                child.state.restarts += 1
                self._spawn(child, incarnation + 1)
            return
        await super()._on_exit(child, incarnation, code)

    async def _to_controller(self, body) -> None:  # type: ignore[no-untyped-def]
        ctl = self.children.get("controller-0")
        if ctl is not None and ctl.route is not None:
            await send(self.sock, self.codec, body, route=[ctl.route])

    # ------------------------------------------------------------------ messages

    async def _dispatch(self, route: bytes, msg: Received) -> None:
        if msg.env.sender == AGENT_KEY:
            await self._on_agent(route, msg)
        else:
            await self._on_message(route, msg)

    async def _on_agent(self, route: bytes, msg: Received) -> None:
        body = msg.body
        if isinstance(body, AgentHello):
            await self._on_agent_hello(route, body)
            return
        host = self.table.by_route(route)
        if host is None:  # a fenced boot (or one never welcomed) speaking: it must stop
            host_id, boot = (body.host_id, body.boot) if isinstance(body, HostBeat) else ("?", msg.env.incarnation)
            noisy.warning("fenced", route, "[hosts] %s (boot %x) is not a live host of this deployment: fencing it",
                          host_id, boot)
            await send(self.sock, self.codec, Fenced(host_id, boot, "not a live host of this deployment"),
                       route=[route])
            return
        host.last_beat = time.monotonic()
        if isinstance(body, HostBeat):
            host.processes = list(body.processes)
            await send(self.sock, self.codec, Heartbeat(body.seq), route=[route])
        elif isinstance(body, ProcessDown):
            await self._to_controller(body)
        elif isinstance(body, Hello):  # its streamer's
            self.forwarded[(body.role, body.index)] = body
            await self._to_controller(body)
            self._check_streamers()
        elif isinstance(body, FatalError):
            self._fail(f"host {host.host_id}: {body.message}", body.config)

    async def _on_message(self, route: bytes, msg: Received) -> None:
        child = self._from_child(route, msg)
        if child is not None and child.spec.role == "front" and isinstance(msg.body, Hello):
            await self._on_front_hello(child, msg.body)
        if child is None or child.spec.role != "controller":
            return
        body = msg.body
        if isinstance(body, Hello):
            self.addresses = dict(body.addresses)
            self.controller_hello.set()
            await send(self.sock, self.codec, Hello("supervisor", 0, os.getpid(), socket.gethostname(),
                                                    {"supervisor": self.address}, started=STARTED), route=[route])
            for hello in self.forwarded.values():  # a restarted controller knows nothing yet
                await send(self.sock, self.codec, hello, route=[route])
            await self._place()  # also tells it the hosts
        elif isinstance(body, DeploymentReady):
            self.ready.set()

    async def _on_front_hello(self, child: Child, body: Hello) -> None:
        """The HTTP front listens (its address, for the ready line); the controller lists it in status()."""
        self.http_address = body.addresses.get("http", "")
        self.front_hello.set()
        hello = msgspec.structs.replace(body, incarnation=child.state.incarnation)
        self.forwarded[("front", 0)] = hello
        await self._to_controller(hello)

    # ------------------------------------------------------------------ stopping

    async def _shutdown(self, reason: str) -> None:
        self.stopping = True
        ctl = self.children.get("controller-0")
        stand_in = None
        if self.fatal:
            if ctl is not None and ctl.exited and "client" in self.addresses:  # no controller to tell the clients
                stand_in = asyncio.ensure_future(self._stand_in(self.addresses["client"], self.fatal))
            else:
                await self._to_controller(FatalError(self.fatal))
        if not self.fatal:
            await self._drain_front(reason)
        for host in self.table.live():  # remote agents too: they stop their processes
            await send(self.sock, self.codec, Shutdown(reason), route=[host.route])
        await self._stop_children(list(self.children.values()), reason)
        if stand_in is not None:
            await stand_in
        for task in list(self.tasks):
            task.cancel()

    async def _drain_front(self, reason: str) -> None:
        """The HTTP front stops first: it refuses new requests and lets those in flight finish (its drain_timeout)
        while the controller and the stages still serve them; then the rest stops."""
        front = self.children.get("front-0")
        if front is None or front.proc is None or front.proc.returncode is not None:
            return
        if front.route is not None:
            await send(self.sock, self.codec, Shutdown(reason), route=[front.route])
        else:  # still starting: it cannot hear Shutdown yet
            with contextlib.suppress(ProcessLookupError):
                front.proc.send_signal(signal.SIGTERM)
        await self._reap([front], self.cfg.drain_timeout + self.policy.shutdown_timeout, None)

    async def _stand_in(self, address: str, message: str) -> None:
        """The controller is gone for good, and with it whoever could tell its clients. Its clients wait to
        reconnect, and ZeroMQ retries every ~100 ms: bind the client address in its place for
        `stop_notice_timeout` seconds and answer every client that speaks (a resume of its requests, a status
        query) with ServerStopping(message), so it fails its requests now rather than after its reconnect_timeout.
        Best effort: if the address cannot be bound, the clients find out when reconnect_timeout passes."""
        try:
            sock = make_socket(self.ctx, zmq.ROUTER, bind=address, keys=self.client_keys,
                               domain=security.CLIENT_DOMAIN)
        except zmq.ZMQError as e:
            log.warning("[shutdown] cannot stand in for the controller at %s (%s): its clients find out when their "
                        "reconnect_timeout passes", address, e.strerror)
            return
        told: set[bytes] = set()
        confirmed: set[bytes] = set()
        deadline = time.monotonic() + self.cfg.stop_notice_timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                if not await sock.poll(left * 1000):
                    break
                frames = await recv_frames(sock)
                try:
                    route, msg = decode_frames(self.codec, frames, route_frames=1, sender_is_peer=False)
                except ProtocolError:
                    continue
                if isinstance(msg.body, ServerStoppingAck):
                    confirmed.add(route[0])
                elif route[0] not in told:
                    told.add(route[0])
                    await send(sock, self.codec, ServerStopping(message), route=route)
        finally:
            sock.close(linger=0)  # what a client confirmed it read; the others had stop_notice_timeout
        log.info("[shutdown] stood in for the controller at %s for %.1fs: told %d client(s), %d confirmed", address,
                 self.cfg.stop_notice_timeout, len(told), len(confirmed))


def run_supervisor(cfg: DeploymentConfig, on_ready: Callable[[str, str], None] | None = None) -> int:
    """Run a whole deployment on this host until SIGINT/SIGTERM. Raises DeploymentError on failure."""
    from bus.child import install_uvloop

    # not sized by dejavu-serve's preflight (recovery/sizing.py): auto must be; an explicit CPU size costs nothing
    if cfg.microbatch_size == 0 or (not cfg.memory_plan and cfg.device == "cpu"):
        from recovery.sizing import resolve

        try:
            cfg, sizing = resolve(cfg, read_spec(Path(cfg.model_dir)))
        except ValueError as e:
            raise DeploymentError(str(e), True) from None
        for line in sizing.warnings:
            log.warning("[memory] %s", line)
        for line in sizing.lines():
            log.info("[memory] %s", line)
    install_uvloop()
    return asyncio.run(SupervisorProcess(cfg, on_ready).run())
