"""Executing one transfer: a source region split into routes (by layer), each route a pipeline of chunks
gated by the stage's "layer ready" signals. Runs on the streamer's event loop; movers do the copying.

    local route   chunk -> mover.start (gather/copy/scatter enqueued) -> mover.finish (done + verified)
    remote route  per chunk: read packed rows (frames) or gather + enqueue the send (NCCL), announce it -
                  chunk 0 inside the transfer's RemoteOpen - and await the ack -> the last ack says the
                  receiver committed

Pipelining: up to `depth` chunks of a route are in flight (GPU: two per lane; remote: `window` unacked), so
layer l+1's gather overlaps layer l's copy, and layer l's copy overlaps the stage computing layer l+1.
Failure: the first error of any route fails the whole transfer; in-flight device work is drained before the
transfer ends (the memory it touches stays valid until then), and a remote receiver is told to abort, so a
failed transfer is never half-delivered. Deadlines: the whole transfer (`deadline_s` or transfer_timeout_s;
kept by one watchdog per loop, _Watchdog: enforced within 50 ms), each wait for a layer (layer_timeout_s), each
answer from a peer (peer_timeout_s; PeerLink.answer, also within 50 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from streamer import trace, wire
from streamer.config import StreamerConfig
from streamer.cuda import synchronize_async, wait_event
from streamer.endpoints import Endpoint
from streamer.errors import (
    CancelledError,
    PeerDeadError,
    StreamerError,
    TransferTimeoutError,
    TransportUnavailableError,
)
from streamer.integrity import checksum
from streamer.layout import PoolLayout, Region
from streamer.movers import CpuMover, MoveJob, RouteIndex, SendBuffers, gather_cpu
from streamer.peer import PeerNet, raise_if_refused, tensor_frame
from streamer.regions import (
    Chunk,
    PairBlock,
    check_compatible,
    direct_worthwhile,
    dtype_name,
    pair_blocks,
    plan_chunks,
    plan_direct,
    region_blocks,
    region_to_spec,
)


@dataclass
class LocalRoute:
    src_region: Region
    dst: Endpoint
    dst_region: Region
    index: RouteIndex
    chunks: list[Chunk]
    # GPU routes made of long pieces: per chunk, 2-D DMA blocks pool to pool (used when buffered; see
    # regions.pair_blocks) - no staging, so chunks are whole layers and no kernel runs on the stage's GPU
    blocks: list[list[PairBlock]] | None = None


@dataclass
class RemoteRoute:
    src_region: Region
    peer: str
    dst_pool: str
    dst_region: Region
    index: RouteIndex  # source rows only
    chunks: list[Chunk] | None  # None: planned by the transfer once it knows the path (NCCL chunks are larger)
    origin: str = ""  # set when this push answers a peer's PullRequest
    origin_xfer: int = 0


DIRECT_CHUNK_BYTES = 64 << 20  # chunk size of direct (DMA-only) GPU routes: progress granularity, not staging


def local_route(src: Endpoint, region: Region, dst: Endpoint, dst_region: Region, chunk_bytes: int,
                layered: bool) -> LocalRoute:
    """Validate and plan a route between two endpoints of this process."""
    check_compatible(src.layout, region, dst.layout, dst_region)
    index = RouteIndex.build(src, region, dst, dst_region)
    rb = src.layout.row_bytes
    if (src.is_cuda or dst.is_cuda) and direct_worthwhile(region, rb, layered):
        chunks, blocks = direct_plan(src.layout, region, dst.layout, dst_region, chunk_bytes, layered)
        return LocalRoute(region, dst, dst_region, index, chunks, blocks)
    return LocalRoute(region, dst, dst_region, index, plan_chunks(region, rb, chunk_bytes, layered))


def direct_plan(src: PoolLayout, region: Region, dst: PoolLayout, dst_region: Region, chunk_bytes: int,
                layered: bool) -> tuple[list[Chunk], list[list[PairBlock]]]:
    """Chunks and pool-to-pool DMA blocks of a direct route (regions already checked). Planned once per region
    *shape* - slots, token ranges, layer count, the two layouts - and moved to the route's layers by adding a
    constant per side: every layer of a pool is laid out alike, so a stream of prompt layers (same slots, a new
    layer each time) plans once. Planning was half of the loop's time per transfer in a stream of prompt
    layers to a peer GPU (2xH200, bench/probe_remote.py)."""
    chunks, blocks = _direct_shape(src, region.slots, region.tokens, dst, dst_region.slots, dst_region.tokens,
                                   region.num_layers, chunk_bytes, layered)
    ds, dd = region.layers[0] - src.first_layer, dst_region.layers[0] - dst.first_layer
    if ds == 0 and dd == 0:
        return list(chunks), [list(b) for b in blocks]
    sb, db = ds * src.layer_bytes, dd * dst.layer_bytes
    return ([Chunk(c.index, c.r0, c.r1, c.layer + ds, tuple(x + ds for x in c.completes)) for c in chunks],
            [[PairBlock(b.src_off + sb, b.src_pitch, b.dst_off + db, b.dst_pitch, b.width, b.height) for b in bs]
             for bs in blocks])


@functools.lru_cache(maxsize=4096)
def _direct_shape(src: PoolLayout, slots: tuple[int, ...], tokens: tuple[tuple[int, int], ...], dst: PoolLayout,
                  dst_slots: tuple[int, ...], dst_tokens: tuple[tuple[int, int], ...], layers: int, chunk_bytes: int,
                  layered: bool) -> tuple[tuple[Chunk, ...], tuple[tuple[PairBlock, ...], ...]]:
    """The direct plan of this shape with its layers starting at each pool's first layer."""
    region = Region(slots, (src.first_layer, src.first_layer + layers), tokens)
    dst_region = Region(dst_slots, (dst.first_layer, dst.first_layer + layers), dst_tokens)
    chunks = plan_direct(region, src.row_bytes, max(chunk_bytes, DIRECT_CHUNK_BYTES), layered)
    a = region.layers[0]
    blocks = [pair_blocks(src, region, dst, dst_region, (c.completes[0] - a, c.completes[-1] + 1 - a))
              for c in chunks]
    return tuple(chunks), tuple(tuple(b) for b in blocks)


