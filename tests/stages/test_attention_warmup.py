"""The decode attention warm-up (stages/warmup.AttentionWarmup) runs what a decode graph's attention will run.

cuDNN compiles its attention per shape and strides, so the warm-up is worth something only if it hands `attend`
the same query layout, plan and pool views as the block does in a step: checked per family against a real
forward. It reads the pool and writes nothing, and it picks the graphs a restore's microbatches step first.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from stages.batch import SeqChunk
from stages.graphs import decode_key
from stages.kv_cache import KVPool
from stages.models import load_spec
from stages.runtime import ShardConfig, ShardRuntime, pool_layout
from stages.warmup import AttentionWarmup, first_step_keys
from tests.tiny_models import CONFIGS


def _queries_seen_by_attend(rt: ShardRuntime, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """(shape, strides, has ALiBi slopes) of every query the shard's blocks hand `attend` in one decode step."""
    seen: list[tuple] = []
    module = importlib.import_module(f"stages.models.{rt.family.name}")
    real = module.attend

    def spy(q, k_cache, v_cache, plan, scale, alibi_slopes=None):  # type: ignore[no-untyped-def]
        seen.append((tuple(q.shape), q.stride(), q.dtype, alibi_slopes is not None))
        return real(q, k_cache, v_cache, plan, scale, alibi_slopes=alibi_slopes)

    monkeypatch.setattr(module, "attend", spy)
    n = 3
    prompts = [SeqChunk(s, 0, 4) for s in range(n)]
    rt.forward(prompts, rt.embed_input([5] * 4 * n))
    seen.clear()
    rt.forward([SeqChunk(s, 4, 1) for s in range(n)], rt.embed_input([7] * n))
    return seen


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # (CUDA: fused kernels)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_attention_inputs_are_laid_out_as_each_block_hands_them(family: str, device: str,  # type: ignore[no-untyped-def]
                                                                  model_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    dtype = "float32" if device == "cpu" else "bfloat16"
    rt = ShardRuntime(ShardConfig(model_factory(family), None, 4, 32, dtype, device))
    seen = _queries_seen_by_attend(rt, monkeypatch)
    assert len(seen) >= len(rt.layers)  # (CUDA: a graph's warm-up and capture call it too)
    for got in seen:  # (CUDA: a graph pads the step's 3 rows to 4)
        q, slopes = rt.family.attention_inputs(rt.spec, got[0][0], rt.dtype, rt.device)
        assert got == (tuple(q.shape), q.stride(), q.dtype, slopes is not None)


def _warmup(path, slots: int = 8, range_size: int = 4, bucket: int = 16,  # type: ignore[no-untyped-def]
            max_seq: int = 120) -> AttentionWarmup:
    shard = ShardConfig(path, None, slots, max_seq, "float32", "cpu", range_size=range_size, graph_bucket=bucket)
    family, spec = load_spec(path)
    pool = KVPool(pool_layout(shard))
    torch.manual_seed(0)
    pool.data.normal_()
    return AttentionWarmup(family, spec, pool, range_size, bucket)


def test_keys_are_the_graphs_a_restore_steps_first(model_factory) -> None:  # type: ignore[no-untyped-def]
    w = _warmup(model_factory("opt"))
    # range 0: all four slots live, the longest at 13 tokens (its next step reads 14 keys: the 16 bucket; 8 tokens
    # on it reads 22: the 32 bucket); range 1: one live slot at 20 tokens (a padded batch of 1, 32 keys either way)
    lengths = [10, 11, 12, 13, 0, 20, 0, 0]
    assert w.keys(lengths) == [("range", 0, 16), ("range", 0, 32), ("batch", 1, 32)]
    assert w.keys(lengths, ahead=0) == [("range", 0, 16), ("batch", 1, 32)]
    # each is the graph a step of those slots selects (range 1 at slot 4 on: the same layout as at slot 0)
    assert decode_key([SeqChunk(s, n, 1) for s, n in enumerate(lengths[:4])], 4, 16, 120, 8) == ("range", 0, 16)
    assert decode_key([SeqChunk(5, 20, 1)], 4, 16, 120, 8) == ("batch", 1, 32)
    # with swapping, lengths run past the pool's slots: their ranges compute in frames of the same size
    assert w.keys(lengths + [30, 31, 32, 33], ahead=0) == [("range", 0, 16), ("batch", 1, 32), ("range", 0, 48)]
    assert w.keys([0] * 8) == []
    # the graphs a restored stage captures ahead: at the ranges' own slots (range 1 holds one slot: a batch)
    assert first_step_keys(lengths, 4, 16, 120, 8, ahead=0) == [("range", 0, 16), ("batch", 1, 32)]
    assert first_step_keys([0] * 4 + [30, 31, 32, 33], 4, 16, 120, 8) == [("range", 4, 48)]
    assert first_step_keys([0] * 4 + [30, 31, 32, 40], 4, 16, 120, 8) == [("range", 4, 48), ("range", 4, 64)]
    # what is warmed is not warmed again
    w.warm(("range", 0, 16))
    assert w.keys(lengths, ahead=0) == [("batch", 1, 32)]


@pytest.mark.parametrize("family", ["llama", "mistral", "bloom", "opt"])  # GQA, sliding window, ALiBi, MHA
def test_warm_reads_the_pool_and_writes_nothing(family: str, model_factory) -> None:  # type: ignore[no-untyped-def]
    w = _warmup(model_factory(family))
    before = w.pool.data.clone()
    for key in [("range", 4, 48), ("batch", 2, 16), ("batch", 8, 120)]:
        assert w.warm(key) >= 0.0
    assert torch.equal(w.pool.data, before)
    assert w.keys([0, 0, 0, 0, 40, 41, 42, 43], ahead=0) == []  # warmed at slot 4: the same layout as any range
    assert w.keys([100], ahead=0) == [("batch", 1, 112)]
