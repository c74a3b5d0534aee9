"""`dejavu-serve`: a whole deployment on one host (controller, one process per stage, supervisor).

Prints one line containing `ready` and the client address once it can serve, then serves until SIGINT or
SIGTERM. Exit code 0 after a clean stop, 1 when the deployment failed (the reason on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-serve", description=__doc__)
    p.add_argument("--model", default="default", help="Hugging Face model directory, or 'default'")
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: stage i on GPU i")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--host", default="127.0.0.1", help="interface for the client socket")
    p.add_argument("--port", type=int, default=0, help="client port (0 = any free port)")
    p.add_argument("--microbatch-size", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=0, help="microbatches in flight (0 = one per stage)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--prefill-chunk", type=int, default=0, help="split prompts into chunks of this many tokens")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--hang-timeout", type=float, default=300.0, help="kill a stage stuck in one step this long")
    p.add_argument("--max-restarts", type=int, default=5)
    p.add_argument("--restart-window", type=float, default=60.0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--client-timeout", type=float, default=10.0)
    p.add_argument("--stage-threads", type=int, default=0)
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (for comparison)")
    p.add_argument("--cudnn-attention", default="all", choices=["all", "decode", "off"],  # attention.py's modes
                   help="where attention may use cuDNN, whose kernels are compiled per shape while serving (CUDA): "
                        "wherever SDPA picks it (default), for decode tokens only, or nowhere")
    p.add_argument("--transport", default="auto", choices=["auto", "zmq", "nccl"],
                   help="activation plane between stages (auto: NCCL on cuda, ZeroMQ on cpu)")
    p.add_argument("--no-streamer", action="store_true",
                   help="start no KV streamer: stage pools in private memory (a restarted stage recomputes)")
    p.add_argument("--cache-dir", default=None, help="where the default model is written (env DEJAVU_CACHE)")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s supervisor %(levelname)s %(name)s: %(message)s")
    from recovery.proc import DeploymentError, run_supervisor
    from recovery.specs import DeploymentConfig
    from stages.generate_cli import resolve_model

    try:
        model_dir = resolve_model(args.model, args.cache_dir)
        cfg = DeploymentConfig(
            model_dir=str(model_dir), num_stages=args.stages, device=args.device, dtype=args.dtype, host=args.host,
            port=args.port, microbatch_size=args.microbatch_size, num_microbatches=args.microbatches,
            max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk,
            heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
            hang_timeout=args.hang_timeout,
            max_restarts=args.max_restarts, restart_window=args.restart_window,
            startup_timeout=args.startup_timeout, client_timeout=args.client_timeout,
            stage_threads=args.stage_threads, log_level=args.log_level, cuda_graphs=not args.no_cuda_graphs,
            cudnn_attention=args.cudnn_attention,
            transport=args.transport, streamer=not args.no_streamer,
        )
    except (ValueError, OSError) as e:
        print(f"dejavu-serve: error: {e}", file=sys.stderr)
        return 2

    def ready(address: str) -> None:
        print(f"dejavu-serve: ready {address} (model {model_dir}, {cfg.num_stages} stage(s), {cfg.device})",
              flush=True)

    try:
        return run_supervisor(cfg, ready)
    except DeploymentError as e:
        print(f"dejavu-serve: failed: {e}", file=sys.stderr)
        return 1
