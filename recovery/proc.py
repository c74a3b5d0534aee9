"""The supervisor: starts a deployment's processes, watches them, restarts failed ones, stops everything in
bounded time. `run_supervisor(config, on_ready)` is what `bin/dejavu-serve` calls.

Start: bind the supervisor socket, fix the addresses the children need (the controller's internal socket, the
streamer's control socket: ipc:// paths in the run directory), start the janitor, then the controller, the host's
KV streamer and every stage at once (each spends seconds importing torch and loading; ZeroMQ delivers once the
binder is up) -> wait for the controller's Hello (it says where clients connect), the streamer's Hello and the
controller's DeploymentReady -> `on_ready(address)`.
Watching: a child's exit is seen at once (its process is awaited); a child silent for longer than
`heartbeat_timeout` is killed (SIGKILL), which turns a hang into an exit. A dead stage or streamer is reported
to the controller (ProcessDown) and restarted as a new incarnation. So is a dead controller: it binds the same
addresses, stages register again when it asks them, and clients resume their requests from the tokens they
hold.

Restart budgets: every process has its own (recovery/supervisor.py): at most `max_restarts` restarts of that
process within `restart_window` seconds, so failures of different processes spread over time never add up.
Each restart of a process that failed again soon waits a growing back-off first (`restart_backoff`, doubling up
to `restart_backoff_max`; immediate again once it stayed up `restart_backoff_reset` seconds), on a timer of its
own: heartbeats of the others are watched meanwhile, and a stop abandons the wait. A process past its budget
stops the deployment with an error naming it and the settings: the controller fails every request in flight
with that message and tells every client it knows (ServerStopping) before it exits. When the controller itself
is gone for good, the supervisor stands in for it at the client address for `stop_notice_timeout` seconds:
clients waiting to reconnect come back to it (within ZeroMQ's reconnect interval), and it answers each with
ServerStopping, so they too fail their requests at once rather than when their reconnect_timeout passes.
Stopping: Shutdown to every child, then SIGTERM after `shutdown_timeout`, then SIGKILL after `kill_timeout`: no
process is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
import zmq

from bus import security
from bus.child import EXIT_CONFIG, STARTED, alive
from bus.codec import Codec, Received
from bus.controller_proc import ControllerConfig
from bus.errors import DeadlineError, ProtocolError
from bus.logs import Throttled, peer_of
from bus.messages import (
    DeploymentReady,
    FatalError,
    Heartbeat,
    Hello,
    ProcessDown,
    ServerStopping,
    ServerStoppingAck,
    Shutdown,
)
from bus.security import CONTROLLER, SUPERVISOR
from bus.sockets import bound_address, context, decode_frames, make_socket, recv_frames, send
from recovery.specs import ChildSpec, DeploymentConfig
from recovery.supervisor import (
    FAILED,
    RESTARTING,
    SERVING,
    STARTING,
    STOPPED,
    Backoff,
    ChildState,
    RestartIntensity,
)
from stages.config import StageProcConfig
from stages.models.spec import read_spec, split_layers
from streamer.config import SHM_DIR, SHM_PREFIX, StreamerConfig

log = logging.getLogger(__name__)
noisy = Throttled(log)  # warnings about what peers send: rate-limited per (kind, peer)


STREAMER = "streamer-0"  # this host's streamer (one per host)
RUN_DIR_PARENT = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
RUN_DIR_PREFIX = "dejavu-"  # dejavu-<supervisor pid>-<random>: local sockets of one deployment


class DeploymentError(RuntimeError):
    """The deployment could not start or could not go on; the message says why and what governs it.
    `config`: a process could not start as configured (the user must change a setting: exit code 2)."""

    def __init__(self, message: str, config: bool = False) -> None:
        super().__init__(message)
        self.config = config


class StartAborted(Exception):
    """A failure or a signal ended the start-up; `fatal` says which."""


@dataclass
class Child:
    spec: ChildSpec
    state: ChildState
    budget: RestartIntensity  # its own: restarts of this process only
    backoff: Backoff
    proc: asyncio.subprocess.Process | None = None
    route: bytes | None = None
    said_hello: bool = False
    exited: bool = False  # its incarnation is gone (it may be waiting out its back-off): its heartbeats are stale
    cannot_start: str = ""  # its FatalError: why it cannot start as configured


class SupervisorProcess:
    def __init__(self, cfg: DeploymentConfig, on_ready: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.on_ready = on_ready or (lambda address: None)
        self.codec = Codec("supervisor", 0)
        self.ctx = context()
        self.children: dict[str, Child] = {}
        self.stopping = False
        self.stop = asyncio.Event()
        self.fatal: str | None = None
        self.fatal_config = False  # the fatal error is a setting to change (exit code 2)
        self.config_error = asyncio.Event()  # some child said it cannot start as configured
        self.ready = asyncio.Event()
        self.controller_hello = asyncio.Event()
        self.streamer_hello = asyncio.Event()
        self.addresses: dict[str, str] = {}
        self.forwarded: dict[str, Hello] = {}  # other processes' Hellos the controller lists in status()
        self.shm_prefix = f"d{os.getpid()}"  # this deployment's shared-memory KV pools: dejavu-kv-d<pid>-*
        self.tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop, f"signal {signal.Signals(sig).name}")
        sweep_dead_deployments()
        # local sockets and keys of this deployment (mode 0700); under /tmp, since an ipc:// path may not exceed
        # ~107 bytes
        self.run_dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=RUN_DIR_PARENT)
        self.janitor = start_janitor(self.run_dir, f"{SHM_PREFIX}-{self.shm_prefix}-*")
        # every process's own CURVE keypair: only the deployment's members can connect to any of its internal
        # sockets, and each message's sender is the authenticated process (bus/security.py)
        self.keys_dir = f"{self.run_dir}/keys"
        security.generate(self.keys_dir, self._process_names())
        self.keys = security.load(self.keys_dir, SUPERVISOR)
        self.auth = security.start_authenticator(self.ctx, self.keys)
        self.sock = make_socket(self.ctx, zmq.ROUTER, bind="tcp://127.0.0.1:0", keys=self.keys)
        self.address = bound_address(self.sock)
        receiver = asyncio.ensure_future(self._receive())
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            await self._start()
            self.on_ready(self.addresses["client"])
            await self.stop.wait()
        except StartAborted:
            pass
        except DeadlineError as e:
            self.fatal = str(e)
        finally:
            await self._shutdown(self.fatal or "stopping")
            receiver.cancel()
            watchdog.cancel()
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy(linger=0)
            self._sweep()
            self.janitor.kill()  # swept: nothing is left for it (closing its pipe would make it sweep again)
            self.janitor.wait()
        if self.fatal:
            raise DeploymentError(self.fatal, self.fatal_config)
        return 0

    def _process_names(self) -> list[str]:
        names = [SUPERVISOR, CONTROLLER, *(f"stage-{i}" for i in range(self.cfg.num_stages))]
        return [*names, STREAMER] if self.cfg.streamer else names

    async def _start(self) -> None:
        """Start every process at once: each spends seconds importing torch and loading, and none needs another
        to be up first (sockets connect to addresses fixed here and ZeroMQ delivers once the peer binds). The
        client address is the controller's to choose (--port 0), so the ready line waits for its Hello."""
        cfg, pid = self.cfg, os.getpid()
        spec = read_spec(Path(cfg.model_dir))
        internal = f"ipc://{self.run_dir}/controller.internal"
        ctl_cfg = ControllerConfig(
            model_dir=cfg.model_dir, vocab_size=spec.vocab_size, eos_token_ids=spec.eos_token_ids,
            num_stages=cfg.num_stages, microbatch_size=cfg.microbatch_size,
            num_microbatches=cfg.microbatches, max_seq_len=cfg.max_seq_len, supervisor_address=self.address,
            client_bind=f"tcp://{cfg.host}:{cfg.port}", internal_bind=internal, prefill_chunk=cfg.prefill_chunk,
            max_waiting=cfg.max_waiting, client_timeout=cfg.client_timeout, step_timeout=cfg.step_timeout,
            queue_timeout=cfg.queue_timeout,
            heartbeat_interval=cfg.heartbeat_interval, supervisor_pid=pid, log_level=cfg.log_level,
            flush_timeout=cfg.stop_notice_timeout, keys_dir=self.keys_dir,
        )
        self._spawn(self._child(ChildSpec("controller", 0, "bus.controller_proc", ctl_cfg)))
        streamer_address = ""
        if cfg.streamer:
            # a fixed local address (not an ephemeral port): stages connect before it is up, and a restarted
            # streamer binds it again - and adopts the stage pools its predecessor recorded beside it (their
            # shared memory outlives a streamer; the run directory and /dev/shm are swept at the end)
            streamer_address = f"ipc://{self.run_dir}/{STREAMER}.control"
            sc = StreamerConfig(
                name=STREAMER, control_address=streamer_address, data_address=f"tcp://{cfg.host}:0",
                keys_dir=self.keys_dir,
                manifest=f"{self.run_dir}/streamer-0.pools.json",
                swap_bytes=cfg.swap_bytes, replica_bytes=cfg.replica_bytes, receive_bytes=cfg.receive_bytes,
                heartbeat_interval_s=cfg.heartbeat_interval, supervisor_address=self.address, supervisor_pid=pid,
                log_level=cfg.log_level,
            )
            self._spawn(self._child(ChildSpec("streamer", 0, "streamer", sc)))
        for i, layers in enumerate(split_layers(spec.num_layers, cfg.num_stages)):
            device = cfg.device if cfg.device == "cpu" else f"cuda:{i}"
            st = StageProcConfig(
                index=i, num_stages=cfg.num_stages, incarnation=0, model_dir=cfg.model_dir, layers=layers,
                num_slots=cfg.num_slots, max_seq_len=cfg.max_seq_len, supervisor_address=self.address,
                controller_address=internal, dtype=cfg.dtype, device=device,
                heartbeat_interval=cfg.heartbeat_interval, supervisor_pid=pid, log_level=cfg.log_level,
                threads=cfg.threads_per_stage() if cfg.device == "cpu" else 0,
                microbatch_size=cfg.microbatch_size, cuda_graphs=cfg.cuda_graphs, transport=cfg.transport,
                cudnn_attention=cfg.cudnn_attention,
                streamer_address=streamer_address, shm_prefix=self.shm_prefix, keys_dir=self.keys_dir,
            )
            self._spawn(self._child(ChildSpec("stage", i, "stages.proc", st)))
        await self._wait(self.controller_hello, "the controller's Hello")
        if cfg.streamer:  # up before serving starts, so status() always lists it
            await self._wait(self.streamer_hello, "the streamer's Hello")
        await self._wait(self.ready, "DeploymentReady from the controller (all stages loaded and linked)")

    async def _wait(self, event: asyncio.Event, what: str) -> None:
        stop = asyncio.ensure_future(self.stop.wait())
        got = asyncio.ensure_future(event.wait())
        try:
            done, _ = await asyncio.wait({stop, got}, timeout=self.cfg.startup_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            got.cancel()
        if not done:
            raise DeadlineError(f"no {what} within {self.cfg.startup_timeout:.0f}s (setting: startup_timeout)")
        if self.stop.is_set():
            raise StartAborted

    def _request_stop(self, reason: str) -> None:
        log.info("[shutdown] %s", reason)
        self.stop.set()

    def _fail(self, message: str, config: bool = False) -> None:
        if self.fatal is None:
            self.fatal, self.fatal_config = message, config
            # a setting to change is the command's one line of output (serve_cli); anything else is an error
            log.log(logging.INFO if config else logging.ERROR, "[fatal] %s", message)
        self.stop.set()

    # ------------------------------------------------------------------ children

    def _child(self, spec: ChildSpec) -> Child:
        cfg = self.cfg
        return Child(spec, ChildState(spec.name), RestartIntensity(cfg.max_restarts, cfg.restart_window),
                     Backoff(cfg.restart_backoff, cfg.restart_backoff_max, cfg.restart_backoff_reset))

    def _spawn(self, child: Child, incarnation: int = 0) -> None:
        self.children[child.spec.name] = child
        child.state.incarnation = incarnation
        child.state.state = STARTING if incarnation == 0 else RESTARTING
        child.said_hello = child.exited = False
        child.route = None
        child.state.last_beat = time.monotonic()
        task = asyncio.ensure_future(self._run_child(child, incarnation))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_child(self, child: Child, incarnation: int) -> None:
        if self.stop.is_set():  # stopping: nothing new starts
            child.state.state = STOPPED
            return
        argv = child.spec.argv(incarnation)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        out = None
        if self.cfg.log_dir:  # one file per process, every incarnation appended
            out = open(Path(self.cfg.log_dir) / f"{child.spec.name}.log", "ab")  # noqa: SIM115 - the child's
        try:
            # a session of its own: a Ctrl-C at the terminal (SIGINT to the foreground process group) reaches the
            # supervisor alone, which stops the children in order - the controller telling its clients first -
            # instead of killing them all at once mid-sentence. They still die with the supervisor (PDEATHSIG).
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                        stderr=out, env=env, start_new_session=True)
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        child.proc, child.state.pid = proc, proc.pid
        log.info("[spawn] %s incarnation %d pid %d", child.spec.name, incarnation, proc.pid)
        if self.stopping:  # the stop began while it was being started: _shutdown's list missed it
            proc.kill()
        code = await proc.wait()
        child.exited = True
        child.state.exits.append(code)
        if self.stopping or child.state.incarnation != incarnation:
            child.state.state = STOPPED
            return
        await self._on_exit(child, incarnation, code)

    async def _on_exit(self, child: Child, incarnation: int, code: int) -> None:
        name = child.spec.name
        if code == EXIT_CONFIG:  # it cannot start as configured: a new incarnation would fail the same way
            if not child.cannot_start:  # its FatalError left before it exited; the socket may deliver it later
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.config_error.wait(), 2.0)
            child.state.state = FAILED
            self._fail(child.cannot_start or f"{name} could not start as configured (exit code {code}; see its log)",
                       config=True)
            return
        reason = f"exited with code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
        now = time.monotonic()
        allowed = child.budget.allow(now)
        budget = (f"failed {plural(child.budget.failures, 'time')} within {self.cfg.restart_window:g}s, past its "
                  f"budget of {plural(self.cfg.max_restarts, 'restart')} (settings: max_restarts / restart_window, "
                  "per process)")
        if child.spec.role == "controller":
            if not allowed or "client" not in self.addresses:
                child.state.state = FAILED
                why = budget if not allowed else "it died before it said where it listens"
                self._fail(f"{name} {reason}: {why}: the deployment stopped")
                return
        else:
            await self._to_controller(ProcessDown(child.spec.role, child.spec.index, incarnation, reason, allowed))
            if not allowed:
                child.state.state = FAILED
                self._fail(f"{name} {reason}: {budget}: the deployment stopped")
                return
        delay = child.backoff.next_delay(now)
        child.state.state = RESTARTING
        log.warning("[restart] %s incarnation %d %s: restart %d of %d within %gs, %s", name, incarnation, reason,
                    child.budget.failures, self.cfg.max_restarts, self.cfg.restart_window,
                    f"in {delay:g}s (back-off: restart_backoff / restart_backoff_max)" if delay else "now")
        if not await self._hold_off(delay):
            child.state.state = STOPPED
            return
        if child.spec.role == "controller":
            # The new incarnation binds where its predecessor did: clients and stages reconnect by themselves.
            # Clients resume their requests from the tokens they hold; stages say Hello again when it asks.
            cfg = replace(child.spec.config, client_bind=self.addresses["client"],  # type: ignore[type-var]
                          internal_bind=self.addresses["internal"])
            child.spec = replace(child.spec, config=cfg)
        child.state.restarts += 1
        self._spawn(child, incarnation + 1)

    async def _hold_off(self, delay: float) -> bool:
        """Wait out a restart's back-off without holding anything else up (this is the dead child's own task);
        False when the deployment stops meanwhile (or already has): then there is no restart."""
        if delay > 0 and not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
        return not (self.stop.is_set() or self.stopping)

    async def _to_controller(self, body) -> None:  # type: ignore[no-untyped-def]
        ctl = self.children.get("controller-0")
        if ctl is not None and ctl.route is not None:
            await send(self.sock, self.codec, body, route=[ctl.route])

    # ------------------------------------------------------------------ messages

    async def _receive(self) -> None:
        while True:
            frames = await recv_frames(self.sock)
            try:
                route, msg = decode_frames(self.codec, frames, route_frames=1)
            except ProtocolError as e:
                noisy.warning("bad-frame", peer_of(frames), "[supervisor] dropped a bad frame from %s: %s",
                              peer_of(frames), e)
                continue
            try:
                await self._on_message(route[0], msg)
            except Exception:  # a failing handler must not end this loop: heartbeats would stop counting
                log.exception("[supervisor] handling %s from %s failed", type(msg.body).__name__, msg.env.sender)

    async def _on_message(self, route: bytes, msg: Received) -> None:
        sender = msg.env.sender
        child = self.children.get(sender) or self.children.get(f"{sender}-0")
        if child is None or msg.env.incarnation != child.state.incarnation:
            return  # unknown sender or a stale incarnation
        body = msg.body
        if child.exited and not isinstance(body, FatalError):
            return  # sent before it died, read after (its FatalError explains its exit code: _on_exit waits for it)
        child.state.last_beat = time.monotonic()
        if isinstance(body, Hello):
            child.route, child.said_hello = route, True
            child.backoff.up(child.state.last_beat)
            if child.spec.role == "streamer":
                self.streamer_hello.set()
                # for status(): the controller lists every process, with the incarnation the supervisor knows
                self.forwarded[child.spec.name] = msgspec.structs.replace(body, incarnation=child.state.incarnation)
                await self._to_controller(self.forwarded[child.spec.name])
            if child.spec.role == "controller":
                self.addresses = dict(body.addresses)
                child.state.state = SERVING
                self.controller_hello.set()
                await send(self.sock, self.codec, Hello("supervisor", 0, os.getpid(), socket.gethostname(),
                                                        {"supervisor": self.address}, started=STARTED),
                           route=[route])
                for hello in self.forwarded.values():  # a restarted controller knows nothing yet
                    await send(self.sock, self.codec, hello, route=[route])
        elif isinstance(body, Heartbeat):
            child.state.state = body.state
            child.state.busy_s = body.busy_s
        elif isinstance(body, DeploymentReady) and child.spec.role == "controller":
            self.ready.set()
        elif isinstance(body, FatalError):
            child.cannot_start = body.message
            self.config_error.set()

    async def _watchdog(self) -> None:
        interval = self.cfg.heartbeat_interval / 2
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for child in list(self.children.values()):
                proc = child.proc
                if proc is None or proc.returncode is not None or self.stopping:
                    continue
                if child.said_hello and child.state.busy_s > self.cfg.hang_timeout:
                    log.error("[health] %s busy with one step for %.0fs (> hang_timeout): killing it",
                              child.spec.name, child.state.busy_s)
                    child.state.busy_s = 0.0
                    proc.kill()
                    continue
                limit = self.cfg.heartbeat_timeout if child.said_hello else self.cfg.startup_timeout
                if now - child.state.last_beat > limit:
                    log.error("[health] %s silent for %.1fs (> %s %.1fs): killing it", child.spec.name,
                              now - child.state.last_beat,
                              "heartbeat_timeout" if child.said_hello else "startup_timeout", limit)
                    child.state.last_beat = now
                    proc.kill()

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
        alive = [c for c in self.children.values() if c.proc is not None and c.proc.returncode is None]
        for c in alive:
            if c.route is not None:
                await send(self.sock, self.codec, Shutdown(reason), route=[c.route])
            elif c.proc is not None:  # still starting (importing, loading): it cannot hear Shutdown yet
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)
        await self._reap(alive, self.cfg.shutdown_timeout, None)
        await self._reap(alive, self.cfg.kill_timeout, signal.SIGTERM)
        await self._reap(alive, self.cfg.kill_timeout, signal.SIGKILL)
        if stand_in is not None:
            await stand_in
        for task in list(self.tasks):
            task.cancel()

    async def _stand_in(self, address: str, message: str) -> None:
        """The controller is gone for good, and with it whoever could tell its clients. Its clients wait to
        reconnect, and ZeroMQ retries every ~100 ms: bind the client address in its place for
        `stop_notice_timeout` seconds and answer every client that speaks (a resume of its requests, a status
        query) with ServerStopping(message), so it fails its requests now rather than after its reconnect_timeout.
        Best effort: if the address cannot be bound, the clients find out when reconnect_timeout passes."""
        try:
            sock = make_socket(self.ctx, zmq.ROUTER, bind=address)
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
                    route, msg = decode_frames(self.codec, frames, route_frames=1)
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

    def _sweep(self) -> None:
        """After every child is gone: remove this deployment's local sockets and any shared-memory KV pool a
        stage killed at the end left behind (the streamer unlinks the pools it still held when it stopped)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        remove_pools(SHM_DIR.glob(f"{SHM_PREFIX}-{self.shm_prefix}-*"), "left behind by this deployment")

    async def _reap(self, children: list[Child], timeout: float, sig: signal.Signals | None) -> None:
        procs = [c.proc for c in children if c.proc is not None and c.proc.returncode is None]
        if not procs:
            return
        if sig is not None:
            log.warning("[shutdown] sending %s to %d process(es)", sig.name, len(procs))
            for p in procs:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass
        await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=timeout)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def remove_pools(paths: Iterable[Path], why: str) -> None:
    for path in paths:
        try:
            path.unlink()
            log.info("[kv] removed shared-memory KV pool %s (%s)", path.name, why)
        except OSError:
            pass


def start_janitor(run_dir: str, shm_glob: str) -> subprocess.Popen[bytes]:
    """The process that sweeps this deployment's files if the supervisor dies unswept (recovery/janitor.py): its
    stdin is a pipe only this process holds (children are started with close_fds), in a session of its own."""
    return subprocess.Popen([sys.executable, "-m", "recovery.janitor", run_dir, shm_glob], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def sweep_dead_deployments() -> None:
    """Remove what deployments whose supervisor is gone left behind, where their janitor could not (it was
    killed too): shared-memory KV pools dejavu-kv-d<supervisor pid>-* and run directories
    /tmp/dejavu-<supervisor pid>-* whose pid no longer runs (a reused pid keeps its files: harmless)."""
    def owner(path: Path) -> str:
        return path.name[len(SHM_PREFIX) + 2:].split("-", 1)[0]

    remove_pools((p for p in SHM_DIR.glob(f"{SHM_PREFIX}-d*-*") if owner(p).isdigit() and not alive(int(owner(p)))),
                 "its deployment is gone")
    for d in Path(RUN_DIR_PARENT).glob(f"{RUN_DIR_PREFIX}*-*"):
        pid = d.name[len(RUN_DIR_PREFIX):].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            log.info("[sweep] removed %s (its deployment is gone)", d)


def run_supervisor(cfg: DeploymentConfig, on_ready: Callable[[str], None] | None = None) -> int:
    """Run a whole deployment on this host until SIGINT/SIGTERM. Raises DeploymentError on failure."""
    from bus.child import install_uvloop

    install_uvloop()
    return asyncio.run(SupervisorProcess(cfg, on_ready).run())
