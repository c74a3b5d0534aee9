"""`dejavu-agent`: the host agent of one machine. It joins a deployment's controller host (`dejavu-serve
--agent-bind`), runs the stages placed on this machine and its KV streamer, restarts them when they fail, and
holds this host's lease (recovery/agent.py).

Exit codes: 0 after a stop (SIGTERM, or the deployment stopped), 2 when it cannot start as asked (one line on
stderr says what to change), 3 when it was fenced - the controller host declared this host dead, or this host
lost the controller host for longer than the heartbeat timeout: every process of this host was stopped; start
it again (systemd's Restart=always does) and it joins as a fresh host. 1 when a process of this host failed
past its restart budget (the deployment stopped).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-agent", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--join", required=True, help="the controller host's agent address, tcp://HOST:PORT")
    p.add_argument("--host-id", default=socket.gethostname(), help="this host's name in the deployment")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpus", default=None, help="GPUs this host offers stages, e.g. 0,1 (one stage each)")
    where.add_argument("--device", default="cpu", choices=["cpu"], help="offer the CPU (any number of stages)")
    p.add_argument("--advertise", default=None,
                   help="the address this host's processes bind and give their peers (default: the address "
                        "this machine uses to reach --join)")
    p.add_argument("--keys", required=True,
                   help="the deployment's keys directory (dejavu-keys generate): this agent's `agent` key and "
                        "the `server` public key")
    p.add_argument("--stage-threads", type=int, default=0, help="torch threads per CPU stage (0: cores / stages)")
    p.add_argument("--log-dir", default=None, help="write each process's log to DIR/<process>.log")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS)
    return p


def route_to(address: str) -> str:
    """The local address this machine uses to reach tcp://HOST:PORT (no packet is sent: a UDP connect)."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, int(port)))
        return s.getsockname()[0]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def usage(message: str) -> int:
        print(f"dejavu-agent: error: {message}", file=sys.stderr)
        return 2

    from bus import security
    from recovery.agent import AGENT_KEY, SERVER_KEY, AgentConfig, run_agent

    if not args.join.startswith("tcp://") or ":" not in args.join[6:]:
        return usage(f"--join {args.join}: give tcp://HOST:PORT (the address dejavu-serve --agent-bind listens on)")
    try:
        keys = security.load(args.keys, AGENT_KEY)
        keys.server_key(SERVER_KEY)
    except security.KeysError as e:
        return usage(f"--keys {args.keys}: {e} (copy the agent's files of `dejavu-keys generate`)")
    try:
        advertise = args.advertise or route_to(args.join)
        ipaddress.ip_address(advertise)
    except (OSError, ValueError) as e:
        return usage(f"--advertise: cannot find this machine's address toward {args.join} ({e}); give --advertise")
    if args.gpus is not None:
        try:
            devices = tuple(f"cuda:{int(g)}" for g in args.gpus.split(",") if g.strip())
        except ValueError:
            return usage(f"--gpus {args.gpus}: give GPU numbers, e.g. 0,1")
        if not devices:
            return usage("--gpus: give at least one GPU")
    else:
        devices = ("cpu",)
    if args.log_dir:
        try:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return usage(f"--log-dir {args.log_dir}: {e.strerror}")
    cfg = AgentConfig(join=args.join, host_id=args.host_id, keys_dir=str(Path(args.keys).resolve()), devices=devices,
                      advertise=advertise, log_dir=str(Path(args.log_dir).resolve()) if args.log_dir else "",
                      log_level=args.log_level, threads=args.stage_threads)
    logging.captureWarnings(True)
    return run_agent(cfg)


if __name__ == "__main__":
    sys.exit(main())
