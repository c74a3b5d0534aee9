#!/usr/bin/env python3
"""Runtime benchmark (issue 2): one `ShardRuntime` holding a whole Llama-3-8B-shaped model with random bf16
weights, next to Hugging Face transformers on the same weights and next to the hardware floor, in one run.

Measures (a) a prompt pass of 8 x 1,000 tokens and (b) one decode step at batch 1, 8, 32, 64 with ~1,000
tokens of context already cached. HF runs the same shapes: a prefill forward of [8, 1000] into a fresh
DynamicCache (logits of the last position only, as `generate` asks), and decode steps on a DynamicCache that
holds 1,000 tokens. Both sides are timed as forward passes up to the logits (no sampling), with CUDA events
after warm-up, median of repeats; each timed step starts on an idle GPU, so host overhead (plan building,
Python per layer) is inside the figure whenever the GPU would wait for it.

The floor is weight bytes / HBM copy bandwidth, both measured here (a large device-to-device copy counting
read + write bytes); also reported: the floor including the KV bytes a decode step must read, and for the
prompt pass a compute floor (FLOPs / measured bf16 matmul rate).

Memory: one model at a time is on the GPU (ours, freed, then HF's); the KV context of the decode steps is
filled batch by batch, and an out-of-memory in one measurement is recorded in the JSON instead of aborting.

    bin/dejavu-bench runtime --out out/runtime-h100                      # the real thing (cuda)
    bin/dejavu-bench runtime --quick --out /tmp/rb                       # tiny shape on CPU (CI)

Writes <out>/runtime_bench.json and <out>/runtime_bench.png (--out: default ./dejavu-bench-results/ in the
current directory) and prints a table; a progress bar over the figures on stderr (on a terminal, without
--quiet). The random model directory (~16 GB) is written once to --model-dir (default: under the system temp
dir, never inside the checkout) and reused when its config matches; --quick's tiny model lives in a temporary
folder, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run straight from a checkout

import torch  # noqa: E402

from bus.loadgen import OUT_DEFAULT, RESULTS_DIR, echo, progress  # noqa: E402

LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
# Same architecture and code path, CPU-sized.
TINY = {**LLAMA3_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "rope_scaling": {**LLAMA3_8B["rope_scaling"], "original_max_position_embeddings": 32},
        "bos_token_id": 1, "eos_token_id": 2}
INIT_STD = 0.02  # keeps a 32-layer random model's activations finite in bf16
FILE_BYTES = 2 << 30  # ~2 GiB per safetensors file


@dataclass(frozen=True)
class Settings:
    device: str
    dtype: str
    prompt_batch: int
    prompt_len: int
    context: int
    batches: tuple[int, ...]
    warmup: int
    repeats: int
    prefill_repeats: int
    copy_bytes: int
    matmul_n: int
    seed: int

    @property
    def num_slots(self) -> int:
        return max(max(self.batches), self.prompt_batch)

    @property
    def max_seq_len(self) -> int:
        return max(self.context + 1, self.prompt_len) + 7  # room for the decode token (+ slack, 8-aligned-ish)


FULL = Settings("cuda", "bfloat16", 8, 1000, 1000, (1, 8, 32, 64), 3, 20, 10, 2 << 30, 8192, 0)
QUICK = Settings("cpu", "bfloat16", 2, 16, 16, (1, 2, 4), 1, 3, 2, 16 << 20, 256, 0)


# --- the model directory --------------------------------------------------------------------------------------


def weight_shapes(c: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face names and shapes of a Llama checkpoint, in file order."""
    h, i, hd, v = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, q)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def ensure_model(path: Path, config: dict[str, Any], dtype: torch.dtype, device: str, seed: int) -> bool:
    """Write a random model as a Hugging Face directory at `path` unless one with `config` is there.

    Returns True when an existing directory was reused. Tensors are drawn on `device` (the GPU: seconds for
    8B parameters), grouped into ~2 GiB safetensors files with an index, written to a temporary sibling
    directory and renamed into place, so an interrupted run never leaves a half-written model behind.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if _model_complete(path, config):
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        size = torch.empty(0, dtype=dtype).element_size()
        groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        group_bytes = 0
        for name, shape in weight_shapes(config):
            nbytes = math.prod(shape) * size
            if groups[-1] and group_bytes + nbytes > FILE_BYTES:
                groups.append([])
                group_bytes = 0
            groups[-1].append((name, shape))
            group_bytes += nbytes
        weight_map, total = {}, 0
        for n, group in enumerate(groups):
            fname = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {}
            for name, shape in group:
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=dtype)
                else:
                    t = (torch.randn(shape, generator=gen, device=device, dtype=dtype) * INIT_STD).cpu()
                tensors[name] = t
                weight_map[name] = fname
                total += t.numel() * size
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        gen_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen_config))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))  # last: marks the directory complete
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return False


def _model_complete(path: Path, config: dict[str, Any]) -> bool:
    try:
        if json.loads((path / "config.json").read_text()) != config:
            return False
        index = json.loads((path / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    return all((path / f).is_file() for f in set(index["weight_map"].values()))


# --- timing ---------------------------------------------------------------------------------------------------


class Timer:
    """Milliseconds of `fn`: CUDA events on a GPU (device timeline, host gaps included), wall clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def samples(
        self, fn: Callable[[], object], warmup: int, repeats: int, reset: Callable[[], object] | None = None
    ) -> list[float]:
        """`reset` runs untimed after every call (e.g. to put a cache back to its length)."""
        for _ in range(warmup):
            fn()
            if reset is not None:
                reset()
        out = []
        for _ in range(repeats):
            self.sync()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
            if reset is not None:
                reset()
        return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def hardware(s: Settings, device: torch.device, timer: Timer) -> dict[str, float]:
    """HBM (or host memory) copy bandwidth and bf16 matmul rate, measured now on this device."""
    copy_ms = _copy_ms(s.copy_bytes, device, timer)
    n = s.matmul_n
    mm_ms = _matmul_ms(n, getattr(torch, s.dtype), device, timer)
    _free()
    return {
        "copy_bytes": s.copy_bytes,
        "copy_ms": copy_ms,
        "copy_GBps": 2 * s.copy_bytes / (copy_ms / 1e3) / 1e9,  # read + write
        "matmul_n": n,
        "matmul_TFLOPs": 2 * n**3 / (mm_ms / 1e3) / 1e12,
    }


