"""`dejavu-bench swap`: microbatch swapping (issue 20, the paper's section 4.2) against keeping every microbatch
resident, under one device-memory budget.

One deployment per setting (`--settings MODE[:M],...`), each `dejavu-serve --swap MODE --microbatches M` at
`--microbatch-size auto` under the same `--gpu-memory-fraction` and `--max-seq-len`, one after the other:
- off: the device holds all M microbatches' KV, so each is small;
- on: it holds 2 (the one computing and the next, prefetched), the rest wait in the host streamer's swap pool, so
  each microbatch is larger - the paper's gain - and every step swaps one in and writes its new rows back;
- auto: dejavu-serve decides (stages/swap_policy.py: on only where a swap-in is predicted under a decode step);
  its decision and why are recorded.
On one GPU, a one-stage deployment with M microbatches steps them round-robin, as each stage of an M-deep pipeline
does; a stage's weights, its KV per microbatch and its step all scale with its layers, so a swap-in over a step -
what decides whether swapping pays - is the same as on a stage of that pipeline. Compare tokens/s (per GPU): the
TPOT of the one-stage run is M steps, a pipeline's M stage steps. Every setting then runs without lookahead, as
such a stage does (`--lookahead off`: it applies to one-stage pipelines only, and not with swapping).
Per setting: the sizing (microbatch size, resident slots, each stage's swap decision); decode with every slot busy
(pipeline_bench.overhead: M x size requests of --context tokens, --decode-tokens each: tokens/s, TPOT, the stage's
step, and the swap traffic and stalls meanwhile); then the paper's workload at each rate (tokens/s, normalized
latency, swap traffic and stalls). The summary sets every setting against the first `off`: the all-busy tokens/s
and each rate's tokens/s and p50 normalized latency; the best `on` (target: 1.8x where compute-bound) and whether
`auto` is never below off (3% for noise).
Writes <out>/swap_bench.json (card, date, command, every figure; saved after every phase) and <out>/swap_bench.png,
with each deployment's log (--out: default ./dejavu-bench-results/). `--quick`: the tiny model on CPU, whose memory
is set (DEJAVU_DEVICE_MEMORY) so that off holds 2 slots per microbatch; CPU swaps are shared-memory copies, so its
figures check the plumbing, not the paper's gain. Temporary files are removed at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.pipeline_bench import (
    DeploymentStartError,
    _status,
    add_deployment_args,
    deployment,
    header,
    overhead,
    scratch,
    sweep,
    unwind_on_sigterm,
    vocab_size,
    write_model,
)
from bus.loadgen import OUT_DEFAULT, RESULTS_DIR
from stages.swap_policy import SWAP_MODES, check_swap_on

TAG = "swap"
NOISE = 0.03  # `auto` counts as below off only past this: one run's tokens/s moves by ~2% between runs
TARGET = 1.8  # the paper's "up to 1.8x" by doubling the microbatch size
COUNTERS = ("bytes_in", "bytes_out", "swap_ins", "stalls", "stall_s", "failures")
# --quick: the tiny model on CPU, one stage, 4 microbatches; ~40 s on 2 cores. The decode phase's 240 tokens outlast
# two heartbeats (0.25 s) with room, so the per-stage step is measured (pipeline_bench.overhead refuses it otherwise)
QUICK: dict[str, Any] = {
    "shape": "tiny", "device": "cpu", "dtype": "float32", "stages": 1, "microbatches": 4, "settings": "off,on",
    "context": 16, "rates": "8", "num_requests": 8, "prompt_len": "16", "output_len": "4:12", "max_seq_len": 288,
    "microbatch_size": 0, "decode_tokens": 240, "off_slots": 2,
}


def log(text: str) -> None:
    print(f"[{TAG} {time.strftime('%H:%M:%S')}] {text}", flush=True)


def settings_arg(text: str, microbatches: int) -> list[tuple[str, int]]:
    """`MODE[:M],...` -> [(mode, microbatches)]; M defaults to --microbatches. ValueError says what is wrong."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        mode, _, m = item.partition(":")
        if mode not in SWAP_MODES:
            raise ValueError(f"--settings {item!r}: a mode is one of {', '.join(SWAP_MODES)}, then :M optionally")
        try:
            mbs = int(m) if m else microbatches
        except ValueError:
            raise ValueError(f"--settings {item!r}: M must be a number of microbatches") from None
        if mbs < 1:
            raise ValueError(f"--settings {item!r}: give 1 microbatch or more")
        if mode == "on":
            check_swap_on(mbs, streamer=True)
        out.append((mode, mbs))
    if not out:
        raise ValueError("--settings: give at least one setting, e.g. off,on,auto")
    return out


