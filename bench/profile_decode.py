"""Where a decode step's time goes on the GPU (kernel count, host vs device time) — a lead for optimising
stages/; not a benchmark of record. Uses a random-weight Llama-3-8B-shaped model (no disk).

    python bench/profile_decode.py [--layers 32] [--batches 1,8,64] [--context 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.batch import SeqChunk  # noqa: E402
from stages.runtime import ShardConfig, ShardRuntime  # noqa: E402

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "dejavu_random_weights": {"seed": 0, "std": 0.02},
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--prefill", type=int, default=8, help="also profile a prefill of this many x context (0: no)")
    p.add_argument("--no-graphs", action="store_true")
    args = p.parse_args()
    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps({**LLAMA3_8B, "num_hidden_layers": args.layers}))
    batches = [int(b) for b in args.batches.split(",")]
    rt = ShardRuntime(ShardConfig(d, None, max(batches), args.context + 64, "bfloat16", "cuda",
                                  cuda_graphs=not args.no_graphs))
    ids = torch.randint(3, 1000, (args.context,)).tolist()
    for s in range(max(batches)):
        rt.forward([SeqChunk(s, 0, args.context)], rt.embed_input(ids))
    report = {}
    for b in batches:
        chunks = [SeqChunk(i, args.context, 1) for i in range(b)]
        tok = rt.embed_input([5] * b)
        times, host = [], []
        for _ in range(25):
            torch.cuda.synchronize()
            t = time.perf_counter()
            rt.forward(chunks, tok)
            host.append(time.perf_counter() - t)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            rt.forward(chunks, tok)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        report[b] = {"step_ms": statistics.median(times[5:]) * 1e3, "host_ms": statistics.median(host[5:]) * 1e3,
                     "kernels": kernels, "gpu_ms": gpu_us / 1e3}
        print(f"batch {b}: step {report[b]['step_ms']:.2f} ms, host enqueue {report[b]['host_ms']:.2f} ms, "
              f"{kernels} kernels, device {report[b]['gpu_ms']:.2f} ms", flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60), flush=True)
    if args.prefill:
        chunks = [SeqChunk(i, 0, args.context) for i in range(args.prefill)]
        x = rt.embed_input(ids * args.prefill)
        for _ in range(3):
            rt.forward(chunks, x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            rt.forward(chunks, x)
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"prefill {args.prefill}x{args.context}: device {gpu_us / 1e3:.1f} ms", flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70), flush=True)
        report["prefill_device_ms"] = gpu_us / 1e3
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
