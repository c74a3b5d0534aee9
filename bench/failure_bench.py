"""`dejavu-bench failure`: the paper's failure experiment (section 5.3) on real processes, replica vs recompute.

For each setting, in the same run, on the same model shape, deployment and workload (Poisson arrivals at one
steady rate; prompts and outputs as --prompt-len / --output-len, the paper's by default):
  - `--replicate off`: a stage that comes back recomputes every request in flight (the baseline);
  - `--replicate on`: it restores its KV from its replica and replays only what the replica lacked;
two runs each, on one deployment:
1. fault-free: throughput (output tokens/s), TPOT p50 and every request's latency;
2. the same workload with stage `--victim` killed (SIGKILL) `--kill-at` seconds in: every token's arrival time,
   the recovery as status() reports it, and from the kill to the first token after it split into detection
   (the kill until the supervisor reported the stage down), restart (until the new stage said Hello: a restarted
   stage loads its weights after its Hello, while its epoch links and its KV is restored), KV restore, relink (the
   rest until the pipeline served again) and replay (until the first token; it waits for the weights too).
Before them, a decode phase (`--cost-repeats` times): every slot busy decoding `--decode-tokens` tokens after a
`--decode-context`-token prompt, all started together (pipeline bench's overhead run): its tokens/s and TPOT have no
queue in them, so replication's per-step cost shows there rather than in the Poisson runs (whose latencies at a
rate near capacity are mostly queueing, which moves between runs by more than 2%).
Figures (JSON + PNG in --out): replication's fault-free cost (on / off throughput and TPOT: target within 2%;
the decode phase's medians, and the Poisson run's),
the kill-to-first-token split per setting (target: 3 s or less), the latency inflation of the requests in flight
at the kill (their latency in the failure run over the fault-free run's, median: paper 1.24x replica vs 1.91x
recompute; target 1.10x or less), and tokens/s over time around the kill for both settings.
`--settings` may repeat (off,on,off,on: one deployment each, alternated so that drift falls on both); the figures
pool a setting's runs. Before the fault-free run, `--warmup-requests` of the workload's first requests run once,
uncounted, so the CUDA graphs of its batch sizes are captured outside the measured runs (a fault-free run that
captured them was slower than the failure run after it: inflation under 1x). `--cost-only`: the decode phases alone.
Weights are random (config key `dejavu_random_weights`, drawn by each stage on its device: no disk), so "weight
load" here is the draw, not a read from the page cache. `--quick`: a tiny model on CPU, two simulated hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import curve_bench
from bench.pipeline_bench import SHAPES, vocab_size, write_model
from bus import loadgen
from bus.client import AsyncClient
from bus.loadgen import OUT_DEFAULT, RESULTS_DIR, percentiles, progress

BIN_S = 0.25  # tokens/s over time: bin width


async def _one(c: AsyncClient, i: int, req: loadgen.Planned, t0: float, timeout: float) -> dict[str, Any]:
    delay = t0 + req.arrival_s - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.time()
    times: list[float] = []
    rec: dict[str, Any] = {"i": i, "sent": sent, "prompt_len": len(req.prompt), "error": None}
    try:
        async with c.stream(prompt_token_ids=req.prompt, max_new_tokens=req.output_len, temperature=0.0,
                            ignore_eos=True, timeout=timeout) as st:
            async for ev in st:
                now = time.time()
                times.extend([now] * len(ev.token_ids))
    except Exception as e:  # noqa: BLE001 - recorded: a lost request is a result too
        rec["error"] = f"{type(e).__name__}: {e}"
    rec.update(end=time.time(), times=times, generated=len(times))
    if times:
        rec["latency_s"] = times[-1] - sent
        rec["normalized_latency_s"] = rec["latency_s"] / len(times)
        rec["tpot_s"] = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return rec


async def run_workload(address: str, reqs: list[loadgen.Planned], timeout: float, kill: tuple[float, int] | None,
                       label: str, quiet: bool) -> dict[str, Any]:
    """Send `reqs` at their arrival times; with `kill` = (seconds, stage), SIGKILL that stage then."""
    out: dict[str, Any] = {}
    bar = progress(len(reqs), label, quiet, "req")
    async with AsyncClient(address, timeout=timeout) as c:
        t0 = time.time() + 0.5
        tasks = [asyncio.create_task(_one(c, i, r, t0, timeout)) for i, r in enumerate(reqs)]
        for t in tasks:
            t.add_done_callback(lambda _: bar.update(1))
        if kill is not None:
            await asyncio.sleep(max(0.0, t0 + kill[0] - time.time()))
            st = await c.status()
            pid = next(p["pid"] for p in st["processes"] if p["role"] == "stage" and p["index"] == kill[1])
            out["kill_wall"] = time.time()
            os.kill(pid, 9)
        out["records"] = await asyncio.gather(*tasks)
        bar.close()
        out["t0"] = t0
        # the recovery as status reports it (once the stage serves again)
        deadline = time.time() + 120
        st = await c.status()
        while kill is not None and not st["recoveries"] and time.time() < deadline:
            await asyncio.sleep(0.5)
            st = await c.status()
        out["recoveries"], out["replicas"] = st["recoveries"], st["replicas"]
    return out


def decode_phase(address: str, args: argparse.Namespace, vocab: int) -> dict[str, Any] | None:
    """`--cost-repeats` decode phases (every slot busy from the same moment; pipeline bench's overhead run):
    the medians of their tokens/s, TPOT and stage step, and each."""
    from bench.pipeline_bench import overhead

    if args.cost_repeats < 1:
        return None
    each = [asyncio.run(overhead(address, args.stages, args.microbatch_size, args.decode_context, vocab,
                                 args.decode_tokens)) for _ in range(args.cost_repeats)]
    steps = [statistics.mean(e["stage_decode_step_s"].values()) for e in each]
    rates = [e["decode_tokens_per_s"] for e in each if e["decode_tokens_per_s"]]
    return {"tokens_per_s": statistics.median(rates) if rates else None,
            "tpot_s": statistics.median(e["tpot_median_s"] for e in each), "stage_step_s": statistics.median(steps),
            "each": [{"tokens_per_s": e["decode_tokens_per_s"], "tpot_s": e["tpot_median_s"], "stage_step_s": st}
                     for e, st in zip(each, steps)]}


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    recs = [r for r in run["records"] if r["times"]]
    toks = sum(r["generated"] for r in recs)
    first = min(r["sent"] for r in run["records"])
    last = max(r["times"][-1] for r in recs) if recs else first
    return {
        "requests": len(run["records"]), "lost": sum(1 for r in run["records"] if r["error"]),
        "output_tokens": toks, "tokens_per_s": toks / max(1e-9, last - first),
        "tpot_s": percentiles([r["tpot_s"] for r in recs if r.get("tpot_s")]),
        "normalized_latency_s": percentiles([r["normalized_latency_s"] for r in recs]),
    }


def failure_figures(clean: dict[str, Any], fail: dict[str, Any]) -> dict[str, Any]:
    kill = fail["kill_wall"]
    rec = fail["recoveries"][-1] if fail["recoveries"] else None
    # the first token the rebuilt pipeline produced (results already on their way at the kill do not count)
    back = rec["serving_at"] if rec is not None else kill
    after = [t for r in fail["records"] for t in r["times"] if t > back]
    first_after = min(after) if after else None
    split: dict[str, float | None] = {"kill_to_first_token_s": first_after - kill if first_after else None}
    if rec is not None:
        split.update(detection_s=rec["detected_at"] - kill, restart_and_load_s=rec["load_s"],
                     restore_s=rec["restore_s"],
                     relink_s=rec["serving_at"] - rec["detected_at"] - rec["load_s"] - rec["restore_s"],
                     replay_s=(first_after - rec["serving_at"]) if first_after else None)
    # requests in flight at the kill: sent before it, not finished by it
    clean_by = {r["i"]: r for r in clean["records"]}
    inflation = []
    for r in fail["records"]:
        c = clean_by.get(r["i"])
        if r["times"] and r["sent"] < kill < r["times"][-1] and c and c.get("latency_s"):
            inflation.append(r["latency_s"] / c["latency_s"])
    lo = min(kill - 10, min(r["sent"] for r in fail["records"]))
    hi = max((t for r in fail["records"] for t in r["times"]), default=kill + 10)
    bins = [0] * (int((hi - lo) / BIN_S) + 1)
    for r in fail["records"]:
        for t in r["times"]:
            bins[int((t - lo) / BIN_S)] += 1
    return {
        "recovery": rec, "split": split,
        "in_flight_at_kill": len(inflation),
        "latency_inflation": {"median": statistics.median(inflation) if inflation else None,
                              "p95": percentiles(inflation)["p95"], "max": max(inflation) if inflation else None,
                              "each": sorted(inflation)},
        "tokens_per_s_over_time": {"bin_s": BIN_S, "start_s": lo - kill, "counts": bins},
        "lost": sum(1 for r in fail["records"] if r["error"]),
    }


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Replica against recompute over every run of each setting (settings alternated to spread drift over both):
    replication's fault-free cost - the decode phases' tokens/s and TPOT pooled per setting (medians), each
    on/off pair's ratio beside them, and the Poisson runs' - and the latency inflation of the requests in flight
    at the kill, pooled over a setting's runs (median)."""
    by = {s: [r for r in runs.values() if r["setting"] == s] for s in ("on", "off")}
    if not by["on"] or not by["off"]:
        return {}
    out: dict[str, Any] = {}
    each = {s: [e for r in rs if r.get("decode_phase") for e in r["decode_phase"]["each"]] for s, rs in by.items()}
    if all(each[s] and all(e["tokens_per_s"] for e in each[s]) for s in by):
        med = {s: (statistics.median(e["tokens_per_s"] for e in each[s]), statistics.median(e["tpot_s"] for e in each[s]))
               for s in by}
        tps, tpot = med["on"][0] / med["off"][0], med["on"][1] / med["off"][1]
        pairs = [r_on["decode_phase"]["tokens_per_s"] / r_off["decode_phase"]["tokens_per_s"]
                 for r_on, r_off in zip(by["on"], by["off"])]
        out["replication_cost"] = {"decode_tokens_per_s_on_over_off": tps, "decode_tpot_on_over_off": tpot,
                                   "decode_within_2pct": tps >= 0.98 and tpot <= 1.02,
                                   "decode_phases": {s: len(each[s]) for s in by},
                                   "decode_tokens_per_s_on_over_off_each_pair": pairs}
    if all("fault_free" in r for rs in by.values() for r in rs):
        ff = {s: [r["fault_free"] for r in rs] for s, rs in by.items()}
        tok = {s: statistics.median(f["tokens_per_s"] for f in ff[s]) for s in by}
        tp = {s: statistics.median(f["tpot_s"]["p50"] for f in ff[s] if f["tpot_s"]["p50"]) for s in by}
        out.setdefault("replication_cost", {}).update(tokens_per_s_on_over_off=tok["on"] / tok["off"],
                                                      tpot_p50_on_over_off=tp["on"] / tp["off"])
        pooled = {s: [x for r in rs for x in r["latency_inflation"]["each"]] for s, rs in by.items()}
        out["inflation_replica_vs_recompute"] = [statistics.median(pooled[s]) if pooled[s] else None
                                                 for s in ("on", "off")]
        out["in_flight_at_kills"] = {s: len(pooled[s]) for s in by}
    return out


class _NoHyphenBreaks(argparse.HelpFormatter):
    """Help lines wrapped at spaces only: a path such as ./dejavu-bench-results/ stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-bench failure", description=__doc__.split("\n\n")[0],
                                formatter_class=_NoHyphenBreaks)
    p.add_argument("--shape", default="opt-13b", choices=sorted(SHAPES))
    p.add_argument("--stages", type=int, default=1, help="pipeline depth (GPU stages: one per GPU)")
    p.add_argument("--hosts", type=int, default=1, help="simulated hosts the stages spread over")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--microbatch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--prompt-len", default="paper")
    p.add_argument("--output-len", default="paper")
    p.add_argument("--kill-at", type=float, default=0.0, help="seconds into the run (0: the last arrival / 2)")
    p.add_argument("--victim", type=int, default=-1, help="stage to kill (-1: the last)")
    p.add_argument("--settings", default="off,on",
                   help="--replicate values to run, one deployment each, in this order; repeats allowed and pooled "
                        "(off,on,off,on alternates them, so drift over the run falls on both)")
    p.add_argument("--warmup-requests", type=int, default=16,
                   help="the workload's first N requests, sent once before the fault-free run and not counted: the "
                        "batch sizes' CUDA graphs are captured there rather than in the measured runs")
    p.add_argument("--serve-args", default="",
                   help="more dejavu-serve options for every deployment (an A/B, e.g. \"--cudnn-attention off\")")
    p.add_argument("--cost-only", action="store_true",
                   help="only the decode phases (replication's fault-free cost): no Poisson runs, no kill")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for failure_bench.json, failure_bench.png and the deployments' logs (default "
                        f"{OUT_DEFAULT})")
    p.add_argument("--cost-repeats", type=int, default=3,
                   help="decode phases per deployment, every slot busy (replication's cost: their medians; 0: none)")
    p.add_argument("--decode-context", type=int, default=1000, help="the decode phase's prompt length")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens each slot decodes in the decode phase")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU, 2 stages on 2 simulated hosts")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (on stderr; shown only when stderr is a terminal)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.shape, args.device, args.dtype, args.stages, args.hosts = "tiny", "cpu", "float32", 2, 2
        args.rate, args.num_requests, args.prompt_len, args.output_len = 4.0, 24, "8:40", "60:120"
        args.max_seq_len, args.microbatch_size = 384, 4
        # 320 decode tokens outlast two heartbeats (0.25 s) even at 3 ms a token, as the other quick runs
        args.decode_context, args.decode_tokens, args.cost_repeats = 32, 320, min(args.cost_repeats, 2)
        args.warmup_requests = min(args.warmup_requests, 4)
    args.victim = args.victim if args.victim >= 0 else args.stages - 1
    vocab = vocab_size(args.shape)
    with tempfile.TemporaryDirectory(prefix="dejavu-failure-") as root:
        saved, tempfile.tempdir = tempfile.tempdir, root
        try:
            return _run(args, argv, Path(root), vocab)
        finally:
            tempfile.tempdir = saved


def _run(args: argparse.Namespace, argv: list[str] | None, root: Path, vocab: int) -> int:
    import torch

    from recovery.launch import Deployment

    model = write_model(args.shape, root)
    largs = loadgen.parse_args(["--address", "tcp://127.0.0.1:1", "--num-requests", str(args.num_requests),
                                "--prompt-len", args.prompt_len, "--output-len", args.output_len,
                                "--vocab-size", str(vocab), "--no-plot"])
    reqs = loadgen.plan(args.rate, largs)
    kill_at = args.kill_at or reqs[-1].arrival_s / 2
    card = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {
        "benchmark": "failure (issue 18): replica vs recompute - fault-free cost of replication, kill to first "
                     "token, latency inflation of the requests in flight, tokens/s around the kill",
        "shape": args.shape, "card": card, "gpus": torch.cuda.device_count() if args.device == "cuda" else 0,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["bin/dejavu-bench", "failure", *(sys.argv[2:] if argv is None else argv)]),
        "commit": curve_bench.source_commit(), "machine": {"cpus": os.cpu_count()},
        "settings": {k: str(v) for k, v in vars(args).items()}, "kill_at_s": kill_at, "runs": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    settings = args.settings.split(",")
    if any(x not in ("on", "off") for x in settings):
        raise SystemExit(f"--settings takes on and off, in any order and number, got {args.settings!r}")
    warm = reqs[:args.warmup_requests]
    for k, setting in enumerate(settings):
        label = setting if settings.index(setting) == k else f"{setting}-{settings[:k + 1].count(setting)}"
        dep = Deployment.start(model, args.stages, "--device", args.device, "--dtype", args.dtype,
                               "--microbatch-size", str(args.microbatch_size), "--max-seq-len", str(args.max_seq_len),
                               "--hosts", str(args.hosts), "--replicate", setting, "--kv-takeover", "off",
                               "--heartbeat-interval", "0.25", "--heartbeat-timeout", "2", "--startup-timeout", "600",
                               *shlex.split(args.serve_args), timeout=900, log_level="INFO")
        print(f"[failure {time.strftime('%H:%M:%S')}] {label} (--replicate {setting}): deployment ready", flush=True)
        try:
            decode = decode_phase(dep.address, args, vocab)
            if decode:
                print(f"[failure] {label}: decode phase (every slot busy) {decode['tokens_per_s'] or 0:.1f} tokens/s, "
                      f"TPOT {decode['tpot_s'] * 1e3:.2f} ms (medians of {len(decode['each'])})", flush=True)
            run: dict[str, Any] = {"setting": setting, "decode_phase": decode}
            if not args.cost_only:
                if warm:  # the batch sizes' graphs and kernels, captured and tuned outside the measured runs
                    asyncio.run(run_workload(dep.address, warm, args.timeout, None, f"{label}: warm-up", args.quiet))
                clean = asyncio.run(run_workload(dep.address, reqs, args.timeout, None, f"{label}: fault-free",
                                                 args.quiet))
                print(f"[failure] {label}: fault-free {summarize(clean)['tokens_per_s']:.1f} tokens/s", flush=True)
                fail = asyncio.run(run_workload(dep.address, reqs, args.timeout, (kill_at, args.victim),
                                                f"{label}: a stage killed at {kill_at:.1f}s", args.quiet))
                figs = failure_figures(clean, fail)
                run.update(fault_free=summarize(clean), with_failure=summarize(fail), **figs)
                print(f"[failure] {label}: {json.dumps(figs['split'])} inflation {figs['latency_inflation']}",
                      flush=True)
            result["runs"][label] = run
        finally:
            (args.out / f"failure-{label}.log").write_text(dep.logs())
            dep.stop(timeout=120)
        (args.out / "failure_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    result.update(compare(result["runs"]))
    (args.out / "failure_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "failure_bench.png")
    print(f"[failure] wrote {args.out / 'failure_bench.json'}", flush=True)
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    killed = {label: run for label, run in result["runs"].items() if "split" in run}
    if not killed:  # --cost-only: the decode phases of each deployment
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, run in enumerate(result["runs"].values()):
            for e in (run["decode_phase"] or {}).get("each", []):
                ax.scatter(k, e["tokens_per_s"], color="C0" if run["setting"] == "on" else "C1")
        ax.set_xticks(range(len(result["runs"])), [f"--replicate {lb}" for lb in result["runs"]])
        ax.set_ylabel("decode tokens/s, every slot busy")
        ax.set_title(f"replication's fault-free cost, {result['shape']} ({result['card']})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2), width_ratios=[2, 1])
    for k, (label, run) in enumerate(killed.items()):
        tl = run["tokens_per_s_over_time"]
        xs = [tl["start_s"] + i * tl["bin_s"] for i in range(len(tl["counts"]))]
        a.plot(xs, [n / tl["bin_s"] for n in tl["counts"]], color=f"C{k}", lw=1,
               label=f"{'replica' if run['setting'] == 'on' else 'recompute'} ({label})")
        sp = run["split"]
        parts = ["detection_s", "restart_and_load_s", "restore_s", "relink_s", "replay_s"]
        left = 0.0
        for j, part in enumerate(parts):
            v = sp.get(part) or 0.0
            b.barh(k, v, left=left, color=f"C{j + 2}", label=part.removesuffix("_s") if k == 0 else None)
            left += v
    a.axvline(0, color="k", ls=":", lw=1)
    a.set_xlabel("seconds from the kill")
    a.set_ylabel("output tokens/s")
    a.set_title(f"stage killed mid-run, {result['shape']} ({result['card']})")
    a.legend(fontsize=8)
    b.set_yticks(range(len(killed)), [f"--replicate {lb}" for lb in killed])
    b.set_xlabel("kill to first token (s)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