def _copy_ms(nbytes: int, device: torch.device, timer: Timer) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return statistics.median(timer.samples(lambda: dst.copy_(src), 3, 10))


def _matmul_ms(n: int, dtype: torch.dtype, device: torch.device, timer: Timer) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return statistics.median(timer.samples(lambda: a @ b, 3, 10))


# --- ours -----------------------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _measured(fn: Callable[[], list[float]]) -> dict[str, Any]:
    """{"ms": median, "samples_ms": [...]}, or {"error": ...} when the device ran out of memory."""
    try:
        samples = fn()
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        _free()
        return {"error": f"out of memory: {e}"[:300]}
    return {"ms": _median(samples), "samples_ms": samples}


def _nothing() -> None:
    pass


def bench_ours(model_dir: Path, s: Settings, timer: Timer, tick: Callable[[], object] = _nothing) -> dict[str, Any]:
    """`tick()` after each figure: the prompt pass, filling the context, each decode batch."""
    from stages.runtime import ShardConfig, ShardRuntime

    t0 = time.perf_counter()
    rt = ShardRuntime(ShardConfig(model_dir, None, s.num_slots, s.max_seq_len, s.dtype, s.device))
    timer.sync()
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in rt.shard.parameters())
    embed = rt.shard.embed.weight
    out["embedding_bytes"] = embed.numel() * embed.element_size()
    out["kv_pool_bytes"] = rt.layout.nbytes
    with torch.inference_mode():
        _measure_ours(rt, s, timer, out, tick)
    del rt, embed
    _free()
    return out


