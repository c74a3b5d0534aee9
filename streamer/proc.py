"""The streamer process shell: sockets, the one uvloop event loop, signals, the supervisor handshake, the two
worker threads, and the shutdown sequence. All behaviour lives in StreamerService / DataPlane.

One entry point: `run_streamer(config) -> exit code`. Started by the supervisor (one per host) or by
`python -m streamer`. Sockets:
    control ROUTER  config.control_address   stages, supervisor, controller (streamer/wire.py 200-229)
    data ROUTER     config.data_address      peer streamers (240-259)
    DEALER per peer (streamer/peer.py), DEALER to the supervisor when config.supervisor_address is set
Threads: "streamer-gpu" makes the CUDA calls that may block or launch kernels (the loop itself enqueues
DMA-only copies, StreamerConfig.inline_dma, and the NCCL sends and receives of connected links - calls that only
enqueue work; streamer/nccl.py); "streamer-copy" does CPU copies and checksums, "streamer-frame" applies
ZeroMQ frames; "nccl-init-N" build NCCL links; "cuda-wait-N" block on device events that are not expected to
complete soon (the loop polls the others: cuda._Poller). The loop never blocks on any of them. Shutdown (Shutdown message, SIGTERM, SIGINT): transfers fail with a typed error, pools
are released, all within shutdown_timeout_s; the process then exits 0. Death any other way is seen by the
supervisor (process sentinel, missing heartbeats) and by clients (disconnect -> StreamerDownError).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq
import zmq.asyncio

from bus.codec import Codec
from bus.errors import ProtocolError
from bus.logs import Throttled, peer_of
from bus.messages import ALL_MESSAGES, ERR_BAD_MESSAGE, ErrorReply, Msg, Shutdown
from bus.security import Keyring, maybe_load, start_authenticator
from bus.sockets import Receiver, Sender, bound_address, context, decode_frames, make_socket
from streamer import trace
from streamer.config import StreamerConfig
from streamer.dataplane import DataPlane
from streamer.peer import PeerNet
from streamer.service import StreamerService
from streamer.wire import Ok

log = logging.getLogger(__name__)
noisy = Throttled(log)  # warnings about what peers send: rate-limited per (kind, peer)


class _Stopped(Exception):
    pass


class _Outbox:
    """Every message the streamer sends on its two ROUTERs (bus.sockets.Sender: no zmq.asyncio future when
    ZeroMQ has room, the usual case)."""

    def __init__(self, control: zmq.asyncio.Socket, data: zmq.asyncio.Socket, codec: Codec) -> None:
        self._control, self._data, self._codec = Sender(control), Sender(data), codec

    async def control(self, identity: str | bytes, body: Msg, reply_to: int = 0) -> None:
        route = identity if isinstance(identity, bytes) else identity.encode()
        await self._control.send([route, self._codec.encode(body, reply_to)])

    async def data(self, identity: str, body: Msg, reply_to: int = 0) -> None:
        await self._data.send([identity.encode(), self._codec.encode(body, reply_to)])


def streamer_codec(name: str, incarnation: int) -> Codec:
    return Codec(name, incarnation, types=ALL_MESSAGES)


def run_streamer(config: StreamerConfig) -> int:
    try:
        import setproctitle

        setproctitle.setproctitle(f"dejavu-streamer {config.name}")
    except ImportError:
        pass
    import torch

    torch.set_num_threads(config.copy_threads)
    sys.setswitchinterval(config.switch_interval_us * 1e-6)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_main(config))


async def _main(config: StreamerConfig) -> int:
    ctx = context()
    codec = streamer_codec(config.name, config.incarnation)
    keys = maybe_load(config.keys_dir, config.name)  # with keys: only the deployment's members reach us
    auth = start_authenticator(ctx, keys)
    control = make_socket(ctx, zmq.ROUTER, bind=config.control_address, max_message=config.max_message_bytes,
                          keys=keys)
    data = make_socket(ctx, zmq.ROUTER, bind=config.data_address, max_message=config.max_message_bytes, keys=keys)
    gpu_exec = ThreadPoolExecutor(1, thread_name_prefix="streamer-gpu")
    cpu_exec = ThreadPoolExecutor(1, thread_name_prefix="streamer-copy")
    frame_exec = ThreadPoolExecutor(config.frame_threads, thread_name_prefix="streamer-frame")
    peers = PeerNet(ctx, config.name, codec, config.peer_timeout_s, config.max_message_bytes, dict(config.peers),
                    keys)
    svc = StreamerService(config, _Outbox(control, data, codec), peers, cpu_exec, gpu_exec, frame_exec)
    plane = DataPlane(svc)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await svc.start()
        # Everything alive after start-up (torch, CuPy, the pools, lanes and links) goes to the permanent
        # generation: a full collection would otherwise walk it, ~180k objects and 84 ms on the CPU box (0.6 ms
        # frozen) - a pause of every transfer in flight whenever one comes due.
        gc.collect()
        gc.freeze()
        addresses = bound_address(control), bound_address(data)
        log.info("[handshake] streamer %s (pid %d, incarnation %d) ready: control %s data %s", config.name,
                 os.getpid(), config.incarnation, *addresses)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_control_loop(control, codec, svc, stop), name="control")
            tg.create_task(_data_loop(data, codec, plane), name="data")
            tg.create_task(_janitor(plane, config.peer_timeout_s), name="janitor")
            if config.supervisor_address:
                tg.create_task(_supervisor(ctx, config, addresses, stop, keys), name="supervisor")
            tg.create_task(_until(stop), name="stop")
    except* _Stopped:
        pass
    finally:
        log.info("[shutdown] streamer %s stopping", config.name)
        try:
            await asyncio.wait_for(svc.close(), config.shutdown_timeout_s)
        except TimeoutError:
            log.error("[shutdown] releasing pools took over %.1fs (setting: shutdown_timeout_s)",
                      config.shutdown_timeout_s)
        peers.close()
        trace.dump(config.name)
        control.close(0)
        data.close(0)
        gpu_exec.shutdown(wait=False, cancel_futures=True)
        cpu_exec.shutdown(wait=False, cancel_futures=True)
        frame_exec.shutdown(wait=False, cancel_futures=True)
        if auth is not None:
            auth.stop()
        ctx.destroy(0)
    return 0


async def _janitor(plane: DataPlane, period: float) -> None:
    while True:
        await asyncio.sleep(period)  # a period, not a synchronisation
        plane.sweep()


async def _until(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _Stopped


async def _control_loop(sock: zmq.asyncio.Socket, codec: Codec, svc: StreamerService, stop: asyncio.Event) -> None:
    inbox, out = Receiver(sock), svc.outbox
    while True:
        frames = await inbox.recv()
        try:
            route, got = decode_frames(codec, frames, route_frames=1)
        except ProtocolError as e:
            noisy.warning("bad-control", peer_of(frames), "[stream] undecodable control message from %s: %s",
                          peer_of(frames), e)
            if len(frames) > 1:
                await out.control(bytes(frames[0].bytes), ErrorReply(ERR_BAD_MESSAGE, str(e)))
            continue
        identity = route[0].decode(errors="replace")
        if isinstance(got.body, Shutdown):
            await out.control(route[0], Ok("stopping"), got.env.msg_id)
            stop.set()
            continue
        await svc.handle(identity, got.env.incarnation, got.env.msg_id, got.body)


async def _data_loop(sock: zmq.asyncio.Socket, codec: Codec, plane: DataPlane) -> None:
    inbox = Receiver(sock)
    while True:
        frames = await inbox.recv()
        try:
            route, got = decode_frames(codec, frames, route_frames=1)
        except ProtocolError as e:
            noisy.warning("bad-data", peer_of(frames), "[stream] undecodable data message from %s: %s",
                          peer_of(frames), e)
            continue
        await plane.handle(route[0].decode(errors="replace"), got.env.incarnation, got.env.msg_id, got.body,
                           list(got.frames))


async def _supervisor(ctx: zmq.asyncio.Context, config: StreamerConfig, addresses: tuple[str, str],
                      stop: asyncio.Event, keys: Keyring | None) -> None:
    """Hello, then a Heartbeat every heartbeat_interval_s; a Shutdown from the supervisor stops us."""
    from bus.child import SupervisorLink

    link = SupervisorLink(ctx, config.supervisor_address, streamer_codec(config.name, config.incarnation),
                          "streamer", config.index, keys, server=config.supervisor_name, host=config.host_id)
    runner = None
    try:
        await link.hello({"control": addresses[0], "data": addresses[1]})
        runner = asyncio.ensure_future(link.run(config.heartbeat_interval_s, lambda: 0.0, lambda: "serving"))
        await link.stop.wait()
        stop.set()
    finally:
        if runner is not None:
            runner.cancel()
        link.close()
