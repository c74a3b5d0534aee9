"""Activation plane over NCCL (CUDA deployments): hidden states go GPU -> GPU, headers over ZeroMQ.

One directed 2-rank communicator per pipeline link (upstream = rank 0, sends; downstream = rank 1,
receives), created per epoch: on a new Topology the upstream stage makes a unique id, sends it to the
downstream stage as `LinkInit` over the ZeroMQ data socket, and both join (streamer.nccl.NcclLink: init on
its own thread, within `link_timeout`). A restart therefore rebuilds only the links of a new epoch; old
links are aborted (ncclCommAbort) as soon as the controller says their epoch is over (EpochOver, sent when a
stage dies) or a new link replaces them, on a thread of their own (streamer.nccl.abort_link): never waited on,
never queued behind the compute thread, which may be the one blocked on the dead link; a step whose link was aborted
under it raises LinkClosed and is dropped (its epoch is over).

Ordering: the upstream announces step k's header first and then enqueues ncclSend for it (compute thread,
right after computing it); the downstream enqueues ncclRecv for step k when its worker takes step k's
header. Both sides therefore issue operations in step order, and a host-side ncclSend that waits for its
peer (were a connection made lazily) can never wait on a header it has not sent yet. Communicators connect
at init (streamer.nccl.make_communicator: NCCL_RUNTIME_CONNECT=0) and each new link exchanges a small and a
large warm-up message while it is set up, so no connection is made during a step. Sends run on the link's
stream after an event on the compute stream, so computing step k+1 overlaps sending step k; the sent tensor
is kept alive for the allocator with record_stream; a receive buffer is allocated on the link's stream (never
reusing a block that compute kernels still queued may read). Only the compute thread touches CUDA (aborts aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import torch

from bus.messages import TensorMeta
from stages.frames import DTYPE_NAMES, DTYPES
from streamer.nccl import abort_link


class NcclActivations:
    """This stage's two activation links (either may be None): `out` to the next stage, `inc` from the last."""

    def __init__(self, device: torch.device, stage: int) -> None:
        self.device, self.stage = device, stage
        self.out = None  # streamer.nccl.NcclLink (rank 0)
        self.inc = None  # streamer.nccl.NcclLink (rank 1)
        self.out_epoch = self.inc_epoch = -1  # the epoch each link serves
        self._ids = 0

    # -------------------------------------------------------------- link lifecycle (event loop)

    async def open_out(self, on_gpu, timeout: float, epoch: int = -1) -> list[int]:  # type: ignore[no-untyped-def]
        """Make the upstream rank of a new link; returns the unique id to send downstream. Join with
        `join_out` after sending it."""
        from streamer.nccl import NcclLink, new_unique_id

        await self.close_out()
        uid = await on_gpu(new_unique_id)
        self._ids += 1
        self.out = await on_gpu(NcclLink, self._ids, f"stage-{self.stage + 1}", 0, self.device.index)
        self.out_epoch = epoch
        self._uid = uid
        return uid

    async def join_out(self, timeout: float) -> None:
        link = self.out
        assert link is not None
        await link.init(self._uid, timeout)
        if link.closed:  # aborted while it was being set up (its epoch is over)
            raise LinkClosed(f"NCCL link {link.link_id} to {link.peer} was closed while it was set up")
        await _warm_up(link, self.device, timeout, send=True)

    async def join_in(self, on_gpu, uid: list[int], timeout: float,  # type: ignore[no-untyped-def]
                      epoch: int = -1) -> None:
        from streamer.nccl import NcclLink

        await self.close_in()
        self._ids += 1
        self.inc = await on_gpu(NcclLink, self._ids, f"stage-{self.stage - 1}", 1, self.device.index)
        self.inc_epoch = epoch
        link = self.inc
        await link.init(uid, timeout)
        if link.closed:
            raise LinkClosed(f"NCCL link {link.link_id} to {link.peer} was closed while it was set up")
        await _warm_up(link, self.device, timeout, send=False)

    async def close_out(self) -> None:
        if self.out is not None:
            link, self.out = self.out, None
            await abort_link(link)

    async def close_in(self) -> None:
        if self.inc is not None:
            link, self.inc = self.inc, None
            await abort_link(link)

    async def close_epoch(self, epoch: int) -> None:
        """Abort the links that serve `epoch` or an older one (a stage of it died); a newer epoch's link, set up
        meanwhile, stays."""
        if self.out is not None and self.out_epoch <= epoch:
            await self.close_out()
        if self.inc is not None and self.inc_epoch <= epoch:
            await self.close_in()

    # -------------------------------------------------------------- data (compute thread)

    def send(self, hidden: torch.Tensor, announce) -> TensorMeta:  # type: ignore[no-untyped-def]
        """Call `announce(meta)` (which sends the step's header), then enqueue ncclSend of `hidden` after
        the work that produced it. Returns the meta."""
        with torch.cuda.device(self.device):
            return self._send(hidden, announce)

    def _send(self, hidden: torch.Tensor, announce) -> TensorMeta:  # type: ignore[no-untyped-def]
        from streamer.nccl import _nccl

        link = self.out
        if link is None:
            raise LinkClosed(f"stage {self.stage}: the link downstream was closed under this step")
        _check(link)
        hidden = hidden.contiguous()
        meta = TensorMeta(DTYPE_NAMES[hidden.dtype], list(hidden.shape))
        announce(meta)
        done = torch.cuda.Event()
        done.record()
        link.stream.wait_event(done)
        nbytes = hidden.numel() * hidden.element_size()
        with _link_errors(link):
            link.comm.send(hidden.data_ptr(), nbytes, _nccl.NCCL_UINT8, 1, link.stream.cuda_stream)
        hidden.record_stream(link.stream)
        return meta

    def recv(self, meta: TensorMeta) -> torch.Tensor:
        """Enqueue ncclRecv of the step's hidden states; the current stream waits for it."""
        with torch.cuda.device(self.device):
            return self._recv(meta)

    def _recv(self, meta: TensorMeta) -> torch.Tensor:
        from streamer.nccl import _nccl

        link = self.inc
        if link is None:
            raise LinkClosed(f"stage {self.stage}: the link upstream was closed under this step")
        _check(link)
        compute = torch.cuda.current_stream()
        # The buffer comes from the link stream's share of the allocator, not the compute stream's: a block the
        # compute stream freed may still be read by its queued kernels (the host runs steps ahead of the GPU),
        # and NCCL, writing on the link stream, is not ordered after them. Stream-ordered reuse is safe only on
        # the stream that allocated. record_stream keeps the link stream off the block until compute is done.
        with torch.cuda.stream(link.stream):
            out = torch.empty(meta.shape, dtype=DTYPES[meta.dtype], device=self.device)
        nbytes = out.numel() * out.element_size()
        with _link_errors(link):
            link.comm.recv(out.data_ptr(), nbytes, _nccl.NCCL_UINT8, 0, link.stream.cuda_stream)
        got = torch.cuda.Event()
        got.record(link.stream)
        compute.wait_event(got)
        out.record_stream(compute)
        return out


