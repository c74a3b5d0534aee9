"""`DataPlane`: what the streamer does with messages from peer streamers (its data ROUTER). Sibling of
StreamerService (pools, transfers, the GPU thread are shared through it); no sockets of its own.

    RemoteOpen        -> may this transfer land here? (Incoming.open)      -> RemoteOpened (a refusal; an
                                                                              acceptance only when asked for);
                         its chunk 0 may ride with it (`first`), handled next as a RemoteChunk
    RemoteChunk       -> verify the bytes, then scatter them (frame threads / GPU) -> RemoteChunkAck (committed
                                                                              on the last)
    RemoteChunkDigest -> the source digest of a checked NCCL chunk, sent after its bytes
    RemoteAbort       -> discard an uncommitted transfer
    PullRequest       -> push a region of one of our pools back to the asker -> (PullFailed on failure)
    NcclOffer         -> join a directed NCCL link                           -> NcclAccepted

Frames are verified *before* they are scattered, so corrupt bytes never reach a pool; an NCCL chunk is acked
only once its digest matched. NCCL chunks are received in the order they were announced (posted by the loop
as each announcement is handled, in message order), each announcement exactly once - into scratch when refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from bus.messages import Msg
from streamer import trace, wire
from streamer.cuda import wait_event
from streamer.endpoints import Endpoint
from streamer.engine import RemoteRoute, Transfer
from streamer.errors import (
    BadRequestError,
    IntegrityError,
    PeerDeadError,
    StreamerError,
    TransferTimeoutError,
    TransportUnavailableError,
    code_of,
)
from streamer.incoming import Inbound, Incoming
from streamer.integrity import checksum, verify
from streamer.movers import RouteIndex, scatter_cpu
from streamer.peer import frame_tensor
from streamer.regions import check_region, region_blocks, region_from_spec
from streamer.service import StreamerService

log = logging.getLogger(__name__)


def _apply_frame_cpu(dst: Endpoint, d_idx: Any, data: Any, expected: int | None, buffered: bool) -> None:
    if expected is not None:
        verify(expected, checksum(data), f"frame into {dst.name}")
    rows = data.view(dst.rows.dtype).view(d_idx.numel(), dst.rows.shape[1])
    scatter_cpu(dst, d_idx, rows, buffered)


class DataPlane:
    def __init__(self, svc: StreamerService) -> None:
        self.svc = svc
        self.incoming = Incoming(svc.pools.get)
        self._digests: dict[tuple[str, int, int], asyncio.Future[int]] = {}  # (sender, rseq, chunk): NCCL digests
        svc.pool_dropped.append(self._pool_dropped)

    def _pool_dropped(self, ep: Endpoint) -> None:
        for t in self.incoming.drop_pool(ep):
            log.info("[stream] incoming transfer %s from %s dropped with pool %s", t.open.rseq, t.sender, ep.name)

    async def _answer(self, peer: str, body: Msg, reply_to: int) -> None:
        await self.svc.outbox.data(peer, body, reply_to)

    async def handle(self, peer: str, incarnation: int, msg_id: int, body: Msg, frames: list[Any]) -> None:
        self.svc.last_heard[peer] = time.monotonic()  # a pull waiting on this peer knows it is alive
        try:
            if isinstance(body, wire.RemoteOpen):
                self._open(peer, incarnation, msg_id, body)
                if body.first is not None:  # chunk 0 rode with its open: handled as if it came next
                    self._chunk(peer, incarnation, msg_id, self._first(peer, body), frames)
            elif isinstance(body, wire.RemoteChunk):
                self._chunk(peer, incarnation, msg_id, body, frames)
            elif isinstance(body, wire.RemoteChunkDigest):
                self._digest_arrived(peer, body)
            elif isinstance(body, wire.RemoteAbort):
                if self.incoming.abort(peer, body.rseq) is not None:
                    log.info("[stream] %s aborted transfer %s: %s", peer, body.rseq, body.reason)
            elif isinstance(body, wire.PullRequest):
                self._pull(peer, msg_id, body)
            elif isinstance(body, wire.NcclOffer):
                self.svc.spawn(self._nccl_offer(peer, msg_id, body), f"nccl-offer-{peer}-{body.link}")
            else:
                log.warning("[stream] peer %s sent %s on the data socket; ignored", peer, type(body).__name__)
        except Exception:  # noqa: BLE001 - a bad peer message must not take the streamer down
            log.exception("[stream] handling %s from %s", type(body).__name__, peer)

    def sweep(self) -> None:
        """Periodic (the shell's janitor): forget incoming transfers whose sender went silent for longer than
        any transfer may take."""
        cfg = self.svc.config
        for k in [k for k, f in self._digests.items() if f.done() and k[:2] not in self.incoming.open_transfers]:
            del self._digests[k]  # a digest that came for a chunk nobody waits for any more
        for t in self.incoming.sweep(cfg.transfer_timeout_s + cfg.peer_timeout_s):
            log.warning("[stream] incoming transfer %s from %s abandoned by its sender; discarded", t.open.rseq,
                        t.sender)

    # ------------------------------------------------------------------ receiving

    @staticmethod
    def _first(peer: str, msg: wire.RemoteOpen) -> wire.RemoteChunk:
        """The chunk carried by an open, checked to belong to it: one naming another transfer is turned into a
        chunk of this one that no transfer accepts (out of range), so it is refused - and, announced on an NCCL
        link, still received into scratch."""
        first = msg.first
        assert first is not None
        if first.rseq != msg.rseq or first.chunk != 0:
            log.warning("[stream] %s sent chunk %s of transfer %s inside the open of %s", peer, first.chunk,
                        first.rseq, msg.rseq)
            return wire.RemoteChunk(msg.rseq, -1, first.rows, first.nbytes, first.checksum, first.link)
        return first

    def _open(self, peer: str, incarnation: int, msg_id: int, msg: wire.RemoteOpen) -> None:
        """Register the transfer now (in message order: rseq checks stay monotonic); answer at once, or - for an
        NCCL link whose receiving rank is still joining - once it is up."""
        link = None
        if trace.ON:
            trace.mark("rx_open", msg.rseq)
        try:
            t = self.incoming.open(peer, incarnation, msg)
            if msg.via == wire.VIA_NCCL:
                link = self._link(peer, msg.link, ready=False)
                if not t.dst.is_cuda or t.dst.device.index != link.device:
                    self.incoming.abort(peer, msg.rseq)
                    raise TransportUnavailableError(f"pool {t.dst.name!r} is not on the NCCL link's device")
        except StreamerError as e:
            self.svc.spawn(self._answer(peer, wire.RemoteOpened(msg.rseq, False, e.code, str(e)), msg_id), "refuse")
            return

        if (link is None or self.svc.rt.nccl.is_ready(link)) and not msg.answer and msg.nchunks:
            return  # accepted: the chunks' acks say so

        async def answer() -> None:
            if link is not None:
                try:
                    await self.svc.rt.nccl.wait_ready(link)
                except Exception as e:  # noqa: BLE001 - the link never came up: refuse the transfer
                    self.incoming.abort(peer, msg.rseq)
                    err = e if isinstance(e, StreamerError) else PeerDeadError(f"NCCL link {msg.link}: {e}")
                    await self._answer(peer, wire.RemoteOpened(msg.rseq, False, err.code, str(err)), msg_id)
                    return
            if msg.nchunks == 0 and self.incoming.applied(t, 0):
                await self._committed(t)
            if msg.answer or not msg.nchunks:
                await self._answer(peer, wire.RemoteOpened(msg.rseq, True), msg_id)
            if trace.ON:
                trace.mark("tx_opened", msg.rseq)

        self.svc.spawn(answer(), f"open-{peer}-{msg.rseq}")

    def _link(self, peer: str, link_id: int, ready: bool = True) -> Any:
        nccl = self.svc.rt.nccl
        link = nccl.receiving.get((peer, link_id)) if nccl is not None else None
        if link is None or link.dead or (ready and link.comm is None):
            raise TransportUnavailableError(f"no live NCCL link {link_id} from {peer}")
        return link

    def _chunk(self, peer: str, incarnation: int, msg_id: int, msg: wire.RemoteChunk, frames: list[Any]) -> None:
        if trace.ON:
            trace.mark("rx_chunk", msg.rseq, msg.chunk)
        try:
            t = self.incoming.chunk(peer, incarnation, msg)
            if t.open.via == wire.VIA_FRAME:
                if len(frames) != 1:
                    raise BadRequestError(f"chunk {msg.chunk} came with {len(frames)} frames, not 1")
                data = frame_tensor(frames[0])
                if data.numel() != msg.nbytes:
                    raise BadRequestError(f"chunk {msg.chunk}: frame of {data.numel()} bytes, header says {msg.nbytes}")
                work = self._apply_frame(t, t.rows[msg.rows[0]: msg.rows[1]], data, msg)
            else:
                work = self._apply_nccl(t, msg)
        except StreamerError as e:
            if msg.link:  # the sender has posted this chunk's send: receive it anyway, so the link stays in step
                self._discard_nccl(peer, msg)
            self.svc.spawn(self._answer(peer, wire.RemoteChunkAck(msg.rseq, msg.chunk, False, False, e.code, str(e)),
                                        msg_id), "nack")
            return
        self.svc.spawn(self._ack_after(t, msg, msg_id, work), f"chunk-{peer}-{msg.rseq}-{msg.chunk}")

    def _discard_nccl(self, peer: str, msg: wire.RemoteChunk) -> None:
        """Post the receive of a refused NCCL chunk into scratch (in message order, like every receive); a link
        that is gone, or an absurd size, aborts instead - the sender's send then fails within its deadline."""
        from streamer import nccl

        svc = self.svc
        links = svc.rt.nccl
        link = links.receiving.get((peer, msg.link)) if links is not None else None
        if link is None or link.dead or link.comm is None:
            return
        if not 0 < msg.nbytes <= nccl.DISCARD_MAX_BYTES:
            links.abort_soon(link)
            return
        try:
            h = nccl.enqueue_discard(link, msg.nbytes)
        except Exception as e:  # noqa: BLE001 - not posted: the link is out of step, abort it
            log.warning("[stream] discarding chunk %s of %s from %s on NCCL link %s: %s", msg.chunk, msg.rseq, peer,
                        msg.link, e)
            links.abort_soon(link)
            return

        async def finish() -> None:
            try:
                await wait_event(h.event, svc.config.peer_timeout_s, h.what, "peer_timeout_s")
            except Exception as e:  # noqa: BLE001 - the link is out of step or dead: abort it
                log.warning("[stream] discarding chunk %s of %s from %s on NCCL link %s: %s", msg.chunk, msg.rseq,
                            peer, msg.link, e)
                await links.abort(link)

        svc.spawn(finish(), f"nccl-discard-{peer}-{msg.rseq}-{msg.chunk}")

    def _digest_arrived(self, peer: str, msg: wire.RemoteChunkDigest) -> None:
        if (peer, msg.rseq) not in self.incoming.open_transfers:
            return  # aborted, refused or already failed: nothing waits for it
        fut = self._digests.setdefault((peer, msg.rseq, msg.chunk), asyncio.get_running_loop().create_future())
        if not fut.done():
            fut.set_result(msg.checksum)

    async def _digest(self, peer: str, rseq: int, chunk: int) -> int:
        """The source digest of an NCCL chunk that travels after its bytes (wire.RemoteChunkDigest)."""
        key = (peer, rseq, chunk)
        fut = self._digests.setdefault(key, asyncio.get_running_loop().create_future())
        t = self.svc.config.peer_timeout_s
        try:
            return await asyncio.wait_for(fut, t)
        except TimeoutError:
            raise PeerDeadError(f"{peer} sent no digest for chunk {chunk} of transfer {rseq} within {t:.1f}s "
                                f"(setting: peer_timeout_s)") from None
        finally:
            self._digests.pop(key, None)

    async def _apply_frame(self, t: Inbound, d_idx: Any, data: Any, msg: wire.RemoteChunk) -> None:
        dst, svc = t.dst, self.svc
        if trace.ON:
            trace.mark("apply", msg.rseq, msg.chunk)
        buffered = svc.config.buffered
        loop = asyncio.get_running_loop()
        if not dst.is_cuda:
            await loop.run_in_executor(svc.rt.cpu_executor, _apply_frame_cpu, dst, d_idx, data, msg.checksum,
                                       buffered)
            return
        if msg.checksum is not None:  # verify on the host, before anything reaches the GPU pool
            got = await loop.run_in_executor(svc.rt.cpu_executor, checksum, data)
            verify(msg.checksum, got, f"frame into {dst.name}")
        h = await svc.rt.gpu.write(dst, d_idx, data, buffered, False)
        await svc.rt.gpu.finish_write(h, svc.config.peer_timeout_s)

    def _apply_nccl(self, t: Inbound, msg: wire.RemoteChunk) -> Awaitable[None]:
        """Post the receive now - in this step of the loop, in message order, so both ranks issue their
        operations in the same order - and return what waits for it."""
        from streamer import nccl

        svc, link = self.svc, self._link(t.sender, t.open.link)
        if msg.link != link.link_id:
            raise BadRequestError(f"chunk {msg.chunk} of transfer {msg.rseq} announced on NCCL link {msg.link}, "
                                  f"opened on {link.link_id}")
        gm = svc.rt.gpu
        rows = msg.rows[1] - msg.rows[0]
        check = t.open.checksum or msg.checksum is not None
        blocks = region_blocks(t.dst.layout, t.region, *msg.rows[:2])  # long pieces: scattered by DMA, no row map
        try:
            h = nccl.enqueue_recv(
                gm, link, t.dst, lambda: gm.device_index(RouteIndex(t.rows[msg.rows[0]: msg.rows[1]], None),
                                                         link.device, "src"), rows, check, blocks)
        except StreamerError:
            raise
        except Exception as e:  # noqa: BLE001 - a CUDA or NCCL error: the receive is not posted, the link is
            svc.rt.nccl.abort_soon(link)  # out of step with its sender - abort it (the sender's send then fails)
            raise PeerDeadError(f"NCCL receive on link {link.link_id} from {t.sender} could not be posted: "
                                f"{type(e).__name__}: {e}") from None
        if trace.ON:
            trace.mark("recv_enqueued", msg.rseq, msg.chunk)
        spin = gm.spin_nccl(h.nbytes)

        async def finish() -> None:
            try:
                await wait_event(h.event, svc.config.peer_timeout_s, h.what, "peer_timeout_s", spin, h.key)
            except TransferTimeoutError:
                await svc.rt.nccl.abort(link)  # a sender that stopped sending: abort, never wait forever
                raise PeerDeadError(f"NCCL receive from {t.sender} did not complete within "
                                    f"{svc.config.peer_timeout_s:.1f}s (setting: peer_timeout_s)") from None
            if trace.ON:
                trace.mark("received", msg.rseq, msg.chunk)
            if check:
                expected = msg.checksum if msg.checksum is not None else await self._digest(t.sender, msg.rseq,
                                                                                             msg.chunk)
                verify(expected, nccl.handle_digest(h, 1), f"NCCL chunk into {t.dst.name}")

        return finish()

    async def _ack_after(self, t: Inbound, msg: wire.RemoteChunk, msg_id: int, work: Any) -> None:
        try:
            await work
        except StreamerError as e:
            self.incoming.abort(t.sender, t.open.rseq)  # never commits now
            if isinstance(e, IntegrityError):
                log.error("[stream] %s", e)
            ack = wire.RemoteChunkAck(msg.rseq, msg.chunk, False, False, e.code, str(e))
        except Exception as e:  # noqa: BLE001
            log.exception("[stream] applying chunk %s of %s from %s", msg.chunk, msg.rseq, t.sender)
            self.incoming.abort(t.sender, t.open.rseq)
            ack = wire.RemoteChunkAck(msg.rseq, msg.chunk, False, False, code_of(e), f"{type(e).__name__}: {e}")
        else:
            committed = self.incoming.applied(t, msg.nbytes)
            if committed:
                await self._committed(t)
            ack = wire.RemoteChunkAck(msg.rseq, msg.chunk, True, committed)
        await self._answer(t.sender, ack, msg_id)
        if trace.ON:
            trace.mark("tx_ack", msg.rseq, msg.chunk)

    async def _committed(self, t: Inbound) -> None:
        o = t.open
        await self.svc.delivered(t.dst, f"{t.sender}/{o.origin}", o.origin_xfer, o.tag, t.region, list(o.notify))
        if o.origin:
            waiter = self.svc.pulls.waiters.get((t.sender, o.origin_xfer))
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ serving a peer's pull

    def _pull(self, peer: str, msg_id: int, msg: wire.PullRequest) -> None:
        svc = self.svc
        try:
            src = svc.pools.get(msg.src_pool)
            region = region_from_spec(msg.region)
            check_region(src.layout, region, f"pulled region of pool {src.name!r}")
            dst_region = region_from_spec(msg.dst_region)
            route = RemoteRoute(region, peer, msg.dst_pool, dst_region,
                                RouteIndex.build(src, region, None, dst_region),  # row maps on first use
                                None, msg.origin, msg.pull)
            svc.peers.link(peer)
        except StreamerError as e:
            svc.spawn(self._answer(peer, wire.PullFailed(msg.pull, e.code, str(e)), msg_id), "pull-failed")
            return
        t = Transfer(svc.rt, f"{peer}/{msg.origin}", msg.pull, msg.tag, src, [route], layered=False,
                     checksum=msg.checksum, buffered=msg.buffered, deadline_s=msg.deadline_s, notify=list(msg.notify))
        key = (f"{peer}/{msg.origin}", -msg.pull)  # negative: never collides with a local client's xfer ids
        svc.transfers[key] = t

        async def run() -> None:
            try:
                await t.run()
            except StreamerError as e:
                await self._answer(peer, wire.PullFailed(msg.pull, e.code, str(e)), msg_id)
            finally:
                svc.transfers.pop(key, None)

        t.task = svc.spawn(run(), f"pull-serve-{peer}-{msg.pull}")

    async def _nccl_offer(self, peer: str, msg_id: int, msg: wire.NcclOffer) -> None:
        svc = self.svc
        try:
            if svc.rt.nccl is None:
                raise TransportUnavailableError(f"streamer {svc.config.name} has no NCCL")
            dst = svc.pools.get(msg.dst_pool)
            if not dst.is_cuda:
                raise TransportUnavailableError(f"pool {msg.dst_pool!r} is in host memory")
            await svc.rt.nccl.receiver(peer, msg, dst.device.index)
            answer = wire.NcclAccepted(msg.link, True)
        except StreamerError as e:
            answer = wire.NcclAccepted(msg.link, False, e.code, str(e))
        await self._answer(peer, answer, msg_id)
