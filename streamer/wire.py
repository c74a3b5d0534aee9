"""Wire types of the streamer: what stages, the supervisor and peer streamers send it, and what it answers.

A leaf module (the lead folds it into bus/messages.py): frozen msgspec structs encoded as msgpack arrays with
stable int tags 200-299, enums as plain ints, nothing but wire types. Same rules as bus/messages.py: tags are
never reused or renumbered, new fields go at the end with a default, raw tensor bytes travel as extra frames
after the envelope (one frame after a `RemoteChunk` sent `VIA_FRAME`).

Two sockets carry them (see streamer/proc.py):
- control (ROUTER, one per streamer): stages, the supervisor, the controller -> streamer; tags 200-229;
- data (ROUTER, one per streamer): peer streamer -> streamer, each peer connected with a DEALER whose
  identity is its streamer name; tags 240-259.
"""

from __future__ import annotations

import msgspec

from bus.messages import Msg

# ---------------------------------------------------------------- enums (plain ints) ------------------

# How a registered stage pool's memory reaches the streamer.
MEM_SHM = 1  # a named shared-memory file (CPU pools): `path`
MEM_CUDA_IPC = 2  # a CUDA IPC memory handle of a whole allocation, plus per-layer interprocess events

# What a pool is. Host pool kinds each draw on their own configured capacity.
POOL_STAGE = 0  # a stage's KV pool, registered by the stage (owned by the stage)
POOL_SWAP = 1  # pinned host memory for microbatch swapping
POOL_REPLICA = 2  # pinned host memory holding other stages' replicated KV
POOL_RECEIVE = 3  # pinned host memory for prompt KV streamed in before a token slot is free
POOL_DISK = 4  # a memory-mapped file under the streamer's disk directory

# How a remote chunk's bytes travel.
VIA_FRAME = 1  # a ZeroMQ frame after the RemoteChunk envelope (TCP; CPU deployments and CI)
VIA_NCCL = 2  # an NCCL send/recv on the link named in RemoteOpen (GPU <-> GPU across hosts)

# Failure codes (TransferFailed.code, bus ErrorReply.code). Distinct from bus ERR_* (1-19).
XFER_INTERNAL = 20
XFER_BAD_REQUEST = 21
XFER_CAPACITY = 22
XFER_PEER_DEAD = 23
XFER_TIMEOUT = 24
XFER_CORRUPT = 25
XFER_DUPLICATE = 26
XFER_STALE = 27
XFER_CANCELLED = 28
XFER_OWNER_DOWN = 29
XFER_UNAVAILABLE = 30
XFER_STREAMER_DOWN = 31


# ---------------------------------------------------------------- nested values (untagged) ------------


class LayoutSpec(msgspec.Struct, frozen=True, array_like=True):
    """A KV pool's shape (stages/kv_cache.PoolLayout): [num_layers, 2, num_slots, max_seq_len, kv_heads, head_dim]."""

    first_layer: int
    num_layers: int
    num_slots: int
    max_seq_len: int
    kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "float16" | "bfloat16" | ...


class RegionSpec(msgspec.Struct, frozen=True, array_like=True):
    """Slots x global layers [a, b) x one token range [t0, t1) per slot (stages/kv_cache.Region)."""

    slots: list[int]
    layers: list[int]
    tokens: list[list[int]]


class PoolRef(msgspec.Struct, frozen=True, array_like=True):
    """A pool by name; `streamer` names the streamer that holds it ("" = the one this message goes to)."""

    pool: str
    streamer: str = ""


class Route(msgspec.Struct, frozen=True, array_like=True):
    """Source layers [a, b) of a transfer go to `region` of `dst` (same layer count, same per-slot token
    counts in slot order). Several routes split one source region by layer (prompt -> token stages)."""

    src_layers: list[int]
    dst: PoolRef
    region: RegionSpec


class CapacityInfo(msgspec.Struct, frozen=True, array_like=True):
    kind: int  # POOL_*
    capacity: int
    used: int


# ---------------------------------------------------------------- 200-229: control --------------------