def _measure_ours(rt: Any, s: Settings, timer: Timer, out: dict[str, Any], tick: Callable[[], object]) -> None:
    from stages.batch import SeqChunk

    vocab = rt.spec.vocab_size
    gen = torch.Generator().manual_seed(s.seed + 1)

    def prompt_pass(slots: range, length: int) -> Callable[[], torch.Tensor]:
        chunks = [SeqChunk(i, 0, length) for i in slots]
        ids = torch.randint(0, vocab, (len(slots) * length,), generator=gen).tolist()
        return lambda: rt.forward(chunks, rt.embed_input(ids))

    # (a) the prompt pass; each repeat rewrites the same slots
    step = prompt_pass(range(s.prompt_batch), s.prompt_len)
    out["prefill"] = _measured(lambda: timer.samples(step, s.warmup, s.prefill_repeats))
    _free()
    tick()

    # (b) decode: real prompt passes fill every slot's first `context` tokens, a group of slots at a time
    def fill() -> list[float]:
        for a in range(0, s.num_slots, s.prompt_batch):
            prompt_pass(range(a, min(a + s.prompt_batch, s.num_slots)), s.context)()
        timer.sync()
        return [0.0]

    filled = _measured(fill)
    tick()
    out["decode"] = {}
    for b in s.batches:
        if "error" in filled:
            out["decode"][b] = filled
            tick()
            continue
        # every repeat writes position `context` again: the context stays exactly s.context tokens
        chunks = [SeqChunk(i, s.context, 1) for i in range(b)]
        ids = torch.randint(0, vocab, (b,), generator=gen).tolist()

        def decode(c: list[SeqChunk] = chunks, x: list[int] = ids) -> torch.Tensor:
            return rt.forward(c, rt.embed_input(x))

        out["decode"][b] = _measured(lambda f=decode: timer.samples(f, s.warmup, s.repeats))
        tick()


# --- Hugging Face ---------------------------------------------------------------------------------------------


def _load_hf(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    import importlib.util

    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), device_map=str(device), **kwargs)
    else:  # device_map needs accelerate: load on the host (mmap), then move once
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).to(device)
    return model.eval()


