"""CUDA plumbing shared by the GPU paths: device memory a pool can be exported from, CUDA IPC (memory and
interprocess events), pinning host memory, peer access, and waiting for device work without blocking.

Runs in a stage (GpuPoolMemory: allocate, export, record "layer ready") and in the streamer (open the
exports, pin its arenas). Importable on machines without CUDA or CuPy: every entry point checks
`cuda_ready()` and raises TransportUnavailableError instead.

Two rules from the lent machines (DESIGN.md section 8), enforced here:
- a CUDA IPC handle names a whole allocation, so a shareable pool gets its own cudaMalloc (not torch's caching
  allocator, whose blocks live inside larger segments);
- IPC memory handles and interprocess events are opened, and events waited on, with the *owning* device
  current; data then moves to other devices by peer copy. Opening an event under another device segfaulted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from streamer import wire
from streamer.errors import TransferTimeoutError, TransportUnavailableError
from streamer.layout import PoolLayout
from streamer.regions import layout_to_spec

log = logging.getLogger(__name__)

try:  # CuPy is only on GPU machines; CPU deployments and CI never import it
    import cupy
    from cupy.cuda import runtime as curt
except Exception:  # noqa: BLE001 - ImportError, or a CUDA driver error at import time
    cupy = None
    curt = None

HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every device's context
# cudaMemcpyKind values (fixed by the CUDA ABI; spelled out so no CuPy attribute naming is relied on)
H2D, D2H, D2D, DEFAULT = 1, 2, 3, 4  # DEFAULT: inferred from the pointers (UVA); what a peer 2-D copy needs

_PEER_2D: dict[str, bool] = {"ok": True}


def copy_2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: int,
            stream: torch.cuda.Stream) -> None:
    """One cudaMemcpy2DAsync of `height` rows of `width` bytes on `stream`. Across devices (kind DEFAULT, peer
    access enabled) the driver moves it over NVLink; a driver that refuses 2-D peer copies gets one
    cudaMemcpyPeerAsync per row instead (remembered, so the refusal is paid once)."""
    if kind == DEFAULT and not _PEER_2D["ok"]:
        _rows_peer(dst, dpitch, src, spitch, width, height, stream)
        return
    try:
        curt.memcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream.cuda_stream)
    except curt.CUDARuntimeError:
        if kind != DEFAULT:
            raise
        log.warning("2-D peer copies refused by the driver; copying row by row")
        _PEER_2D["ok"] = False
        _rows_peer(dst, dpitch, src, spitch, width, height, stream)


def gather_blocks(packed: int, pool: int, blocks: Iterable[Any], kind: int, stream: torch.cuda.Stream) -> None:
    """Copy the pool bytes of DMA blocks (regions.Block) into the packed chunk at `packed`, one 2-D copy each."""
    for b in blocks:
        copy_2d(packed + b.packed_off, b.packed_step, pool + b.pool_off, b.pitch, b.width, b.height, kind, stream)


def scatter_blocks(pool: int, packed: int, blocks: Iterable[Any], kind: int, stream: torch.cuda.Stream) -> None:
    """The reverse of gather_blocks: the packed chunk at `packed` onto its blocks' places in the pool."""
    for b in blocks:
        copy_2d(pool + b.pool_off, b.pitch, packed + b.packed_off, b.packed_step, b.width, b.height, kind, stream)


def _rows_peer(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,
               stream: torch.cuda.Stream) -> None:
    dst_dev = curt.pointerGetAttributes(dst).device
    src_dev = curt.pointerGetAttributes(src).device
    for k in range(height):
        curt.memcpyPeerAsync(dst + k * dpitch, dst_dev, src + k * spitch, src_dev, width, stream.cuda_stream)


def cuda_ready() -> bool:
    return cupy is not None and torch.cuda.is_available()


