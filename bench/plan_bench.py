"""`dejavu-bench plan`: the simulator (recovery/simulator.py) against measured pipeline runs, side by side.

For each measured `dejavu-bench pipeline` result (its JSON: shape, stages, microbatch size, workload and, per
rate, throughput, TTFT, normalized latency and idle fraction) and a profile of the same shape on the same card
(a `dejavu-plan` JSON, or per-layer points measured as recovery/profiler.py measures them, keyed by shape), the
simulator replays the very requests the benchmark sent (bus.loadgen's draw for its seed and vocabulary, the same
Poisson arrivals) through the same deployment (S stages, S microbatches of B), twice:
- `uncalibrated`: the profile alone (compute only);
- `calibrated`: plus a per-stage step overhead taken from the measured run's own decode-only phase (its TPOT with
  every slot busy over S, minus the profile's compute per stage): the control plane and activation hand-off
  that an in-process profile cannot see. The workload phase (prompts, bubbles, queueing) is then predicted.
Every figure is set beside the measurement with the ratio simulated / measured; `within_15pct` marks tokens/s and
normalized latency p50 within 15% (the issue's target). Writes <out>/plan_bench.json and <out>/plan_bench.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import curve_bench
from bench.pipeline_bench import SHAPES, vocab_size, write_model
from bus.loadgen import OUT_DEFAULT, PAPER_OUTPUT, PAPER_PROMPT, RESULTS_DIR, parse_length
from recovery.planner import model_facts
from recovery.profiler import fit, layer_times_from
from recovery.simulator import LayerTimes, SimConfig, layer_split, loadgen_workload, simulate
from stages.models.spec import read_spec

TARGET = 0.15


def profile_times(profiles: list[dict[str, Any]], shape: str) -> tuple[LayerTimes, dict[str, Any]]:
    """LayerTimes for `shape`: from raw points keyed by shape, or from the dejavu-plan JSON whose model has the
    shape's layers and width (or a bare profile, when it is the only one given)."""
    want = SHAPES[shape]
    for profile in profiles:
        if shape in profile:
            p = profile[shape]
            return fit([tuple(x) for x in p["prompt"]], [tuple(x) for x in p["decode"]], p["head_s"]), p
        model = profile.get("model")
        if ("layer_times" in profile.get("profile", {}) and model is not None
                and (model["layers"], model["hidden"]) == (want["num_hidden_layers"], want["hidden_size"])):
            return layer_times_from(profile["profile"]), profile["profile"]
    if len(profiles) == 1 and "layer_times" in profiles[0]:
        return layer_times_from(profiles[0]), profiles[0]
    raise ValueError(f"no profile of shape {shape!r} among the --profile files")


def figures(r: dict[str, Any]) -> dict[str, float | None]:
    idle = r["idle_fraction"]
    return {"tokens_per_s": r["tokens_per_s"], "ttft_p50_s": r["ttft_s"]["p50"], "ttft_p95_s": r["ttft_s"]["p95"],
            "tpot_p50_s": r["tpot_s"]["p50"],
            "normalized_latency_p50_s": r["normalized_latency_s"]["p50"],
            "normalized_latency_p95_s": r["normalized_latency_s"]["p95"],
            "idle_fraction_mean": statistics.mean(idle.values()) if "mean" not in idle else idle["mean"]}


def side_by_side(measured: dict[str, Any], simulated: dict[str, Any]) -> dict[str, Any]:
    m, s = figures(measured), figures(simulated)
    out: dict[str, Any] = {}
    for k in m:
        ratio = s[k] / m[k] if m[k] and s[k] is not None else None
        out[k] = {"measured": m[k], "simulated": s[k], "ratio": ratio}
    out["within_15pct"] = all(out[k]["ratio"] is not None and abs(out[k]["ratio"] - 1) <= TARGET
                              for k in ("tokens_per_s", "normalized_latency_p50_s"))
    return out


def step_overhead(times: LayerTimes, layers: int, stages: int, batch: int, tpot: float,
                  head_layers: float = 0.0) -> tuple[float, list[float]]:
    """(per-stage step overhead, the profile's compute per stage): a decode-only phase with every slot busy makes
    a token per trip through the `stages` stages of the (token) pipeline, so TPOT / stages is a stage's step;
    what the profile's compute (a full microbatch's decode step) does not explain is the overhead (>= 0).
    head_layers: the deployment's split (--layer-split balanced; 0: even)."""
    compute = times.stage_steps(layer_split(layers, stages, head_layers), 0, batch)
    return max(0.0, tpot / stages - statistics.mean(compute)), compute


