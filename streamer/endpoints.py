"""`Endpoint`: one pool as the streamer holds it - a stage's pool it mapped, or a host/disk pool it owns.

Every copy path works on `rows`, the pool's bytes viewed as [num_rows, row_words] integer words (the widest
word that divides a row): byte-exact for any dtype, and wide words keep the gather/scatter kernels efficient.
An endpoint never outlives the memory it maps; `close()` runs its release steps once (unmap, unlink the shared
memory name, return arena space, close a CUDA IPC mapping).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from streamer import wire
from streamer.layout import PoolLayout, Region
from streamer.regions import layout_to_spec

_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def word_dtype(row_bytes: int) -> torch.dtype:
    return next(dt for size, dt in _WORDS if row_bytes % size == 0)


def row_view(flat: torch.Tensor, layout: PoolLayout) -> torch.Tensor:
    """[rows, row_words] integer view of a pool's flat uint8 memory."""
    wd = word_dtype(layout.row_bytes)
    return flat.view(wd).view(-1, layout.row_bytes // flat.new_empty(0, dtype=wd).element_size())


class Endpoint:
    def __init__(self, name: str, kind: int, layout: PoolLayout, flat: torch.Tensor, owner: str,
                 release: list[Callable[[], None]] | None = None,
                 events: list[torch.cuda.Event] | None = None, path: str = "") -> None:
        if flat.numel() != layout.nbytes:
            raise ValueError(f"pool {name!r}: memory holds {flat.numel()} bytes, layout needs {layout.nbytes}")
        self.name, self.kind, self.layout, self.owner, self.path = name, kind, layout, owner, path
        self.flat = flat  # uint8 [nbytes], cpu or cuda
        self.rows = row_view(flat, layout)
        # where the pool lives, fixed for its life (plain attributes: read several times per transfer, and a
        # torch device property costs ~1 us each time)
        self.device: torch.device = flat.device
        self.is_cuda: bool = flat.device.type == "cuda"
        self.events = events or []  # GPU stage pools: interprocess "local layer j computed" events
        self.owner_alive = True
        self.pid = 0  # stage pools: the registering process (its exit is watched)
        self.pid_start = 0  # ... and its start time (streamer/manifest.process_start): a reused pid is not it
        self.owner_incarnation = -1  # stage pools: the owner's incarnation when it registered or took it over
        self.filled = [0] * layout.num_slots  # host pools: tokens [0, filled) hold committed data
        self._release = release or []
        self.closed = False

    @property
    def is_host_pool(self) -> bool:
        return self.kind != wire.POOL_STAGE

    @property
    def async_dma(self) -> bool:
        """Copies to or from this memory never block the calling thread: device memory or pinned host memory
        (pageable memory, e.g. a disk pool's mapping, makes the CUDA copy synchronous)."""
        v = getattr(self, "_async_dma", None)
        if v is None:
            v = self._async_dma = self.is_cuda or self.flat.is_pinned()
        return v

    def layer_event(self, layer: int) -> torch.cuda.Event | None:
        """The interprocess event the stage records after computing global `layer` (None on CPU)."""
        j = layer - self.layout.first_layer
        return self.events[j] if 0 <= j < len(self.events) else None

    def begin_write(self, region: Region) -> None:
        """A transfer starts overwriting `region`: its tokens stop counting as committed until it commits."""
        for slot, (t0, _) in zip(region.slots, region.tokens):
            self.filled[slot] = min(self.filled[slot], t0)

    def commit_write(self, region: Region) -> None:
        for slot, (t0, t1) in zip(region.slots, region.tokens):
            if t0 <= self.filled[slot]:
                self.filled[slot] = max(self.filled[slot], t1)

    def info(self) -> wire.PoolInfo:
        return wire.PoolInfo(self.name, self.kind, layout_to_spec(self.layout), self.layout.nbytes, self.owner,
                             self.owner_alive, list(self.filled), self.path if not self.is_cuda else "",
                             self.owner_incarnation)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.rows = self.flat = torch.zeros(0, dtype=torch.uint8)  # drop our views before unmapping
        self.events = []
        for fn in reversed(self._release):
            fn()
