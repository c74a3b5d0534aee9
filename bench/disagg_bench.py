"""`dejavu-bench disagg`: prompt-token disaggregation against the colocated pipeline on the same devices (issue 19).

For one model shape, N devices (--devices: GPUs, or stage processes on CPU) and the paper's workload (Poisson
arrivals, 1,000-token prompts, chat-like output lengths), in one run, one deployment after the other:
- colocated: `dejavu-serve --stages N`;
- disaggregated: `--prompt-stages DP --token-stages DT` for every DP + DT = N (or --splits), each split the
  planner's memory model says fits at --microbatch-size (the others are recorded as skipped, with why);
- the planner's pick: `dejavu-plan`'s recommendation for N devices (recovery/plan_cli.build_plan, in this process:
  a profile of a few seconds on the device, or the profile of a `--plan` JSON); where it recommends colocated, its
  best split. Marked in the JSON, and measured even when --splits leaves it out.
Each deployment: a decode-only phase (pipeline_bench.overhead: every token slot busy; its TPOT calibrates the
simulator), then each rate: tokens/s, TTFT, TPOT, normalized latency p50/p95, each stage's idle fraction with its
pipeline (prompt / token / colocated), the KV bytes the prompt stages streamed (against prompt tokens x layers x
KV bytes per token and layer: the accounting), and receive_waits (prompts that waited for a token slot).
Beside each rate, the simulator's prediction (recovery/simulator.py, the very requests sent): `uncalibrated` (the
profile alone) and `calibrated` (plus a per-stage step overhead from the deployment's decode-only phase, as
`dejavu-bench plan` does), each figure with simulated / measured and `within_15pct` (tokens/s and p50).
The summary (bench/disagg_summary.py): split / colocated tokens/s per rate and at equal normalized latency, the
best split measured, and whether the planner's pick is within 10% of it.
Writes <out>/disagg_bench.json (card, date, command, every figure; saved after every rate) and
<out>/disagg_bench.png, and each deployment's log (--out: default ./dejavu-bench-results/ in the current
directory); `--quick` runs the tiny model on CPU. Temporary files are removed at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import disagg_summary
from bench.pipeline_bench import (
    DeploymentStartError,
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
from bench.plan_bench import side_by_side, step_overhead
from bus.loadgen import OUT_DEFAULT, PAPER_OUTPUT, PAPER_PROMPT, RESULTS_DIR, parse_length
from recovery.planner import Lengths, Memory, ModelFacts, PlanError
from recovery.simulator import LayerTimes, SimConfig, loadgen_workload, simulate

TAG = "disagg"
# --quick: the tiny model on CPU, 2 stage processes; ~1 minute on 2 cores. The decode-only phase's 400 tokens
# last past two heartbeats (0.25 s) even on one fast token stage (~1 ms a step), so its per-stage step is measured
# too (pipeline_bench.overhead refuses a decode that ended before its baseline report).
QUICK: dict[str, Any] = {
    "shape": "tiny", "device": "cpu", "dtype": "float32", "devices": 2, "context": 16, "rates": "4,16,64",
    "num_requests": 16, "prompt_len": "32", "output_len": "4:16", "max_seq_len": 448, "microbatch_size": 2,
    "decode_tokens": 400,
}


def log(text: str) -> None:
    print(f"[{TAG} {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------- settings


def splits_arg(text: str, devices: int) -> list[tuple[int, int]]:
    """`all` (every DP/DT with DP + DT = devices) or `DP/DT,...`: [(DP, DT)]."""
    if text == "all":
        return [(dp, devices - dp) for dp in range(1, devices)]
    out = []
    for part in text.split(","):
        dp, _, dt = part.partition("/")
        if not (dp.isdigit() and dt.isdigit() and int(dp) >= 1 and int(dt) >= 1 and int(dp) + int(dt) == devices):
            raise ValueError(f"--splits {text}: {part!r} is not DP/DT with DP, DT >= 1 and DP + DT = {devices}")
        out.append((int(dp), int(dt)))
    return out


def setting(dp: int, dt: int, devices: int) -> dict[str, Any]:
    """A deployment to measure: colocated (dp = dt = 0) or a split."""
    if not dp:
        return {"name": "colocated", "mode": "colocated", "stages": devices, "prompt_stages": 0, "token_stages": 0}
    return {"name": f"{dp}/{dt}", "mode": "disaggregated", "stages": dp + dt, "prompt_stages": dp, "token_stages": dt}


def fits(s: dict[str, Any], plan: dict[str, Any], batch: int, max_seq_len: int) -> str:
    """Why the setting does not fit at microbatch `batch` ('' if it does): on its fullest stage, the planner's
    memory model (recovery/planner.Memory), and the pools dejavu-serve actually reserves (recovery/specs.stage_plan:
    --max-seq-len positions per slot; a prompt stage holds DP + 1 prompt microbatches), each with the weights and a
    prompt pass's activations, within the planner's budget (its safety share of the device, less embedding/head)."""
    from recovery.specs import DeploymentConfig

    w, m = plan["workload"], plan["memory"]
    facts = ModelFacts.from_json(plan["model"])
    mem = Memory(facts, Lengths(w["prompt_mean"], w["output_mean"], w["prompt_max"], w["output_max"]),
                 m["device_bytes"], m["safety"])
    model = ([mem.colocated(s["stages"], batch)] if s["mode"] == "colocated" else
             [mem.prompt_stage(s["prompt_stages"], batch),
              mem.token_stage(s["token_stages"], batch, s["prompt_stages"] + 1)])
    cfg = DeploymentConfig("model", num_stages=s["stages"], microbatch_size=batch, max_seq_len=max_seq_len,
                           prompt_stages=s["prompt_stages"], token_stages=s["token_stages"], dtype=facts.dtype,
                           head_layers=facts.head_layers)  # split as dejavu-serve will (--layer-split balanced)
    serving = [(b - a) * (facts.layer_bytes + p.num_slots * max_seq_len * facts.kv_bytes_per_token_layer)
               + mem.activations(batch * w["prompt_max"]) for p in cfg.stage_plan(facts.layers) for a, b in [p.layers]]
    if max(model + serving) <= mem.budget:
        return ""
    return (f"a stage needs {max(model) / 2**30:.1f} GiB by the planner's memory model and {max(serving) / 2**30:.1f} "
            f"GiB with dejavu-serve's pools at microbatch {batch}, --max-seq-len {max_seq_len}; the budget is "
            f"{mem.budget / 2**30:.1f} GiB")


# ---------------------------------------------------------------- the planner


def planner(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    """dejavu-plan for --devices devices at this run's workload and microbatch size, in this process; its pick is
    the recommended split, or its best split where it recommends colocated."""
    from recovery import plan_cli

    argv = ["--model", str(model), "--gpus", str(args.devices), "--device", args.device, "--dtype", args.dtype,
            "--prompt-len", args.prompt_len, "--output-len", args.output_len,
            "--max-microbatch", str(args.microbatch_size), "--profile-batch", str(args.microbatch_size),
            "--stream-slowdown", str(args.stream_slowdown), "--link-gbps", str(args.link_gbps)]
    if args.device == "cpu":  # a CPU stage of dejavu-serve gets cores / stages torch threads
        argv += ["--threads", str(max(1, (os.cpu_count() or 1) // args.devices))]
    if args.plan is not None:
        argv += ["--profile", str(args.plan)]
    t0 = time.perf_counter()
    out = plan_cli.build_plan(plan_cli.parser().parse_args(argv), argv)
    p = out["plan"]
    if p["mode"] == "disaggregated":
        pick = f"{p['prompt_stages']}/{p['token_stages']}"
    else:
        ok = [o for o in out["options"] if o["mode"] == "disaggregated" and "infeasible" not in o]
        best = max(ok, key=lambda o: o["simulated_tokens_per_s"] or 0.0, default=None)
        pick = f"{best['prompt_stages']}/{best['token_stages']}" if best else None
    log(f"planner ({time.perf_counter() - t0:.1f} s, profile {'from ' + str(args.plan) if args.plan else 'measured'}): "
        f"recommends {p['mode']}" + (f", split {pick}" if pick else "") + f"; {plan_cli.plan_line(out)}")
    return {"recommends": p["mode"], "pick": pick, "dejavu_plan": out}


# ---------------------------------------------------------------- one deployment


def counters(layers: int, kv_per_token_layer: int) -> Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], None]:
    """sweep's annotate: each stage's pipeline, and the rate's KV streamed and receive waits (status deltas)."""

    def annotate(before: dict[str, Any], after: dict[str, Any], summary: dict[str, Any]) -> None:
        stages = {str(p["index"]): p for p in after["processes"] if p["role"] == "stage"}
        old = {str(p["index"]): p for p in before["processes"] if p["role"] == "stage"}
        summary["stage_pipeline"] = {i: p.get("pipeline", "colocated") for i, p in stages.items()}
        prompts = sum(r["prompt_len"] for r in summary["per_request"] if r["error"] is None)
        disaggregated = before.get("prompt_stages", 0) > 0
        summary["kv"] = {
            "streamed_bytes": after["kv_streamed_bytes"] - before["kv_streamed_bytes"],
            "per_prompt_stage_bytes": {i: p["kv_bytes"] - old[i].get("kv_bytes", 0) for i, p in stages.items()
                                       if p.get("kv_bytes") is not None},
            "expected_bytes": prompts * layers * kv_per_token_layer if disaggregated else 0,
        }
        summary["receive_waits"] = after["receive_waits"] - before["receive_waits"]
        summary["receive_waiting_at_end"] = after["receive_waiting"]

    return annotate


