"""The KV pool of one shard: its memory in the streaming library's layout (streamer/layout.py: `PoolLayout`,
`Region`), and reads and writes of regions of it.

The pool is ONE allocation `data` of shape [layers, 2 (K, V), slots, max_seq, kv_heads, head_dim], zero-filled at
creation: attention reads padded key ranges that are masked out, and masked garbage must still be finite.

Region API (callable from any process that holds the pool or a view of it):

    packed = pool.read(region)          # new contiguous tensor [layers, 2, sum(tokens), kv_heads, head_dim]
    pool.read(region, out=buffer)       # gather into a caller-owned staging buffer (one kernel)
    pool.write(region, packed)          # scatter back (one kernel)
    pool.pieces(region)                 # [(byte offset, nbytes)] contiguous runs, for one-copy-per-piece moves

Blocking: read/write enqueue device work on the current stream and return; the caller synchronises.
"""

from __future__ import annotations

import torch

from stages.errors import InvalidRequestError
from streamer.layout import PoolLayout, Region, region_pieces, region_rows


class KVPool:
    """K and V of layers [first_layer, first_layer + num_layers) for `num_slots` sequences."""

    def __init__(self, layout: PoolLayout, data: torch.Tensor | None = None, device: torch.device | str = "cpu"):
        self.layout = layout
        if data is None:
            data = torch.zeros(layout.shape, dtype=layout.dtype, device=device)
        elif tuple(data.shape) != layout.shape or data.dtype != layout.dtype:
            raise ValueError(f"pool memory has shape {tuple(data.shape)} {data.dtype}, layout wants {layout.shape}")
        self.data = data
        self._rows = data.view(-1, layout.kv_heads * layout.head_dim)  # [L*2*S*T, kv_heads*head_dim]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def k(self, local_layer: int) -> torch.Tensor:
        """[slots, max_seq, kv_heads, head_dim] view of K for the shard's local layer index."""
        return self.data[local_layer, 0]

    def v(self, local_layer: int) -> torch.Tensor:
        return self.data[local_layer, 1]

    def read(self, region: Region, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = region_rows(self.layout, region, self.device)
        shape = region.packed_shape(self.layout)
        if out is None:
            return self._rows.index_select(0, rows).view(shape)
        flat = out.view(-1, self._rows.shape[1])
        torch.index_select(self._rows, 0, rows, out=flat)
        return out

    def write(self, region: Region, packed: torch.Tensor) -> None:
        rows = region_rows(self.layout, region, self.device)
        if packed.numel() != rows.numel() * self._rows.shape[1]:
            raise InvalidRequestError(
                f"packed KV has {packed.numel()} elements; region {region} needs {rows.numel() * self._rows.shape[1]}"
            )
        src = packed.reshape(-1, self._rows.shape[1]).to(device=self.device, dtype=self.layout.dtype)
        self._rows.index_copy_(0, rows, src)

    def pieces(self, region: Region) -> list[tuple[int, int]]:
        return region_pieces(self.layout, region)
