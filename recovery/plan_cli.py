"""`dejavu-plan`: plan a deployment (prompt/token split, microbatch size) from a short profile, or simulate one.

    dejavu-plan --model DIR --gpus N [--prompt-len P] [--output-len O] [--device cuda] ...
        profiles the model on the device, applies the paper's split formula and the memory model, checks the
        options with the simulator; prints JSON (profile, model facts, every option, the plan and its
        dejavu-serve command line) on stdout and a one-line summary on stderr
    dejavu-plan simulate --profile PLAN.json [--mode colocated|disaggregated] [--gpus N] [--rate R] ...
        simulates a deployment of any size (with --failure-at: a stage killed) from a profile measured now
        (--model DIR) or printed earlier (--profile FILE); prints its figures as JSON

Exit code 0, or 2 with one line on stderr saying what to change (a model that does not fit, bad lengths).
Runs in its own process; torch is imported only to profile.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from bus.loadgen import PAPER_OUTPUT, PAPER_PROMPT, parse_length
from recovery.planner import (
    Lengths,
    ModelFacts,
    PlanError,
    PlanSettings,
    lengths_of,
    make_plan,
    model_facts,
    serve_command,
)
from recovery.simulator import Failure, SimConfig, loadgen_workload, poisson_workload, simulate, summary_line

PROG = "dejavu-plan"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="Hugging Face model directory (config.json; weights, or a "
                   "dejavu_random_weights shape as bench/pipeline_bench.py writes)")
    p.add_argument("--profile", type=Path, help="reuse the profile of an earlier `dejavu-plan` JSON (or of a "
                   "profile JSON) instead of measuring one")
    p.add_argument("--device", default="cpu", help="where to profile: cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="float32, float16 or bfloat16 (auto: bfloat16 on cuda, "
                   "float32 on cpu)")
    p.add_argument("--prompt-len", default=None, help="paper (1000) | N | A:B | lognormal:MEDIAN:SIGMA[:LO:HI] "
                   "(None: a saved plan's, else paper)")
    p.add_argument("--output-len", default=None, help="paper (lognormal, median 200, in [2, 950]) | N | A:B | "
                   "lognormal:MEDIAN:SIGMA[:LO:HI] (None: a saved plan's, else paper)")
    p.add_argument("--profile-batch", type=int, default=8, help="microbatch size the profile times (and 1)")
    p.add_argument("--profile-layers", type=int, default=2, help="layers in the timed slice")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point (median), after 2 warm-ups")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads while profiling on cpu (0: torch's default; a CPU stage of dejavu-serve gets "
                        "cores / stages)")
    p.add_argument("--step-overhead-ms", type=float, default=None,
                   help="per stage and step on top of compute (activation hand-off, scheduling; default: the "
                        "profile's, 0 for a new one)")
    p.add_argument("--stream-slowdown", type=float, default=1.02,
                   help="m: a prompt pass streaming its KV over one that does not")
    p.add_argument("--link-gbps", type=float, default=40.0,
                   help="Gbit/s from a prompt stage to the token side (0: transfers take no time)")
    p.add_argument("--overlap", type=float, default=1.0,
                   help="share of a prompt stage's KV transfer that runs under its pass (1: layer by layer)")
    p.add_argument("--recv-slots", type=int, default=0,
                   help="prompt microbatches the token side receives at once (0: prompt stages + 1)")
    p.add_argument("--seed", type=int, default=0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the deployment")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="memory per GPU (default: the device's total; on cpu the host's)")
    p.add_argument("--safety", type=float, default=0.9, help="share of that memory the plan may fill")
    p.add_argument("--max-microbatch", type=int, default=64, help="largest microbatch size to consider")
    p.add_argument("--sim-requests", type=int, default=0,
                   help="requests per simulated option (0: 6x the token side's slots, at least 64)")
    return p


def sim_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} simulate", description="Simulate a deployment (recovery/simulator.py)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p)
    p.add_argument("--mode", choices=["colocated", "disaggregated"], help="default: the plan's, else colocated")
    p.add_argument("--gpus", type=int, help="the deployment's GPUs: replicas = gpus // GPUs per pipeline")
    p.add_argument("--replicas", type=int, default=None, help="pipelines (instead of --gpus)")
    p.add_argument("--stages", type=int, help="colocated stages per pipeline (default: the plan's, else all layers "
                   "or --gpus, whichever is fewer)")
    p.add_argument("--prompt-stages", type=int, help="default: the plan's")
    p.add_argument("--token-stages", type=int, help="default: the plan's")
    p.add_argument("--microbatch-size", type=int, help="default: the plan's, else 8")
    p.add_argument("--microbatches", type=int, default=0, help="per (token) pipeline; 0: one per stage")
    p.add_argument("--layer-split", choices=["balanced", "even"], default="balanced",
                   help="layers per stage of the decoding pipeline, as dejavu-serve's flag of that name splits them")
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--loadgen-vocab", type=int, default=None, metavar="V",
                   help="draw exactly the requests `dejavu-bench serve --vocab-size V` sends for --seed (slower)")
    p.add_argument("--failure-at", type=float, action="append", default=[], metavar="T",
                   help="kill a stage T seconds in (repeatable)")
    p.add_argument("--failure-stage", type=int, default=0, help="index inside its pipeline")
    p.add_argument("--failure-pipeline", choices=["token", "prompt"], default="token",
                   help="disaggregated: which pipeline loses the stage")
    p.add_argument("--failure-replica", type=int, default=0)
    p.add_argument("--detect-s", type=float, default=3.0, help="failure detection (heartbeat timeout)")
    p.add_argument("--restart-s", type=float, default=10.0, help="a stage's restart: process start and weight load")
    p.add_argument("--recovery", choices=["replica", "recompute"], default="replica")
    p.add_argument("--restore-gbps", type=float, default=40.0, help="Gbit/s of a replica restore to the new stage")
    return p


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def resolve_dtype(args: argparse.Namespace) -> str:
    return ("bfloat16" if args.device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype


def load_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"--profile {path}: {e}") from None
    if not isinstance(d, dict) or "layer_times" not in d.get("profile", d):
        raise PlanError(f"--profile {path}: not a dejavu-plan JSON nor a profile (no layer_times)")
    return d


def facts_and_profile(args: argparse.Namespace, lengths: tuple[Any, Any], saved: dict[str, Any]
                      ) -> tuple[ModelFacts, dict[str, Any]]:
    """(model facts, profile): from `saved` (the --profile file's JSON), else measured now on --device."""
    from stages.errors import ModelLoadError

    profile = dict(saved.get("profile", saved))
    dtype = profile.get("dtype", resolve_dtype(args))  # a saved profile was timed in its own dtype
    if args.model is None and "model" not in saved:
        raise PlanError("give --model DIR (or --profile with a dejavu-plan JSON, which names the model)")
    try:
        if args.model is not None:
            from stages.models.spec import read_spec

            facts = model_facts(read_spec(args.model), dtype)
        else:
            facts = ModelFacts.from_json(saved["model"])
        if saved:
            return facts, profile
        ln = lengths_of(*lengths, facts.max_positions)
        context = round(ln.prompt_mean + ln.output_mean / 2)
        if facts.max_positions:
            context = min(context, facts.max_positions - 1)
        from recovery.profiler import measure

        prof = measure(args.model, args.device, dtype, max(1, round(ln.prompt_mean)), context, args.profile_batch,
                       args.profile_layers, args.repeats, threads=args.threads)
    except ModelLoadError as e:
        raise PlanError(str(e)) from None
    return facts, prof


def workload_args(args: argparse.Namespace, saved: dict[str, Any]) -> tuple[Any, Any, str, str]:
    w = saved.get("workload", {})
    ps, os_ = args.prompt_len or w.get("prompt_len") or "paper", args.output_len or w.get("output_len") or "paper"
    try:
        return parse_length(ps, PAPER_PROMPT), parse_length(os_, PAPER_OUTPUT), ps, os_
    except argparse.ArgumentTypeError as e:
        raise PlanError(str(e)) from None


def run_plan(args: argparse.Namespace, argv: list[str]) -> int:
    out = build_plan(args, argv)
    print(json.dumps(out, indent=1))
    print(f"{PROG}: {plan_line(out)}", file=sys.stderr)
    return 0


def build_plan(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """What `dejavu-plan` prints, as a dict (bench/disagg_bench.py plans in its own process with it); PlanError
    when nothing fits."""
    from recovery.profiler import device_memory, layer_times_from

    if args.gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {args.gpus}")
    saved = load_json(args.profile) if args.profile else {}
    prompt, output, ps, os_ = workload_args(args, saved)
    facts, prof = facts_and_profile(args, (prompt, output), saved)
    lengths: Lengths = lengths_of(prompt, output, facts.max_positions)
    if args.memory_gib is not None:
        memory, source = int(args.memory_gib * 2**30), "--memory-gib"
    else:
        memory, source = device_memory(args.device)
    settings = PlanSettings(args.gpus, memory, args.safety, args.max_microbatch, args.stream_slowdown, args.link_gbps,
                            args.overlap, args.recv_slots, args.sim_requests, args.seed)
    times = layer_times_from(prof, None if args.step_overhead_ms is None else args.step_overhead_ms / 1e3)
    result = make_plan(facts, times, lengths, settings, prompt, output)
    model = str(args.model) if args.model is not None else saved.get("model_dir", "MODEL")
    result["plan"]["serve_command"] = serve_command(result["plan"], model, args.device, facts.dtype)
    result["memory"]["source"] = source
    out = {"command": shlex.join([PROG, *argv]), "model_dir": model, "model": facts.to_json(),
           "profile": {**prof, "source": str(args.profile) if args.profile else "measured"},
           "workload": {"prompt_len": ps, "output_len": os_, **result.pop("workload")}, **result}
    return out


def plan_line(out: dict[str, Any]) -> str:
    p = out["plan"]
    shape = (f"colocated, {p['stages']} stages" if p["mode"] == "colocated" else
             f"disaggregated, {p['prompt_stages']} prompt + {p['token_stages']} token stages")
    colocated = next((o for o in out["options"] if o["mode"] == "colocated" and "infeasible" not in o), None)
    versus = ""
    if colocated is not None and p["mode"] != "colocated":
        versus = (f" ({p['speedup_over_colocated']:.2f}x colocated {colocated['stages']} stages: "
                  f"{colocated['simulated_tokens_per_s']:.4g} tok/s)")
    return (f"{shape}, microbatch {p['microbatch_size']}: {p['predicted_tokens_per_s']:.4g} tok/s predicted{versus}; "
            + shlex.join(p["serve_command"]))


def run_simulate(args: argparse.Namespace, argv: list[str]) -> int:
    from recovery.profiler import layer_times_from

    saved = load_json(args.profile) if args.profile else {}
    prompt, output, ps, os_ = workload_args(args, saved)
    facts, prof = facts_and_profile(args, (prompt, output), saved)
    plan = saved.get("plan", {})
    mode = args.mode or plan.get("mode", "colocated")
    same = plan.get("mode") == mode
    b = args.microbatch_size or (plan.get("microbatch_size") if same else None) or 8
    times = layer_times_from(prof, None if args.step_overhead_ms is None else args.step_overhead_ms / 1e3)
    if mode == "colocated":
        stages = args.stages or (plan.get("stages") if same else None) or min(args.gpus or facts.layers, facts.layers)
        shape: dict[str, int] = {"stages": stages}
        per = stages
    else:
        dp = args.prompt_stages or (plan.get("prompt_stages") if same else None)
        dt = args.token_stages or (plan.get("token_stages") if same else None)
        if not dp or not dt:
            raise PlanError("disaggregated: give --prompt-stages and --token-stages (or a plan JSON that has them)")
        shape, per = {"prompt_stages": dp, "token_stages": dt}, dp + dt
    if args.gpus is not None and args.gpus < per:
        raise PlanError(f"--gpus {args.gpus} is fewer than one pipeline's {per} GPUs")
    replicas = args.replicas or (args.gpus // per if args.gpus else 1)
    try:
        cfg = SimConfig(mode, facts.layers, times, b, **shape, microbatches=args.microbatches, replicas=replicas,
                        stream_slowdown=args.stream_slowdown, kv_bytes_per_token_layer=facts.kv_bytes_per_token_layer,
                        link_gbps=args.link_gbps, overlap=args.overlap, recv_slots=args.recv_slots,
                        head_layers=facts.head_layers if args.layer_split == "balanced" else 0.0)
        failures = [Failure(t, args.failure_stage, args.failure_pipeline, args.failure_replica, args.detect_s,
                            args.restart_s, args.recovery, args.restore_gbps) for t in args.failure_at]
    except ValueError as e:
        raise PlanError(str(e)) from None
    if args.num_requests < 1 or args.rate < 0:
        raise PlanError("--num-requests must be >= 1 and --rate >= 0")
    if args.loadgen_vocab:
        if args.rate <= 0:
            raise PlanError("--loadgen-vocab needs a --rate > 0 (the load generator's requests have arrival times)")
        reqs = loadgen_workload(args.num_requests, args.rate, prompt, output, args.loadgen_vocab, args.seed)
    else:
        reqs = poisson_workload(args.num_requests, args.rate, prompt, output, args.seed)
    try:
        result = simulate(cfg, reqs, failures)
    except ValueError as e:
        raise PlanError(str(e)) from None
    unused = (args.gpus - replicas * per) if args.gpus else 0
    out = {"command": shlex.join([PROG, "simulate", *argv]), "model": facts.to_json(),
           "profile_source": str(args.profile) if args.profile else "measured",
           "layer_times": vars(times), "workload": {"prompt_len": ps, "output_len": os_, "rate": args.rate,
                                                    "num_requests": args.num_requests, "seed": args.seed},
           **({"unused_gpus": unused} if unused else {}), **result}
    print(json.dumps(out, indent=1))
    print(f"{PROG} simulate: {summary_line(result)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    simulate_cmd = bool(argv) and argv[0] == "simulate"
    rest = argv[1:] if argv and argv[0] in ("simulate", "plan") else argv
    args = (sim_parser() if simulate_cmd else parser()).parse_args(rest)
    try:
        return run_simulate(args, rest) if simulate_cmd else run_plan(args, rest)
    except PlanError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