def run_setting(args: argparse.Namespace, model: Path, s: dict[str, Any], facts: ModelFacts,
                save: Callable[[bool], None]) -> None:
    """One deployment: the decode-only phase, then the rate sweep, into s["overhead"] and s["rates"]."""
    serve = [] if s["mode"] == "colocated" else ["--prompt-stages", str(s["prompt_stages"]),
                                                 "--token-stages", str(s["token_stages"])]
    slug = "colocated" if s["mode"] == "colocated" else f"{s['prompt_stages']}p{s['token_stages']}t"
    depth = s["token_stages"] or s["stages"]  # the pipeline that decodes
    with deployment(args, model, s["stages"], *serve, log_name=f"deployment-{slug}.log", tag=TAG) as (dep, save_log):
        log(f"{s['name']}: deployment ready")
        ov = asyncio.run(overhead(dep.address, depth, args.microbatch_size, args.context, args.vocab,
                                  args.decode_tokens, args.out))
        decoding = [v for i, v in ov["stage_decode_step_s"].items() if int(i) >= s["prompt_stages"]]
        ov["token_stage_decode_step_s"] = statistics.mean(decoding)
        s["overhead"] = ov
        log(f"{s['name']}: decode-only TPOT {ov['tpot_median_s'] * 1e3:.2f} ms over {depth} decoding stage(s), "
            f"step {ov['token_stage_decode_step_s'] * 1e3:.2f} ms")
        save(True)

        def on_rate(done: list[dict[str, Any]]) -> None:
            s["rates"] = list(done)
            save(True)

        s["rates"] = asyncio.run(sweep(dep.address, rates_of(args), args, on_rate, save_log,
                                       counters(facts.layers, facts.kv_bytes_per_token_layer), tag=TAG))


