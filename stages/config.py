"""`StageProcConfig`: everything a stage process is told, validated once, never mutated.

Built by the supervisor, passed as JSON on the stage's command line (bus/child.py). Torch-free: the supervisor
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageProcConfig:
    index: int
    num_stages: int
    incarnation: int
    model_dir: str
    layers: tuple[int, int]
    num_slots: int
    max_seq_len: int
    supervisor_address: str
    controller_address: str
    dtype: str = "float32"
    device: str = "cpu"
    bind_host: str = "127.0.0.1"
    heartbeat_interval: float = 1.0
    handshake_timeout: float = 60.0
    supervisor_pid: int | None = None
    log_level: str = "INFO"
    threads: int = 0  # torch intra-op threads on CPU (0 = torch's default)
    transport: str = "auto"  # activation plane: "zmq", "nccl", or auto (nccl on cuda)
    microbatch_size: int = 0  # slots per microbatch range (CUDA graphs per range); 0 = all slots
    cuda_graphs: bool = True
    cudnn_attention: str = "all"  # where attention may use cuDNN (stages/layers/attention.py)
    link_timeout: float = 60.0  # NCCL link setup deadline
    streamer_address: str = ""  # the host's streamer: a CPU stage's KV pool lives with it ("" = private memory)
    streamer_timeout: float = 10.0  # deadline for the streamer's answers at start-up and shutdown
    # How long a starting stage waits for the streamer's first answer before it computes in private memory: a
    # streamer being restarted takes seconds to come back (8-9 s seen on a loaded 2-core box), and a restarted
    # stage's KV is in its keeping - waiting that long beats recomputing every request in flight.
    streamer_wait: float = 60.0
    shm_prefix: str = ""  # names this deployment's shared-memory pools (the supervisor sweeps them at the end)
    streamer_name: str = "streamer-0"  # the host's streamer process (the server key its client names)
    keys_dir: str = ""  # the deployment's keys (bus/security.py); "" = plaintext sockets
    supervisor_name: str = "supervisor"  # the process supervising it (its host agent, "agent-<slot>")
    host_id: str = ""  # the host it runs on, as status() names it ("" = the machine's host name)
    # KV replication (stages/replica.py): a GPU stage then registers its pool with the streamer too
    replicate: bool = False
    replica_lag: int = 2  # a microbatch's next step waits while more than this many of its transfers run
    kv_takeover: bool = True  # a restarted CPU stage takes its predecessor's shared-memory pool over (its KV)
    # Disaggregation (issue 19): which pipeline the stage belongs to, and that pipeline's first and last stage
    # indices (a colocated deployment: all of them). A prompt stage streams each prompt pass's KV to the token
    # stages (stages/kv_push.py); a token stage's pool receives it.
    pipeline: str = "colocated"  # "colocated" | "prompt" | "token"
    first_index: int = 0
    last_index: int = -1  # -1: num_stages - 1
    # Microbatch swapping (stages/swap.py, the rule in stages/swap_policy.py): "on" keeps swap_frames microbatches
    # (of num_slots / microbatch_size) in the stage's own pool and the rest in its streamer's swap pool; "auto"
    # decides from the figures (bandwidth in GB/s and a decode step's ms: 0 = measured / predicted at start)
    swap: str = "off"
    swap_frames: int = 2
    swap_timeout: float = 30.0  # deadline of a swap-in or write-back
    swap_bandwidth: float = 0.0
    swap_step_ms: float = 0.0
    swap_settled: str = ""  # auto decided by the supervisor before start (recovery/sizing.py): why; swap says which
    # Python's switch interval in the stage process: the compute thread and the event loop share the interpreter
    # lock, and at Python's 5 ms default a step's host work (inputs, graph launch, sampling) can wait behind the
    # loop's message handling while the GPU idles - the streamer's reason for the same figure
    # (streamer/config.py). An H100 A/B against 5 ms was within noise (bench/NOTES.md, the lean step).
    switch_interval_us: float = 200.0
    # A last stage reads a step's sampled tokens only after it launched the next step it holds (if any), so the
    # device runs that one while the host waits for the tokens and sends them (issue 20's lean step). None: on for
    # CUDA; on CPU a step's compute is synchronous, so the tokens would wait for the next step's compute (tests
    # turn it on there to run the same path).
    defer_tokens: bool | None = None

    def __post_init__(self) -> None:
        if self.pipeline not in ("colocated", "prompt", "token"):
            raise ValueError(f"pipeline must be colocated, prompt or token, got {self.pipeline!r}")
        if not 0 <= self.first_index <= self.index <= self.last_stage < self.num_stages:
            raise ValueError(f"stage {self.index} outside its pipeline's stages [{self.first_index}, {self.last_stage}]")
        if not 0 <= self.index < self.num_stages:
            raise ValueError(f"stage index {self.index} outside [0, {self.num_stages})")
        if self.heartbeat_interval <= 0 or self.handshake_timeout <= 0:
            raise ValueError("heartbeat_interval and handshake_timeout must be > 0")
        if self.transport not in ("auto", "zmq", "nccl"):
            raise ValueError(f"transport must be auto, zmq or nccl, got {self.transport!r}")
        if self.replica_lag < 0:
            raise ValueError(f"replica_lag must be >= 0, got {self.replica_lag}")
        if self.swap not in ("auto", "on", "off") or self.swap_frames < 1 or self.swap_timeout <= 0:
            raise ValueError(f"swap must be auto, on or off (got {self.swap!r}), swap_frames >= 1, swap_timeout > 0")

    @property
    def last_stage(self) -> int:
        return self.num_stages - 1 if self.last_index < 0 else self.last_index

    @property
    def shares_kv(self) -> bool:
        """Its pool must be registered with the streamer even on a GPU: replication, or either side of
        disaggregation (the streamer reads a prompt stage's pool and writes a token stage's)."""
        return self.replicate or self.pipeline != "colocated"

    @property
    def uses_nccl(self) -> bool:
        return self.transport == "nccl" or (self.transport == "auto" and self.device.startswith("cuda"))
