"""What a deployment is: `DeploymentConfig` (validated), and the child processes it consists of.

`bin/dejavu-serve` parses its arguments into a DeploymentConfig; the supervisor turns it into one
`ChildSpec` per process, each of which knows how to build its command line for a given incarnation.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields

from bus.child import encode_config

MAX_HOSTS = 64  # host slots of one deployment (each has a key pair made at start)


@dataclass(frozen=True)
class DeploymentConfig:
    model_dir: str
    num_stages: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port (the ready line says which)
    microbatch_size: int = 8  # 0 = auto: memory-sized (recovery/sizing.py)
    num_microbatches: int = 0  # 0 = one per stage (a full pipeline)
    max_seq_len: int = 2048
    prefill_chunk: int = 0
    max_waiting: int = 4096
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0
    hang_timeout: float = 300.0  # a stage busy with one step for longer than this is killed (a hung GPU/NCCL)
    # Each process's own restart budget: at most max_restarts restarts of that process within restart_window
    # seconds, else the deployment shuts down (failures of different processes do not add up).
    max_restarts: int = 5
    restart_window: float = 60.0
    # Back-off before restarting the same process again: none for its first restart, then restart_backoff,
    # doubling with each restart in a row up to restart_backoff_max; back to none once the process stayed up
    # restart_backoff_reset seconds after its Hello (restart_backoff 0: restart at once, always).
    restart_backoff: float = 0.5
    restart_backoff_max: float = 10.0
    restart_backoff_reset: float = 10.0
    startup_timeout: float = 300.0
    shutdown_timeout: float = 10.0  # after Shutdown, before SIGTERM
    kill_timeout: float = 5.0  # after SIGTERM, before SIGKILL
    # When the deployment stops, how long clients have to confirm its last word (ServerStopping) before the
    # client address closes: the controller's wait, or the supervisor's when it stands in for a dead controller.
    stop_notice_timeout: float = 2.0
    client_timeout: float = 10.0
    queue_timeout: float = 300.0  # a request without a slot, or whose pipeline is down, this long fails
    step_timeout: float = 600.0
    stage_threads: int = 0  # torch threads per CPU stage (0 = cores / stages)
    cuda_graphs: bool = True  # decode steps replay CUDA graphs
    cudnn_attention: str = "all"  # all | decode | off: where attention may use cuDNN (stages/layers/attention.py)
    transport: str = "auto"  # activation plane: auto (NCCL on cuda), zmq, nccl
    streamer: bool = True  # start this host's KV streamer process
    swap_bytes: int = 256 << 20  # its pinned host pools (explicit capacities; over-commitment is refused)
    replica_bytes: int = 256 << 20
    receive_bytes: int = 64 << 20
    standby: str = "auto"  # a warm standby stage process per device of a host (recovery/standby.py): auto = cuda
    # the standby warms its device first: a CUDA context and the first kernels, through one layer of the stage's
    # sizes within (1 - gpu_memory_fraction) of the device (stages/device_warmup.py)
    standby_warmup: bool = True
    # a one-stage pipeline: each microbatch's next step is sent while its current one runs, fed the sampled tokens
    # on the stage (bus/scheduler.py); no effect elsewhere. auto = on for cuda (on CPU the controller's work would
    # then run beside the stage's compute threads on the same cores, and slow them: 2.1x on the 2-core box)
    lookahead: str = "auto"
    defer_tokens: str = "auto"  # a last stage launches its next step before it reads a step's tokens: auto = cuda
    log_level: str = "INFO"
    log_dir: str = ""  # each process logs to <log_dir>/<process>.log ("" = the supervisor's stderr)
    # Hosts (recovery/hosts.py): `hosts` local agents as simulated hosts (each its own loopback address,
    # streamer and shared-memory namespace), `spare_hosts` more holding no stage until one is needed; remote
    # agents join at `agent_bind`. Stages are placed once `min_hosts` hosts have joined (0: the local ones).
    hosts: int = 1
    spare_hosts: int = 0
    min_hosts: int = 0
    agent_bind: str = "tcp://127.0.0.1:0"
    keys_dir: str = ""  # the user's keys (dejavu-keys generate): CURVE for clients and remote agents
    insecure: bool = False  # allow a non-loopback bind without keys
    # KV replication (issue 18): "auto" = on with 2 or more hosts; every step's KV goes to a replica on the next
    # host, and a stage that comes back without its KV restores it from there
    replicate: str = "auto"
    replica_lag: int = 2  # steps a microbatch's replication may fall behind before its next step waits
    kv_takeover: bool = True  # a restarted CPU stage takes its predecessor's shared-memory pool (its KV) over
    # Prompt-token disaggregation (issue 19, bus/disagg.py): stages [0, prompt_stages) run prompt passes and
    # stream their KV to the token stages, which run decode steps; prompt_stages + token_stages = num_stages.
    # 0 and 0: one colocated pipeline.
    prompt_stages: int = 0
    token_stages: int = 0
    prompt_microbatch_size: int = 0  # prompts per prompt pass (0: --microbatch-size)
    # The OpenAI-compatible HTTP front (bus/front/, recovery/front_child.py): one more supervised process when
    # http_port is set (0 = any free port). It admits slots + max_queue requests at once, gives each
    # request_timeout seconds, and drains first (drain_timeout) when the deployment stops.
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    max_queue: int = 1024
    request_timeout: float = 600.0
    drain_timeout: float = 30.0
    # who may use it (bus/front/auth.py): API keys from a file (absolute path; plus $DEJAVU_API_KEY), TLS (PEM)
    api_key_file: str = ""
    tls_certfile: str = ""
    tls_keyfile: str = ""
    # Memory-sized microbatches (issue 20, recovery/sizing.py): microbatch_size 0 = auto, the most slots every
    # stage's device holds within gpu_memory_fraction of its memory; memory_plan: the chosen split (JSON), set
    # by recovery.sizing.resolve, shown in status()
    gpu_memory_fraction: float = 0.9
    memory_plan: str = ""
    # Microbatch swapping (stages/swap.py; the rule in stages/swap_policy.py): each stage keeps 2 microbatches in
    # its own pool and the others in its host streamer's swap pool. auto: on where it pays (the stage measures,
    # or takes swap_bandwidth GB/s and swap_step_ms per decode step); on: always (CPU too: how CI tests it)
    swap: str = "auto"
    swap_bandwidth: float = 0.0
    swap_step_ms: float = 0.0
    # auto decided before start by recovery.sizing.resolve (with the GPU probe's or the flags' figures): why, and
    # whether on ("" : the stages decide at their start)
    swap_settled: str = ""
    swap_settled_on: bool = False
    # How the layers are split over a decoding pipeline (colocated, or the token stages): balanced - the slowest
    # stage as fast as whole layers allow, the last stage's LM head counted as head_layers layers (its weight bytes
    # over a layer's: what a decode step reads; set by recovery.sizing.resolve from the model); even - equal counts.
    # A prompt pipeline's split is even (a prompt pass computes the head for one token per sequence).
    layer_split: str = "balanced"
    head_layers: float = 0.0

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError("--stages must be >= 1")
        if self.prompt_stages < 0 or self.token_stages < 0 or self.prompt_microbatch_size < 0:
            raise ValueError("--prompt-stages, --token-stages and --prompt-microbatch-size must be >= 0")
        if (self.prompt_stages == 0) != (self.token_stages == 0):
            raise ValueError("give both --prompt-stages and --token-stages (1 or more each), or neither")
        if self.disaggregated and not self.streamer:
            raise ValueError("--prompt-stages/--token-stages need the KV streamer (drop --no-streamer): it moves "
                             "the prompts' KV to the token stages")
        if self.disaggregated and self.num_stages != self.prompt_stages + self.token_stages:
            raise ValueError(f"--stages {self.num_stages} contradicts --prompt-stages {self.prompt_stages} "
                             f"--token-stages {self.token_stages} (leave --stages out: it is their sum)")

        if self.microbatch_size < 0:
            raise ValueError("--microbatch-size must be >= 1, or auto")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"--gpu-memory-fraction {self.gpu_memory_fraction}: give a fraction in (0, 1] of each "
                             "device's memory (default 0.9)")
        if self.num_microbatches < 0:
            raise ValueError("--microbatches must be >= 0 (0 = one per stage)")
        if self.max_seq_len < 2:
            raise ValueError("--max-seq-len must be >= 2")
        if not 0 <= self.port < 65536:
            raise ValueError("--port must be in [0, 65535]")
        if self.hosts < 0 or self.spare_hosts < 0 or self.min_hosts < 0:
            raise ValueError("--hosts, --spare-hosts and --min-hosts must be >= 0")
        if self.hosts == 0 and self.spare_hosts:
            raise ValueError("--spare-hosts needs --hosts 1 or more (local spares back local hosts)")
        if self.hosts + self.spare_hosts > MAX_HOSTS:
            raise ValueError(f"at most {MAX_HOSTS} hosts")
        if not self.agent_bind.startswith("tcp://") or ":" not in self.agent_bind[6:]:
            raise ValueError(f"--agent-bind {self.agent_bind}: give tcp://ADDRESS:PORT")
        if self.replicate not in ("auto", "on", "off"):
            raise ValueError(f"--replicate must be auto, on or off, got {self.replicate!r}")
        if self.replica_lag < 0:
            raise ValueError("--replica-lag must be >= 0")
        if self.replicating and not self.streamer:
            raise ValueError("--replicate on needs the KV streamer (drop --no-streamer)")
        if self.device not in ("cpu", "cuda"):
            raise ValueError("--device must be cpu or cuda")
        if self.transport not in ("auto", "zmq", "nccl"):
            raise ValueError("--transport must be auto, zmq or nccl")
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ValueError("need 0 < heartbeat interval < heartbeat timeout")
        if self.queue_timeout <= 0:
            raise ValueError("--queue-timeout must be > 0 seconds")
        if self.max_restarts < 0 or self.restart_window <= 0:
            raise ValueError("max_restarts must be >= 0 and restart_window > 0")
        if not 0 <= self.restart_backoff <= self.restart_backoff_max or self.restart_backoff_reset <= 0:
            raise ValueError("need 0 <= restart_backoff <= restart_backoff_max and restart_backoff_reset > 0")
        from stages.swap_policy import SWAP_MODES, check_swap_on

        if self.swap not in SWAP_MODES:
            raise ValueError(f"--swap must be auto, on or off, got {self.swap!r}")
        if self.swap_bandwidth < 0 or self.swap_step_ms < 0:
            raise ValueError("--swap-bandwidth and --swap-step-ms must be >= 0 (0: measured at start)")
        if self.standby not in ("auto", "on", "off"):
            raise ValueError(f"--standby must be auto, on or off, got {self.standby!r}")
        if self.lookahead not in ("auto", "on", "off"):
            raise ValueError(f"--lookahead must be auto, on or off, got {self.lookahead!r}")
        if self.defer_tokens not in ("auto", "on", "off"):
            raise ValueError(f"--defer-tokens must be auto, on or off, got {self.defer_tokens!r}")
        if self.layer_split not in ("balanced", "even"):
            raise ValueError(f"--layer-split must be balanced or even, got {self.layer_split!r}")
        if self.swap == "on":
            check_swap_on(self.microbatches, streamer=self.streamer)

    def policy(self) -> HostPolicy:
        return HostPolicy(**{f.name: getattr(self, f.name) for f in fields(HostPolicy)})

    @property
    def lookahead_on(self) -> bool:
        """Steps are sent one ahead: asked for (auto: on GPUs), and where it applies - one stage that both takes
        token ids and samples (the colocated pipeline's one stage, or a disaggregated deployment's one token
        stage); not with swapping frames (recovery/proc.py)."""
        wanted = self.lookahead == "on" or (self.lookahead == "auto" and self.device != "cpu")
        return wanted and (self.token_stages if self.disaggregated else self.num_stages) == 1

    @property
    def disaggregated(self) -> bool:
        return self.prompt_stages > 0

    @property
    def microbatches(self) -> int:
        """Microbatches of the (token) pipeline: given, or one per stage of it."""
        return self.num_microbatches or (self.token_stages if self.disaggregated else self.num_stages)

    @property
    def prompt_microbatches(self) -> int:
        """Prompt passes in flight: one per prompt stage, and one more whose KV may still be landing while the
        others compute (its receive slots free when every prompt stage reported its KV)."""
        return self.prompt_stages + 1 if self.disaggregated else 0

    @property
    def prompt_batch(self) -> int:
        return self.prompt_microbatch_size or self.microbatch_size

    def stage_plan(self, num_layers: int) -> list[StagePlan]:
        """Every stage's pipeline, layers and KV slots (a prompt stage's pool holds only the passes in flight)."""
        from stages.models.spec import split_layers

        head = self.head_layers if self.layer_split == "balanced" else 0.0  # (decoding pipelines only)
        if not self.disaggregated:
            return [StagePlan("colocated", r, self.num_slots, self.microbatch_size, 0, self.num_stages - 1)
                    for r in split_layers(num_layers, self.num_stages, head)]
        dp = self.prompt_stages
        prompt = [StagePlan("prompt", r, self.prompt_microbatches * self.prompt_batch, self.prompt_batch, 0, dp - 1)
                  for r in split_layers(num_layers, dp)]
        token = [StagePlan("token", r, self.num_slots, self.microbatch_size, dp, self.num_stages - 1)
                 for r in split_layers(num_layers, self.token_stages, head)]
        return prompt + token

    @property
    def replicating(self) -> bool:
        """Replication on: asked for, or by default with 2 or more hosts (one host: the replica would die with it).
        Disaggregated, the token stages replicate (a prompt stage's KV lives for one pass)."""
        if self.replicate == "auto":
            return self.streamer and max(self.hosts + self.spare_hosts, self.min_hosts) >= 2
        return self.replicate == "on"

    @property
    def wanted_hosts(self) -> int:
        """Hosts that must have joined before stages are placed."""
        return self.min_hosts or max(1, self.hosts)

    @property
    def num_slots(self) -> int:
        return self.microbatches * self.microbatch_size

    @property
    def swap_mode(self) -> str:
        """What the stages that may swap are told (colocated and token stages; a prompt stage's KV lives for one
        pass): off where swapping cannot run (no streamer: auto says off)."""
        return "off" if not self.streamer else self.swap

    def threads_per_stage(self) -> int:
        if self.stage_threads:
            return self.stage_threads
        return max(1, (os.cpu_count() or 1) // self.num_stages)


@dataclass(frozen=True)
class StagePlan:
    pipeline: str  # "colocated" | "prompt" | "token"
    layers: tuple[int, int]
    num_slots: int
    microbatch_size: int  # slots per microbatch range (CUDA graphs per range)
    first: int  # its pipeline's first and last stage index
    last: int


@dataclass(frozen=True)
class HostPolicy:
    """How a supervisor (dejavu-serve for the controller, each host agent for its stages and streamer) watches
    and restarts its children, and the host streamer's pools. dejavu-serve's flags set it; an agent receives it
    when it joins (HostWelcome), so one command line governs every host."""

    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0
    hang_timeout: float = 300.0
    max_restarts: int = 5
    restart_window: float = 60.0
    restart_backoff: float = 0.5
    restart_backoff_max: float = 10.0
    restart_backoff_reset: float = 10.0
    startup_timeout: float = 300.0
    shutdown_timeout: float = 10.0
    kill_timeout: float = 5.0
    log_level: str = "INFO"
    streamer: bool = True
    swap_bytes: int = 256 << 20
    replica_bytes: int = 256 << 20
    receive_bytes: int = 64 << 20
    standby: str = "auto"
    standby_warmup: bool = True
    gpu_memory_fraction: float = 0.9  # the stages' budget: a standby's warm-up stays outside it


@dataclass(frozen=True)
class ChildSpec:
    role: str  # "controller" | "stage" | "streamer"
    index: int
    module: str  # python -m <module> '<config json>'
    config: object  # a frozen config dataclass with an `incarnation` field

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    def argv(self, incarnation: int) -> list[str]:
        from dataclasses import replace

        cfg = replace(self.config, incarnation=incarnation)  # type: ignore[type-var]
        return [sys.executable, "-m", self.module, encode_config(cfg)]
