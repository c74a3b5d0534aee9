"""Where a CPU stage's KV pool lives: in named shared memory, registered with the host's streamer - so it
outlives the stage process, and a restarted stage maps it again and comes back with its KV.

Runs in the stage process, on its event loop, once at start-up (before the model loads into the pool) and once
at shutdown. The streamer owns the file's name after registration (streamer/memory.py); on a clean stop the
stage unregisters it (the streamer unlinks it), or unlinks it itself when the streamer is already gone.

A stage comes back *intact* when the streamer still maps a pool under its name with the same layout and no
live owner, registered (or taken over) by the incarnation just before this one: its predecessor was killed,
and every position the controller counts as cached is still there (the controller then resumes each request
where it was instead of recomputing it). An older owner means some incarnation in between computed elsewhere
(private memory: it found no streamer), so that pool is stale. The streamer may have been restarted
meanwhile: it adopts the pools its predecessor recorded (streamer/manifest.py), so a stage that died while no
streamer ran, or before it registered again, still finds its pool. Anything else - no streamer, a different
layout, a GPU stage (its pool dies with its CUDA context; a streamer-owned allocation would keep it), /dev/shm
unusable - gives a fresh pool, and recomputation, never an error.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import zmq

from streamer.layout import PoolLayout

if TYPE_CHECKING:
    from bus.security import Keyring
    from streamer.client import StreamerClient
    from streamer.cuda import GpuPoolMemory
    from streamer.memory import SharedPoolMemory

log = logging.getLogger(__name__)


@dataclass
class KVHome:
    name: str
    memory: SharedPoolMemory | GpuPoolMemory | None  # None = private memory
    client: StreamerClient | None
    intact: bool  # the memory holds the KV of this stage's previous incarnation
    streamer_pid: int = 0  # the streamer process that has the pool registered

    def __post_init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        if self.client is not None:
            self.client.on_reconnect.append(self._on_reconnect)

    @property
    def tensor(self) -> torch.Tensor | None:
        return None if self.memory is None else self.memory.tensor

    def _on_reconnect(self) -> None:
        task = asyncio.ensure_future(self._register_again())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _register_again(self) -> None:
        """The streamer was restarted: register the same memory again, so that the new streamer owns the file's
        name and watches this process. It may have adopted the pool from its predecessor's manifest already
        (then this confirms it); if not, a restart of this stage would otherwise lose its KV."""
        from streamer.errors import StreamerError

        assert self.client is not None and self.memory is not None
        try:
            st = await self.client.status()
            if st.pid == self.streamer_pid:
                return  # the connection dropped, the streamer did not: it still knows us
            try:
                info = await self.client.pool_info(self.name)
            except StreamerError:
                info = None
            await self.client.register_pool(self.name, self.memory, replace=info is not None)
            self.streamer_pid = st.pid
            log.info("[kv] pool %s registered again with the restarted streamer%s", self.name,
                     " (it had adopted the pool)" if info is not None and info.path == str(getattr(self.memory, "path", "")) else "")
        except Exception as e:  # noqa: BLE001 - a restart of this stage then recomputes, nothing worse
            log.warning("[kv] pool %s not registered again (%s): a restart of this stage will recompute",
                        self.name, e)

    async def close(self, timeout: float) -> None:
        """Clean stop: give the pool back (the streamer unlinks its file); unlink it ourselves otherwise."""
        if self.memory is None or self.client is None:
            return
        try:
            await asyncio.wait_for(self.client.unregister_pool(self.name), timeout)
        except Exception as e:  # noqa: BLE001 - the streamer may have stopped first
            if hasattr(self.memory, "unlink"):
                log.info("[kv] pool %s not unregistered (%s): unlinking it here", self.name, e)
                self.memory.unlink()
        finally:
            for task in self._tasks:
                task.cancel()
            await self.client.close()


async def open_home(name: str, layout: PoolLayout, streamer_address: str, incarnation: int, prefix: str,
                    timeout: float, wait: float | None = None, client_name: str = "", keys: Keyring | None = None,
                    streamer: str = "", takeover: bool = True) -> KVHome:
    """Map this stage's pool: its predecessor's if the streamer kept it, else a new one; register it. `wait`:
    how long to wait for the streamer's first answer (default `timeout`, the deadline of every later one).
    client_name: who the streamer knows as the pool's owner (the stage's process name; default the pool's name);
    keys / streamer: this process's deployment keys and the streamer's process name (plaintext without keys).
    takeover=False: always a fresh pool (the stage comes back without its KV, as a GPU stage does)."""
    from streamer.client import StreamerClient
    from streamer.config import SHM_PREFIX
    from streamer.errors import StreamerError
    from streamer.memory import SharedPoolMemory
    from streamer.regions import layout_to_spec

    try:
        client = StreamerClient(streamer_address, client_name or name, incarnation, request_timeout_s=timeout,
                                keys=keys, server=streamer)
    except zmq.ZMQError as e:  # an address this host cannot use
        log.warning("[kv] pool %s stays in private memory (streamer address %s: %s)", name, streamer_address, e)
        return KVHome(name, None, None, False)
    memory, intact, kept = None, False, False
    try:
        st = await client.status(timeout=timeout if wait is None else wait)
        try:
            info = await client.pool_info(name)
            kept = True
        except StreamerError:
            info = None  # no such pool: a first start
        if info is not None and info.path and info.layout == layout_to_spec(layout) and takeover:
            if info.owner_incarnation != incarnation - 1:
                log.warning("[kv] the kept pool %s was last owned by incarnation %d, not %d (the one before this): "
                            "its KV is stale, starting a fresh one", name, info.owner_incarnation, incarnation - 1)
            else:
                try:
                    memory, intact = SharedPoolMemory.attach(layout, info.path), True
                except (OSError, StreamerError) as e:
                    log.warning("[kv] could not map the kept pool %s (%s): starting a fresh one", info.path, e)
        if memory is None:
            memory = SharedPoolMemory.create(layout, prefix=f"{SHM_PREFIX}-{prefix}", reserve=True)
        await client.register_pool(name, memory, replace=kept)
    except (OSError, StreamerError, TimeoutError) as e:
        log.warning("[kv] pool %s stays in private memory (no streamer to keep it: %s); a restart recomputes",
                    name, e)
        if memory is not None and not intact:  # a file we created and nobody took over; the kept one is the
            memory.unlink()  # streamer's to release
        await client.close()
        return KVHome(name, None, None, False)
    log.info("[kv] pool %s %s (%s)", name, "taken over with its KV" if intact else "created", memory.path)
    return KVHome(name, memory, client, intact, st.pid)


async def open_gpu_home(name: str, layout: PoolLayout, device: int, streamer_address: str, incarnation: int,
                        timeout: float, wait: float | None = None, client_name: str = "",
                        keys: Keyring | None = None, streamer: str = "") -> KVHome:
    """A GPU stage's pool in its own device allocation, registered with the host's streamer (CUDA IPC), so the
    streamer can replicate and restore it. It dies with the process: a restart starts empty (its KV then comes
    from the replica). No streamer (or one without CUDA): private memory, as without replication."""
    from streamer.client import StreamerClient
    from streamer.cuda import GpuPoolMemory
    from streamer.errors import StreamerError

    try:
        client = StreamerClient(streamer_address, client_name or name, incarnation, request_timeout_s=timeout,
                                keys=keys, server=streamer)
    except zmq.ZMQError as e:
        log.warning("[kv] pool %s stays private (streamer address %s: %s)", name, streamer_address, e)
        return KVHome(name, None, None, False)
    try:
        st = await client.status(timeout=timeout if wait is None else wait)
        try:
            await client.pool_info(name)
            kept = True  # a dead predecessor's entry (the streamer drops those; a race may leave it)
        except StreamerError:
            kept = False
        memory = GpuPoolMemory(layout, device)
        await client.register_pool(name, memory, replace=kept)
    except (OSError, StreamerError, TimeoutError, RuntimeError) as e:
        log.warning("[kv] GPU pool %s not registered with the streamer (%s): no replication for this stage", name, e)
        await client.close()
        return KVHome(name, None, None, False)
    log.info("[kv] GPU pool %s registered with the streamer (%d bytes, CUDA IPC)", name, layout.nbytes)
    return KVHome(name, memory, client, False, st.pid)