class RegisterPool(Msg, tag=200):
    """Stage -> streamer: map my KV pool. Answered by PoolRegistered or an ErrorReply."""

    name: str
    layout: LayoutSpec
    memory: int  # MEM_*
    path: str = ""  # MEM_SHM: the shared-memory file
    device: int = -1  # MEM_CUDA_IPC: the CUDA device that owns the allocation
    ipc_handle: bytes = b""
    ipc_offset: int = 0  # byte offset of the pool inside the exported allocation
    event_handles: list[bytes] = []  # one interprocess event per local layer ("layer j computed")
    replace: bool = False  # a restarted stage takes over its predecessor's name
    pid: int = 0  # the registering process: the streamer watches it and fails its transfers when it exits


class PoolRegistered(Msg, tag=201):
    name: str
    nbytes: int


class UnregisterPool(Msg, tag=202):
    name: str


class PoolUnregistered(Msg, tag=203):
    name: str


class AllocPool(Msg, tag=204):
    """Anyone -> streamer: create a streamer-owned pool of `kind` (POOL_SWAP/REPLICA/RECEIVE/DISK)."""

    name: str
    kind: int
    layout: LayoutSpec
    exist_ok: bool = False  # an existing pool of the same kind and layout is returned (after a restart)


class PoolAllocated(Msg, tag=205):
    name: str
    kind: int
    nbytes: int
    free_bytes: int  # what is left of this kind's capacity
    existed: bool


class FreePool(Msg, tag=206):
    name: str


class PoolFreed(Msg, tag=207):
    name: str
    free_bytes: int


class StreamRequest(Msg, tag=208):
    """Stage (or controller) -> streamer: move `region` of `src` along `routes`. `xfer` is chosen by the
    requester, unique per requester incarnation; answers are TransferProgress*, then TransferDone or
    TransferFailed, each exactly once."""

    xfer: int
    src: PoolRef
    region: RegionSpec
    routes: list[Route]
    layered: bool = False  # move layer l only after LayerReady(l)
    checksum: bool | None = None  # None: the streamer's default
    buffered: bool | None = None  # None: the streamer's default; False = one copy per contiguous piece
    deadline_s: float = 0.0  # 0: the streamer's transfer_timeout_s
    tag: str = ""  # echoed in every answer (e.g. "mb3/step17")
    notify: list[str] = []  # clients of the destination's streamer told `Delivered` on commit
    progress: bool = False  # send TransferProgress after each layer


class LayerReady(Msg, tag=209):
    """Stage -> streamer: local layer `layer` (global id) is computed for these layered transfers. On GPU the
    stage records the pool's event for that layer *before* sending this."""

    xfers: list[int]
    layer: int


class CancelTransfer(Msg, tag=210):
    xfer: int
    reason: str = ""


class TransferProgress(Msg, tag=211):
    xfer: int
    layer: int  # the layer (global id) that just arrived
    layers_done: int
    nbytes: int
    tag: str = ""


class TransferDone(Msg, tag=212):
    xfer: int
    tag: str
    nbytes: int
    seconds: float
    checksummed: bool


class TransferFailed(Msg, tag=213):
    xfer: int
    tag: str
    code: int  # XFER_*
    message: str


class Delivered(Msg, tag=214):
    """Streamer -> a client named in StreamRequest.notify: a transfer into `pool` committed."""

    sender: str  # requester (client name, or "streamer/client" for a remote one)
    xfer: int
    tag: str
    pool: str
    region: RegionSpec


class PoolQuery(Msg, tag=215):
    name: str


class PoolInfo(Msg, tag=216):
    name: str
    kind: int
    layout: LayoutSpec
    nbytes: int
    owner: str
    owner_alive: bool
    filled: list[int]  # per slot: tokens [0, filled) written by committed transfers (host pools)


class StreamerStatusQuery(Msg, tag=217):
    pass


class StreamerStatus(Msg, tag=218):
    name: str
    incarnation: int
    pid: int
    capacity: list[CapacityInfo]
    pools: list[str]
    active_transfers: int
    peers: list[str]
    cuda: bool
    nccl: bool


