"""`dejavu-bench serve`: the load generator against the controller (bus/loadgen.py: Poisson arrivals, the paper's
workload) or, with `--http URL`, the HTTP front (front/) against the ZeroMQ client at the same load.

--http: --clients (1,000) streaming HTTP clients at once, each one request (a token-id prompt of --prompt-len,
--output-len tokens, greedy, ignore_eos) through the front's /v1/completions as server-sent events; and the same
requests at once through one ZeroMQ client (bus/client.py) straight to the controller the front serves from (its
/health names it; or --address). Rounds alternate, ZeroMQ first (--repeats of each), in one run on one
deployment. Per round: completed and lost (an error, or not exactly --output-len tokens), TTFT and end-to-end
latency p50/p99, tokens/s; then HTTP / ZeroMQ ratios of the medians over rounds (the front's added latency at
that load: the target is 1.05 or less), and each process's CPU time per 1,000 output tokens (front, controller,
stages, and this process's clients; read from /proc where the deployment runs on this machine). Then --solo
requests one at a time on each path: the front's own cost per request with no queue, in milliseconds. Both
sides' clients run in this process (one uvloop loop), so the HTTP side's figures include an HTTP client's work
too: on a machine whose cores the stages need (a CPU deployment) that work slows them as much as the front's.
JSON + PNG (TTFT and latency distributions).
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
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.curve_bench import source_commit
from bus import loadgen
from bus.client import AsyncClient
from bus.client_cli import run_loop
from bus.errors import DejaVuError
from bus.front.proc import raise_open_files
from bus.loadgen import RESULTS_DIR, draw_requests, parse_length, percentiles

HTTP_DEFAULTS = {"prompt_len": "32", "output_len": "32", "timeout": 600.0}
Record = dict[str, Any]


def parser() -> argparse.ArgumentParser:
    p = loadgen.parser(address_required=False)
    p.description = __doc__.split("\n\n")[0]
    g = p.add_argument_group("the HTTP front (--http URL; --address is then the ZeroMQ baseline's, by default the "
                             "controller the front names in /health)")
    g.add_argument("--http", metavar="URL", help="the front's base URL (http://host:port, as dejavu-serve's ready "
                   "line says): HTTP clients against the ZeroMQ client, at the same load ($DEJAVU_API_KEY or "
                   "$OPENAI_API_KEY: the API key to send)")
    g.add_argument("--clients", type=int, default=1000, help="concurrent streaming clients per round (default 1000)")
    g.add_argument("--repeats", type=int, default=2, help="rounds of each path, alternating (default 2)")
    g.add_argument("--solo", type=int, default=20, help="then requests one at a time on each path (default 20)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.http is None:
        if not args.address:
            p.error("give --address tcp://host:port (the controller), or --http URL (the HTTP front)")
        return loadgen.parse_args(argv)
    for key, value in HTTP_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.prompt_len = parse_length(args.prompt_len, loadgen.PAPER_PROMPT)
        args.output_len = parse_length(args.output_len, loadgen.PAPER_OUTPUT)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    for ok, message in ((args.clients >= 1, "--clients must be >= 1"), (args.repeats >= 1, "--repeats must be >= 1"),
                        (args.solo >= 0, "--solo must be >= 0"), (args.timeout > 0, "--timeout must be > 0")):
        if not ok:
            p.error(message)
    args.http = args.http.rstrip("/").removesuffix("/v1")
    if args.out is None:
        args.out = RESULTS_DIR / f"serve-http-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}.json"
    return args


# ---------------------------------------------------------------- one request, each path


async def one_http(session: Any, url: str, model: str, prompt: list[int], n: int) -> Record:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    rec: Record = {"path": "http", "error": None, "ttft_s": None, "tokens": 0}
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                return {**rec, "error": f"HTTP {r.status}", "message": (await r.text())[:300]}
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                if rec["ttft_s"] is None:
                    rec["ttft_s"] = time.perf_counter() - t0  # completions' first event carries the first token
                if b'"finish_reason":null' in data:
                    continue  # a token's text: read like a client that only shows it (no JSON decoding)
                chunk = json.loads(data)
                if "error" in chunk:
                    return {**rec, "error": "stream error", "message": chunk["error"].get("message", "")[:300]}
                if chunk.get("usage"):
                    rec["tokens"] = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    rec["finish_reason"] = c.get("finish_reason") or rec.get("finish_reason")
    except Exception as e:  # a connection that broke, a timeout: counted, never dropped
        return {**rec, "error": type(e).__name__, "message": str(e)[:300]}
    return {**rec, "latency_s": time.perf_counter() - t0}


async def one_zmq(client: AsyncClient, prompt: list[int], n: int) -> Record:
    t0 = time.perf_counter()
    rec: Record = {"path": "zmq", "error": None, "ttft_s": None, "tokens": 0}
    try:
        async with client.stream(prompt_token_ids=prompt, max_new_tokens=n, ignore_eos=True) as s:
            async for ev in s:
                if rec["ttft_s"] is None and ev.token_ids:
                    rec["ttft_s"] = time.perf_counter() - t0
                rec["tokens"] += len(ev.token_ids)
        rec["finish_reason"] = s.result.finish_reason
    except DejaVuError as e:
        return {**rec, "error": type(e).__name__, "message": str(e)[:300]}
    return {**rec, "latency_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- rounds


def summarize(path: str, records: list[Record], wanted: list[int], wall: float) -> dict[str, Any]:
    ok = [r for r, n in zip(records, wanted) if r["error"] is None and r["tokens"] == n
          and r.get("finish_reason") == "length"]
    errors = Counter(r["error"] or "wrong length" for r in records if r not in ok)
    tokens = sum(r["tokens"] for r in ok)
    return {"path": path, "requests": len(records), "completed": len(ok), "lost": len(records) - len(ok),
            "errors": dict(errors), "first_error": next((r.get("message") for r in records if r["error"]), None),
            "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
            "ttft_s": percentiles([r["ttft_s"] for r in ok]), "latency_s": percentiles([r["latency_s"] for r in ok]),
            "ttfts": sorted(r["ttft_s"] for r in ok), "latencies": sorted(r["latency_s"] for r in ok)}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process on this machine (None: not here, or gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes(status: dict[str, Any] | None) -> dict[str, int]:
    """name -> pid of the deployment's processes on this machine (status as an administrator sees it), and this
    process (the clients of both paths)."""
    out = {f"{p['role']}-{p['index']}": p["pid"] for p in (status or {}).get("processes", [])
           if p.get("pid") and p["role"] in ("front", "controller", "stage")}
    return {**out, "bench-clients": os.getpid()}


async def burst(path: str, one: Callable[[list[int], int], Awaitable[Record]], work: list[tuple[list[int], int]],
                quiet: bool, pids: dict[str, int] | None = None) -> dict[str, Any]:
    before = {name: cpu_seconds(pid) for name, pid in (pids or {}).items()}
    t0 = time.perf_counter()
    with loadgen.progress(len(work), f"{path}: {len(work)} at once", quiet, "req") as bar:
        async def counted(p: list[int], n: int) -> Record:
            rec = await one(p, n)
            bar.update(1)
            return rec
        records = await asyncio.gather(*(counted(p, n) for p, n in work))
    out = summarize(path, list(records), [n for _, n in work], time.perf_counter() - t0)
    tokens = sum(r["tokens"] for r in records) or 1
    # CPU milliseconds per 1,000 output tokens, per process: where each path spends the machine
    out["cpu_ms_per_1k_tokens"] = {name: (after - b) * 1e6 / tokens for name, pid in (pids or {}).items()
                                   if (b := before[name]) is not None and (after := cpu_seconds(pid)) is not None}
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def median(values: list[float | None]) -> float | None:
    v = sorted(x for x in values if x is not None)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2 if v else None


def compare(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """HTTP / ZeroMQ ratios of each figure's median over the rounds (> 1: the front adds that much)."""
    out: dict[str, Any] = {}
    for key, stat in (("ttft", "p50"), ("ttft", "p99"), ("latency", "p50"), ("latency", "p99")):
        values = {path: median([r[f"{key}_s"][stat] for r in rounds if r["path"] == path]) for path in ("http", "zmq")}
        out[f"{key}_{stat}"] = {**values, "ratio": ratio(values["http"], values["zmq"])}
    tput = {path: median([r["tokens_per_s"] for r in rounds if r["path"] == path]) for path in ("http", "zmq")}
    out["tokens_per_s"] = {**tput, "ratio": ratio(tput["http"], tput["zmq"])}
    names = sorted({n for r in rounds for n in r.get("cpu_ms_per_1k_tokens", {})})
    out["cpu_ms_per_1k_tokens"] = {path: {n: median([r["cpu_ms_per_1k_tokens"].get(n) for r in rounds
                                                     if r["path"] == path]) for n in names} for path in ("http", "zmq")}
    return out


