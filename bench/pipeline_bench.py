"""`dejavu-bench pipeline`: the colocated pipeline on real processes, against its own single-GPU runtime.

For one model shape and each pipeline depth S given:
1. baseline: one in-process ShardRuntime holding one stage's share of the layers (L/S) on one device —
   its decode step at the microbatch size with ~`context` tokens cached (the "single-GPU runtime");
2. a deployment (`dejavu-serve`, S stage processes, NCCL activations on CUDA);
3. pipeline overhead: S x microbatch requests of `context`-token prompts decode together; the per-stage
   decode step (device time, from the stages' own event timers) and the time per output token are set
   against the baseline step (ratio 1.0 = no overhead; TPOT ideal = S x baseline step); their output tokens/s
   together while every one decodes is the deployment's throughput with all slots busy;
4. the paper's workload (Poisson arrivals, 1,000-token prompts, chat-like output lengths) at each rate:
   throughput, TTFT, TPOT, normalized latency p50/p95/p99, and each stage's idle fraction (bubbles):
   1 - (device-busy time / wall time) over the rate's run.
With `--hosts H` (issue 17) each depth S runs twice in the same run, steps 2-4 each time: all stages on one
host (`dejavu-serve --hosts 1`) and spread over simulated hosts (`--hosts S` for `each`, else `--hosts H`,
stages in contiguous blocks; each its own loopback address, agent, KV streamer and shared memory). The JSON's
run records carry `hosts`; `cross_host_vs_one_host` gives cross-host / one-host ratios of step 3's TPOT and
throughput (the target: within 3%) and of each rate's tokens/s and TPOT p50 (bench/cross_host.py), and
`control_messages` the control plane's message rate and latency, plaintext vs CurveZMQ (bench/curve_bench.py,
measured first, in this process).
`--ab SERVE_ARGS` makes an A/B of one run: each depth runs --ab-repeats deployments with --serve-args (A) and as
many with SERVE_ARGS (B), alternating which goes first; `ab` in the JSON gives B over A of the medians.
Weights are random (config key `dejavu_random_weights`: each stage draws its own on its GPU, no disk).
Writes <out>/pipeline_bench.json (card, date, command, every figure) and <out>/pipeline_bench.png (--out:
default ./dejavu-bench-results/ in the current directory), with the deployment's log; a progress bar per rate
on stderr (on a terminal, without --quiet); `--quick` runs a tiny model on CPU. Its temporary files (the model's
config, the deployment's log) are removed at the end, on error and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench import curve_bench
from bench.cross_host import cross_host, cross_host_lines, hosts_arg, hosts_error, hosts_for, plot_ratios
from bus import loadgen
from bus.client import AsyncClient
from bus.loadgen import OUT_DEFAULT, RESULTS_DIR, echo, progress
from stages.layers.attention import CUDNN_ATTENTION_MODES

SHAPES: dict[str, dict[str, int]] = {
    # OPT family shapes (hidden, layers, heads, ffn); vocab 50272, 2048 positions
    "opt-13b": {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "ffn_dim": 20480},
    "opt-30b": {"hidden_size": 7168, "num_hidden_layers": 48, "num_attention_heads": 56, "ffn_dim": 28672},
    "opt-66b": {"hidden_size": 9216, "num_hidden_layers": 64, "num_attention_heads": 72, "ffn_dim": 36864},
    "opt-125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "ffn_dim": 3072},  # CPU
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "ffn_dim": 128},
}


def vocab_size(shape: str) -> int:
    """The vocabulary of a SHAPES model: OPT's, or a byte's for the tiny one."""
    return 256 if shape == "tiny" else 50272


def write_model(shape: str, root: Path) -> Path:
    path = root / f"random-{shape}"
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": vocab_size(shape),
        "max_position_embeddings": 2048, "do_layer_norm_before": True, "activation_function": "relu",
        "word_embed_proj_dim": SHAPES[shape]["hidden_size"], "bos_token_id": 2, "eos_token_id": 2,
        "dejavu_random_weights": {"seed": 0, "std": 0.02}, **SHAPES[shape],
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def baseline_step(model: Path, layers: int, batch: int, context: int, dtype: str, device: str,
                  repeats: int, cudnn_attention: str = "all", decode_tokens: int = 0) -> dict[str, float]:
    """Decode step of one stage's layers in one in-process runtime (no pipeline), at the contexts the overhead run
    decodes at: `points` contexts evenly over [context, context + decode_tokens), each the median of `repeats`
    steps, averaged (the overhead run's stage step is a mean over the same range). A step reads every member's
    keys up to its graph's bucket, so a baseline taken at the first context alone (as before 2026-12-07) is
    short by the growth of the cache: 1000 -> 1256 tokens is +13% of an OPT-13B step's KV reads at batch 8.
    Rows past the prefilled context hold zeros: a step's time does not depend on the values it reads."""
    from stages.batch import SeqChunk
    from stages.runtime import ShardConfig, ShardRuntime

    rt = ShardRuntime(ShardConfig(model, (0, layers), batch, context + decode_tokens + 64, dtype, device,
                                  cudnn_attention=cudnn_attention))
    ids = torch.randint(3, 200, (batch * context,)).tolist()
    rt.forward([SeqChunk(i, 0, context) for i in range(batch)], rt.embed_input(ids))
    token = rt.embed_input([5] * batch)
    points = 8 if decode_tokens >= 8 else 1
    contexts = [context + k * decode_tokens // points for k in range(points)]
    per_context = []
    for ctx in contexts:
        chunks = [SeqChunk(i, ctx, 1) for i in range(batch)]
        times = []
        for _ in range(repeats + 3):
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            rt.forward(chunks, token)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        per_context.append((statistics.median(times[3:]), min(times[3:])))
    del rt
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"median_s": statistics.mean(m for m, _ in per_context), "min_s": min(m for _, m in per_context),
            "at_context_s": per_context[0][0], "contexts": contexts, "per_context_s": [m for m, _ in per_context]}


def stage_stats(status: dict[str, Any]) -> dict[int, dict[str, float]]:
    return {p["index"]: {"busy_s": p["busy_s"], "steps": p["steps"], "uptime_s": p["uptime_s"]}
            for p in status["processes"] if p["role"] == "stage"}


async def fresh_stats(c: AsyncClient, prev: dict[int, dict[str, float]] | None = None,
                      timeout: float = 30.0) -> dict[int, dict[str, float]]:
    """Stage stats reported after `prev` was (stages report every heartbeat interval): polls status."""
    deadline = time.monotonic() + timeout
    while True:
        now = stage_stats(await c.status())
        if prev is None or all(now[i]["uptime_s"] > prev[i]["uptime_s"] for i in now):
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"stages reported no new stats within {timeout}s")
        await asyncio.sleep(0.05)  # polling a status query, bounded by the deadline above