def validate_run(run: dict[str, Any], settings: dict[str, str], shape: str, times: LayerTimes,
                 layers: int) -> dict[str, Any]:
    S, B = run["stages"], int(settings["microbatch_size"])
    prompt = parse_length(settings.get("prompt_len", "paper"), PAPER_PROMPT)
    output = parse_length(settings.get("output_len", "paper"), PAPER_OUTPUT)
    vocab = int(settings.get("vocab", vocab_size(shape)))
    tpot = run["overhead"]["tpot_median_s"]
    overhead, compute = step_overhead(times, layers, S, B, tpot)
    out: dict[str, Any] = {
        "stages": S, "microbatch_size": B, "hosts": run.get("hosts", 1),
        "profile_vs_measured_runtime": {
            "profiled_decode_step_s": (layers // S) * times.decode(B),
            "measured_baseline_step_s": run["baseline_step"]["median_s"],
        },
        "calibration": {"measured_tpot_s": tpot, "profiled_compute_per_stage_s": compute,
                        "step_overhead_s": overhead},
        "rates": [],
    }
    cmp = out["profile_vs_measured_runtime"]
    cmp["ratio"] = cmp["profiled_decode_step_s"] / cmp["measured_baseline_step_s"]
    calibrated = LayerTimes(**{**vars(times), "step_overhead_s": overhead})
    for rec in run["rates"]:
        reqs = loadgen_workload(rec["requests"], rec["rate"], prompt, output, vocab, int(settings.get("seed", 0)))
        row: dict[str, Any] = {"rate": rec["rate"], "requests": rec["requests"]}
        for name, t in (("uncalibrated", times), ("calibrated", calibrated)):
            sim = simulate(SimConfig("colocated", layers, t, B, stages=S), reqs)
            row[name] = side_by_side(rec, sim)
        out["rates"].append(row)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-bench plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--measured", type=Path, nargs="+", default=[], help="dejavu-bench pipeline JSON results (needed)")
    p.add_argument("--profile", type=Path, nargs="+", default=[],
                   help="dejavu-plan JSONs (matched to each measured run's shape), or per-layer points keyed by shape "
                        "(needed)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for plan_bench.json and plan_bench.png (default {OUT_DEFAULT})")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (it shows no progress bars)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.measured or not args.profile:
        p.error("give --measured and --profile")
    profiles = [json.loads(p.read_text()) for p in args.profile]
    result: dict[str, Any] = {
        "benchmark": "plan (issue 19): simulator vs measured colocated pipeline runs, side by side",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["bin/dejavu-bench", "plan", *(sys.argv[2:] if argv is None else argv)]),
        "commit": curve_bench.source_commit(), "profile_files": [str(p) for p in args.profile], "target": TARGET,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="dejavu-plan-bench-") as root:
        for path, arm, measured in measured_results(args.measured):
            shape = measured["shape"]
            if shape not in SHAPES:
                raise SystemExit(f"dejavu-bench plan: {path}: unknown shape {shape!r}")
            settings = measured.get("settings") or settings_from_command(measured["command"])
            times, prof = profile_times(profiles, shape)
            spec = read_spec(write_model(shape, Path(root)))
            facts = model_facts(spec, settings.get("dtype", "bfloat16"))
            for run in measured["runs"]:
                v = validate_run(run, settings, shape, times, facts.layers)
                v.update(measured_file=str(path), arm=arm, shape=shape, card=measured.get("card"),
                         profile_card=prof.get("card"), layer_times=vars(times))
                result["runs"].append(v)
                for row in v["rates"]:
                    c = row["calibrated"]
                    if not args.quiet:
                        print(f"[plan] {shape} {v['stages']} stages{f' ({arm})' if arm else ''}, rate {row['rate']:g}: "
                              f"tokens/s measured "
                              f"{c['tokens_per_s']['measured']:.4g} simulated {c['tokens_per_s']['simulated']:.4g} "
                              f"(x{c['tokens_per_s']['ratio']:.3f}); normalized latency p50 measured "
                              f"{c['normalized_latency_p50_s']['measured']:.4g} simulated "
                              f"{c['normalized_latency_p50_s']['simulated']:.4g} "
                              f"(x{c['normalized_latency_p50_s']['ratio']:.3f}); within 15%: {c['within_15pct']}",
                              flush=True)
    result["all_within_15pct"] = {k: all(r[k]["within_15pct"] for run in result["runs"] for r in run["rates"])
                                  for k in ("calibrated", "uncalibrated")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "plan_bench.png")
    if not args.quiet:
        print(f"[plan] wrote {args.out / 'plan_bench.json'}")
    return 0


def measured_results(paths: list[Path]) -> list[tuple[Path, str | None, dict[str, Any]]]:
    """(file, arm, pipeline result) for every result in the files: a file is one result, or an A/B record whose
    `runs` maps each arm's name to a whole result (as pipeline-opt66b-4xh200-cudnn-ab-2026-11-27.json)."""
    out: list[tuple[Path, str | None, dict[str, Any]]] = []
    for path in paths:
        d = json.loads(path.read_text())
        if isinstance(d.get("runs"), dict):
            out += [(path, arm, r) for arm, r in d["runs"].items()]
        else:
            out.append((path, None, d))
    return out


def settings_from_command(command: str) -> dict[str, str]:
    """An older result without `settings`: its pipeline options from the recorded command line."""
    from bench.pipeline_bench import parser as pipeline_parser

    args = pipeline_parser().parse_args(shlex.split(command)[2:])
    return {k: str(v) for k, v in vars(args).items()}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for k, run in enumerate(result["runs"]):
        rates = [r["rate"] for r in run["rates"]]
        name = f"{run['shape']}, {run['stages']} st" + (f" {run['arm']}" if run.get("arm") else "")
        for ax, key in ((a, "tokens_per_s"), (b, "normalized_latency_p50_s")):
            ax.plot(rates, [r["calibrated"][key]["measured"] for r in run["rates"]], "o-", color=f"C{k}",
                    label=f"{name} measured")
            ax.plot(rates, [r["calibrated"][key]["simulated"] for r in run["rates"]], "x--", color=f"C{k}",
                    label=f"{name} simulated")
            ax.plot(rates, [r["uncalibrated"][key]["simulated"] for r in run["rates"]], ":", color=f"C{k}",
                    label=f"{name} simulated, compute only")
    a.set_ylabel("output tokens/s")
    b.set_ylabel("normalized latency p50 (s/token)")
    for ax in (a, b):
        ax.set_xlabel("request rate (req/s)")
        ax.legend(fontsize=7)
    fig.suptitle("simulator vs measured colocated pipelines")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
