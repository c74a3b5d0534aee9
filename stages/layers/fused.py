"""Fused elementwise kernels for CUDA (Triton): RMSNorm with the residual add folded in, SiLU(gate)*up, and
rotary embedding of q/k with the new K/V written straight into the KV pool.

In eager PyTorch an RMSNorm is ~8 kernels and each pass re-reads the activations (a prefill of 8 x 1,000
tokens through an 8B model spends tens of ms on them; a decode step spends its launches). One kernel per
row here reads x (and the residual) once and writes the normed row (and the new residual) once.
Numerics follow Hugging Face: statistics in float32, the residual sum and the normed value rounded to the
model dtype where HF rounds them. Everywhere else (CPU, CI, no Triton) the same functions run as torch ops.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU machines and CI use the torch path below
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False


def _use_triton(x: torch.Tensor) -> bool:
    return HAVE_TRITON and x.is_cuda


if HAVE_TRITON:

    @triton.jit
    def _rms_kernel(X, R, W, Y, RO, D, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * D + cols, mask=m, other=0.0)
            h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded as a dtype add would be
            tl.store(RO + row * D + cols, h, mask=m)
        else:
            h = x
        hf = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        y = (hf * rstd).to(x.dtype).to(tl.float32) * w
        tl.store(Y + row * D + cols, y.to(x.dtype), mask=m)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, width, total, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < total
        row = offs // width
        col = offs % width
        g = tl.load(GU + row * 2 * width + col, mask=m, other=0.0)
        u = tl.load(GU + row * 2 * width + width + col, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # silu rounded, as torch's would be
        tl.store(OUT + offs, (act * u).to(g.dtype), mask=m)


if HAVE_TRITON:

    @triton.jit
    def _rope_cache_kernel(QKV, COS, SIN, POS, SLOT, Q, KC, VC, row_stride, heads, kv_heads, max_seq,
                           D: tl.constexpr, ROT: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        half: tl.constexpr = ROT // 2
        d = tl.arange(0, D)
        base = QKV + n * row_stride + h * D
        x = tl.load(base + d)
        if h < heads + kv_heads:  # q or k: rotate the first ROT dims (rotate_half layout, as in HF)
            pos = tl.load(POS + n)
            in_rot = d < ROT
            partner = tl.where(d < half, d + half, d - half)
            xp = tl.load(base + partner, mask=in_rot, other=0.0).to(tl.float32)
            c = tl.load(COS + pos * ROT + d, mask=in_rot, other=1.0).to(tl.float32)
            s = tl.load(SIN + pos * ROT + d, mask=in_rot, other=0.0).to(tl.float32)
            sign = tl.where(d < half, -1.0, 1.0)
            y = tl.where(in_rot, x.to(tl.float32) * c + sign * xp * s, x.to(tl.float32)).to(x.dtype)
        else:
            y = x
        if h < heads:
            tl.store(Q + (n * heads + h) * D + d, y)
        else:
            slot = tl.load(SLOT + n).to(tl.int64)
            pos = tl.load(POS + n).to(tl.int64)
            if h < heads + kv_heads:
                tl.store(KC + ((slot * max_seq + pos) * kv_heads + (h - heads)) * D + d, y)
            else:
                tl.store(VC + ((slot * max_seq + pos) * kv_heads + (h - heads - kv_heads)) * D + d, y)


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   token_slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int,
                   kv_heads: int, head_dim: int, rot_dim: int) -> torch.Tensor:
    """CUDA: qkv [N, (H + 2 kvH) * D] -> rotated q [N, H, D]; rotated k and v written into the caches
    ([slots, max_seq, kvH, D], contiguous) at (token_slots, positions). One kernel, one pass."""
    n = qkv.shape[0]
    qkv = qkv.contiguous()
    q = torch.empty(n, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if n:
        _rope_cache_kernel[(n, heads + 2 * kv_heads)](
            qkv, cos, sin, positions, token_slots, q, k_cache, v_cache, qkv.stride(0), heads, kv_heads,
            k_cache.shape[1], D=head_dim, ROT=rot_dim, num_warps=1 if head_dim <= 128 else 2)
    return q


def can_fuse_rope(qkv: torch.Tensor, k_cache: torch.Tensor, head_dim: int) -> bool:
    return _use_triton(qkv) and k_cache.is_contiguous() and head_dim & (head_dim - 1) == 0


def _torch_rms(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = h.dtype
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not _use_triton(x):
        return _torch_rms(x, weight, eps)
    x = x.contiguous()
    d = x.shape[-1]
    y = torch.empty_like(x)
    _rms_kernel[(x.numel() // d,)](x, x, weight, y, y, d, eps, HAS_RES=False, BLOCK=triton.next_power_of_2(d),
                                   num_warps=8 if d >= 2048 else 4)
    return y


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x)."""
    if not _use_triton(x):
        h = residual + x
        return _torch_rms(h, weight, eps), h
    x, residual = x.contiguous(), residual.contiguous()
    d = x.shape[-1]
    y, h = torch.empty_like(x), torch.empty_like(x)
    _rms_kernel[(x.numel() // d,)](x, residual, weight, y, h, d, eps, HAS_RES=True,
                                   BLOCK=triton.next_power_of_2(d), num_warps=8 if d >= 2048 else 4)
    return y, h


def silu_mul(gate_up: torch.Tensor, act=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """gate_up [N, 2I] (gate | up) -> act(gate) * up [N, I]; `act` other than SiLU runs in torch."""
    i = gate_up.shape[-1] // 2
    if act is not None or not _use_triton(gate_up):
        gate, up = gate_up.split([i, i], dim=-1)
        return (act or torch.nn.functional.silu)(gate) * up
    gate_up = gate_up.contiguous()
    n = gate_up.numel() // (2 * i)
    out = torch.empty((*gate_up.shape[:-1], i), dtype=gate_up.dtype, device=gate_up.device)
    total = n * i
    _silu_mul_kernel[(triton.cdiv(total, 1024),)](gate_up, out, i, total, BLOCK=1024, num_warps=4)
    return out