def group_chunks(chunks: list[Chunk], layered: bool, most: int) -> list[list[Chunk]]:
    """Consecutive chunks handed to a mover in one call (one hop to the GPU thread for all of them): a layered
    route's chunks of one layer (they become ready together), else up to `most` at a time."""
    groups: list[list[Chunk]] = []
    for c in chunks:
        if groups and len(groups[-1]) < most and (not layered or groups[-1][-1].layer == c.layer):
            groups[-1].append(c)
        else:
            groups.append([c])
    return groups


@dataclass
class Runtime:
    """What transfers need from the process (built by the service)."""

    config: StreamerConfig
    cpu: CpuMover
    gpu: Any  # GpuMover | None
    peers: PeerNet
    cpu_executor: Executor  # frames to and from peer streamers: gathers, scatters, their checksums
    on_gpu: Callable[..., Awaitable[Any]]  # run a function on the GPU thread
    nccl: Any = None  # NcclLinks | None
    no_nccl: set[tuple[str, str]] | None = None  # (peer, pool) that refused NCCL: use frames
    send_buffers: SendBuffers | None = None

    def __post_init__(self) -> None:
        if self.send_buffers is None:
            chunk = min(self.config.staging_bytes, self.config.tcp_chunk_bytes)
            self.send_buffers = SendBuffers(chunk, 4 * self.config.window)


class _Watchdog:
    """The deadlines of every transfer running on a loop, checked by one timer every PERIOD_S. asyncio.timeout
    armed and cancelled a timer per transfer: a fifth of the loop's time per transfer in a stream of prompt
    layers to a peer GPU (py-spy, 2xH200, bench/probe_remote.py, session 8). A transfer is interrupted at most
    PERIOD_S after its deadline; deadlines are seconds (transfer_timeout_s, a request's deadline_s)."""

    PERIOD_S = 0.05

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._live: dict[Transfer, asyncio.Task[Any]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, t: Transfer, task: asyncio.Task[Any]) -> None:
        self._live[t] = task
        if self._timer is None:
            self._timer = self.loop.call_later(self.PERIOD_S, self._check)

    def forget(self, t: Transfer) -> None:
        self._live.pop(t, None)

    def _check(self) -> None:
        now = self.loop.time()
        for t in [t for t in self._live if t._t_end <= now]:
            t._expire(self._live.pop(t))
        self._timer = self.loop.call_later(self.PERIOD_S, self._check) if self._live else None


_WATCHDOG: list[_Watchdog] = []