def rates_of(args: argparse.Namespace) -> list[float]:
    return [float(r) for r in args.rates.split(",")]


# ---------------------------------------------------------------- the simulator beside it


def simulated(s: dict[str, Any], args: argparse.Namespace, facts: ModelFacts, times: LayerTimes) -> dict[str, Any]:
    """The simulator's prediction of every measured rate of setting `s`, uncalibrated and calibrated."""
    B, L = args.microbatch_size, facts.layers

    def config(t: LayerTimes) -> SimConfig:
        if s["mode"] == "colocated":
            return SimConfig("colocated", L, t, B, stages=s["stages"], head_layers=facts.head_layers)
        return SimConfig("disaggregated", L, t, B, prompt_stages=s["prompt_stages"], token_stages=s["token_stages"],
                         stream_slowdown=args.stream_slowdown, kv_bytes_per_token_layer=facts.kv_bytes_per_token_layer,
                         link_gbps=args.link_gbps, head_layers=facts.head_layers)

    extra, compute = step_overhead(times, L, s["token_stages"] or s["stages"], B, s["overhead"]["tpot_median_s"],
                                   facts.head_layers)
    calibrated = LayerTimes(**{**vars(times), "step_overhead_s": extra})
    prompt, output = parse_length(args.prompt_len, PAPER_PROMPT), parse_length(args.output_len, PAPER_OUTPUT)
    out: dict[str, Any] = {"calibration": {"measured_tpot_s": s["overhead"]["tpot_median_s"],
                                           "profiled_compute_per_decoding_stage_s": compute, "step_overhead_s": extra},
                           "rates": []}
    for r in s["rates"]:
        reqs = loadgen_workload(r["requests"], r["rate"], prompt, output, args.vocab, 0)
        row: dict[str, Any] = {"rate": r["rate"]}
        for name, t in (("uncalibrated", times), ("calibrated", calibrated)):
            sim = simulate(config(t), reqs)
            row[name] = side_by_side(r, sim)
            row[name]["idle_fraction_per_stage_simulated"] = sim["idle_fraction"]["per_stage"]
            if "receive_slots" in sim:
                row[name]["receive_slots_simulated"] = sim["receive_slots"]
        out["rates"].append(row)
    return out


