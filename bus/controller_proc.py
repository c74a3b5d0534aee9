"""The controller process shell: builds the controller's state, binds its sockets, runs its loops and timer in one
TaskGroup, and stops in bounded time. Entry point: `python -m bus.controller_proc '<ControllerConfig JSON>'`
(recovery/proc.py starts it by that module name), i.e. `run_controller(cfg)`.

Sockets: a ROUTER for clients (tcp, the deployment's public address), a ROUTER for stages (internal), and
the supervisor link. All decoding errors are answered to the offending peer only (ErrorReply) and never
stop the loop. The scheduling logic is `bus.controller.Controller`; the shell and its parts only move messages.
The parts, one concept each, are mixins of `ControllerProcess` over the state built here (one level deep, none
of them inherits anything):

    bus/controller_clients.py     the client socket: admission, stopping, delivering the core's outbox
    bus/controller_stages.py      the internal socket: stage registry, epochs and topology, serving again
    bus/controller_supervisor.py  what the supervisor reports: processes down, fatal errors, hosts
    bus/controller_status.py      what status() reports, and what a client that is no administrator sees
    bus/controller_replicas.py    KV replication: placing, restoring, re-syncing and healing replicas
    bus/controller_config.py      ControllerConfig and the registry's records

Clients: with `client_keys_dir` (the users' `dejavu-keys` directory) the client socket is a CURVE server with the
`server` key that admits the `client` and `admin` keys only (bus/security.py, a ZAP domain of its own); without,
it is plaintext, and `dejavu-serve` binds it to the loopback only unless told `--insecure` (recovery/preflight.py).
A client sees in status() what it needs (states, counts, health); pids, host names, internal addresses and the
model path only an administrator (`redacted`, `_is_admin` in bus/controller_status.py).

Never imports torch at start (tests/test_layering.py): the tokenizer loads later, on its own thread.
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
from bus.codec import Codec
from bus.controller import Controller, ModelInfo
from bus.controller_clients import ClientSide
from bus.controller_config import ControllerConfig, Registry
from bus.controller_replicas import ReplicaOrchestration
from bus.controller_stages import StageSide
from bus.controller_status import StatusReporting
from bus.controller_supervisor import SupervisorSide
from bus.disagg import DisaggScheduler
from bus.messages import (
    ERR_SERVER,
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
)
from bus.swap_book import SwapBook

log = logging.getLogger(__name__)
IDLE_TRIM_S = 2.0  # seconds without requests before freed memory is given back to the system


class ControllerProcess(ClientSide, StageSide, SupervisorSide, StatusReporting, ReplicaOrchestration):
    def __init__(self, cfg: ControllerConfig) -> None:
        self.cfg = cfg
        info = ModelInfo(cfg.vocab_size, tuple(cfg.eos_token_ids), cfg.max_seq_len)  # tokenizer: see run()
        sched = DisaggScheduler(cfg.num_microbatches, cfg.microbatch_size, cfg.prompt_stages, cfg.prompt_microbatches,
                                cfg.prompt_microbatch_size) if cfg.prompt_stages else \
            Scheduler(cfg.num_microbatches, cfg.microbatch_size, cfg.prefill_chunk)
        self.disagg = sched if isinstance(sched, DisaggScheduler) else None
        if cfg.lookahead:  # (one stage, or one token stage: recovery/specs.lookahead_on)
            sched.enable_lookahead(cfg.max_seq_len)
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

    async def _timer(self) -> None:
        """Every 0.5 s, for every part: request deadlines, giving idle memory back, healing replicas, and the
        restore and topology deadlines (each retried with a new epoch), then whatever the core has to send."""
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