def _watchdog(loop: asyncio.AbstractEventLoop) -> _Watchdog:
    if not _WATCHDOG or _WATCHDOG[0].loop is not loop:
        _WATCHDOG[:] = [_Watchdog(loop)]
    return _WATCHDOG[0]


def _first_error(eg: BaseExceptionGroup) -> BaseException:
    flat: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            flat.append(e)

    walk(eg)
    return next((e for e in flat if isinstance(e, StreamerError)), flat[0])


def _read_cpu(src: Endpoint, idx: torch.Tensor, buffered: bool, check: bool,
              buf: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    data = gather_cpu(src, idx, buffered, buf)
    return data, (checksum(data) if check else None)


class Transfer:
    def __init__(self, rt: Runtime, owner: str, xfer: int, tag: str, src: Endpoint,
                 routes: list[LocalRoute | RemoteRoute], *, layered: bool, checksum: bool | None, buffered: bool,
                 deadline_s: float, notify: list[str],
                 on_layer: Callable[[int, int, int], Awaitable[None]] | None = None) -> None:
        self.rt, self.owner, self.xfer, self.tag, self.src = rt, owner, xfer, tag, src
        self.routes, self.layered, self.checksum, self.buffered = routes, layered, checksum, buffered
        self.deadline_s, self.notify, self.on_layer = deadline_s, notify, on_layer
        self.nbytes = 0
        self.layers_done = 0
        self._ready: dict[int, asyncio.Event] = {}
        self._abort: StreamerError | None = None
        self._t_end = 0.0
        self._expired = False
        self.task: asyncio.Task[None] | None = None
        self.incarnation = 0  # the requester's (a dead process's transfers are told apart from its successor's)
        self.times: dict[int, list[float]] | None = None  # {} to record LayerTimes (StreamRequest.timeline)

    def checks(self, r: LocalRoute | RemoteRoute) -> bool:
        """Whether route `r`'s bytes are checksummed: as the request (or an "all"/"off" default) says, else by
        the "remote" policy (StreamerConfig.checksums): remote routes and disk pools yes, local DMA no."""
        if self.checksum is not None:
            return self.checksum
        return isinstance(r, RemoteRoute) or wire.POOL_DISK in (self.src.kind, r.dst.kind)

    @property
    def checksummed(self) -> bool:
        """Every byte of this transfer verified (TransferDone.checksummed)."""
        return all(self.checks(r) for r in self.routes)

    # ------------------------------------------------------------------ control from the service

    def touches(self, ep: Endpoint) -> bool:
        return self.src is ep or any(isinstance(r, LocalRoute) and r.dst is ep for r in self.routes)

    def layer_ready(self, layer: int) -> None:
        self._mark(layer, 0)
        self._ready.setdefault(layer, asyncio.Event()).set()

    def _mark(self, layer: int, step: int) -> None:
        """Timeline: step 0 ready, 1 fired, 2 issued, 3 landed (the first time each happens)."""
        if self.times is not None:
            t = self.times.setdefault(layer, [0.0, 0.0, 0.0, 0.0])
            if not t[step]:
                t[step] = time.monotonic()

    def timeline(self) -> list[wire.LayerTimes]:
        return [wire.LayerTimes(layer, *t) for layer, t in sorted((self.times or {}).items())]

    def abort(self, exc: StreamerError) -> None:
        """Fail the transfer with `exc` (cancel, owner down, pool unregistered)."""
        if self._abort is None:
            self._abort = exc
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # ------------------------------------------------------------------ execution

    async def run(self) -> float:
        """Move everything; returns seconds taken. Raises a StreamerError (never a bare timeout)."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._t_end = loop.time() + self.deadline_s
        task = asyncio.current_task()
        assert task is not None
        watchdog = _watchdog(loop)
        watchdog.watch(self, task)
        try:
            try:
                if len(self.routes) == 1:  # the common case: no task group (host time per transfer matters)
                    r = self.routes[0]
                    await (self._local(r) if isinstance(r, LocalRoute) else self._remote(r))
                else:
                    async with asyncio.TaskGroup() as tg:
                        for r in self.routes:
                            tg.create_task(self._local(r) if isinstance(r, LocalRoute) else self._remote(r))
            except asyncio.CancelledError:
                if self._expired and self._abort is None and task.uncancel() == 0:
                    raise TimeoutError from None  # the watchdog's cancel, nobody else's
                raise
        except BaseExceptionGroup as eg:
            err = _first_error(eg)
            if isinstance(err, asyncio.CancelledError) and self._abort is not None:
                raise self._abort from None
            raise err from None
        except asyncio.CancelledError:
            if self._abort is not None:
                raise self._abort from None
            raise
        except StreamerError:
            raise
        except TimeoutError:
            raise TransferTimeoutError(f"transfer {self.xfer} of {self.owner} not done within {self.deadline_s:.1f}s "
                                       f"(request deadline_s, default setting transfer_timeout_s)") from None
        finally:
            watchdog.forget(self)
        return time.perf_counter() - t0

    def _expire(self, task: asyncio.Task[Any]) -> None:
        """The watchdog: past the deadline - interrupt whatever the transfer waits for (run() turns it into a
        TransferTimeoutError)."""
        self._expired = True
        task.cancel()

    def _left(self) -> float:
        return max(0.0, self._t_end - asyncio.get_running_loop().time()) + 1e-3

    async def _gate(self, layer: int) -> None:
        """Before the copies of a group whose highest layer is `layer` are issued: a layered transfer waits for
        its LayerReady; then, with layer_wait="host", any transfer from a GPU stage pool waits for the stage's
        event of that layer (recorded in layer order on the stage's stream, so it covers the group's lower
        layers too). With layer_wait="device" the mover makes its copy stream wait on the event instead."""
        t = self.rt.config.layer_timeout_s
        if not self.layered:
            if self.rt.config.layer_wait == "host":
                await self._host_wait(layer, t)
            self._mark(layer, 1)
            return
        ev = self._ready.setdefault(layer, asyncio.Event())
        if not ev.is_set():
            try:
                await asyncio.wait_for(ev.wait(), t)
            except TimeoutError:
                raise PeerDeadError(f"transfer {self.xfer}: {self.owner} sent no LayerReady for layer {layer} within "
                                    f"{t:.1f}s (setting: layer_timeout_s)") from None
        if self.rt.config.layer_wait == "host":
            await self._host_wait(layer, t)
        self._mark(layer, 1)

    async def _host_wait(self, layer: int, timeout: float) -> None:
        """layer_wait="host": wait on a waiter thread until the stage's event for `layer` has fired, so the copy
        issued next finds its input ready and no wait of this process sits on the stage's GPU meanwhile."""
        gpu_event = self.src.layer_event(layer)
        if gpu_event is None:
            return
        device = self.src.device
        index = device.index if device.type == "cuda" else None
        try:
            if index is not None:
                # an interprocess event: queried with its owning device current (streamer/cuda.py); switching
                # only when it is not (the context manager was ~15% of the loop's time per peer transfer)
                if torch.cuda.current_device() == index:
                    if gpu_event.query():  # already computed (a region at rest): no thread hop
                        return
                else:
                    with torch.cuda.device(index):
                        if gpu_event.query():
                            return
            await asyncio.wait_for(asyncio.shield(synchronize_async(gpu_event, index)), timeout)
        except TimeoutError:
            after = "of its LayerReady " if self.layered else ""
            raise PeerDeadError(f"transfer {self.xfer}: layer {layer} of {self.owner} not computed within {timeout:.1f}s "
                                f"{after}(setting: layer_timeout_s)") from None
        except Exception as e:  # a CUDA error on the event: the stage's context is gone
            raise PeerDeadError(f"transfer {self.xfer}: waiting for layer {layer} of {self.owner} failed: {e}") from None

    def _issued(self, g: list[Chunk]) -> None:
        if self.times is not None:
            for c in g:
                self._mark(c.layer, 2)

    async def _chunk_done(self, c: Chunk) -> None:
        self.nbytes += c.rows * self.src.layout.row_bytes
        for layer in c.completes:
            self._mark(layer, 3)
            self.layers_done += 1
            if self.on_layer is not None:
                await self.on_layer(layer, self.layers_done, self.nbytes)

    async def _pipeline(self, groups: list[list[Chunk]], depth: int,
                        start: Callable[[list[Chunk]], Awaitable[list[Any]]],
                        settle: Callable[[Chunk, Any], Awaitable[None]],
                        drain: Callable[[Any], Awaitable[None]] | None = None,
                        start_now: Callable[[list[Chunk]], list[Any] | None] | None = None) -> None:
        """Start groups of chunks in order (each once its layer is ready, at most `depth` groups unsettled; one
        `start` call per group returns one handle per chunk), settle chunks in order as they complete (so
        progress for layer l is reported the moment it lands, not when the window fills). On failure, whatever
        was started but not settled is handed to `drain`. `start_now`: starts a group right here when it can
        (inline DMA: no task, no thread hop, nothing to shield) and returns its handles, else None."""
        if len(groups) == 1:  # one group (a decode step, a whole-region DMA): start, settle, no tasks
            await self._gate(max(c.layer for c in groups[0]))
            hs = start_now(groups[0]) if start_now is not None else None
            if hs is None:
                job = asyncio.ensure_future(start(groups[0]))
                try:
                    hs = await asyncio.shield(job)
                except asyncio.CancelledError:  # enqueued work is drained, never dropped (as in the producer)
                    with contextlib.suppress(Exception):
                        hs = await job
                        if drain is not None:
                            await asyncio.shield(self._drain_all(drain, list(hs)))
                    raise
            self._issued(groups[0])
            for k, (c, h) in enumerate(zip(groups[0], hs)):
                try:
                    await settle(c, h)
                except BaseException:
                    if drain is not None:
                        await asyncio.shield(self._drain_all(drain, list(hs[k:])))
                    raise
                await self._chunk_done(c)
            return
        started: deque[tuple[Chunk, Any, bool]] = deque()  # (chunk, handle, last of its group)
        slots = asyncio.Semaphore(depth)
        more = asyncio.Event()

        async def producer() -> None:
            for g in groups:
                await self._gate(max(c.layer for c in g))
                await slots.acquire()
                hs = start_now(g) if start_now is not None else None
                if hs is None:
                    job = asyncio.ensure_future(start(g))
                    try:
                        hs = await asyncio.shield(job)
                    except asyncio.CancelledError:
                        # work handed to the GPU thread cannot be called back: let it finish being enqueued so
                        # its handles are drained like the others, then stop
                        with contextlib.suppress(Exception):
                            hs = await job
                            started.extend((c, h, False) for c, h in zip(g, hs))
                        raise
                started.extend((c, h, i == len(g) - 1) for i, (c, h) in enumerate(zip(g, hs)))
                self._issued(g)
                more.set()

        async def consumer() -> None:
            for _ in range(sum(len(g) for g in groups)):
                while not started:
                    more.clear()
                    await more.wait()
                c, h, last = started[0]
                await settle(c, h)
                started.popleft()
                await self._chunk_done(c)
                if last:
                    slots.release()

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(producer())
                tg.create_task(consumer())
        except BaseException:
            if drain is not None and started:
                handles = [h for _, h, _ in started]
                started.clear()
                await asyncio.shield(self._drain_all(drain, handles))
            raise

    @staticmethod
    async def _drain_all(drain: Callable[[Any], Awaitable[None]], handles: list[Any]) -> None:
        for h in handles:
            try:
                await drain(h)
            except Exception:  # noqa: BLE001 - the transfer already failed; this only waits
                pass

    async def _local(self, r: LocalRoute) -> None:
        gpu = self.src.is_cuda or r.dst.is_cuda
        mover = self.rt.gpu if gpu else self.rt.cpu
        if mover is None:
            raise TransportUnavailableError(f"{self.src.name} -> {r.dst.name} needs the CUDA mover (no GPU here)")
        if r.dst.is_host_pool:
            r.dst.begin_write(r.dst_region)
        direct = gpu and self.buffered and r.blocks is not None
        check = self.checks(r)
        chunks = r.chunks if direct or r.blocks is None else \
            plan_chunks(r.src_region, self.src.layout.row_bytes, self.rt.config.staging_bytes, self.layered)
        # GPU: every chunk of a group is enqueued in one hop to the GPU thread; the device orders them (the
        # lanes' events), so the host never waits between chunks. CPU: one chunk at a time.
        groups = group_chunks(chunks, self.layered, 64 if gpu else 1)

        def job(c: Chunk) -> MoveJob:
            return MoveJob(self.src, r.dst, r.index, c, self.buffered, check,
                           c.layer if self.src.is_cuda else None, r.blocks[c.index] if direct else None)

        async def start(g: list[Chunk]) -> list[Any]:
            if gpu:
                return await mover.start_many([job(c) for c in g])
            return [await mover.start(job(c)) for c in g]

        def start_now(g: list[Chunk]) -> list[Any] | None:
            return mover.start_now([job(c) for c in g])

        async def settle(c: Chunk, h: Any) -> None:
            await mover.finish(h, self._left())

        async def drain(h: Any) -> None:  # device work must end before the memory it touches can go
            await mover.finish(h, self.rt.config.peer_timeout_s)

        # only unchecked direct chunks can start inline (GpuMover.start_now); other groups skip the attempt
        await self._pipeline(groups, 2 if gpu else 1, start, settle, drain,
                             start_now if direct and not check else None)
        if r.dst.is_host_pool:
            r.dst.commit_write(r.dst_region)

    # ------------------------------------------------------------------ remote routes

    def _open(self, r: RemoteRoute, rseq: int, via: int, link: int, answer: bool = True) -> wire.RemoteOpen:
        lay = self.src.layout
        return wire.RemoteOpen(rseq, r.dst_pool, region_to_spec(r.dst_region), len(r.chunks),
                               r.src_region.nbytes(lay), dtype_name(lay.dtype), lay.row_bytes, self.checks(r), via,
                               link, self.tag, list(self.notify), r.origin, r.origin_xfer, answer)

    async def _remote(self, r: RemoteRoute) -> None:
        peer = self.rt.peers.link(r.peer)
        no_nccl = self.rt.no_nccl if self.rt.no_nccl is not None else set()
        if (self.src.is_cuda and self.rt.nccl is not None and self.rt.config.nccl
                and (r.peer, r.dst_pool) not in no_nccl):
            try:
                link = await self.rt.nccl.sender(peer, self.src.device.index, r.dst_pool)
            except TransportUnavailableError:
                no_nccl.add((r.peer, r.dst_pool))  # remember: that pool takes frames
            else:
                # NCCL chunks are gathered into buffers of their own (not staging) and each costs an announcement
                # and an answer: fewer, larger ones (a whole prompt layer is one)
                r.chunks = plan_chunks(r.src_region, self.src.layout.row_bytes,
                                       max(self.rt.config.staging_bytes, DIRECT_CHUNK_BYTES), self.layered)
                return await self._remote_via(r, peer, link)
        if r.chunks is None:  # frames: one chunk per staging buffer (and at most tcp_chunk_bytes)
            cfg = self.rt.config
            r.chunks = plan_chunks(r.src_region, self.src.layout.row_bytes,
                                   min(cfg.staging_bytes, cfg.tcp_chunk_bytes), self.layered)
        await self._remote_via(r, peer, None)

    async def _remote_via(self, r: RemoteRoute, peer: Any, link: Any) -> None:
        """Push the route to a peer streamer: frames (TCP) when `link` is None, else NCCL on `link`.

        The open rides with chunk 0 (wire.RemoteOpen.first: one message less per transfer - a prompt layer is
        one chunk), and the chunks follow without waiting a round trip for its answer. The peer registers (or
        refuses) the open before it handles the chunk, and answers a refusal before any chunk's ack (it answers
        in message order), so the refusal is what the transfer fails with; an accepted open with chunks is not
        answered at all - the acks say it. The transfer's `rseq` is drawn when its open is sent (in the same
        loop step), because the peer takes a sender's opens in increasing rseq order only. NCCL: a refused
        transfer's announced chunks are still received (into scratch) by the peer, so the link stays in step
        (wire.RemoteChunk); only a link's first transfer sends its open alone and waits for the answer, which also
        says the peer's rank is up."""
        via, link_id = (wire.VIA_FRAME, 0) if link is None else (wire.VIA_NCCL, link.link_id)
        refused = f"{r.peer} refused transfer into {r.dst_pool!r}"
        rseq = 0  # 0 until the open is sent
        opened: asyncio.Future[Any] | None = None  # the open's answer, awaited before the first ack counts
        refusal: asyncio.Future[Any] | None = None  # the open's answer if it is a refusal (none comes otherwise)
        deferred = bool(r.chunks) and (link is None or link.confirmed)
        if not deferred:
            rseq = peer.next_rseq()
            if trace.ON:
                trace.mark("open", self.xfer, rseq)
            what = f"open of transfer {rseq}"
            if link is None or link.confirmed:  # no chunks: the answer is all there is
                fut = peer.expect(("open", rseq))
                await peer.send(self._open(r, rseq, via, link_id))
                opened = asyncio.ensure_future(peer.answer(fut, what))
            else:
                raise_if_refused(await peer.request(self._open(r, rseq, via, link_id), ("open", rseq), what), refused)
                link.confirmed = True
                if trace.ON:
                    trace.mark("opened", self.xfer, rseq)
        committed = not r.chunks
        pt = self.rt.config.peer_timeout_s

        def announce(c: Chunk, nbytes: int, checksum: int | None, on_link: int) -> tuple[Any, asyncio.Future[Any]]:
            """Chunk c's announcement - inside the open, for chunk 0 of a deferred open - and the future of its
            ack. Sent by the caller in this same loop step (no await in between)."""
            nonlocal rseq, refusal
            if not rseq:
                rseq = peer.next_rseq()
                if trace.ON:
                    trace.mark("open", self.xfer, rseq)
                refusal = peer.expect(("open", rseq))
            msg = wire.RemoteChunk(rseq, c.index, [c.r0, c.r1], nbytes, checksum, on_link)
            body = msgspec.structs.replace(self._open(r, rseq, via, link_id, answer=False), first=msg) \
                if deferred and c.index == r.chunks[0].index else msg
            return body, peer.expect(("chunk", rseq, c.index))

        async def check_open() -> None:
            nonlocal opened
            if opened is not None:
                answer, opened = await opened, None
                raise_if_refused(answer, refused)
            if refusal is not None and refusal.done() and not refusal.cancelled():
                raise_if_refused(refusal.result(), refused)

        async def start(g: list[Chunk]) -> list[tuple[Any, asyncio.Future[Any]]]:
            return [await start_one(c) for c in g]

        async def start_one(c: Chunk) -> tuple[Any, asyncio.Future[Any]]:  # frames (NCCL chunks: `now` below)
            if trace.ON:
                trace.mark("read", self.xfer, rseq, c.index)
            data, dg, buf = await self._read(r, c)
            if trace.ON:
                trace.mark("framed", self.xfer, rseq, c.index)
            body, fut = announce(c, data.numel() * data.element_size(), dg, 0)
            await peer.send(body, [tensor_frame(data)])
            if trace.ON:
                trace.mark("frame_sent", self.xfer, rseq, c.index)
            return buf, fut

        async def settle(c: Chunk, h: tuple[Any, asyncio.Future[Any]]) -> None:
            nonlocal committed
            await check_open()
            held, fut = h  # frames: the send buffer; NCCL: a future of the send's handle (see _nccl_start)
            if link is not None:
                held = await held
                try:
                    await wait_event(held.event, pt, held.what, "peer_timeout_s", self.rt.gpu.spin_nccl(held.nbytes),
                                     id(link.stream))
                except TransferTimeoutError:
                    await self.rt.nccl.abort(link)  # never wait on NCCL forever: abort, the peer is gone
                    raise PeerDeadError(f"NCCL send to {r.peer} did not complete within {pt:.1f}s (setting: "
                                        f"peer_timeout_s); link {link.link_id} aborted") from None
                if trace.ON:
                    trace.mark("sent", self.xfer, rseq, c.index)
            answer = await peer.answer(fut, f"chunk {c.index} of transfer {rseq}")
            if trace.ON:
                trace.mark("acked", self.xfer, rseq, c.index)
            if not getattr(answer, "ok", True):
                await check_open()  # a chunk refused because its transfer was: fail with the open's reason
            raise_if_refused(answer, f"{r.peer} rejected chunk {c.index} of transfer {rseq}")
            committed = bool(answer.committed)
            if link is None and held is not None:
                self.rt.send_buffers.release(held)  # acknowledged, so ZeroMQ has sent it

        async def drain(h: tuple[Any, asyncio.Future[Any]]) -> None:
            held, fut = h
            fut.cancel()
            if link is not None:  # an NCCL send may still read its buffer: let it finish, else abort the link
                held = await held  # a job that failed raises here (and has aborted the link)
                try:
                    await wait_event(held.event, pt, held.what, "peer_timeout_s")
                except TransferTimeoutError:
                    await self.rt.nccl.abort(link)

        try:
            # NCCL chunks start right in the pipeline's step (no task per transfer): _nccl_start never waits
            now = None if link is None else (lambda g: [self._nccl_start(r, c, peer, link, announce) for c in g])
            await self._pipeline([[c] for c in r.chunks], self.rt.config.window, start, settle, drain, now)
            await check_open()  # a transfer of no chunks has only this answer
        finally:
            if opened is not None:  # failed before its answer was read
                opened.cancel()
                await asyncio.gather(opened, return_exceptions=True)
            if rseq:  # else nothing was sent
                peer.forget(("open", rseq))
                for c in r.chunks:
                    peer.forget(("chunk", rseq, c.index))
                if not committed:
                    await self._abort_remote(peer, rseq)

    def _nccl_start(self, r: RemoteRoute, c: Chunk, peer: Any, link: Any,
                    announce: Callable[..., tuple[Any, asyncio.Future[Any]]]
                    ) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
        """Announce chunk `c` (`announce`: see _remote_via) and enqueue its gather (by DMA blocks when its pieces
        are long) and send on the link - all in this one step of the loop, with no await: the announcements
        leave in the order they are posted (PeerLink.post keeps order even when one has to wait for room), and
        the link's operations are enqueued in that same order, so both ranks agree without a lock. Returns a
        future of the send's handle - already settled unless the chunk is checked: its digest follows in its
        own message once the gather is done (the bytes do not wait for it) - and the future of its ack."""
        from streamer import nccl

        gm, dev, rb = self.rt.gpu, self.src.device.index, self.src.layout.row_bytes
        check = self.checks(r)
        blocks = region_blocks(self.src.layout, r.src_region, c.r0, c.r1)  # long pieces: DMA, no row map

        def s_idx() -> Any:  # the row map on the device, when the pieces are short
            return gm.device_index(r.index, dev, "src")[c.r0: c.r1]

        body, acked = announce(c, c.rows * rb, None, link.link_id)
        rseq = body.rseq
        if trace.ON:
            trace.mark("gather", self.xfer, rseq, c.index)
        queued = peer.post(body)
        try:
            h = nccl.enqueue_send(link, nccl.enqueue_gather(gm, self.src, s_idx, c.rows, check, c.layer, blocks))
        except BaseException:
            # announced but not sent: the peer's receive for it never completes, so the link is out of step
            self.rt.nccl.abort_soon(link)
            raise
        if queued is not None:  # an announcement that never leaves leaves its send unmatched: abort the link
            queued.add_done_callback(lambda f: None if not f.cancelled() and f.exception() is None
                                     else self.rt.nccl.abort_soon(link))
        if trace.ON:
            trace.mark("send_enqueued", self.xfer, rseq, c.index)
        if not check:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(h)
            return done, acked

        async def digest() -> Any:
            await wait_event(h.gathered, self._left(), f"gather for {h.what}", "transfer_timeout_s")
            await peer.send(wire.RemoteChunkDigest(rseq, c.index, nccl.handle_digest(h, 0)))
            return h

        return asyncio.ensure_future(digest()), acked

    async def _abort_remote(self, peer: Any, rseq: int) -> None:
        code = self._abort.code if self._abort is not None else wire.XFER_INTERNAL

        async def tell() -> None:
            try:
                await peer.send(wire.RemoteAbort(rseq, code, f"transfer {self.xfer} of {self.owner} failed"))
            except StreamerError:
                pass  # a dead peer has nothing to discard

        await asyncio.shield(tell())

    async def _read(self, r: RemoteRoute, c: Chunk) -> tuple[torch.Tensor, int | None, torch.Tensor | None]:
        """(packed rows in host memory, their checksum, the reusable buffer holding them or None)."""
        idx = r.index.src[c.r0: c.r1]
        if not self.src.is_cuda:
            loop = asyncio.get_running_loop()
            buf = self.rt.send_buffers.acquire(c.rows * self.src.layout.row_bytes)
            data, dg = await loop.run_in_executor(self.rt.cpu_executor, _read_cpu, self.src, idx, self.buffered,
                                                  self.checks(r), buf)
            return data, dg, buf
        check = self.checks(r)
        # DMA blocks when the pieces are long (a prompt layer) or cut by slot into long blocks (a decode step's
        # rows): copy engines only, so no kernel of this process's CUDA context competes with the stage's step
        # for the GPU; a checked chunk is then digested here on a CPU thread (GPU-gathered ones on the GPU)
        blocks = region_blocks(self.src.layout, r.src_region, c.r0, c.r1) if self.buffered else None
        h = await self.rt.gpu.read(self.src, r.index, c.r0, c.r1, self.buffered, check, c.layer, blocks)
        data, dg = await self.rt.gpu.finish_read(h, self._left())
        if check and dg is None:
            dg = await asyncio.get_running_loop().run_in_executor(self.rt.cpu_executor, checksum, data)
        return data, dg, None


def cancelled(xfer: int, reason: str) -> CancelledError:
    return CancelledError(f"transfer {xfer} cancelled: {reason or 'by its requester'}")
