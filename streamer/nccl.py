"""NCCL links: GPU pool -> GPU pool across hosts, through CuPy's 2-rank communicators.

Runs in the streamer process. A link is *directed*: rank 0 only sends, rank 1 only receives, so the two ranks
always issue their operations in the same order (a communicator used both ways by concurrent transfers could
deadlock: each side's send kernel waiting for the other's receive). Each link has its own stream on its
device; NCCL operations of one link never run on two streams.

Lifecycle: the sender creates the unique id and offers it (wire.NcclOffer over the peer's data socket); both
ranks call ncclCommInitRank, which blocks until the other joins - so init runs on a daemon thread of its own
with a deadline (CuPy exposes no non-blocking init; a rank whose peer never joins leaves that thread stuck,
not the streamer), followed by one small exchange that makes NCCL connect the pair (NcclLink._connect). A link
whose operation misses its deadline is *aborted* (ncclCommAbort frees the communicator and makes its pending
kernels return), never waited on forever; the next transfer builds a new link.

Operations are issued by the event loop itself, each announcement's gather + send (sender) or receive +
scatter (receiver) in the same loop step that sends or handles the announcement: on a connected link an
NCCL send or receive only enqueues a kernel, as a cudaMemcpyAsync does. Through the GPU thread, each chunk paid
two thread hand-offs per side, and the GPU thread waited for the interpreter lock behind the busy loop: the
posting of a receive lagged its announcement by 0.2-0.8 ms (4xH200, bench/probe_remote.py, session 8).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from typing import Any

import torch

from streamer.cuda import D2D, completion_event, cupy, gather_blocks, on_device, require_cuda, scatter_blocks
from streamer.cuda_mover import GpuHandle, GpuMover
from streamer.endpoints import Endpoint
from streamer.errors import PeerDeadError, TransportUnavailableError
from streamer.integrity import checksum_parts, digest
from streamer.regions import Block

log = logging.getLogger(__name__)

try:
    from cupy.cuda import nccl as _nccl

    NCCL_OK = bool(getattr(_nccl, "available", True))
except Exception:  # noqa: BLE001 - no CuPy, or CuPy built without NCCL
    _nccl = None
    NCCL_OK = False

_link_ids = itertools.count(1)


def nccl_ready() -> bool:
    return NCCL_OK and cupy is not None and torch.cuda.is_available()


def new_unique_id() -> list[int]:
    if not nccl_ready():
        raise TransportUnavailableError("NCCL is not available in this process (needs CuPy built with NCCL)")
    return list(_nccl.get_unique_id())


def make_communicator(uid: list[int], rank: int) -> Any:
    """A 2-rank communicator from a unique id that travelled as a list of ints. CuPy 14 takes the id as
    `bytes` (seen on the lent H100s: get_unique_id() returns 128 bytes); older CuPy took a tuple of chars.

    Connections are made at init, not lazily on first use (NCCL_RUNTIME_CONNECT=0, unless the operator set
    it): a lazy connect happens inside a send or receive, allocates and maps memory (CUDA calls that can
    wait for the whole device) and needs the peer's host to join - while a kernel of this GPU's *other*
    link (a middle stage has two communicators) may be spinning on a third process. NCCL's documentation
    warns that concurrent communicators can deadlock this way; TensorRT-LLM's pipeline send/recv sets the
    same variable for its 2-rank communicators. NCCL reads it once per process, at its first init."""
    os.environ.setdefault("NCCL_RUNTIME_CONNECT", "0")
    try:
        return _nccl.NcclCommunicator(2, bytes(v & 0xFF for v in uid), rank)
    except TypeError:
        return _nccl.NcclCommunicator(2, tuple(uid), rank)


def next_link_id() -> int:
    return next(_link_ids)


CONNECT_BYTES = 1 << 20  # the exchange that connects a new link (NcclLink._connect)
ABORT_TIMEOUT_S = 10.0  # ncclCommAbort returns in milliseconds; past this it is logged and left to its thread


async def abort_link(link: Any, timeout: float = ABORT_TIMEOUT_S) -> None:
    """Event loop. Abort `link` (anything with `abort()`, `link_id`, `peer`) on a thread of its own - never on
    a thread that may be blocked on this link: the link's init thread (init and its connect wait for the peer),
    or a waiter thread synchronizing on a receive whose sender is gone. ncclCommAbort is what releases such a wait
    (NCCL kernels and host waits poll the communicator's abort flag; torch's NCCL watchdog aborts from its own
    thread for the same reason), so queueing the abort behind that wait would deadlock until a supervisor kill.
    Marks the link dead and closed at once; returns when the abort is done or after `timeout`."""
    link.dead = True
    link.closed = True
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            link.abort()
        finally:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=run, name=f"nccl-abort-{link.link_id}", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout)
    except TimeoutError:
        log.error("[stream] NCCL abort of link %s to %s not done within %.0fs; left to its thread", link.link_id,
                  link.peer, timeout)


class NcclLink:
    def __init__(self, link_id: int, peer: str, rank: int, device: int) -> None:
        require_cuda("an NCCL link")
        self.link_id, self.peer, self.rank, self.device = link_id, peer, rank, device
        self.comm: Any = None
        self.dead = False
        self.closed = False  # aborted on purpose (abort_link): an operation that fails now is stale, not a fault
        self.confirmed = False  # sender: a transfer was accepted on it, so the peer's rank is up (no open waits)
        with on_device(device):
            self.stream = torch.cuda.Stream(device)

    async def init(self, uid: list[int], timeout: float) -> None:
        """ncclCommInitRank on a daemon thread, within `timeout` (setting: nccl_init_timeout_s)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def work() -> None:
            try:
                with on_device(self.device):
                    comm = make_communicator(uid, self.rank)
                    self._connect(comm)
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(comm))
            except Exception as e:  # noqa: BLE001 - reported to the awaiting task
                err = e
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(err))

        threading.Thread(target=work, name=f"nccl-init-{self.link_id}", daemon=True).start()
        try:
            self.comm = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.dead = True
            raise PeerDeadError(f"NCCL link {self.link_id} to {self.peer}: peer did not join within {timeout:.1f}s "
                                f"(setting: nccl_init_timeout_s)") from None
        except Exception as e:
            self.dead = True
            raise PeerDeadError(f"NCCL link {self.link_id} to {self.peer} failed to initialise: {e}") from None
        log.info("[stream] NCCL link %d to %s up (rank %d, cuda:%d)", self.link_id, self.peer, self.rank, self.device)

    def _connect(self, comm: Any) -> None:
        """Init thread: one small exchange (rank 0 sends, rank 1 receives) so NCCL sets up the link's
        peer-to-peer connections here, under the init deadline. NCCL connects a pair of ranks at their first
        send/receive, and that connect waits for the peer's host; every later operation only enqueues work on
        the link's stream, which is what lets the event loop issue them itself (enqueue_send, enqueue_recv)."""
        buf = torch.empty(CONNECT_BYTES, dtype=torch.uint8, device=torch.device("cuda", self.device))
        if self.rank == 0:
            comm.send(buf.data_ptr(), CONNECT_BYTES, _nccl.NCCL_UINT8, 1, self.stream.cuda_stream)
        else:
            comm.recv(buf.data_ptr(), CONNECT_BYTES, _nccl.NCCL_UINT8, 0, self.stream.cuda_stream)
        self.stream.synchronize()

    def abort(self) -> None:
        """Any thread (normally through `abort_link`). Abort the communicator: pending NCCL kernels return,
        host calls waiting on the peer return an error, resources are freed."""
        self.dead = True
        self.closed = True
        comm = self.comm
        if comm is not None:
            try:
                with on_device(self.device):
                    comm.abort()
            except Exception:  # noqa: BLE001 - aborting a broken communicator may itself report the breakage
                log.exception("[stream] NCCL abort of link %d", self.link_id)
            self.comm = None

    def check(self) -> None:
        """Raise PeerDeadError if NCCL reported an asynchronous error (a peer that went away)."""
        if self.dead or self.comm is None:
            raise PeerDeadError(f"NCCL link {self.link_id} to {self.peer} is down")
        try:
            self.comm.check_async_error()
        except Exception as e:  # noqa: BLE001
            raise PeerDeadError(f"NCCL link {self.link_id} to {self.peer}: {e}") from None