# ---------------------------------------------------------------- the run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-bench disagg", description=__doc__.split("\n\n")[0])
    add_deployment_args(p, shape="opt-13b")
    p.add_argument("--devices", type=int, default=2,
                   help="devices of every setting: GPUs (stage i on GPU i), or stage processes on cpu")
    p.add_argument("--splits", default="all", help="DP/DT,... to measure (default all: every DP + DT = --devices)")
    p.add_argument("--plan", type=Path, default=None,
                   help="a dejavu-plan JSON of this shape on this card: the planner reuses its profile instead of "
                        "profiling here (default: profile now, in this process, as dejavu-plan does: seconds)")
    p.add_argument("--latency-bound", type=float, default=None, metavar="S",
                   help="seconds per token at which throughputs are compared (default: "
                        f"{disagg_summary.BOUND_FACTOR:g}x the highest p50 normalized latency of any setting at the "
                        "lowest rate)")
    p.add_argument("--stream-slowdown", type=float, default=1.02,
                   help="m for the planner and the simulator: a prompt pass streaming its KV over one that does not")
    p.add_argument("--link-gbps", type=float, default=0.0,
                   help="prompt stage -> token side Gbit/s for the planner and the simulator (0: transfers take no "
                        "time: one host, layer by layer under the pass)")
    p.add_argument("--no-fit-check", action="store_true",
                   help="run every split, also those the planner's memory model says do not fit")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for disagg_bench.json, disagg_bench.png and deployment logs (default {OUT_DEFAULT})")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU, 2 stage processes, few short requests")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.devices < 2:
        p.error("--devices must be 2 or more (a prompt and a token stage)")
    if not args.microbatch_size:
        p.error("--microbatch-size auto: this benchmark compares splits at one given size; give a number")
    try:
        args.split_list = splits_arg(args.splits, args.devices)
        parse_length(args.prompt_len, PAPER_PROMPT), parse_length(args.output_len, PAPER_OUTPUT)
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(str(e))
    args.vocab = vocab_size(args.shape)
    unwind_on_sigterm()
    with scratch("dejavu-disagg-") as root:
        return _run(args, argv, root)


