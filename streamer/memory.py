"""Host memory the streamer works with: shared-memory stage pools, memory-mapped files, and the capacity-checked
arenas its own host pools are carved from. CPU only; pinning (for GPU hosts) is done by streamer/cuda.py.

Ownership of a CPU stage pool (named POSIX shared memory, a file under /dev/shm):
1. the stage creates it (`SharedPoolMemory.create`) and computes into it (`.tensor` is its KV pool memory);
2. it registers the file with the streamer, which maps it too; from then on the *streamer* owns the name
   and unlinks it when the pool is unregistered or replaced (a stage that dies cannot clean up);
3. the mapping keeps the memory alive for whoever still holds it: a stage's death leaves the streamer's view
   intact (that is how a restarted stage gets its KV back on CPU deployments).
We use plain files + mmap rather than multiprocessing.shared_memory, whose resource tracker unlinks segments
when the *attaching* process exits (Python < 3.13) - exactly wrong for memory that must outlive a stage.
"""

from __future__ import annotations

import mmap
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from streamer.config import SHM_DIR, SHM_PREFIX
from streamer.errors import BadRequestError, CapacityError
from streamer.layout import PoolLayout

ALIGN = 4096  # sub-allocations are page aligned: DMA-friendly and safe for any word view


class MappedFile:
    """A file mapped shared into this process, as a flat uint8 tensor. Unmapped when the last view dies."""

    def __init__(self, path: Path, nbytes: int, create: bool, reserve: bool = False) -> None:
        self.path, self.nbytes = Path(path), nbytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            size = os.fstat(fd).st_size
            if create:
                os.ftruncate(fd, nbytes)  # sparse: pages materialise (zero-filled) on first touch
                if reserve and nbytes:
                    # claim every page now: a full /dev/shm then fails here (ENOSPC), not as a SIGBUS on some
                    # later write into the mapping
                    try:
                        os.posix_fallocate(fd, 0, nbytes)
                    except OSError:
                        os.unlink(self.path)
                        raise
            elif size != nbytes:
                raise BadRequestError(f"{self.path} holds {size} bytes, the pool layout needs {nbytes}")
            self._mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8) if nbytes else torch.zeros(0, dtype=torch.uint8)

    def flush(self) -> None:
        self._mm.flush()

    def unlink(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _typed(flat: torch.Tensor, layout: PoolLayout) -> torch.Tensor:
    return flat.view(layout.dtype).view(layout.shape)


class SharedPoolMemory:
    """Stage side: a KV pool in named shared memory. Pass `.tensor` to ShardRuntime(pool_memory=...), then
    `StreamerClient.register_pool(name, memory)`."""

    def __init__(self, layout: PoolLayout, path: Path, create: bool, reserve: bool = False) -> None:
        self.layout = layout
        self.file = MappedFile(path, layout.nbytes, create, reserve)
        self.tensor = _typed(self.file.tensor, layout)  # [layers, 2, slots, max_seq, kv_heads, head_dim]

    @classmethod
    def create(cls, layout: PoolLayout, prefix: str = SHM_PREFIX, directory: Path = SHM_DIR,
               reserve: bool = False) -> SharedPoolMemory:
        """reserve: claim all of its memory now (a full /dev/shm raises OSError here, not SIGBUS later)."""
        return cls(layout, Path(directory) / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}", create=True,
                   reserve=reserve)

    @classmethod
    def attach(cls, layout: PoolLayout, path: str | Path) -> SharedPoolMemory:
        return cls(layout, Path(path), create=False)

    @property
    def path(self) -> Path:
        return self.file.path

    def unlink(self) -> None:
        """Remove the name (call only if registration failed: after it the streamer owns the name)."""
        self.file.unlink()


@dataclass(frozen=True)
class Allocation:
    offset: int
    nbytes: int  # rounded up to ALIGN


class Arena:
    """First-fit allocator over one host buffer with an explicit capacity. `allocate` refuses over-commitment
    with a CapacityError naming the setting to raise; freed ranges coalesce."""

    def __init__(self, kind: str, capacity: int, setting: str, buffer: torch.Tensor | None = None) -> None:
        self.kind, self.capacity, self.setting = kind, capacity, setting
        if buffer is None:
            # anonymous mmap: page aligned, and untouched pages cost nothing until a pool is written
            self._mm = mmap.mmap(-1, max(capacity, 1))
            buffer = torch.frombuffer(self._mm, dtype=torch.uint8)[:capacity]
        self.buffer = buffer
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # sorted (offset, size)
        self.used = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    def allocate(self, nbytes: int, what: str) -> Allocation:
        size = -(-max(nbytes, 1) // ALIGN) * ALIGN
        for i, (off, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, free - size)
                self.used += size
                return Allocation(off, size)
        largest = max((f for _, f in self._free), default=0)
        raise CapacityError(
            f"{self.kind} capacity exhausted: {what} needs {size} bytes; {self.free_bytes} of {self.capacity} "
            f"are free (largest free range {largest}). Free pools or raise {self.setting}")

    def release(self, alloc: Allocation) -> None:
        start, end = alloc.offset, alloc.offset + alloc.nbytes
        merged: list[tuple[int, int]] = []
        for off, size in sorted([*self._free, (start, alloc.nbytes)]):
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((off, size))
        self._free = merged
        self.used -= end - start

    def view(self, alloc: Allocation, nbytes: int) -> torch.Tensor:
        return self.buffer[alloc.offset: alloc.offset + nbytes]
