"""`dejavu-bench serve`: the load generator — Poisson arrivals against a running deployment, latency figures.

Runs in its own process, as one client of the controller (bus.client.AsyncClient, one uvloop loop). For each
request rate: draw the workload (prompt and output lengths from the given distributions, random prompt token
ids in [0, vocab), all from a fixed seed — the same requests at every rate, only the arrival times scale), send
each request at its arrival time with temperature 0, ignore_eos and max_new_tokens = the drawn length,
and record time to first token, time per output token, end-to-end latency and normalized latency (seconds per
generated token, the paper's metric). Writes one JSON file (command line, date, server status, every rate's
figures and per-request records) and a PNG of normalized latency against request rate.

It must never hang: the connect probe (--connect-timeout), every request (--timeout) and every rate (--deadline,
after which what is left is cancelled on the server) have deadlines. A failed request is never dropped from the
figures silently: it is counted by error type.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import platform
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus.client import AsyncClient, GenerateResult
from bus.client_cli import run_loop
from bus.errors import DejaVuError, RequestTimeoutError

# Every benchmark's default output folder (`dejavu-bench serve|streamer|runtime|pipeline|startup`): relative, so
# it is in the directory the command runs from - never inside the installed package.
RESULTS_DIR = Path("dejavu-bench-results")
OUT_DEFAULT = f"./{RESULTS_DIR}/, in the current directory"  # for --out's help


def progress(total: int | None, desc: str, quiet: bool = False, unit: str = "it") -> Any:
    """A tqdm progress bar on stderr, shown only when stderr is a terminal and --quiet was not given (then a
    disabled bar: update() and close() do nothing). Use as a context manager, or close() it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty())


