"""Every message that crosses a socket, as frozen msgspec structs. A leaf module: imports nothing from the
project and holds nothing but wire types.

Wire rules (golden-byte tests in tests/bus/test_messages.py pin them):
- msgpack; each struct encodes as an array `[tag, field1, field2, ...]` (array_like, int tag first);
- tags are stable forever: never reuse or renumber one; new fields go at the end with a default;
- enums are plain ints (see the *_STATE / code constants);
- raw tensor bytes never go inside a struct: they follow the envelope as extra ZeroMQ frames, and the
  struct says how to read them (`TensorMeta`).

Tag ranges: 1-19 common, 20-39 client <-> controller, 40-69 stages, 70-89 supervisor, 200-299 streamer.
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 1


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    """Header of every message. `body` is the encoded message (decoded in a second pass by its tag)."""

    version: int
    msg_id: int
    sender: str
    incarnation: int
    reply_to: int  # msg_id this answers; 0 = none
    body: msgspec.Raw


class Msg(msgspec.Struct, frozen=True, array_like=True, tag_field="t"):
    """Base of every message body."""


# ---------------------------------------------------------------- nested values (untagged) ------------


class TensorMeta(msgspec.Struct, frozen=True, array_like=True):
    """How to read the raw frame that follows: dtype name ("float32", "bfloat16", ...) and shape."""

    dtype: str
    shape: list[int]


class Chunk(msgspec.Struct, frozen=True, array_like=True):
    """Sequence in KV slot `slot` has `start` tokens cached and adds `length` (see stages/batch.py)."""

    slot: int
    start: int
    length: int


class Sampling(msgspec.Struct, frozen=True, array_like=True):
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None  # GenerateRequest.logprobs: None = the last stage computes none for this chunk
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) pairs, sorted by id
    # OpenAI's penalties over the tokens generated so far (vLLM's: not the prompt's): a token's logit drops by
    # frequency_penalty x its count + presence_penalty if it came at all. output_start: the prompt's length (where
    # the generated tokens begin). The last stage keeps each slot's generated tokens from the chunks it computes;
    # history: the generated tokens before this chunk's start, sent whenever it may not hold them (a request's
    # first step in an epoch: a restarted stage holds nothing).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    output_start: int = 0
    history: tuple[int, ...] | None = None

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """A sampled token's log-probability under the model's own distribution (log_softmax of the final logits in
    float32: before temperature, top-k and top-p), and the `top` most likely tokens' (ids, log-probabilities),
    most likely first (GenerateRequest.logprobs = how many)."""

    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class HostInfo(msgspec.Struct, frozen=True, array_like=True):
    host_id: str
    state: str  # "joining" | "up" | "spare" | "dead"
    address: str = ""
    pid: int = 0
    boot: int = 0
    devices: list[str] = []
    stages: list[int] = []
    since_s: float = 0.0  # seconds in this state
    hostname: str = ""


class ProcessInfo(msgspec.Struct, frozen=True, array_like=True):
    role: str  # "controller" | "stage" | "supervisor" | "streamer"
    index: int
    pid: int
    incarnation: int
    state: str  # "starting" | "ready" | "serving" | "failed" | "restarting" | "stopped"
    host: str = ""
    detail: str = ""
    busy_s: float | None = None  # stages: seconds spent computing steps since the process started (else None)
    steps: int | None = None  # stages: steps computed (else None)
    uptime_s: float = 0.0  # seconds since the process started; stages: since the stage began serving
    pipeline: str | None = None  # stages: "colocated" | "prompt" | "token" (disaggregation, issue 19)
    idle_fraction: float | None = None  # stages: 1 - busy_s / uptime_s (the pipeline's bubbles)
    kv_bytes: int | None = None  # prompt stages: KV bytes streamed to the token pipeline since they started
    swap: SwapInfo | None = None  # stages: microbatch swapping (--swap)


class ReplicaInfo(msgspec.Struct, frozen=True, array_like=True):
    """Stage `stage`'s KV replica as status() reports it."""

    stage: int
    host: str  # where the replica lives
    state: str  # "streaming" | "syncing" (a new replica being filled) | "broken" (no replica now) | "starting"
    survives_host_loss: bool  # False when it lives on the stage's own host (one host: it dies with it)
    lag_steps: int = 0  # the most steps of any microbatch computed but not yet committed in the replica
    lag_tokens: int = 0  # positions of the requests running now cached by the stage but not in its replica
    bytes: int = 0  # KV bytes the stage streamed to its replicas since it started
    stalls: int = 0  # steps that waited because replication was more than --replica-lag steps behind
    stall_s: float = 0.0
    failures: int = 0
    error: str = ""