def starved_memory(model: Path, args: argparse.Namespace, mode: str, microbatches: int, per_microbatch: int) -> int:
    """Device bytes (DEJAVU_DEVICE_MEMORY, every device) at which `--swap off` with `microbatches` microbatches
    holds exactly `per_microbatch` slots each on the heaviest stage: a budget tight enough that swapping's 2
    resident frames make each microbatch larger. The sizing's own model (recovery/sizing.py)."""
    from recovery.preflight import check_model
    from recovery.sizing import AUTO, stage_models, with_head
    from recovery.specs import DeploymentConfig

    spec = check_model(model)
    cfg = DeploymentConfig(str(model), num_stages=args.stages, device=args.device, dtype=args.dtype,
                           microbatch_size=AUTO, max_seq_len=args.max_seq_len, num_microbatches=microbatches,
                           swap=mode, gpu_memory_fraction=args.gpu_memory_fraction)
    shared = 1 if args.device != "cpu" else args.stages  # on CPU the stages share the host's memory
    # (split as the deployment will: resolve weighs the LM head the same way)
    need = max(m.need(per_microbatch) for m in stage_models(with_head(cfg, spec), spec)) * shared
    return math.ceil(need / args.gpu_memory_fraction) + 1


@contextlib.contextmanager
def device_memory(value: str | None) -> Iterator[None]:
    """DEJAVU_DEVICE_MEMORY set for the deployments started meanwhile (dejavu-serve sizes by it), then restored."""
    saved = os.environ.get("DEJAVU_DEVICE_MEMORY")
    if value:
        os.environ["DEJAVU_DEVICE_MEMORY"] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("DEJAVU_DEVICE_MEMORY", None)
        else:
            os.environ["DEJAVU_DEVICE_MEMORY"] = saved


def swap_totals(status: dict[str, Any]) -> dict[str, float]:
    """The swap counters of every stage, summed (status() `processes[].swap`)."""
    tot = dict.fromkeys(COUNTERS, 0.0)
    for p in status["processes"]:
        if p["role"] == "stage" and p.get("swap"):
            for k in COUNTERS:
                tot[k] += p["swap"].get(k, 0)
    return tot


def swap_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    a, b = swap_totals(after), swap_totals(before)
    return {k: round(a[k] - b[k], 6) for k in COUNTERS}


def annotate(before: dict[str, Any], after: dict[str, Any], summary: dict[str, Any]) -> None:
    """sweep's annotate: the swap traffic and stalls over the rate."""
    summary["swap"] = swap_delta(before, after)


def sizing_of(status: dict[str, Any]) -> dict[str, Any]:
    stages = [p for p in status["processes"] if p["role"] == "stage"]
    return {
        "microbatch_size": status["microbatch_size"], "slots": status["slots"], "sizing": status.get("sizing", ""),
        "memory": status.get("memory", []),
        "swap": {str(p["index"]): {k: p["swap"].get(k) for k in ("mode", "on", "reason", "frames")}
                 for p in stages if p.get("swap")},
    }


def run_setting(args: argparse.Namespace, model: Path, s: dict[str, Any], save: Callable[[bool], None]) -> None:
    serve = ["--swap", s["mode"], "--microbatches", str(s["microbatches"]),
             "--gpu-memory-fraction", str(args.gpu_memory_fraction), *proxy_args(args), *args.serve_list]
    s["serve_args"] = serve
    slug = f"{s['mode']}-{s['microbatches']}mb"
    with deployment(args, model, args.stages, *serve, log_name=f"deployment-{slug}.log", tag=TAG) as (dep, save_log):
        before = asyncio.run(_status(dep.address))
        s["microbatch_size"] = before["microbatch_size"]
        log(f"{s['name']}: ready, microbatch size {s['microbatch_size']} x {s['microbatches']} microbatches")
        ov = asyncio.run(overhead(dep.address, s["microbatches"], s["microbatch_size"], args.context, args.vocab,
                                  args.decode_tokens, args.out))
        after = asyncio.run(_status(dep.address))  # its stages' stats are fresh (overhead waited for them)
        s.update(sizing_of(after))  # each stage's swap decision arrives with its first stats
        s["swapping"] = any(v["on"] for v in s["swap"].values())
        log(f"{s['name']}: swapping {'on' if s['swapping'] else 'off'}: " + ("; ".join(
            f"stage {i}: {v['reason']}" for i, v in s["swap"].items()) or "no stage reports swapping"))
        ov["swap"] = swap_delta(before, after)
        steps = sum(p.get("steps", 0) for p in after["processes"] if p["role"] == "stage") - sum(
            p.get("steps", 0) for p in before["processes"] if p["role"] == "stage")
        ov["swap"]["per_step_bytes_in"] = ov["swap"]["bytes_in"] / steps if steps else 0.0
        s["overhead"] = ov
        tps = ov["decode_tokens_per_s"]
        log(f"{s['name']}: every slot busy: {tps or float('nan'):.1f} tokens/s, TPOT {ov['tpot_median_s'] * 1e3:.2f} "
            f"ms; swapped in {ov['swap']['bytes_in'] / 2**20:.1f} MiB, {int(ov['swap']['stalls'])} stalls "
            f"({ov['swap']['stall_s']:.3f} s)")
        save(True)

        def on_rate(done: list[dict[str, Any]]) -> None:
            s["rates"] = list(done)
            save(True)

        rates = [float(r) for r in args.rates.split(",") if r and r != "none"]
        s["rates"] = asyncio.run(sweep(dep.address, rates, args, on_rate, save_log, annotate, tag=TAG)) if rates else []


