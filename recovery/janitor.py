"""The janitor: removes what a deployment leaves on this host when its supervisor dies without sweeping (kill -9,
an OOM kill): the run directory (local sockets) and the shared-memory KV pools (/dev/shm/dejavu-kv-d<pid>-*).

The supervisor starts it first, in a session of its own (so a Ctrl-C or a signal to the supervisor's process
group does not reach it), holding the only write end of a pipe that is the janitor's stdin. The supervisor's
death, however it happens, closes that pipe: the janitor reads EOF, sweeps, and exits. The children die with
the supervisor too (PR_SET_PDEATHSIG, bus/child.py), a moment later: the janitor sweeps again after them. After a
clean stop the supervisor has swept already and the janitor finds nothing. Runs no event loop and imports
nothing heavy: `python -m recovery.janitor RUN_DIR SHM_GLOB`.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

from streamer.config import SHM_DIR

AFTER_CHILDREN_S = (0.5, 2.0)  # sweep again after these delays: children still dying may hold or make files


def sweep(run_dir: Path, shm_glob: str) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    for path in SHM_DIR.glob(shm_glob):
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m recovery.janitor RUN_DIR SHM_GLOB (stdin: a pipe the supervisor holds)",
              file=sys.stderr)
        return 2
    run_dir, shm_glob = Path(args[0]), args[1]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the pipe's EOF ends it
    while sys.stdin.buffer.read(4096):  # the supervisor never writes: this returns at its death
        pass
    sweep(run_dir, shm_glob)
    for delay in AFTER_CHILDREN_S:
        time.sleep(delay)  # no event says "every child is gone": they are not ours to wait for
        sweep(run_dir, shm_glob)
    return 0


if __name__ == "__main__":
    sys.exit(main())
