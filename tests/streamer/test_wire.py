"""Streamer wire types: stable tags in 200-299, round trips through the project's one codec, golden bytes."""

from __future__ import annotations

import msgspec
import pytest

from bus.messages import ALL_MESSAGES
from streamer import wire
from streamer.errors import StreamerError, error_for
from streamer.proc import streamer_codec


def test_tags_are_unique_and_in_range() -> None:
    tags = [m.__struct_config__.tag for m in wire.STREAMER_MESSAGES]
    assert len(set(tags)) == len(tags)
    assert all(200 <= t < 300 for t in tags)
    assert set(wire.STREAMER_MESSAGES) <= set(ALL_MESSAGES)  # one leaf module holds every wire type


def test_round_trip_every_message() -> None:
    codec = streamer_codec("t", 3)
    region = wire.RegionSpec([1, 0], [2, 4], [[0, 5], [3, 9]])
    layout = wire.LayoutSpec(0, 4, 8, 128, 2, 16, "bfloat16")
    samples = [
        wire.RegisterPool("s0", layout, wire.MEM_CUDA_IPC, device=1, ipc_handle=b"\x00\xff" * 32,
                          event_handles=[b"e" * 64] * 4, pid=42),
        wire.StreamRequest(7, wire.PoolRef("s0"), region, [wire.Route([2, 4], wire.PoolRef("r", "h1"), region)],
                           layered=True, checksum=False, tag="mb3/step9", notify=["t0"], progress=True),
        wire.RemoteChunk(3, 1, [10, 20], 320, 2**62), wire.RemoteOpen(1, "p", region, 2, 64, "float16", 8, True, 1),
        wire.RemoteOpen(4, "p", region, 1, 64, "float16", 8, False, 2, link=3, answer=False,
                        first=wire.RemoteChunk(4, 0, [0, 8], 64, None, 3)),
        wire.NcclOffer(5, list(range(-128, 0)), 0, "t1"), wire.StreamerStatus(
            "h0", 0, 1, [wire.CapacityInfo(1, 10, 2)], ["a"], 0, [], False, False),
    ]
    for msg in samples:
        got = codec.decode(codec.encode(msg)).body
        assert got == msg


def test_golden_bytes() -> None:
    """Accidental wire changes (a reordered field, a renumbered tag) break this test."""
    enc = msgspec.msgpack.Encoder()
    assert enc.encode(wire.LayerReady([3, 4], 17)) == b"\x93\xcc\xd1\x92\x03\x04\x11"
    assert enc.encode(wire.CancelTransfer(9, "x")) == b"\x93\xcc\xd2\x09\xa1x"
    assert enc.encode(wire.RemoteChunkAck(1, 2, True)) == b"\x97\xcc\xf3\x01\x02\xc3\xc2\x00\xa0"


@pytest.mark.parametrize("code", range(20, 32))
def test_every_code_maps_back_to_its_error(code: int) -> None:
    err = error_for(code, "m")
    assert isinstance(err, StreamerError) and err.code == code and str(err) == "m"
