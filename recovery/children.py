"""What both supervisors do with their child processes: the cluster supervisor (`dejavu-serve`: the controller
and the local host agents, recovery/proc.py) and each host agent (`dejavu-agent`: its host's streamer and stages,
recovery/agent.py).

Spawning: each child is `python -m <module> '<config json>'` in a session of its own (a Ctrl-C at the terminal
reaches the supervisor alone, which stops its children in order), dying with its supervisor (PR_SET_PDEATHSIG,
bus/child.py), logging to `<log_dir>/<name>.log` or the supervisor's stderr.
Watching: a child's exit is seen at once (its process is awaited); a child silent for longer than
`heartbeat_timeout` (before its Hello: `startup_timeout`) is killed (SIGKILL), which turns a hang into an exit;
so is one busy with one step for longer than `hang_timeout`.
Restart budgets: every child has its own (recovery/supervisor.py): at most `max_restarts` restarts within
`restart_window` seconds, so failures of different processes spread over time never add up. Each restart of a
child that failed again soon waits a growing back-off first, on a timer of its own: heartbeats of the others are
watched meanwhile, and a stop abandons the wait. A child past its budget, or one that exits with EXIT_CONFIG
(it cannot start as configured), stops the supervisor with an error naming it and the settings.
Stopping: Shutdown to every child, then SIGTERM after `shutdown_timeout`, then SIGKILL after `kill_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq

from bus.child import EXIT_CONFIG, alive
from bus.codec import Codec, Received
from bus.errors import ProtocolError
from bus.logs import Throttled, peer_of
from bus.messages import FatalError, Heartbeat, Hello, Shutdown
from bus.sockets import decode_frames, recv_frames, send
from recovery.specs import ChildSpec, HostPolicy
from recovery.standby import Standby
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
from streamer.config import SHM_DIR, SHM_PREFIX

log = logging.getLogger(__name__)
noisy = Throttled(log)  # warnings about what peers send: rate-limited per (kind, peer)

RUN_DIR_PARENT = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
RUN_DIR_PREFIX = "dejavu-"  # dejavu-<supervisor pid>-<random>: local sockets and keys of one supervisor


class DeploymentError(RuntimeError):
    """The deployment could not start or could not go on; the message says why and what governs it.
    `config`: a process could not start as configured (the user must change a setting: exit code 2)."""

    def __init__(self, message: str, config: bool = False) -> None:
        super().__init__(message)
        self.config = config


class StartAborted(Exception):
    """A failure or a signal ended the start-up."""


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
    watched: bool = True  # killed when silent (False: a host agent, whose silence the host lease judges)
    retired: bool = False  # stopped on purpose (a stage moved away): not restarted


class ChildSupervisor:
    """Spawns, watches and restarts children; subclasses own the socket their children speak to and decide what a
    child's death means to the rest of the deployment (`_report_down`)."""

    def __init__(self, policy: HostPolicy, log_dir: str = "") -> None:
        self.policy = policy
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}
        self.stopping = False
        self.stop = asyncio.Event()
        self.fatal: str | None = None
        self.fatal_config = False  # the fatal error is a setting to change (exit code 2)
        self.config_error = asyncio.Event()  # some child said it cannot start as configured
        self.tasks: set[asyncio.Task[None]] = set()
        self.standbys: dict[str, Standby] = {}  # an agent's warm standby stage process per device (recovery/standby.py)
        self.sock: zmq.asyncio.Socket  # the ROUTER the children connect to (set by the subclass)
        self.codec: Codec

    # ------------------------------------------------------------------ hooks

    async def _report_down(self, child: Child, incarnation: int, reason: str, restarting: bool) -> bool:
        """A child died (`restarting`: it will be started again). Tell whoever must know; False: do not restart
        it (the subclass has stopped the deployment itself)."""
        return True

    def _respawn_spec(self, child: Child) -> ChildSpec:
        """The spec of the child's next incarnation (default: the same)."""
        return child.spec

    def _silent(self, child: Child, silent_s: float) -> None:
        """An unwatched child (`watched` False) was silent for longer than heartbeat_timeout."""

    async def _dispatch(self, route: bytes, msg: Received) -> None:
        """A message on the supervisor's socket (from a child, or a host agent)."""

    # ------------------------------------------------------------------ the socket

    async def _receive(self) -> None:
        while True:
            frames = await recv_frames(self.sock)
            try:
                route, msg = decode_frames(self.codec, frames, route_frames=1)
            except ProtocolError as e:
                noisy.warning("bad-frame", peer_of(frames), "[%s] dropped a bad frame from %s: %s", self.codec.sender,
                              peer_of(frames), e)
                continue
            try:
                await self._dispatch(route[0], msg)
            except Exception:  # a failing handler must not end this loop: heartbeats would stop counting
                log.exception("[%s] handling %s from %s failed", self.codec.sender, type(msg.body).__name__,
                              msg.env.sender)

    # ------------------------------------------------------------------ life

    def _request_stop(self, reason: str) -> None:
        log.info("[shutdown] %s", reason)
        self.stop.set()

    def _fail(self, message: str, config: bool = False) -> None:
        if self.fatal is None:
            self.fatal, self.fatal_config = message, config
            # a setting to change is the command's one line of output (serve_cli); anything else is an error
            log.log(logging.INFO if config else logging.ERROR, "[fatal] %s", message)
        self.stop.set()

    async def _wait(self, event: asyncio.Event, what: str, timeout: float | None = None) -> None:
        from bus.errors import DeadlineError

        timeout = self.policy.startup_timeout if timeout is None else timeout
        stop = asyncio.ensure_future(self.stop.wait())
        got = asyncio.ensure_future(event.wait())
        try:
            done, _ = await asyncio.wait({stop, got}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            got.cancel()
        if not done:
            raise DeadlineError(f"no {what} within {timeout:.0f}s (setting: startup_timeout)")
        if self.stop.is_set():
            raise StartAborted

    # ------------------------------------------------------------------ children

    def _child(self, spec: ChildSpec, watched: bool = True) -> Child:
        p = self.policy
        return Child(spec, ChildState(spec.name), RestartIntensity(p.max_restarts, p.restart_window),
                     Backoff(p.restart_backoff, p.restart_backoff_max, p.restart_backoff_reset), watched=watched)

    def _spawn(self, child: Child, incarnation: int = 0) -> None:
        self.children[child.spec.name] = child
        child.state.incarnation = incarnation
        child.state.state = STARTING if child.state.restarts == 0 else RESTARTING
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
        proc = None
        standby = self.standbys.get(getattr(child.spec.config, "device", "")) if child.spec.role == "stage" else None
        if standby is not None:  # imports done (and its device warmed): the restart starts at its work
            log_path = str(Path(self.log_dir) / f"{child.spec.name}.log") if self.log_dir else ""
            proc = await standby.take(argv, log_path)
            if proc is not None:
                log.info("[standby] %s incarnation %d: the standby pid %d takes it", child.spec.name, incarnation,
                         proc.pid)
        if proc is None:
            proc = await self._start_process(argv, env, child.spec.name)
        child.proc, child.state.pid = proc, proc.pid
        log.info("[spawn] %s incarnation %d pid %d", child.spec.name, incarnation, proc.pid)
        if self.stopping or child.retired:  # the stop began while it was being started: _shutdown's list missed it
            proc.kill()
        code = await proc.wait()
        child.exited = True
        child.state.exits.append(code)
        if self.stopping or child.retired or child.state.incarnation != incarnation:
            child.state.state = STOPPED
            return
        await self._on_exit(child, incarnation, code)

    async def _start_process(self, argv: list[str], env: dict[str, str], name: str) -> asyncio.subprocess.Process:
        out = None
        if self.log_dir:  # one file per process, every incarnation appended
            out = open(Path(self.log_dir) / f"{name}.log", "ab")  # noqa: SIM115 - the child's
        try:
            # a session of its own: a Ctrl-C at the terminal (SIGINT to the foreground process group) reaches the
            # supervisor alone, which stops the children in order - the controller telling its clients first -
            # instead of killing them all at once mid-sentence. They still die with the supervisor (PDEATHSIG).
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                        stderr=out, env=env, start_new_session=True)
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        return proc

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
        reason = describe_exit(code)
        p = self.policy
        now = time.monotonic()
        allowed = child.budget.allow(now)
        if not await self._report_down(child, incarnation, reason, allowed):
            child.state.state = FAILED
            return
        if not allowed:
            child.state.state = FAILED
            self._fail(f"{name} {reason}: failed {plural(child.budget.failures, 'time')} within "
                       f"{p.restart_window:g}s, past its budget of {plural(p.max_restarts, 'restart')} (settings: "
                       "max_restarts / restart_window, per process): the deployment stopped")
            return
        delay = child.backoff.next_delay(now)
        child.state.state = RESTARTING
        log.warning("[restart] %s incarnation %d %s: restart %d of %d within %gs, %s", name, incarnation, reason,
                    child.budget.failures, p.max_restarts, p.restart_window,
                    f"in {delay:g}s (back-off: restart_backoff / restart_backoff_max)" if delay else "now")
        if not await self._hold_off(delay) or child.retired:
            child.state.state = STOPPED
            return
        child.spec = self._respawn_spec(child)
        child.state.restarts += 1
        self._spawn(child, incarnation + 1)

    async def _hold_off(self, delay: float) -> bool:
        """Wait out a restart's back-off without holding anything else up (this is the dead child's own task);
        False when the deployment stops meanwhile (or already has): then there is no restart."""
        if delay > 0 and not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
        return not (self.stop.is_set() or self.stopping)

    def _child_of(self, sender: str) -> Child | None:
        return self.children.get(sender) or self.children.get(f"{sender}-0")

    def _from_child(self, route: bytes, msg: Received) -> Child | None:
        """What every child's message means to its supervisor (its Hello: where it is reached; Heartbeat: its
        state; FatalError: why it cannot start): the child, or None for a message to drop (an unknown sender, a
        stale incarnation, or one that is gone - only its FatalError still counts: it explains its exit code)."""
        child = self._child_of(msg.env.sender)
        if child is None or msg.env.incarnation != child.state.incarnation:
            return None
        body = msg.body
        if child.exited and not isinstance(body, FatalError):
            return None  # sent before it died, read after
        child.state.last_beat = time.monotonic()
        if isinstance(body, Hello):
            child.route, child.said_hello = route, True
            child.backoff.up(child.state.last_beat)
            child.state.state = SERVING
        elif isinstance(body, Heartbeat):
            child.state.state = body.state
            child.state.busy_s = body.busy_s
        elif isinstance(body, FatalError):
            child.cannot_start = body.message
            self.config_error.set()
        return child

    async def _watchdog(self) -> None:
        p = self.policy
        while True:
            await asyncio.sleep(p.heartbeat_interval / 2)
            now = time.monotonic()
            for child in list(self.children.values()):
                proc = child.proc
                if proc is None or proc.returncode is not None or self.stopping or child.retired:
                    continue
                if child.said_hello and child.state.busy_s > p.hang_timeout:
                    log.error("[health] %s busy with one step for %.0fs (> hang_timeout): killing it",
                              child.spec.name, child.state.busy_s)
                    child.state.busy_s = 0.0
                    proc.kill()
                    continue
                limit = p.heartbeat_timeout if child.said_hello else p.startup_timeout
                if now - child.state.last_beat > limit:
                    if not child.watched:
                        self._silent(child, now - child.state.last_beat)
                        continue
                    log.error("[health] %s silent for %.1fs (> %s %.1fs): killing it", child.spec.name,
                              now - child.state.last_beat,
                              "heartbeat_timeout" if child.said_hello else "startup_timeout", limit)
                    child.state.last_beat = now
                    proc.kill()

    async def _retire(self, child: Child) -> None:
        """Stop a child for good (it is not restarted): Shutdown, then the signals, in bounded time."""
        child.retired = True
        await self._stop_children([child], "retired")

    async def _stop_children(self, children: list[Child], reason: str) -> None:
        alive_ = [c for c in children if c.proc is not None and c.proc.returncode is None]
        for c in alive_:
            if c.route is not None:
                await send(self.sock, self.codec, Shutdown(reason), route=[c.route])
            elif c.proc is not None:  # still starting (importing, loading): it cannot hear Shutdown yet
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)
        await self._reap(alive_, self.policy.shutdown_timeout, None)
        await self._reap(alive_, self.policy.kill_timeout, signal.SIGTERM)
        await self._reap(alive_, self.policy.kill_timeout, signal.SIGKILL)

    async def _reap(self, children: list[Child], timeout: float, sig: signal.Signals | None) -> None:
        procs = [c.proc for c in children if c.proc is not None and c.proc.returncode is None]
        if not procs:
            return
        if sig is not None:
            log.warning("[shutdown] sending %s to %d process(es)", sig.name, len(procs))
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)
        await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=timeout)

    def _kill_all(self) -> None:
        """SIGKILL every child at once (a fenced host: its processes must not run one moment longer)."""
        for c in self.children.values():
            c.retired = True
            if c.proc is not None and c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
        for standby in self.standbys.values():  # nothing of this host starts any more
            standby.kill()