def enqueue_gather(mover: GpuMover, src: Endpoint, s_idx: Any, rows: int, check: bool,
                   wait_layer: int | None, blocks: list[Block] | None = None) -> GpuHandle:
    """Event loop (like every enqueue_* here: each only enqueues device work, and the link connected at init):
    gather the chunk on the source device into a buffer of its own (not a lane's staging: lanes are shared with
    the GPU thread's copies) - by 2-D DMA blocks pool -> buffer when given
    (regions.long_blocks), else one index kernel over `s_idx()` (the route's row map on the device). `h.event` =
    gathered; `h.result` = buffer."""
    a = src.device.index
    la = mover.lane(a)
    sa = la.stream
    h = GpuHandle(completion_event(), f"gather {src.name} ({rows} rows)", rows * src.layout.row_bytes,
                  keep=[src.flat], lane=la)
    # the buffer is only ever freed once every use of it completed, so its allocator stream does not matter
    packed = torch.empty((rows, src.rows.shape[1]), dtype=src.rows.dtype, device=src.device)
    if blocks is not None and not check:  # copy engine only: no current device or stream needed (GpuMover._dma)
        mover.wait_source(sa, src, wait_layer)
        gather_blocks(packed.data_ptr(), src.flat.data_ptr(), blocks, D2D, sa)
        h.event.record(sa)
        h.result = packed
        return h
    with on_device(a), torch.cuda.stream(sa):
        mover.wait_source(sa, src, wait_layer)
        if blocks is not None:
            gather_blocks(packed.data_ptr(), src.flat.data_ptr(), blocks, D2D, sa)
        else:
            idx = s_idx()
            h.keep.append(idx)
            torch.index_select(src.rows, 0, idx, out=packed)
        if check:
            h.parts = torch.empty((2, 4), dtype=torch.int32, pin_memory=True)
            h.parts[0].copy_(checksum_parts(packed), non_blocking=True)
        h.event.record(sa)
    h.result = packed
    return h


