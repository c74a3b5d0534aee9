"""What every supervised child process does the same way: process title, dying with its supervisor,
logging, its config on the command line, and the supervisor link (Hello, heartbeats, Shutdown).

A child must never outlive its supervisor: PR_SET_PDEATHSIG makes the kernel kill it when the supervisor
dies (even by SIGKILL), and a parent-pid check closes the race where the supervisor died first.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import zmq

from bus.codec import Codec, Received
from bus.errors import ProtocolError
from bus.logs import Throttled
from bus.messages import FatalError, Heartbeat, Hello, Shutdown
from bus.security import SUPERVISOR, Keyring
from bus.sockets import decode_frames, make_socket, recv_frames, send

log = logging.getLogger(__name__)
noisy = Throttled(log)  # warnings about what peers send: rate-limited per (kind, peer)
STARTED = time.time()  # ~when this process started: a child imports this module first thing
PR_SET_PDEATHSIG = 1
EXIT_CONFIG = 2  # a child that cannot start as configured exits so (after SupervisorLink.fatal): no restart


class CannotStart(Exception):
    """Raised by a child's start-up for a fault of its configuration, not of the process: the message is what
    the user reads (one line, saying what to change)."""


def die_with_parent(expected_parent: int | None) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except OSError:
            pass
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the supervisor is already gone


def setup_child(title: str, log_level: str = "INFO", expected_parent: int | None = None) -> None:
    die_with_parent(expected_parent)
    if getattr(logging, log_level.upper(), logging.INFO) >= logging.WARNING:
        # transformers (the controller's tokenizer) warns about things that are not ours to fix; read when it is
        # first imported, which is after this
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import faulthandler

    faulthandler.enable()  # a crash in native code (CUDA, NCCL) still leaves a Python stack in the log
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is a hung process?
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:
        pass
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format=f"%(asctime)s {title.split(' ', 1)[-1]} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def release_free_memory() -> None:
    """Give the memory the C allocator holds free back to the system (glibc's malloc_trim; elsewhere nothing).
    Freed memory otherwise stays in a process's RSS as if it were still used."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


def decode_config(cls: type, text: str):  # type: ignore[no-untyped-def]
    """A child's frozen config from the JSON its supervisor passed on the command line (validated)."""
    return msgspec.json.decode(text.encode(), type=cls)


def encode_config(config: object) -> str:
    return msgspec.json.encode(config).decode()


class SupervisorLink:
    """DEALER to the supervisor: announces the child, sends heartbeats, and turns Shutdown into `stop`."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, codec: Codec, role: str, index: int,
                 keys: Keyring | None = None, server: str = SUPERVISOR, host: str = "") -> None:
        """server: the supervising process's name (its public key): "supervisor" for the controller, the host
        agent's name ("agent-<slot>") for a stage or a streamer. host: the host id its Hello names (default: the
        machine's host name)."""
        self.codec, self.role, self.index = codec, role, index
        self.host = host or socket.gethostname()
        identity = f"{role}-{index}-{codec.incarnation}".encode()
        self.sock = make_socket(ctx, zmq.DEALER, connect=address, identity=identity, keys=keys, server=server)
        self.stop = asyncio.Event()
        self.stop_reason = ""
        # other messages from the supervisor (ProcessDown, FatalError, forwarded Hellos) go here
        self.on_message: Callable[[Received], Awaitable[None] | None] | None = None

    async def hello(self, addresses: dict[str, str] | None = None, layers: list[int] | None = None) -> None:
        await send(self.sock, self.codec, Hello(self.role, self.index, os.getpid(), self.host,
                                                addresses or {}, layers or [], started=STARTED))

    async def fatal(self, message: str, linger_s: float = 2.0) -> None:
        """Tell the supervisor this process cannot start as configured (then exit with EXIT_CONFIG). The socket
        is closed with a linger, so the message still leaves when the context is destroyed right after."""
        await send(self.sock, self.codec, FatalError(message))
        self.sock.close(linger=int(linger_s * 1000))

    async def run(self, interval: float, busy_s: Callable[[], float], state: Callable[[], str]) -> None:
        """Heartbeat every `interval` s and watch for Shutdown, until `stop` is set."""
        seq = 0
        recv = asyncio.ensure_future(recv_frames(self.sock))
        try:
            while not self.stop.is_set():
                seq += 1
                await send(self.sock, self.codec, Heartbeat(seq, state(), busy_s()))
                deadline = time.monotonic() + interval
                while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
                    done, _ = await asyncio.wait({recv}, timeout=left)
                    if not done:
                        break
                    frames = recv.result()
                    recv = asyncio.ensure_future(recv_frames(self.sock))
                    try:
                        _, msg = decode_frames(self.codec, frames)
                    except ProtocolError as e:
                        noisy.warning("bad-frame", "supervisor", "[supervisor-link] dropped a bad frame: %s", e)
                        continue
                    if isinstance(msg.body, Shutdown):
                        self.stop_reason = msg.body.reason or "supervisor asked"
                        self.stop.set()
                    elif self.on_message is not None:
                        result = self.on_message(msg)
                        if inspect.isawaitable(result):
                            await result
        finally:
            recv.cancel()

    def close(self) -> None:
        self.sock.close(0)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
