"""The controller's configuration and its stage registry's records: plain data, no sockets and no loop.

Runs in the controller process (bus/controller_proc.py builds its state from these); the supervisor
(recovery/proc.py) builds the `ControllerConfig` it passes to the controller as JSON. Validated here, never
mutated: a config that cannot work raises ValueError saying what to change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bus.messages import HostInfo, ProcessInfo, StageStats


@dataclass(frozen=True)
class ControllerConfig:
    model_dir: str  # for its tokenizer; the facts below come from the supervisor, which parsed the model
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_stages: int
    microbatch_size: int
    num_microbatches: int
    max_seq_len: int
    supervisor_address: str
    client_bind: str = "tcp://127.0.0.1:0"
    internal_bind: str = "tcp://127.0.0.1:0"
    incarnation: int = 0
    prefill_chunk: int = 0
    max_waiting: int = 4096
    client_timeout: float = 10.0
    step_timeout: float = 600.0
    queue_timeout: float = 300.0  # a request without a slot (or whose pipeline is down) this long fails
    unknown_request_grace: float = 3.0  # a KeepAlive's unknown request id is answered after this long
    topology_timeout: float = 30.0
    heartbeat_interval: float = 1.0
    max_client_request: int = 8 * 1024 * 1024  # larger requests get ErrorReply ...
    max_client_frame: int = 64 * 1024 * 1024  # ... and larger frames make ZeroMQ drop the connection
    supervisor_pid: int | None = None
    keys_dir: str = ""  # the deployment's keys (bus/security.py); "" = plaintext internal sockets
    log_level: str = "INFO"
    flush_timeout: float = 2.0  # on exit, how long clients have to confirm the last messages (ServerStoppingAck)
    max_known_clients: int = 4096  # clients told when the deployment stops (the most recently heard from)
    client_keys_dir: str = ""  # the users' keys (dejavu-keys generate); "" = a plaintext client socket
    replicate: bool = False  # stream every stage's KV to a replica on another host (bus/replication.py)
    restore_timeout: float = 90.0  # a stage restoring its KV from its replica answers within this
    # disaggregation (bus/disagg.py): stages [0, prompt_stages) run prompt passes, the others decode steps
    prompt_stages: int = 0
    prompt_microbatches: int = 0
    prompt_microbatch_size: int = 0
    memory_plan: str = ""  # JSON: the microbatch size's choice and each stage's memory split (recovery/sizing.py)
    lookahead: bool = False  # send each microbatch's next step while its current one runs (bus/scheduler.py)
    swap: bool = False  # stages may swap microbatches (--swap auto|on): keep what their swap pools hold

    def __post_init__(self) -> None:
        if self.num_stages < 1 or self.microbatch_size < 1 or self.num_microbatches < 1:
            raise ValueError("num_stages, microbatch_size and num_microbatches must be >= 1")
        if self.prompt_stages and not (0 < self.prompt_stages < self.num_stages and self.prompt_microbatches >= 1
                                       and self.prompt_microbatch_size >= 1):
            raise ValueError("a disaggregated deployment needs prompt and token stages and prompt microbatches")

    def pipeline(self, stage: int) -> str:
        if not self.prompt_stages:
            return "colocated"
        return "prompt" if stage < self.prompt_stages else "token"

    def last_of_pipeline(self, stage: int) -> bool:
        return stage == self.num_stages - 1 or stage == self.prompt_stages - 1


@dataclass
class StageEntry:
    incarnation: int
    pid: int
    host: str
    data: str
    state: str = "ready"
    stats: StageStats | None = None
    kv_intact: bool = False  # its KV pool holds every position this controller counts as cached
    layers: list[int] = field(default_factory=list)
    returned: bool = False  # came back after a failure (a recovery, reported once it serves)
    hello_at: float = field(default_factory=time.monotonic)
    receive_pool: str = ""  # a token stage's: where the prompt stages push (Hello.receive_pool; "": its own pool)


@dataclass
class Registry:
    stages: dict[int, StageEntry] = field(default_factory=dict)
    others: dict[tuple[str, int], ProcessInfo] = field(default_factory=dict)
    started: dict[tuple[str, int], float] = field(default_factory=dict)  # others' start (wall clock)
    hosts: list[HostInfo] = field(default_factory=list)  # from the supervisor (HostsUpdate)
    unplaced: list[int] = field(default_factory=list)  # stages no host can take now: degraded
