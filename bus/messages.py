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


class ProcessInfo(msgspec.Struct, frozen=True, array_like=True):
    role: str  # "controller" | "stage" | "supervisor" | "streamer"
    index: int
    pid: int
    incarnation: int
    state: str  # "starting" | "ready" | "serving" | "failed" | "restarting" | "stopped"
    host: str = ""
    detail: str = ""
    busy_s: float = 0.0  # stages: seconds spent computing steps since the process started
    steps: int = 0  # stages: steps computed
    uptime_s: float = 0.0  # stages: seconds since the stage began serving


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


class CancelRequest(Msg, tag=21):
    request_id: str


class TokenChunk(Msg, tag=22):
    """Newly committed tokens of a request; `index` = position in the output of token_ids[0]."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str | None = None


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


class KeepAlive(Msg, tag=27):
    """A client with requests in flight says it is still there; silent clients' requests are cancelled."""

    pass


# ---------------------------------------------------------------- 40-69: stages ----------------------


class StepRequest(Msg, tag=40):
    """One microbatch step. Controller -> stage 0 with token ids; stage i -> i+1 with a hidden-state frame."""

    epoch: int
    mb: int
    step: int
    chunks: list[Chunk]
    token_ids: list[int]
    sampling: list[Sampling]
    hidden: TensorMeta | None = None


class StepResult(Msg, tag=41):
    """Last stage -> controller: one sampled token per chunk, in chunk order."""

    epoch: int
    mb: int
    step: int
    tokens: list[int]


class StepFailed(Msg, tag=42):
    epoch: int
    mb: int
    step: int
    code: int
    message: str


class Topology(Msg, tag=43):
    """Controller -> stage: the epoch to serve and where to send activations ("" for the last stage)."""

    epoch: int
    downstream: str


class TopologyAck(Msg, tag=44):
    epoch: int


class LinkInit(Msg, tag=46):
    """Upstream stage -> downstream stage (data socket): join NCCL link `uid` for `epoch` as rank 1."""

    epoch: int
    uid: list[int]


class StageStats(Msg, tag=45):
    """Stage -> controller, every heartbeat interval: how busy it has been (idle fraction = bubbles)."""

    busy_s: float
    steps: int
    uptime_s: float
    tokens: int = 0


# ---------------------------------------------------------------- 70-89: supervisor ------------------


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


class FatalError(Msg, tag=72):
    """Supervisor -> controller (or the reverse): stop serving; the deployment cannot go on."""

    message: str


COMMON = (Hello, Welcome, Heartbeat, Shutdown, ErrorReply)
CLIENT = (GenerateRequest, CancelRequest, TokenChunk, RequestDone, RequestFailed, StatusQuery, StatusReply, KeepAlive)
STAGE = (StepRequest, StepResult, StepFailed, Topology, TopologyAck, StageStats, LinkInit)
SUPERVISOR = (ProcessDown, DeploymentReady, FatalError)
ALL_MESSAGES: tuple[type[Msg], ...] = COMMON + CLIENT + STAGE + SUPERVISOR
