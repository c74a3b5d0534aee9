"""Region arithmetic: chunk plans, contiguous runs, 2-D DMA blocks, routes split by layer."""

from __future__ import annotations

import random

import pytest
import torch

from streamer import wire
from streamer.errors import BadRequestError
from streamer.layout import PoolLayout, Region, region_pieces, region_rows
from streamer.regions import (
    Block,
    check_compatible,
    common_runs,
    direct_worthwhile,
    dma_blocks,
    layout_from_spec,
    layout_to_spec,
    pair_blocks,
    plan_chunks,
    plan_direct,
    region_from_spec,
    region_to_spec,
    routes_by_layer,
)
from tests.streamer.helpers import fill_random, random_layout, random_region

LAYOUT = PoolLayout(4, 6, 5, 32, 2, 8, torch.float16)  # row = 32 bytes


def test_spec_round_trip() -> None:
    r = Region((3, 0), (5, 8), ((1, 4), (0, 32)))
    assert region_from_spec(region_to_spec(r)) == r
    assert layout_from_spec(layout_to_spec(LAYOUT)) == LAYOUT
    with pytest.raises(BadRequestError):
        layout_from_spec(wire.LayoutSpec(0, 1, 1, 1, 1, 1, "int7"))
    with pytest.raises(BadRequestError):
        region_from_spec(wire.RegionSpec([0], [1], [[0, 1]]))


