"""CUDA-graph decode equals eager decode (and HF greedy) for every family, in range and batch mode."""

from __future__ import annotations

import pytest
import torch

from stages.batch import SeqChunk
from stages.layers.sampling import SamplingParams, sample
from stages.runtime import ShardConfig, ShardRuntime
from tests.tiny_models import CONFIGS

pytestmark = pytest.mark.gpu


def _decode(path, graphs: bool, live: list[int], steps: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    rt = ShardRuntime(ShardConfig(path, None, 8, 120, "float32", "cuda", cuda_graphs=graphs, range_size=4,
                                  graph_bucket=16))
    g = torch.Generator().manual_seed(0)
    prompts = {s: torch.randint(3, 150, (5 + 7 * s,), generator=g).tolist() for s in live}
    logits = rt.forward([SeqChunk(s, 0, len(p)) for s, p in prompts.items()],
                        rt.embed_input([t for p in prompts.values() for t in p]))
    out = {s: [] for s in live}
    lengths = {s: len(p) for s, p in prompts.items()}
    for _ in range(steps):
        toks = sample(logits, [SamplingParams()] * len(live), [lengths[s] for s in live]).tolist()
        for s, t in zip(live, toks):
            out[s].append(t)
        logits = rt.forward([SeqChunk(s, lengths[s], 1) for s in live], rt.embed_input(toks))
        for s in live:
            lengths[s] += 1
    if graphs:
        assert rt.graphs is not None and rt.graphs.graphs, "graphs were used"
    return [out[s] for s in live]


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("live", [[4, 5, 6, 7], [1, 6], [3]], ids=["range", "batch", "single"])
def test_graph_decode_equals_eager(family: str, live: list[int], model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory(family)
    steps = 40  # keys cross several 16-token buckets
    assert _decode(path, True, live, steps) == _decode(path, False, live, steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_torch(dtype: torch.dtype) -> None:
    from stages.layers import fused

    if not fused.HAVE_TRITON:
        pytest.skip("no Triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 4096, device="cuda", dtype=dtype, generator=g)
    r = torch.randn(37, 4096, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(4096, device="cuda", dtype=dtype, generator=g)
    y, h = fused.add_rms_norm(x, r, w, 1e-5)
    ref_h = r + x
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(h, ref_h, **tol)
    torch.testing.assert_close(y, fused._torch_rms(ref_h, w, 1e-5), **tol)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), fused._torch_rms(x, w, 1e-5), **tol)
    gu = torch.randn(37, 2 * 1000, device="cuda", dtype=dtype, generator=g)
    torch.testing.assert_close(fused.silu_mul(gu), torch.nn.functional.silu(gu[:, :1000]) * gu[:, 1000:], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot", [128, 64])
def test_fused_rope_and_cache_matches_torch(dtype: torch.dtype, rot: int) -> None:
    from stages.layers import fused
    from stages.layers.rotary import Rotary

    if not fused.HAVE_TRITON:
        pytest.skip("no Triton")
    heads, kv_heads, d, n, slots, seq = 8, 2, 128, 50, 6, 300
    dev = torch.device("cuda")
    r = Rotary(d, rot, seq, 10000.0, None, dtype, dev)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, device=dev, dtype=dtype)
    pos = torch.randint(0, seq, (n,), device=dev)
    slot = torch.randint(0, slots, (n,), device=dev)
    uniq = {}
    for i, (s, p) in enumerate(zip(slot.tolist(), pos.tolist())):
        uniq[(s, p)] = i
    keep = torch.tensor(sorted(uniq.values()), device=dev)
    qkv, pos, slot = qkv[keep], pos[keep], slot[keep]
    n = qkv.shape[0]
    kc = torch.zeros(slots, seq, kv_heads, d, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    q = fused.rope_and_cache(qkv, r.cos, r.sin, pos, slot, kc, vc, heads, kv_heads, d, rot)
    qr, kr, vr = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    kc2.index_put_((slot, pos), r.apply(kr.reshape(n, kv_heads, d), pos))
    vc2.index_put_((slot, pos), vr.reshape(n, kv_heads, d))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(q, r.apply(qr.reshape(n, heads, d), pos), **tol)
    torch.testing.assert_close(kc, kc2, **tol)
    torch.testing.assert_close(vc, vc2, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["decode", "all", "off"])
def test_cudnn_attention_mode_decides_where_sdpa_may_use_cudnn(mode: str, model_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """"decode": prompt chunks run with cuDNN's SDPA backend disabled (per-shape run-time compiles), decode
    tokens with it enabled; "all" / "off": enabled / disabled for both."""
    from stages.layers import attention

    seen: list[tuple[str, bool]] = []
    phase = ["prompt"]
    real = attention.F.scaled_dot_product_attention

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((phase[0], torch.backends.cuda.cudnn_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    try:
        rt = ShardRuntime(ShardConfig(model_factory("llama"), None, 2, 64, "bfloat16", "cuda", cuda_graphs=False,
                                      cudnn_attention=mode))
        rt.forward([SeqChunk(0, 0, 9), SeqChunk(1, 0, 5)], rt.embed_input(list(range(3, 17))))
        phase[0] = "decode"
        rt.forward([SeqChunk(0, 9, 1), SeqChunk(1, 5, 1)], rt.embed_input([5, 6]))
    finally:
        attention.set_cudnn_attention("all")
    expect = {"decode": (False, True), "all": (True, True), "off": (False, False)}[mode]
    assert {p for p, _ in seen} == {"prompt", "decode"}
    assert all(on == expect[0] for p, on in seen if p == "prompt")
    assert all(on == expect[1] for p, on in seen if p == "decode")