class RecoveryInfo(msgspec.Struct, frozen=True, array_like=True):
    """A stage that came back (a restart in place or on another host): where its KV came from and what it cost.
    seconds: from the failure being reported to the pipeline serving again; tokens_replayed: cached positions fed
    again because the KV was not there (tokens_recompute: what a recompute of every request would have fed)."""

    stage: int
    host: str
    source: str  # "replica" | "recompute" | "kept" (a CPU stage took its own pool over)
    seconds: float
    tokens_replayed: int
    tokens_recompute: int = 0
    restore_s: float = 0.0
    restored_bytes: int = 0
    epoch: int = 0
    detected_at: float = 0.0  # wall clock (time.time()) when the failure was reported
    load_s: float = 0.0  # from then until the new stage said Hello (restart, imports, weights)
    serving_at: float = 0.0  # wall clock when the pipeline served again


class MemoryInfo(msgspec.Struct, frozen=True, array_like=True):
    """One stage's memory split as dejavu-serve planned it at start (issue 20, recovery/sizing.py; estimates,
    bytes): its budget is `free - margin` (CPU: its share of the host's RAM), and it uses weights + activations +
    graphs + slots x kv_per_slot of it; `fits` is the largest microbatch size the stage alone could take."""

    stage: int
    device: str
    total: int
    free: int
    margin: int
    budget: int
    weights: int
    activations: int
    graphs: int
    kv_per_slot: int
    slots: int
    fits: int
    fraction: float


class SwapInfo(msgspec.Struct, frozen=True, array_like=True):
    """A stage's microbatch swapping (--swap) as status() reports it: whether it swaps and why (auto's figures),
    and what it moved since it started."""

    mode: str  # what was asked: "auto" | "on" | "off"
    on: bool
    reason: str
    frames: int = 0  # microbatches resident in the stage's own pool
    bytes_in: int = 0  # KV bytes swapped in from the swap pool
    bytes_out: int = 0  # KV bytes written back to it (per-step deltas)
    swap_ins: int = 0
    stalls: int = 0  # steps that waited for their microbatch's swap-in or write-back
    stall_s: float = 0.0
    failures: int = 0  # swaps that failed (their microbatch was recomputed)
    kept: bool = False  # this incarnation found the swap pool its predecessor filled


# ---------------------------------------------------------------- 1-19: common -----------------------


class Hello(Msg, tag=1):
    """First message of a process to the controller or supervisor: who it is and where it listens."""

    role: str
    index: int
    pid: int
    host: str
    addresses: dict[str, str] = {}  # e.g. {"data": ...} for a stage, {"internal": ..., "client": ...}
    layers: list[int] = []  # [a, b) for stages
    num_slots: int = 0
    incarnation: int = -1  # set when the supervisor forwards a child's Hello (-1: the envelope's)
    kv_intact: bool = False  # a restarted stage whose KV pool is its predecessor's, kept by the streamer
    started: float = 0.0  # wall-clock time (time.time()) the process started: status() reports its uptime
    swap_kept: bool = False  # a swapping stage found its swap pool (filled by its predecessors) with the streamer
    # a token stage whose prompts' KV goes to this pool of its streamer rather than its own (swapping: a receive
    # pool by logical slot); "": its own pool, kv-stage-<index>
    receive_pool: str = ""


class Welcome(Msg, tag=2):
    """Answer to Hello: the deployment's current epoch."""

    epoch: int


class Heartbeat(Msg, tag=3):
    seq: int
    state: str = "serving"
    busy_s: float = 0.0  # how long the current compute step has been running (0 = idle)


class Shutdown(Msg, tag=4):
    reason: str = ""


class ErrorReply(Msg, tag=5):
    """Answer to a message that could not be handled. `code` is one of the ERR_* constants."""

    code: int
    message: str


