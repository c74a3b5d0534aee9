"""Receiver-side bookkeeping of transfers arriving from peer streamers. Pure: no sockets, no devices; the
service asks it whether a message may be applied, and tells it what was applied.

Guarantees (the wire half of "nothing delivered twice or half"):
- a transfer is opened once: `rseq` must increase per (sender, incarnation), so a replayed or duplicated open
  is refused;
- a chunk is applied once: duplicates of a chunk of an open transfer are refused, and so are chunks of a
  transfer that already committed or was aborted;
- a transfer commits (and is reported delivered) only when every chunk arrived and verified; an abort or a
  newer incarnation of the sender discards it uncommitted;
- the destination region stops counting as filled while a transfer writes it (Endpoint.begin_write).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from streamer import wire
from streamer.endpoints import Endpoint
from streamer.errors import BadRequestError, DuplicateError, StaleError
from streamer.integrity import Monotonic
from streamer.layout import Region
from streamer.regions import check_region, packed_rows, region_from_spec


@dataclass
class Inbound:
    sender: str
    incarnation: int
    open: wire.RemoteOpen
    dst: Endpoint
    region: Region
    received: set[int] = field(default_factory=set)
    applied: int = 0
    nbytes: int = 0
    last: float = field(default_factory=time.monotonic)  # last message about it (see Incoming.sweep)

    _rows: torch.Tensor | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.sender, self.open.rseq

    @property
    def nrows(self) -> int:
        return 2 * self.region.tokens_total * self.region.num_layers

    @property
    def rows(self) -> torch.Tensor:
        """Packed row -> destination pool row; built on first use (chunks moved by DMA blocks never need it)."""
        if self._rows is None:
            self._rows = packed_rows(self.dst.layout, self.region)
        return self._rows


class Incoming:
    def __init__(self, pool: Callable[[str], Endpoint]) -> None:
        self._pool = pool
        self._seq = Monotonic()
        self.open_transfers: dict[tuple[str, int], Inbound] = {}

    def _check_sender(self, sender: str, incarnation: int) -> None:
        if self._seq.check_incarnation(sender, incarnation):
            self.drop_sender(sender)  # a restarted sender: whatever its predecessor left open never commits

    def open(self, sender: str, incarnation: int, msg: wire.RemoteOpen) -> Inbound:
        self._check_sender(sender, incarnation)
        self._seq.accept(sender, incarnation, msg.rseq, "transfer")
        dst = self._pool(msg.dst_pool)
        region = region_from_spec(msg.region)
        check_region(dst.layout, region, f"destination region in {msg.dst_pool!r}")
        rb = dst.layout.row_bytes
        if msg.row_bytes != rb or msg.dtype != str(dst.layout.dtype).removeprefix("torch."):
            raise BadRequestError(f"pool {msg.dst_pool!r} stores {rb}-byte rows of {dst.layout.dtype}; the sender "
                                  f"has {msg.row_bytes}-byte rows of {msg.dtype}")
        if msg.nbytes != region.nbytes(dst.layout):
            raise BadRequestError(f"transfer of {msg.nbytes} bytes does not fill region of {region.nbytes(dst.layout)}")
        t = Inbound(sender, incarnation, msg, dst, region)
        if dst.is_host_pool:
            dst.begin_write(region)
        self.open_transfers[t.key] = t
        return t

    def chunk(self, sender: str, incarnation: int, msg: wire.RemoteChunk) -> Inbound:
        """The transfer this chunk belongs to (its destination rows: `t.rows[r0:r1]`); raises if it must not be
        applied."""
        if self._seq.incarnation(sender) != incarnation:
            raise StaleError(f"chunk from {sender} incarnation {incarnation}, which has no open transfers")
        t = self.open_transfers.get((sender, msg.rseq))
        if t is None:
            raise DuplicateError(f"chunk {msg.chunk} of transfer {msg.rseq} from {sender}: the transfer is not open "
                                 f"(already committed, aborted, or never opened)")
        if msg.chunk in t.received or not 0 <= msg.chunk < t.open.nchunks:
            raise DuplicateError(f"chunk {msg.chunk} of transfer {msg.rseq} from {sender} was already received "
                                 f"or is out of range [0, {t.open.nchunks})")
        r0, r1 = (msg.rows + [0, 0])[:2]
        if not 0 <= r0 < r1 <= t.nrows or msg.nbytes != (r1 - r0) * t.dst.layout.row_bytes:
            raise BadRequestError(f"chunk rows [{r0}, {r1}) / {msg.nbytes} bytes do not fit transfer {msg.rseq}")
        t.received.add(msg.chunk)
        t.last = time.monotonic()
        return t

    def applied(self, t: Inbound, nbytes: int) -> bool:
        """A chunk was written and verified; True when that completes (commits) the transfer."""
        t.applied += 1
        t.nbytes += nbytes
        if t.applied < t.open.nchunks or self.open_transfers.get(t.key) is not t:
            return False
        del self.open_transfers[t.key]
        if t.dst.is_host_pool:
            t.dst.commit_write(t.region)
        return True

    def abort(self, sender: str, rseq: int) -> Inbound | None:
        return self.open_transfers.pop((sender, rseq), None)

    def drop_sender(self, sender: str) -> list[Inbound]:
        dropped = [t for k, t in self.open_transfers.items() if k[0] == sender]
        for t in dropped:
            del self.open_transfers[t.key]
        return dropped

    def sweep(self, max_idle: float, now: float | None = None) -> list[Inbound]:
        """Discard transfers nothing was heard of for `max_idle` seconds: their sender died without a word
        (a restart would have dropped them at once). They never commit."""
        now = time.monotonic() if now is None else now
        stale = [t for t in self.open_transfers.values() if now - t.last > max_idle]
        for t in stale:
            del self.open_transfers[t.key]
        return stale

    def drop_pool(self, dst: Endpoint) -> list[Inbound]:
        dropped = [t for t in self.open_transfers.values() if t.dst is dst]
        for t in dropped:
            del self.open_transfers[t.key]
        return dropped
