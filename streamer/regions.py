"""Region arithmetic of the streamer: wire <-> kv_cache conversions, compatibility checks, chunk plans, and the
index maps every copy path uses. Pure functions on CPU tensors; no process, no device.

Vocabulary. A pool is viewed as *rows*: one row = one token's K (or V) in one layer, `row_bytes` long. The
*packed form* of a region is its rows in packed order (streamer/layout.py: layer-major, K before V, slots in
region order, tokens in order). A transfer moves packed rows [r0, r1) of the source region onto packed rows
[r0, r1) of the destination region: two regions are compatible when they have the same number of layers and
the same per-slot token counts, in order, and the same row size and dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from streamer import wire
from streamer.errors import BadRequestError
from streamer.layout import PoolLayout, Region, dtype_name, parse_dtype, region_pieces, region_rows


def layout_to_spec(layout: PoolLayout) -> wire.LayoutSpec:
    return wire.LayoutSpec(layout.first_layer, layout.num_layers, layout.num_slots, layout.max_seq_len,
                           layout.kv_heads, layout.head_dim, dtype_name(layout.dtype))


def layout_from_spec(spec: wire.LayoutSpec) -> PoolLayout:
    try:
        dtype = parse_dtype(spec.dtype)
    except ValueError as e:
        raise BadRequestError(f"unknown pool dtype {spec.dtype!r}: {e}") from None
    if min(spec.num_layers, spec.num_slots, spec.max_seq_len, spec.kv_heads, spec.head_dim) < 1 or spec.first_layer < 0:
        raise BadRequestError(f"pool layout has a non-positive dimension: {spec}")
    return PoolLayout(spec.first_layer, spec.num_layers, spec.num_slots, spec.max_seq_len, spec.kv_heads,
                      spec.head_dim, dtype)


def region_to_spec(region: Region) -> wire.RegionSpec:
    return wire.RegionSpec(list(region.slots), list(region.layers), [list(t) for t in region.tokens])


def region_from_spec(spec: wire.RegionSpec) -> Region:
    if len(spec.layers) != 2 or any(len(t) != 2 for t in spec.tokens):
        raise BadRequestError(f"a region needs layers [a, b) and one [t0, t1) per slot, got {spec}")
    return Region(tuple(spec.slots), (spec.layers[0], spec.layers[1]), tuple((t[0], t[1]) for t in spec.tokens))


def check_region(layout: PoolLayout, region: Region, what: str) -> None:
    try:
        region.check(layout)
    except ValueError as e:
        raise BadRequestError(f"{what}: {e}") from None


def check_compatible(src: PoolLayout, src_region: Region, dst: PoolLayout, dst_region: Region) -> None:
    """Raise BadRequestError unless packed rows of `src_region` can land on packed rows of `dst_region`."""
    check_region(src, src_region, "source region")
    check_region(dst, dst_region, "destination region")
    if src.row_bytes != dst.row_bytes or src.dtype != dst.dtype:
        raise BadRequestError(
            f"pools differ in row format: {src.kv_heads}x{src.head_dim} {dtype_name(src.dtype)} vs "
            f"{dst.kv_heads}x{dst.head_dim} {dtype_name(dst.dtype)}")
    if src_region.num_layers != dst_region.num_layers:
        raise BadRequestError(f"source has {src_region.num_layers} layers, destination {dst_region.num_layers}")
    lens_s = [b - a for a, b in src_region.tokens]
    lens_d = [b - a for a, b in dst_region.tokens]
    if lens_s != lens_d:
        raise BadRequestError(f"per-slot token counts differ: source {lens_s}, destination {lens_d}")


@dataclass(frozen=True)
class Chunk:
    """Packed rows [r0, r1) of a route; all inside layer `layer` when the route is layered, else the last
    layer they touch (what a GPU source must have computed before they are read). `completes`: the layers
    whose last row is in this chunk (progress is reported for them once it lands)."""

    index: int
    r0: int
    r1: int
    layer: int
    completes: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.r1 - self.r0


def plan_chunks(region: Region, row_bytes: int, chunk_bytes: int, layered: bool) -> list[Chunk]:
    """Split the packed region into chunks of at most `chunk_bytes` (at least one row each). Layered plans never
    let a chunk cross a layer boundary, so layer l moves as soon as it is ready; others cut at (layer, K|V)
    half boundaries when a half fits a chunk (their DMA blocks: slot_major_blocks)."""
    per_layer = 2 * region.tokens_total
    step = max(1, chunk_bytes // row_bytes)
    a = region.layers[0]
    out: list[Chunk] = []
    if per_layer == 0:
        return out
    if layered:
        for i in range(region.num_layers):
            lo, hi = i * per_layer, (i + 1) * per_layer
            for r0 in range(lo, hi, step):
                r1 = min(hi, r0 + step)
                out.append(Chunk(len(out), r0, r1, a + i, (a + i,) if r1 == hi else ()))
        return out
    total = per_layer * region.num_layers
    if per_layer // 2 <= step:  # whole (layer, K|V) halves per chunk: slot_major_blocks can cut them by DMA
        step -= step % (per_layer // 2)
    for r0 in range(0, total, step):
        r1 = min(total, r0 + step)
        first_done = a + -(-(r0 + 1) // per_layer) - 1  # the layer whose last row is the first at/after r0
        last_done = a + r1 // per_layer - 1
        out.append(Chunk(len(out), r0, r1, a + (r1 - 1) // per_layer, tuple(range(first_done, last_done + 1))))
    return out


def packed_rows(layout: PoolLayout, region: Region) -> torch.Tensor:
    """Row index of every packed row inside the pool (int64 [rows], CPU)."""
    return region_rows(layout, region)


def common_runs(src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    """Maximal runs along which both index maps advance by one row: int64 [runs, 3] = (src row, dst row, rows).
    These are the contiguous pieces the naive path copies one by one."""
    n = src_idx.numel()
    if n == 0:
        return torch.zeros((0, 3), dtype=torch.long)
    s, d = src_idx.numpy(), dst_idx.numpy()  # numpy: a few whole-array steps, ~10 us instead of ~60 with torch
    starts = _run_starts((np.diff(s) != 1) | (np.diff(d) != 1))
    lens = np.diff(np.append(starts, n))
    return torch.from_numpy(np.stack([s[starts], d[starts], lens], axis=1))


def _run_starts(breaks: np.ndarray) -> np.ndarray:
    """Indexes where runs start, given `breaks[i]` = "element i+1 does not continue element i"."""
    return np.concatenate([[0], np.flatnonzero(breaks) + 1]).astype(np.int64)


@dataclass(frozen=True)
class Block:
    """`height` runs of `width` bytes: run k sits at byte `pool_off + k * pitch` in the pool and at
    `packed_off + k * packed_pitch` in the packed chunk (0: `width`, the runs back to back). One
    cudaMemcpy2DAsync moves a block."""

    pool_off: int
    pitch: int
    width: int
    height: int
    packed_off: int
    packed_pitch: int = 0

    @property
    def packed_step(self) -> int:
        return self.packed_pitch or self.width


def dma_blocks(idx: torch.Tensor, row_bytes: int) -> list[Block]:
    """Cover packed rows whose pool rows are `idx` with few 2-D blocks: consecutive runs of equal length and
    equal spacing merge into one block. A region over all slots of a pool with one token range per layer is a
    single block however many layers it spans; that is what keeps host pools at the copy engine's ceiling
    without any CPU-side scatter."""
    n = idx.numel()
    if n == 0:
        return []
    i = idx.cpu().numpy()
    starts = _run_starts(np.diff(i) != 1)
    lens = np.diff(np.append(starts, n))
    return [Block(so * row_bytes, sp * row_bytes, w * row_bytes, h, do * row_bytes)
            for so, sp, do, _, w, h in merge_runs(i[starts].tolist(), starts.tolist(), lens.tolist())]


def merge_runs(src: list[int], dst: list[int], lens: list[int]) -> list[tuple[int, int, int, int, int, int]]:
    """Merge runs (run k: `lens[k]` units from `src[k]` to `dst[k]`) into 2-D blocks (src_off, src_pitch,
    dst_off, dst_pitch, width, height): consecutive runs of equal length whose offsets advance by constant
    strides on both sides. A 2-D copy needs pitch >= width, so runs that go backwards or overlap stay apart."""
    out = []
    n, i = len(lens), 0
    while i < n:
        h, sp, dp = 1, lens[i], lens[i]
        if i + 1 < n and lens[i + 1] == lens[i] and src[i + 1] - src[i] >= lens[i] and dst[i + 1] - dst[i] >= lens[i]:
            sp, dp = src[i + 1] - src[i], dst[i + 1] - dst[i]
            while (i + h < n and lens[i + h] == lens[i] and src[i + h] - src[i + h - 1] == sp
                   and dst[i + h] - dst[i + h - 1] == dp):
                h += 1
        out.append((src[i], sp, dst[i], dp, lens[i], h))
        i += h
    return out


def region_blocks(layout: PoolLayout, region: Region, r0: int, r1: int) -> list[Block] | None:
    """The DMA blocks of packed rows [r0, r1) of `region` (checked against `layout`) - `slot_major_blocks` when
    the chunk is whole (layer, K|V) halves cut by slot into fewer, long enough blocks (a decode step's rows),
    else `long_blocks` - from a plan made once per region *shape* (slots, token ranges, layer count, chunk
    range) and moved to the region's layers - a stream of prompt layers to a peer streamer computes it once
    (building the row map and its blocks for each 31 MiB layer took ~150 us of the loop, 2xH200,
    bench/probe_remote.py). None: short pieces, gathered or scattered by one index kernel."""
    blocks = _shape_blocks(layout, region.slots, region.tokens, region.num_layers, r0, r1)
    shift = (region.layers[0] - layout.first_layer) * layout.layer_bytes
    if blocks is None or shift == 0:
        return None if blocks is None else list(blocks)
    return [replace(b, pool_off=b.pool_off + shift) for b in blocks]


@functools.lru_cache(maxsize=4096)
def _shape_blocks(layout: PoolLayout, slots: tuple[int, ...], tokens: tuple[tuple[int, int], ...], layers: int,
                  r0: int, r1: int) -> tuple[Block, ...] | None:
    by_slot = slot_major_blocks(layout, slots, tokens, r0, r1)
    if by_slot is not None:
        return tuple(by_slot)
    region = Region(slots, (layout.first_layer, layout.first_layer + layers), tokens)
    blocks = long_blocks(packed_rows(layout, region)[r0:r1], layout.row_bytes)
    return None if blocks is None else tuple(blocks)


def slot_major_blocks(layout: PoolLayout, slots: Sequence[int], tokens: Sequence[tuple[int, int]], r0: int,
                      r1: int) -> list[Block] | None:
    """Blocks of packed rows [r0, r1) cut by slot - one per slot with tokens, over the chunk's (layer, K|V)
    halves, at half a layer's pitch in the pool and one half's rows in the packed chunk - when the chunk is
    whole halves, no more blocks than halves, and long enough on average (DIRECT_RUN_BYTES); else None. The
    rows of decode steps sent to a peer streamer (replication's deltas) are such chunks: copy engines move
    them with no kernel of the streamer's on the stage's GPU (where the GPU time-slices it with the stage)."""
    per_half = sum(t1 - t0 for t0, t1 in tokens)
    if per_half == 0 or r0 % per_half or r1 % per_half:
        return None
    h0, h1 = r0 // per_half, r1 // per_half
    pieces = sum(1 for t0, t1 in tokens if t1 > t0)
    rb = layout.row_bytes
    if h1 <= h0 or pieces > h1 - h0 or per_half * rb * (h1 - h0) < DIRECT_RUN_BYTES * pieces:
        return None
    half, seq = layout.layer_bytes // 2, layout.max_seq_len
    out, at = [], 0
    for s, (t0, t1) in zip(slots, tokens):
        if t1 > t0:
            out.append(Block(h0 * half + (s * seq + t0) * rb, half, (t1 - t0) * rb, h1 - h0, at * rb, per_half * rb))
        at += t1 - t0
    return out


def long_blocks(idx: torch.Tensor, row_bytes: int) -> list[Block] | None:
    """The 2-D DMA blocks covering pool rows `idx` (CPU) when its contiguous pieces are long enough on average
    for the copy engines (DIRECT_RUN_BYTES: a prompt layer's pieces are thousands of rows); None: gather or
    scatter with one index kernel instead. DMA blocks need no row map on the device (no upload per chunk) and
    leave the GPU's SMs to the stage computing on it."""
    blocks = dma_blocks(idx, row_bytes)
    runs = sum(b.height for b in blocks)
    return blocks if runs and idx.numel() * row_bytes >= DIRECT_RUN_BYTES * runs else None


@dataclass(frozen=True)
class PairBlock:
    """`height` runs of `width` bytes copied pool to pool: run k goes from byte `src_off + k * src_pitch` of the
    source pool to byte `dst_off + k * dst_pitch` of the destination. One cudaMemcpy2DAsync moves a block."""

    src_off: int
    src_pitch: int
    dst_off: int
    dst_pitch: int
    width: int
    height: int


DIRECT_RUN_BYTES = 128 * 1024  # blocks at least this long on average go pool to pool by DMA, with no staging


def direct_worthwhile(region: Region, row_bytes: int, layered: bool = False,
                      min_run_bytes: int = DIRECT_RUN_BYTES) -> bool:
    """Whether pool-to-pool DMA beats staging for this region: its 2-D blocks (pair_blocks) carry at least
    `min_run_bytes` on average (a copy engine moves short pieces slowly, and every copy call costs host time).
    A block covers a slot's pieces of every (layer, K|V) of its chunk (slot_blocks): two per slot in a layered
    chunk (one layer), all 2 x layers otherwise - so the rows of a decode step, one token per slot and layer, are
    a block per slot, long on a model with many wide layers (OPT-13B: 40 x 2 x 10 KiB). Staging them instead
    costs a gather kernel in the streamer's own CUDA context on the stage's GPU, which the GPU time-slices
    against the stage's step: replication's per-step deltas, after every step."""
    pieces = sum(1 for t0, t1 in region.tokens if t1 > t0)
    halves = 2 if layered else 2 * region.num_layers
    return pieces > 0 and region.tokens_total * row_bytes * halves >= min_run_bytes * pieces


def pair_blocks(src_layout: PoolLayout, src_region: Region, dst_layout: PoolLayout, dst_region: Region,
                layers: tuple[int, int] | None = None) -> list[PairBlock]:
    """Pool-to-pool 2-D blocks moving route layers [i, j) (default: all) of a source region onto the compatible
    destination region, computed from the regions' geometry (no row maps). Piece k of the source lands on
    piece k of the destination (same lengths: check_compatible). Two ways to cut, the one with fewer blocks
    (judged by the count of slots against (layer, K|V) pieces, without building both):
    - slot-major (slot_blocks): one block per slot with tokens, over every (layer, K|V) of the range - a decode
      step's rows of a whole microbatch are a block per slot;
    - layer-major: consecutive pieces of equal length whose source and destination both advance by constant
      strides (at least the width, so rows never overlap) merge into one block: one prompt layer of a
      microbatch (K and V of every slot) is at most two blocks."""
    i, j = layers or (0, src_region.num_layers)
    slots = sum(1 for t0, t1 in src_region.tokens if t1 > t0)
    if slots <= 2 * (j - i):
        return slot_blocks(src_layout, src_region, dst_layout, dst_region, (i, j))
    a, b = src_region.layers[0], dst_region.layers[0]
    # both regions were checked by check_compatible (local_route) before any blocks are made
    ps = region_pieces(src_layout, src_region.sub_layers(a + i, a + j), validate=False)  # empty slots: skipped
    pd = region_pieces(dst_layout, dst_region.sub_layers(b + i, b + j), validate=False)  # on both sides
    return [PairBlock(*m) for m in merge_runs([o for o, _ in ps], [o for o, _ in pd], [n for _, n in ps])]


def slot_blocks(src_layout: PoolLayout, src_region: Region, dst_layout: PoolLayout, dst_region: Region,
                layers: tuple[int, int]) -> list[PairBlock]:
    """One block per slot with tokens, covering its piece of every (layer, K|V) of route layers [i, j): a
    pool's K and V halves alternate at half a layer's bytes (layout [layers, 2, slots, seq, ...]), so those
    pieces sit at one constant stride on each side (at least the piece: a half holds every slot's sequence)."""
    i, j = layers
    out: list[PairBlock] = []
    rs, rd = src_layout.row_bytes, dst_layout.row_bytes
    hs, hd = src_layout.layer_bytes // 2, dst_layout.layer_bytes // 2
    base_s = 2 * (src_region.layers[0] - src_layout.first_layer + i) * hs
    base_d = 2 * (dst_region.layers[0] - dst_layout.first_layer + i) * hd
    ts, td = src_layout.max_seq_len, dst_layout.max_seq_len
    for s, (t0, t1), d, (u0, _) in zip(src_region.slots, src_region.tokens, dst_region.slots, dst_region.tokens):
        if t1 > t0:
            out.append(PairBlock(base_s + (s * ts + t0) * rs, hs, base_d + (d * td + u0) * rd, hd, (t1 - t0) * rs,
                                 2 * (j - i)))
    return out


def plan_direct(region: Region, row_bytes: int, chunk_bytes: int, layered: bool) -> list[Chunk]:
    """Chunks of whole layers (one per layer when layered, else as many layers as fit `chunk_bytes`)."""
    per_layer = 2 * region.tokens_total
    a, n = region.layers[0], region.num_layers
    k = 1 if layered else max(1, chunk_bytes // max(1, per_layer * row_bytes))
    out: list[Chunk] = []
    for l0 in range(0, n, k):
        l1 = min(n, l0 + k)
        out.append(Chunk(len(out), l0 * per_layer, l1 * per_layer, a + l1 - 1, tuple(range(a + l0, a + l1))))
    return out


def routes_by_layer(region: Region, targets: Sequence[tuple[wire.PoolRef, tuple[int, int], Region]]) -> list[wire.Route]:
    """Split a source region by layer among destinations (prompt stage -> the token stages owning each layer).

    `targets`: (pool, its global layer range [c, d), its region template: slots and token ranges; the template's
    layers are ignored). Every source layer must be owned by exactly one target."""
    a, b = region.layers
    routes, covered = [], 0
    for ref, (c, d), tmpl in targets:
        lo, hi = max(a, c), min(b, d)
        if lo >= hi:
            continue
        dst = Region(tmpl.slots, (lo, hi), tmpl.tokens)
        routes.append(wire.Route([lo, hi], ref, region_to_spec(dst)))
        covered += hi - lo
    if covered != b - a:
        raise BadRequestError(f"targets cover {covered} of the region's {b - a} layers exactly once; fix their ranges")
    return routes
