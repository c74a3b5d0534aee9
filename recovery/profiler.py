"""A short profile of a model on one device for the planner: per-layer prompt and decode times and the device's
memory. Runs in the dejavu-plan process, never in a deployment's; torch is imported inside the functions, so
importing this module stays cheap (recovery/ must not pay torch's import at start-up, tests/test_layering.py).

Timed with `stages.runtime.ShardRuntime` (what a stage runs, CUDA graphs included) on a slice of the model:
layers [0, k) give the per-layer times (time / k; the embedding is a gather), and the last layer alone with
the final norm and LM head gives the head's share of a step (its time minus one layer's). Each point is the
median of `repeats` runs after `warmup` runs:
- prompt: one pass of one P-token prompt and of a microbatch of B of them: time = fixed + per_token * tokens;
- decode: one step at batch 1 and at batch B with `context` tokens cached: time = fixed + per_seq * batch.
Weights are the checkpoint's, or seeded random ones for a `dejavu_random_weights` shape (bench/pipeline_bench.py).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recovery.simulator import LayerTimes


def device_memory(device: str) -> tuple[int, str]:
    """(bytes, where the figure comes from): a CUDA device's total memory, or this host's physical memory."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[1]), "torch.cuda.mem_get_info"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host physical memory"


def _median_time(fn: Callable[[], Any], sync: Callable[[], None], warmup: int, repeats: int) -> float:
    samples = []
    for i in range(warmup + repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def _fit(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float]:
    """(fixed, slope) of the line through two points, neither below zero (timing noise on tiny shapes)."""
    slope = max(0.0, (y1 - y0) / (x1 - x0))
    fixed = max(0.0, y0 - slope * x0)
    if slope == 0.0 and fixed == 0.0:
        fixed = max(y0, y1)
    return fixed, slope


def measure(model_dir: Path, device: str, dtype: str, prompt_len: int, context: int, batch: int, layers: int = 2,
            repeats: int = 5, warmup: int = 2, threads: int = 0) -> dict[str, Any]:
    """Time the model on `device`; the result holds the raw medians and the fitted `layer_times`. `threads`:
    torch's CPU threads meanwhile (0: as they are)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from stages.batch import SeqChunk
    from stages.models.spec import read_spec
    from stages.runtime import ShardConfig, ShardRuntime

    spec = read_spec(model_dir)
    k = max(1, min(layers, spec.num_layers - 1 if spec.num_layers > 1 else 1))  # the head's layer is timed apart
    cuda = device.startswith("cuda")
    dev = "cuda:0" if device == "cuda" else device

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    seq = max(prompt_len, context + 1)
    t0 = time.perf_counter()

    def runtime(a: int, b: int) -> ShardRuntime:
        return ShardRuntime(ShardConfig(model_dir, (a, b), max(2, batch), seq, dtype, dev))

    def decode_step(rt: ShardRuntime, b: int) -> Callable[[], Any]:
        chunks = [SeqChunk(i, context, 1) for i in range(b)]
        ids = rt.embed_input([5] * b) if rt.is_first else torch.zeros(b, spec.hidden_size, dtype=rt.dtype,
                                                                      device=rt.device)
        return lambda: rt.forward(chunks, ids)

    def token_ids(n: int) -> list[int]:
        return [3 + (7 * i) % max(1, spec.vocab_size - 3) for i in range(n)]

    rt = runtime(0, k)
    layer_bytes = sum(p.numel() * p.element_size() for p in rt.shard.blocks[0].parameters())
    rt.forward([SeqChunk(i, 0, context) for i in range(batch)], rt.embed_input(token_ids(batch * context)))
    points = [(1, prompt_len), (batch, prompt_len)] if batch > 1 else [(1, max(1, prompt_len // 2)), (1, prompt_len)]
    prompt = []
    for n, p in points:
        chunks = [SeqChunk(i, 0, p) for i in range(n)]
        ids = rt.embed_input(token_ids(n * p))
        prompt.append((n * p, _median_time(lambda c=chunks, x=ids, r=rt: r.forward(c, x), sync, warmup, repeats) / k))
    # the cache holds `context` tokens again (a prompt pass above rewrote the first prompt_len)
    rt.forward([SeqChunk(i, 0, context) for i in range(batch)], rt.embed_input(token_ids(batch * context)))
    decode = [(b, _median_time(decode_step(rt, b), sync, warmup, repeats) / k) for b in sorted({1, batch})]
    del rt
    gc.collect()
    head_s = 0.0
    if spec.num_layers > 1:
        last = runtime(spec.num_layers - 1, spec.num_layers)
        last.forward([SeqChunk(i, 0, context) for i in range(batch)],
                     torch.zeros(batch * context, spec.hidden_size, dtype=last.dtype, device=last.device))
        head_s = max(0.0, _median_time(decode_step(last, batch), sync, warmup, repeats) - decode[-1][1])
        del last
        gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    times = fit(prompt, decode, head_s)
    return {
        "device": dev, "card": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": dtype,
        "layers_timed": k, "prompt_len": prompt_len, "context": context, "batch": batch,
        "warmup": warmup, "repeats": repeats, "seconds": time.perf_counter() - t0,
        "prompt_points_s_per_layer": [{"tokens": n, "s": s} for n, s in prompt],
        "decode_points_s_per_layer": [{"batch": b, "s": s} for b, s in decode],
        "layer_bytes_measured": layer_bytes,
        "layer_times": layer_times_json(times),
    }


def fit(prompt: list[tuple[int, float]], decode: list[tuple[int, float]], head_s: float) -> LayerTimes:
    """LayerTimes through two prompt points (tokens, s per layer) and one or two decode points (batch, s per
    layer); with one decode point (batch 1) the whole step is fixed."""
    pf, pt = _fit(*prompt[0], *prompt[1])
    df, ds = _fit(*decode[0], *decode[1]) if len(decode) > 1 else (decode[0][1], 0.0)
    return LayerTimes(pf, pt, df, ds, head_s=max(0.0, head_s))


def layer_times_json(t: LayerTimes) -> dict[str, float]:
    return {k: float(v) for k, v in vars(t).items()}


def layer_times_from(d: dict[str, Any], step_overhead_s: float | None = None) -> LayerTimes:
    """LayerTimes from a profile (or a plan's "profile"), with `step_overhead_s` replaced when given."""
    lt = dict(d["layer_times"])
    if step_overhead_s is not None:
        lt["step_overhead_s"] = step_overhead_s
    return LayerTimes(**{k: float(v) for k, v in lt.items() if k in LayerTimes.__dataclass_fields__})