async def solo(args: argparse.Namespace, http: Callable[..., Awaitable[Record]], zmq: Callable[..., Awaitable[Record]],
               work: list[tuple[list[int], int]]) -> dict[str, Any]:
    """One request at a time, alternating paths: the front's own cost per request (ms) with nothing queued."""
    recs: dict[str, list[Record]] = {"http": [], "zmq": []}
    for p, n in work[: args.solo]:
        recs["zmq"].append(await zmq(p, n))
        recs["http"].append(await http(p, n))
    out: dict[str, Any] = {"requests": args.solo}
    for key in ("ttft_s", "latency_s"):
        p50 = {path: percentiles([r[key] for r in rs if r["error"] is None and r.get(key) is not None])["p50"]
               for path, rs in recs.items()}
        added = (p50["http"] - p50["zmq"]) * 1000 if p50["http"] is not None and p50["zmq"] is not None else None
        out[key.removesuffix("_s")] = {"http_p50_s": p50["http"], "zmq_p50_s": p50["zmq"], "added_ms": added}
    out["errors"] = sum(1 for rs in recs.values() for r in rs if r["error"] is not None)
    return out


async def http_main(args: argparse.Namespace) -> int:
    import aiohttp

    raise_open_files(2 * args.clients + 256)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    key = os.environ.get("DEJAVU_API_KEY") or os.environ.get("OPENAI_API_KEY")  # a front with --api-key-file
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        async with session.get(f"{args.http}/health") as r:
            health = await r.json()
        async with session.get(f"{args.http}/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        address = args.address or health["controller"]
        work = draw_requests(args.clients, args.prompt_len, args.output_len, args.vocab_size, args.seed)
        async with AsyncClient(address, timeout=args.timeout, connect_timeout=args.connect_timeout, keys=args.keys,
                               key_name=args.key_name) as client:
            url = f"{args.http}/v1/completions"

            async def http(p: list[int], n: int) -> Record:
                return await one_http(session, url, model, p, n)

            async def zmq(p: list[int], n: int) -> Record:
                return await one_zmq(client, p, n)

            for p, n in work[:4]:  # warm-up: connections, first steps
                await zmq(p, n)
                await http(p, n)
            pids = processes(await client.status())
            rounds = []
            for k in range(args.repeats):
                for path, one in (("zmq", zmq), ("http", http)):
                    s = await burst(path, one, work, args.quiet, pids)
                    rounds.append({**s, "round": k})
                    loadgen.echo(line(s))
            alone = await solo(args, http, zmq, work) if args.solo else None
            server = client.server_info
    report = {
        "benchmark": "serve-http", "label": args.label,
        "command": shlex.join(["dejavu-bench", "serve", *args.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
        "commit": source_commit(), "cpus": os.cpu_count(),
        "http": args.http, "address": address, "model": model, "server": server, "front": health,
        "workload": {"clients": args.clients, "prompt_len": args.prompt_len.describe(),
                     "output_len": args.output_len.describe(), "vocab_size": args.vocab_size, "seed": args.seed,
                     "temperature": 0.0, "ignore_eos": True, "arrivals": "all at once, each round"},
        "settings": {"repeats": args.repeats, "timeout_s": args.timeout},
        "rounds": [{k: v for k, v in r.items() if k not in ("ttfts", "latencies")} for r in rounds],
        "http_vs_zmq": compare(rounds), "solo": alone,
    }
    c = report["http_vs_zmq"]
    loadgen.echo(f"HTTP / ZeroMQ at {args.clients} clients: TTFT p50 {fmt(c['ttft_p50']['ratio'])} p99 "
                 f"{fmt(c['ttft_p99']['ratio'])}, latency p50 {fmt(c['latency_p50']['ratio'])} p99 "
                 f"{fmt(c['latency_p99']['ratio'])}, tokens/s {fmt(c['tokens_per_s']['ratio'])}")
    if alone:
        loadgen.echo(f"one at a time: the front adds {fmt(alone['ttft']['added_ms'])} ms to TTFT, "
                     f"{fmt(alone['latency']['added_ms'])} ms to latency (p50 of {alone['requests']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {args.out}")
    if not args.no_plot:
        png = args.plot or args.out.with_suffix(".png")
        plot(report, rounds, png)
        print(f"plot: {png}")
    return 0 if all(r["lost"] == 0 for r in rounds) else 1


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def line(s: dict[str, Any]) -> str:
    cpu = ", ".join(f"{name} {v:.0f}" for name, v in s.get("cpu_ms_per_1k_tokens", {}).items())
    return (f"{s['path']:>4}: {s['completed']}/{s['requests']} complete ({s['lost']} lost) in {s['wall_s']:.1f}s, "
            f"{fmt(s['tokens_per_s'])} tok/s; TTFT p50 {fmt(s['ttft_s']['p50'])}s p99 {fmt(s['ttft_s']['p99'])}s; "
            f"latency p50 {fmt(s['latency_s']['p50'])}s p99 {fmt(s['latency_s']['p99'])}s"
            + (f"; CPU ms per 1k tokens: {cpu}" if cpu else ""))


def plot(report: dict[str, Any], rounds: list[dict[str, Any]], path: Path) -> None:
    """TTFT and latency distributions (every round), HTTP against ZeroMQ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttfts", "time to first token"), (axes[1], "latencies", "end-to-end latency")):
        for r in rounds:
            v = r[key]
            if v:
                ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], color="C0" if r["path"] == "http" else "C1",
                        alpha=0.8, label=f"{'HTTP front' if r['path'] == 'http' else 'ZeroMQ client'} round {r['round']}")
        ax.set_xlabel(f"{title} (s)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    c = report["http_vs_zmq"]
    fig.suptitle(f"{report['workload']['clients']} concurrent streaming clients, {report['model']}: HTTP / ZeroMQ "
                 f"TTFT p50 {fmt(c['ttft_p50']['ratio'])}, latency p50 {fmt(c['latency_p50']['ratio'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if getattr(args, "http", None) is None:
        return loadgen.main(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv)
    try:
        return run_loop(http_main(args))
    except (DejaVuError, OSError, ValueError) as e:
        print(f"dejavu-bench serve: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dejavu-bench serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
