"""Receiver bookkeeping: transfers open once, chunks apply once, commit only when whole, restarts discard."""

from __future__ import annotations

import pytest
import torch

from streamer import wire
from streamer.endpoints import Endpoint
from streamer.errors import BadRequestError, DuplicateError, StaleError
from streamer.incoming import Incoming
from streamer.layout import PoolLayout, Region
from streamer.regions import region_to_spec

LAYOUT = PoolLayout(0, 2, 3, 8, 1, 4, torch.float16)
REGION = Region((2, 0), (0, 2), ((0, 4), (1, 3)))  # 2 layers x 2 x 6 tokens = 24 rows of 8 bytes


def setup() -> tuple[Incoming, Endpoint]:
    ep = Endpoint("rep", wire.POOL_REPLICA, LAYOUT, torch.zeros(LAYOUT.nbytes, dtype=torch.uint8), "ctl")
    ep.filled = [0, 5, 8]
    pools = {"rep": ep}

    def get(name: str) -> Endpoint:
        if name not in pools:
            raise BadRequestError(f"no pool {name}")
        return pools[name]

    return Incoming(get), ep


def opening(rseq: int, nchunks: int = 2, **kw: object) -> wire.RemoteOpen:
    fields = {"dst_pool": "rep", "region": region_to_spec(REGION), "nchunks": nchunks, "nbytes": 24 * 8,
              "dtype": "float16", "row_bytes": 8, "checksum": True, "via": wire.VIA_FRAME, **kw}
    return wire.RemoteOpen(rseq, **fields)  # type: ignore[arg-type]


def chunk(rseq: int, i: int, r0: int, r1: int) -> wire.RemoteChunk:
    return wire.RemoteChunk(rseq, i, [r0, r1], (r1 - r0) * 8, None)


def test_commit_only_when_every_chunk_applied() -> None:
    inc, ep = setup()
    t = inc.open("peer", 0, opening(1))
    assert ep.filled == [0, 5, 0]  # slot 2 is being rewritten from token 0: not valid until commit
    assert inc.chunk("peer", 0, chunk(1, 1, 12, 24)) is t
    assert t.nrows == t.rows.numel() == 24
    assert not inc.applied(t, 96)
    inc.chunk("peer", 0, chunk(1, 0, 0, 12))
    assert inc.applied(t, 96)
    # slot 2 holds [0, 4) now; slot 0 got [1, 3), which leaves a gap after its 0 filled tokens; slot 1 untouched
    assert ep.filled == [0, 5, 4]
    assert not inc.open_transfers


def test_duplicates_are_refused() -> None:
    inc, _ = setup()
    t = inc.open("peer", 0, opening(5))
    with pytest.raises(DuplicateError):
        inc.open("peer", 0, opening(5))  # replayed open
    with pytest.raises(DuplicateError):
        inc.open("peer", 0, opening(4))  # older
    inc.chunk("peer", 0, chunk(5, 0, 0, 12))
    with pytest.raises(DuplicateError):
        inc.chunk("peer", 0, chunk(5, 0, 0, 12))  # same chunk again
    inc.applied(t, 96)
    inc.chunk("peer", 0, chunk(5, 1, 12, 24))
    assert inc.applied(t, 96)
    with pytest.raises(DuplicateError, match="not open"):
        inc.chunk("peer", 0, chunk(5, 1, 12, 24))  # late duplicate after commit: never applied twice
    with pytest.raises(DuplicateError):
        inc.chunk("peer", 0, chunk(6, 0, 0, 12))  # never opened


def test_abort_and_restart_discard_uncommitted() -> None:
    inc, ep = setup()
    inc.open("peer", 0, opening(1))
    assert inc.abort("peer", 1) is not None
    with pytest.raises(DuplicateError):
        inc.chunk("peer", 0, chunk(1, 0, 0, 12))
    inc.open("peer", 0, opening(2))
    inc.open("peer", 1, opening(1))  # the sender restarted: rseq starts over, the old transfer is dropped
    assert [k for k in inc.open_transfers] == [("peer", 1)]
    with pytest.raises(StaleError):
        inc.chunk("peer", 0, chunk(2, 0, 0, 12))
    with pytest.raises(StaleError):
        inc.open("peer", 0, opening(9))
    assert ep.filled[2] == 0


@pytest.mark.parametrize("bad", [
    {"dst_pool": "nope"}, {"dtype": "bfloat16"}, {"row_bytes": 16}, {"nbytes": 100},
    {"region": wire.RegionSpec([7], [0, 2], [[0, 4]])},
])
def test_open_validates_against_the_pool(bad: dict[str, object]) -> None:
    inc, _ = setup()
    with pytest.raises(BadRequestError):
        inc.open("peer", 0, opening(1, **bad))


def test_chunk_rows_must_fit() -> None:
    inc, _ = setup()
    inc.open("peer", 0, opening(1))
    for c in (chunk(1, 0, 20, 30), chunk(1, 2, 0, 12), wire.RemoteChunk(1, 0, [0, 12], 10, None)):
        with pytest.raises((BadRequestError, DuplicateError)):
            inc.chunk("peer", 0, c)


def test_transfers_of_a_silent_sender_are_swept() -> None:
    inc, ep = setup()
    t = inc.open("peer", 0, opening(1))
    inc.chunk("peer", 0, chunk(1, 0, 0, 12))
    assert inc.sweep(60.0, now=t.last + 10) == []
    assert inc.sweep(60.0, now=t.last + 61) == [t]
    with pytest.raises(DuplicateError):  # gone for good: a late chunk is not applied
        inc.chunk("peer", 0, chunk(1, 1, 12, 24))
    assert ep.filled[2] == 0