@pytest.mark.parametrize("layered", [False, True])
def test_chunks_cover_every_row_once(layered: bool) -> None:
    region = Region((0, 2, 4), (5, 9), ((0, 7), (3, 3), (10, 30)))
    per_layer = 2 * region.tokens_total
    chunks = plan_chunks(region, LAYOUT.row_bytes, 10 * LAYOUT.row_bytes, layered)
    rows = [r for c in chunks for r in range(c.r0, c.r1)]
    assert rows == list(range(per_layer * region.num_layers))
    assert all(c.rows <= 10 for c in chunks)
    done = [x for c in chunks for x in c.completes]
    assert done == list(range(5, 9))  # each layer reported complete once, in order
    if layered:  # never across a layer boundary, and `layer` is the layer of every row
        assert all(c.r0 // per_layer == (c.r1 - 1) // per_layer == c.layer - 5 for c in chunks)
    else:  # `layer` = the last layer a chunk touches (what a GPU source must have computed)
        assert all(c.layer == 5 + (c.r1 - 1) // per_layer for c in chunks)


def test_common_runs_are_the_naive_pieces() -> None:
    src = Region((1, 3), (4, 6), ((0, 5), (2, 9)))
    dst = Region((2, 0), (6, 8), ((10, 15), (0, 7)))
    lay = PoolLayout(4, 6, 5, 32, 2, 8, torch.float16)
    runs = common_runs(region_rows(lay, src), region_rows(lay, dst)).tolist()
    rb = lay.row_bytes
    assert [(s * rb, k * rb) for s, _, k in runs] == region_pieces(lay, src)
    assert [(d * rb, k * rb) for _, d, k in runs] == region_pieces(lay, dst)


def emulate_dma(pool: torch.Tensor, idx: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """What the cudaMemcpy2DAsync blocks would gather from `pool` (flat bytes), done with strided views."""
    out = torch.empty(idx.numel() * row_bytes, dtype=torch.uint8)
    for b in dma_blocks(idx, row_bytes):
        src = pool.as_strided((b.height, b.width), (b.pitch, 1), b.pool_off)
        out[b.packed_off: b.packed_off + b.height * b.width].view(b.height, b.width).copy_(src)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_dma_blocks_match_index_gather(seed: int) -> None:
    rng = random.Random(seed)
    lay = random_layout(rng, torch.bfloat16)
    pool = fill_random(torch.empty(lay.nbytes, dtype=torch.uint8), seed)
    region = random_region(rng, lay)
    idx = region_rows(lay, region)
    rows = pool.view(-1, lay.row_bytes)
    assert torch.equal(emulate_dma(pool, idx, lay.row_bytes), rows.index_select(0, idx).reshape(-1))


def test_whole_pool_slot_range_is_one_block() -> None:
    """All slots, one token range: any number of layers is a single 2-D copy (host pools at full speed)."""
    lay = PoolLayout(0, 16, 8, 1024, 8, 128, torch.bfloat16)
    region = Region.uniform(range(8), (0, 16), 0, 1000)
    blocks = dma_blocks(region_rows(lay, region), lay.row_bytes)
    assert len(blocks) == 1 and blocks[0].height == 16 * 2 * 8 and blocks[0].width == 1000 * lay.row_bytes
    step = Region.uniform(range(8), (0, 16), 500, 501)  # one decode step's new token
    assert len(dma_blocks(region_rows(lay, step), lay.row_bytes)) == 1


@pytest.mark.parametrize("seed", range(16))
def test_pair_blocks_copy_exactly_what_the_row_maps_say(seed: int) -> None:
    """Pool-to-pool 2-D blocks (the direct GPU path), computed from region geometry and emulated with strided
    views, move every packed row of the source region onto the matching row of the destination region (a
    different pool layout) and touch nothing else; also for a sub-range of the route's layers."""
    rng = random.Random(seed)
    lay = random_layout(rng, torch.float16)
    dlay = PoolLayout(lay.first_layer, lay.num_layers, lay.num_slots + 2, lay.max_seq_len + 3, lay.kv_heads,
                      lay.head_dim, lay.dtype)
    src_region = random_region(rng, lay)
    dst_region = random_region(rng, dlay, lens=[b - a for a, b in src_region.tokens], layers=src_region.layers)
    if rng.random() < 0.3:  # a slot with no tokens
        src_region = Region(src_region.slots, src_region.layers, ((3, 3),) + src_region.tokens[1:])
        dst_region = Region(dst_region.slots, dst_region.layers, ((0, 0),) + dst_region.tokens[1:])
    n = src_region.num_layers
    i = rng.randint(0, n - 1)
    j = rng.randint(i + 1, n)
    per_layer = 2 * src_region.tokens_total
    s_idx = region_rows(lay, src_region)[i * per_layer: j * per_layer]
    d_idx = region_rows(dlay, dst_region)[i * per_layer: j * per_layer]
    rb = lay.row_bytes
    blocks = pair_blocks(lay, src_region, dlay, dst_region, (i, j))
    assert sum(b.height for b in blocks) <= 2 * (j - i) * len(src_region.slots)
    src = fill_random(torch.empty(lay.nbytes, dtype=torch.uint8), seed)
    dst = fill_random(torch.empty(dlay.nbytes, dtype=torch.uint8), seed + 100)
    want = dst.clone().view(-1, rb)
    want.index_copy_(0, d_idx, src.view(-1, rb).index_select(0, s_idx))
    for b in blocks:
        assert b.src_pitch >= b.width and b.dst_pitch >= b.width
        dst.as_strided((b.height, b.width), (b.dst_pitch, 1), b.dst_off).copy_(
            src.as_strided((b.height, b.width), (b.src_pitch, 1), b.src_off))
    assert torch.equal(dst.view(-1, rb), want)


def test_direct_path_only_for_long_pieces() -> None:
    """A prompt layer of a microbatch is two blocks (K and V of every slot) and goes pool to pool; one decode
    step's rows are short pieces, left to the staging path; direct chunks are whole layers."""
    lay = PoolLayout(0, 16, 16, 1024, 8, 128, torch.bfloat16)
    layer = Region.uniform(range(8), (8, 9), 0, 1000)
    assert direct_worthwhile(layer, lay.row_bytes)
    assert [b.height for b in pair_blocks(lay, layer, lay, layer)] == [8, 8]
    step = Region.uniform(range(8), (0, 16), 1000, 1001)
    assert not direct_worthwhile(step, lay.row_bytes)
    swap = Region.uniform(range(8), (0, 16), 0, 1000)
    chunks = plan_direct(swap, lay.row_bytes, 64 << 20, layered=False)
    assert [c.completes for c in chunks] == [tuple(range(k, k + 2)) for k in range(0, 16, 2)]
    assert [c.layer for c in plan_direct(swap, lay.row_bytes, 64 << 20, layered=True)] == list(range(16))


def test_compatibility_checks() -> None:
    a = Region((0, 1), (4, 6), ((0, 5), (0, 7)))
    check_compatible(LAYOUT, a, LAYOUT, Region((3, 2), (8, 10), ((10, 15), (20, 27))))
    bad = [
        (LAYOUT, Region((3, 2), (8, 9), ((10, 15), (20, 27)))),  # layer count
        (LAYOUT, Region((3, 2), (8, 10), ((10, 15), (20, 26)))),  # token counts
        (PoolLayout(4, 6, 5, 32, 2, 8, torch.bfloat16), Region((0, 1), (4, 6), ((0, 5), (0, 7)))),  # dtype
        (LAYOUT, Region((0, 1), (4, 6), ((0, 5), (30, 37)))),  # outside the pool
    ]
    for lay, r in bad:
        with pytest.raises(BadRequestError):
            check_compatible(LAYOUT, a, lay, r)


def test_routes_by_layer_split_prompt_among_token_stages() -> None:
    region = Region.uniform((0, 1), (0, 10), 0, 100)
    tmpl = Region((5, 6), (0, 1), ((0, 100), (0, 100)))
    targets = [(wire.PoolRef("t0", "h1"), (0, 4), tmpl), (wire.PoolRef("t1", "h2"), (4, 7), tmpl),
               (wire.PoolRef("t2", "h3"), (7, 10), tmpl)]
    routes = routes_by_layer(region, targets)
    assert [r.src_layers for r in routes] == [[0, 4], [4, 7], [7, 10]]
    assert [r.region.layers for r in routes] == [[0, 4], [4, 7], [7, 10]]
    assert routes[1].dst == wire.PoolRef("t1", "h2") and routes[1].region.slots == [5, 6]
    with pytest.raises(BadRequestError):
        routes_by_layer(region, targets[:2])


@pytest.mark.parametrize("seed", range(24))
def test_direct_plans_reused_across_layers_match_fresh_plans(seed: int) -> None:
    """engine.direct_plan plans a region shape once and moves it to each route's layers: for random shapes, pool
    layouts whose first layers differ, and layered or whole plans, the moved plan equals one made from scratch
    for those exact layers (chunks, and blocks byte for byte) - asked in an order that warms the cache first
    with other layers of the same shape."""
    from streamer.engine import DIRECT_CHUNK_BYTES, direct_plan

    rng = random.Random(seed)
    lay = random_layout(rng, torch.bfloat16, first_layer=rng.randint(0, 4), num_layers=rng.randint(2, 6))
    dlay = PoolLayout(rng.randint(0, 9), lay.num_layers + rng.randint(0, 3), lay.num_slots + rng.randint(0, 2),
                      lay.max_seq_len + rng.randint(0, 5), lay.kv_heads, lay.head_dim, lay.dtype)
    n = rng.randint(1, lay.num_layers)
    shape = random_region(rng, lay, layers=(lay.first_layer, lay.first_layer + n))
    dshape = random_region(rng, dlay, lens=[b - a for a, b in shape.tokens], layers=(dlay.first_layer, dlay.first_layer + n))
    chunk_bytes, layered = rng.choice([1, DIRECT_CHUNK_BYTES]), rng.random() < 0.5
    offsets = [(a, b) for a in range(lay.num_layers - n + 1) for b in range(dlay.num_layers - n + 1)]
    rng.shuffle(offsets)
    for da, db in offsets:
        region = shape.sub_layers(lay.first_layer + da, lay.first_layer + da + n)
        dst_region = dshape.sub_layers(dlay.first_layer + db, dlay.first_layer + db + n)
        chunks, blocks = direct_plan(lay, region, dlay, dst_region, chunk_bytes, layered)
        want = plan_direct(region, lay.row_bytes, max(chunk_bytes, DIRECT_CHUNK_BYTES), layered)
        a = region.layers[0]
        assert chunks == want
        assert blocks == [pair_blocks(lay, region, dlay, dst_region, (c.completes[0] - a, c.completes[-1] + 1 - a))
                          for c in want]


def gather_by_blocks(pool: torch.Tensor, blocks: list[Block], nbytes: int) -> torch.Tensor:
    """What the cudaMemcpy2DAsync blocks would gather from `pool` (flat bytes) into a packed chunk, done with
    strided views (either side pitched)."""
    out = torch.zeros(nbytes, dtype=torch.uint8)
    for b in blocks:
        assert b.pitch >= b.width and b.packed_step >= b.width
        out.as_strided((b.height, b.width), (b.packed_step, 1), b.packed_off).copy_(
            pool.as_strided((b.height, b.width), (b.pitch, 1), b.pool_off))
    return out


@pytest.mark.parametrize("seed", range(16))
def test_chunk_blocks_reused_across_layers_move_the_chunk_rows(seed: int) -> None:
    """regions.region_blocks (the DMA blocks of a chunk to or from a peer streamer, planned once per region
    shape and chunk range, cut by slot or by the row map's runs) gathers exactly the chunk's rows, for random
    shapes, layers and row ranges (whole halves among them) - None exactly when neither cut is long enough."""
    from streamer.regions import long_blocks, region_blocks, slot_major_blocks

    rng = random.Random(seed)
    lay = random_layout(rng, torch.bfloat16, first_layer=rng.randint(0, 3), num_layers=rng.randint(2, 5),
                        max_seq=rng.choice([40, 600]), kv_heads=8, head_dim=64)
    pool = fill_random(torch.empty(lay.nbytes, dtype=torch.uint8), seed)
    rows = pool.view(-1, lay.row_bytes)
    n = rng.randint(1, lay.num_layers)
    shape = random_region(rng, lay, layers=(lay.first_layer, lay.first_layer + n))
    half = shape.tokens_total
    total = 2 * half * n
    h0 = rng.randint(0, 2 * n - 1)
    ranges = [(0, total), (rng.randint(0, total - 1), total), (h0 * half, rng.randint(h0 + 1, 2 * n) * half)]
    for a in rng.sample(range(lay.num_layers - n + 1), lay.num_layers - n + 1):
        region = shape.sub_layers(lay.first_layer + a, lay.first_layer + a + n)
        idx = region_rows(lay, region)
        for r0, r1 in ranges:
            got = region_blocks(lay, region, r0, r1)
            if got is None:
                assert long_blocks(idx[r0:r1], lay.row_bytes) is None
                assert slot_major_blocks(lay, region.slots, region.tokens, r0, r1) is None
                continue
            want = rows.index_select(0, idx[r0:r1]).reshape(-1)
            assert torch.equal(gather_by_blocks(pool, got, want.numel()), want)


def test_decode_step_rows_go_by_dma_a_block_per_slot() -> None:
    """A decode step's rows of a microbatch (one token per slot and layer: short pieces) on a model of many wide
    layers are one 2-D block per slot, locally (pool to pool) and to a peer (into the packed chunk, whose
    plan cuts at half boundaries): copy engines only, no gather kernel in the streamer's context on the
    stage's GPU. Narrow, few layers: still staged."""
    from streamer.regions import region_blocks

    opt = PoolLayout(0, 40, 24, 2048, 40, 128, torch.float16)  # OPT-13B: 10 KiB rows
    step = Region(tuple(range(8)), (0, 40), tuple((900 + 7 * s, 901 + 7 * s) for s in range(8)))
    assert direct_worthwhile(step, opt.row_bytes)
    blocks = pair_blocks(opt, step, opt, step)
    assert [(b.height, b.width) for b in blocks] == [(80, opt.row_bytes)] * 8
    chunks = plan_chunks(step, opt.row_bytes, 8 << 20, layered=False)
    assert all(c.r0 % 8 == 0 and c.r1 % 8 == 0 for c in chunks) and len(chunks) == 1
    peer = region_blocks(opt, step, chunks[0].r0, chunks[0].r1)
    assert peer is not None and [(b.height, b.packed_pitch) for b in peer] == [(80, 8 * opt.row_bytes)] * 8
    small = PoolLayout(0, 4, 8, 256, 2, 16, torch.float32)  # 128 B rows, 4 layers: 1 KiB blocks
    tiny_step = Region(tuple(range(4)), (0, 4), ((10, 11),) * 4)
    assert not direct_worthwhile(tiny_step, small.row_bytes)
    assert region_blocks(small, tiny_step, 0, 32) is None


@pytest.fixture
def host_2d(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """streamer.cuda with its 2-D copy done row by row in host memory (gather_blocks / scatter_blocks run as is)."""
    import ctypes

    from streamer import cuda

    def host_copy_2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: int,
                     stream: object) -> None:
        for k in range(height):
            ctypes.memmove(dst + k * dpitch, src + k * spitch, width)

    monkeypatch.setattr(cuda, "copy_2d", host_copy_2d)
    return cuda


def round_trip_by_blocks(cuda, pool: torch.Tensor, lay: PoolLayout, idx: torch.Tensor, r0: int, r1: int,  # type: ignore[no-untyped-def]
                         blocks: list[Block]) -> None:
    """gather_blocks packs exactly rows idx[r0:r1] of the pool; scatter_blocks puts them back there and nowhere else."""
    rows = pool.view(-1, lay.row_bytes)
    packed = torch.zeros((r1 - r0, lay.row_bytes), dtype=torch.uint8)
    cuda.gather_blocks(packed.data_ptr(), pool.data_ptr(), blocks, cuda.D2D, None)
    assert torch.equal(packed, rows.index_select(0, idx[r0:r1]))
    back = torch.zeros_like(pool)
    cuda.scatter_blocks(back.data_ptr(), packed.data_ptr(), blocks, cuda.D2D, None)
    want = torch.zeros_like(pool).view(-1, lay.row_bytes).index_copy_(0, idx[r0:r1], packed).view(-1)
    assert torch.equal(back, want)


@pytest.mark.parametrize("seed", range(8))
def test_gathering_and_scattering_by_blocks_moves_the_region_rows(seed: int, host_2d) -> None:  # type: ignore[no-untyped-def]
    """cuda.gather_blocks / scatter_blocks (what the NCCL and frame paths use to pack a chunk by DMA) move exactly
    the chunk's rows: run here with host memory and a 2-D copy done row by row in Python, against index_select
    / index_copy over the row map."""
    rng = random.Random(seed)
    lay = random_layout(rng, torch.float16, max_seq=rng.choice([40, 600]), slots=rng.randint(2, 6))
    t0 = rng.randint(0, lay.max_seq_len - 2)
    # even token ranges (one prompt layer of a microbatch: blocks of many runs, pitch > width) or random ones
    region = Region.uniform(sorted(rng.sample(range(lay.num_slots), rng.randint(2, lay.num_slots))),
                            (0, lay.num_layers), t0, rng.randint(t0 + 1, lay.max_seq_len)) \
        if seed % 2 == 0 else random_region(rng, lay)
    idx = region_rows(lay, region)
    r0, r1 = (0, idx.numel()) if seed % 4 == 0 else sorted(rng.sample(range(idx.numel() + 1), 2))
    pool = fill_random(torch.empty(lay.nbytes, dtype=torch.uint8), seed)
    blocks = dma_blocks(idx[r0:r1], lay.row_bytes)
    assert seed % 4 or any(b.height > 1 and b.pitch > b.width for b in blocks)  # whole even regions: 2-D blocks
    round_trip_by_blocks(host_2d, pool, lay, idx, r0, r1, blocks)


def test_slot_cut_chunks_gather_and_scatter_through_the_cuda_helpers(host_2d) -> None:  # type: ignore[no-untyped-def]
    """A chunk of decode steps' rows cut by slot (pitched on both sides) goes through cuda.gather_blocks and
    scatter_blocks - the calls the peer paths make - onto exactly the chunk's rows."""
    from streamer.regions import region_blocks

    lay = PoolLayout(2, 8, 4, 64, 32, 128, torch.float16)  # 8 KiB rows, 16 halves: 128 KiB per slot and step
    region = Region((3, 0, 2), (4, 10), ((40, 42), (7, 8), (60, 62)))  # steps of three members, 6 of 8 layers
    per_half = region.tokens_total
    pool = fill_random(torch.empty(lay.nbytes, dtype=torch.uint8), 5)
    idx = region_rows(lay, region)
    for h0, h1 in [(0, 12), (1, 11)]:  # whole halves, long enough: 10 x 5 rows of 8 KiB per 3 blocks
        r0, r1 = h0 * per_half, h1 * per_half
        blocks = region_blocks(lay, region, r0, r1)
        assert blocks is not None and len(blocks) == 3 and all(b.packed_pitch == per_half * lay.row_bytes
                                                                for b in blocks)
        round_trip_by_blocks(host_2d, pool, lay, idx, r0, r1, blocks)
