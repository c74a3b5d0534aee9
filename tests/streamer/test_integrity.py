"""Checksums (exact modulo 2**32, device independent, catch flips and moves) and monotonic sequence numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.errors import DuplicateError, IntegrityError, StaleError
from streamer.integrity import Monotonic, checksum, checksum_parts, verify
from tests.streamer.helpers import fill_random


def reference_parts(data: bytes) -> list[int]:
    """The checksum written out with Python integers (no wrapping arithmetic to get wrong)."""
    head = len(data) - len(data) % 4
    w = np.frombuffer(data[:head], dtype="<i4").astype(np.int64)
    tail = data[head:] + (b"\0" if (len(data) - head) % 2 else b"")
    w16 = np.frombuffer(tail, dtype="<i2").astype(np.int64)
    nb = len(w) // 4096
    main, rest = w[: nb * 4096].reshape(nb, 4096), w[nb * 4096:]
    rows, cols = main.sum(1), main.sum(0) if nb else np.zeros(4096, dtype=np.int64)
    vals = [rows.sum() + rest.sum() + w16.sum(), (rows * np.arange(1, nb + 1)).sum(),
            (cols * np.arange(1, 4097)).sum(), (rest * np.arange(1, len(rest) + 1)).sum() + (w16 * 7919).sum()]
    return [((int(v) + 2**31) % 2**32) - 2**31 for v in vals]


@pytest.mark.parametrize("nbytes", [0, 1, 2, 6, 4096 * 4 * 3 + 10, 4096 * 4 * 5])
def test_checksum_matches_reference(nbytes: int) -> None:
    t = fill_random(torch.empty(nbytes, dtype=torch.uint8), nbytes)
    assert checksum_parts(t).tolist() == reference_parts(t.numpy().tobytes())


def test_checksum_catches_flips_swaps_and_truncation() -> None:
    t = fill_random(torch.empty(3 * 4096 * 4 + 12, dtype=torch.uint8), 7)
    base = checksum(t)
    for i in (0, 5, 4096 * 4 + 3, t.numel() - 1):
        for bit in (0, 7):
            u = t.clone()
            u[i] ^= 1 << bit
            assert checksum(u) != base
    w = t[: 3 * 4096 * 4].view(torch.int32).view(3, 4096)
    for swap in ([(0, 1), (0, 1)], [(0, 2), (5, 5)], [(1, 1), (3, 9)]):  # rows, columns, within a row
        u = t.clone()
        uw = u[: 3 * 4096 * 4].view(torch.int32).view(3, 4096)
        (r0, r1), (c0, c1) = swap
        if w[r0, c0] != w[r1, c1]:
            uw[r0, c0], uw[r1, c1] = w[r1, c1].item(), w[r0, c0].item()
            assert checksum(u) != base
    assert checksum(t[:-4]) != base
    assert checksum(t.view(torch.float16)) == base  # bytes, not values


def test_verify() -> None:
    verify(None, 5, "x")
    verify(5, 5, "x")
    with pytest.raises(IntegrityError, match="mismatch on chunk 3"):
        verify(5, 6, "chunk 3")


def test_monotonic_rejects_duplicates_and_stale_incarnations() -> None:
    m = Monotonic()
    m.accept("s", 0, 1, "transfer")
    m.accept("s", 0, 5, "transfer")
    with pytest.raises(DuplicateError):
        m.accept("s", 0, 5, "transfer")
    with pytest.raises(DuplicateError):
        m.accept("s", 0, 2, "transfer")
    m.accept("s", 1, 1, "transfer")  # a restarted sender starts over
    with pytest.raises(StaleError):
        m.accept("s", 0, 9, "transfer")
    m.accept("other", 0, 1, "transfer")


def test_checksum_of_a_byte_view_starting_mid_word() -> None:
    """A view whose first byte is not at a word boundary (a frame's tail, a sliced buffer) is summed as its own
    bytes: the same parts as a fresh copy of them."""
    t = fill_random(torch.empty(4096 * 4 * 2 + 6, dtype=torch.uint8), 9)
    for k in (1, 2, 3):
        assert checksum_parts(t[k:]).tolist() == checksum_parts(t[k:].clone()).tolist()


@pytest.mark.parametrize("nbytes", [0, 3, 7, 4096 * 4 - 2, 4096 * 4 * 3 + 10, 4096 * 4 * 5 + 1])
def test_the_cpu_and_torch_checksums_give_the_same_bits(nbytes: int) -> None:
    """CPU tensors are digested through numpy, tensors on a GPU without CuPy through torch (and with it by a
    fused kernel, tested on the GPU machines): one algorithm, the same parts - for random bytes, all-ones
    bytes (every sum wraps), and views starting mid-word."""
    from streamer.integrity import _checksum_parts_cpu, _checksum_parts_torch

    t = fill_random(torch.empty(nbytes + 3, dtype=torch.uint8), nbytes + 1)
    for v in (t[:nbytes], t[1: nbytes + 1], t[3:], torch.full((nbytes,), 255, dtype=torch.uint8)):
        assert _checksum_parts_cpu(v).tolist() == _checksum_parts_torch(v).tolist()