def _run(args: argparse.Namespace, argv: list[str] | None, root: Path) -> int:
    from recovery.profiler import layer_times_from

    model = write_model(args.shape, root)
    result = header(TAG, "disagg (issue 19): colocated vs prompt/token splits on the same devices; paper workload; "
                    "the simulator beside each", args, argv)
    result["devices"] = args.devices

    def save(partial: bool) -> None:  # after every rate too, so a run cut short still leaves its figures
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "disagg_bench.json").write_text(json.dumps({**result, "partial": partial}, indent=1) + "\n")

    try:
        plan = result["planner"] = planner(args, model)
    except PlanError as e:  # nothing fits even at microbatch 1, or lengths past the model's positions
        raise SystemExit(f"dejavu-bench disagg: the planner: {e}") from None
    facts = ModelFacts.from_json(plan["dejavu_plan"]["model"])
    times = layer_times_from(plan["dejavu_plan"]["profile"])
    pairs = [(0, 0), *args.split_list]
    pick = plan["pick"]
    if pick is not None and pick not in [f"{dp}/{dt}" for dp, dt in pairs]:
        pairs.append(tuple(int(x) for x in pick.split("/")))  # type: ignore[arg-type]
    result["runs"] = runs = [{**setting(dp, dt, args.devices), "planner_pick": f"{dp}/{dt}" == pick, "rates": []}
                             for dp, dt in pairs]
    for s in runs:
        why = "" if args.no_fit_check else fits(s, plan["dejavu_plan"], args.microbatch_size, args.max_seq_len)
        if why:
            s["skipped"] = why
            log(f"{s['name']}: skipped: {why}")
            continue
        try:
            run_setting(args, model, s, facts, save)
        except DeploymentStartError as e:  # the other settings still run
            s["failed"] = str(e)[-3000:]
            log(f"{s['name']}: the deployment did not start: {str(e).splitlines()[0]}")
            save(True)
            continue
        s["simulated"] = simulated(s, args, facts, times)
        for row in s["simulated"]["rates"]:
            c = row["calibrated"]
            log(f"{s['name']} rate {row['rate']:g}: tokens/s measured {c['tokens_per_s']['measured']:.4g}, simulated "
                f"{c['tokens_per_s']['simulated']:.4g} calibrated / {row['uncalibrated']['tokens_per_s']['simulated']:.4g}"
                f" uncalibrated; within 15%: {c['within_15pct']} / {row['uncalibrated']['within_15pct']}")
        save(True)
    measured = [s for s in runs if s.get("simulated")]
    result["summary"] = disagg_summary.summarize(measured, pick, args.latency_bound)
    result["summary"]["simulator_all_within_15pct"] = {
        k: all(row[k]["within_15pct"] for s in measured for row in s["simulated"]["rates"])
        for k in ("calibrated", "uncalibrated")}
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    save(False)
    plot(result, args.out / "disagg_bench.png")
    for line in summary_lines(result["summary"]):
        log(line)
    log(f"wrote {args.out / 'disagg_bench.json'}")
    return 0