class PeerInfo(Msg, tag=219):
    """Supervisor/controller -> streamer: where peer streamer `name` accepts data."""

    name: str
    data_address: str


class OwnerDown(Msg, tag=220):
    """Supervisor -> streamer: client `owner` (a stage) died. Its transfers fail now; its pools stay."""

    owner: str
    reason: str = ""


class Ok(Msg, tag=221):
    """Answer to a control message that has nothing else to say (PeerInfo, OwnerDown, CancelTransfer)."""

    detail: str = ""


# ---------------------------------------------------------------- 240-259: streamer <-> streamer -------


class RemoteOpen(Msg, tag=240):
    """Sender -> receiver: a transfer of `nchunks` chunks into `region` of local pool `dst_pool` begins.
    `rseq` increases per (sender, incarnation); the receiver refuses a seen rseq."""

    rseq: int
    dst_pool: str
    region: RegionSpec
    nchunks: int
    nbytes: int
    dtype: str
    row_bytes: int
    checksum: bool
    via: int  # VIA_*
    link: int = 0  # NCCL link id when via == VIA_NCCL
    tag: str = ""
    notify: list[str] = []
    origin: str = ""  # the requester's name at the *receiving* streamer for a pull ("" = push)
    origin_xfer: int = 0


class RemoteOpened(Msg, tag=241):
    rseq: int
    ok: bool
    code: int = 0
    message: str = ""


class RemoteChunk(Msg, tag=242):
    """Rows [r0, r1) of the packed region. VIA_FRAME: the bytes follow as one frame."""

    rseq: int
    chunk: int
    rows: list[int]
    nbytes: int
    checksum: int | None = None


class RemoteChunkAck(Msg, tag=243):
    """Receiver -> sender: chunk scattered (and verified). `committed` on the last: the transfer is delivered."""

    rseq: int
    chunk: int
    ok: bool
    committed: bool = False
    code: int = 0
    message: str = ""


class RemoteAbort(Msg, tag=244):
    """Sender -> receiver: drop transfer `rseq` (never committed); nothing of it is reported delivered."""

    rseq: int
    code: int
    reason: str


class PullRequest(Msg, tag=245):
    """Streamer -> peer: push `region` of your pool `src_pool` to my pool `dst_pool` / `dst_region`, on
    behalf of my client `origin` (its transfer `origin_xfer`)."""

    pull: int
    src_pool: str
    region: RegionSpec
    dst_pool: str
    dst_region: RegionSpec
    checksum: bool
    buffered: bool
    deadline_s: float
    tag: str
    notify: list[str]
    origin: str
    origin_xfer: int


class PullFailed(Msg, tag=246):
    pull: int
    code: int
    message: str


class NcclOffer(Msg, tag=247):
    """Sender -> receiver: join directed NCCL link `link` (rank 0 = sender on its `src_device`, rank 1 = the
    receiver on the device of its pool `dst_pool`), created from `uid` (NCCL unique id bytes as signed ints)."""

    link: int
    uid: list[int]
    src_device: int
    dst_pool: str


class NcclAccepted(Msg, tag=248):
    """Receiver -> sender, once its rank joined (ok) or could not (code XFER_UNAVAILABLE: not a GPU pool, no
    NCCL here -> the sender uses frames)."""

    link: int
    ok: bool
    code: int = 0
    message: str = ""


CONTROL = (
    RegisterPool, PoolRegistered, UnregisterPool, PoolUnregistered, AllocPool, PoolAllocated, FreePool,
    PoolFreed, StreamRequest, LayerReady, CancelTransfer, TransferProgress, TransferDone, TransferFailed,
    Delivered, PoolQuery, PoolInfo, StreamerStatusQuery, StreamerStatus, PeerInfo, OwnerDown, Ok,
)
DATA = (
    RemoteOpen, RemoteOpened, RemoteChunk, RemoteChunkAck, RemoteAbort, PullRequest, PullFailed, NcclOffer,
    NcclAccepted,
)
STREAMER_MESSAGES: tuple[type[Msg], ...] = CONTROL + DATA
