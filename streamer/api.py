"""DéjàVuLib - the KV-cache streaming library: its public API and contract.

Every KV movement of the system goes through here: prompt -> token streaming (disaggregation), swap-out/in
(microbatch swapping), per-step replication and restore (fault tolerance). Stages never move KV themselves:
they hand the host's *streamer process* a descriptor and get a completion or a typed failure back. The
library's three layers (paper section 4): `stream out / in` decides which destination gets which layers
(`routes_by_layer`, `Route`); gather / scatter pack a strided region into contiguous staging buffers (one
kernel each; streamer/movers.py, streamer/cuda_mover.py) when its 2-D blocks would be short (a few narrow
layers), while long ones - a prompt layer, a microbatch swap, and a decode step's rows of a many-layered model,
one block per slot over every (layer, K|V) - go pool to pool as 2-D DMA blocks with no staging and no kernel
(streamer/regions.pair_blocks): on a stage's GPU no kernel of the streamer's own CUDA context competes with the
stage's step (replication's per-step cost: 0.976x -> 0.998x on one H100); flush / fetch move contiguous bytes over a transport (CUDA copy engines,
CUDA IPC + peer copy, NCCL, ZeroMQ frames, memory-mapped files).

Vocabulary: a *pool* is a KV allocation laid out as streamer/layout.PoolLayout; a *region* is
(slots, global layers [a, b), one token range per slot) = streamer/layout.Region; a transfer copies the packed
rows of a source region onto a destination region of the same shape (same layer count, same per-slot token
counts, same row format) in the same or another pool, here or on another host.

Calls (all on `StreamerClient`, async, on the caller's one event loop; "blocks" = the coroutine waits):

    client = StreamerClient(address, name)
        who: any process of the host (stage, controller, supervisor, benchmark). blocks: no.
    await client.status()
        handshake: returns once the streamer answers (request_timeout_s, else StreamerDownError).

    mem = SharedPoolMemory.create(layout)          # CPU stage: named shared memory (streamer/memory.py)
    mem = GpuPoolMemory(layout, device)            # GPU stage: own cudaMalloc + one IPC event per layer
    runtime = ShardRuntime(cfg, pool_memory=mem.tensor)
    await client.register_pool(name, mem, replace=False)
        who: the stage, once its pool exists. blocks: until the streamer mapped it (CUDA IPC: opened on the
        owning device). memory: the stage owns the pool and computes in it; from registration on the streamer
        holds a mapping, and owns the shared-memory *name* (it unlinks it). If the stage dies its CPU pool stays
        mapped and readable (orphaned) until unregistered or replaced; a GPU pool dies with the stage's CUDA
        context and is dropped. The streamer watches the registering pid and fails that stage's transfers
        the moment it exits. A restarted stage registers with replace=True: a new memory replaces the old
        pool; the *same* shared-memory file (`pool_info(name).path`, mapped again) takes the pool over with
        its bytes - how a CPU stage comes back with its KV (stages/kv_home.py; `pool_info(name)
        .owner_incarnation` says which incarnation last owned it). Refused while the old owner lives (its owner
        itself - same client name, same pid - may register it again). Streamer restarts: a streamer given a
        manifest (StreamerConfig.manifest; the supervisor's does) records every shared-memory stage pool it
        maps and, started again with that file, adopts those whose file still exists before it serves - an
        owner still running stays the owner and is watched, a dead one leaves an orphan to take over - and
        stages register their pools again (StreamerClient.on_reconnect). Without a manifest only the latter.
    await client.unregister_pool(name)
        blocks: until transfers touching the pool have failed (CancelledError) and the mapping is gone.

    await client.alloc_pool(name, kind, layout, exist_ok=False)   # POOL_SWAP / REPLICA / RECEIVE / DISK
        who: a stage (swap space, receive slots) or the controller/supervisor (replicas). blocks: until
        allocated. memory: the streamer owns it (pinned host memory on GPU hosts, carved from the kind's
        capacity; refused with CapacityError when it does not fit - never over-committed). It outlives its
        requester; `exist_ok` re-attaches after a restart (disk pools also survive the streamer).
        `pool_info(name).filled[slot]` = tokens [0, n) of the slot written by *committed* transfers.
    await client.free_pool(name)      blocks: until released (disk pools: files deleted).

    h = await client.stream(src, region, routes | dst=..., dst_region=..., layered=False, checksum=None,
                            buffered=None, deadline_s=0, tag="", notify=(), progress=False)
        who: normally the stage owning `src` (any client may move any pool). blocks: only to send the request.
        checksum None: the streamer's policy (StreamerConfig.checksums, default "remote": verified when the bytes
        go to another streamer or touch a disk pool, not for local DMA); True / False: this transfer's choice.
        src / dst: a pool name here, or PoolRef(pool, streamer=peer) - a remote destination is a push over the
        peer's data socket (TCP frames; NCCL GPU -> GPU across hosts); a remote *source* is a pull (the peer
        pushes back). Several routes split the region by layer among destinations (prompt -> token stages).
        memory: from submission until `h.wait()` returns or raises, the source region is lent to the streamer
        (the stage must not overwrite it) and the destination region belongs to the transfer (no one may read
        it as valid). A failed transfer's destination content is undefined and never counted as filled.
        answers: TransferProgress per layer (progress=True: `h.next_progress`), then exactly one of
        TransferDone / TransferFailed (`await h.wait()` returns or raises the typed error). timeline=True:
        TransferDone.timeline says, per layer, when LayerReady came, when the layer was cleared to move, when
        its copies were issued and when it landed (the streamer host's time.monotonic()). Clients named in
        `notify` that are connected to the destination's streamer get `Delivered` when it commits.
    await client.layer_ready(xfers, layer)  /  client.layer_ready_threadsafe(...)  /  client.layer_ready_direct(...)
    /  LayerSignal(client, mem, xfers, direct=False)
        who: the stage computing a layered transfer's source, right after launching layer `layer` (global id).
        _threadsafe: from the compute thread, sent by the client's loop; _direct: from the compute thread, sent
        at once on a socket that thread owns (no loop hop; the streamer files it under the client's identity).
        GPU: record the pool's interprocess event for that layer first (GpuPoolMemory.record / LayerSignal);
        the streamer waits for it on the owning device - on a waiter thread by default (layer_wait="host"), or
        with its copy stream (layer_wait="device") - so layer l's copy overlaps computing layer l+1.
        CPU: the message itself says the layer is written. A transfer whose next layer does not become ready
        within layer_timeout_s fails with PeerDeadError. blocks: no (a message). A prompt pass streams itself
        with KV hooks, called as soon as each layer has written its KV (before its attention and MLP):
        `hooks = attach_kv_hooks(runtime.shard, LayerSignal(client, mem, [h.xfer]))` (remove them after the
        pass; attach_layer_hooks signals at the end of each block instead). A GPU stage records the event of
        every layer of every step whose KV may be streamed (non-layered transfers wait on the event of the region's last layer).
    await h.cancel(reason)  /  client.cancel(xfer)
        blocks: until the streamer acknowledged; the transfer then fails with CancelledError (exactly once).

    await client.set_peer(name, data_address)  /  client.owner_down(stage, reason)  /  client.pool_info(name)
        who: the supervisor or controller. PeerInfo tells a streamer where a peer streamer's data socket is
        (also `--peer NAME=ADDRESS`); OwnerDown fails a dead stage's transfers at once (the streamer also
        watches registered pids itself) and keeps its CPU pools; pool_info reports fill marks for restore.

Memory rules a stage keeps: a GpuPoolMemory / SharedPoolMemory object stays referenced while its pool is
registered (a CUDA allocation is freed with it); a destination region in a GPU pool must not be read by GPU work
still in flight (the streamer writes it without waiting on the stage's streams); the source region of a
running transfer is not overwritten. The streamer's own death is seen by every client at once (its socket
disconnects): pending calls and transfers fail with StreamerDownError, later calls too until it is back.

Errors (streamer/errors.py, codes in streamer/wire.py): BadRequestError, CapacityError, PeerDeadError (a peer
streamer or the feeding stage went silent past its deadline; NCCL links are aborted, not waited on),
TransferTimeoutError, IntegrityError (checksum mismatch: nothing corrupt is committed), DuplicateError
(replayed request/chunk: refused, so nothing is delivered twice), StaleError, CancelledError, OwnerDownError,
TransportUnavailableError, StreamerDownError (the streamer process itself is gone: reported at once).

The process: `run_streamer(StreamerConfig)` (streamer/proc.py), `python -m streamer ...`.
"""

