"""`dejavu-serve`: a deployment's controller host (controller, cluster supervisor), with its own host agents
(simulated hosts: `--hosts`) and those of other machines (`dejavu-agent --join`).

Prints one line containing `ready` and the client address once it can serve, then serves until SIGINT or
SIGTERM. Exit code 0 after a clean stop, 2 when it cannot start as asked (one line on stderr says what to
change), 1 when the deployment failed while serving (the reason on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def microbatch_size(text: str) -> int | str:
    """--microbatch-size: a number (checked with the other settings), or auto (recovery/sizing.py sizes it)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a number >= 1 or auto") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-serve", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default",
                   help="Hugging Face model directory (config.json, *.safetensors, tokenizer files), or 'default' "
                        "for the embedded tiny model (random weights: its text is gibberish)")
    p.add_argument("--stages", type=int, default=None,
                   help="pipeline stages, one process (and GPU) each (default 1; with --prompt-stages and "
                        "--token-stages, their sum)")
    p.add_argument("--prompt-stages", type=int, default=0,
                   help="disaggregation: stages of the prompt pipeline, which runs prompt passes and streams their "
                        "KV layer by layer into the token pipeline (needs --token-stages; dejavu-plan suggests a split)")
    p.add_argument("--token-stages", type=int, default=0,
                   help="disaggregation: stages of the token pipeline, which runs decode steps")
    p.add_argument("--prompt-microbatch-size", type=int, default=0,
                   help="prompts per prompt pass with disaggregation (0: --microbatch-size)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: stage i on GPU i")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights, activations and KV cache")
    p.add_argument("--host", default="127.0.0.1", help="interface for the client socket")
    p.add_argument("--port", type=int, default=0, help="client port (0: any free port; the ready line says which)")
    p.add_argument("--keys", metavar="DIR", default=None,
                   help="the users' CurveZMQ keys (dejavu-keys generate DIR): clients must hold DIR's client or admin "
                        "key, agents of other machines its agent key; without, the client socket is plaintext and "
                        "--host must be a loopback address")
    p.add_argument("--insecure", action="store_true",
                   help="allow a plaintext client socket on a --host beyond the loopback (anyone who reaches it "
                        "can use the deployment)")
    p.add_argument("--microbatch-size", type=microbatch_size, default="auto",
                   help="KV slots (requests) per microbatch; auto: the most that every stage's device holds (the "
                        "smallest stage's figure) after its weights, its largest step's activations and its CUDA "
                        "graphs, within --gpu-memory-fraction of its memory, at most 256; on CPU, 8 unless less "
                        "fits the host's available RAM (shared by the stages) within the same fraction. The "
                        "choice and each stage's memory split are logged at start (--log-level INFO) and shown in "
                        "status()")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.9,
                   help="the share of each device's total memory a stage may fill (weights, activations, graphs, "
                        "KV pool; memory other processes hold counts against it), in (0, 1]; the rest is the "
                        "safety margin")
    p.add_argument("--microbatches", type=int, default=0, help="microbatches in flight (0: one per stage)")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="longest sequence (prompt + output) a slot holds; longer requests are refused")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="split prompts into chunks of this many tokens (0: whole prompts)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between a process's heartbeats")
    p.add_argument("--heartbeat-timeout", type=float, default=3.0,
                   help="a process silent this many seconds is killed and restarted")
    p.add_argument("--hang-timeout", type=float, default=300.0,
                   help="kill a stage stuck in one step this many seconds")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="restarts allowed per process (each stage, the controller, the streamer on its own) within "
                        "--restart-window ...")
    p.add_argument("--restart-window", type=float, default=60.0,
                   help="... seconds; a process that fails more often stops the deployment, and every connected "
                        "client gets an error saying which process and why")
    p.add_argument("--restart-backoff", type=float, default=0.5,
                   help="seconds to wait before restarting a process that failed again (its first restart is "
                        "immediate); doubles with each restart in a row (0: always restart at once)")
    p.add_argument("--restart-backoff-max", type=float, default=10.0, help="longest wait before a restart")
    p.add_argument("--restart-backoff-reset", type=float, default=10.0,
                   help="a process up this many seconds after its Hello is restarted at once again when it fails")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds for every process to load and link before start-up fails")
    p.add_argument("--client-timeout", type=float, default=10.0,
                   help="cancel the requests of a client silent this many seconds")
    p.add_argument("--queue-timeout", type=float, default=300.0,
                   help="fail a request (ERR_TIMEOUT) that waits this many seconds without a slot, or whose "
                        "pipeline stays down this long")
    p.add_argument("--stage-threads", type=int, default=0, help="torch threads per CPU stage (0: cores / stages)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (for comparison)")
    p.add_argument("--cudnn-attention", default="all", choices=["all", "decode", "off"],  # attention.py's modes
                   help="where attention may use cuDNN, whose kernels are compiled per shape while serving (CUDA): "
                        "wherever SDPA picks it, for decode tokens only, or nowhere")
    p.add_argument("--transport", default="auto", choices=["auto", "zmq", "nccl"],
                   help="activation plane between stages (auto: NCCL on cuda, ZeroMQ on cpu)")
    p.add_argument("--hosts", type=int, default=1,
                   help="host agents started here as simulated hosts, each with its own loopback address "
                        "(127.0.0.2, 127.0.0.3, ...), KV streamer and shared memory; 0: only agents of other "
                        "machines (dejavu-agent --join) run stages")
    p.add_argument("--spare-hosts", type=int, default=0,
                   help="more simulated hosts that hold no stage until a host is lost")
    p.add_argument("--min-hosts", type=int, default=0,
                   help="place the stages once this many hosts joined (0: the --hosts started here)")
    p.add_argument("--agent-bind", default="tcp://127.0.0.1:0",
                   help="where host agents join (tcp://ADDRESS:PORT); agents of other machines need --keys")
    p.add_argument("--replicate", default="auto", choices=["auto", "on", "off"],
                   help="stream every stage's KV after each step to a replica on the next host, and restore a "
                        "stage that comes back without its KV from there (auto: on with 2 or more hosts; with one "
                        "host the replica does not survive that host's loss)")
    p.add_argument("--replica-lag", type=int, default=2,
                   help="steps a microbatch's replication may fall behind before its next step waits (counted "
                        "in status as stalls)")
    p.add_argument("--kv-takeover", default="on", choices=["on", "off"],
                   help="a restarted CPU stage takes its predecessor's shared-memory KV over (off: it comes back "
                        "empty, as a GPU stage does, and restores from its replica)")
    p.add_argument("--standby", default="auto", choices=["auto", "on", "off"],
                   help="each host keeps a warm standby stage process per device its stages use, its imports done, "
                        "which the next stage restart on that device becomes (a restart then skips Python's start and imports: ~2.9 s on "
                        "a GPU VM); auto: on for --device cuda")
    p.add_argument("--standby-warmup", default="on", choices=["on", "off"],
                   help="a standby first warms the device of the stage it would replace - its CUDA context and first "
                        "kernels, through one layer of that stage's sizes, then freed - so a restart skips those too; "
                        "it keeps a context (~0.5 GiB) on each GPU and uses only what --gpu-memory-fraction leaves")
    p.add_argument("--layer-split", default="balanced", choices=["balanced", "even"],
                   help="layers per stage of a decoding pipeline: balanced - the slowest stage as fast as whole layers "
                        "allow, the last stage's LM head counted as the layers its weights equal (a decode step reads "
                        "both alike), so that stage may take fewer; even - equal counts (a prompt pipeline's always)")
    p.add_argument("--lookahead", default="auto", choices=["auto", "on", "off"],
                   help="with one stage in the pipeline (or one token stage): send each microbatch's next step while its current one "
                        "runs, the stage feeding back the tokens it sampled, so the GPU does not wait for the "
                        "controller between steps (a request that stops on a sampled token costs one extra row); "
                        "auto: on for --device cuda (on CPU the controller would compete with the stage for cores)")
    p.add_argument("--defer-tokens", default="auto", choices=["auto", "on", "off"],
                   help="a last stage launches the next step it holds before it reads a step's sampled tokens, so "
                        "the device runs it meanwhile (auto: on for --device cuda; on CPU a step computes before "
                        "its call returns, so its tokens would wait for the next step)")
    p.add_argument("--swap", default="auto", choices=["auto", "on", "off"],
                   help="microbatch swapping: each stage keeps 2 microbatches' KV in its own pool and the others in "
                        "its host streamer's swap pool, prefetching the next one while the current one computes (so "
                        "--microbatches follows host memory); auto: on where a swap-in fits under a decode step and "
                        "more microbatches are configured than the device holds (the log and status say why)")
    p.add_argument("--swap-bandwidth", type=float, default=0.0,
                   help="host <-> device GB/s that --swap auto predicts with (0: measured at start)")
    p.add_argument("--swap-step-ms", type=float, default=0.0,
                   help="a decode step's ms that --swap auto compares with (0: predicted from a weight read)")
    p.add_argument("--no-streamer", action="store_true",
                   help="start no KV streamer: stage pools in private memory (a restarted stage recomputes)")
    p.add_argument("--cache-dir", default=None,
                   help="where the default model is written (default: $DEJAVU_CACHE, else ~/.cache/dejavu)")
    p.add_argument("--log-dir", default=None,
                   help="write each process's log to DIR/<process>.log (default: everything to stderr)")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                   help="at WARNING only what is wrong is logged")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models; /metrics, /health, "
                        "/ready) on this port, from a process of its own (0: any free port; the ready line says which)")
    p.add_argument("--http-host", default="127.0.0.1",
                   help="interface of the HTTP front; beyond the loopback it needs --api-key-file and TLS, or "
                        "--insecure")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="API keys the HTTP front accepts (Authorization: Bearer KEY; one per line, # comments; "
                        "SIGHUP to the front reads them again); $DEJAVU_API_KEY adds one. /health, /ready and "
                        "/metrics stay open")
    p.add_argument("--tls-certfile", default=None, metavar="PEM", help="the HTTP front serves HTTPS with this "
                   "certificate (chain) and --tls-keyfile")
    p.add_argument("--tls-keyfile", default=None, metavar="PEM", help="the private key of --tls-certfile")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="HTTP requests that may wait for a slot; more at once are refused with 429")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds an HTTP request may take, arrival to last token (then 504, or an error event)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT the HTTP front stops admitting (503) and gives the requests in flight "
                        "this many seconds to finish, before the rest of the deployment stops")
    return p


