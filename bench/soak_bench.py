"""`dejavu-bench soak`: does a deployment's memory come back after rounds of many clients?

Starts `dejavu-serve --model default` (or --model), then runs --rounds rounds (default 4) of --clients concurrent
clients (default 1000). Each client is its own AsyncClient (its own socket and identity, as separate users are),
sends one short text request, awaits its output and closes. After each round, once the deployment is idle
(nothing waiting or running) and --settle seconds later, the resident memory (VmRSS, /proc) of every process of the deployment is read;
after the last round, again after --idle seconds without clients. A leak grows a process's RSS by a similar
amount every round; the allocator's high-water mark grows it by less and less and then stops. The baseline, in
the same run: each process's RSS after the first round (warm-up: the first clients fault in code and caches).
Reported per process: RSS per round, the growth of the last round over the first and per round, as ratios.

Writes <out>/soak_bench.json (date, machine, command, every sample) and <out>/soak_bench.png (RSS per round
per process); --out defaults to ./dejavu-bench-results/ in the current directory. `--quick`: 2 rounds of 50
clients (CI).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bus.client import AsyncClient
from bus.client_cli import run_loop
from bus.loadgen import OUT_DEFAULT, RESULTS_DIR, echo, progress
from recovery.launch import Deployment


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model directory, or 'default' (the embedded tiny model)")
    p.add_argument("--stages", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--rounds", type=int, help="rounds of clients (default 4; --quick 2)")
    p.add_argument("--clients", type=int, help="concurrent clients per round (default 1000; --quick 50)")
    p.add_argument("--max-new-tokens", type=int, default=4, help="tokens per request (default 4)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds idle before each round's sample (default 3: the controller gives freed memory back "
                        "after 2 s without requests)")
    p.add_argument("--idle", type=float, default=5.0, help="seconds without clients before the last sample")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a round may take (default 600)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for soak_bench.json and soak_bench.png (default {OUT_DEFAULT})")
    p.add_argument("--quick", action="store_true", help="2 rounds of 50 clients (CI smoke run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def sample(status: dict[str, Any]) -> dict[str, float]:
    out = {}
    for p in status["processes"]:
        mib = rss_mib(p["pid"]) if p.get("pid") else None
        if mib is not None:
            out[f"{p['role']}-{p['index']}"] = mib
    return out


async def one_client(address: str, i: int, max_new: int, timeout: float) -> int:
    async with AsyncClient(address, timeout=timeout, probe=False) as c:
        r = await c.generate(prompt=f"soak client {i}", max_new_tokens=max_new, ignore_eos=True)
        return len(r.token_ids)


async def idle(c: AsyncClient, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = await c.status()
        if st["waiting"] == 0 and st["running"] == 0:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"the deployment did not become idle within {timeout:.0f}s")
        await asyncio.sleep(0.1)  # polling a remote state: there is no event for "idle"


async def soak(address: str, args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    async with AsyncClient(address, timeout=args.timeout) as probe:
        rounds.append({"round": 0, "clients": 0, "rss_mib": sample(await probe.status())})
        bar = progress(args.rounds * args.clients, "soak", args.quiet, unit="client")
        try:
            for r in range(1, args.rounds + 1):
                t0 = time.perf_counter()

                async def counted(i: int) -> int:
                    n = await one_client(address, i, args.max_new_tokens, args.timeout)
                    if bar is not None:
                        bar.update(1)
                    return n

                tokens = await asyncio.wait_for(
                    asyncio.gather(*(counted(i) for i in range(args.clients))), args.timeout)
                wall = time.perf_counter() - t0
                await idle(probe, args.timeout)
                await asyncio.sleep(args.settle)  # memory as an idle deployment holds it: a duration, not an event
                st = await probe.status()
                rounds.append({"round": r, "clients": args.clients, "tokens": sum(tokens), "wall_s": wall,
                               "rss_mib": sample(st)})
                echo(f"round {r}: {args.clients} clients in {wall:.1f}s; RSS MiB " +
                     ", ".join(f"{k} {v:.0f}" for k, v in sorted(rounds[-1]["rss_mib"].items())))
        finally:
            if bar is not None:
                bar.close()
        await asyncio.sleep(args.idle)  # the point: memory after a quiet spell, not an event to wait for
        rounds.append({"round": "idle", "clients": 0, "idle_s": args.idle, "rss_mib": sample(await probe.status())})
    return {"rounds": rounds, "summary": summarize(rounds)}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per process: RSS after the first round (the baseline), after the last round and after idling; growth
    from the first to the last round, per round and as a ratio."""
    measured = [r for r in rounds if isinstance(r["round"], int) and r["round"] >= 1]
    first, last, after = measured[0]["rss_mib"], measured[-1]["rss_mib"], rounds[-1]["rss_mib"]
    out = {}
    for name, base in first.items():
        if name not in last:
            continue
        growth = last[name] - base
        out[name] = {"first_round_mib": base, "last_round_mib": last[name], "idle_mib": after.get(name),
                     "growth_mib": growth, "growth_per_round_mib": growth / max(1, len(measured) - 1),
                     "last_over_first": last[name] / base if base else None,
                     "per_round_mib": [r["rss_mib"].get(name) for r in measured]}
    return out


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [r for r in report["rounds"] if isinstance(r["round"], int)] + [report["rounds"][-1]]
    labels = [str(r["round"]) for r in rounds]
    for name in sorted(report["summary"]):
        ax.plot(labels, [r["rss_mib"].get(name) for r in rounds], marker="o", label=name)
    ax.set_xlabel("round (0: before any client; idle: after the quiet spell)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"soak: {report['settings']['clients']} clients per round, {report['machine']['cpus']} cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.clients = args.clients or (50 if args.quick else 1000)
    if args.rounds < 2 or args.clients < 1:
        print("dejavu-bench soak: error: --rounds must be >= 2 (the first is the baseline), --clients >= 1",
              file=sys.stderr)
        return 2
    dep = Deployment.start(args.model, args.stages, log_level="WARNING")
    try:
        result = run_loop_dict(soak(dep.address, args))
    finally:
        code = dep.stop()
    report = {
        "benchmark": "soak", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["dejavu-bench", "soak", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"model": args.model, "stages": args.stages, "rounds": args.rounds, "clients": args.clients,
                     "max_new_tokens": args.max_new_tokens, "settle_s": args.settle, "idle_s": args.idle},
        "deployment_exit_code": code, **result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "soak_bench.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out / "soak_bench.png")
    for name, s in sorted(report["summary"].items()):
        echo(f"{name}: {s['first_round_mib']:.0f} -> {s['last_round_mib']:.0f} MiB over {args.rounds - 1} rounds "
             f"({s['growth_per_round_mib']:+.1f} MiB/round, x{s['last_over_first']:.3f}); idle {s['idle_mib']:.0f}")
    echo(f"results: {path}")
    return 0 if code == 0 else 1


def run_loop_dict(coro: Any) -> dict[str, Any]:
    box: dict[str, Any] = {}

    async def wrapped() -> int:
        box.update(await coro)
        return 0

    run_loop(wrapped())
    return box
