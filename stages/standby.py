"""A warm standby stage process (`dejavu-serve --standby`): started by its host's agent ahead of need, it does the
imports every stage process pays for at start (torch, the model code, the streamer's client: ~2.9 s of a 3.3 s
start on an H100 VM, measured 2026-12-07) and then waits. When a stage of that host dies, the agent hands this
process the new incarnation's command line instead of starting a fresh interpreter, so a restart begins with the
imports done. Given a warm-up order (`--standby-warmup`, on by default), it also warms the device of the stage it
would replace before it says ready - the CUDA context and the process's first kernels, run through one layer of that
stage's sizes and then freed (stages/device_warmup.py) - so a restart skips those too. Without one it touches no
device.

Protocol, over its standard streams: it writes `ready` on stdout once imported (and warmed); the agent writes one
JSON line {"argv": [...], "log": path or ""} on stdin: argv is the stage's own (`python -m stages.proc '<config>'`), log the
file its output goes to ("" keeps stderr). End of input (the agent stopping, or giving it up) makes it exit 0,
and it dies with the agent (PDEATHSIG) like any child.

    python -m stages.standby <agent pid> ['{"stage": "<StageProcConfig JSON>", "fraction": <--gpu-memory-fraction>}']
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from bus.child import die_with_parent

    die_with_parent(int(args[0]) if args else None)
    import stages.proc as proc  # the work a restart saves

    try:  # the GPU path's modules too, where they are installed (imported lazily by a fresh stage)
        import cupy  # noqa: F401
    except ImportError:
        pass
    if len(args) > 1:
        from bus.child import decode_config
        from stages.config import StageProcConfig
        from stages.device_warmup import DeviceGone, warm

        order = json.loads(args[1])
        try:
            warmed = warm(decode_config(StageProcConfig, order["stage"]), float(order.get("fraction", 0.9)))
        except DeviceGone as e:
            print(f"stages.standby: {e}; not ready (a restart starts a fresh process)", file=sys.stderr)
            return 3
        proc.WARMED = warmed.line()
        print(f"stages.standby: {proc.WARMED}", file=sys.stderr, flush=True)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # not needed: the agent is stopping
    proc.ASSIGNED_AT = time.monotonic()
    order = json.loads(line)
    stage_argv = order.get("argv") or []
    if stage_argv[1:3] != ["-m", "stages.proc"] or len(stage_argv) != 4:
        print(f"stages.standby: not a stage's command line: {stage_argv[:3]}", file=sys.stderr)
        return 2
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout.flush()
    log = order.get("log") or ""
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log else os.dup(2)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    return proc.main(stage_argv[3:])


if __name__ == "__main__":
    sys.exit(main())