class LinkClosed(Exception):
    """The step's link was aborted on purpose while the step used it (a new epoch replaced it): drop the step."""


def _check(link) -> None:  # type: ignore[no-untyped-def]
    if link.closed:
        raise LinkClosed(f"NCCL link {link.link_id} to {link.peer} was closed")
    link.check()


@contextlib.contextmanager
def _link_errors(link):  # type: ignore[no-untyped-def]
    """An NCCL call that fails on a link aborted meanwhile (its communicator freed) is a stale step, not a
    fault; any other failure is the link's (PeerDeadError: the stage exits and is restarted)."""
    from streamer.errors import PeerDeadError

    try:
        yield
    except Exception as e:  # noqa: BLE001 - CuPy's NcclError, or AttributeError on a comm set to None
        if link.closed:
            raise LinkClosed(f"NCCL link {link.link_id} to {link.peer} was closed: {e}") from None
        raise PeerDeadError(f"NCCL link {link.link_id} to {link.peer}: {e}") from e


WARM_UP_BYTES = 32 << 20  # as large as a prompt pass's activations: NCCL spreads a large message over more
# channels (and may pick another protocol) than a small one, and connects each lazily, on first use


async def _warm_up(link, device: torch.device, timeout: float, send: bool) -> None:  # type: ignore[no-untyped-def]
    """Exchange one large message on a new link (both ranks, concurrently) so NCCL connects every channel the
    pair will use now, not during a step (a lazy connect blocks the host until the peer joins it: with 1 byte
    only the first channel was connected). Runs on a thread of its own with a deadline: setup-time work, off
    the compute thread."""
    from streamer.errors import PeerDeadError
    from streamer.nccl import _nccl

    def work() -> None:
        with torch.cuda.device(device), torch.cuda.stream(link.stream):  # the link's own memory: see _recv
            buf = torch.zeros(WARM_UP_BYTES, dtype=torch.uint8, device=device)
            for n in (1, WARM_UP_BYTES):  # the small-message path and the large one
                if send:
                    link.comm.send(buf.data_ptr(), n, _nccl.NCCL_UINT8, 1, link.stream.cuda_stream)
                else:
                    link.comm.recv(buf.data_ptr(), n, _nccl.NCCL_UINT8, 0, link.stream.cuda_stream)
            link.stream.synchronize()

    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            work()
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))
        except Exception as e:  # noqa: BLE001 - reported to the awaiting task
            err = e
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(err))

    threading.Thread(target=run, name="nccl-warm-up", daemon=True).start()
    try:
        await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        link.dead = True
        raise PeerDeadError(f"NCCL link to {link.peer}: warm-up exchange not done within {timeout:.0f}s "
                            "(setting: link_timeout)") from None
    except Exception as e:  # noqa: BLE001 - CuPy's NcclError from the exchange
        if link.closed:
            raise LinkClosed(f"NCCL link {link.link_id} to {link.peer} was closed during its warm-up") from None
        link.dead = True
        raise PeerDeadError(f"NCCL link to {link.peer}: warm-up exchange failed: {e}") from e