def enqueue_send(link: NcclLink, h: GpuHandle) -> GpuHandle:
    """Event loop: ncclSend of a gathered chunk on the link's stream (after the gather). Replaces `h.event`."""
    link.check()
    assert h.result is not None
    # no device switch (~20 us of context managers): NCCL makes the communicator's device current for its own
    # launch (one thread may drive several devices' communicators), and torch's wait/record switch themselves
    ls = link.stream
    ls.wait_event(h.event)
    link.comm.send(h.result.data_ptr(), h.nbytes, _nccl.NCCL_UINT8, 1, ls.cuda_stream)
    h.gathered = h.event
    h.event = completion_event()
    h.event.record(ls)
    h.what = f"NCCL send to {link.peer} on link {link.link_id}"
    return h


def enqueue_recv(mover: GpuMover, link: NcclLink, dst: Endpoint, d_idx: Any, rows: int,
                 check: bool, blocks: list[Block] | None = None) -> GpuHandle:
    """Event loop: ncclRecv into a buffer of its own on the link's stream, then scatter on a lane stream - by 2-D
    DMA blocks buffer -> pool when given (regions.long_blocks), else one index kernel over `d_idx()` (the row map on
    the device). Must be called in the order the sender announced its chunks (the data loop calls it as each
    announcement is handled, in message order)."""
    link.check()
    b = link.device
    lb = mover.lane(b)
    nbytes = rows * dst.layout.row_bytes
    h = GpuHandle(completion_event(), f"NCCL recv from {link.peer} on link {link.link_id}", nbytes,
                  keep=[dst.flat], lane=lb)
    # the buffer is only ever freed once every use of it completed, so its allocator stream does not matter
    packed = torch.empty((rows, dst.rows.shape[1]), dtype=dst.rows.dtype, device=dst.device)
    h.keep.append(packed)
    ls, sb = link.stream, lb.stream
    link.comm.recv(packed.data_ptr(), nbytes, _nccl.NCCL_UINT8, 0, ls.cuda_stream)  # no device switch: enqueue_send
    if blocks is not None and not check:  # scatter by the copy engine: no current device or stream needed
        sb.wait_stream(ls)
        scatter_blocks(dst.flat.data_ptr(), packed.data_ptr(), blocks, D2D, sb)
        h.event.record(sb)
        h.key = id(sb)
        return h
    with on_device(b):
        sb.wait_stream(ls)
        with torch.cuda.stream(sb):
            if check:
                h.parts = torch.empty((2, 4), dtype=torch.int32, pin_memory=True)
                h.parts[1].copy_(checksum_parts(packed), non_blocking=True)
            if blocks is not None:
                scatter_blocks(dst.flat.data_ptr(), packed.data_ptr(), blocks, D2D, sb)
            else:
                idx = d_idx()
                h.keep.append(idx)
                dst.rows.index_copy_(0, idx, packed)
        h.event.record(sb)
    h.key = id(sb)
    return h


DISCARD_MAX_BYTES = 1 << 30  # an announcement larger than this is not received into scratch: the link is aborted


def enqueue_discard(link: NcclLink, nbytes: int) -> GpuHandle:
    """Event loop: receive an announced chunk the receiver refuses into a scratch buffer, so the link's next
    operations still pair up (every announcement gets exactly one receive). `h.event`: received."""
    link.check()
    h = GpuHandle(completion_event(), f"NCCL discard from {link.peer} on link {link.link_id}", nbytes)
    scratch = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", link.device))
    h.keep.append(scratch)
    with on_device(link.device):
        link.comm.recv(scratch.data_ptr(), nbytes, _nccl.NCCL_UINT8, 0, link.stream.cuda_stream)
        h.event.record(link.stream)
    return h


def handle_digest(h: GpuHandle, row: int) -> int | None:
    return digest(h.parts[row].tolist(), h.nbytes) if h.parts is not None else None