class _HFCache:
    """DynamicCache construction and the forward keyword across transformers 4.5x-5.x."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self.cls, self.config = DynamicCache, model.config
        params = inspect.signature(model.forward).parameters
        self.kw = "cache" if "cache" in params else "past_key_values"
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def new(self) -> Any:
        try:
            return self.cls(config=self.config)
        except TypeError:
            return self.cls()

    def filled(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Any:
        """A cache holding `length` random tokens per sequence (values do not change the timing)."""
        c = self.config
        kv_heads = c.num_key_value_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        cache = self.new()
        for layer in range(c.num_hidden_layers):
            k = torch.randn(batch, kv_heads, length, head_dim, dtype=dtype, device=device)
            cache.update(k, torch.randn_like(k), layer)
        return cache


def bench_hf(model_dir: Path, s: Settings, timer: Timer, tick: Callable[[], object] = _nothing) -> dict[str, Any]:
    """`tick()` after each figure: the prompt pass, each decode batch."""
    import transformers

    t0 = time.perf_counter()
    model = _load_hf(model_dir, getattr(torch, s.dtype), torch.device(s.device))
    timer.sync()
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "version": transformers.__version__}
    with torch.inference_mode():
        _measure_hf(model, s, timer, out, tick)
    del model
    _free()
    return out


def _measure_hf(model: Any, s: Settings, timer: Timer, out: dict[str, Any], tick: Callable[[], object]) -> None:
    device = torch.device(s.device)
    hf = _HFCache(model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(s.seed + 2)

    # (a) the prompt pass into a fresh cache, logits of the last position only (as generate does)
    ids = torch.randint(0, vocab, (s.prompt_batch, s.prompt_len), generator=gen).to(device)

    def prefill() -> Any:
        return model(input_ids=ids, use_cache=True, **{hf.kw: hf.new()}, **hf.keep)

    out["prefill"] = _measured(lambda: timer.samples(prefill, s.warmup, s.prefill_repeats))
    _free()
    tick()

    # (b) decode steps on a cache that holds `context` tokens; the appended token is cropped off, untimed
    out["decode"] = {}
    for b in s.batches:
        step_ids = torch.randint(0, vocab, (b, 1), generator=gen).to(device)
        out["decode"][b] = _measured(lambda b=b, x=step_ids: _hf_decode(model, hf, x, b, s, timer))
        _free()
        tick()


def _hf_decode(model: Any, hf: _HFCache, ids: torch.Tensor, batch: int, s: Settings, timer: Timer) -> list[float]:
    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    state = {"cache": hf.filled(batch, s.context, dtype, device)}

    def step() -> Any:
        return model(input_ids=ids, use_cache=True, **{hf.kw: state["cache"]})

    def reset() -> None:
        cache = state["cache"]
        try:
            cache.crop(-1)  # negative = drop that many tokens, in every transformers version that has crop
        except (ValueError, TypeError, AttributeError):
            pass
        if cache.get_seq_length() != s.context:  # could not crop: rebuild
            del cache
            state.clear()
            _free()
            state["cache"] = hf.filled(batch, s.context, dtype, device)

    try:
        return timer.samples(step, s.warmup, s.repeats, reset)
    finally:
        state.clear()


# --- report ---------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ms(entry: dict[str, Any] | None) -> float | None:
    return entry.get("ms") if entry else None


def assemble(
    s: Settings, config: dict[str, Any], hw: dict[str, float], ours: dict[str, Any], hf: dict[str, Any] | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    bw = hw["copy_GBps"] * 1e9
    weight_bytes = ours["weight_bytes"]
    floor_ms = weight_bytes / bw * 1e3
    layers, heads, hd = config["num_hidden_layers"], config["num_attention_heads"], config["head_dim"]
    h, kv_dim, q_dim = config["hidden_size"], config["num_key_value_heads"] * hd, heads * hd
    elem = torch.empty(0, dtype=getattr(torch, s.dtype)).element_size()
    kv_token_bytes = 2 * layers * kv_dim * elem  # K and V of one token in every layer
    # prompt pass FLOPs: every block matrix once per token, causal attention (QK^T and PV over half the
    # square), and the head for each sequence's last token only
    block_params = h * (2 * q_dim + 2 * kv_dim) + 3 * h * config["intermediate_size"]
    tokens = s.prompt_batch * s.prompt_len
    flops = (2 * layers * block_params * tokens + s.prompt_batch * layers * 2 * s.prompt_len**2 * heads * hd
             + 2 * h * config["vocab_size"] * s.prompt_batch)
    compute_floor_ms = flops / (hw["matmul_TFLOPs"] * 1e12) * 1e3
    p_ours, p_hf = _ms(ours.get("prefill")), _ms((hf or {}).get("prefill"))
    prefill = {
        "batch": s.prompt_batch, "tokens_per_sequence": s.prompt_len,
        "ours_ms": p_ours, "hf_ms": p_hf, "ours_over_hf": _ratio(p_ours, p_hf),
        "compute_floor_ms": compute_floor_ms, "ours_over_compute_floor": _ratio(p_ours, compute_floor_ms),
        "weight_floor_ms": floor_ms, "ours_over_weight_floor": _ratio(p_ours, floor_ms),
        "ours_tokens_per_s": tokens / (p_ours / 1e3) if p_ours else None,
        "hf_tokens_per_s": tokens / (p_hf / 1e3) if p_hf else None,
        "ours": ours.get("prefill"), "hf": (hf or {}).get("prefill"),
    }
    decode = []
    for b in s.batches:
        mine, theirs = ours["decode"].get(b), (hf or {}).get("decode", {}).get(b)
        d_ours, d_hf = _ms(mine), _ms(theirs)
        with_kv = (weight_bytes + b * (s.context + 1) * kv_token_bytes) / bw * 1e3
        decode.append({
            "batch": b, "context": s.context,
            "ours_ms": d_ours, "hf_ms": d_hf, "floor_ms": floor_ms,
            "ours_over_hf": _ratio(d_ours, d_hf), "ours_over_floor": _ratio(d_ours, floor_ms),
            "hf_over_floor": _ratio(d_hf, floor_ms),
            "floor_with_kv_ms": with_kv, "ours_over_floor_with_kv": _ratio(d_ours, with_kv),
            "ours_tokens_per_s": b / (d_ours / 1e3) if d_ours else None,
            "hf_tokens_per_s": b / (d_hf / 1e3) if d_hf else None,
            "ours": mine, "hf": theirs,
        })
    return {
        **meta,
        "model": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                                         "rope_scaling")},
        "settings": asdict(s),
        "hardware": hw,
        "weight_bytes": weight_bytes,
        "kv_pool_bytes": ours["kv_pool_bytes"],
        "floor": {
            "definition": "weight bytes / measured HBM copy bandwidth (read + write bytes of a device copy)",
            "decode_weights_ms": floor_ms,
            "decode_weights_excluding_embedding_ms": (weight_bytes - ours["embedding_bytes"]) / bw * 1e3,
        },
        "load_s": {"ours": ours["load_s"], "hf": (hf or {}).get("load_s")},
        "hf_error": (hf or {}).get("error"),
        "prefill": prefill,
        "decode": decode,
    }


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    p = result["prefill"]
    what = f"prefill {p['batch']}x{p['tokens_per_sequence']}"
    lines = [
        f"runtime bench on {result['card']} ({result['date']}): copy {hw['copy_GBps']:.0f} GB/s, "
        f"matmul {hw['matmul_TFLOPs']:.1f} TFLOP/s, weights {result['weight_bytes'] / 1e9:.2f} GB",
        f"{'what':<24}{'ours ms':>10}{'HF ms':>10}{'floor ms':>10}{'ours/HF':>9}{'ours/floor':>11}",
        f"{what:<24}{_fmt(p['ours_ms']):>10}{_fmt(p['hf_ms']):>10}"
        f"{_fmt(p['compute_floor_ms']):>10}{_fmt(p['ours_over_hf']):>9}{_fmt(p['ours_over_compute_floor']):>11}"
        "  (compute floor)",
    ]
    for d in result["decode"]:
        what = f"decode b={d['batch']} ctx={d['context']}"
        lines.append(f"{what:<24}{_fmt(d['ours_ms']):>10}{_fmt(d['hf_ms']):>10}{_fmt(d['floor_ms']):>10}"
                     f"{_fmt(d['ours_over_hf']):>9}{_fmt(d['ours_over_floor']):>11}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    p = result["prefill"]
    names = ["ours", "HF", "compute floor"]
    values = [p["ours_ms"] or 0.0, p["hf_ms"] or 0.0, p["compute_floor_ms"]]
    ax1.bar(names, values, color=["tab:blue", "tab:orange", "tab:gray"])
    ax1.set_ylabel("ms")
    ax1.set_title(f"prompt pass {p['batch']} x {p['tokens_per_sequence']} tokens")
    d = result["decode"]
    batches = [x["batch"] for x in d]
    for key, label, style in (("ours_ms", "ours", "o-"), ("hf_ms", "HF transformers", "s-"),
                              ("floor_ms", "weight-read floor", "k--"), ("floor_with_kv_ms", "floor + KV read", "k:")):
        ys = [x[key] if x[key] is not None else float("nan") for x in d]
        ax2.plot(batches, ys, style, label=label)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xticks(batches, [str(b) for b in batches])
    ax2.set_xlabel("batch")
    ax2.set_ylabel("ms per decode step")
    ax2.set_title(f"decode step, {d[0]['context']} tokens of context")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{result['card']} · {result['dtype']} · {result['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- entry point ----------------------------------------------------------------------------------------------


def _card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-bench runtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for runtime_bench.json and runtime_bench.png (default {OUT_DEFAULT})")
    p.add_argument("--quick", action="store_true", help="tiny shape on CPU (CI smoke run)")
    p.add_argument("--model-dir", type=Path, help="where the random model lives (written if absent, never removed; "
                   "default: <temp dir>/dejavu-bench/llama3-8b-shape-random-bf16, kept for the next run; with "
                   "--quick a temporary folder, removed at the end)")
    p.add_argument("--device", help="cuda (default) or cpu (default with --quick)")
    p.add_argument("--batches", help="decode batch sizes, comma-separated (default 1,8,32,64)")
    p.add_argument("--context", type=int, help="tokens already cached for decode steps (default 1000)")
    p.add_argument("--prompt-batch", type=int, help="sequences in the prompt pass (default 8)")
    p.add_argument("--prompt-len", type=int, help="tokens per prompt (default 1000)")
    p.add_argument("--repeats", type=int, help="timed repeats per decode figure (default 20)")
    p.add_argument("--skip-hf", action="store_true", help="measure ours and the floor only")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (on stderr; shown only when stderr is a terminal)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.device:
        changes["device"] = args.device
    if args.batches:
        changes["batches"] = tuple(int(b) for b in args.batches.split(","))
    for name in ("context", "prompt_batch", "prompt_len", "repeats"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    s = Settings(**{**asdict(base), **changes})
    if min(s.batches) < 1 or s.context < 1 or s.prompt_batch < 1 or s.prompt_len < 2 or s.repeats < 1:
        raise SystemExit("runtime_bench: batches, context, prompt sizes and repeats must be positive")
    return s


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    s = settings_from(args)
    config = TINY if args.quick else LLAMA3_8B
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("runtime_bench: no CUDA GPU here; use --quick (or --device cpu)", file=sys.stderr)
        return 2
    command = shlex.join(sys.orig_argv) if argv is None else shlex.join(["bin/dejavu-bench", "runtime", *argv])
    with contextlib.ExitStack() as cleanup:
        model_dir = args.model_dir
        if model_dir is None:
            if args.quick:  # removed at the end, on error and on Ctrl-C too
                model_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="runtime-bench-"))) / "model"
            else:
                model_dir = Path(tempfile.gettempdir()) / "dejavu-bench" / "llama3-8b-shape-random-bf16"
        # figures: the model, the hardware, ours (prompt pass, context fill, each batch), HF (prompt pass, each batch)
        total = 2 + 2 + len(s.batches) + (0 if args.skip_hf else 1 + len(s.batches))
        bar = cleanup.enter_context(progress(total, "runtime bench", args.quiet, "figure"))
        t0 = time.perf_counter()
        reused = ensure_model(model_dir, config, getattr(torch, s.dtype), s.device, s.seed)
        bar.update(1)
        echo(f"[bench] model {model_dir} {'reused' if reused else 'written'} in {time.perf_counter() - t0:.1f} s")
        timer = Timer(device)
        hw = hardware(s, device, timer)
        bar.update(1)
        echo(f"[bench] copy {hw['copy_GBps']:.0f} GB/s, matmul {hw['matmul_TFLOPs']:.1f} TFLOP/s")
        ours = bench_ours(model_dir, s, timer, lambda: bar.update(1))
        echo(f"[bench] ours done (load {ours['load_s']:.1f} s)")
        hf = None
        if not args.skip_hf:
            try:
                hf = bench_hf(model_dir, s, timer, lambda: bar.update(1))
                echo(f"[bench] HF done (load {hf['load_s']:.1f} s)")
            except Exception as e:  # keep our figures: the report shows HF as missing, with the reason
                traceback.print_exc()
                hf = {"error": f"{type(e).__name__}: {e}"[:500]}
                _free()
    import transformers

    meta = {
        "benchmark": "runtime (issue 2): one ShardRuntime vs Hugging Face transformers vs weight-read floor",
        "card": _card(device),
        "device": s.device,
        "dtype": s.dtype,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
        },
        "quick": args.quick,
        "model_dir": str(model_dir),
        "model_reused": reused,
    }
    result = assemble(s, config, hw, ours, hf, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "runtime_bench.png")
    print(table(result))
    print(f"[bench] wrote {args.out / 'runtime_bench.json'} and {args.out / 'runtime_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