def describe_exit(code: int) -> str:
    return f"exited with code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def make_run_dir() -> str:
    """This supervisor's run directory (mode 0700): local sockets and keys; under /tmp, since an ipc:// path may not
    exceed ~107 bytes. Named after this pid, so that a later start can sweep it when this process is gone."""
    return tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=RUN_DIR_PARENT)


def remove_pools(paths: Iterable[Path], why: str) -> None:
    for path in paths:
        try:
            path.unlink()
            log.info("[kv] removed shared-memory KV pool %s (%s)", path.name, why)
        except OSError:
            pass


def start_janitor(run_dir: str, shm_glob: str) -> subprocess.Popen[bytes]:
    """The process that sweeps this supervisor's files if it dies unswept (recovery/janitor.py): its stdin is a
    pipe only this process holds (children are started with close_fds), in a session of its own."""
    return subprocess.Popen([sys.executable, "-m", "recovery.janitor", run_dir, shm_glob], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def sweep(run_dir: str, shm_prefix: str) -> None:
    """After every child is gone: remove the run directory and any shared-memory KV pool a stage killed at the end
    left behind (the streamer unlinks the pools it still held when it stopped)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    if shm_prefix:
        remove_pools(SHM_DIR.glob(f"{SHM_PREFIX}-{shm_prefix}-*"), "left behind by this deployment")


def sweep_dead_deployments() -> None:
    """Remove what supervisors that are gone left behind, where their janitor could not (it was killed too):
    shared-memory KV pools dejavu-kv-d<pid>-* and run directories /tmp/dejavu-<pid>-* whose pid no longer runs
    (a reused pid keeps its files: harmless)."""
    def owner(path: Path) -> str:
        return path.name[len(SHM_PREFIX) + 2:].split("-", 1)[0]

    remove_pools((p for p in SHM_DIR.glob(f"{SHM_PREFIX}-d*-*") if owner(p).isdigit() and not alive(int(owner(p)))),
                 "its deployment is gone")
    for d in Path(RUN_DIR_PARENT).glob(f"{RUN_DIR_PREFIX}*-*"):
        pid = d.name[len(RUN_DIR_PREFIX):].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            log.info("[sweep] removed %s (its deployment is gone)", d)
