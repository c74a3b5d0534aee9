"""A stage's start with `--swap auto|on`: the figures auto decides with (stages/swap_policy.py holds the rule) and
its swap pool on the host's streamer (and, a disaggregated token stage's, its receive pool). Runs in the stage process at start-up, before its KV pool is allocated
(swapping makes that pool `swap_frames` microbatches deep): the measurements on its compute thread, the pool on its
event loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from stages.swap_policy import SwapDecision
from streamer.client import StreamerClient
from streamer.layout import PoolLayout

log = logging.getLogger(__name__)


def _bandwidth(device: Any, nbytes: int = 64 << 20) -> float:
    """Host -> device copy bandwidth (pinned, as the swap pool is) on CUDA, memcpy on CPU: B/s, best of 3."""
    import torch

    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def _device_bandwidth(device: Any, nbytes: int = 256 << 20) -> float:
    """Device memory bandwidth (read + write of a copy): what a decode step, weight-read bound, runs at."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        b.copy_(a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def shard_weight_bytes(spec: Any, layers: tuple[int, int], itemsize: int) -> int:
    """A shard's decoder-layer weights (attention + gated MLP), for the step-time prediction."""
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * spec.intermediate_size
    return (layers[1] - layers[0]) * per_layer * itemsize


def decide_for_stage(cfg: Any, layout: PoolLayout, spec: Any) -> SwapDecision:
    """The stage's figures for stages/swap_policy.decide_swap: one microbatch's KV at the longest sequence,
    the host <-> device bandwidth and a decode step's time (--swap-bandwidth / --swap-step-ms when given, else
    measured at start: a pinned copy, a device copy - the step predicted as its weight read), and how many
    microbatches the device holds (CUDA: free memory after the weights; CPU: all)."""
    import torch

    from stages.swap_policy import SwapDecision, decide_swap

    if cfg.swap_settled:  # auto, decided by the supervisor (its hosts' swap space follows that decision)
        return SwapDecision(cfg.swap == "on", cfg.swap_settled, "auto")
    size = cfg.microbatch_size
    microbatches = cfg.num_slots // size if size else 1
    mb_bytes = layout.num_layers * 2 * size * layout.max_seq_len * layout.row_bytes
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    common = dict(frames=cfg.swap_frames)
    if cfg.swap != "auto" or not cuda or microbatches <= cfg.swap_frames or not size:
        return decide_swap(cfg.swap, microbatches, None if not cuda else microbatches, mb_bytes, 0.0, 0.0,
                           **common)  # type: ignore[arg-type]
    weights = shard_weight_bytes(spec, (layout.first_layer, layout.first_layer + layout.num_layers),
                                 layout.dtype.itemsize)
    free, _ = torch.cuda.mem_get_info(device)
    fit = max(0, int((free * 0.9 - weights) // max(1, mb_bytes)))
    bw = cfg.swap_bandwidth * 1e9 or _bandwidth(device)
    step_s = cfg.swap_step_ms / 1e3 or weights / _device_bandwidth(device)
    torch.cuda.empty_cache()  # (the measurements' buffers: give them back before the pool and weights come)
    return decide_swap("auto", microbatches, fit, mb_bytes, bw, step_s, **common)  # type: ignore[arg-type]


async def open_swap(client: StreamerClient, index: int, logical: PoolLayout) -> tuple[str, bool]:
    """This stage's swap pool on its streamer (one slot per logical slot), re-attached if a predecessor left it:
    (its name, whether it existed). Raises StreamerError (CapacityError: the host's swap space is too small)."""
    from streamer.wire import POOL_SWAP

    name = f"swap-stage-{index}"
    got = await client.alloc_pool(name, POOL_SWAP, logical, exist_ok=True)
    log.info("[swap] swap pool %s %s (%d bytes)", name, "kept from the previous incarnation" if got.existed
             else "allocated", got.nbytes)
    return name, got.existed


async def open_receive(client: StreamerClient, index: int, logical: PoolLayout) -> tuple[str, bool]:
    """A swapping token stage's receive pool (disaggregation): the prompt stages push each prompt's KV there by
    logical slot (a swapping stage's own pool holds frames, not logical slots), and only this stage reads it, in the
    first step of each request that joined (stages/swap.py). A streamer pool (POOL_RECEIVE), so it outlives the
    stage like the swap pool; (its name, whether it existed). Raises StreamerError (CapacityError: the host's
    receive space is too small)."""
    from streamer.wire import POOL_RECEIVE

    name = f"recv-stage-{index}"
    got = await client.alloc_pool(name, POOL_RECEIVE, logical, exist_ok=True)
    log.info("[swap] receive pool %s %s (%d bytes)", name, "kept from the previous incarnation" if got.existed
             else "allocated", got.nbytes)
    return name, got.existed
