"""`dejavu-bench curve`: what CurveZMQ costs the control plane - message rate and latency, plaintext vs CURVE.

In this one process, on tcp loopback: a ROUTER bound as the controller binds its internal socket and a DEALER
connected as a stage connects to it (identity `stage-1`), each on a ZeroMQ context of its own (its own I/O
thread, where libzmq encrypts and decrypts, as two processes have), through the deployment's own pieces:
`make_socket`, `send`, `recv_frames`, `decode_frames` (with its authenticated-sender check) and `Codec`. They
exchange the deployment's real control messages - a `StepResult` of a microbatch of 8 (the last stage's
answer every decode step) and a `Heartbeat` (every process, every interval) - in two patterns: ping-pong
(the DEALER sends, the ROUTER decodes and sends the same message back, the DEALER decodes it: round trips per
second, the latency p50 of one round trip, CPU time per round trip) and a one-way stream (the DEALER sends as
fast as the ROUTER decodes: messages per second, CPU time per message). CPU time is the whole process's (the
loop and both I/O threads), so it counts CURVE's cipher work and, unlike the wall-clock rates, not the time
other work on the machine took the cores.

Each round makes a fresh plaintext pair and a fresh CURVE pair (keys from `security.generate` in a temporary
directory, the ZAP authenticator thread the deployment runs) and runs every figure in both back to back, which
one first alternating. A figure is the median of its rounds; CURVE / plaintext is the median of the rounds'
ratios. Both ends share one event loop (uvloop where installed), so an absolute rate is one core's Python for
two processes' work: the ratios are the figures.

Used by `dejavu-bench pipeline --hosts` (its JSON's `control_messages`); on its own it writes
<out>/curve_bench.json and <out>/curve_bench.png (--out: default ./dejavu-bench-results/ in the current
directory). About --seconds (default 2) of measuring, ~3 s in all.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from bus import security
from bus.codec import Codec
from bus.messages import Heartbeat, Msg, StepResult
from bus.sockets import bound_address, decode_frames, make_socket, recv_frames, send

SERVER, CLIENT = security.CONTROLLER, "stage-1"  # the process names the two ends take (and their keys)
MICROBATCH = 8  # tokens in a StepResult: the default --microbatch-size
MESSAGES: dict[str, Msg] = {
    "step_result": StepResult(epoch=3, mb=1, step=12345, tokens=[50_000 + i for i in range(MICROBATCH)]),
    "heartbeat": Heartbeat(seq=12345, state="serving", busy_s=0.0123),
}
PATTERNS = ("ping_pong", "stream")
MODES = ("plaintext", "curve")
STREAM_BURST = 64  # a one-way sender sends this many, then the receiver takes them (at most two bursts in flight)
RUN_SLACK_S = 10.0  # a timed run that has not ended this long after its time is stuck (a lost message): raise


class Pair:
    """A connected DEALER (the stage end) -> ROUTER (the controller end), plaintext or CURVE."""

    def __init__(self, keys_dir: str | None) -> None:
        server_keys = security.load(keys_dir, SERVER) if keys_dir else None
        client_keys = security.load(keys_dir, CLIENT) if keys_dir else None
        self.server_ctx, self.client_ctx = zmq.asyncio.Context(), zmq.asyncio.Context()
        # before the bind, as every binding process of the deployment does: it admits the members only
        self.auth = security.start_authenticator(self.server_ctx, server_keys)
        self.router = make_socket(self.server_ctx, zmq.ROUTER, bind="tcp://127.0.0.1:0", keys=server_keys)
        self.dealer = make_socket(self.client_ctx, zmq.DEALER, connect=bound_address(self.router),
                                  identity=CLIENT.encode(), keys=client_keys, server=SERVER if keys_dir else "")
        self.server_codec, self.client_codec = Codec(SERVER), Codec(CLIENT)

    async def ping_pong(self, msg: Msg, seconds: float) -> dict[str, Any]:
        """Round trips for `seconds`: DEALER sends, ROUTER decodes and answers the same message, DEALER decodes."""
        rtts: list[float] = []
        c0, t0 = time.process_time(), time.perf_counter()
        end = t0 + seconds
        async with asyncio.timeout(seconds + RUN_SLACK_S):  # one deadline for the run, none per message
            while not rtts or time.perf_counter() < end:
                t = time.perf_counter()
                await send(self.dealer, self.client_codec, msg)
                route, got = decode_frames(self.server_codec, await recv_frames(self.router), route_frames=1)
                await send(self.router, self.server_codec, msg, route=route, reply_to=got.env.msg_id)
                decode_frames(self.client_codec, await recv_frames(self.dealer))
                rtts.append(time.perf_counter() - t)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"round_trips": len(rtts), "round_trips_per_s": len(rtts) / elapsed,
                "latency_p50_us": statistics.median(rtts) * 1e6, "cpu_us_per_round_trip": cpu / len(rtts) * 1e6}

    async def stream(self, msg: Msg, seconds: float) -> dict[str, Any]:
        """DEALER sends for `seconds` as fast as the ROUTER keeps up: bursts of STREAM_BURST, at most two in
        flight (a sender far ahead would measure the drain of a long queue); the ROUTER decodes every message."""
        sent = received = 0
        c0, t0 = time.process_time(), time.perf_counter()
        end = t0 + seconds
        async with asyncio.timeout(seconds + RUN_SLACK_S):  # one deadline for the run, none per message
            while True:
                if sent == 0 or (time.perf_counter() < end and sent - received <= STREAM_BURST):
                    for _ in range(STREAM_BURST):
                        await send(self.dealer, self.client_codec, msg)
                    sent += STREAM_BURST
                elif received == sent:
                    break
                for _ in range(min(STREAM_BURST, sent - received)):
                    decode_frames(self.server_codec, await recv_frames(self.router), route_frames=1)
                    received += 1
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"messages": received, "messages_per_s": received / elapsed,
                "cpu_us_per_message": cpu / received * 1e6}

    def close(self) -> None:
        self.dealer.close(0)
        self.router.close(0)
        if self.auth is not None:
            self.auth.stop()  # before its context goes
        self.server_ctx.term()
        self.client_ctx.term()


async def _measure(keys_dir: str, seconds: float, rounds: int) -> dict[str, Any]:
    cells = [(kind, pattern) for kind in MESSAGES for pattern in PATTERNS]
    per_run = seconds / (rounds * len(MODES) * len(cells))
    samples: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in range(rounds):
        # fresh pairs each round: one pair's speed depends on where its threads landed (on this 2-core box pairs
        # differed by up to 1.6x, each steady over its life), so each round draws that anew for both modes
        pairs: dict[str, Pair] = {}
        try:
            pairs["plaintext"], pairs["curve"] = Pair(None), Pair(keys_dir)
            for pair in pairs.values():  # connect, CURVE handshake and first messages outside the timed runs
                for msg in MESSAGES.values():
                    await pair.ping_pong(msg, 0.01)
            for kind, pattern in cells:
                # the two modes back to back, which one first alternating: a pair of runs shares the machine's state
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    pair = pairs[mode]
                    run = pair.ping_pong if pattern == "ping_pong" else pair.stream
                    samples.setdefault((mode, kind, pattern), []).append(await run(MESSAGES[kind], per_run))
        finally:
            for pair in pairs.values():
                pair.close()
    return summarize(samples)


def summarize(samples: dict[tuple[str, str, str], list[dict[str, Any]]]) -> dict[str, Any]:
    """Per message and pattern: each mode's median over rounds, and CURVE / plaintext as the median of each
    round's pair (a paired figure: a stall of the machine during one round moves one pair, not the median)."""
    codec = Codec(CLIENT)
    out: dict[str, Any] = {}
    for kind, msg in MESSAGES.items():
        out[kind] = {"type": type(msg).__name__, "envelope_bytes": len(codec.encode(msg))}
        for pattern in PATTERNS:
            keys = (["round_trips_per_s", "latency_p50_us", "cpu_us_per_round_trip"] if pattern == "ping_pong"
                    else ["messages_per_s", "cpu_us_per_message"])
            cell: dict[str, Any] = {}
            for mode in MODES:
                rows = samples[(mode, kind, pattern)]
                cell[mode] = {k: statistics.median(row[k] for row in rows) for k in keys}
                cell[mode]["rounds"] = len(rows)
            pairs = list(zip(samples[("plaintext", kind, pattern)], samples[("curve", kind, pattern)]))
            cell["curve_over_plaintext"] = {k: statistics.median(c[k] / p[k] for p, c in pairs) for k in keys}
            out[kind][pattern] = cell
    return out


