"""The host agent's warm standby stage process (`dejavu-serve --standby auto|on|off`, issue 18's restart time).

A stage restarted as a fresh process pays for Python's start and its imports before it can load a weight: 2.9 s
of a 3.3 s start on an H100 VM (the stage's `[startup]` log line splits it). An agent with a standby keeps one
process that did those imports (stages/standby.py) and hands it the next stage it must start, then prepares
another, `delay` seconds later so the imports never compete with the restart they follow. One per device the
host's stages use: with `--standby-warmup` each warms its device for a stage there first (stages/device_warmup.py),
so a restart also skips the CUDA context and the first kernels. A standby that died or is not ready yet is skipped:
the stage starts as a fresh process, as without one. `auto` keeps a standby on hosts
whose stages compute on GPUs (their hosts have cores to spare for an idle interpreter, and a restart's seconds
are what replication saves); CPU hosts start fresh processes unless `on`.

Torch-free: the agent imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys

log = logging.getLogger(__name__)

STANDBY_MODES = ("auto", "on", "off")
READY_TIMEOUT = 300.0  # a standby that has not imported within this is given up (and replaced later)


def keeps_standby(mode: str, device: str) -> bool:
    """Whether an agent whose stages compute on `device` keeps a standby."""
    return mode == "on" or (mode == "auto" and device.startswith("cuda"))


class Standby:
    """The standby of one device of the host. warm: the warm-up order its process gets (stages/device_warmup.py:
    the stage it would replace, the stages' memory fraction; "" = none, it touches no device)."""

    def __init__(self, log_dir: str = "", delay: float = 5.0, warm: str = "") -> None:
        self.log_dir = log_dir
        self.delay = delay
        self.warm = warm
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.closed = False
        self.taken = 0  # stages started from a standby (status, tests)
        self._task: asyncio.Task[None] | None = None

    def want(self, delay: float | None = None) -> None:
        """Have a standby (started after `delay`, default the configured one) unless one is there or coming."""
        if self.closed or self.proc is not None or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.ensure_future(self._start(self.delay if delay is None else delay))

    async def _start(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.closed:
            return
        err = None
        if self.log_dir:
            err = open(os.path.join(self.log_dir, "standby.log"), "ab")  # noqa: SIM115 - the child holds its own
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "stages.standby", str(os.getpid()), *([self.warm] if self.warm else []),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True)
        except OSError as e:
            log.warning("[standby] cannot start a standby stage process: %s", e)
            return
        finally:
            if err is not None:
                err.close()
        self.proc, self.ready = proc, False
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
        except TimeoutError:
            line = b""
        if proc is not self.proc:
            return  # taken or closed meanwhile
        if line.strip() == b"ready":
            self.ready = True
            log.info("[standby] pid %d ready (imports done%s)", proc.pid, ", device warmed" if self.warm else "")
            return
        log.warning("[standby] pid %d did not become ready (exit %s); stages restart as fresh processes",
                    proc.pid, proc.returncode)
        await self._discard(proc)

    async def take(self, argv: list[str], log_path: str) -> asyncio.subprocess.Process | None:
        """The ready standby, told to become the stage of `argv` (its output to `log_path`); None if there is no
        ready one (the caller starts a fresh process). Another standby is prepared after the delay."""
        proc = self.proc
        if proc is None or not self.ready or proc.returncode is not None or proc.stdin is None:
            return None
        self.proc, self.ready = None, False
        try:
            proc.stdin.write(json.dumps({"argv": argv, "log": log_path}).encode() + b"\n")
            await asyncio.wait_for(proc.stdin.drain(), 5.0)
            proc.stdin.close()
        except (OSError, TimeoutError, ConnectionError) as e:
            log.warning("[standby] pid %d could not take its stage (%s): starting a fresh process", proc.pid, e)
            await self._discard(proc)
            self.want()
            return None
        self.taken += 1
        self.want()
        return proc

    async def _discard(self, proc: asyncio.subprocess.Process) -> None:
        if self.proc is proc:
            self.proc, self.ready = None, False
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)

    def kill(self) -> None:
        """No standby any more, at once (a fenced host): the one waiting is killed."""
        self.closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def close(self) -> None:
        """No standby any more: the one waiting is told so (end of input) and, if it lingers, killed."""
        self.closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError, ConnectionError):
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 2.0)
        except TimeoutError:
            await self._discard(proc)