from __future__ import annotations

from streamer.client import LayerSignal, StreamerClient, TransferHandle, attach_kv_hooks, attach_layer_hooks
from streamer.config import StreamerConfig
from streamer.cuda import GpuPoolMemory, cuda_ready
from streamer.errors import (
    BadRequestError,
    CancelledError,
    CapacityError,
    DuplicateError,
    IntegrityError,
    OwnerDownError,
    PeerDeadError,
    StaleError,
    StreamerDownError,
    StreamerError,
    TransferTimeoutError,
    TransportUnavailableError,
)
from streamer.memory import SharedPoolMemory
from streamer.proc import run_streamer
from streamer.regions import region_to_spec, routes_by_layer
from streamer.wire import POOL_DISK, POOL_RECEIVE, POOL_REPLICA, POOL_STAGE, POOL_SWAP, PoolRef, Route

__all__ = [
    "BadRequestError", "CancelledError", "CapacityError", "DuplicateError", "GpuPoolMemory", "IntegrityError",
    "LayerSignal", "OwnerDownError", "POOL_DISK", "POOL_RECEIVE", "POOL_REPLICA", "POOL_STAGE", "POOL_SWAP",
    "PeerDeadError", "PoolRef", "Route", "SharedPoolMemory", "StaleError", "StreamerClient", "StreamerConfig",
    "StreamerDownError", "StreamerError", "TransferHandle", "TransferTimeoutError", "TransportUnavailableError",
    "attach_kv_hooks", "attach_layer_hooks", "cuda_ready", "region_to_spec", "routes_by_layer", "run_streamer",
]