def measure(seconds: float = 2.0, rounds: int = 10) -> dict[str, Any]:
    """Control-message rates and latencies, plaintext vs CURVE, in ~`seconds` (plus set-up). Pure: no files
    but the temporary keys directory, which it removes."""
    with tempfile.TemporaryDirectory(prefix="dejavu-curve-") as d:
        keys_dir = str(Path(d) / "keys")
        security.generate(keys_dir, [SERVER, CLIENT])
        t0 = time.perf_counter()
        result = _run_loop(lambda: _measure(keys_dir, seconds, rounds))
    return {"what": "DEALER (stage) -> ROUTER (controller) on tcp loopback, one process, the deployment's socket "
                    "factory and codec; ping_pong: round trips (2 messages each), stream: one-way messages; CPU: "
                    "the process's, all threads; medians over rounds of fresh pairs, ratios paired per round",
            "seconds": seconds, "rounds": rounds, "wall_s": time.perf_counter() - t0,
            "libzmq": zmq.zmq_version(), "pyzmq": zmq.__version__, "messages": result}


def _run_loop(make: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    """uvloop where installed, as the deployment's processes run (bus/child.py)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(make())
    return uvloop.run(make())


def source_commit() -> str | None:
    """The checkout's commit (short; `-dirty` with uncommitted changes to tracked files), for a result's record;
    None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def lines(report: dict[str, Any]) -> list[str]:
    out = []
    for row in report["messages"].values():
        pp, st = row["ping_pong"], row["stream"]
        pr, sr = pp["curve_over_plaintext"], st["curve_over_plaintext"]
        out.append(f"{row['type']} ({row['envelope_bytes']} B), plaintext -> CURVE: ping-pong "
                   f"{pp['plaintext']['round_trips_per_s']:,.0f} -> {pp['curve']['round_trips_per_s']:,.0f} round "
                   f"trips/s (x{pr['round_trips_per_s']:.3f}), p50 {pp['plaintext']['latency_p50_us']:.0f} -> "
                   f"{pp['curve']['latency_p50_us']:.0f} us (x{pr['latency_p50_us']:.3f}), CPU "
                   f"{pp['plaintext']['cpu_us_per_round_trip']:.0f} -> {pp['curve']['cpu_us_per_round_trip']:.0f} us "
                   f"(x{pr['cpu_us_per_round_trip']:.3f}); stream {st['plaintext']['messages_per_s']:,.0f} -> "
                   f"{st['curve']['messages_per_s']:,.0f} msg/s (x{sr['messages_per_s']:.3f}), CPU "
                   f"{st['plaintext']['cpu_us_per_message']:.0f} -> {st['curve']['cpu_us_per_message']:.0f} us/msg "
                   f"(x{sr['cpu_us_per_message']:.3f})")
    return out


def plot(report: dict[str, Any], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = report["messages"]
    _bars(a, rows, [("ping_pong", "round_trips_per_s", "round trips/s"), ("stream", "messages_per_s", "one-way msg/s")])
    a.set_ylabel("per second (labels: CURVE / plaintext)")
    a.set_title(title or "control messages, tcp loopback")
    _bars(b, rows, [("ping_pong", "latency_p50_us", "round trip p50"),
                    ("ping_pong", "cpu_us_per_round_trip", "CPU per round trip"),
                    ("stream", "cpu_us_per_message", "CPU per one-way msg")])
    b.set_ylabel("microseconds (labels: CURVE / plaintext)")
    b.set_title("latency and CPU time (whole process)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax: Any, rows: dict[str, Any], specs: list[tuple[str, str, str]]) -> None:
    """Grouped bars per message: for each (pattern, key), plaintext (light) and CURVE (dark, labelled x ratio)."""
    names = list(rows)
    width = 0.8 / (2 * len(specs))
    for j, (pattern, key, label) in enumerate(specs):
        for m, mode in enumerate(MODES):
            x = [i - 0.4 + (2 * j + m + 0.5) * width for i in range(len(names))]
            bars = ax.bar(x, [rows[n][pattern][mode][key] for n in names], width, label=f"{label}, {mode}",
                          color=f"C{j}", alpha=0.45 if mode == "plaintext" else 1.0)
            if mode == "curve":
                ax.bar_label(bars, [f"x{rows[n][pattern]['curve_over_plaintext'][key]:.2f}" for n in names],
                             fontsize=7)
    ax.set_xticks(range(len(names)), [f"{rows[n]['type']} ({rows[n]['envelope_bytes']} B)" for n in names])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.4)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=2, loc="upper left")


def parser() -> argparse.ArgumentParser:
    from bus.loadgen import OUT_DEFAULT, RESULTS_DIR

    p = argparse.ArgumentParser(prog="dejavu-bench curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time over all rounds (default 2)")
    p.add_argument("--rounds", type=int, default=10,
                   help="rounds per figure (default 10), each a plaintext and a CURVE run back to back")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for curve_bench.json and curve_bench.png (default {OUT_DEFAULT})")
    p.add_argument("--quick", action="store_true", help="0.4 s of measuring, 2 rounds (CI)")
    p.add_argument("--quiet", action="store_true", help="no progress output (it has none: accepted for uniformity)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 0.4, 2
    load_start = os.getloadavg()
    report = measure(args.seconds, args.rounds)
    result = {
        "benchmark": "curve (issue 17): control-message rate and latency, plaintext vs CurveZMQ",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["bin/dejavu-bench", "curve", *(sys.argv[2:] if argv is None else argv)]),
        "commit": source_commit(),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": list(load_start),
                    "load_average_at_end": list(os.getloadavg())},
        **report,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "curve_bench.png",
         f"control messages, plaintext vs CURVE ({os.cpu_count()} CPUs, load {load_start[0]:.1f})")
    for line in lines(result):
        print(f"[curve] {line}", flush=True)
    print(f"[curve] wrote {args.out / 'curve_bench.json'}")
    return 0
