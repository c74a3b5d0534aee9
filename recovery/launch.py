"""Start a real deployment (`bin/dejavu-serve` as a subprocess) and stop it cleanly — for tests, the demo
and the benchmarks, which all drive the system exactly as a user would.

`Deployment.start(...)` returns once the ready line is printed (or raises within its deadline); `stop()`
sends SIGINT and checks the whole process tree is gone in bounded time.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from bus.child import alive

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "bin" / "dejavu-serve"


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    out, frontier = set(), {pid}
    while frontier:
        nxt = {p for p, pp in parents.items() if pp in frontier}
        out |= nxt
        frontier = nxt
    return out


class Deployment:
    def __init__(self, proc: subprocess.Popen[str], address: str, log: IO[bytes], http: str = "") -> None:
        self.proc, self.address, self._log = proc, address, log
        self.http = http  # the OpenAI API's base URL, http(s)://host:port (with --http-port; else "")

    @classmethod
    def start(cls, model: Path | str, stages: int, *args: str, timeout: float = 120.0,
              log_level: str = "INFO") -> Deployment:
        # the deployment's stderr goes to a file with no name: nothing is left behind, however this process ends
        log = tempfile.TemporaryFile()
        cmd = [sys.executable, str(SERVE), "--model", str(model), "--stages", str(stages), "--log-level", log_level,
               *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"ready (tcp://\S+)", line)
            if m:
                http = re.search(r"OpenAI API at (https?://\S+)/v1", line)
                return cls(proc, m.group(1), log, http.group(1) if http else "")
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"deployment did not become ready within {timeout}s:\n{read_all(log)[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        tree = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError(f"dejavu-serve did not stop within {timeout}s") from None
        deadline = time.monotonic() + 10
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in tree if alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        if left:
            raise RuntimeError(f"processes left behind after shutdown: {left}")
        return code

    def logs(self) -> str:
        """Everything the deployment wrote to stderr so far."""
        return read_all(self._log)


def read_all(f: IO[bytes]) -> str:
    """The whole file, read without moving its offset (the deployment's processes write at that offset)."""
    fd = f.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