def summary_lines(summary: dict[str, Any]) -> list[str]:
    out = []
    for row in summary["by_rate"]:
        out.append(f"rate {row['rate']:g}: split / colocated tokens/s " + ", ".join(
            f"{k} {v['tokens_per_s_ratio']:.2f}x" for k, v in row["splits"].items()
            if v["tokens_per_s_ratio"] is not None))
    eq = summary["equal_latency"]
    if eq.get("bound_s") is not None:
        out.append(f"at p50 normalized latency {eq['bound_s'] * 1e3:.3g} ms/token: " + ", ".join(
            f"{k} {v['tokens_per_s']:.4g} tok/s" + (" (lower bound)" if v["lower_bound"] else "")
            + (f" = {v['tokens_per_s_ratio_to_colocated']:.2f}x" if v.get("tokens_per_s_ratio_to_colocated") else "")
            for k, v in eq["settings"].items() if v["tokens_per_s"] is not None))
    if "best_split" in summary:
        pl = summary["planner"]
        out.append(f"best split {summary['best_split']['name']} (by {summary['best_split']['by']}); planner's pick "
                   f"{pl['pick']}: within 10%: {pl['within_10pct']}; target 1.8x met: {summary['target']['met']}")
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Tokens/s and normalized latency against rate per setting (measured, and the calibrated simulator's), and
    each stage's idle fraction at the highest rate, coloured by its pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [s for s in result["runs"] if s.get("rates")]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.6), width_ratios=[1, 1, 1.1])
    for k, s in enumerate(runs):
        rates = [r["rate"] for r in s["rates"]]
        name = s["name"] + (" (planner)" if s.get("planner_pick") else "")
        a.plot(rates, [r["tokens_per_s"] for r in s["rates"]], "o-", color=f"C{k}", label=f"{name}")
        sims = s.get("simulated", {}).get("rates", [])
        if sims:
            a.plot([r["rate"] for r in sims], [r["calibrated"]["tokens_per_s"]["simulated"] for r in sims], "x--",
                   color=f"C{k}", label=f"{name} simulated")
        b.plot(rates, [r["normalized_latency_s"]["p50"] for r in s["rates"]], "o-", color=f"C{k}", label=f"{name} p50")
        b.plot(rates, [r["normalized_latency_s"]["p95"] for r in s["rates"]], "x:", color=f"C{k}", label=f"{name} p95")
    bound = result.get("summary", {}).get("equal_latency", {}).get("bound_s")
    if bound:
        b.axhline(bound, color="grey", lw=0.8, ls="--", label="bound (equal latency)")
    colours = {"prompt": "C1", "token": "C2", "colocated": "C0"}
    x, ticks = 0.0, []
    for s in runs:
        top = max(s["rates"], key=lambda r: r["rate"])
        for i, f in sorted(top["idle_fraction"].items(), key=lambda kv: int(kv[0])):
            pipe = top.get("stage_pipeline", {}).get(i, "colocated")
            c.bar(x, f, color=colours.get(pipe, "C7"), label=pipe)
            local = int(i) - (s["prompt_stages"] if pipe == "token" else 0)  # its index in its pipeline
            c.text(x, f + 0.01, f"{pipe[0]}{local}", ha="center", fontsize=7)
            x += 1
        ticks.append((x - len(top["idle_fraction"]) / 2 - 0.5, f"{s['name']}\n@{top['rate']:g} req/s"))
        x += 1
    c.set_xticks([t for t, _ in ticks], [n for _, n in ticks], fontsize=8)
    handles = {h.get_label(): h for h in c.containers}
    c.legend(handles.values(), handles.keys(), fontsize=7)
    c.set_ylim(0, 1)
    c.set_ylabel("idle fraction per stage (highest rate)")
    a.set_ylabel("output tokens/s")
    b.set_ylabel("normalized latency (s/token)")
    for ax in (a, b):
        ax.set_xlabel("request rate (req/s)")
        ax.legend(fontsize=7)
    load = result.get("machine", {}).get("load_average_at_start", [None])[0]
    fig.suptitle(f"colocated vs prompt/token splits, {result['shape']} on {result['devices']} "
                 f"{'GPUs' if result['card'] != 'cpu' else 'CPU stage processes'} ({result['card']}"
                 + (f", load {load:.1f})" if load is not None and result["card"] == "cpu" else ")"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