def require_cuda(what: str) -> None:
    if not cuda_ready():
        missing = "CuPy" if cupy is None else "a CUDA GPU"
        raise TransportUnavailableError(f"{what} needs CUDA and CuPy; this process has no {missing}")


@contextlib.contextmanager
def on_device(device: int) -> Iterator[None]:
    """Make `device` current for both torch and CuPy (they keep separate notions of 'current')."""
    with torch.cuda.device(device), cupy.cuda.Device(device):
        yield


class _CudaArray:
    """Exports raw device memory to torch via __cuda_array_interface__; torch keeps this object (and through it
    `owner`, which frees or unmaps the memory when collected) alive as long as any view exists."""

    def __init__(self, ptr: int, nbytes: int, owner: Any) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2}
        self.owner = owner


def wrap_device_memory(ptr: int, nbytes: int, device: int, owner: Any) -> torch.Tensor:
    with on_device(device):  # torch places CAI memory on the current device
        return torch.as_tensor(_CudaArray(ptr, nbytes, owner), device=torch.device("cuda", device))


class DeviceAllocation:
    """One cudaMalloc of its own (exportable over CUDA IPC as a whole); freed when collected."""

    def __init__(self, nbytes: int, device: int) -> None:
        require_cuda("a shareable GPU pool")
        self.nbytes, self.device = nbytes, device
        with on_device(device):
            self.ptr = curt.malloc(nbytes)

    def ipc_handle(self) -> bytes:
        with on_device(self.device):
            return bytes(curt.ipcGetMemHandle(self.ptr))

    def __del__(self) -> None:
        if getattr(self, "ptr", 0) and curt is not None:
            try:
                with on_device(self.device):
                    curt.free(self.ptr)
            except Exception:  # noqa: BLE001 - at interpreter exit the runtime may already be gone
                pass
            self.ptr = 0


class IpcMapping:
    """Another process's allocation, opened in this one (on the owning device); unmapped when collected."""

    def __init__(self, handle: bytes, device: int) -> None:
        require_cuda("opening a CUDA IPC pool")
        self.device = device
        with on_device(device):
            self.ptr = curt.ipcOpenMemHandle(handle)

    def __del__(self) -> None:
        if getattr(self, "ptr", 0) and curt is not None:
            try:
                with on_device(self.device):
                    curt.ipcCloseMemHandle(self.ptr)
            except Exception:  # noqa: BLE001
                pass
            self.ptr = 0


def open_ipc_pool(handle: bytes, offset: int, nbytes: int, device: int) -> torch.Tensor:
    """Flat uint8 view of a pool exported by another process (closing happens when the view dies)."""
    mapping = IpcMapping(handle, device)
    return wrap_device_memory(mapping.ptr + offset, nbytes, device, mapping)


def open_ipc_events(handles: list[bytes], device: int) -> list[torch.cuda.Event]:
    require_cuda("interprocess CUDA events")
    with on_device(device):
        return [torch.cuda.Event.from_ipc_handle(device, h) for h in handles]


class GpuPoolMemory:
    """Stage side: a KV pool in its own device allocation, plus one interprocess event per local layer.

        mem = GpuPoolMemory(layout, device=0)
        runtime = ShardRuntime(config, pool_memory=mem.tensor)
        await client.register_pool("stage1", mem)
        ... after computing local layer j on the compute stream:  mem.record(j)

    `record(j)` must precede the LayerReady message for that layer, and must be called for every layer of
    every step whose KV may be streamed (the streamer waits on it before reading)."""

    def __init__(self, layout: PoolLayout, device: int) -> None:
        self.layout, self.device = layout, device
        self.allocation = DeviceAllocation(layout.nbytes, device)
        flat = wrap_device_memory(self.allocation.ptr, layout.nbytes, device, self.allocation)
        flat.zero_()  # attention reads masked padding; it must be finite (stages/kv_cache.py)
        self.tensor = flat.view(layout.dtype).view(layout.shape)
        with on_device(device):
            self.events = [torch.cuda.Event(interprocess=True) for _ in range(layout.num_layers)]
            self.event_handles = [bytes(e.ipc_handle()) for e in self.events]
        torch.cuda.synchronize(device)

    def record(self, local_layer: int, stream: torch.cuda.Stream | None = None) -> None:
        self.events[local_layer].record(stream if stream is not None else torch.cuda.current_stream(self.device))

    def registration(self, name: str, replace: bool = False) -> wire.RegisterPool:
        return wire.RegisterPool(name, layout_to_spec(self.layout), wire.MEM_CUDA_IPC, device=self.device,
                                 ipc_handle=self.allocation.ipc_handle(), event_handles=self.event_handles,
                                 replace=replace)


