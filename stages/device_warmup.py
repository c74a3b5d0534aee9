"""A standby's device warm-up (`dejavu-serve --standby-warmup`, issue 18's outage): before a warm standby stage
process (stages/standby.py) says it is ready, it does on the device of the stage it would replace what every
fresh stage process otherwise pays for inside the outage, after a kill:

- the CUDA context (the restarted stage's `setup` phase: 0.31 s on an OPT-13B H100 stage, 2026-12-07);
- the process's first kernels: with CUDA's lazy module loading each kernel's module loads at its first launch,
  and cuBLAS / cuDNN create their handles at first use. A restarted H100 stage's first graph capture took 0.26 s
  where every later one took 0.05-0.065 s (`failure-opt13b-1xh100-2rps-cudnn-off-2026-12-07.json`);
  on 2026-12-08 that ~0.3 s was what stood between the replica's recovery and the 1.10x inflation target.

It builds the stage's shard one layer at a time (its first layer, with the embedding when it is the first stage;
its last layer, with the LM head, when it is the last stage), each at the stage's microbatch size and hidden
sizes - so cuBLAS picks the GEMM kernels the stage will run - and runs a prompt pass and decode steps through
them (graphs captured, the batch graph of a partly filled microbatch too, greedy sampling), then frees it all.
The KV pool is cut to two graph buckets of positions: a few MB instead of the stage's cache. Kernels and
handles stay with the process (handles go back to PyTorch's pool when the warm-up's thread ends, and the
stage's compute thread takes them from there); cuDNN's attention plans are per thread and per shape, which a
Restore's own warm-up builds (stages/warmup.py).

What it may take on the device: its context, plus the layers while they run, and only within what the stage's
own budget leaves free (`(1 - --gpu-memory-fraction)` of the device, less a margin for the context) - beyond
that it warms the context alone and says so. A warm-up that fails leaves the standby cold but usable, unless the
device itself no longer answers: then the standby exits and a restart starts a fresh process, as without one.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bus.messages import Chunk, Sampling, StepRequest
from stages.config import StageProcConfig
from stages.runtime import ShardConfig, model_dtype

WARM_TIMEOUT = 300.0  # a warm-up that has not ended within this leaves the standby unusable (it exits)
CONTEXT_MARGIN = 1 << 30  # bytes kept free for the standby's own context, handles and workspaces
PROMPT_TOKENS = 64  # per sequence of the warm-up's prompt pass


class DeviceGone(RuntimeError):
    """The device no longer answers after a warm-up failed (a device-side assert, a lost GPU): the process cannot
    become a stage."""


@dataclass
class Warmed:
    device: str
    seconds: float = 0.0
    context_s: float = 0.0
    layers: list[tuple[int, int]] = field(default_factory=list)  # the one-layer shards run
    graphs: int = 0  # decode graphs captured (and replayed)
    skipped: str = ""  # why the layers were not run ("" = they were)
    failed: str = ""  # the error that cut the warm-up short ("" = none)

    def line(self) -> str:
        what = "no context (CPU)" if not self.device.startswith("cuda") else \
            f"context {self.context_s:.2f} s" if self.context_s else "no context"
        if self.layers:
            graphs = f", {self.graphs} decode graph(s) captured" if self.graphs else ""
            what += f", layers {[a for a, _ in self.layers]} (a prompt pass and 4 decode steps each{graphs})"
        if self.skipped:
            what += f"; layers not run: {self.skipped}"
        if self.failed:
            what += f"; cut short: {self.failed}"
        return f"{self.device} warmed in {self.seconds:.2f} s: {what}"


def warm(cfg: StageProcConfig, fraction: float, timeout: float = WARM_TIMEOUT) -> Warmed:
    """Warm `cfg.device` for a stage like `cfg`, on a thread of its own that ends before this returns (its
    library handles go back to PyTorch's pools for the stage's threads). DeviceGone: the process must not become a
    stage. Anything else the warm-up raised is in `failed`."""
    out = Warmed(cfg.device)
    error: list[str] = []

    def body() -> None:
        try:
            _warm(cfg, fraction, out)
        except BaseException as e:  # reported below (as text: the traceback would keep the layers alive)
            error.append(f"{type(e).__name__}: {e}")

    t0 = time.monotonic()
    thread = threading.Thread(target=body, name="standby-warmup", daemon=True)
    thread.start()
    thread.join(timeout)
    out.seconds = time.monotonic() - t0
    if thread.is_alive():
        raise DeviceGone(f"the warm-up of {cfg.device} did not end within {timeout:.0f} s")
    gc.collect()
    if error:
        out.failed = error[0]
    if cfg.device.startswith("cuda") and (out.context_s or error):  # (a device left untouched stays so)
        try:
            torch.cuda.synchronize(torch.device(cfg.device))
            torch.cuda.empty_cache()  # the layers' memory back to the device: the standby keeps its context only
        except Exception as e:
            raise DeviceGone(f"{cfg.device} does not answer after its warm-up ({out.failed or 'no error'}): "
                             f"{e}") from e
    return out


def _warm(cfg: StageProcConfig, fraction: float, out: Warmed) -> None:
    from stages.models import load_spec
    from stages.models.base import DecoderShard

    cuda = cfg.device.startswith("cuda")
    dev = torch.device(cfg.device)
    if cuda:
        outside = int(torch.cuda.get_device_properties(dev).total_memory * (1.0 - fraction))  # (no context yet)
        if outside < 2 * CONTEXT_MARGIN:
            out.skipped = (f"the stages' budget (--gpu-memory-fraction {fraction}) leaves {outside / 2**20:.0f} MiB "
                           f"of {dev}: no room for another process's context, the device is left untouched")
            return
        t0 = time.monotonic()
        torch.cuda.set_device(dev)
        torch.zeros(1, device=dev)  # the context
        torch.cuda.synchronize(dev)
        out.context_s = time.monotonic() - t0
    family, spec = load_spec(Path(cfg.model_dir))
    a, b = cfg.layers
    shards = [(a, a + 1)] + ([(b - 1, b)] if b == spec.num_layers and b - 1 > a else [])
    batch = cfg.microbatch_size or cfg.num_slots
    max_seq = min(cfg.max_seq_len, 512)  # two graph buckets: a decode graph and its keys, a few MB of pool
    if cuda:
        with torch.device("meta"):
            params = max(sum(p.numel() for p in DecoderShard(family, spec, range(x, y)).parameters())
                         for x, y in shards)
        size = torch.empty((), dtype=model_dtype(cfg.dtype)).element_size()
        pool = 2 * batch * max_seq * spec.num_kv_heads * spec.head_dim * size
        # the prompt pass's activations (a few [tokens, intermediate] tensors) and the head's logits
        acts = 8 * batch * PROMPT_TOKENS * max(spec.hidden_size, spec.intermediate_size) * size \
            + 2 * batch * spec.vocab_size * 4
        need = params * size + pool + acts
        free, total = torch.cuda.mem_get_info(dev)
        room = min(free, int(total * (1.0 - fraction))) - CONTEXT_MARGIN
        if need > room:
            out.skipped = (f"they need ~{need / 2**20:.0f} MiB and the stages' budget (--gpu-memory-fraction "
                           f"{fraction}) leaves {max(0, room) / 2**20:.0f} MiB beside this process's context")
            return
    for x, y in shards:
        _run_layer(cfg, (x, y), batch, max_seq, spec.hidden_size, out)
        out.layers.append((x, y))
        gc.collect()  # (the shard is gone with _run_layer's frame)
        if cuda:
            torch.cuda.empty_cache()


def _run_layer(cfg: StageProcConfig, layers: tuple[int, int], batch: int, max_seq: int, hidden: int,
               out: Warmed) -> None:
    """A one-layer shard of the stage's sizes: a prompt pass, a full microbatch's decode step twice (captured,
    replayed), one member fewer (a batch graph). Its memory is freed when it returns."""
    from stages.stage import StageCore

    cuda = cfg.device.startswith("cuda")
    shard = ShardConfig(Path(cfg.model_dir), layers, batch, max_seq, cfg.dtype, cfg.device,
                        cuda_graphs=cfg.cuda_graphs, range_size=batch, cudnn_attention=cfg.cudnn_attention)
    core = StageCore(shard)
    rt = core.runtime
    n = min(PROMPT_TOKENS, max_seq // 2)
    greedy = Sampling()

    def step(k: int, chunks: list[Chunk]) -> None:
        tokens = sum(c.length for c in chunks)
        ids = [(3 + i) % rt.spec.vocab_size for i in range(tokens)] if rt.is_first else []
        hid = None if rt.is_first else torch.full((tokens, hidden), 0.01, dtype=rt.dtype, device=rt.device)
        r = core.run(StepRequest(0, 0, k, chunks, ids, [greedy] * len(chunks)), hid, defer=cuda and rt.is_last)
        if r.pending is not None:
            r.pending.read()

    step(1, [Chunk(s, 0, n) for s in range(batch)])
    before = len(rt.graphs.graphs) if rt.graphs is not None else 0
    for k in range(2):
        step(2 + k, [Chunk(s, n + k, 1) for s in range(batch)])
    if batch > 1:
        step(4, [Chunk(s, n + 2, 1) for s in range(batch - 1)])
    if rt.graphs is not None:
        out.graphs += len(rt.graphs.graphs) - before
    if cuda:
        torch.cuda.synchronize(rt.device)

