"""The stage process shell: sockets, event loop, compute thread, handshake. Logic lives in StageCore.

Lifecycle: connect to the supervisor and say Hello; find the KV pool's home (a CPU stage's pool lives in
shared memory the host's streamer keeps - a restarted stage takes its predecessor's over, KV included:
stages/kv_home.py); load the shard on the compute thread (heartbeats keep flowing meanwhile); bind the
activation input; Hello the controller (within `handshake_timeout`; again whenever a restarted controller asks,
Rehello); then serve: steps arrive from the controller (stage 0) or from the upstream stage, run one at a time
on the compute thread, and go downstream (or, from the last stage, back to the controller as sampled tokens).
Every message carries the stage's incarnation; every step carries the deployment epoch, and steps of an
old epoch are dropped unrun (they belonged to a pipeline that has since been rebuilt); so are those of an epoch
the controller declared over (EpochOver: a stage died), whose NCCL links are aborted on the spot.

Never: talks to clients, holds scheduling state, or blocks the event loop with compute.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import torch
import zmq

from bus.child import EXIT_CONFIG, SupervisorLink, decode_config, install_uvloop, setup_child
from bus.codec import Codec
from bus.errors import DeadlineError, ProtocolError
from bus.logs import Throttled
from bus.messages import (
    ERR_BAD_REQUEST,
    ERR_STEP_VOID,
    EpochOver,
    Hello,
    KvMove,
    KvSent,
    LinkInit,
    Rehello,
    ReplicaSync,
    Restore,
    Restored,
    Shutdown,
    StageStats,
    StepFailed,
    StepRequest,
    StepResult,
    SwapFailed,
    SwapInfo,
    TensorMeta,
    Topology,
    TopologyAck,
    Welcome,
)
from bus.security import CONTROLLER, maybe_load, start_authenticator
from bus.sockets import context, decode_frames, make_socket, recv_frames, recv_within, send
from stages.activation import ActivationIn, ActivationOut
from stages.config import StageProcConfig
from stages.errors import InvalidRequestError, StageError, StepVoid
from stages.kv_home import KVHome, open_gpu_home, open_home
from stages.kv_push import KvPusher, Pushing
from stages.nccl_activation import LinkClosed, NcclActivations
from stages.replica import Replicator
from stages.runtime import ShardConfig, pool_layout
from stages.stage import StageCore, StepOutput
from stages.step_profiler import StepProfiler
from stages.swap import SwapError, Swapper
from stages.swap_policy import SwapDecision
from stages.swap_setup import decide_for_stage, open_receive, open_swap
from stages.warmup import RestoreWarmup
from streamer.client import LayerSignal, attach_kv_hooks
from streamer.errors import PeerDeadError, StreamerError

log = logging.getLogger(__name__)
SLOW_STEP_S = 0.5  # a step that holds the compute thread longer is logged (graph captures, kernel compiles)
noisy = Throttled(log)  # warnings about what peers send: rate-limited per (kind, peer)

IMPORTED = time.monotonic()  # this module's imports (torch, the stage's code) are done
ASSIGNED_AT: float | None = None  # a warm standby (stages/standby.py): when it was told which stage to be
WARMED = ""  # a warm standby's device warm-up, as its log said it (stages/device_warmup.py)


def since_exec() -> float | None:
    """Seconds since this process was exec'd (Linux: its start time in /proc), None where it cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


MAX_LINK_FAILURES = 3  # epochs in a row a stage may fail to link (a neighbour died meanwhile) before it exits