def pin(buffer: torch.Tensor) -> bool:
    """Page-lock a CPU buffer in place (cudaHostRegister); False where there is no CUDA."""
    if not cuda_ready() or buffer.numel() == 0:
        return False
    curt.hostRegister(buffer.data_ptr(), buffer.numel(), HOST_REGISTER_PORTABLE)
    return True


def unpin(buffer: torch.Tensor) -> None:
    if cuda_ready() and buffer.numel():
        curt.hostUnregister(buffer.data_ptr())


def enable_peer_access(devices: list[int]) -> None:
    """Let every device reach every other directly (NVLink) for peer copies."""
    for a in devices:
        for b in devices:
            if a != b and curt.deviceCanAccessPeer(a, b):
                with on_device(a):
                    try:
                        curt.deviceEnablePeerAccess(b)
                    except curt.CUDARuntimeError as e:  # already enabled (by torch or earlier)
                        if "AlreadyEnabled" not in str(e) and "already" not in str(e).lower():
                            raise


# The streamer's checksum (streamer/integrity.py) in one pass and one kernel: every int32 word w at word
# position p of the bytes adds w to part 0; in the whole 4096-word blocks, w * (p // 4096 + 1) to part 1 and
# w * (p % 4096 + 1) to part 2; past them, w * (p - whole + 1) to part 3 - all modulo 2**32, which is what
# torch's int32 row / column sums and weighted sums compute, so the parts are bit-identical to the CPU's. The
# torch version costs about a dozen kernel launches and reductions per chunk (host time on the GPU thread, SM
# time on the GPU): this is one launch and one read of the bytes.
_CHECKSUM_SRC = r"""
extern "C" __global__ void dv_checksum(const unsigned long long w_addr, const long long n32,
                                       const long long whole, const unsigned long long out_addr) {
    const unsigned int* w = (const unsigned int*)w_addr;
    unsigned int s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < n32; p += stride) {
        const unsigned int v = w[p];
        s0 += v;
        if (p < whole) {
            s1 += v * (unsigned int)((p >> 12) + 1);
            s2 += v * (unsigned int)((p & 4095) + 1);
        } else {
            s3 += v * (unsigned int)(p - whole + 1);
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        s0 += __shfl_down_sync(0xffffffffu, s0, off);
        s1 += __shfl_down_sync(0xffffffffu, s1, off);
        s2 += __shfl_down_sync(0xffffffffu, s2, off);
        s3 += __shfl_down_sync(0xffffffffu, s3, off);
    }
    __shared__ unsigned int part[32][4];
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
        part[warp][0] = s0; part[warp][1] = s1; part[warp][2] = s2; part[warp][3] = s3;
    }
    __syncthreads();
    if (threadIdx.x < 4) {
        unsigned int t = 0;
        for (int k = 0; k < (int)(blockDim.x >> 5); ++k) t += part[k][threadIdx.x];
        atomicAdd((unsigned int*)out_addr + threadIdx.x, t);
    }
}
"""
_checksum_kernel: Any = None