def proxy_args(args: argparse.Namespace) -> list[str]:
    """One stage standing for a stage of an M-deep pipeline: no lookahead for any setting. A pipeline of 2+ stages
    has none (its first stage does not sample), and a swapping stage runs without it; a one-stage `off` with it would
    hide the controller's round trip that every other setting pays."""
    return ["--lookahead", "off"] if args.stages == 1 else []


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every measured setting against the first measured `off`: all-busy tokens/s, and per rate tokens/s and p50
    normalized latency (lower is better); the best `on`, and `auto` never below off."""
    measured = [s for s in runs if s.get("overhead")]
    base = next((s for s in measured if s["mode"] == "off"), None)
    out: dict[str, Any] = {"baseline": base["name"] if base else None, "settings": {}}
    if base is None:
        return out
    base_rates = {r["rate"]: r for r in base.get("rates", [])}
    for s in measured:
        rows = []
        for r in s.get("rates", []):
            b = base_rates.get(r["rate"])
            if b is None:
                continue
            rows.append({"rate": r["rate"], "tokens_per_s_ratio": ratio(r["tokens_per_s"], b["tokens_per_s"]),
                         "normalized_latency_p50_ratio": ratio(r["normalized_latency_s"]["p50"],
                                                               b["normalized_latency_s"]["p50"])})
        out["settings"][s["name"]] = {
            "mode": s["mode"], "swapping": s["swapping"], "microbatch_size": s["microbatch_size"],
            "all_busy_tokens_per_s_ratio": ratio(s["overhead"]["decode_tokens_per_s"],
                                                 base["overhead"]["decode_tokens_per_s"]),
            "rates": rows,
        }
    ons = [v["all_busy_tokens_per_s_ratio"] for v in out["settings"].values()
           if v["swapping"] and v["all_busy_tokens_per_s_ratio"] is not None]
    out["best_on_ratio"] = max(ons) if ons else None
    out["target"] = {"ratio": TARGET, "met": bool(ons) and max(ons) >= TARGET}
    autos = [v for v in out["settings"].values() if v["mode"] == "auto"]
    if autos:
        figures = [x for v in autos for x in [v["all_busy_tokens_per_s_ratio"], *(r["tokens_per_s_ratio"]
                                                                                  for r in v["rates"])]
                   if x is not None]
        out["auto"] = {"swapping": [v["swapping"] for v in autos], "lowest_ratio": min(figures) if figures else None,
                       "never_below_off": all(x >= 1 - NOISE for x in figures), "noise": NOISE}
    return out


def summary_lines(summary: dict[str, Any]) -> list[str]:
    out = []
    for name, v in summary["settings"].items():
        r = v["all_busy_tokens_per_s_ratio"]
        out.append(f"{name}: microbatch size {v['microbatch_size']}, swapping {'on' if v['swapping'] else 'off'}; "
                   f"every slot busy {'n/a' if r is None else f'{r:.2f}x'} {summary['baseline']}'s tokens/s" + "".join(
                       f"; rate {x['rate']:g}: {x['tokens_per_s_ratio'] or float('nan'):.2f}x tokens/s, p50 "
                       f"{x['normalized_latency_p50_ratio'] or float('nan'):.2f}x" for x in v["rates"]))
    if summary.get("best_on_ratio") is not None:
        out.append(f"best swapping setting: {summary['best_on_ratio']:.2f}x (target {TARGET}x met: "
                   f"{summary['target']['met']})")
    if "auto" in summary:
        a = summary["auto"]
        out.append(f"auto swapped: {a['swapping']}; never below off (within {NOISE:.0%}): {a['never_below_off']}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-bench swap", description=__doc__.split("\n\n")[0])
    add_deployment_args(p, shape="opt-13b")
    p.set_defaults(microbatch_size=0, output_len="128:512")  # memory-sized; the long outputs
    p.add_argument("--stages", type=int, default=1, help="pipeline depth of every setting (stage i on GPU i)")
    p.add_argument("--microbatches", type=int, default=4, help="microbatches of a setting that names none")
    p.add_argument("--settings", default="off,on,auto",
                   help="MODE[:M],... (MODE: off, on, auto; M: microbatches, default --microbatches), one deployment "
                        "each, in this order; the first `off` is the baseline")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.9,
                   help="every setting's budget (dejavu-serve's flag): lower it to emulate a smaller device")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="DEJAVU_DEVICE_MEMORY for the deployments (each device's size, e.g. 24G) instead of measuring "
                        "it; on GPUs it also skips --swap auto's bandwidth probe (give --serve-args=\"--swap-bandwidth "
                        "GB/s --swap-step-ms MS\")")
    p.add_argument("--off-slots", type=int, default=0, metavar="N",
                   help="set the device memory so that `--swap off` at --microbatches holds N slots per microbatch "
                        "(the sizing's own model; instead of --device-memory)")
    p.add_argument("--serve-args", default="", help="more dejavu-serve options for every deployment, one shell-quoted "
                   "string")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for swap_bench.json, swap_bench.png and deployment logs (default {OUT_DEFAULT})")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU, off vs on, one short rate")
    return p


def main(argv: list[str] | None = None) -> int:
    import shlex

    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    try:
        args.setting_list = settings_arg(args.settings, args.microbatches)
    except ValueError as e:
        p.error(str(e))
    if args.stages < 1:
        p.error("--stages must be 1 or more")
    if args.off_slots and args.device_memory:
        p.error("give --off-slots or --device-memory, not both")
    args.serve_list = shlex.split(args.serve_args)
    args.vocab = vocab_size(args.shape)
    unwind_on_sigterm()
    with scratch("dejavu-swap-") as root:
        return _run(args, argv, root)


def _run(args: argparse.Namespace, argv: list[str] | None, root: Path) -> int:
    model = write_model(args.shape, root)
    if args.off_slots:
        args.device_memory = str(starved_memory(model, args, "off", args.microbatches, args.off_slots))
        log(f"device memory {int(args.device_memory) / 2**20:.1f} MiB: --swap off holds {args.off_slots} slot(s) per "
            f"microbatch at {args.microbatches} microbatches")
    result = header(TAG, "swap (issue 20): microbatch swapping on / off / auto under one memory budget; paper "
                    "workload", args, argv)
    result["device_memory"] = args.device_memory
    result["runs"] = runs = [{"name": f"{mode}, {m} mb", "mode": mode, "microbatches": m, "rates": []}
                             for mode, m in args.setting_list]

    def save(partial: bool) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "swap_bench.json").write_text(json.dumps({**result, "partial": partial}, indent=1) + "\n")

    with device_memory(args.device_memory):
        for s in runs:
            try:
                run_setting(args, model, s, save)
            except DeploymentStartError as e:  # a setting that does not fit: recorded, the others still run
                s["failed"] = str(e)[-3000:]
                log(f"{s['name']}: the deployment did not start: {str(e).splitlines()[0]}")
            save(True)
    result["summary"] = summarize(runs)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    save(False)
    plot(result, args.out / "swap_bench.png")
    for line in summary_lines(result["summary"]):
        log(line)
    log(f"wrote {args.out / 'swap_bench.json'}")
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    """All-busy tokens/s per setting (bars, with the microbatch size), tokens/s and p50 normalized latency against
    rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [s for s in result["runs"] if s.get("overhead")]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.4))
    for k, s in enumerate(runs):
        tps = s["overhead"]["decode_tokens_per_s"] or 0.0
        a.bar(k, tps, color=f"C{k}")
        a.text(k, tps, f"{s['microbatches']} x {s['microbatch_size']}\n{'swapping' if s['swapping'] else 'resident'}",
               ha="center", va="bottom", fontsize=7)
        rates = [r["rate"] for r in s["rates"]]
        b.plot(rates, [r["tokens_per_s"] for r in s["rates"]], "o-", color=f"C{k}", label=s["name"])
        c.plot(rates, [r["normalized_latency_s"]["p50"] for r in s["rates"]], "o-", color=f"C{k}", label=f"{s['name']} p50")
        c.plot(rates, [r["normalized_latency_s"]["p95"] for r in s["rates"]], "x:", color=f"C{k}")
    a.set_xticks(range(len(runs)), [s["name"] for s in runs], fontsize=8)
    a.set_ylabel("output tokens/s, every slot busy")
    b.set_ylabel("output tokens/s")
    c.set_ylabel("normalized latency (s/token; x: p95)")
    for ax in (b, c):
        ax.set_xlabel("request rate (req/s)")
        ax.legend(fontsize=7)
    fig.suptitle(f"microbatch swapping, {result['shape']}, {result['settings']['stages']} stage(s) "
                 f"({result['card']}, --gpu-memory-fraction {result['settings']['gpu_memory_fraction']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

