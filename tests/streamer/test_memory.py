"""Host memory: shared-memory pools seen by two mappings, arenas that refuse over-commitment."""

from __future__ import annotations

import pytest
import torch

from streamer.errors import BadRequestError, CapacityError
from streamer.layout import PoolLayout
from streamer.memory import ALIGN, Arena, SharedPoolMemory
from tests.streamer.helpers import fill_random

LAYOUT = PoolLayout(0, 2, 3, 8, 2, 4, torch.bfloat16)


def test_shared_pool_is_shared_and_outlives_its_creator(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mem = SharedPoolMemory.create(LAYOUT, directory=tmp_path)
    assert mem.tensor.shape == LAYOUT.shape and mem.tensor.dtype == torch.bfloat16
    assert not mem.tensor.view(torch.uint8).any()  # zero-filled, like KVPool's own allocation
    other = SharedPoolMemory.attach(LAYOUT, mem.path)
    fill_random(mem.tensor, 1)
    assert torch.equal(other.tensor.view(torch.uint8), mem.tensor.view(torch.uint8))
    expected = mem.tensor.clone()
    mem.unlink()
    del mem  # the creator's mapping and the name are gone; the other mapping still holds the memory
    assert torch.equal(other.tensor.view(torch.uint8), expected.view(torch.uint8))
    with pytest.raises(FileNotFoundError):
        SharedPoolMemory.attach(LAYOUT, other.path)


def test_a_reserved_pool_claims_its_memory_up_front(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Stage pools are reserved at creation: a full /dev/shm then fails there (OSError), never as a SIGBUS on a
    later write into a sparse mapping."""
    big = PoolLayout(0, 4, 4, 256, 4, 32, torch.float32)  # 1 MiB
    sparse = SharedPoolMemory.create(big, directory=tmp_path)
    reserved = SharedPoolMemory.create(big, directory=tmp_path, reserve=True)
    assert sparse.path.stat().st_blocks * 512 < big.nbytes // 2
    assert reserved.path.stat().st_blocks * 512 >= big.nbytes
    assert not reserved.tensor.view(torch.uint8).any()


def test_attach_refuses_wrong_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mem = SharedPoolMemory.create(LAYOUT, directory=tmp_path)
    with pytest.raises(BadRequestError, match="holds"):
        SharedPoolMemory.attach(PoolLayout(0, 3, 3, 8, 2, 4, torch.bfloat16), mem.path)


def test_arena_refuses_over_commitment_and_coalesces() -> None:
    arena = Arena("swap", 10 * ALIGN, "swap_bytes")
    a = arena.allocate(3 * ALIGN, "a")
    b = arena.allocate(3 * ALIGN - 100, "b")  # rounded up to whole pages
    c = arena.allocate(4 * ALIGN, "c")
    assert arena.free_bytes == 0
    with pytest.raises(CapacityError, match="raise swap_bytes"):
        arena.allocate(1, "d")
    arena.release(a)
    arena.release(c)
    with pytest.raises(CapacityError, match="largest free range"):
        arena.allocate(5 * ALIGN, "e")  # 7 pages free, but not in one piece
    arena.release(b)
    big = arena.allocate(10 * ALIGN, "f")  # everything coalesced back into one range
    assert big.offset == 0 and arena.used == 10 * ALIGN
    view = arena.view(big, 100)
    view.fill_(7)
    assert arena.buffer[:100].eq(7).all()