def checksum_parts_cuda(t: torch.Tensor) -> torch.Tensor | None:
    """integrity.checksum_parts of a contiguous CUDA tensor whose size is a whole number of 4-byte words, as one
    kernel on the current stream of its device (int32 [4] on that device; no host sync). None: not applicable
    (no CuPy, a ragged size, an address not 4-byte aligned, non-contiguous) - the caller uses the torch version."""
    global _checksum_kernel
    nbytes = t.numel() * t.element_size()
    if cupy is None or not t.is_cuda or nbytes % 4 or t.data_ptr() % 4 or not t.is_contiguous():
        return None
    import numpy as np

    if _checksum_kernel is None:
        _checksum_kernel = cupy.RawKernel(_CHECKSUM_SRC, "dv_checksum")
    dev = t.device.index
    out = torch.zeros(4, dtype=torch.int32, device=t.device)
    n32 = nbytes // 4
    if n32:
        threads = 256
        blocks = max(1, min(1024, -(-n32 // (threads * 8))))
        stream = torch.cuda.current_stream(dev)
        with cupy.cuda.Device(dev), cupy.cuda.ExternalStream(stream.cuda_stream, dev):
            _checksum_kernel((blocks,), (threads,), (np.uint64(t.data_ptr()), np.int64(n32),
                                                      np.int64(n32 - n32 % 4096), np.uint64(out.data_ptr())))
    return out


def completion_event() -> torch.cuda.Event:
    """An event someone will wait on: blocking-sync, so a waiter sleeps instead of spinning a core that the
    stages on this host may need."""
    return torch.cuda.Event(blocking=True)


class _Waiters:
    """Daemon threads that block in cudaEventSynchronize (torch releases the GIL there) and hand the result to
    the event loop. Why not poll from the loop: a loop spinning on event.query() holds the GIL and starves the
    GPU thread that enqueues the next copies; why not the GPU thread: a wait there would stall every enqueue.
    Daemon threads, because a wait on an event that never completes (a hung peer) must not block exit.

    Elastic: a wait that finds no idle thread starts one, so an event that never fires (a stage that died
    mid-layer, a hung peer) costs one thread, never the waits queued behind it; threads stay for reuse, at most
    `keep` of them idle (the rest end once their wait is over)."""

    def __init__(self, keep: int) -> None:
        self._q: queue.SimpleQueue[tuple[Any, int | None, asyncio.AbstractEventLoop, asyncio.Future[None]]] = \
            queue.SimpleQueue()
        self._keep = keep
        self._idle = 0
        self._started = 0
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)

    def _run(self) -> None:
        while True:
            ev, device, loop, fut = self._q.get()
            err: BaseException | None = None
            try:
                if device is None:
                    ev.synchronize()
                else:  # an interprocess event: waited on with its owning device current (module docstring)
                    with torch.cuda.device(device):
                        ev.synchronize()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
                err = e
            try:
                loop.call_soon_threadsafe(_settle, fut, err)
            except RuntimeError:  # the loop is gone (its waiter timed out and the process moved on)
                pass
            with self._lock:
                if self._idle >= self._keep:
                    self._started -= 1
                    self._ended.notify_all()
                    return
                self._idle += 1

    def submit(self, ev: Any, loop: asyncio.AbstractEventLoop, device: int | None = None) -> asyncio.Future[None]:
        """Wait for `ev` (anything with a blocking .synchronize()) on a waiter thread; the future settles on
        `loop` with None or the wait's exception. Never blocks."""
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                self._started += 1
                threading.Thread(target=self._run, name=f"cuda-wait-{self._started}", daemon=True).start()
        self._q.put((ev, device, loop, fut))
        return fut

    @property
    def threads(self) -> int:
        return self._started

    def shrink_to(self, n: int, timeout: float) -> bool:
        """Block until at most `n` waiter threads are left (the extra ones end after their waits), or timeout."""
        with self._ended:
            return self._ended.wait_for(lambda: self._started <= n, timeout)


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


_WAITERS = _Waiters(8)


def synchronize_async(event: Any, device: int | None = None) -> asyncio.Future[None]:
    """A future (of the running loop) that settles once `event` has completed, waited on by a waiter thread
    (see _Waiters; `device`: the owning device of an interprocess event). No deadline: the caller sets one."""
    return _WAITERS.submit(event, asyncio.get_running_loop(), device)


class _Poller:
    """The loop's one poller of device completions that are being spun on (wait_event with spin_s): one callback
    per loop turn queries the waits in flight and settles their futures, instead of every waiting task waking
    each turn to query its own event. With 8 prompt layers in flight that was 8 task wake-ups and 8 queries per
    turn of a loop whose time per transfer is the limit (bench/probe_remote.py). Waits that share a `key` (the
    CUDA stream their event was recorded on) complete in the order they were queued, so only the oldest of
    each key is queried until it completes - and a wait's spin is counted from when the work ahead of it on its
    stream completed (it cannot end before), so a queue of waits behind a busy stream does not run out of spin
    while it waits its turn. A wait whose spin runs out settles False: the caller parks it on a waiter thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queues: dict[Any, collections.deque[list[Any]]] = {}  # [event, future, spin end, spin]
        self._scheduled = False

    def poll(self, event: Any, spin_s: float, key: Any = None) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = self.loop.create_future()
        q = self._queues.get(key if key is not None else fut)  # no key: a queue of its own
        if q is None:
            q = self._queues[key if key is not None else fut] = collections.deque()
        q.append([event, fut, time.perf_counter() + spin_s, spin_s])
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._tick)
        return fut

    def _tick(self) -> None:
        self._scheduled = False
        now = time.perf_counter()
        for key in list(self._queues):
            q = self._queues[key]
            completed = False  # the wait ahead completed this turn: the next one's spin starts now
            while q:
                entry = q[0]
                event, fut = entry[0], entry[1]
                if not fut.done():  # a cancelled wait is just dropped
                    if completed:
                        entry[2] = max(entry[2], now + entry[3])
                    try:
                        done = event.query()
                    except Exception as e:  # noqa: BLE001 - a CUDA error on the event: the waiter raises it
                        fut.set_exception(e)
                        done = False
                    else:
                        if done or now >= entry[2]:
                            fut.set_result(done)
                        else:
                            break
                    completed = done
                q.popleft()
            if not q:
                del self._queues[key]
        if self._queues:
            self._scheduled = True
            self.loop.call_soon(self._tick)


_POLLER: list[_Poller] = []


def _poller() -> _Poller:
    loop = asyncio.get_running_loop()
    if not _POLLER or _POLLER[0].loop is not loop:
        _POLLER[:] = [_Poller(loop)]
    return _POLLER[0]


async def wait_event(event: Any, timeout: float, what: str, setting: str, spin_s: float = 0.0,
                     key: Any = None) -> None:
    """Wait for device work without blocking the loop, within `timeout` seconds: first polled by the loop for up
    to `spin_s` (one query per loop turn, by the loop's _Poller; `key`: the stream the event was recorded on,
    if known), then on a waiter thread (see _Waiters).

    Why spin: a waiter thread's completion has to take the GIL from a busy loop and wake it; with prompt layers
    streamed back to back that hand-off, not the copy engines, set the pace - a stream of 31 MiB peer copies
    (90 us of DMA each) ran at 139 GB/s with waiter threads against 336 GB/s polled by the loop, on 2xH200
    (probe-dma-2xh200-2026-11-27-s6.json, in git history at cb7eb45). Polling costs a core while it lasts, so the mover asks
    for it only for copies expected to end within the spin (GpuMover: completion_spin_us)."""
    if event.query():
        return
    if spin_s > 0 and await _poller().poll(event, spin_s, key):
        return
    fut = synchronize_async(event)
    try:
        await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        raise TransferTimeoutError(f"{what}: device work not finished within {timeout:.1f}s (setting: {setting})") from None
