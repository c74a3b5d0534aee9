"""The controller process shell: client and internal sockets, stage registry, topology, timers.

Sockets: a ROUTER for clients (tcp, the deployment's public address), a ROUTER for stages (internal), and
the supervisor link. All decoding errors are answered to the offending peer only (ErrorReply) and never
stop the loop. The scheduling logic is `bus.controller.Controller`; this file only moves messages.

Stage registry: a stage is known by index; its Hello carries its incarnation (in the envelope), its
activation address and whether its KV pool is its predecessor's (kv_intact). Messages from an older
incarnation than the registered one are dropped; a stage this controller does not know (it was restarted) is
asked to say Hello again (Rehello). Whenever the set of live stages is complete and some stage is new, the
controller starts a new epoch: it sends every stage a Topology and, once all have acknowledged it (within
`topology_timeout`), serves again - going on from the cached positions when every stage kept its KV, else
recomputing. Epoch numbers start at incarnation << 20, so a restarted controller never reuses one. When a
stage is reported down, the survivors are told at once (EpochOver) so they abort that epoch's links then, not
when the next epoch's replace them.

Stopping: when the supervisor gives up (FatalError: a process is past its restart budget, or another fatal
error) every request in flight fails at once with its message, and every client this controller knows is told
(ServerStopping), so none waits for a reconnection that will not come; on Shutdown (after FatalError, or a
plain stop) the same happens for whatever is left, and new requests are refused with the reason. Then the
controller waits - at most `flush_timeout` - until each client it told has confirmed (ServerStoppingAck), and
only then closes the client socket (with a linger of the same bound). Closing at once lost these last messages:
a client's socket (ZMQ_IMMEDIATE, bus/client.py) drops what it has received but not yet read when the
connection closes, and the client then waited out its reconnect_timeout.

Clients: with `client_keys_dir` (the users' `dejavu-keys` directory) the client socket is a CURVE server with the
`server` key that admits the `client` and `admin` keys only (bus/security.py, a ZAP domain of its own); without,
it is plaintext, and `dejavu-serve` binds it to the loopback only unless told `--insecure` (recovery/preflight.py).
A client sees in status() what it needs (states, counts, health); pids, host names, internal addresses and the
model path only an administrator (`redacted`, `_is_admin`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from bus.child import (
    EXIT_CONFIG,
    CannotStart,
    SupervisorLink,
    decode_config,
    install_uvloop,
    release_free_memory,
    setup_child,
)
from bus.codec import Codec, Received
from bus.controller import Controller, ModelInfo
from bus.controller_clients import ClientSide
from bus.controller_config import ControllerConfig, Registry
from bus.controller_replicas import ReplicaOrchestration
from bus.controller_stages import StageSide
from bus.controller_status import StatusReporting
from bus.disagg import DisaggScheduler
from bus.messages import (
    ERR_SERVER,
    EpochOver,
    FatalError,
    Hello,
    HostsUpdate,
    ProcessDown,
    ProcessInfo,
    RecoveryInfo,
    ReplicaTarget,
    Restored,
)
from bus.replication import ReplicaBook, Where
from bus.scheduler import Scheduler
from bus.security import (
    CLIENT_DOMAIN,
    CONTROLLER,
    ZAP_DOMAIN,
    Keyring,
    KeysError,
    load_client_side,
    maybe_load,
    start_authenticator,
)
from bus.sockets import (
    DEFAULT_MAX_MESSAGE,
    bound_address,
    context,
    make_socket,
    send,
)
from bus.swap_book import SwapBook

log = logging.getLogger(__name__)
IDLE_TRIM_S = 2.0  # seconds without requests before freed memory is given back to the system


class ControllerProcess(ClientSide, StageSide, StatusReporting, ReplicaOrchestration):
    def __init__(self, cfg: ControllerConfig) -> None:
        self.cfg = cfg
        info = ModelInfo(cfg.vocab_size, tuple(cfg.eos_token_ids), cfg.max_seq_len)  # tokenizer: see run()
        sched = DisaggScheduler(cfg.num_microbatches, cfg.microbatch_size, cfg.prompt_stages, cfg.prompt_microbatches,
                                cfg.prompt_microbatch_size) if cfg.prompt_stages else \
            Scheduler(cfg.num_microbatches, cfg.microbatch_size, cfg.prefill_chunk)
        self.disagg = sched if isinstance(sched, DisaggScheduler) else None
        self.core = Controller(info, sched, max_waiting=cfg.max_waiting, client_timeout=cfg.client_timeout,
                               step_timeout=cfg.step_timeout, queue_timeout=cfg.queue_timeout,
                               unknown_grace=cfg.unknown_request_grace)
        self.codec = Codec("controller", cfg.incarnation)
        self.client_codec = Codec("controller", cfg.incarnation, max_bytes=cfg.max_client_request)
        self.ctx = context()
        self.reg = Registry()
        # Epochs grow across controller incarnations too: a stage drops steps and link offers of any epoch
        # but its current one, and a restarted controller must never reuse its predecessor's numbers.
        self.epoch = cfg.incarnation << 20
        self.pending_acks: set[int] = set()
        self.asked: set[int] = set()  # stages sent Rehello (cleared by their Hello)
        self.linking_since = 0.0
        self.ever_ready = False
        self.fatal: str | None = None
        # the tokenizer's one thread: loading it, then every prompt's tokenization, in arrival order
        self.text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self.admitting: dict[tuple[bytes, str], asyncio.Future[None]] = {}  # requests being tokenized
        self.max_prompt_bytes = 0  # set with the tokenizer
        # every client heard from, most recent last (bounded): told when the deployment stops
        self.known_clients: OrderedDict[bytes, None] = OrderedDict()
        self.stopping = ""  # why the deployment stops, once the clients were told (ServerStopping)
        self.told: set[bytes] = set()
        self.unconfirmed: set[bytes] = set()  # clients told that have not confirmed it yet (ServerStoppingAck)
        self.confirmed = asyncio.Event()
        # KV replication (issue 18): where each stage's replica is, what it holds, the stages restoring from one
        self.book = self.core.book = ReplicaBook(cfg.num_stages) if cfg.replicate else None
        self.streamers: dict[str, tuple[str, str, int]] = {}  # host -> (streamer name, data address, pid)
        self.targets: dict[int, ReplicaTarget] = {}  # this epoch's: where each stage streams its KV
        self.where: dict[int, Where] = {}  # where the replica the book counts for each stage lives
        self.fresh: set[int] = set()  # stages whose replica pool was allocated anew for this epoch
        self.host_failed: dict[int, str] = {}  # stages whose replica pool could not be allocated, and why
        self.restoring: dict[int, Restored | None] = {}  # stage -> its answer (None: still pulling)
        self.restore_lengths: dict[int, list[int]] = {}
        self.restore_deadline = 0.0
        self.syncing: set[int] = set()  # stages re-replicating their whole KV to a new replica
        self.sync_epochs: dict[int, int] = {}  # stage -> the epoch of the last ReplicaSync sent to it
        self.down_at: dict[int, float] = {}  # stage -> when its failure was reported
        self.recoveries: deque[RecoveryInfo] = deque(maxlen=64)
        self.broken_since: float | None = None  # since when some replica is broken while serving
        # microbatch swapping (stages/swap.py): what each stage's swap pool holds, and whether a stage found its own
        self.swap_book = self.core.swap_book = SwapBook(cfg.num_stages) if cfg.swap else None
        self.swap_kept: dict[int, bool] = {}

    async def run(self) -> int:
        """Serve until Shutdown; the exit code (EXIT_CONFIG: cannot start as configured)."""
        cfg = self.cfg
        self.keys = maybe_load(cfg.keys_dir, CONTROLLER)
        self.auth: ThreadAuthenticator | None = None
        self.client_keys: Keyring | None = None
        self.sup = SupervisorLink(self.ctx, cfg.supervisor_address, self.codec, "controller", 0, self.keys)
        self.sup.on_message = self._on_supervisor
        try:
            if cfg.client_keys_dir:
                try:
                    self.client_keys = load_client_side(cfg.client_keys_dir)
                except KeysError as e:
                    raise CannotStart(f"--keys: {e}") from None
            # before any bind: it admits the members on the internal socket, the users' keys on the client one
            self.auth = start_authenticator(self.ctx, self.keys, self.client_keys)
            self.clients = self._bind(cfg.client_bind, "client", cfg.max_client_frame, self.client_keys,
                                      CLIENT_DOMAIN)
            self.internal = self._bind(cfg.internal_bind, "internal", keys=self.keys)
        except CannotStart as e:
            log.info("[startup] %s", e)
            await self.sup.fatal(str(e))
            self._close()
            return EXIT_CONFIG
        # The tokenizer loads on a thread while stages load (seconds of imports): Hello goes out at once, and the
        # first GenerateRequest (and DeploymentReady) wait for it.
        self.tokenizer = asyncio.get_running_loop().run_in_executor(self.text_pool, self._load_tokenizer)
        addresses = {"client": bound_address(self.clients), "internal": bound_address(self.internal)}
        await self.sup.hello(addresses)
        log.info("[startup] controller: clients %s, stages %s", addresses["client"], addresses["internal"])
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self.sup.run(cfg.heartbeat_interval, lambda: 0.0, self._state)),
                tg.create_task(self._client_loop()),
                tg.create_task(self._internal_loop()),
                tg.create_task(self._timer()),
            ]
            await self.sup.stop.wait()
            log.info("[shutdown] controller: %s", self.sup.stop_reason)
            why = self.fatal or f"the deployment is shutting down ({self.sup.stop_reason})"
            self.core.fail_all(ERR_SERVER, why)
            await self._flush()
            await self._tell_clients(why)
            await self._await_confirmations()
            for t in tasks:
                t.cancel()
        # what a client that did not confirm was sent still gets a bounded chance to leave (a linger of 0 drops it)
        self.clients.close(linger=int(cfg.flush_timeout * 1000))
        self._close()
        return 0

    def _close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=0)

    def _bind(self, address: str, what: str, max_message: int = DEFAULT_MAX_MESSAGE,
              keys: Keyring | None = None, domain: str = ZAP_DOMAIN) -> zmq.asyncio.Socket:
        try:
            return make_socket(self.ctx, zmq.ROUTER, bind=address, max_message=max_message, keys=keys,
                               domain=domain)
        except zmq.ZMQError as e:
            hint = " (choose another --port or --host)" if what == "client" else ""
            raise CannotStart(f"the controller cannot listen on {address} ({what} socket): {e.strerror}{hint}") from e

    def _load_tokenizer(self) -> None:  # on the tokenizer's thread
        from bus.text import load_tokenizer, longest_token_bytes

        tokenizer = load_tokenizer(Path(self.cfg.model_dir))
        if tokenizer is not None:
            # a text of more bytes than this has more tokens than max_seq_len (x4: normalizers may shrink text)
            self.max_prompt_bytes = self.cfg.max_seq_len * longest_token_bytes(tokenizer) * 4
        self.core.model = replace(self.core.model, tokenizer=tokenizer)

    def _state(self) -> str:
        return "serving" if self.core.ready else ("failed" if self.fatal else "starting")

    # ------------------------------------------------------------------ supervisor

    async def _on_supervisor(self, msg: Received) -> None:
        body = msg.body
        if isinstance(body, ProcessDown):
            if body.role == "stage":
                entry = self.reg.stages.get(body.index)
                if entry is not None and entry.incarnation > body.incarnation:
                    return  # its successor already said Hello
                log.warning("[recovery] stage %d incarnation %d down (%s); %s", body.index, body.incarnation,
                            body.reason, "restarting" if body.restarting else "not restarting")
                if entry is not None:
                    entry.state = "restarting" if body.restarting else "failed"
                self.down_at.setdefault(body.index, time.monotonic())
                self.core.pipeline_down()
                self.pending_acks = set()
                self.restoring = {}
                # the survivors abort this epoch's links now, not when the next epoch's links replace them
                for i, e in self.reg.stages.items():
                    if i != body.index and e.state not in ("restarting", "failed"):
                        await send(self.internal, self.codec, EpochOver(self.epoch), route=[f"stage-{i}".encode()])
            else:
                key = (body.role, body.index)
                if key in self.reg.others:
                    old = self.reg.others[key]
                    self.reg.others[key] = ProcessInfo(old.role, old.index, old.pid, old.incarnation,
                                                       "restarting" if body.restarting else "dead", old.host,
                                                       body.reason)
                known = self.reg.others.get(key)
                if body.role == "streamer" and known is not None and known.host in self.streamers:
                    del self.streamers[known.host]  # its replica pools are gone with it
                    if self.disagg is not None:
                        # no prompt's KV can move through that host until its streamer is back (its Hello relinks):
                        # pause rather than let passes fail their tries meanwhile
                        log.warning("[topology] the streamer of %s is down: serving pauses until it is back",
                                    known.host)
                        self.core.pipeline_down()
                        self.pending_acks = set()
        elif isinstance(body, FatalError):
            self.fatal = body.message
            log.info("[fatal] failing %d request(s): %s", len(self.core.requests), body.message)
            self.core.pipeline_down()
            self.core.fail_all(ERR_SERVER, body.message)
            await self._flush()
            await self._tell_clients(body.message)
        elif isinstance(body, HostsUpdate):
            self.reg.hosts, self.reg.unplaced = list(body.hosts), list(body.unplaced)
        elif isinstance(body, Hello):
            # the supervisor forwards other processes' identities (itself, the agents, the streamers) for status()
            incarnation = body.incarnation if body.incarnation >= 0 else msg.env.incarnation
            self.reg.others[(body.role, body.index)] = ProcessInfo(
                body.role, body.index, body.pid, incarnation, "serving", body.host,
                " ".join(body.addresses.values()))
            if body.role == "streamer" and body.addresses.get("data"):
                old_streamer = self.streamers.get(body.host)
                self.streamers[body.host] = (f"streamer-{body.index}", body.addresses["data"], body.pid)
                if self.disagg is not None and old_streamer != self.streamers[body.host] and not self.pending_acks:
                    # the prompt stages must learn where this streamer is now (or it is the one a relink waited for)
                    self.core.pipeline_down()
                    await self._relink()
            self.reg.started[(body.role, body.index)] = body.started

    async def _timer(self) -> None:
        busy_at = time.monotonic()  # the last tick with a request in flight
        trimmed = True  # memory given back since then
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            self.core.sweep(now)
            if self.core.requests or self.admitting:
                busy_at, trimmed = now, False
            elif not trimmed and now - busy_at > IDLE_TRIM_S:
                # Python's traced memory is flat over rounds of 1,000 clients (tracemalloc), but the C allocator
                # keeps what their sockets and messages freed: RSS 76 -> 107 MiB after each round, 77 MiB after
                # this call (bench/soak_bench.py). Idle, so its milliseconds cost no one anything.
                release_free_memory()
                trimmed = True
            await self._heal_replicas(now)
            if self.restoring and now > self.restore_deadline:
                log.error("[recovery] stage(s) %s did not restore their KV within restore_timeout (%.0fs); a new "
                          "epoch", sorted(x for x, r in self.restoring.items() if r is None), self.cfg.restore_timeout)
                for x in self.restoring:
                    self.where.pop(x, None)  # that replica is not to be trusted to answer: recompute
                self.restoring = {}
                await self._relink()
            if self.pending_acks and now - self.linking_since > self.cfg.topology_timeout:
                log.error("[topology] stages %s did not acknowledge epoch %d within topology_timeout (%.0fs); "
                          "retrying", sorted(self.pending_acks), self.epoch, self.cfg.topology_timeout)
                await self._relink()
            await self._flush()


def run_controller(cfg: ControllerConfig) -> int:
    setup_child(f"dejavu: controller ({cfg.num_stages} stages)", cfg.log_level, cfg.supervisor_pid)
    install_uvloop()
    return asyncio.run(ControllerProcess(cfg).run())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bus.controller_proc '<ControllerConfig JSON>'", file=sys.stderr)
        return 2
    return run_controller(decode_config(ControllerConfig, args[0]))


if __name__ == "__main__":
    sys.exit(main())