def absolute(path: str | None) -> str:
    """A file named on the command line, as the supervisor's children (started elsewhere) will find it."""
    return str(Path(path).resolve()) if path else ""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from recovery.preflight import UsageError, check_deployment
    from recovery.specs import DeploymentConfig
    from stages.generate_cli import resolve_model

    def usage(message: str) -> int:
        print(f"dejavu-serve: error: {message}", file=sys.stderr)
        return 2

    log_file = None
    if args.log_dir:
        try:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
            log_file = Path(args.log_dir) / "supervisor.log"
            log_file.open("a").close()
        except OSError as e:
            return usage(f"--log-dir {args.log_dir}: {e.strerror}")
    logging.basicConfig(level=args.log_level, filename=log_file,
                        format="%(asctime)s supervisor %(levelname)s %(name)s: %(message)s")
    try:
        if args.microbatch_size != "auto" and args.microbatch_size < 1:
            raise ValueError("--microbatch-size must be >= 1, or auto")
        model_dir = resolve_model(args.model, args.cache_dir)
        cfg = DeploymentConfig(
            model_dir=str(model_dir), device=args.device,
            num_stages=args.stages if args.stages is not None else (args.prompt_stages + args.token_stages or 1),
            prompt_stages=args.prompt_stages, token_stages=args.token_stages,
            prompt_microbatch_size=args.prompt_microbatch_size, dtype=args.dtype, host=args.host,
            port=args.port, microbatch_size=0 if args.microbatch_size == "auto" else args.microbatch_size,
            num_microbatches=args.microbatches,
            max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk,
            heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
            hang_timeout=args.hang_timeout,
            max_restarts=args.max_restarts, restart_window=args.restart_window,
            restart_backoff=args.restart_backoff, restart_backoff_max=args.restart_backoff_max,
            restart_backoff_reset=args.restart_backoff_reset,
            startup_timeout=args.startup_timeout, client_timeout=args.client_timeout, queue_timeout=args.queue_timeout,
            stage_threads=args.stage_threads, log_level=args.log_level, cuda_graphs=not args.no_cuda_graphs,
            cudnn_attention=args.cudnn_attention, log_dir=str(Path(args.log_dir).resolve()) if args.log_dir else "",
            transport=args.transport, streamer=not args.no_streamer, hosts=args.hosts,
            spare_hosts=args.spare_hosts, min_hosts=args.min_hosts, agent_bind=args.agent_bind,
            keys_dir=str(Path(args.keys).resolve()) if args.keys else "", insecure=args.insecure,
            replicate=args.replicate, replica_lag=args.replica_lag, kv_takeover=args.kv_takeover == "on",
            http_port=args.http_port, http_host=args.http_host, max_queue=args.max_queue,
            request_timeout=args.request_timeout, drain_timeout=args.drain_timeout,
            api_key_file=absolute(args.api_key_file), tls_certfile=absolute(args.tls_certfile),
            tls_keyfile=absolute(args.tls_keyfile),
            gpu_memory_fraction=args.gpu_memory_fraction,
            swap=args.swap, swap_bandwidth=args.swap_bandwidth, swap_step_ms=args.swap_step_ms,
            standby=args.standby, standby_warmup=args.standby_warmup == "on", lookahead=args.lookahead,
            defer_tokens=args.defer_tokens, layer_split=args.layer_split,
        )
        checked = check_deployment(cfg)
        cfg, sizing = sized(cfg, checked)
    except (ValueError, UsageError) as e:
        return usage(str(e))
    except OSError as e:  # writing the default model
        return usage(f"{e.filename or args.cache_dir}: {e.strerror} (set --cache-dir)")
    for warning in checked.warnings + sizing.warnings:
        print(f"dejavu-serve: warning: {warning}", file=sys.stderr)
    for line in sizing.lines():  # one line per stage, and the deployment's choice
        logging.getLogger("recovery.sizing").info("[memory] %s", line)

    def ready(address: str, agents: str = "", http: str = "") -> None:
        hosts = f"{cfg.hosts} host(s)" + (f" + {cfg.spare_hosts} spare" if cfg.spare_hosts else "")
        stages = (f"{cfg.prompt_stages} prompt + {cfg.token_stages} token stage(s)" if cfg.disaggregated
                  else f"{cfg.num_stages} stage(s)")
        print(f"dejavu-serve: ready {address} (model {model_dir}, {stages}, {cfg.device}, "
              f"{hosts}; agents join {agents}{f'; OpenAI API at {http}/v1' if http else ''})", flush=True)

    from recovery.proc import DeploymentError, run_supervisor

    try:
        return run_supervisor(cfg, ready)
    except DeploymentError as e:
        if e.config:
            return usage(str(e))
        print(f"dejavu-serve: failed: {e}", file=sys.stderr)
        return 1


def sized(cfg, checked):  # type: ignore[no-untyped-def]
    """cfg with its microbatch size fixed (auto: memory-sized) and its memory plan (recovery/sizing.py), before
    any process starts; an auto-sized CPU pool gets preflight's /dev/shm check too."""
    from dataclasses import replace

    from recovery.preflight import shm_shortage
    from recovery.sizing import AUTO, resolve

    resolved, sizing = resolve(cfg, checked.spec)
    if cfg.microbatch_size == AUTO and cfg.device == "cpu" and cfg.streamer:
        sizing = replace(sizing, warnings=sizing.warnings + tuple(shm_shortage(resolved, checked.spec)))
    return resolved, sizing