ERR_BAD_MESSAGE = 1  # undecodable, wrong version, unknown type, oversized
ERR_BAD_REQUEST = 2  # decodable but invalid (token ids, lengths, sampling parameters)
ERR_SERVER = 3  # the deployment failed to serve it
ERR_OVERLOADED = 4  # admission refused (queue full)
ERR_CANCELLED = 5
ERR_TIMEOUT = 6
ERR_STEP_VOID = 7  # stage -> controller: the step did not run (a lookahead step whose previous step did not sample)


# ---------------------------------------------------------------- 20-39: client <-> controller -------


class GenerateRequest(Msg, tag=20):
    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False  # generate exactly max_new_tokens unless a stop_token_id comes (benchmarks)
    # A resume (None: a new request): the output tokens the client already holds. The client sends it after
    # its connection to the controller came back (a restarted controller knows nothing of the request); the
    # controller continues the output from there - replacing the request of the same id if it still runs -
    # so nothing the client holds is repeated or changed (seeded sampling depends only on (seed, position)).
    resume_token_ids: list[int] | None = None
    # None: no log-probabilities; N >= 0: each output token's (TokenChunk.logprobs) and the N most likely
    # alternatives' (at most bus/requests.MAX_LOGPROBS)
    logprobs: int | None = None
    # token id -> a number in [-100, 100] added to that token's logit before sampling (OpenAI's logit_bias: -100
    # bans a token, 100 all but forces it); at most bus/requests.MAX_LOGIT_BIAS entries. Log-probabilities stay
    # the model's own.
    logit_bias: dict[int, float] | None = None
    # OpenAI's penalties, each in [-2, 2], over the tokens generated so far (Sampling says how)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CancelRequest(Msg, tag=21):
    request_id: str