class NcclLinks:
    """Directed links of this streamer: the ones it sends on (keyed by peer, source device, destination pool)
    and the ones it receives on (keyed by peer and link id). Event-loop side; CUDA work goes to `on_gpu`.

    Handshake: sender -> NcclOffer; the receiver checks it can take the pool over NCCL, answers NcclAccepted
    at once (or refuses: the sender then uses frames for that pool) and starts its rank's init; the sender
    starts its own on the answer. The receiver holds RemoteOpened for a transfer on a link until its rank is
    up, and the sender opens transfers only once its rank is up, so no chunk meets a half-built link."""

    def __init__(self, on_gpu: Any, init_timeout: float) -> None:
        self._on_gpu, self._init_timeout = on_gpu, init_timeout
        self.sending: dict[tuple[str, int, str], NcclLink] = {}
        self.receiving: dict[tuple[str, int], NcclLink] = {}
        self.ready: dict[tuple[str, int], asyncio.Future[None]] = {}  # (sender, link id) -> its rank is up
        self._locks: dict[tuple[str, int, str], asyncio.Lock] = {}
        self._aborting: set[asyncio.Task[None]] = set()  # abort_soon's tasks, referenced until done

    async def sender(self, peer: Any, src_device: int, dst_pool: str) -> NcclLink:
        """The live link to `peer` for this pool, building it if needed. Raises TransportUnavailableError if the
        peer cannot receive over NCCL into that pool, PeerDeadError if it does not join in time."""
        from streamer import wire
        from streamer.peer import raise_if_refused

        key = (peer.name, src_device, dst_pool)
        async with self._locks.setdefault(key, asyncio.Lock()):
            link = self.sending.get(key)
            if link is not None and not link.dead:
                return link
            link_id = next_link_id()
            uid = await self._on_gpu(new_unique_id)
            link = await self._on_gpu(NcclLink, link_id, peer.name, 0, src_device)
            answer = await peer.request(wire.NcclOffer(link_id, uid, src_device, dst_pool), ("nccl", link_id),
                                        f"NCCL offer {link_id}")
            raise_if_refused(answer, f"NCCL link to {peer.name} for pool {dst_pool!r}")
            await link.init(uid, self._init_timeout)
            self.sending[key] = link
            return link

    async def receiver(self, sender: str, offer: Any, device: int) -> NcclLink:
        """Register the receiving rank and start its init in the background (see the class docstring)."""
        link = await self._on_gpu(NcclLink, offer.link, sender, 1, device)
        old = self.receiving.pop((sender, offer.link), None)
        if old is not None:
            await self.abort(old)
        self.receiving[(sender, offer.link)] = link
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready[(sender, offer.link)] = ready

        async def join() -> None:
            try:
                await link.init(list(offer.uid), self._init_timeout)
            except Exception as e:  # noqa: BLE001 - surfaces to whoever waits on `ready`
                self.receiving.pop((sender, offer.link), None)
                if not ready.done():
                    ready.set_exception(e)
            else:
                if not ready.done():
                    ready.set_result(None)

        task = asyncio.ensure_future(join())
        ready.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)  # never "never retrieved"
        link.joining = task  # type: ignore[attr-defined]
        return link

    def is_ready(self, link: NcclLink) -> bool:
        """The receiving rank is up (its init and connect are done) and the link alive."""
        fut = self.ready.get((link.peer, link.link_id))
        return (fut is None or (fut.done() and not fut.cancelled() and fut.exception() is None)) and not link.dead

    async def wait_ready(self, link: NcclLink) -> None:
        fut = self.ready.get((link.peer, link.link_id))
        if fut is None:
            return
        if fut.done():
            fut.result()  # raises if the rank never came up
            return
        await asyncio.wait_for(asyncio.shield(fut), self._init_timeout + 1.0)

    def abort_soon(self, link: NcclLink) -> None:
        """`abort` from code that cannot wait: the link is marked dead at once, the abort runs as a task."""
        link.dead = True
        task = asyncio.ensure_future(self.abort(link))
        self._aborting.add(task)
        task.add_done_callback(self._aborting.discard)

    async def abort(self, link: NcclLink) -> None:
        await abort_link(link)  # on a thread of its own: another may be blocked on this very link
        for table in (self.sending, self.receiving):
            for k, v in list(table.items()):
                if v is link:
                    del table[k]

    async def abort_peer(self, peer: str) -> None:
        for link in [*self.sending.values(), *self.receiving.values()]:
            if link.peer == peer:
                await self.abort(link)

    async def close(self) -> None:
        for link in [*self.sending.values(), *self.receiving.values()]:
            await abort_link(link)
        self.sending.clear()
        self.receiving.clear()
