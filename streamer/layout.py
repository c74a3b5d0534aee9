"""The vocabulary of the KV streaming library: the layout of a stage's KV pool and the regions of it that move.

Layout: ONE allocation of shape [layers, 2 (K, V), slots, max_seq, kv_heads, head_dim], token-major per slot, so
the first n tokens of a sequence are one contiguous run per (layer, K|V). One allocation means one CUDA IPC
handle (or one shared-memory segment) names the whole pool. `stages/kv_cache.py` holds the pool itself.

A region is slots x global layers [a, b) x a token range per slot:

    region = Region(slots=(4, 5), layers=(8, 12), tokens=((0, 37), (0, 12)))

Its packed form is layer-major, then K before V, then the slots in region order, each slot's token range in
order: so "layer l of this region" is one contiguous slice of the packed bytes (`Region.layer_slice`), which is
what layer-by-layer streaming sends as soon as layer l is computed. `region_rows` / `region_pieces` map a region
onto the pool's rows / contiguous byte runs; every copy path of the library is built on them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bus.errors import InvalidRequestError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A KV dtype by name (or a torch dtype, checked); ValueError names the supported ones."""
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
    elif name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"dtype {name!r} is not supported (use one of {', '.join(DTYPES)})")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PoolLayout:
    """Shape of a KV pool; enough for another process to map the same memory."""

    first_layer: int
    num_layers: int
    num_slots: int
    max_seq_len: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, 2, self.num_slots, self.max_seq_len, self.kv_heads, self.head_dim)

    @functools.cached_property  # immutable: computed once (hot in the streamer's per-transfer path)
    def row_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.kv_heads * self.head_dim * self.dtype.itemsize

    @functools.cached_property  # immutable: computed once (hot in the streamer's per-transfer path)
    def layer_bytes(self) -> int:
        """Bytes of one layer: K and V of every slot (layers are laid out alike, one after another)."""
        return 2 * self.num_slots * self.max_seq_len * self.row_bytes

    @functools.cached_property  # immutable: computed once (hot in the streamer's per-transfer path)
    def nbytes(self) -> int:
        return self.num_layers * self.layer_bytes

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


@dataclass(frozen=True)
class Region:
    """Slots x global layers [a, b) x a token range per slot. Validated against a pool by `check`."""

    slots: tuple[int, ...]
    layers: tuple[int, int]
    tokens: tuple[tuple[int, int], ...]

    @classmethod
    def uniform(cls, slots: Sequence[int], layers: tuple[int, int], start: int, stop: int) -> Region:
        return cls(tuple(slots), layers, tuple((start, stop) for _ in slots))

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @functools.cached_property  # immutable: computed once (hot in the streamer's per-transfer path)
    def tokens_total(self) -> int:
        return sum(b - a for a, b in self.tokens)

    def packed_shape(self, layout: PoolLayout) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.tokens_total, layout.kv_heads, layout.head_dim)

    def nbytes(self, layout: PoolLayout) -> int:
        return self.num_layers * 2 * self.tokens_total * layout.row_bytes

    def layer_slice(self, layout: PoolLayout, layer: int) -> tuple[int, int]:
        """Byte range [lo, hi) of global `layer` inside the packed form of this region."""
        per_layer = 2 * self.tokens_total * layout.row_bytes
        i = layer - self.layers[0]
        return i * per_layer, (i + 1) * per_layer

    def sub_layers(self, a: int, b: int) -> Region:
        return Region(self.slots, (a, b), self.tokens)

    def check(self, layout: PoolLayout) -> None:
        a, b = self.layers
        if not (layout.first_layer <= a < b <= layout.first_layer + layout.num_layers):
            raise InvalidRequestError(f"region layers [{a}, {b}) outside the pool's {layout.layers}")
        if len(self.tokens) != len(self.slots) or not self.slots:
            raise InvalidRequestError("a region needs one token range per slot and at least one slot")
        if len(set(self.slots)) != len(self.slots):
            raise InvalidRequestError(f"region names a slot twice: {self.slots}")
        if min(self.slots) < 0 or max(self.slots) >= layout.num_slots:  # builtins first: this runs per transfer
            bad = next(s for s in self.slots if not 0 <= s < layout.num_slots)
            raise InvalidRequestError(f"region slot {bad} outside [0, {layout.num_slots})")
        t = layout.max_seq_len
        for t0, t1 in self.tokens:
            if not 0 <= t0 <= t1 <= t:
                raise InvalidRequestError(f"region tokens [{t0}, {t1}) outside [0, {t}]")


def region_rows(layout: PoolLayout, region: Region, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row indices (rows of `row_bytes`) of the region in packed order, over the pool viewed as rows.

    Built with numpy: a handful of whole-array operations whatever the slot count (the streamer builds these
    for every transfer whose rows it gathers; per-slot torch calls cost ~70 us, this ~15 us)."""
    region.check(layout)
    s, t = layout.num_slots, layout.max_seq_len
    bounds = np.asarray(region.tokens, dtype=np.int64).reshape(-1, 2)
    lens = bounds[:, 1] - bounds[:, 0]
    starts = np.asarray(region.slots, dtype=np.int64) * t + bounds[:, 0]  # [S] first pool row of each slot
    before = np.cumsum(lens) - lens  # packed position of each slot's first token
    per_token = np.repeat(starts - before, lens) + np.arange(int(lens.sum()), dtype=np.int64)  # [T_total]
    a = region.layers[0] - layout.first_layer
    lc = np.arange(a * 2, (a + region.num_layers) * 2, dtype=np.int64) * (s * t)  # [L*2]
    rows = torch.from_numpy((lc[:, None] + per_token[None, :]).reshape(-1))
    return rows if torch.device(device).type == "cpu" else rows.to(device)


def region_pieces(layout: PoolLayout, region: Region, validate: bool = True) -> list[tuple[int, int]]:
    """Contiguous byte runs (offset in the pool, nbytes) in packed order: one per (layer, K|V, slot) with
    tokens. `validate=False`: the caller has checked the region against the layout already (the streamer plans
    every transfer with this; host time per transfer is what limits a stream of short copies)."""
    if validate:
        region.check(layout)
    rb, s, t = layout.row_bytes, layout.num_slots, layout.max_seq_len
    a = region.layers[0] - layout.first_layer
    per_slot = [((slot * t + t0) * rb, (t1 - t0) * rb) for slot, (t0, t1) in zip(region.slots, region.tokens)
                if t1 > t0]
    out: list[tuple[int, int]] = []
    step = s * t * rb
    for lc in range(a * 2, (a + region.num_layers) * 2):
        base = lc * step
        out.extend([(base + off, n) for off, n in per_slot])
    return out
