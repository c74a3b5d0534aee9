"""`dejavu-bench <what> ...`: one entry point for the project's benchmarks.

    serve     load generator against a running deployment (bus/loadgen.py); --http URL: the HTTP front
              against the ZeroMQ client at the same load (bench/serve_bench.py)
    streamer  KV streaming library: ceilings, naive vs buffered, layer-by-layer overhead (bench/streamer_bench.py)
    runtime   single-shard model runtime vs Hugging Face and the weight-read floor (bench/runtime_bench.py)
    pipeline  colocated pipeline on real processes vs its single-GPU runtime; paper workload; bubbles;
              --hosts: the same with its stages on simulated hosts vs on one host (bench/pipeline_bench.py)
    soak      memory of every process over rounds of many clients (bench/soak_bench.py)
    startup   dejavu-serve --model default: launch to ready and SIGINT to exit vs the torch-import floor
              (bench/startup_bench.py)
    curve     control-message rate and latency over tcp loopback, plaintext vs CurveZMQ (bench/curve_bench.py;
              `pipeline --hosts` runs it too)
    failure   a stage killed mid-run, replica vs recompute: replication's fault-free cost, kill to first token,
              latency inflation, tokens/s around the kill (bench/failure_bench.py)
    plan      the simulator (dejavu-plan simulate) against measured `pipeline` results, side by side
              (bench/plan_bench.py)
    swap      microbatch swapping on / off / auto under one memory budget: tokens/s with every slot busy and
              the paper's workload, swap traffic and stalls (bench/swap_bench.py)
    disagg    prompt-token disaggregation vs the colocated pipeline on the same devices: every prompt/token
              split and the planner's pick, paper workload, the simulator beside each (bench/disagg_bench.py)

Each writes JSON + PNG into --out (default ./dejavu-bench-results/ in the current directory; serve: a JSON
path) and shows progress on stderr when it is a terminal (--quiet: never).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "serve": "bench.serve_bench",
    "streamer": "bench.streamer_bench",
    "runtime": "bench.runtime_bench",
    "pipeline": "bench.pipeline_bench",
    "soak": "bench.soak_bench",
    "startup": "bench.startup_bench",
    "curve": "bench.curve_bench",
    "failure": "bench.failure_bench",
    "plan": "bench.plan_bench",
    "disagg": "bench.disagg_bench",
    "swap": "bench.swap_bench",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]])
    return int(module.main(args[1:]) or 0)