def idle(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]]) -> dict[str, float]:
    out = {}
    for i in sorted(after):
        wall = after[i]["uptime_s"] - before[i]["uptime_s"]
        busy = after[i]["busy_s"] - before[i]["busy_s"]
        out[str(i)] = max(0.0, 1.0 - busy / wall) if wall > 0 else float("nan")
    return out


async def overhead(address: str, stages: int, mb: int, context: int, vocab: int, new: int,
                   out: Path | None = None) -> dict[str, Any]:
    async with AsyncClient(address, timeout=1800) as c:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, vocab, (context,), generator=g).tolist() for _ in range(stages * mb)]
        first = asyncio.Event()
        arrived = 0

        async def one(p: list[int]):  # type: ignore[no-untyped-def]
            nonlocal arrived
            async with c.stream(prompt_token_ids=p, max_new_tokens=new, ignore_eos=True) as s:
                times = []
                async for ev in s:
                    times.append(ev.t)
                    if len(times) == 1:
                        arrived += 1
                        if arrived == len(prompts):
                            first.set()
            return times

        tasks = [asyncio.create_task(one(p)) for p in prompts]
        t0 = time.perf_counter()
        last_arrived = -1
        while not first.is_set():  # progress every 30 s: a slow prefill phase says how far it got and whether
            try:  # stages were restarted meanwhile
                await asyncio.wait_for(first.wait(), 30)
            except TimeoutError:
                if time.perf_counter() - t0 > 900:
                    raise
                st = await c.status()
                stages = [p for p in st["processes"] if p["role"] == "stage"]
                print(f"[pipeline {time.strftime('%H:%M:%S')}] prefill: {arrived}/{len(prompts)} first tokens after "
                      f"{time.perf_counter() - t0:.0f} s; incarnations {[p['incarnation'] for p in stages]}; "
                      f"stage steps {[p.get('steps') for p in stages]}", flush=True)
                if arrived == last_arrived:  # no progress for 30 s: every process dumps its threads' stacks
                    dump_stacks(st["processes"], out, "prefill-")
                last_arrived = arrived
        print(f"[pipeline {time.strftime('%H:%M:%S')}] all {len(prompts)} prompts prefilled in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        before = await fresh_stats(c, await fresh_stats(c))  # a report taken wholly after every prefill
        ended = sum(t.done() for t in tasks)
        results = await asyncio.gather(*tasks)
        after = await fresh_stats(c, stage_stats(await c.status()))
    if ended or all(after[i]["steps"] == before[i]["steps"] for i in after):  # (prompt stages may stay idle)
        raise RuntimeError(f"the decode phase ({new} tokens) ended before the stages' baseline report (they report "
                           f"every heartbeat; {ended} of {len(tasks)} requests had ended): decode more tokens")
    tpot = [statistics.median([b - a for a, b in zip(t[len(t) // 4 :], t[len(t) // 4 + 1 :])]) for t in results]
    per_stage = {str(i): (after[i]["busy_s"] - before[i]["busy_s"]) / max(1, after[i]["steps"] - before[i]["steps"])
                 for i in after}
    return {"tpot_median_s": statistics.median(tpot), "stage_decode_step_s": per_stage,
            "decode_tokens_per_s": all_busy_rate(results), "requests": len(prompts), "context": context,
            "new_tokens": new}


def all_busy_rate(times: list[list[float]]) -> float | None:
    """Output tokens per second of all requests together while every one of them decodes: from the latest
    request's first quarter of tokens (as TPOT: past the prefill) to the earliest request's last token. These
    requests fill every slot, so this is the deployment's decode throughput at full batch."""
    start, end = max(t[len(t) // 4] for t in times), min(t[-1] for t in times)
    if end <= start:
        return None
    return sum(1 for t in times for x in t if start < x <= end) / (end - start)


def dump_stacks(processes: list[dict[str, Any]], out: Path | None = None, tag: str = "") -> None:
    """Ask each (local) process to write every thread's Python stack to its log (faulthandler on SIGUSR1,
    bus/child.py): where a slow phase waits. With py-spy on PATH and `out` given, also each process's
    native stacks (the CUDA or NCCL call a thread sits in), one file per process."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") if out is not None else None
    for p in processes:
        if p.get("role") not in ("stage", "controller"):
            continue
        try:
            os.kill(int(p["pid"]), signal.SIGUSR1)
        except (OSError, ValueError) as e:
            print(f"[pipeline] could not signal {p['role']} {p['index']} (pid {p['pid']}): {e}", flush=True)
        if spy is not None and out is not None:
            out.mkdir(parents=True, exist_ok=True)
            dest = out / f"stacks-{tag}{p['role']}{p['index']}.txt"
            try:
                r = subprocess.run([spy, "dump", "--native", "--pid", str(p["pid"])], capture_output=True,
                                   text=True, timeout=30)
                dest.write_text(r.stdout + r.stderr)
            except (OSError, subprocess.TimeoutExpired) as e:
                dest.write_text(f"py-spy failed: {e!r}\n")


async def watch_progress(c: AsyncClient, done: asyncio.Event, label: str, out: Path | None,
                         save_log: Callable[[], None] | None, quiet_s: float = 20.0,
                         poll_s: float = 5.0) -> list[dict[str, Any]]:
    """While a rate runs: poll status every `poll_s`; when no stage has finished a step for `quiet_s` (a stall,
    or simply nothing in flight), print where things stand and dump every process's stacks, once per stall.
    Returns the stalls seen (start, length, incarnations): a slow rate says why."""
    stalls: list[dict[str, Any]] = []
    last: list[Any] | None = None
    t0 = changed = time.monotonic()
    dumped = False
    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), poll_s)
            break
        except TimeoutError:
            pass
        try:
            st = await asyncio.wait_for(c.status(), 10)
        except Exception as e:  # noqa: BLE001 - diagnostics only: a controller that does not answer is news
            echo(f"[pipeline {time.strftime('%H:%M:%S')}] {label}: status failed: {e!r}")
            continue
        stages = [p for p in st["processes"] if p["role"] == "stage"]
        now = [(p["incarnation"], p.get("steps")) for p in stages]
        if now != last:
            if dumped:
                stalls[-1]["length_s"] = round(time.monotonic() - t0 - stalls[-1]["t_s"], 1)
                stalls[-1]["after"] = now
            last, changed, dumped = now, time.monotonic(), False
        elif not dumped and time.monotonic() - changed > quiet_s:
            dumped = True
            stalls.append({"t_s": round(changed - t0, 1), "before": now, "states": [p.get("state") for p in stages]})
            echo(f"[pipeline {time.strftime('%H:%M:%S')}] {label}: no stage step for {quiet_s:.0f} s; "
                 f"(incarnation, steps) {now}; dumping stacks")
            # on a thread: py-spy takes a while per process, and the rate's clients must keep receiving meanwhile
            await asyncio.to_thread(dump_stacks, st["processes"], out, f"{label}-{len(stalls)}-")
            if save_log is not None:
                await asyncio.sleep(min(2.0, quiet_s))  # the dumps reach the log
                save_log()
    return stalls


Annotate = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], None]


async def sweep(address: str, rates: list[float], args: argparse.Namespace,
                on_rate: Callable[[list[dict[str, Any]]], None] | None = None,
                save_log: Callable[[], None] | None = None, annotate: Annotate | None = None,
                tag: str = "pipeline") -> list[dict[str, Any]]:
    """The paper's workload at each rate against a running deployment; one loadgen summary per rate, with each
    stage's idle fraction over the rate, stalls and restarts. `annotate(status before, status after, summary)`
    adds figures of its own (status after: taken once every stage reported past the rate's end)."""
    largs = loadgen.parse_args(["--address", address, "--num-requests", str(args.num_requests),
                                "--prompt-len", args.prompt_len, "--output-len", args.output_len,
                                "--vocab-size", str(args.vocab), "--timeout", str(args.timeout), "--no-plot"])
    out = []
    async with AsyncClient(address, timeout=args.timeout) as c:
        for k, rate in enumerate(rates):
            before = await fresh_stats(c)
            st = await c.status()
            inc_before, slots = incarnations(st), int(st.get("slots", 0))
            reqs = loadgen.plan(rate, largs)
            done = asyncio.Event()
            watcher = asyncio.create_task(watch_progress(c, done, f"rate{rate:g}", args.out, save_log))
            bar = progress(len(reqs), f"rate {rate:g} req/s ({k + 1}/{len(rates)})", args.quiet, "req")
            try:
                summary = await loadgen.run_rate(c, rate, reqs, args.timeout, reqs[-1].arrival_s + args.timeout,
                                                 slots, bar)
            finally:
                bar.close()
                done.set()
                stalls = await watcher
            st_before, st = st, await c.status()
            after = await fresh_stats(c, stage_stats(st))
            summary.pop("records", None)
            summary["idle_fraction"] = idle(before, after)
            summary["stalls"] = stalls
            summary["restarts"] = {k: v - inc_before.get(k, 0) for k, v in incarnations(st).items()
                                   if v != inc_before.get(k, 0)}
            if annotate is not None:
                annotate(st_before, await c.status(), summary)
            print(f"[{tag} {time.strftime('%H:%M:%S')}]", loadgen.line(summary), "idle:", summary["idle_fraction"],
                  "restarts:", summary["restarts"], "stalls:", len(stalls), flush=True)
            out.append(summary)
            if on_rate is not None:
                on_rate(out)
    return out


def incarnations(status: dict[str, Any]) -> dict[str, int]:
    return {f"{p['role']}{p['index']}": int(p["incarnation"]) for p in status["processes"]}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def unwind_on_sigterm() -> None:
    """SIGTERM (a `timeout` wrapper) unwinds like Ctrl-C, so the deployment's log tail is still printed."""
    signal.signal(signal.SIGTERM, _interrupt)


async def _status(address: str) -> dict[str, Any]:
    async with AsyncClient(address, timeout=30) as c:
        return await c.status()


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cross = result.get("cross_host_vs_one_host")
    fig, axes = plt.subplots(1, 3 if cross else 2, figsize=(18, 5.2) if cross else (11, 4),
                             width_ratios=[1, 1, 1.5] if cross else None)
    a, b = axes[0], axes[1]
    for k, run in enumerate(result["runs"]):
        rates = [r["rate"] for r in run["rates"]]
        name = f"{run['stages']} st" + (f", {run['hosts']} host{'s' if run['hosts'] > 1 else ''}" if cross else "")
        a.plot(rates, [r["normalized_latency_s"]["p50"] for r in run["rates"]], "o-", color=f"C{k}",
               label=f"{name} p50")
        a.plot(rates, [r["normalized_latency_s"]["p95"] for r in run["rates"]], "x--", color=f"C{k}",
               label=f"{name} p95")
        for i in range(run["stages"]):
            b.plot(rates, [r["idle_fraction"][str(i)] for r in run["rates"]], "o-" if i == 0 else "s:",
                   color=f"C{k}", label=f"{name}: stage {i}")
    a.set_xlabel("request rate (req/s)")
    a.set_ylabel("normalized latency (s/token)")
    load = result.get("machine", {}).get("load_average_at_start", [None])[0]
    a.set_title(f"colocated pipeline, {result['shape']} ({result['card']}"
                + (f", load {load:.1f})" if load is not None and result["card"] == "cpu" else ")"))
    a.legend(fontsize=7)
    b.set_xlabel("request rate (req/s)")
    b.set_ylabel("idle fraction (bubbles)")
    b.set_ylim(0, 1)
    b.legend(fontsize=7)
    if cross:
        plot_ratios(axes[2], cross, result.get("control_messages"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def microbatch_arg(text: str) -> int:
    """--microbatch-size: N >= 1, or auto (0: the deployment sizes it from its GPUs' memory)."""
    if text == "auto":
        return 0
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("give a size of 1 or more, or auto")
    return n


def auto_size(args: argparse.Namespace, model: Path, stages: int) -> int:
    """The microbatch size dejavu-serve's auto will choose here (recovery/sizing.py, the same probe and model), for
    the baseline to run at before the deployment holds the GPUs; the deployment's own choice is read back."""
    from recovery.preflight import check_model
    from recovery.sizing import AUTO, resolve
    from recovery.specs import DeploymentConfig

    cfg = DeploymentConfig(str(model), num_stages=stages, device=args.device, dtype=args.dtype, microbatch_size=AUTO,
                           max_seq_len=args.max_seq_len, cudnn_attention=args.cudnn_attention)
    _, sizing = resolve(cfg, check_model(model))
    return sizing.microbatch_size


def add_deployment_args(p: argparse.ArgumentParser, shape: str = "opt-30b") -> None:
    """The options of a benchmark that starts deployments of a model shape and sweeps the paper's workload over
    them (this one, bench/disagg_bench.py)."""
    p.add_argument("--shape", default=shape, choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--microbatch-size", type=microbatch_arg, default=8,
                   help="slots per microbatch, or auto (memory-sized, as dejavu-serve's default; 0 in args)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--rates", default="0.5,1,2")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--prompt-len", default="paper")
    p.add_argument("--output-len", default="paper")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--transport", default="auto", choices=["auto", "zmq", "nccl"])
    p.add_argument("--hang-timeout", type=float, default=60.0,
                   help="the deployment kills a stage busy with one step this long (a prompt pass takes ~1 s)")
    p.add_argument("--decode-tokens", type=int, default=256, help="tokens per request in the overhead run")
    p.add_argument("--cudnn-attention", default="all", choices=CUDNN_ATTENTION_MODES,
                   help="where the stages' (and the baseline's) attention may use cuDNN's per-shape compiled kernels")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (on stderr; shown only when stderr is a terminal)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-bench pipeline", description=__doc__.split("\n\n")[0])
    add_deployment_args(p)
    p.add_argument("--stages", default="2", help="comma-separated pipeline depths")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for pipeline_bench.json, pipeline_bench.png and deployment logs (default {OUT_DEFAULT})")
    p.add_argument("--hosts", type=hosts_arg, default=None, metavar="H|each",
                   help="also run every depth S on simulated hosts and compare with the same deployment on one host "
                        "(issue 17): `each` puts each stage on its own host (--hosts S for the deployment), a number "
                        "H (2 <= H <= every S) spreads the stages over H hosts in contiguous blocks; each depth then "
                        "runs twice, one host first. With --device cuda each simulated host takes its own GPUs "
                        "(`each`: S GPUs, as one host uses). Adds cross_host_vs_one_host (ratios, target within 3%%) "
                        "and control_messages (plaintext vs CURVE, bench/curve_bench.py) to the JSON. Without it: "
                        "one run per depth, on one host")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU, two short rates")
    p.add_argument("--serve-args", default="", help="more dejavu-serve options for the deployments (an A/B, e.g. "
                   "\"--no-streamer\"), one shell-quoted string")
    p.add_argument("--ab", default=None, metavar="SERVE_ARGS",
                   help="an A/B in one run: each depth also runs with these dejavu-serve options instead of "
                        "--serve-args, --ab-repeats times each, alternating which goes first (one deployment per run; "
                        "one host); the JSON's `ab` gives B over A of the medians (decode tokens/s, TPOT, the slowest "
                        "stage's step)")
    p.add_argument("--ab-repeats", type=int, default=3, help="runs of each side with --ab")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    wrong = hosts_error(args.hosts, [int(x) for x in args.stages.split(",")])
    if wrong:
        p.error(f"--hosts {args.hosts} --stages {args.stages}: {wrong}")
    if args.ab is not None and (args.hosts is not None or args.ab_repeats < 1):
        p.error("--ab runs on one host (no --hosts), with --ab-repeats 1 or more")
    unwind_on_sigterm()
    if args.quick:
        args.shape, args.device, args.dtype, args.context = "tiny", "cpu", "float32", 16
        args.rates, args.num_requests, args.prompt_len, args.output_len = "4,8", 6, "16", "2:6"
        # (the decode phase must outlast two heartbeats, 0.25 s each: 320 tokens take ~1 s even at 3 ms a token)
        args.max_seq_len, args.microbatch_size, args.decode_tokens = 384, 2, 320
    args.vocab = vocab_size(args.shape)
    with scratch("dejavu-pipeline-") as root:
        return _run(args, argv, root)


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder of this run's own that is also the temp dir meanwhile: the model's config and the
    deployments' logs (recovery.launch writes those to the temp dir) go there, and it is removed at the end, on
    error and on Ctrl-C too."""
    with tempfile.TemporaryDirectory(prefix=prefix) as root:
        saved, tempfile.tempdir = tempfile.tempdir, root
        try:
            yield Path(root)
        finally:
            tempfile.tempdir = saved


def header(name: str, benchmark: str, args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """A result's provenance: what ran, on which card, when, the exact command, the commit, the machine's load."""
    card = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    return {
        "benchmark": benchmark, "shape": args.shape, "card": card,
        "gpus": torch.cuda.device_count() if args.device == "cuda" else 0,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["bin/dejavu-bench", name, *(sys.argv[2:] if argv is None else argv)]),
        "commit": curve_bench.source_commit(),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg())},
        "settings": {k: str(v) for k, v in vars(args).items()},
    }


def _run(args: argparse.Namespace, argv: list[str] | None, root: Path) -> int:
    model = write_model(args.shape, root)
    layers_total = SHAPES[args.shape]["num_hidden_layers"]
    result = header("pipeline", "pipeline (issue 3): colocated pipeline vs single-GPU runtime; paper workload"
                    + ("; cross-host vs one host, control messages plaintext vs CURVE (issue 17)" if args.hosts else ""),
                    args, argv)
    result["runs"] = []
    def save(partial: bool) -> None:  # after every rate too, so a run cut short still leaves its figures
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pipeline_bench.json").write_text(json.dumps({**result, "partial": partial}, indent=1) + "\n")

    if args.hosts is not None:  # first, while no deployment of this run loads the machine
        result["control_messages"] = curve_bench.measure()  # ~3 s, also --quick: shorter reads only noise
        for line in curve_bench.lines(result["control_messages"]):
            print(f"[pipeline {time.strftime('%H:%M:%S')}] control messages: {line}", flush=True)
    for stages in [int(s) for s in args.stages.split(",")]:
        base_device = "cuda:0" if args.device == "cuda" else "cpu"
        batch = args.microbatch_size or auto_size(args, model, stages)  # auto: what the deployment will choose
        base = baseline_step(model, layers_total // stages, batch, args.context, args.dtype,
                             base_device, 20, cudnn_attention=args.cudnn_attention, decode_tokens=args.decode_tokens)
        base["batch"] = batch
        print(f"[pipeline {time.strftime('%H:%M:%S')}] {stages} stages: single-device runtime decode step ({layers_total // stages} layers, "
              f"batch {batch}{' (auto)' if not args.microbatch_size else ''}): {base['median_s'] * 1e3:.2f} ms",
              flush=True)
        if args.ab is not None:
            run_ab(args, model, stages, base, result, save)
            continue
        for hosts in hosts_for(stages, args.hosts):
            run_deployment(args, model, stages, hosts, base, result, save)
        if args.hosts is not None:
            result["cross_host_vs_one_host"] = cross_host(result["runs"])
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    save(False)
    plot(result, args.out / "pipeline_bench.png")
    for line in cross_host_lines(result.get("cross_host_vs_one_host")):
        print(f"[pipeline] cross-host / one host: {line}", flush=True)
    print(f"[pipeline] wrote {args.out / 'pipeline_bench.json'}")
    return 0


class DeploymentStartError(RuntimeError):
    """dejavu-serve did not become ready (a stage that does not fit its device, say); the message ends with its log."""


@contextlib.contextmanager
def deployment(args: argparse.Namespace, model: Path, stages: int, *serve_args: str, hosts: int = 1,
               log_name: str = "deployment.log", tag: str = "pipeline") -> Iterator[tuple[Any, Callable[[], None]]]:
    """A deployment of `stages` stages with the benchmark's settings (and `serve_args` more dejavu-serve options):
    yields it with a function that saves its whole log (stack dumps included) to <out>/<log_name>. At the end,
    on error and on Ctrl-C: the log saved, the processes' incarnations and the log's tail printed, stopped."""
    from recovery.launch import Deployment

    try:
        dep = Deployment.start(model, stages, "--device", args.device, "--dtype", args.dtype, "--microbatch-size",
                               str(args.microbatch_size or "auto"), "--max-seq-len", str(args.max_seq_len),
                               "--startup-timeout", "600", "--transport", args.transport,
                               "--heartbeat-interval", "0.25", "--heartbeat-timeout",
                               "10", "--hang-timeout", str(args.hang_timeout),
                               "--cudnn-attention", args.cudnn_attention, "--hosts", str(hosts), *serve_args,
                               timeout=900, log_level="INFO")
    except RuntimeError as e:  # its message ends with the deployment's log tail
        raise DeploymentStartError(str(e)) from None

    def save_log() -> None:  # whole, with any stack dumps
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / log_name).write_text(dep.logs())

    try:
        yield dep, save_log
    finally:
        save_log()  # first: a `timeout` wrapper stops the deployment's processes too (one process group)
        try:  # restarts during the run would explain slow phases: say so
            st = asyncio.run(_status(dep.address))
            print(f"[{tag}] incarnations:", incarnations(st), flush=True)
        except Exception as e:  # noqa: BLE001 - diagnostics only
            print(f"[{tag}] status failed:", repr(e), flush=True)
        save_log()
        log_text = dep.logs()
        print(f"[{tag}] deployment log (tail):\n" + "\n".join(log_text.splitlines()[-60:]), flush=True)
        dep.stop(timeout=120)


def run_ab(args: argparse.Namespace, model: Path, stages: int, base: dict[str, float], result: dict[str, Any],
           save: Callable[[bool], None]) -> None:
    """--ab: A (--serve-args) and B (--ab) --ab-repeats times each, alternating which goes first (drift falls on
    both); result["ab"][str(stages)]: each side's medians and B over A."""
    sides = {"A": args.serve_args or "", "B": args.ab}
    for k in range(args.ab_repeats):
        for side in ("A", "B") if k % 2 == 0 else ("B", "A"):
            run_deployment(args, model, stages, 1, base, result, save, serve_args=sides[side], tag=f"{side}{k + 1}")
            result["runs"][-1]["ab"] = {"side": side, "serve_args": sides[side], "repeat": k + 1}
    mine = [r for r in result["runs"] if r["stages"] == stages and "ab" in r]

    def medians(side: str) -> dict[str, float]:
        runs = [r["overhead"] for r in mine if r["ab"]["side"] == side]
        return {"decode_tokens_per_s": statistics.median(o["decode_tokens_per_s"] or 0.0 for o in runs),
                "tpot_median_s": statistics.median(o["tpot_median_s"] for o in runs),
                "slowest_stage_step_s": statistics.median(max(o["stage_decode_step_s"].values()) for o in runs)}

    a, b = medians("A"), medians("B")
    result.setdefault("ab", {})[str(stages)] = {
        "A": {"serve_args": sides["A"], **a}, "B": {"serve_args": sides["B"], **b}, "repeats": args.ab_repeats,
        "b_over_a": {k: b[k] / a[k] if a[k] else None for k in a}}
    print(f"[pipeline {time.strftime('%H:%M:%S')}] {stages} stages, B ({sides['B']}) over A ({sides['A'] or 'as given'}), "
          f"medians of {args.ab_repeats}: " + ", ".join(f"{k} {v:.3f}x" for k, v in
                                                        result["ab"][str(stages)]["b_over_a"].items() if v), flush=True)
    save(True)


def run_deployment(args: argparse.Namespace, model: Path, stages: int, hosts: int, base: dict[str, float],
                   result: dict[str, Any], save: Callable[[bool], None], serve_args: str | None = None,
                   tag: str = "") -> None:
    """One deployment of `stages` stages on `hosts` (simulated) hosts: the overhead run, then the rate sweep;
    its run record is appended to result["runs"] (saved after each phase). serve_args: instead of --serve-args."""
    where = f"{stages} stages on {hosts} host{'s' if hosts > 1 else ''}" + (f" ({tag})" if tag else "")
    stem = "deployment" if hosts == 1 else f"deployment-{hosts}hosts"
    log_name = f"{stem}-{tag}.log" if tag else f"{stem}.log"
    if serve_args is None:
        serve_args = getattr(args, "serve_args", "") or ""
    extra = shlex.split(serve_args)
    with deployment(args, model, stages, *extra, hosts=hosts, log_name=log_name) as (dep, save_log):
        size = asyncio.run(_status(dep.address))["microbatch_size"]  # auto: the deployment's own choice
        print(f"[pipeline {time.strftime('%H:%M:%S')}] {where}: deployment ready, microbatch size {size}"
              + ("" if size == base.get("batch", size) else f" (the baseline ran at {base['batch']})"), flush=True)
        ov = asyncio.run(overhead(dep.address, stages, size, args.context, args.vocab, args.decode_tokens, args.out))
        ov["microbatch_size"] = size
        step = statistics.mean(ov["stage_decode_step_s"].values())
        ov["stage_step_over_runtime"] = step / base["median_s"]
        ov["tpot_over_ideal"] = ov["tpot_median_s"] / (stages * base["median_s"])
        print(f"[pipeline {time.strftime('%H:%M:%S')}] {where}: stage decode step {step * 1e3:.2f} ms "
              f"({ov['stage_step_over_runtime']:.2f}x runtime), TPOT {ov['tpot_median_s'] * 1e3:.1f} ms "
              f"({ov['tpot_over_ideal']:.2f}x of {stages} x runtime step)", flush=True)
        run_rec: dict[str, Any] = {"stages": stages, "hosts": hosts, "baseline_step": base, "overhead": ov,
                                   "rates": []}
        result["runs"].append(run_rec)
        save(True)

        def on_rate(done: list[dict[str, Any]], rec: dict[str, Any] = run_rec) -> None:
            rec["rates"] = list(done)
            save(True)

        rates = [float(r) for r in args.rates.split(",") if r and r != "none"]  # "none": the overhead run alone
        run_rec["rates"] = asyncio.run(sweep(dep.address, rates, args, on_rate, save_log)) if rates else []
