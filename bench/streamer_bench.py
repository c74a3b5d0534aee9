"""`dejavu-bench streamer`: the KV streaming library against the hardware, in one run.

1. Ceilings, across sizes: GPU peer copy, pinned H2D and D2H, HBM copy, NCCL send/recv (CPU: memcpy and
   ZeroMQ over TCP loopback).
2. Our operations on the KV layouts of an 8B-class and a 70B-class model (8 KV heads x 128, bf16; a stage holds
   16 / 20 layers): one prompt layer (1,000 tokens x microbatch 8), one decode step's new KV across all of a
   stage's layers, a whole microbatch swap-out and swap-in - naive (one copy per contiguous piece) vs
   buffered (gather, one copy, scatter), as GB/s and as a fraction of the matching ceiling at the same size.
   Single-transfer latency includes host overhead; `stream_gbps` is a stream of 32 transfers with 8 in flight
   (8 of 64 MiB and more), each planned in its turn: what a stream of layers sustains (prompt layers: the
   stage's layers in turn, as a prompt pass sends them; the same layer repeated: stream_gbps_same_region).
3. End to end through real streamer processes (bench/streamer_e2e.py): GPU pool -> GPU pool on another
   "host" (NCCL), and over TCP - one transfer at a time, a stream of 32 prompt layers (8 in flight) and a
   stream of whole prompts (2 in flight: one's control-plane latency overlaps the other's bytes); and the overhead of layer-by-layer streaming on a real prompt pass, the stage
   here and the streamer in its own process (with / without; the paper: within 2%).

Targets (issue 4): >= 90% of the ceiling for transfers of 16 MiB and more; streaming overhead <= 2%.

    bin/dejavu-bench streamer --out out/streamer-h100                    # GPUs (one GPU: no peer / NCCL rows)
    bin/dejavu-bench streamer --device cpu --quick [--json F] [--plot F]  # CI: small, under a minute

Prints one JSON object per line on stdout (progress bars on stderr, on a terminal) and writes the whole run
and a figure as <out>/streamer_bench.json and <out>/streamer_bench.png (--out: default ./dejavu-bench-results/
in the current directory), or where --json / --plot say.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run straight from a checkout

import torch  # noqa: E402

from bench.streamer_ops import (  # noqa: E402
    Lib,
    MiB,
    NcclPair,
    ceiling_copy,
    ceiling_memcpy,
    ceiling_zmq,
)
from bus.loadgen import OUT_DEFAULT, RESULTS_DIR, echo, progress  # noqa: E402
from streamer import wire  # noqa: E402
from streamer.layout import (
    PoolLayout,
    Region,  # noqa: E402
)


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int  # layers of one stage
    kv_heads: int = 8
    head_dim: int = 128
    mb: int = 8  # microbatch
    prompt: int = 1000

    def layout(self, slots: int) -> PoolLayout:
        return PoolLayout(0, self.layers, slots, self.prompt + 24, self.kv_heads, self.head_dim, torch.bfloat16)


GPU_SHAPES = (Shape("8b", 16), Shape("70b", 20))  # 32 layers / 2 stages; 80 layers / 4 stages
CPU_SHAPES = (Shape("8b-mini", 4, prompt=256, mb=4),)


def emit(rec: dict[str, Any], out: list[dict[str, Any]]) -> None:
    out.append(rec)
    echo(json.dumps(rec))


def ops(shape: Shape) -> list[tuple[str, Region, Region]]:
    """(operation, source region, destination region). Sources: microbatch 0 = slots [0, mb)."""
    mb, L, P = shape.mb, shape.layers, shape.prompt
    slots = range(mb)
    return [
        ("prompt_layer", Region.uniform(slots, (L // 2, L // 2 + 1), 0, P), Region.uniform(slots, (L // 2, L // 2 + 1), 0, P)),
        ("decode_step", Region.uniform(slots, (0, L), P, P + 1), Region.uniform(slots, (0, L), P, P + 1)),
        ("swap_out", Region.uniform(slots, (0, L), 0, P), Region.uniform(slots, (0, L), 0, P)),
    ]


def layer_stream(shape: Shape, op: str) -> list[tuple[Region, Region]] | None:
    """The regions a stream of this operation takes in turn: prompt layers go out one layer after another, as a
    prompt pass sends them (microbatch 0's slots, every layer of the stage); the other operations repeat."""
    if op != "prompt_layer":
        return None
    slots = range(shape.mb)
    return [(Region.uniform(slots, (k, k + 1), 0, shape.prompt),) * 2 for k in range(shape.layers)]


async def bench_ops(lib: Lib, shape: Shape, on_gpu: bool, repeats: int, ceil: dict[tuple[str, int], float],
                    out: list[dict[str, Any]], quiet: bool = False) -> None:
    stage_where = "cuda:0" if on_gpu else "cpu"
    host_where = "pinned" if on_gpu else "cpu"
    src = lib.endpoint(f"{shape.name}-p", shape.layout(2 * shape.mb), stage_where)
    torch.manual_seed(0)
    src.flat.copy_(torch.randint(0, 256, (src.flat.numel(),), dtype=torch.uint8, device=src.device))
    host = lib.endpoint(f"{shape.name}-swap", shape.layout(shape.mb), host_where, wire.POOL_SWAP)
    targets = [("host", host, "d2h" if on_gpu else "memcpy")]
    if on_gpu and len(lib.devices) > 1:
        targets.append(("peer", lib.endpoint(f"{shape.name}-t", shape.layout(2 * shape.mb), "cuda:1"), "peer"))
    jobs = [(op, path, src, region, dst, dst_region, ceiling_kind)
            for op, region, dst_region in ops(shape) for path, dst, ceiling_kind in targets
            if not (op == "swap_out" and path == "peer")]
    # swap-in: the whole microbatch back from host memory into the other microbatch's slots
    _, region, _ = ops(shape)[2]
    back = Region.uniform(range(shape.mb, 2 * shape.mb), region.layers, 0, shape.prompt)
    jobs.append(("swap_in", "host", host, region, src, back, "h2d" if on_gpu else "memcpy"))
    with progress(2 * len(jobs), f"operations {shape.name}, staging {lib.config.staging_bytes / MiB:g} MiB", quiet,
                  "figure") as bar:
        for op, path, a, region, b, dst_region, ceiling_kind in jobs:
            await one_op(lib, shape, op, path, a, region, b, dst_region, ceiling_kind, repeats, ceil, out, bar.update)


async def one_op(lib: Lib, shape: Shape, op: str, path: str, src: Any, region: Region, dst: Any,
                 dst_region: Region, ceiling_kind: str, repeats: int, ceil: dict[tuple[str, int], float],
                 out: list[dict[str, Any]], tick: Any = None) -> None:
    """`tick()`: called after each of its two measurements (naive, buffered)."""
    nbytes = region.nbytes(src.layout)
    key = (ceiling_kind, nbytes)
    if key not in ceil:  # the ceiling at exactly this size, measured in the same run
        ceil[key] = ceiling_memcpy(nbytes, repeats) if ceiling_kind == "memcpy" else \
            ceiling_copy(ceiling_kind, nbytes, repeats)
    figures = {}
    for buffered in (False, True):
        mode = "buffered" if buffered else "naive"
        reps = repeats if buffered or nbytes < 64 * MiB else max(2, repeats // 2)
        m = await lib.measure(src, region, dst, dst_region, buffered, reps, stream_of=layer_stream(shape, op))
        figures[mode] = m
        if tick is not None:
            tick()
        emit({"section": "op", "shape": shape.name, "op": op, "path": path, "mode": mode,
              "staging_mib": lib.config.staging_bytes / MiB, **m,
              "ceiling": ceiling_kind, "ceiling_gbps": ceil[key], "fraction": m["stream_gbps"] / ceil[key],
              "latency_fraction": m["gbps"] / ceil[key]}, out)
    emit({"section": "speedup", "shape": shape.name, "op": op, "path": path, "bytes": nbytes,
          "staging_mib": lib.config.staging_bytes / MiB,
          "buffered_over_naive": figures["buffered"]["stream_gbps"] / figures["naive"]["stream_gbps"],
          "latency_buffered_over_naive": figures["naive"]["latency_us"] / figures["buffered"]["latency_us"]}, out)


async def bench_ceilings(on_gpu: bool, sizes: list[int], repeats: int, ngpu: int, out: list[dict[str, Any]],
                         quiet: bool = False) -> None:
    kinds = (["peer"] if ngpu > 1 else []) + ["h2d", "d2h", "hbm"] if on_gpu else ["memcpy"]
    pair: NcclPair | None = None
    if on_gpu and ngpu > 1:
        try:
            pair = NcclPair()
        except Exception as e:  # noqa: BLE001 - no CuPy/NCCL: recorded, the rest still runs
            emit({"section": "ceiling", "name": "nccl", "error": repr(e)}, out)
    zmq_sizes = [n for n in sizes if n <= 64 * MiB]
    with progress(len(sizes) + len(zmq_sizes), "ceilings", quiet, "size") as bar:
        try:
            for n in sizes:
                for kind in kinds:
                    g = ceiling_memcpy(n, repeats) if kind == "memcpy" else ceiling_copy(kind, n, repeats)
                    emit({"section": "ceiling", "name": kind, "bytes": n, "gbps": g}, out)
                if pair is not None:
                    emit({"section": "ceiling", "name": "nccl", "bytes": n, "gbps": pair.gbps(n, repeats)}, out)
                bar.update(1)
        finally:
            if pair is not None:
                pair.close()
        for n in zmq_sizes:
            emit({"section": "ceiling", "name": "zmq_tcp", "bytes": n, "gbps": await ceiling_zmq(n, repeats)}, out)
            bar.update(1)


async def bench_e2e(args: argparse.Namespace, on_gpu: bool, out: list[dict[str, Any]]) -> None:
    """Through two real streamer processes: remote transfers, and the prompt-pass overhead."""
    from bench.streamer_e2e import run_e2e

    for rec in await run_e2e(on_gpu, args.quick, args.repeats, overhead_too=not args.skip_overhead,
                             model_dir=args.model_dir, remote_too=not args.skip_e2e, quiet=args.quiet,
                             streamer_args=(() if args.inline_dma else ("--no-inline-dma",))
                             + (("--completion-spin-us", str(args.completion_spin_us))
                                if args.completion_spin_us is not None else ())):
        emit(rec, out)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu)")
    out: list[dict[str, Any]] = []
    ngpu = torch.cuda.device_count() if on_gpu else 0
    emit({"section": "meta", "device": args.device, "quick": args.quick, "gpus": ngpu,
          "gpu_name": torch.cuda.get_device_name(0) if on_gpu else platform.processor() or platform.machine(),
          "torch": torch.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
          "host": platform.node(), "inline_dma": args.inline_dma, "completion_spin_us": args.completion_spin_us}, out)
    if on_gpu:
        sizes = [1 * MiB, 16 * MiB, 256 * MiB] if args.quick else [1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1024 * MiB]
    else:
        sizes = [256 * 1024, 4 * MiB, 32 * MiB] if args.quick else [256 * 1024, 4 * MiB, 32 * MiB, 256 * MiB]
    t0 = time.perf_counter()
    await bench_ceilings(on_gpu, sizes, args.repeats, ngpu, out, args.quiet)
    ceil: dict[tuple[str, int], float] = {}
    # the staging buffer (= chunk) size matters only for regions of short pieces (decode steps); long pieces
    # move pool to pool by DMA. --stagings measures others.
    stagings = [int(float(x) * MiB) for x in args.stagings.split(",")] if args.stagings else \
        ([16 * MiB] if on_gpu else [8 * MiB])
    for staging in stagings:
        lib = Lib(on_gpu, staging_bytes=staging, inline_dma=args.inline_dma, spin_us=args.completion_spin_us)
        await lib.start()
        try:
            for shape in (GPU_SHAPES if on_gpu else CPU_SHAPES):
                await bench_ops(lib, shape, on_gpu, args.repeats, ceil, out, args.quiet)
        finally:
            await lib.close()
    if not (args.skip_e2e and args.skip_overhead):
        await bench_e2e(args, on_gpu, out)
    emit({"section": "summary", **summarize(out), "seconds": time.perf_counter() - t0}, out)
    return out


DIAGNOSTIC_OVERHEADS = ("events-only", "copies-only", "signals-only")  # shares of the overhead, not streaming


def summarize(out: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets: for each buffered operation of 16 MiB or more, its best chunk size's fraction of the
    ceiling (throughput with transfers in flight); the worst of those is what must reach 0.9."""
    best: dict[tuple[str, str, str], float] = {}
    for r in out:
        if r.get("section") == "op" and r["mode"] == "buffered" and r["bytes"] >= 16 * MiB:
            key = (r["shape"], r["op"], r["path"])
            best[key] = max(best.get(key, 0.0), r["fraction"])
    speed = [r["buffered_over_naive"] for r in out if r.get("section") == "speedup"]
    streamed = [r for r in out if r.get("section") == "overhead" and r["dst"] not in DIAGNOSTIC_OVERHEADS]
    def worst(key: str, variant: str = "") -> float | None:  # variant "": the defaults (no suffix)
        rows = [r[key] for r in streamed if (r["dst"].endswith(" " + variant) if variant else " " not in r["dst"])]
        return max(rows, default=None)

    def e2e(op: str) -> list[float]:
        return [r["stream_fraction"] for r in out if r.get("section") == "e2e" and r["mode"] == "buffered"
                and r["op"] == op and "stream_fraction" in r]

    return {"min_fraction_ge16mib": min(best.values(), default=None), "target_fraction": 0.9,
            "min_e2e_stream_fraction": min(e2e("prompt_layer"), default=None),
            "min_e2e_prompt_stream_fraction": min(e2e("prompt"), default=None),
            "min_e2e_prompt_fraction": min((r["fraction"] for r in out if r.get("section") == "e2e"
                                            and r["mode"] == "buffered" and r["op"] == "prompt"), default=None),
            "min_e2e_prompt_fraction_checksummed": min(
                (r["fraction"] for r in out if r.get("section") == "e2e" and r["mode"] == "buffered checksummed"
                 and r["op"] == "prompt"), default=None),
            "worst_op_ge16mib": min(best, key=lambda k: best[k], default=None),
            "max_buffered_over_naive": max(speed, default=None),
            "max_streaming_overhead": worst("overhead"),
            "max_streaming_compute_overhead": worst("compute_overhead"),
            "max_streaming_overhead_direct_signal": worst("overhead", "direct-signal"),
            "max_streaming_compute_overhead_direct_signal": worst("compute_overhead", "direct-signal"),
            "max_streaming_overhead_device_wait": worst("overhead", "device-wait"),
            "max_streaming_overhead_checksummed": worst("overhead", "checksummed"),
            "max_streaming_compute_overhead_checksummed": worst("compute_overhead", "checksummed"),
            "max_streaming_compute_overhead_device_wait": worst("compute_overhead", "device-wait"),
            "target_overhead": 0.02}


def plot(out: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    ax = axes[0]
    for name in sorted({r["name"] for r in out if r.get("section") == "ceiling" and "gbps" in r}):
        pts = [(r["bytes"], r["gbps"]) for r in out if r.get("section") == "ceiling" and r.get("name") == name and "gbps" in r]
        ax.plot([p[0] / MiB for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="MiB", ylabel="GB/s", title="ceilings")
    ax.legend()
    ax = axes[1]
    rows = [r for r in out if r.get("section") in ("op", "e2e")]

    def label(r: dict[str, Any]) -> str:
        return f"{r.get('shape', 'e2e')}/{r['op']}/{r['path']}"

    labels = sorted({label(r) for r in rows})
    for k, mode in enumerate(("naive", "buffered")):
        vals = [max((r["fraction"] for r in rows if label(r) == lab and r["mode"] == mode), default=0)
                for lab in labels]
        ax.bar([i + 0.4 * k for i in range(len(labels))], vals, width=0.4, label=mode)
    ax.axhline(0.9, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="fraction of ceiling (stream)", title="our operations")
    ax.legend()
    ax = axes[2]
    ov = [r for r in out if r.get("section") == "overhead"]
    ax.bar([r["dst"] for r in ov], [100 * r["overhead"] for r in ov])
    ax.axhline(2.0, color="k", lw=0.8, ls="--")
    ax.set(ylabel="% slower than the prompt pass alone", title="layer-by-layer streaming overhead")
    meta = next((r for r in out if r.get("section") == "meta"), {})
    fig.suptitle(f"dejavu-bench streamer - {meta.get('gpu_name', '')} - {meta.get('date', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-bench streamer", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for streamer_bench.json and streamer_bench.png (default {OUT_DEFAULT})")
    p.add_argument("--json", type=Path, help="write the whole run here instead (default <out>/streamer_bench.json)")
    p.add_argument("--plot", type=Path, help="write the figure here instead (default <out>/streamer_bench.png; with "
                   "--json, the JSON path with .png)")
    p.add_argument("--model-dir", default="", help="where to write the random model's config.json (default: a "
                   "temporary folder, removed at the end; a given one is kept)")
    p.add_argument("--stagings", default="", help="comma-separated staging buffer sizes in MiB (default 16; CPU 8)")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--inline-dma", action=argparse.BooleanOptionalAction, default=True,
                   help="DMA-only copies enqueued on the event loop's thread (StreamerConfig.inline_dma, the "
                        "default), in the in-process operations and in every streamer process; --no-inline-dma: on "
                        "the GPU thread (the A/B)")
    p.add_argument("--completion-spin-us", type=float, default=None,
                   help="StreamerConfig.completion_spin_us for the operations and every streamer (default: its default)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the streamer's copy_threads)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (on stderr; shown only when stderr is a terminal)")
    return p


def outputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(JSON path, PNG path): --json / --plot where given, else <out>/streamer_bench.json / .png; a --json
    without --plot puts the figure beside it."""
    json_path = args.json or args.out / "streamer_bench.json"
    plot_path = args.plot or (args.json.with_suffix(".png") if args.json else args.out / "streamer_bench.png")
    return json_path, plot_path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    from bus.child import install_uvloop

    install_uvloop()  # this process plays the stages (and their clients), which run on uvloop
    command = shlex.join(sys.orig_argv if argv is None else ["bin/dejavu-bench", "streamer", *argv])
    out = asyncio.run(run(args))
    json_path, plot_path = outputs(args)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"command": command, "records": out}, indent=1) + "\n")
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(out, plot_path)
    print(f"[streamer] wrote {json_path} and {plot_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
