"""Attention over the KV pool for one step (any mix of prompt chunks and decode tokens).

New keys/values are first written into the pool at (slot, position); each attention group then reads its
sequences' keys straight from the pool — a view, no copy, when the group's slots are consecutive, which is
how the scheduler hands out microbatch slots. Grouped-query attention uses SDPA's `enable_gqa`, so K/V are
never repeated in memory.

cuDNN (CUDA): SDPA's cuDNN backend compiles a kernel for each new shape at run time, and loading it waits for
the whole device. Decode shapes repeat (and decode graphs are captured once), prompt shapes keep changing.
Modes (set_cudnn_attention): "all" (default) lets SDPA choose everywhere; "decode" runs prompt chunks on the
precompiled flash / memory-efficient / math kernels and lets decode tokens use cuDNN; "off" never uses cuDNN.
The default stays "all" until a measurement favours another (bench/NOTES.md, session 5: no difference beyond
run-to-run noise with fixed-length prompts; whether flash or efficient take every masked grouped-query prompt
group, or some fall to math, is not checked on a GPU).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from stages.batch import AttnGroup, StepPlan

CUDNN_ATTENTION_MODES = ("all", "decode", "off")
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_prompt_without_cudnn = False  # set per process by set_cudnn_attention (a stage process runs one shard)
_NO_CONTEXT = contextlib.nullcontext()  # reusable: no object per attention call


def set_cudnn_attention(mode: str) -> None:
    """Where SDPA may use cuDNN in this process (CUDA): see the module docstring."""
    global _prompt_without_cudnn
    if mode not in CUDNN_ATTENTION_MODES:
        raise ValueError(f"cudnn_attention must be one of {', '.join(CUDNN_ATTENTION_MODES)}, got {mode!r}")
    torch.backends.cuda.enable_cudnn_sdp(mode != "off")
    _prompt_without_cudnn = mode == "decode"


_listener = threading.local()


@contextlib.contextmanager
def kv_listener(fn: Callable[[], None]) -> Iterator[None]:
    """While the block that runs inside this context writes its layer's keys/values for the step, `fn` is called
    right after the write (kv_written): from there on the layer's KV of this step is final - attention only
    reads it - so a transfer of it may start while the layer's attention and MLP still compute."""
    prev = getattr(_listener, "fn", None)
    _listener.fn = fn
    try:
        yield
    finally:
        _listener.fn = prev


def kv_written() -> None:
    """Every KV write site calls this after writing a layer's keys/values of the step (write_kv does)."""
    fn = getattr(_listener, "fn", None)
    if fn is not None:
        fn()


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan
) -> None:
    """k_cache/v_cache [slots, max_seq, kv_heads, head_dim]; k/v [N, kv_heads, head_dim]."""
    index = (plan.token_slots, plan.positions)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)
    kv_written()


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: StepPlan,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [N, heads, head_dim] -> [N, heads * head_dim], attending over the cache (already holding this step)."""
    n, heads, head_dim = q.shape
    gqa = heads != k_cache.shape[2]
    if len(plan.groups) == 1 and plan.groups[0].view_shape is not None:
        g = plan.groups[0]
        qg = q.view(g.batch, g.width, heads, head_dim)
        return _sdpa(qg, k_cache, v_cache, g, scale, alibi_slopes, gqa).reshape(n, heads * head_dim)
    out = q.new_empty(n, heads * head_dim)
    for g in plan.groups:
        assert g.rows is not None and g.pad_index is not None and g.out_rows is not None
        qg = q[g.rows]  # [B, T, H, D]
        og = _sdpa(qg, k_cache, v_cache, g, scale, alibi_slopes, gqa).reshape(g.batch * g.width, -1)
        out.index_copy_(0, g.out_rows, og.index_select(0, g.pad_index))
    return out


def _sdpa(
    qg: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    g: AttnGroup,
    scale: float,
    alibi_slopes: torch.Tensor | None,
    gqa: bool,
) -> torch.Tensor:
    """qg [B, T, H, D] -> [B, T, H, D]."""
    k = k_cache[g.kv_slots, : g.kv_len].transpose(1, 2)  # [B, kvH, L, D]
    v = v_cache[g.kv_slots, : g.kv_len].transpose(1, 2)
    mask: torch.Tensor | None
    causal = g.causal
    if alibi_slopes is not None:
        mask, causal = g.additive_bias(alibi_slopes), False
    else:
        mask = g.mask
    b, t, heads, d = qg.shape
    kv_heads = k.shape[1]
    if gqa and t == 1 and alibi_slopes is None:
        # Decode with grouped-query attention: the `heads // kv_heads` query heads that share a KV head
        # become that head's query rows, [B, kvH, group, D] — plain attention with no K/V repetition and
        # no GQA support needed from the SDPA backend (query head h uses KV head h // group, as in HF).
        q = qg.view(b, kv_heads, heads // kv_heads, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # mask [B,1,1,L] broadcasts
        return o.reshape(b, 1, heads, d)
    no_cudnn = _prompt_without_cudnn and t > 1 and qg.is_cuda
    with sdpa_kernel(_NO_CUDNN) if no_cudnn else _NO_CONTEXT:
        o = F.scaled_dot_product_attention(
            qg.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
    return o.transpose(1, 2)