class TokenChunk(Msg, tag=22):
    """Newly committed tokens of a request; `index` = position in the output of token_ids[0]."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked (GenerateRequest.logprobs)


class RequestDone(Msg, tag=23):
    request_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_generated: int


class RequestFailed(Msg, tag=24):
    request_id: str
    code: int
    message: str


class StatusQuery(Msg, tag=25):
    pass


class StatusReply(Msg, tag=26):
    processes: list[ProcessInfo]
    model: str
    stages: int
    epoch: int
    waiting: int
    running: int
    slots: int = 0  # requests the deployment runs at once (microbatches x microbatch size)
    hosts: list[HostInfo] = []  # every host agent the deployment knows, with its state
    state: str = ""  # "starting" | "serving" | "degraded" (a stage has no host to run on) | "stopping"
    replicas: list[ReplicaInfo] = []  # one per stage while replication is on
    recoveries: list[RecoveryInfo] = []  # every stage that came back, most recent last (bounded)
    # disaggregation (issue 19): stages 0..prompt_stages-1 form the prompt pipeline, the rest the token pipeline
    prompt_stages: int = 0
    receive_waiting: int = 0  # requests whose prompt waits now for a free slot in the token pipeline
    receive_waits: int = 0  # requests that ever had to wait for one (back-pressure), since the controller started
    kv_streamed_bytes: int = 0  # prompt -> token KV bytes landed, since the controller started
    # memory-sized slots (issue 20): the deployment's microbatch size, how it was chosen, each stage's split
    microbatch_size: int = 0
    sizing: str = ""
    memory: list[MemoryInfo] = []
    # lean step (issue 20): steps are sent one ahead (--lookahead, one-stage pipelines), and the rows that cost:
    # computed for requests that had already stopped on a sampled token
    lookahead: bool = False
    lookahead_dropped_rows: int = 0


class KeepAlive(Msg, tag=27):
    """A client with requests in flight says it is still there (silent clients' requests are cancelled), and
    which requests it still awaits: one this controller does not know (it was restarted, and the request was not
    resumed) is answered with RequestFailed, so a client always learns the fate of every request."""

    request_ids: list[str] = []


class ServerStopping(Msg, tag=28):
    """Controller -> every client it knows, before it exits: the deployment stops, for `message` (what failed and
    which setting governs it, or the signal that stopped it). Requests in flight have been failed with it; the
    client fails whatever else it awaits, refuses new requests until a controller answers again, and answers
    ServerStoppingAck."""

    message: str


class ServerStoppingAck(Msg, tag=29):
    """Client -> controller: ServerStopping (and so every message before it) was read. The controller closes the
    connection only after this (or `flush_timeout`): a client's socket (ZMQ_IMMEDIATE) drops messages it has
    received but not yet read when the connection closes."""

    pass


# ---------------------------------------------------------------- 40-69: stages ----------------------


class StepRequest(Msg, tag=40):
    """One microbatch step. Controller -> a pipeline's first stage with token ids; stage i -> i+1 with a
    hidden-state frame. kv_to: a prompt pass of a disaggregated deployment - chunk k's KV goes, layer by layer as
    it is written, to slot kv_to[k] of the token stages (each stage streams its own layers: Topology.kv_dest).
    joined: see below (replication with disaggregation: the token stage is its replica's only writer)."""

    epoch: int
    mb: int
    step: int
    chunks: list[Chunk]
    token_ids: list[int]
    sampling: list[Sampling]
    hidden: TensorMeta | None = None
    kv_to: list[int] | None = None
    # a token pipeline's step: chunks whose request joined since its last step (its prompt's KV came from the
    # prompt stages); a replicating stage sends rows [0, end) of those to its replica, not just the step's own; a
    # swapping one copies rows [0, start) of those from its receive pool first and writes [0, end) back
    joined: list[int] | None = None
    # lookahead (one-stage pipelines): per chunk, -1 (its token ids are given) or the row, in this microbatch's
    # previous step (step - 1), whose sampled token this one-token chunk feeds; its token id here is a placeholder.
    # The controller sent this step before that one's tokens came back (bus/scheduler.py).
    fed: list[int] | None = None


class StepResult(Msg, tag=41):
    """Last stage -> controller: one sampled token per chunk, in chunk order."""

    epoch: int
    mb: int
    step: int
    tokens: list[int]
    logprobs: list[TokenLogprob | None] = []  # [] when no chunk asked (Sampling.logprobs); else one per chunk


class StepFailed(Msg, tag=42):
    epoch: int
    mb: int
    step: int
    code: int
    message: str


class ReplicaTarget(msgspec.Struct, frozen=True, array_like=True):
    """Where stage `stage`'s KV replica lives: pool `pool` on streamer `streamer` (host `host`), whose data
    socket is `data` (its peers push there). The same streamer as the stage's own when they share a host."""

    stage: int
    pool: str
    streamer: str
    data: str
    host: str
    layers: list[int] = []  # [a, b): the replicated stage's layers (the hosting stage allocates the pool)


class Topology(Msg, tag=43):
    """Controller -> stage: the epoch to serve and where to send activations ("" for the last stage).
    replica: where this stage streams every step's KV (None: no replication); hosted: the replica pools this
    stage allocates on its own host's streamer for other stages (kept across epochs and restarts of this stage)."""

    epoch: int
    downstream: str
    replica: ReplicaTarget | None = None
    hosted: list[ReplicaTarget] = []
    peers: dict[str, str] = {}  # every host's streamer -> its data address (the stage tells its own streamer)
    kv_dest: list[ReplicaTarget] = []  # a prompt stage's: every token stage's pool, streamer and layers


class TopologyAck(Msg, tag=44):
    epoch: int
    fresh: list[int] = []  # stages whose hosted replica pool this stage had to allocate anew: it holds nothing
    failed: dict[int, str] = {}  # stages whose replica pool could not be allocated here, and why


class LinkInit(Msg, tag=46):
    """Upstream stage -> downstream stage (data socket): join NCCL link `uid` for `epoch` as rank 1."""

    epoch: int
    uid: list[int]


class Rehello(Msg, tag=47):
    """Controller -> a stage it has no record of (a restarted controller): say Hello again."""

    controller_incarnation: int


class EpochOver(Msg, tag=48):
    """Controller -> every surviving stage, the moment a stage of `epoch` is reported down: that pipeline is gone.
    Abort its activation links now (an NCCL operation waiting on the dead stage otherwise spins on the GPU until
    the next epoch's links replace it, and any call that waits for the device waits with it) and drop its steps."""

    epoch: int


class StageStats(Msg, tag=45):
    """Stage -> controller, every heartbeat interval: how busy it has been (idle fraction = bubbles), and how its
    replication goes (bytes of KV streamed to its replica, steps that waited for it: --replica-lag)."""

    busy_s: float
    steps: int
    uptime_s: float
    tokens: int = 0
    replica_bytes: int = 0
    replica_stalls: int = 0
    replica_stall_s: float = 0.0
    replica_failures: int = 0
    replica_error: str = ""  # why replication is stopped now ("": it streams)
    kv_bytes: int = 0  # a prompt stage: KV bytes streamed to the token stages
    kv_failures: int = 0  # a prompt stage: prompt passes whose KV could not be streamed
    swap: SwapInfo | None = None  # microbatch swapping: whether, why, and what moved


class ReplicaAck(Msg, tag=49):
    """Stage -> controller: the KV written by these steps ([epoch, mb, step]) is committed in its replica.
    sync=False: each step's own rows (a per-step delta); sync=True: everything the stage held after each step
    (a whole-pool re-replication to a new replica), so positions [0, end) of every member of that step."""

    steps: list[list[int]]
    sync: bool = False
    nbytes: int = 0
    sync_epoch: int = 0  # sync=True: the epoch of the ReplicaSync it answers (an older one filled an older replica)


class ReplicaSync(Msg, tag=50):
    """Controller -> stage: your replica is new (its host was lost, or its pool is fresh): copy your whole KV there
    in the background, then go on with per-step deltas."""

    epoch: int


class Restore(Msg, tag=51):
    """Controller -> a stage that came back without its KV: pull tokens [0, lengths[slot]) of every slot from
    `source` (its replica) into your pool, then answer Restored. Sent after every stage acknowledged `epoch`."""

    epoch: int
    source: ReplicaTarget
    lengths: list[int]


class Restored(Msg, tag=52):
    epoch: int
    ok: bool
    seconds: float = 0.0
    nbytes: int = 0
    message: str = ""


class KvSent(Msg, tag=53):
    """Prompt stage -> controller: the KV this stage wrote in prompt pass (epoch, mb, step) landed in the token
    stages' slots (ok), or did not (the transfer failed or was cancelled: `message`). Sent for every prompt pass
    the stage ran, so the controller knows when no transfer of it can still write into a token slot."""

    epoch: int
    mb: int
    step: int
    ok: bool
    nbytes: int = 0
    message: str = ""


class KvMove(Msg, tag=54):
    """Controller -> every prompt stage: the KV of these parked prompts (chunk k: prompt slot, tokens [start,
    start + length)) goes now into receive slots kv_to[k] of the token stages, which had none free when the pass
    ran. Answered by KvSent(epoch, mb=-1, step=move)."""

    epoch: int
    move: int
    chunks: list[Chunk]
    kv_to: list[int]


# ---------------------------------------------------------------- 60-69: microbatch swapping ----------


class SwapAck(Msg, tag=60):
    """Stage -> controller: the rows these steps ([epoch, mb, step]) wrote are committed in the stage's swap pool
    (a per-step write-back), so a restarted stage can swap them back in instead of recomputing them."""

    steps: list[list[int]]
    nbytes: int = 0
    fresh: bool = False  # the swap pool was allocated anew (its streamer restarted): nothing before counts


class SwapFailed(Msg, tag=61):
    """Stage -> controller: step (epoch, mb, step) was not run: its microbatch's KV could not be swapped in (or its
    swap copy lacks rows). The controller recomputes that microbatch from its committed tokens."""

    epoch: int
    mb: int
    step: int
    message: str = ""


# ---------------------------------------------------------------- 70-89: supervisor ------------------
# The cluster supervisor (dejavu-serve) and the host agents (dejavu-agent, one per machine or simulated host):
# an agent says AgentHello until it is welcomed (HostWelcome: its slot, its processes' keys, the supervision
# policy), is told which stages to run (Assign: the whole set, so a repeat is harmless), and reports what its
# processes do (HostBeat, answered by Heartbeat: silence either way for heartbeat_timeout ends the host's lease).


class ProcessDown(Msg, tag=70):
    """Supervisor -> controller: a child died (or was killed after missing heartbeats)."""

    role: str
    index: int
    incarnation: int
    reason: str
    restarting: bool


class DeploymentReady(Msg, tag=71):
    """Controller -> supervisor: every stage is up and linked; clients can be served."""

    epoch: int


class AgentHello(Msg, tag=73):
    """Agent -> cluster supervisor, every heartbeat interval until welcomed: this host joins."""

    host_id: str
    boot: int  # this agent process's incarnation (random, fixed for its life): a fenced boot stays fenced
    pid: int
    address: str  # the address its processes bind and advertise (the agent's --advertise)
    devices: list[str]  # what it offers stages: ["cpu"] or ["cuda:0", "cuda:1", ...]
    hostname: str = ""
    local: bool = False  # a simulated host started by dejavu-serve itself (shares its machine)
    spare: bool = False  # asks to hold no stage until one is needed


class StageAssignment(msgspec.Struct, frozen=True, array_like=True):
    index: int
    incarnation: int  # of its first process here; restarts in place count up from it
    device: str
    config: str  # the stage's StageProcConfig as JSON, host-specific fields filled in by the agent
    secret: bytes  # its CURVE secret key (the link carrying this message is CURVE-encrypted)


class HostWelcome(Msg, tag=74):
    """Cluster supervisor -> agent: you are host `slot` of the deployment."""

    host_id: str
    boot: int
    slot: int
    public: dict[str, str]  # every member's public key (process name -> Z85)
    secrets: dict[str, bytes]  # this host's own processes' secret keys (its agent and streamer names)
    policy: str  # recovery.specs.HostPolicy as JSON: how the agent supervises, its streamer's pools
    # this host id's joins before this one: its streamer's incarnations start at generation << 16, so the peers
    # that counted an earlier boot's streamer (same name) take the new process's transfers as newer, not as replays
    generation: int = 0


class Assign(Msg, tag=75):
    """Cluster supervisor -> agent: run exactly these stages (start the missing ones, stop the others)."""

    host_id: str
    boot: int
    stages: list[StageAssignment]


class HostProcess(msgspec.Struct, frozen=True, array_like=True):
    role: str
    index: int
    pid: int
    incarnation: int
    state: str


class HostBeat(Msg, tag=76):
    """Agent -> cluster supervisor, every heartbeat interval: I am alive, and this is what my processes do."""

    host_id: str
    boot: int
    seq: int
    processes: list[HostProcess] = []


class Fenced(Msg, tag=77):
    """Cluster supervisor -> an agent declared dead (or unknown): stop every process of this host and exit. Its
    stages run elsewhere now; a new agent process may join again as a fresh host."""

    host_id: str
    boot: int
    reason: str


class HostsUpdate(Msg, tag=78):
    """Cluster supervisor -> controller, whenever a host changes state: for status()."""

    hosts: list[HostInfo]
    unplaced: list[int] = []  # stages no host can take now: the deployment is degraded


class FatalError(Msg, tag=72):
    """Supervisor -> controller: stop serving, the deployment cannot go on. Child -> supervisor: this process
    cannot start as configured (a port in use, a model it cannot load); it exits with code 2 and is not
    restarted, since a new incarnation would fail the same way."""

    message: str
    config: bool = False  # agent -> cluster supervisor: a setting must change (dejavu-serve exits with code 2)


# ---------------------------------------------------------------- 200-299: streamer -----------------
# Two sockets carry these (see streamer/proc.py): control (ROUTER, one per streamer): stages, the supervisor,
# the controller -> streamer, tags 200-229; data (ROUTER, one per streamer): peer streamer -> streamer, each
# peer connected with a DEALER whose identity is its streamer name, tags 240-259. After a `RemoteChunk` sent
# `VIA_FRAME` one raw frame follows the envelope.
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
    """A KV pool's shape (streamer/layout.PoolLayout): [num_layers, 2, num_slots, max_seq_len, kv_heads, head_dim]."""

    first_layer: int
    num_layers: int
    num_slots: int
    max_seq_len: int
    kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "float16" | "bfloat16" | ...


class RegionSpec(msgspec.Struct, frozen=True, array_like=True):
    """Slots x global layers [a, b) x one token range [t0, t1) per slot (streamer/layout.Region)."""

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
    timeline: bool = False  # TransferDone carries each layer's LayerTimes (diagnostics)


# A stage's compute thread may send LayerReady on a socket of its own (no hop through its event loop); that
# socket's identity is the client's identity + SIGNAL_SEP + a number, and the streamer files the signal under
# the client's identity (streamer/client.py, StreamerClient.layer_ready_direct).
SIGNAL_SEP = "|signal-"


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


class LayerTimes(msgspec.Struct, frozen=True, array_like=True):
    """When the streamer saw each step of one layer of a transfer (StreamRequest.timeline), in seconds of the
    streamer host's monotonic clock (time.monotonic(); comparable between processes of one host). 0.0: the step
    does not apply (no LayerReady for a transfer that is not layered)."""

    layer: int
    ready: float  # LayerReady arrived
    fired: float  # the layer may move: LayerReady seen and, with layer_wait="host", the stage's event fired
    issued: float  # its copies were enqueued (GPU) or started (CPU)
    landed: float  # its last byte is at the destination


class TransferDone(Msg, tag=212):
    xfer: int
    tag: str
    nbytes: int
    seconds: float
    checksummed: bool
    timeline: list[LayerTimes] = []  # StreamRequest.timeline: one entry per layer, in order
    sent_at: float = 0.0  # StreamRequest.timeline: when this answer was sent (the streamer's time.monotonic())


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
    path: str = ""  # a stage's shared-memory pool: its file (a restarted stage maps it again: its KV is there)
    owner_incarnation: int = -1  # a stage pool: its owner's incarnation when it registered or took it over


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
    # False: answer only a refusal (the chunks follow at once, and their acks say the open was accepted); a
    # transfer of no chunks is always answered
    answer: bool = True
    # chunk 0 of the transfer, carried by its open (one message instead of two per single-chunk transfer, e.g.
    # a prompt layer): handled as if it arrived right after the open - announced NCCL bytes are received (into
    # scratch if the open is refused); VIA_FRAME: its frame follows this envelope
    first: RemoteChunk | None = None


class RemoteOpened(Msg, tag=241):
    rseq: int
    ok: bool
    code: int = 0
    message: str = ""


class RemoteChunk(Msg, tag=242):
    """Rows [r0, r1) of the packed region. VIA_FRAME: the bytes follow as one frame. VIA_NCCL: the sender has
    posted (or is about to post) an ncclSend of `nbytes` on link `link`; the receiver posts exactly one matching
    receive per such announcement, in announcement order - into a scratch buffer if it refuses the chunk
    (unknown, refused or aborted transfer), so the link stays in step. `checksum` None on a checked NCCL
    transfer: the digest follows in a RemoteChunkDigest (the send does not wait for it)."""

    rseq: int
    chunk: int
    rows: list[int]
    nbytes: int
    checksum: int | None = None
    link: int = 0  # the NCCL link the bytes travel on (0: a frame follows)


class RemoteChunkDigest(Msg, tag=249):
    """Sender -> receiver: the source digest of NCCL chunk `chunk` of transfer `rseq`, sent once its gather is
    done (the chunk's bytes are already on their way); the receiver acks the chunk only once it matches."""

    rseq: int
    chunk: int
    checksum: int


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
    NcclAccepted, RemoteChunkDigest,
)
STREAMER_MESSAGES: tuple[type[Msg], ...] = CONTROL + DATA


COMMON = (Hello, Welcome, Heartbeat, Shutdown, ErrorReply)
CLIENT = (GenerateRequest, CancelRequest, TokenChunk, RequestDone, RequestFailed, StatusQuery, StatusReply, KeepAlive,
          ServerStopping, ServerStoppingAck)
STAGE = (StepRequest, StepResult, StepFailed, Topology, TopologyAck, StageStats, LinkInit, Rehello, EpochOver,
         ReplicaAck, ReplicaSync, Restore, Restored, KvSent, KvMove)
STAGE += (SwapAck, SwapFailed)  # microbatch swapping (tags 60-69)
SUPERVISOR = (ProcessDown, DeploymentReady, FatalError, AgentHello, HostWelcome, Assign, HostBeat, Fenced, HostsUpdate)
ALL_MESSAGES: tuple[type[Msg], ...] = COMMON + CLIENT + STAGE + SUPERVISOR + STREAMER_MESSAGES