class StageProcess:
    def __init__(self, cfg: StageProcConfig) -> None:
        self.cfg = cfg
        self.name = f"stage-{cfg.index}"  # its process name: its envelopes' sender and its key's name
        # the only sender its activation input takes (the first stage of a pipeline takes steps from the controller)
        self.upstream = f"stage-{cfg.index - 1}" if cfg.index > cfg.first_index else ""
        self.codec = Codec(self.name, cfg.incarnation)
        self.ctx = context()
        # The compute thread makes the stage's GPU current once: CUDA's current device is per thread, and
        # events, streams, graph capture and NCCL calls all act on it.
        cuda = cfg.device.startswith("cuda")
        init, args = (torch.cuda.set_device, (torch.device(cfg.device),)) if cuda else (None, ())
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{cfg.index}-compute",
                                          initializer=init, initargs=args)
        # a restarted (or moved) stage loads its weights on a thread of its own after its Hello, so its epoch's
        # links (set up on the compute thread) and its KV restore from the replica run meanwhile (issue 18)
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{cfg.index}-load",
                                         initializer=init, initargs=args) if cfg.incarnation > 0 else None
        # a last stage's tokens are read on a thread of their own (it waits for their step's event, while the
        # compute thread launches the next step): StageProcConfig.defer_tokens
        self.defer = (cfg.defer_tokens if cfg.defer_tokens is not None else cuda) and cfg.index == cfg.last_stage
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{cfg.index}-tokens") \
            if self.defer else None
        self.unsent: tuple[StepRequest, asyncio.Future[list[int]]] | None = None  # a step whose tokens are read
        self.core: StageCore | None = None
        self.core_ready = asyncio.Event()
        self.exit_code = 0
        self.epoch = -1
        self.over = -1  # the latest epoch known to be over (EpochOver): its steps are dropped
        self.linking: asyncio.Task[None] | None = None  # the current Topology's link setup
        self.link_failures = 0  # epochs in a row whose links could not be set up
        self.tg: asyncio.TaskGroup
        self.busy_since = 0.0
        self.busy_total = 0.0  # CPU: wall time computing steps
        self.gpu_busy = 0.0  # CUDA: device time of steps, from event pairs (the true busy time of the GPU)
        self.gpu_events: collections.deque[tuple[torch.cuda.Event, torch.cuda.Event]] = collections.deque()
        self.profiler = StepProfiler.from_env(cfg.index)  # DEJAVU_PROFILE_STEPS: where a served step's time goes
        self.steps = 0
        self.tokens = 0
        self.serving_since = 0.0
        self.state = "starting"
        self.queue: asyncio.Queue[tuple[StepRequest, torch.Tensor | None]] = asyncio.Queue()
        self.out: ActivationOut | None = None
        self.is_last = cfg.index == cfg.last_stage  # of its pipeline: it samples
        self.nccl: NcclActivations | None = None
        self.kv: KVHome | None = None
        self.replica: Replicator | None = None  # KV replication (stages/replica.py), with --replicate
        self.push: KvPusher | None = None  # a prompt stage's KV streaming to the token stages (stages/kv_push.py)
        self.swap: Swapper | None = None  # microbatch swapping (stages/swap.py), when it is on
        self.swapping = SwapDecision(False, "--swap off")
        self.prep: RestoreWarmup | None = None  # a Restore's first steps, prepared ahead (CUDA; stages/warmup.py)
        self.inc_ready = asyncio.Event()
        if cfg.uses_nccl:
            self.nccl = NcclActivations(torch.device(cfg.device), cfg.index)

    async def on_gpu(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run `fn` on the compute thread (the only thread that issues CUDA work)."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def run(self) -> int:
        """Serve until Shutdown; the exit code (EXIT_CONFIG: cannot start as configured)."""
        cfg = self.cfg
        loop = self.loop = asyncio.get_running_loop()
        started = time.monotonic()  # the start-up's phases, in one log line once ready (recovery time's split)
        if ASSIGNED_AT is not None:  # a standby imported everything before it was needed
            alive: float | None = started - ASSIGNED_AT
            phases = {"standby": alive}
            if WARMED:
                log.info("[startup] stage %d (incarnation %d) is a standby that warmed its device first: %s",
                         cfg.index, cfg.incarnation, WARMED)
        else:
            alive = since_exec()
            phases = {"imports": alive - (started - IMPORTED) if alive is not None else float("nan")}
        self.keys = maybe_load(cfg.keys_dir, self.name)
        self.auth = start_authenticator(self.ctx, self.keys)  # for the activation input it binds
        self.sup = SupervisorLink(self.ctx, cfg.supervisor_address, self.codec, "stage", cfg.index, self.keys,
                                 server=cfg.supervisor_name, host=cfg.host_id)
        await self.sup.hello()
        beats = asyncio.ensure_future(self.sup.run(cfg.heartbeat_interval, self._busy, lambda: self.state))
        try:
            if cfg.device == "cpu" and cfg.threads:
                torch.set_num_threads(cfg.threads)
            shard = ShardConfig(Path(cfg.model_dir), tuple(cfg.layers), cfg.num_slots, cfg.max_seq_len, cfg.dtype,
                                cfg.device, cuda_graphs=cfg.cuda_graphs, range_size=cfg.microbatch_size,
                                cudnn_attention=cfg.cudnn_attention)
            logical = shard
            if cfg.swap != "off":
                shard = await self._swap_decision(shard)
            mark = time.monotonic()
            phases["setup"] = mark - started
            self.kv = await self._kv_home(shard)
            phases["kv_home"] = time.monotonic() - mark
            if self.swapping.on and not await self._open_swap(shard, logical):
                return EXIT_CONFIG
            self.prep = RestoreWarmup.for_stage(self.compute, shard, self.kv.tensor, self.swap is not None)
            if cfg.replicate and self.kv.client is not None and self.kv.memory is not None:
                # swapping: the replica is fed from the swap pool (logical slots), once each write-back landed
                self.replica = Replicator(self.kv.client, self.kv.name, self.kv.memory, pool_layout(shard),
                                          cfg.streamer_name, cfg.replica_lag, self._to_controller) \
                    if self.swap is None else Replicator(self.kv.client, self.swap.swap_pool, self.kv.memory,
                                                         pool_layout(logical), cfg.streamer_name, cfg.replica_lag,
                                                         self._to_controller)
                if self.swap is not None:
                    rep = self.replica
                    self.swap.on_written = lambda step: rep.after_step(step, None, True)
            if cfg.pipeline == "prompt" and self.kv.client is not None and self.kv.memory is not None:
                self.push = KvPusher(self.kv.client, self.kv.name, self.kv.memory, pool_layout(shard),
                                     cfg.streamer_name, self._to_controller)
            elif cfg.pipeline != "colocated" and self.kv.client is None:
                log.error("[startup] stage %d: a %s stage needs its KV pool with its host's streamer; it has none "
                          "(every prompt pass it takes part in fails)", cfg.index, cfg.pipeline)
            self.busy_since = load_mark = time.monotonic()
            loading = loop.run_in_executor(self.loader or self.compute, StageCore, shard, self.kv.tensor)
            if self.loader is None:  # a first start: loaded before its Hello, so "ready" means ready
                failed = await self._loaded(loading, load_mark, phases)
                if failed:
                    return failed
            self.data_in = ActivationIn(self.ctx, self.codec, f"tcp://{cfg.bind_host}:0", self.keys)
            self.ctl = make_socket(self.ctx, zmq.DEALER, connect=cfg.controller_address,
                                   identity=self.name.encode(), keys=self.keys, server=CONTROLLER)
            mark = time.monotonic()
            await self._hello()
            frames = await recv_within(self.ctl, cfg.handshake_timeout, "Welcome from the controller",
                                       "handshake_timeout")
            phases["handshake"] = time.monotonic() - mark
            _, msg = decode_frames(self.codec, frames)
            if not isinstance(msg.body, Welcome):
                raise ProtocolError(f"expected Welcome, got {type(msg.body).__name__}")
            self.state = "ready"
            log.info("[handshake] stage %d (incarnation %d) layers %s ready", cfg.index, cfg.incarnation, cfg.layers)
            log.info("[startup] stage %d (incarnation %d) ready %.2f s after exec: %s", cfg.index, cfg.incarnation,
                     (alive or 0.0) + time.monotonic() - started,
                     ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                tasks = [tg.create_task(self._control()), tg.create_task(self._data()),
                         tg.create_task(self._worker()), tg.create_task(self._stats())]
                if self.loader is not None:
                    tasks.append(tg.create_task(self._load_behind(loading, load_mark)))
                await self.sup.stop.wait()
                log.info("[shutdown] stage %d: %s", cfg.index, self.sup.stop_reason)
                for t in tasks:
                    t.cancel()
            return self.exit_code
        finally:
            beats.cancel()
            self.compute.shutdown(wait=False, cancel_futures=True)
            if self.loader is not None:
                self.loader.shutdown(wait=False, cancel_futures=True)
            if self.reader is not None:
                self.reader.shutdown(wait=False, cancel_futures=True)
            if self.replica is not None:
                await self.replica.close()
            if self.swap is not None:
                await self.swap.close()
            if self.push is not None:
                await self.push.close()
            if self.kv is not None:
                await self.kv.close(self.cfg.streamer_timeout)
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy(linger=0)

    async def _loaded(self, loading: asyncio.Future[StageCore], mark: float, phases: dict[str, float]) -> int:
        """The weights' load ended: the core is set (0), or the stage cannot start as configured (EXIT_CONFIG,
        the supervisor told). Any other failure propagates: the stage exits and is restarted."""
        cfg = self.cfg
        try:
            self.core = await loading
            phases["weights"] = time.monotonic() - mark
        except (StageError, InvalidRequestError) as e:  # the model or the settings: a restart fails the same
            log.info("[startup] stage %d cannot load: %s", cfg.index, e)
            await self.sup.fatal(f"stage {cfg.index} cannot load its layers {cfg.layers}: {e}")
            return EXIT_CONFIG
        except torch.OutOfMemoryError:  # the settings again (issue 20): a restart would fail the same
            why = (f"stage {cfg.index} on {cfg.device} ran out of memory loading its layers {cfg.layers} and a KV "
                   f"pool of {cfg.num_slots} slots x {cfg.max_seq_len} tokens: lower --max-seq-len, or "
                   "--microbatch-size (an explicit one; with auto, --gpu-memory-fraction)")
            log.error("[startup] %s", why)
            await self.sup.fatal(why)
            return EXIT_CONFIG
        finally:
            self.busy_since = 0.0
        if self.prep is not None:  # a Restore's graphs, queued before any step can be
            self.prep.loaded(self.core.runtime)
        self.core_ready.set()
        if cfg.device.startswith("cuda"):  # what dejavu-serve's memory plan estimated (recovery/sizing.py), measured
            free, total = torch.cuda.mem_get_info(torch.device(cfg.device))
            log.info("[startup] stage %d memory on %s: %.2f GiB allocated (weights, KV pool of %d slots), %.2f of "
                     "%.2f GiB free", cfg.index, cfg.device, torch.cuda.memory_allocated(torch.device(cfg.device))
                     / 2**30, cfg.num_slots, free / 2**30, total / 2**30)
        return 0

    async def _load_behind(self, loading: asyncio.Future[StageCore], mark: float) -> None:
        """A restarted stage's weights, loading while it links and restores: steps wait for them (_worker)."""
        phases: dict[str, float] = {}
        code = await self._loaded(loading, mark, phases)
        if code:
            self.exit_code = code
            self.sup.stop_reason = "it cannot load its layers"
            self.sup.stop.set()
            return
        log.info("[startup] stage %d (incarnation %d) weights loaded in %.2f s, behind its Hello (its epoch's links "
                 "and KV restore ran meanwhile)", self.cfg.index, self.cfg.incarnation, phases["weights"])

    async def _kv_home(self, shard: ShardConfig) -> KVHome:
        """A CPU stage computes in shared memory its streamer keeps (a restart finds its KV there, unless
        kv_takeover is off); a GPU stage in its own allocation, registered with the streamer (CUDA IPC) when it
        replicates, else private (either way it dies with the process: the replica, else a recompute, brings
        it back)."""
        cfg = self.cfg
        name = f"kv-stage-{cfg.index}"
        if not cfg.streamer_address:
            return KVHome(name, None, None, False)
        if cfg.device != "cpu":
            if not cfg.shares_kv and not self.swapping.on:  # (swapping: the streamer moves its frames' KV)
                return KVHome(name, None, None, False)
            device = torch.device(cfg.device)
            return await open_gpu_home(name, pool_layout(shard), device.index or 0, cfg.streamer_address,
                                       cfg.incarnation, cfg.streamer_timeout, wait=cfg.streamer_wait,
                                       client_name=self.name, keys=self.keys, streamer=cfg.streamer_name)
        return await open_home(name, pool_layout(shard), cfg.streamer_address, cfg.incarnation,
                               f"{cfg.shm_prefix}-stage{cfg.index}" if cfg.shm_prefix else f"stage{cfg.index}",
                               cfg.streamer_timeout, wait=cfg.streamer_wait, client_name=self.name, keys=self.keys,
                               streamer=cfg.streamer_name, takeover=cfg.kv_takeover and not self.swapping.on)

    async def _swap_decision(self, shard: ShardConfig) -> ShardConfig:
        """--swap auto|on: decide (stages/swap_policy.py, with this device's figures, measured on the compute
        thread); swapping, the stage's own pool holds swap_frames microbatches."""
        from dataclasses import replace

        from stages.models import load_spec

        cfg = self.cfg
        _, spec = load_spec(Path(cfg.model_dir))
        self.swapping = await self.on_gpu(decide_for_stage, cfg, pool_layout(shard), spec)
        log.info("[swap] stage %d: swapping %s (%s)", cfg.index, "on" if self.swapping.on else "off",
                 self.swapping.reason)
        if not self.swapping.on:
            return shard
        return replace(shard, num_slots=cfg.swap_frames * cfg.microbatch_size)

    async def _open_swap(self, shard: ShardConfig, logical: ShardConfig) -> bool:
        """The swap pool (kept from a predecessor when the streamer still has it) and the Swapper; False: the stage
        cannot swap as configured (said to the supervisor: a restart fails the same)."""
        cfg, kv = self.cfg, self.kv
        assert kv is not None
        if kv.client is None:
            why = "its KV pool is not with a streamer (swapping moves KV through the host's streamer)"
        else:
            try:
                name, kept = await open_swap(kv.client, cfg.index, pool_layout(logical))
                # a token stage: the prompts' KV lands by logical slot in a receive pool (its own pool holds frames)
                recv = (await open_receive(kv.client, cfg.index, pool_layout(logical)))[0] \
                    if cfg.pipeline == "token" else None
            except StreamerError as e:
                why = f"no swap or receive pool on the host's streamer: {e}"
            else:
                self.swap = Swapper(kv.client, kv.name, name, pool_layout(shard), cfg.microbatch_size,
                                    cfg.swap_frames, cfg.swap_timeout, self.swapping, self._to_controller,
                                    pool_layout(logical), recv)
                self.swap.kept = kept
                return True
        await self.sup.fatal(f"stage {cfg.index} cannot swap microbatches: {why}")
        return False

    async def _swap_failed(self, step: StepRequest, via_nccl: bool, e: Exception) -> None:
        """The step's microbatch could not be made resident: drop the step (its hidden states received, so the
        NCCL link stays in step) and let the controller recompute that microbatch."""
        await self._send_tokens()  # (what the controller hears keeps the steps' order)
        log.warning("[swap] mb %d step %d not run: %s (the controller recomputes the microbatch)", step.mb,
                    step.step, e)
        if via_nccl and self.nccl is not None and step.hidden is not None:
            await self.on_gpu(self.nccl.recv, step.hidden)
        await send(self.ctl, self.codec, SwapFailed(step.epoch, step.mb, step.step, str(e)))

    async def _to_controller(self, body) -> None:  # type: ignore[no-untyped-def]
        await send(self.ctl, self.codec, body)

    async def _hello(self) -> None:
        cfg = self.cfg
        await send(self.ctl, self.codec, Hello("stage", cfg.index, os.getpid(), cfg.host_id or socket.gethostname(),
                                               {"data": self.data_in.address}, list(cfg.layers), cfg.num_slots,
                                               kv_intact=self.kv is not None and self.kv.intact,
                                               swap_kept=self.swap is not None and self.swap.kept,
                                               receive_pool=(self.swap.receive_pool or "") if self.swap else ""))

    async def _stats(self) -> None:
        """Every heartbeat interval, also before serving: a restarted controller learns of this stage from
        these (it answers Rehello)."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            up = time.monotonic() - self.serving_since if self.serving_since else 0.0
            busy = self.gpu_busy if self.nccl is not None or self.cfg.device.startswith("cuda") \
                else self.busy_total + self._busy()
            r = self.replica
            push = self.push
            if push is not None:
                stats = StageStats(busy, self.steps, up, self.tokens, kv_bytes=push.bytes, kv_failures=push.failures)
            elif r is not None:
                stats = StageStats(busy, self.steps, up, self.tokens, r.bytes, r.stalls, r.stall_s, r.failures,
                                   r.broken[:500])
            elif self.cfg.replicate:  # asked to, but its KV is not with a streamer (its log says why)
                stats = StageStats(busy, self.steps, up, self.tokens,
                                   replica_error="this stage's KV pool is not registered with its host's streamer")
            else:
                stats = StageStats(busy, self.steps, up, self.tokens)
            if self.cfg.swap != "off":
                d = self.swapping
                swap = self.swap.info() if self.swap is not None else SwapInfo(d.mode, False, d.reason)
                stats = msgspec.structs.replace(stats, swap=swap)
            await send(self.ctl, self.codec, stats)

    def _busy(self) -> float:
        return time.monotonic() - self.busy_since if self.busy_since else 0.0

    async def _control(self) -> None:
        while True:
            frames = await recv_frames(self.ctl)
            try:
                _, msg = decode_frames(self.codec, frames)
            except ProtocolError as e:
                noisy.warning("bad-frame", "controller", "[control] dropped a bad frame: %s", e)
                continue
            body = msg.body
            if isinstance(body, StepRequest):
                self.queue.put_nowait((body, None))
                if self.swap is not None:
                    self.swap.expect(body)
            elif isinstance(body, Topology):
                # a task of its own: linking waits on the neighbours (up to link_timeout), and an EpochOver that
                # arrives meanwhile must be acted on at once (it aborts the link being set up)
                if self.linking is not None and not self.linking.done():
                    self.linking.cancel()
                self.linking = self.tg.create_task(self._serve_epoch(body, msg.env.msg_id))
            elif isinstance(body, Rehello):  # the controller was restarted: register again, then a new epoch
                log.info("[handshake] stage %d: controller incarnation %d asks for Hello", self.cfg.index,
                         body.controller_incarnation)
                self.state = "ready"
                await self._hello()
            elif isinstance(body, EpochOver):
                await self._epoch_over(body.epoch)
            elif isinstance(body, ReplicaSync):
                if self.replica is not None and body.epoch == self.epoch:
                    self.replica.start_sync(body.epoch)
            elif isinstance(body, Restore):
                self.tg.create_task(self._restore(body, msg.env.msg_id))
            elif isinstance(body, KvMove):
                if self.push is not None and body.epoch == self.epoch and body.epoch > self.over:
                    self.tg.create_task(self.push.move(body))
                else:  # not this stage's epoch, or it cannot stream: the controller learns it at once
                    await send(self.ctl, self.codec, KvSent(body.epoch, -1, body.move, False, 0,
                                                            "this stage cannot move KV now"))
            elif isinstance(body, Welcome):
                pass  # the answer to a Hello sent again (Rehello)
            elif isinstance(body, Shutdown):
                self.sup.stop.set()
            else:
                noisy.warning("unexpected", "controller", "[control] unexpected %s", type(body).__name__)

    async def _serve_epoch(self, topo: Topology, msg_id: int) -> None:
        """Link for `topo.epoch` and acknowledge it. A neighbour that dies meanwhile (the link fails, or the
        controller says the epoch is over) is not this stage's fault: no ack, and the controller forms the next
        epoch once the neighbour is back. Any other failure propagates (the stage exits and is restarted)."""
        try:
            await self._set_topology(topo)
        except (PeerDeadError, LinkClosed) as e:
            self.link_failures += 1
            if self.link_failures >= MAX_LINK_FAILURES and topo.epoch > self.over:
                raise  # failing with every neighbour in turn: the fault is more likely this stage's own
            log.warning("[topology] stage %d: epoch %d not linked (%s); waiting for the next one", self.cfg.index,
                        topo.epoch, e)
            return
        self.link_failures = 0
        if topo.epoch <= self.over:
            return
        fresh: list[int] = []
        failed = {h.stage: "this stage keeps no KV with a streamer" for h in topo.hosted}
        if self.replica is not None:
            fresh, failed = await self.replica.configure(topo)
        if self.push is not None:
            await self.push.configure(topo)
        await send(self.ctl, self.codec, TopologyAck(topo.epoch, fresh, failed), reply_to=msg_id)

    async def _restore(self, msg: Restore, msg_id: int) -> None:
        """Pull this stage's KV back from its replica (before the epoch serves), and say how it went."""
        if self.replica is None or msg.epoch != self.epoch:
            await send(self.ctl, self.codec, Restored(msg.epoch, False, message="no replication here"),
                       reply_to=msg_id)
            return
        if self.prep is not None:  # on the compute thread, while the KV (and the weights) arrive
            logged = self.prep.restore(msg.lengths)
            if logged is not None:
                self.tg.create_task(logged)
        done = await self.replica.restore(msg)
        await send(self.ctl, self.codec, done, reply_to=msg_id)

    async def _set_topology(self, topo: Topology) -> None:
        """Serve epoch `topo.epoch`: rebuild the link downstream (ZeroMQ, plus NCCL on CUDA). Acked by the
        caller only once the NCCL link is up, so the controller serves only over complete pipelines."""
        self.epoch = topo.epoch
        if self.out is not None:
            self.out.close()
            self.out = None
        if not self.is_last:
            if not topo.downstream:
                raise ProtocolError(f"stage {self.cfg.index} got a topology without a downstream address")
            self.out = ActivationOut(self.ctx, self.codec, topo.downstream, self.keys, f"stage-{self.cfg.index + 1}")
            if self.nccl is not None:
                uid = await self.nccl.open_out(self.on_gpu, self.cfg.link_timeout, topo.epoch)
                await self.out.send_msg(LinkInit(topo.epoch, uid))
                await self.nccl.join_out(self.cfg.link_timeout)
        # steps queued under the old epoch are dropped by the worker
        self.state = "serving"
        if not self.serving_since:
            self.serving_since = time.monotonic()
        log.info("[topology] stage %d: epoch %d, downstream %s", self.cfg.index, topo.epoch, topo.downstream or "-")

    async def _epoch_over(self, epoch: int) -> None:
        """A stage of `epoch` died: drop that epoch's queued steps and abort its NCCL links at once (their
        operations waiting on the dead stage return; a step using them raises LinkClosed and is dropped)."""
        self.over = max(self.over, epoch)
        if self.nccl is not None:
            await self.nccl.close_epoch(epoch)
        log.info("[topology] stage %d: epoch %d is over (a stage died); its links are closed", self.cfg.index, epoch)

    async def _data(self) -> None:
        while True:
            try:
                msg, hidden = await self.data_in.recv()
            except ProtocolError as e:
                noisy.warning("bad-frame", "data", "[data] dropped a bad frame: %s", e)
                continue
            if msg.env.sender != self.upstream:  # (with keys, decode_frames checked the sender is who it says)
                noisy.warning("not-upstream", msg.env.sender, "[data] %s is not this stage's upstream %s: dropped",
                              msg.env.sender, self.upstream)
                continue
            if isinstance(msg.body, StepRequest):
                self.queue.put_nowait((msg.body, hidden))
                if self.swap is not None:
                    self.swap.expect(msg.body)
            elif isinstance(msg.body, LinkInit) and self.nccl is not None:
                if msg.body.epoch >= self.epoch:
                    self.inc_ready.clear()
                    asyncio.ensure_future(self._join_in(msg.body))
            else:
                noisy.warning("unexpected", "data", "[data] unexpected %s", type(msg.body).__name__)

    async def _join_in(self, init: LinkInit) -> None:
        assert self.nccl is not None
        try:
            await self.nccl.join_in(self.on_gpu, init.uid, self.cfg.link_timeout, init.epoch)
        except Exception as e:  # the upstream died while linking: the next epoch brings a new LinkInit
            log.error("[topology] NCCL link from stage %d (epoch %d) failed: %s", self.cfg.index - 1, init.epoch, e)
            return
        self.inc_ready.set()

    def _stale(self, step: StepRequest) -> bool:
        """The step belongs to a pipeline that is gone: rebuilt since (another epoch) or declared over."""
        return step.epoch != self.epoch or step.epoch <= self.over

    async def _next_step(self) -> tuple[StepRequest, torch.Tensor | None]:
        """The next step to run; meanwhile the tokens of the step before go out as soon as they are read (deferred:
        if a step comes first, it is launched before they go, so the device runs it while they are read)."""
        if self.unsent is None:
            return await self.queue.get()
        get = asyncio.ensure_future(self.queue.get())
        try:
            await asyncio.wait({get, self.unsent[1]}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                await self._send_tokens()
            return await get
        finally:
            get.cancel()  # (no-op once done; the worker was cancelled otherwise)

    async def _send_tokens(self) -> None:
        """The deferred step's tokens to the controller, once read (its pipeline still serving)."""
        if self.unsent is None:
            return
        step, reading = self.unsent
        self.unsent = None
        tokens = await reading
        if not self._stale(step):
            await send(self.ctl, self.codec, StepResult(step.epoch, step.mb, step.step, tokens, []))

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        cuda = self.cfg.device.startswith("cuda")
        while True:
            step, hidden = await self._next_step()
            if self.unsent is not None and (self.core is None or (cuda and not self.core.replays(step))):
                # a slow launch (a graph to capture, a prompt's eager kernels) or weights still loading: the step
                # before's tokens go first (a restarted OPT-13B stage's first decode step took 1.8 s: cuDNN's first use)
                await self._send_tokens()
            if self.core is None:  # a restarted stage's weights are still loading (bounded: a load that hangs is
                await self.core_ready.wait()  # busy past --hang-timeout, and the supervisor kills the stage)
            if self._stale(step):
                continue
            via_nccl = step.hidden is not None and hidden is None
            if via_nccl:
                if self.nccl is None:
                    log.warning("[step] mb %d step %d: hidden states without a frame and no NCCL link", step.mb,
                                step.step)
                    continue
                try:
                    await asyncio.wait_for(self.inc_ready.wait(), self.cfg.link_timeout)
                except TimeoutError:
                    log.error("[step] no NCCL link from upstream within link_timeout; dropping mb %d step %d",
                              step.mb, step.step)
                    continue
                if self._stale(step):
                    continue
            local = None  # swapping: the step in the slots of its microbatch's resident frame
            if self.swap is not None:
                try:
                    local = await self.swap.acquire(step)
                except SwapError as e:
                    if not self._stale(step):
                        await self._swap_failed(step, via_nccl, e)
                    continue
                if self._stale(step):
                    self.swap.after_step(step, False)
                    continue
            rep, layered, signal = self.replica, None, None
            push, pushing, why = self.push, None, ""
            if step.kv_to is not None:  # a prompt pass: its KV streams to the token stages as it is written
                if push is None:
                    why = "this stage cannot stream KV (its pool is not with a streamer)"
                else:
                    pushing, signal, why = await push.open(step)
                if self._stale(step):
                    await self._pushed(step, pushing, False, "the step's pipeline is gone")
                    continue
            elif rep is not None and rep.active:
                await rep.before_step(step.mb)  # --replica-lag: replication is too far behind (counted)
                if self._stale(step):
                    continue
                if rep.is_prompt(step) and self.swap is None:  # streamed layer by layer while the pass runs
                    opened = await rep.open_layered(step)
                    if opened is not None:
                        layered, signal = opened
            self.busy_since = started = time.monotonic()
            try:
                out = await loop.run_in_executor(self.compute, self._compute, step, hidden, via_nccl, signal, local)
                self.steps += 1
                self.tokens += len(step.token_ids)
            except LinkClosed as e:  # a new epoch aborted the NCCL link this step used: the step is stale
                await self._send_tokens()  # (what the controller hears keeps the steps' order)
                log.info("[step] mb %d step %d (epoch %d) dropped: %s", step.mb, step.step, step.epoch, e)
                if self.swap is not None:
                    self.swap.after_step(step, False)
                if rep is not None:
                    rep.after_step(step, layered, False)
                if step.kv_to is not None:
                    await self._pushed(step, pushing, False, str(e))
                continue
            except Exception as e:
                await self._send_tokens()
                if self.swap is not None:
                    self.swap.after_step(step, False)
                if rep is not None:
                    rep.after_step(step, layered, False)
                if step.kv_to is not None:
                    await self._pushed(step, pushing, False, f"the prompt pass failed: {e}")
                if self._stale(step):
                    # its pipeline was rebuilt under it (an aborted link can leave garbage in its input, which
                    # sampling may refuse): nobody waits for this step any more
                    log.info("[step] mb %d step %d of epoch %d failed after the pipeline was rebuilt (%s); dropped",
                             step.mb, step.step, step.epoch, e)
                    continue
                if isinstance(e, StepVoid):  # (lookahead: the controller sends its members again)
                    log.info("[step] %s", e)
                    await send(self.ctl, self.codec, StepFailed(step.epoch, step.mb, step.step, ERR_STEP_VOID, str(e)))
                    continue
                if not isinstance(e, (StageError, InvalidRequestError)):
                    raise  # a fault of this stage: it exits, and the supervisor restarts it
                # the step was wrong, not the stage: report it; the process keeps serving
                log.warning("[step] mb %d step %d failed: %s", step.mb, step.step, e)
                await send(self.ctl, self.codec, StepFailed(step.epoch, step.mb, step.step, ERR_BAD_REQUEST, str(e)))
                continue
            finally:
                self.busy_since = 0.0
                took = time.monotonic() - started
                self.busy_total += took
                if took > SLOW_STEP_S:
                    log.info("[step] mb %d step %d held the compute thread %.2f s (%d tokens)", step.mb, step.step,
                             took, len(step.token_ids))
            await self._send_tokens()  # the step before's: this one is launched behind it
            if self.swap is not None:  # its rows go to the swap pool (and from there to the replica)
                self.swap.after_step(step, not self._stale(step))
            elif rep is not None and step.kv_to is None:  # to the replica only if its pipeline still serves
                rep.after_step(step, layered, not self._stale(step))
            if step.kv_to is not None:
                await self._pushed(step, pushing, not self._stale(step), why)
            if self._stale(step):
                continue  # the pipeline was rebuilt while this step ran
            if out.pending is not None:
                assert self.reader is not None
                self.unsent = (step, loop.run_in_executor(self.reader, out.pending.read))
            elif out.tokens is not None:
                await send(self.ctl, self.codec, StepResult(step.epoch, step.mb, step.step, out.tokens,
                                                            out.logprobs or []))
            elif out.sent is not None:
                pass  # the header went out (announce) before the NCCL send was enqueued
            elif self.out is not None and out.hidden is not None:
                await self.out.send(step, out.hidden)

    async def _pushed(self, step: StepRequest, pushing: Pushing | None, ran: bool, why: str) -> None:
        """A prompt pass is over (ran: for a pipeline still current): the controller learns where its KV is once
        its transfer ends - or at once when it has none (KvSent ok=False: the requests run their prompt again)."""
        await self._send_tokens()  # (what the controller hears keeps the steps' order)
        if self.push is not None and pushing is not None:
            self.push.after(step, pushing, ran, why)
            return
        if step.kv_to is not None and all(s < 0 for s in step.kv_to) and not why:  # every request parked
            await send(self.ctl, self.codec, KvSent(step.epoch, step.mb, step.step, ran, 0,
                                                    "" if ran else "the prompt pass did not run"))
            return
        if ran:
            log.warning("[prompt] pass %d/%d: its KV cannot go to the token stages: %s", step.mb, step.step, why)
        if self.push is not None:
            self.push.failures += 1
        await send(self.ctl, self.codec, KvSent(step.epoch, step.mb, step.step, False, 0, why or "no transfer"))

    def _compute(self, step: StepRequest, hidden: torch.Tensor | None, via_nccl: bool,
                 signal: LayerSignal | None = None, local: StepRequest | None = None) -> StepOutput:
        """Compute thread: fetch the input over NCCL if it came that way, run the step, and enqueue the
        output's NCCL send (so the header can follow it). signal: a prompt pass streamed to the replica layer by
        layer (each layer's KV is signalled as soon as it is written); a GPU pool's last-layer event is recorded
        after every step when replicating (the streamer waits on it before reading the step's rows)."""
        cuda = self.cfg.device.startswith("cuda")
        core = self.core
        assert core is not None  # (the worker waits for the weights)
        if via_nccl:
            assert self.nccl is not None and step.hidden is not None
            hidden = self.nccl.recv(step.hidden)
        if self.profiler is not None:
            self.profiler.before_step()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()  # after the receive was enqueued: device time of this step's compute only
        if signal is not None:
            hooks = attach_kv_hooks(core.runtime.shard, signal)
            try:
                out = core.run(local or step, hidden, self.defer, step)
            finally:
                for h in hooks:
                    h.remove()
        else:
            out = core.run(local or step, hidden, self.defer, step)
        if cuda and (self.replica is not None or self.swap is not None) and hasattr(self.kv.memory, "record"):
            self.kv.memory.record(self.kv.memory.layout.num_layers - 1)
        if self.profiler is not None:
            self.profiler.after_step()
        if cuda:
            end.record()
            self.gpu_events.append((start, end))
            while self.gpu_events and self.gpu_events[0][1].query():
                s, e = self.gpu_events.popleft()
                self.gpu_busy += s.elapsed_time(e) / 1000.0
        if out.hidden is not None and self.nccl is not None and self.nccl.out is not None and self.out is not None:
            sock, loop = self.out, self.loop

            def announce(meta: TensorMeta) -> None:  # header first: see stages/nccl_activation.py
                asyncio.run_coroutine_threadsafe(sock.send_header(step, meta), loop)

            return StepOutput(None, None, self.nccl.send(out.hidden, announce))
        return out


def run_stage(cfg: StageProcConfig) -> int:
    setup_child(f"dejavu: stage {cfg.index}/{cfg.num_stages} layers {cfg.layers[0]}-{cfg.layers[1]}",
                cfg.log_level, cfg.supervisor_pid)
    install_uvloop()
    sys.setswitchinterval(cfg.switch_interval_us * 1e-6)  # (why: stages/config.py)
    try:
        return asyncio.run(StageProcess(cfg).run())
    except DeadlineError as e:
        log.error("[handshake] %s", e)
        return 3


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stages.proc '<StageProcConfig JSON>'", file=sys.stderr)
        return 2
    return run_stage(decode_config(StageProcConfig, args[0]))


if __name__ == "__main__":
    sys.exit(main())
