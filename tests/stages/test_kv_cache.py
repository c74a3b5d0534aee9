"""The KV pool and its region API (what the streaming library builds on): read/write round trips over random
regions and dtypes, `pieces()` byte-identical to `read()`, per-layer slices, bad regions, zero-initialisation,
caller-owned pool memory, and a cache moved between runtimes with read/write that decodes as if never moved."""

from __future__ import annotations

import random

import pytest
import torch

from stages.batch import SeqChunk
from stages.errors import InvalidRequestError
from stages.generate import LocalPipeline
from stages.kv_cache import KVPool
from stages.runtime import ShardConfig, ShardRuntime
from streamer.layout import PoolLayout, Region

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _layout(dtype: torch.dtype = torch.float32) -> PoolLayout:
    # first_layer 3: regions use global layer ids
    return PoolLayout(first_layer=3, num_layers=4, num_slots=5, max_seq_len=16, kv_heads=2, head_dim=8, dtype=dtype)


def _filled_pool(dtype: torch.dtype, seed: int = 0) -> KVPool:
    pool = KVPool(_layout(dtype))
    pool.data.copy_(torch.randn(pool.data.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def _random_region(rng: random.Random, layout: PoolLayout) -> Region:
    slots = rng.sample(range(layout.num_slots), rng.randint(1, layout.num_slots))  # any order
    a = rng.randrange(layout.first_layer, layout.first_layer + layout.num_layers)
    b = rng.randint(a + 1, layout.first_layer + layout.num_layers)
    tokens = []
    for _ in slots:
        t0 = rng.randint(0, layout.max_seq_len)
        tokens.append((t0, rng.randint(t0, layout.max_seq_len)))  # empty ranges allowed
    return Region(tuple(slots), (a, b), tuple(tokens))


def _reference_read(pool: KVPool, region: Region) -> torch.Tensor:
    """Packed order by definition: layer, then K before V, then slots in region order, tokens in order."""
    first = pool.layout.first_layer
    per_layer = []
    for layer in range(*region.layers):
        kv = []
        for which in (0, 1):
            parts = [pool.data[layer - first, which, s, t0:t1] for s, (t0, t1) in zip(region.slots, region.tokens)]
            kv.append(torch.cat(parts))
        per_layer.append(torch.stack(kv))
    return torch.stack(per_layer)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_matches_the_definition(dtype: torch.dtype) -> None:
    pool = _filled_pool(dtype)
    rng = random.Random(1)
    for _ in range(30):
        region = _random_region(rng, pool.layout)
        got = pool.read(region)
        assert got.shape == region.packed_shape(pool.layout) and got.dtype == dtype
        assert torch.equal(got, _reference_read(pool, region))
        buffer = torch.full(region.packed_shape(pool.layout), 7.0, dtype=dtype)
        assert pool.read(region, out=buffer) is buffer
        assert torch.equal(buffer, got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_then_read_round_trips_and_touches_nothing_else(dtype: torch.dtype) -> None:
    pool = _filled_pool(dtype, seed=2)
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(4)
    for _ in range(30):
        region = _random_region(rng, pool.layout)
        before = pool.data.clone()
        packed = torch.randn(region.packed_shape(pool.layout), generator=gen).to(dtype)
        pool.write(region, packed)
        assert torch.equal(pool.read(region), packed)
        # outside the region nothing changed: writing the old values back restores the whole pool
        pool.write(region, _reference_read(KVPool(pool.layout, before), region))
        assert torch.equal(pool.data, before)


def test_write_converts_and_moves_the_source() -> None:
    pool = KVPool(_layout(torch.bfloat16))
    region = Region.uniform([1, 3], (4, 6), 2, 5)
    packed = torch.randn(region.packed_shape(pool.layout))  # float32 in, stored as bf16
    pool.write(region, packed)
    assert torch.equal(pool.read(region), packed.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pieces_agree_with_read_byte_for_byte(dtype: torch.dtype) -> None:
    pool = _filled_pool(dtype, seed=5)
    flat = pool.data.view(torch.uint8).reshape(-1)
    rng = random.Random(6)
    for _ in range(30):
        region = _random_region(rng, pool.layout)
        pieces = pool.pieces(region)
        assert all(n > 0 for _, n in pieces)
        assert sum(n for _, n in pieces) == region.nbytes(pool.layout)
        gathered = b"".join(_bytes(flat[o : o + n]) for o, n in pieces)
        assert gathered == _bytes(pool.read(region))
        # layer l of the region is one contiguous slice of the packed bytes
        packed = _bytes(pool.read(region))
        for layer in range(*region.layers):
            lo, hi = region.layer_slice(pool.layout, layer)
            assert packed[lo:hi] == _bytes(pool.read(region.sub_layers(layer, layer + 1)))


def test_one_sequence_layer_is_one_contiguous_run() -> None:
    """Token-major per slot: the first n tokens of a sequence are one piece per (layer, K|V)."""
    pool = KVPool(_layout())
    region = Region.uniform([2], (3, 7), 0, 11)
    pieces = pool.pieces(region)
    assert len(pieces) == 4 * 2
    assert all(n == 11 * pool.layout.row_bytes for _, n in pieces)


@pytest.mark.parametrize(
    "region,message",
    [
        (Region.uniform([0], (2, 4), 0, 1), r"layers \[2, 4\) outside"),  # below first_layer
        (Region.uniform([0], (6, 8), 0, 1), r"layers \[6, 8\) outside"),  # past the last layer
        (Region.uniform([0], (4, 4), 0, 1), "outside"),  # empty layer range
        (Region.uniform([5], (3, 4), 0, 1), "slot 5 outside"),
        (Region.uniform([-1], (3, 4), 0, 1), "slot -1 outside"),
        (Region.uniform([1, 1], (3, 4), 0, 1), "slot twice"),
        (Region((), (3, 4), ()), "at least one slot"),
        (Region((0, 1), (3, 4), ((0, 1),)), "one token range per slot"),
        (Region.uniform([0], (3, 4), 3, 2), r"tokens \[3, 2\) outside"),
        (Region.uniform([0], (3, 4), 0, 17), r"tokens \[0, 17\) outside"),
        (Region.uniform([0], (3, 4), -1, 2), r"tokens \[-1, 2\) outside"),
    ],
)
def test_bad_regions_raise(region: Region, message: str) -> None:
    pool = _filled_pool(torch.float32)
    before = pool.data.clone()
    for call in (lambda: pool.read(region), lambda: pool.pieces(region),
                 lambda: pool.write(region, torch.zeros(0))):
        with pytest.raises(InvalidRequestError, match=message):
            call()
    assert torch.equal(pool.data, before)


def test_write_with_the_wrong_size_raises() -> None:
    pool = KVPool(_layout())
    region = Region.uniform([0, 1], (3, 5), 0, 4)
    n = region.nbytes(pool.layout) // 4
    with pytest.raises(InvalidRequestError, match="packed KV has"):
        pool.write(region, torch.zeros(n - 1))
    pool.write(region, torch.ones(n))  # any shape with the right element count
    assert pool.read(region).eq(1).all()


def test_pool_is_zero_initialised_and_can_use_caller_memory(model_factory) -> None:  # type: ignore[no-untyped-def]
    assert KVPool(_layout(torch.bfloat16)).data.eq(0).all()
    rt = ShardRuntime(ShardConfig(model_factory("llama"), (1, 3), num_slots=3, max_seq_len=20))
    assert rt.pool.data.shape == rt.layout.shape == (2, 2, 3, 20, 2, 16)
    assert rt.pool.data.eq(0).all()
    assert rt.pool.data.nbytes == rt.layout.nbytes

    memory = torch.full(rt.layout.shape, 5.0)
    with pytest.raises(ValueError, match="pool memory has shape"):
        KVPool(rt.layout, memory[:1])
    shared = ShardRuntime(ShardConfig(model_factory("llama"), (1, 3), num_slots=3, max_seq_len=20), memory)
    assert shared.pool.data.data_ptr() == memory.data_ptr()
    shared.forward([SeqChunk(1, 0, 4)], torch.randn(4, 72))
    written = shared.pool.read(Region.uniform([1], (1, 3), 0, 4))
    assert not written.eq(5).any()  # the step wrote its 4 tokens into the caller's memory
    untouched = memory.clone()
    untouched[:, :, 1, :4] = 5.0
    assert untouched.eq(5).all(), "a prompt pass writes only its slot's first tokens"


def test_moved_cache_decodes_like_the_original(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Prefill on one 2-stage pipeline, move each stage's layers of the cache to another pipeline's other
    slot with read/write (what disaggregation does), decode there: same logits as decoding in place."""
    path = model_factory("llama")
    prompt = [5, 17, 42, 99, 3, 8, 150, 77, 12]
    src = LocalPipeline(path, 2, num_slots=2, max_seq_len=32)
    dst = LocalPipeline(path, 2, num_slots=4, max_seq_len=32)
    src.step([SeqChunk(0, 0, len(prompt))], prompt)
    for s, d in zip(src.shards, dst.shards):
        layers = (s.layers.start, s.layers.stop)
        d.pool.write(Region.uniform([3], layers, 0, len(prompt)), s.pool.read(Region.uniform([0], layers, 0, len(prompt))))
    here = src.step([SeqChunk(0, len(prompt), 1)], [33])
    there = dst.step([SeqChunk(3, len(prompt), 1)], [33])
    torch.testing.assert_close(there, here, rtol=0, atol=1e-6)
    unmoved = dst.step([SeqChunk(2, len(prompt), 1)], [33])  # an empty slot: the cache did matter
    assert not torch.allclose(unmoved, here, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "opt", "bloom"])
def test_kv_hooks_fire_once_a_layers_kv_is_final_before_its_block_ends(family: str, model_factory) -> None:  # type: ignore[no-untyped-def]
    """DecoderShard.kv_hooks (streamer.client.attach_kv_hooks): hook j runs after block j wrote its KV of the step
    and before block j's output exists; the KV it sees is already what the pass leaves; the hooks change no
    output, and a removed hook is not called again."""
    from streamer.client import attach_kv_hooks

    path = model_factory(family)
    rt = ShardRuntime(ShardConfig(path, (1, 3), num_slots=2, max_seq_len=24))
    ref = ShardRuntime(ShardConfig(path, (1, 3), num_slots=2, max_seq_len=24))
    first = rt.layout.first_layer
    chunks = [SeqChunk(0, 0, 7), SeqChunk(1, 0, 5)]
    x = torch.randn(12, rt.spec.hidden_size, generator=torch.Generator().manual_seed(3))
    events: list[tuple[str, int]] = []
    seen: dict[int, torch.Tensor] = {}

    def on_kv(j: int) -> None:
        events.append(("kv", j))
        seen[j] = rt.pool.read(Region((0, 1), (first + j, first + j + 1), ((0, 7), (0, 5)))).clone()

    handles = attach_kv_hooks(rt.shard, on_kv)
    ends = [b.register_forward_hook(lambda *_, j=j: events.append(("end", j))) for j, b in enumerate(rt.shard.blocks)]
    out = rt.forward(chunks, x)
    assert events == [("kv", 0), ("end", 0), ("kv", 1), ("end", 1)]
    for j in (0, 1):
        final = rt.pool.read(Region((0, 1), (first + j, first + j + 1), ((0, 7), (0, 5))))
        assert torch.equal(seen[j], final) and final.abs().sum() > 0
    assert torch.equal(out, ref.forward(chunks, x))
    for h in handles + ends:
        h.remove()
    events.clear()
    rt.forward([SeqChunk(0, 7, 1)], x[:1])
    assert events == [] and rt.shard.kv_hooks == []