def echo(text: str) -> None:
    """print() of one line on stdout while a progress() bar may be drawn on stderr (the same terminal): the
    bar is lifted, the line written, the bar drawn again below it."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


# ---------------------------------------------------------------- workload


@dataclass(frozen=True)
class LengthDist:
    """fixed (a), uniform integers in [a, b], or lognormal (median a, sigma b); clamped to [lo, hi]."""

    kind: str
    a: float
    b: float = 0.0
    lo: int = 1
    hi: int = 1 << 30

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            v = self.a
        elif self.kind == "uniform":
            v = rng.randint(int(self.a), int(self.b))
        else:
            v = rng.lognormvariate(math.log(self.a), self.b)
        return int(min(self.hi, max(self.lo, round(v))))

    def describe(self) -> dict[str, Any]:
        names = {"fixed": ("n",), "uniform": ("min", "max"), "lognormal": ("median", "sigma")}[self.kind]
        d: dict[str, Any] = {"kind": self.kind, **dict(zip(names, (self.a, self.b)))}
        if (self.lo, self.hi) != (1, 1 << 30):
            d["clamp"] = [self.lo, self.hi]
        return d


# The paper's setting: 1,000-token prompts; outputs from LMSys-Chat, clamped to [2, 950]. We cannot ship that
# data set, so outputs come from a long-tailed lognormal with median 200 tokens (for reference, the
# LMSYS-Chat-1M paper reports 214.5 tokens per response on average); refit with lognormal:MEDIAN:SIGMA.
PAPER_PROMPT = LengthDist("fixed", 1000, lo=1)
PAPER_OUTPUT = LengthDist("lognormal", 200.0, 0.7, lo=2, hi=950)


def parse_length(spec: str, paper: LengthDist) -> LengthDist:
    """`paper` | `N` | `A:B` (uniform, inclusive) | `lognormal:MEDIAN:SIGMA[:LO:HI]`."""
    try:
        parts = spec.split(":")
        if spec == "paper":
            return paper
        if parts[0] == "lognormal" and len(parts) in (3, 5):
            lo, hi = (int(parts[3]), int(parts[4])) if len(parts) == 5 else (1, 1 << 30)
            d = LengthDist("lognormal", float(parts[1]), float(parts[2]), lo=lo, hi=hi)
            ok = d.a > 0 and d.b >= 0 and 1 <= lo <= hi
        elif len(parts) == 1:
            d = LengthDist("fixed", int(parts[0]))
            ok = d.a >= 1
        elif len(parts) == 2:
            d = LengthDist("uniform", int(parts[0]), int(parts[1]))
            ok = 1 <= d.a <= d.b
        else:
            ok = False
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"bad length {spec!r}: use paper, N, A:B (1 <= A <= B) or lognormal:MEDIAN:SIGMA[:LO:HI]")
    return d


@dataclass(frozen=True)
class Planned:
    arrival_s: float
    prompt: list[int]
    output_len: int


def draw_requests(n: int, prompt: LengthDist, output: LengthDist, vocab_size: int, seed: int
                  ) -> list[tuple[list[int], int]]:
    """The first n (prompt ids, output length) of the seed's request sequence: a prefix of the same sequence
    for every n, so every rate serves the same requests."""
    rng = random.Random(f"requests:{seed}")
    out = []
    for _ in range(n):
        p = prompt.sample(rng)
        out.append(([rng.randrange(vocab_size) for _ in range(p)], output.sample(rng)))
    return out


def poisson_arrivals(rate: float, seed: int, *, n: int | None = None, duration: float | None = None
                     ) -> list[float]:
    """Arrival times (s) of a Poisson process of `rate` per second: the first n, or all before `duration`.
    The unit-rate gaps depend only on the seed, so a higher rate is the same pattern compressed."""
    if (n is None) == (duration is None):
        raise ValueError("give exactly one of n and duration")
    rng = random.Random(f"arrivals:{seed}")
    times: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(1.0) / rate
        if (n is not None and len(times) >= n) or (duration is not None and t >= duration):
            return times
        times.append(t)


def plan(rate: float, args: argparse.Namespace) -> list[Planned]:
    arrivals = poisson_arrivals(rate, args.seed, n=args.num_requests,
                                duration=None if args.num_requests else args.duration)
    reqs = draw_requests(len(arrivals), args.prompt_len, args.output_len, args.vocab_size, args.seed)
    return [Planned(t, p, o) for t, (p, o) in zip(arrivals, reqs)]


# ---------------------------------------------------------------- running


async def _one(client: AsyncClient, i: int, req: Planned, t0: float, timeout: float) -> dict[str, Any]:
    delay = t0 + req.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)  # scheduling the arrival, not synchronising
    rec: dict[str, Any] = {"i": i, "arrival_s": req.arrival_s, "sent_s": time.perf_counter() - t0,
                           "prompt_len": len(req.prompt), "output_len": req.output_len, "error": None}
    try:
        r: GenerateResult = await client.generate(
            prompt_token_ids=req.prompt, max_new_tokens=req.output_len, temperature=0.0, seed=i,
            stop_token_ids=(), ignore_eos=True, timeout=timeout)
    except asyncio.CancelledError:  # the rate's deadline: recorded by the caller
        raise
    except DejaVuError as e:
        rec.update(error=type(e).__name__, message=str(e), end_s=time.perf_counter() - t0)
        return rec
    rec.update(end_s=time.perf_counter() - t0, generated=r.num_generated, finish_reason=r.finish_reason,
               ttft_s=r.ttft_s, tpot_s=r.tpot_s, latency_s=r.latency_s,
               normalized_latency_s=r.normalized_latency_s)
    return rec


async def run_rate(client: AsyncClient, rate: float, reqs: Sequence[Planned], timeout: float,
                   deadline: float, slots: int = 0, bar: Any = None) -> dict[str, Any]:
    """Send `reqs` at their arrival times; cancel whatever is still running `deadline` s after the start.
    `bar` (a progress(), optional) advances by one as each request ends."""
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(_one(client, i, r, t0, timeout)) for i, r in enumerate(reqs)]
    if bar is not None:
        for t in tasks:
            t.add_done_callback(lambda _: bar.update(1))
    _, late = await asyncio.wait(tasks, timeout=deadline) if tasks else (set(), set())
    for t in late:
        t.cancel()  # a cancelled generate() cancels its request on the server
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t0
    records = []
    for i, (t, r) in enumerate(zip(tasks, reqs)):
        if t.cancelled():
            records.append({"i": i, "arrival_s": r.arrival_s, "prompt_len": len(r.prompt), "output_len": r.output_len,
                            "error": "unfinished", "message": f"still running at the deadline ({deadline:.0f}s)"})
        else:
            records.append(t.result())
    return summarize(rate, records, wall, slots)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p95, p99 (linear interpolation between order statistics), max."""
    if not values:
        return {"mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    v = sorted(values)

    def q(p: float) -> float:
        k = (len(v) - 1) * p
        lo = math.floor(k)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"mean": sum(v) / len(v), "p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "max": v[-1]}


def saturated(records: list[dict[str, Any]], slots: int) -> dict[str, float | None]:
    """Throughput while the deployment was full: the seconds during which at least `slots` requests were in the
    system (sent, not yet ended) and the output tokens per second over those seconds, each request's tokens
    after its first spread evenly up to its end. A run of N requests ends in a drain of its longest outputs,
    so N / elapsed understates capacity; this is the steady-state figure, when the run reaches it."""
    ok = [r for r in records if r["error"] is None and "end_s" in r]
    edges: list[tuple[float, int, float]] = []  # (time, +-1 requests in the system, +-tokens per second)
    for r in ok:
        first = r["sent_s"] + (r["ttft_s"] or 0.0)
        edges += [(r["sent_s"], 1, 0.0), (r["end_s"], -1, 0.0)]
        if r["generated"] > 1 and r["end_s"] > first:
            per_s = (r["generated"] - 1) / (r["end_s"] - first)
            edges += [(first, 0, per_s), (r["end_s"], 0, -per_s)]
    edges.sort()
    inside, rate, full_s, tokens = 0, 0.0, 0.0, 0.0
    for (t, dn, dr), nxt in zip(edges, edges[1:] + [edges[-1]] if edges else []):
        inside, rate = inside + dn, rate + dr
        if inside >= slots > 0:
            full_s += nxt[0] - t
            tokens += rate * (nxt[0] - t)
    return {"full_s": full_s, "full_tokens_per_s": tokens / full_s if full_s > 0 else None}


def summarize(rate: float, records: list[dict[str, Any]], wall: float, slots: int = 0) -> dict[str, Any]:
    """`slots`: the deployment's (status()["slots"]); with it, the summary adds `saturated`."""
    ok = [r for r in records if r["error"] is None]
    ends = [r["end_s"] for r in records if "end_s" in r]
    elapsed = max(ends) if len(ends) == len(records) and ends else wall  # first arrival is at ~0
    errors: dict[str, dict[str, Any]] = {}
    for kind, count in Counter(r["error"] for r in records if r["error"] is not None).items():
        first = next(r["message"] for r in records if r["error"] == kind)
        errors[kind] = {"count": count, "first": first}
    generated = sum(r["generated"] for r in ok)

    def stat(key: str) -> dict[str, float | None]:
        return percentiles([r[key] for r in ok if r.get(key) is not None])

    lags = [r["sent_s"] - r["arrival_s"] for r in records if "sent_s" in r]
    return {
        "rate": rate, "requests": len(records), "completed": len(ok),
        "failed": len(records) - len(ok), "errors": errors,
        "timed_out": errors.get(RequestTimeoutError.__name__, {}).get("count", 0),
        "length_mismatch": sum(1 for r in ok if r["generated"] != r["output_len"]),
        "elapsed_s": elapsed, "throughput_rps": len(ok) / elapsed if elapsed > 0 else None,
        "generated_tokens": generated, "tokens_per_s": generated / elapsed if elapsed > 0 else None,
        "max_send_lag_s": max(lags) if lags else None,
        "ttft_s": stat("ttft_s"), "tpot_s": stat("tpot_s"), "latency_s": stat("latency_s"),
        "normalized_latency_s": stat("normalized_latency_s"),
        **({"slots": slots, "saturated": saturated(records, slots)} if slots > 0 else {}),
        "per_request": records,
    }


# ---------------------------------------------------------------- output


def _fmt(x: float | None, unit: str = "s") -> str:
    return "-" if x is None else f"{x:.4g}{unit}"


def line(s: dict[str, Any]) -> str:
    nl, tt = s["normalized_latency_s"], s["ttft_s"]
    return (f"rate {s['rate']:g} req/s: {s['completed']}/{s['requests']} done ({s['failed']} failed), "
            f"{_fmt(s['throughput_rps'], ' req/s')}, {_fmt(s['tokens_per_s'], ' tok/s')}; "
            f"ttft p50 {_fmt(tt['p50'])}, tpot p50 {_fmt(s['tpot_s']['p50'])}; normalized latency "
            f"mean {_fmt(nl['mean'])} p50 {_fmt(nl['p50'])} p95 {_fmt(nl['p95'])} p99 {_fmt(nl['p99'])} per token"
            + (f"; all {s['slots']} slots busy for {s['saturated']['full_s']:.1f}s at "
               f"{_fmt(s['saturated']['full_tokens_per_s'], ' tok/s')}" if s.get("saturated") else ""))


def plot(report: dict[str, Any], compare: Sequence[dict[str, Any]], path: Path) -> None:
    """Normalized latency (mean solid, p95 dashed) against request rate, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, rep in enumerate([report, *compare]):
        pts = [(s["rate"], s["normalized_latency_s"]) for s in rep["rates"]]
        color = f"C{i}"
        for key, style in (("mean", "-o"), ("p95", "--x")):
            xy = [(r, nl[key]) for r, nl in pts if nl[key] is not None]
            if xy:
                ax.plot(*zip(*xy), style, color=color, label=f"{rep.get('label', '?')} {key}")
    server = report.get("server") or {}
    ax.set_title(f"{server.get('model', '?')}, {server.get('stages', '?')} stage(s)", fontsize=10)
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel("normalized latency (s / generated token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line

QUICK = {"rates": [8.0, 16.0], "num_requests": 8, "prompt_len": "16", "output_len": "2:8", "timeout": 30.0,
         "deadline": 60.0}
DEFAULTS = {"rates": [1.0], "num_requests": None, "prompt_len": "paper", "output_len": "paper", "timeout": 600.0,
            "deadline": None}


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        rates = []
    if not rates or not all(r > 0 and math.isfinite(r) for r in rates):
        raise argparse.ArgumentTypeError(f"expected comma-separated request rates > 0, got {text!r}")
    return rates


def parser(address_required: bool = True) -> argparse.ArgumentParser:
    """address_required False: for `dejavu-bench serve --http` (bench/serve_bench.py), which finds it itself."""
    p = argparse.ArgumentParser(prog="dejavu-bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=address_required, help="the controller's client address, tcp://host:port")
    p.add_argument("--rates", type=_rates, help="comma-separated request rates, requests/s (default 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate (default 60)")
    g.add_argument("--num-requests", type=int, help="requests per rate (instead of --duration)")
    p.add_argument("--prompt-len", help="paper (1000) | N | A:B | lognormal:MEDIAN:SIGMA[:LO:HI] (default paper)")
    p.add_argument("--output-len", help="paper (lognormal, median 200, clamped to [2, 950]) | N | A:B | "
                   "lognormal:MEDIAN:SIGMA[:LO:HI] (default paper)")
    p.add_argument("--vocab-size", type=int, default=256, help="prompt token ids are drawn from [0, V)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, help="seconds per request (default 600)")
    p.add_argument("--deadline", type=float, help="wall-clock seconds per rate; then the rest is cancelled "
                   "(default: last arrival + --timeout + 10)")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--keys", metavar="DIR", help="a deployment started with --keys: the directory holding this "
                   "client's key and public.json (from dejavu-keys generate)")
    p.add_argument("--key-name", default="client", help="which key of --keys (client or admin)")
    p.add_argument("--out", type=Path, help=f"JSON path (default ./{RESULTS_DIR}/serve-<UTC time>.json, in the "
                   "current directory)")
    p.add_argument("--plot", type=Path, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--label", default="dejavu", help="this run's name in the plot legend")
    p.add_argument("--compare", type=Path, nargs="*", default=[], help="earlier JSON results to draw alongside")
    p.add_argument("--quick", action="store_true", help="a few short requests at two rates (CI smoke test)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (one per rate, on stderr; shown only when stderr is a terminal)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.prompt_len = parse_length(args.prompt_len, PAPER_PROMPT)
        args.output_len = parse_length(args.output_len, PAPER_OUTPUT)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    checks = [(args.vocab_size >= 1, "--vocab-size must be >= 1"), (args.timeout > 0, "--timeout must be > 0"),
              (args.num_requests is None or args.num_requests >= 1, "--num-requests must be >= 1"),
              (args.duration > 0, "--duration must be > 0"), (args.connect_timeout > 0, "--connect-timeout > 0"),
              (args.deadline is None or args.deadline > 0, "--deadline must be > 0")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    if args.out is None:
        args.out = RESULTS_DIR / f"serve-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}.json"
    return args


async def amain(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    compare = [json.loads(Path(f).read_text()) for f in args.compare]
    report: dict[str, Any] = {
        "benchmark": "serve", "label": args.label,
        "command": shlex.join(["dejavu-bench", "serve", *(sys.argv[1:] if argv is None else argv)]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
        "address": args.address,
        "workload": {"prompt_len": args.prompt_len.describe(), "output_len": args.output_len.describe(),
                     "vocab_size": args.vocab_size, "seed": args.seed, "temperature": 0.0, "stop_token_ids": [],
                     "arrivals": "poisson", "num_requests": args.num_requests,
                     "duration_s": None if args.num_requests else args.duration},
        "settings": {"timeout_s": args.timeout, "deadline_s": args.deadline,
                     "connect_timeout_s": args.connect_timeout},
        "rates": [],
    }
    async with AsyncClient(args.address, timeout=args.timeout, connect_timeout=args.connect_timeout, keys=args.keys,
                           key_name=args.key_name) as client:
        report["server"] = client.server_info
        for k, rate in enumerate(args.rates):
            reqs = plan(rate, args)
            deadline = args.deadline or (reqs[-1].arrival_s if reqs else 0.0) + args.timeout + 10.0
            with progress(len(reqs), f"rate {rate:g} req/s ({k + 1}/{len(args.rates)})", args.quiet,
                          "req") as bar:
                summary = await run_rate(client, rate, reqs, args.timeout, deadline,
                                         int((client.server_info or {}).get("slots", 0)), bar)
            report["rates"].append(summary)
            print(line(summary), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {args.out}")
    if not args.no_plot:
        png = args.plot or args.out.with_suffix(".png")
        plot(report, compare, png)
        print(f"plot: {png}")
    return 0 if all(s["completed"] > 0 for s in report["rates"]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run_loop(amain(argv))
    except DejaVuError as e:
        print(f"dejavu-bench serve: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a malformed --address, keys that cannot be read
        print(f"dejavu-bench serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dejavu-bench serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
