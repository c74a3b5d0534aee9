"""`StreamerService`: the streamer's core - pools, transfers, and one handler per control message. No sockets
and no loop of its own: the process shell (streamer/proc.py) feeds it decoded messages and gives it an
`Outbox` to answer through; the data plane (streamer/dataplane.py) is its sibling for peer streamers.

Answers: every control request gets exactly one answer addressed to its msg id (its result, `Ok`, or an
ErrorReply with an XFER_* code). A StreamRequest's answers are TransferProgress* and then exactly one
TransferDone or TransferFailed. A handler that fails answers with an error; it never takes the process down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from bus.child import alive
from bus.messages import ERR_BAD_MESSAGE, ErrorReply, Heartbeat, Msg
from streamer import cuda, trace, wire
from streamer.config import StreamerConfig
from streamer.endpoints import Endpoint
from streamer.engine import LocalRoute, Runtime, Transfer, cancelled
from streamer.errors import (
    BadRequestError,
    CapacityError,
    OwnerDownError,
    StreamerError,
    code_of,
)
from streamer.integrity import Monotonic
from streamer.manifest import PoolManifest, PoolRecord, process_start
from streamer.movers import CpuMover
from streamer.peer import PeerNet
from streamer.planning import plan_transfer
from streamer.pools import PoolTable
from streamer.pulls import Pulls
from streamer.regions import (
    layout_from_spec,
    layout_to_spec,
    region_to_spec,
)

log = logging.getLogger(__name__)



class Outbox(Protocol):
    async def control(self, identity: str, body: Msg, reply_to: int = 0) -> None: ...

    async def data(self, identity: str, body: Msg, reply_to: int = 0) -> None: ...


@dataclass(frozen=True)
class Who:
    identity: str
    incarnation: int
    msg_id: int


class StreamerService:
    def __init__(self, config: StreamerConfig, outbox: Outbox, peers: PeerNet, cpu_executor: Executor,
                 gpu_executor: Executor, frame_executor: Executor | None = None) -> None:
        self.config, self.outbox, self.peers = config, outbox, peers
        self.gpu_executor = gpu_executor
        self.pools = PoolTable(config)
        self.manifest = PoolManifest(config.manifest, config.name) if config.manifest else None
        self._recording = False  # the manifest is this streamer's to write (it has read and adopted it)
        self.transfers: dict[tuple[str, int], Transfer] = {}
        self._requests = Monotonic()
        self._watch: dict[int, tuple[str, int, int]] = {}  # pid -> (owner, its incarnation, pidfd)
        self.pulls = Pulls(self)
        self.last_heard: dict[str, float] = {}  # peer streamer -> time.monotonic() of its last data message
        self.tasks: set[asyncio.Task[Any]] = set()
        self.pool_dropped: list[Callable[[Endpoint], None]] = []
        self.cuda = cuda.cuda_ready()
        gpu = None
        if self.cuda:
            from streamer.cuda_mover import GpuMover

            gpu = GpuMover(list(range(torch.cuda.device_count())), config.staging_bytes, config.staging_lanes,
                           gpu_executor, cpu_executor, device_layer_waits=config.layer_wait == "device",
                           inline_dma=config.inline_dma, spin_s=config.completion_spin_us * 1e-6)
        nccl_links = None
        if self.cuda and config.nccl:
            from streamer import nccl

            if nccl.nccl_ready():
                nccl_links = nccl.NcclLinks(self.on_gpu, config.nccl_init_timeout_s)
        # frames of remote transfers are gathered and scattered on their own threads (chunks in parallel; each
        # has its own buffer), apart from the one-thread CPU mover whose staging buffer is shared
        self.rt = Runtime(config, CpuMover(cpu_executor, config.staging_bytes), gpu, peers,
                          frame_executor or cpu_executor, self.on_gpu, nccl_links, set())
        self._handlers: dict[type, Callable[[Who, Any], Awaitable[Msg | None]]] = {
            wire.RegisterPool: self._register, wire.UnregisterPool: self._unregister, wire.AllocPool: self._alloc,
            wire.FreePool: self._free, wire.StreamRequest: self._stream, wire.LayerReady: self._layer_ready,
            wire.CancelTransfer: self._cancel, wire.PoolQuery: self._query,
            wire.StreamerStatusQuery: self._status, wire.PeerInfo: self._peer_info,
            wire.OwnerDown: self._owner_down_msg, Heartbeat: self._heartbeat,
        }

    async def on_gpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.gpu_executor, fn, *args)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def start(self) -> None:
        """Pin the host arenas and set up device lanes (GPU hosts), then adopt the stage pools a previous
        streamer recorded - last, so that a start that fails leaves pools and record as they were. Before
        serving: no request is read until this returns."""
        if self.cuda:
            await self._start_cuda()
        self._adopt_recorded()

    async def _start_cuda(self) -> None:
        if self.config.pin_memory:
            for arena in self.pools.arenas.values():
                try:
                    await self.on_gpu(cuda.pin, arena.buffer)
                except Exception as e:  # noqa: BLE001 - turned into the typed, actionable error
                    raise CapacityError(f"cannot page-lock {arena.capacity} bytes of {arena.kind} space ({e}); "
                                        f"lower {arena.setting} or run with pin_memory off (--no-pin)") from e
        devices = list(range(torch.cuda.device_count()))
        await self.on_gpu(cuda.enable_peer_access, devices)
        await self.on_gpu(self.rt.gpu.setup)
        log.info("[stream] %s: %d GPU(s), NCCL %s", self.config.name, len(devices),
                 "on" if self.rt.nccl is not None else "off")

    async def close(self) -> None:
        for t in list(self.transfers.values()):
            t.abort(StreamerError(f"streamer {self.config.name} is shutting down"))
        await self._settle([t.task for t in self.transfers.values() if t.task is not None])
        for name in list(self.pools.pools):
            await self._close(self.pools.remove(name), keep_disk=True)
        if self.manifest is not None and self._recording:  # every file it held is unlinked: nothing to adopt
            self.manifest.remove()
        for pid in list(self._watch):
            self._unwatch(pid)
        if self.rt.nccl is not None:
            await self.rt.nccl.close()
        if self.cuda and self.config.pin_memory:
            for arena in self.pools.arenas.values():
                await self.on_gpu(cuda.unpin, arena.buffer)

    # ------------------------------------------------------------------ dispatch

    async def handle(self, identity: str, incarnation: int, msg_id: int, body: Msg) -> None:
        who = Who(identity, incarnation, msg_id)
        handler = self._handlers.get(type(body))
        if handler is None:
            answer: Msg | None = ErrorReply(ERR_BAD_MESSAGE, f"the streamer does not handle {type(body).__name__}")
        else:
            try:
                answer = await handler(who, body)
            except StreamerError as e:
                answer = ErrorReply(e.code, str(e))
            except Exception as e:  # noqa: BLE001 - a failing handler answers, it never kills the process
                log.exception("[stream] handler for %s failed", type(body).__name__)
                answer = ErrorReply(wire.XFER_INTERNAL, f"{type(e).__name__}: {e}")
        if answer is not None:
            await self.outbox.control(identity, answer, msg_id)

    async def _heartbeat(self, who: Who, msg: Heartbeat) -> Msg:
        return Heartbeat(msg.seq, "serving")

    # ------------------------------------------------------------------ pools

    async def _register(self, who: Who, msg: wire.RegisterPool) -> Msg:
        layout = layout_from_spec(msg.layout)
        if layout.row_bytes > self.config.staging_bytes:
            raise BadRequestError(f"a {layout.row_bytes}-byte KV row exceeds staging_bytes={self.config.staging_bytes}")
        old = self.pools.pools.get(msg.name)
        if old is not None:
            if not msg.replace:
                raise BadRequestError(f"pool {msg.name!r} already exists (a restarted stage registers with replace=True)")
            # its owner registering it again (after a streamer restart that adopted it) is no replacement
            itself = old.kind == wire.POOL_STAGE and who.identity == old.owner and 0 < msg.pid == old.pid
            if not itself and old.owner_alive and old.pid > 0 and alive(old.pid):
                raise BadRequestError(f"pool {msg.name!r} is held by {old.owner}, pid {old.pid}, which is alive: "
                                      "not replaced")
            if msg.memory == wire.MEM_SHM and old.path == msg.path:  # never drop (unlink) what is being mapped
                if layout_to_spec(old.layout) != msg.layout:
                    raise BadRequestError(f"pool {msg.name!r} maps {msg.path} already, with another layout")
                return self._adopt(who, old, msg)
            await self._drop_pool(msg.name, cancelled(0, f"pool {msg.name!r} was replaced"))
        events: list[torch.cuda.Event] = []
        if msg.memory == wire.MEM_SHM:
            flat, release = PoolTable.map_shm(msg.path, layout)
        elif msg.memory == wire.MEM_CUDA_IPC:
            cuda.require_cuda("registering a GPU pool")
            if not 0 <= msg.device < torch.cuda.device_count():
                raise BadRequestError(f"device {msg.device} does not exist here")
            if msg.event_handles and len(msg.event_handles) != layout.num_layers:
                raise BadRequestError(f"{len(msg.event_handles)} layer events for {layout.num_layers} layers")
            flat = await self.on_gpu(cuda.open_ipc_pool, msg.ipc_handle, msg.ipc_offset, layout.nbytes, msg.device)
            events = await self.on_gpu(cuda.open_ipc_events, list(msg.event_handles), msg.device)
            release = []
        else:
            raise BadRequestError(f"unknown pool memory kind {msg.memory}")
        ep = self.pools.add_stage_pool(msg.name, layout, flat, who.identity, release, events, msg.path)
        self._own(ep, who, msg.pid)
        log.info("[stream] pool %s registered by %s (%d bytes, %s)", msg.name, who.identity, layout.nbytes,
                 f"cuda:{msg.device}" if msg.memory == wire.MEM_CUDA_IPC else "shm")
        return wire.PoolRegistered(msg.name, layout.nbytes)

    def _adopt(self, who: Who, ep: Endpoint, msg: wire.RegisterPool) -> Msg:
        """A restarted stage mapped its predecessor's shared-memory file again (its KV is still there): the
        pool stays as it is - same memory, same name - and gets its new owner. Transfers of the old owner
        already failed when it died. Or the owner itself registers it again, with a streamer that adopted it."""
        again = ep.owner == who.identity and ep.pid == msg.pid and ep.owner_alive
        self._own(ep, who, msg.pid)
        log.info("[stream] pool %s %s by %s (its KV kept)", msg.name, "registered again" if again else "taken over",
                 who.identity)
        return wire.PoolRegistered(msg.name, ep.layout.nbytes)

    def _own(self, ep: Endpoint, who: Who, pid: int) -> None:
        """`who` (process `pid`) owns stage pool `ep` from now on: watched, and on record."""
        ep.owner, ep.owner_alive, ep.owner_incarnation = who.identity, True, who.incarnation
        ep.pid, ep.pid_start = pid, process_start(pid)
        if pid > 0:
            self._watch_pid(who.identity, who.incarnation, pid)
        self._record()

    # ------------------------------------------------------------------ the manifest (a restart adopts)

    def _record(self) -> None:
        """Write down every shared-memory stage pool mapped here (streamer/manifest.py); called before the
        answer to whatever changed them, so a stage told "registered" is on record."""
        if self.manifest is None or not self._recording:
            return
        self.manifest.save([PoolRecord(ep.name, layout_to_spec(ep.layout), ep.path, ep.owner, ep.owner_incarnation,
                                       ep.pid, ep.pid_start)
                            for ep in self.pools.pools.values() if self._recorded(ep)])

    @staticmethod
    def _recorded(ep: Endpoint) -> bool:
        return ep.kind == wire.POOL_STAGE and not ep.is_cuda and bool(ep.path)

    def _adopt_recorded(self) -> None:
        """Map every pool of the manifest whose file still exists. Its owner counts as alive only if that very
        process still runs (pid and start time), and is then watched like a registering one; a pool whose owner
        died meanwhile is an orphan a restarted stage takes over. An entry that does not check out is logged
        and skipped - its file left as it is (a live stage registers it again; the supervisor's sweep removes it
        at the end)."""
        if self.manifest is None:
            return
        for rec in self.manifest.load():
            try:
                ep = self.pools.adopt_stage_pool(rec.name, rec.layout, rec.path, rec.owner)
            except Exception as e:  # noqa: BLE001 - whatever an entry holds, the streamer starts
                log.warning("[stream] manifest entry %r not adopted: %s", rec.name, e)
                continue
            ep.owner_incarnation, ep.pid = rec.incarnation, rec.pid
            ep.pid_start = rec.pid_start if rec.pid > 0 and rec.pid_start else 0
            ep.owner_alive = self._owner_runs(ep)
            log.info("[stream] pool %s adopted from the manifest (%s; owner %s incarnation %d, %s)", ep.name, ep.path,
                     ep.owner, ep.owner_incarnation, f"alive, pid {ep.pid}" if ep.owner_alive else "gone")
        self._recording = True
        self._record()

    def _owner_runs(self, ep: Endpoint) -> bool:
        """Whether the process that registered `ep` still runs; if so it is watched from now on."""
        if not ep.pid_start or process_start(ep.pid) != ep.pid_start:
            return False
        self._watch_pid(ep.owner, ep.owner_incarnation, ep.pid)
        if ep.pid not in self._watch:  # it exited meanwhile - or this kernel has no pidfds (nothing is watched)
            return not hasattr(os, "pidfd_open") and process_start(ep.pid) == ep.pid_start
        # the pidfd pins the process it was opened on: is it still the owner (not a pid reused in between)?
        if process_start(ep.pid) == ep.pid_start:
            return True
        self._unwatch(ep.pid)
        return False

    async def _unregister(self, who: Who, msg: wire.UnregisterPool) -> Msg:
        await self._drop_pool(msg.name, cancelled(0, f"pool {msg.name!r} was unregistered"))
        return wire.PoolUnregistered(msg.name)

    async def _alloc(self, who: Who, msg: wire.AllocPool) -> Msg:
        ep, existed = self.pools.alloc(msg.name, msg.kind, msg.layout, who.identity, msg.exist_ok)
        return wire.PoolAllocated(msg.name, msg.kind, ep.layout.nbytes, self.pools.free_bytes(msg.kind), existed)

    async def _free(self, who: Who, msg: wire.FreePool) -> Msg:
        ep = self.pools.get(msg.name)
        if not ep.is_host_pool:
            raise BadRequestError(f"pool {msg.name!r} is a stage pool: unregister it instead")
        await self._drop_pool(msg.name, cancelled(0, f"pool {msg.name!r} was freed"), delete_disk=True)
        return wire.PoolFreed(msg.name, self.pools.free_bytes(ep.kind))

    async def _query(self, who: Who, msg: wire.PoolQuery) -> Msg:
        return self.pools.get(msg.name).info()

    async def _status(self, who: Who, msg: wire.StreamerStatusQuery) -> Msg:
        return wire.StreamerStatus(self.config.name, self.config.incarnation, os.getpid(), self.pools.capacity(),
                                   sorted(self.pools.pools), len(self.transfers), sorted(self.peers.addresses),
                                   self.cuda, self.rt.nccl is not None)

    async def _peer_info(self, who: Who, msg: wire.PeerInfo) -> Msg:
        if msg.name == self.config.name:
            raise BadRequestError("a streamer is not its own peer")
        if self.rt.nccl is not None and self.peers.addresses.get(msg.name, msg.data_address) != msg.data_address:
            await self.rt.nccl.abort_peer(msg.name)
        self.peers.set_address(msg.name, msg.data_address)
        return wire.Ok(f"peer {msg.name} at {msg.data_address}")

    async def _drop_pool(self, name: str, reason: StreamerError, delete_disk: bool = False) -> None:
        ep = self.pools.get(name)
        users = [t for t in self.transfers.values() if t.touches(ep)]
        for t in users:
            t.abort(reason)
        await self._settle([t.task for t in users if t.task is not None])
        self.pools.remove(name)
        for hook in self.pool_dropped:  # e.g. the data plane discards transfers arriving into it
            hook(ep)
        await self._close(ep, keep_disk=not delete_disk)
        if self._recorded(ep):  # off the record once its file is unlinked
            self._record()

    async def _close(self, ep: Endpoint, keep_disk: bool) -> None:
        if ep.kind == wire.POOL_DISK:
            PoolTable.save_disk_meta(ep)
            if not keep_disk:
                PoolTable.delete_disk_files(ep)
        if ep.is_cuda:
            await self.on_gpu(ep.close)  # unmapping an IPC handle is a CUDA call: GPU thread
        else:
            ep.close()

    async def _settle(self, tasks: list[asyncio.Task[Any]]) -> None:
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.shutdown_timeout_s)

    # ------------------------------------------------------------------ owners (stages) that die

    def _watch_pid(self, owner: str, incarnation: int, pid: int) -> None:
        """Learn of a stage's death the moment it happens (pidfd), not after a layer deadline. Scoped to that
        process: a replacement registered under the same name before the old one's exit is processed keeps
        its pools and transfers."""
        if pid in self._watch or not hasattr(os, "pidfd_open"):
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # already gone, or not ours to watch: the deadlines still apply
        self._watch[pid] = (owner, incarnation, fd)
        asyncio.get_running_loop().add_reader(fd, lambda: self.spawn(
            self.owner_down(owner, f"process {pid} exited", pid=pid), f"owner-down-{owner}"))

    def _unwatch(self, pid: int) -> None:
        got = self._watch.pop(pid, None)
        if got is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(got[2])
        except RuntimeError:
            pass
        os.close(got[2])

    async def _owner_down_msg(self, who: Who, msg: wire.OwnerDown) -> Msg:
        await self.owner_down(msg.owner, msg.reason or f"reported by {who.identity}")
        return wire.Ok(f"{msg.owner} marked down")

    async def owner_down(self, owner: str, reason: str, pid: int | None = None) -> None:
        """A stage died: its transfers fail now; its CPU pools stay mapped (orphaned, still readable); its GPU
        pools are unmapped (their memory died with its CUDA context). `pid`: only what that process did."""
        incarnation = self._watch[pid][1] if pid is not None and pid in self._watch else None
        for p in [p for p, (o, _, _) in self._watch.items() if o == owner and (pid is None or p == pid)]:
            self._unwatch(p)
        err = OwnerDownError(f"{owner} is down ({reason})")
        for t in list(self.transfers.values()):
            if t.owner == owner and (incarnation is None or t.incarnation == incarnation):
                t.abort(err)
        for ep in [p for p in self.pools.pools.values() if p.owner == owner and p.kind == wire.POOL_STAGE
                   and (pid is None or p.pid == pid)]:
            ep.owner_alive = False
            if ep.is_cuda:
                await self._drop_pool(ep.name, OwnerDownError(f"pool {ep.name!r} died with {owner} ({reason})"))
        log.info("[stream] %s is down (%s); its CPU pools are kept", owner, reason)

    # ------------------------------------------------------------------ transfers

    async def _stream(self, who: Who, msg: wire.StreamRequest) -> Msg | None:
        if trace.ON:
            trace.mark("request", msg.xfer)
        self._requests.accept(who.identity, who.incarnation, msg.xfer, "transfer")  # duplicates -> ErrorReply
        try:
            if msg.src.streamer not in ("", self.config.name):
                return await self.pulls.start(who, msg)
            t = self._plan(who, msg)
        except StreamerError as e:
            return wire.TransferFailed(msg.xfer, msg.tag, e.code, str(e))
        key = (who.identity, msg.xfer)
        t.incarnation = who.incarnation
        self.transfers[key] = t
        if trace.ON:
            trace.mark("planned", msg.xfer)
        t.task = self.spawn(self._execute(who, t, key), f"xfer-{who.identity}-{msg.xfer}")
        return None

    def _plan(self, who: Who, msg: wire.StreamRequest) -> Transfer:
        on_layer = None
        if msg.progress:
            async def on_layer(layer: int, done: int, nbytes: int) -> None:
                await self.outbox.control(who.identity, wire.TransferProgress(msg.xfer, layer, done, nbytes, msg.tag),
                                          who.msg_id)
        return plan_transfer(self.rt, self.pools, who.identity, msg, on_layer)

    async def _execute(self, who: Who, t: Transfer, key: tuple[str, int]) -> None:
        answer: Msg
        try:
            seconds = await t.run()
        except StreamerError as e:
            answer = wire.TransferFailed(t.xfer, t.tag, e.code, str(e))
        except asyncio.CancelledError:
            answer = wire.TransferFailed(t.xfer, t.tag, wire.XFER_CANCELLED, "streamer shutting down")
        except Exception as e:  # noqa: BLE001 - a bug in one transfer fails that transfer only
            log.exception("[stream] transfer %s of %s failed", t.xfer, t.owner)
            answer = wire.TransferFailed(t.xfer, t.tag, code_of(e), f"{type(e).__name__}: {e}")
        else:
            for r in t.routes:
                if isinstance(r, LocalRoute):
                    await self.delivered(r.dst, who.identity, t.xfer, t.tag, r.dst_region, t.notify)
            answer = wire.TransferDone(t.xfer, t.tag, t.nbytes, seconds, t.checksummed, t.timeline(),
                                       time.monotonic() if t.times is not None else 0.0)
        finally:
            self.transfers.pop(key, None)
        await self.outbox.control(who.identity, answer, who.msg_id)
        if trace.ON:
            trace.mark("answered", t.xfer)

    async def delivered(self, dst: Endpoint, sender: str, xfer: int, tag: str, region: Any, notify: list[str]) -> None:
        if dst.kind == wire.POOL_DISK:
            PoolTable.save_disk_meta(dst)
        for client in notify:
            await self.outbox.control(client, wire.Delivered(sender, xfer, tag, dst.name, region_to_spec(region)))

    async def _layer_ready(self, who: Who, msg: wire.LayerReady) -> None:
        owner = who.identity.split(wire.SIGNAL_SEP, 1)[0]  # a compute thread's own signal socket: its client's
        for x in msg.xfers:
            t = self.transfers.get((owner, x))
            if t is not None:  # a transfer that already failed ignores late signals
                t.layer_ready(msg.layer)
        return None

    async def _cancel(self, who: Who, msg: wire.CancelTransfer) -> Msg:
        t = self.transfers.get((who.identity, msg.xfer))
        if t is None:
            return wire.Ok(f"transfer {msg.xfer} is not running")
        t.abort(cancelled(msg.xfer, msg.reason))
        return wire.Ok(f"transfer {msg.xfer} cancelled")
