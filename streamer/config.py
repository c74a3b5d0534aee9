"""`StreamerConfig`: everything the streamer process is told, validated once, never mutated.

Built by `python -m streamer` (streamer/__main__.py) or by the supervisor; read by streamer/proc.py and
streamer/service.py. Capacities are explicit: the streamer allocates (and on GPU hosts pins) each host pool
kind's capacity up front, so over-commitment is refused at request time with a CapacityError instead of
surfacing later as an out-of-memory kill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
SHM_DIR = Path("/dev/shm")  # CPU stage pools are files here (streamer/memory.py) ...
SHM_PREFIX = "dejavu-kv"  # ... named dejavu-kv-<deployment>-*: the supervisor sweeps what a dead deployment left
CHECKSUM_POLICIES = ("remote", "all", "off")


@dataclass(frozen=True)
class StreamerConfig:
    name: str  # this streamer's name (one per host, e.g. "host0"); peers address it by this name
    control_address: str  # ROUTER for stages / supervisor / controller ("tcp://127.0.0.1:0", "ipc://...")
    data_address: str  # ROUTER for peer streamers
    incarnation: int = 0  # restart count (stale data frames from older incarnations are dropped)
    # Host pool capacities, bytes. 0 = this kind cannot be allocated.
    swap_bytes: int = 0
    replica_bytes: int = 0
    receive_bytes: int = 0
    disk_dir: str = ""  # where POOL_DISK files live ("" = no disk pools)
    # Where the streamer records the shared-memory stage pools it maps (streamer/manifest.py), so that the next
    # streamer started with the same file adopts them: a stage that dies before it registered with that
    # streamer, or while none ran, still finds its KV. "" = no record (a restarted streamer knows a pool only
    # once its stage registers it again). The supervisor puts it beside the control socket, in its run directory.
    manifest: str = ""
    disk_bytes: int = 0
    pin_memory: bool = True  # pin host pools when CUDA is present (no effect on CPU-only hosts)
    # Copies.
    buffered: bool = True  # default copy mode; False = one copy per contiguous piece (the ablation)
    # Checksums of transfers that do not say (StreamRequest.checksum None):
    #   "remote" - verify end to end where the bytes pass through software on their way: ZeroMQ frames and NCCL to
    #              another streamer, and disk pools (memory-mapped files); trust local DMA and host memory copies
    #              (GPU <-> GPU, GPU <-> pinned host, host <-> host) to the hardware (ECC memory, CRC-checked
    #              NVLink / PCIe links);  "all" - every transfer;  "off" - none.
    # Measured (2xH200, streamer-2xh200-2026-11-27-s6.json, in git history at cb7eb45): checksumming local layer-by-layer
    # streaming slowed the stage's prompt pass by +12% to a peer GPU (the source digest is a kernel of this
    # process on the stage's GPU) and +65% to pinned host (the CPU digest of every 31 MiB layer), against
    # +0.8-1.4% unchecked - hence "remote". A request may always ask for checksums (checksum=True).
    checksums: str = "remote"
    staging_bytes: int = 16 * MiB  # one staging buffer (per lane and device) = the chunk size of local copies
    staging_lanes: int = 3  # staging buffers / streams per device: chunk i+1 gathers while chunk i copies
    tcp_chunk_bytes: int = 8 * MiB  # chunk size of transfers over ZeroMQ
    window: int = 4  # chunks of one remote transfer in flight before waiting for an ack
    copy_threads: int = 1  # torch intra-op threads for CPU copies: the streamer shares the host with stages,
    # and waking a thread team costs milliseconds on a busy host (measured: 256 KiB copies 1000x slower)
    # Threads that gather and scatter the frames of transfers to and from peer streamers in host memory: chunks
    # of a transfer in flight (up to `window`) are copied in parallel, one thread each. One thread scattered
    # 8 MiB chunks into a replica pool at ~3.4 GB/s on an H200 host, under the ZeroMQ link's ~4.5 GB/s.
    frame_threads: int = 4
    # Python's switch interval in the streamer process (sys.setswitchinterval): how long a thread that wants the
    # interpreter lock waits before the holder is made to drop it. At Python's default of 5 ms a waiter thread's
    # completion queues behind a busy event loop: a stream of prompt layers to a peer GPU ran 139 GB/s with
    # waiter-thread completions at 5 ms, 188 GB/s at 0.1-0.5 ms (2xH200, probe-dma-2xh200-2026-11-27-s6.json).
    # A same-machine A/B of two streamer processes (probe-remote-2xh200-2026-11-27-s7.json) showed no change on
    # NCCL or frame streams either way.
    switch_interval_us: float = 200.0
    nccl: bool = True  # use NCCL for remote GPU pool -> GPU pool when CuPy/NCCL are present
    # How a layered transfer from a GPU stage pool waits for layer l to be computed, once LayerReady came:
    # "host" = a waiter thread synchronises on the stage's interprocess event, then the copy is issued with
    # nothing left to wait for; "device" = the copy stream waits on the event (no host time, but a wait of this
    # process sits on the stage's GPU while the stage computes). Measured on 4xH100 (streamer-4xh100-2026-11-27-s5.json,
    # in git history at cb7eb45): a stage's prompt pass slowed by +1.6-3.1% with "host" against
    # +8.3-9.0% with "device", hence the default.
    layer_wait: str = "host"
    # True: DMA-only copies (pool to pool 2-D blocks, no checksum, device or pinned memory on both ends) are
    # enqueued by the event loop's thread itself instead of the GPU thread (those calls never block): no hop to
    # the GPU thread and back, which cost 55 us each way and ~230 us of a 330 us prompt-layer transfer to a peer
    # GPU (2xH200, probe-dma-2xh200-2026-11-27.json and -s6.json, in git history at cb7eb45).
    inline_dma: bool = True
    # The loop polls for a local copy's completion for up to this long when the copy alone should take at most a
    # quarter of it (at a conservative rate for its path; GpuMover.spin_for), before parking the wait on a waiter
    # thread; 0 = never poll. A stream of 31 MiB prompt layers to a peer GPU: 336 GB/s polled vs 139 GB/s with
    # waiter threads (2xH200, probe-dma-2xh200-2026-11-27-s6.json, in git history at cb7eb45). Polling costs this process's
    # loop thread (one core) while it lasts, between its other work.
    completion_spin_us: float = 1000.0
    # Deadlines, seconds. Each error names the setting that governs it.
    transfer_timeout_s: float = 60.0  # whole transfer, unless the request gives deadline_s
    peer_timeout_s: float = 3.0  # longest silence from a peer streamer while it owes an answer
    layer_timeout_s: float = 30.0  # longest wait for the next LayerReady of a layered transfer
    nccl_init_timeout_s: float = 30.0
    heartbeat_interval_s: float = 1.0
    shutdown_timeout_s: float = 5.0
    # Where peers are (more can come with PeerInfo messages).
    peers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    supervisor_address: str = ""  # "" = standalone (tests, benchmarks)
    supervisor_pid: int | None = None  # the child dies with this process (set by the supervisor)
    log_level: str = "INFO"  # when started by the supervisor (standalone: the command line's)
    supervisor_name: str = "supervisor"  # the process supervising it (its host agent, "agent-<slot>")
    index: int = 0  # its host's slot: status() lists it as streamer <index>
    host_id: str = ""  # the host it serves, as status() names it ("" = the machine's host name)
    keys_dir: str = ""  # the deployment's keys (bus/security.py): CURVE on both sockets; "" = plaintext
    max_message_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"streamer name must be non-empty without '/', got {self.name!r}")
        for what, addr in (("control_address", self.control_address), ("data_address", self.data_address)):
            if "://" not in addr:
                raise ValueError(f"{what} must be a ZeroMQ endpoint such as tcp://127.0.0.1:0, got {addr!r}")
        if self.control_address == self.data_address and not self.control_address.endswith(":0"):
            raise ValueError("control_address and data_address must differ")
        for what in ("swap_bytes", "replica_bytes", "receive_bytes", "disk_bytes", "incarnation"):
            if getattr(self, what) < 0:
                raise ValueError(f"{what} must be >= 0, got {getattr(self, what)}")
        if self.disk_bytes and not self.disk_dir:
            raise ValueError("disk_bytes > 0 needs disk_dir (where the memory-mapped pool files go)")
        if self.staging_bytes < 64 * 1024:
            raise ValueError(f"staging_bytes must be >= 64 KiB, got {self.staging_bytes}")
        if not 1 <= self.staging_lanes <= 8:
            raise ValueError(f"staging_lanes must be in [1, 8], got {self.staging_lanes}")
        if self.tcp_chunk_bytes < 4096:
            raise ValueError(f"tcp_chunk_bytes must be >= 4096, got {self.tcp_chunk_bytes}")
        if self.tcp_chunk_bytes > self.max_message_bytes:
            raise ValueError("tcp_chunk_bytes must not exceed max_message_bytes")
        if not 0 <= self.completion_spin_us <= 100_000:
            raise ValueError(f"completion_spin_us must be in [0, 100000], got {self.completion_spin_us}")
        if self.checksums not in CHECKSUM_POLICIES:
            raise ValueError(f"checksums must be one of {CHECKSUM_POLICIES}, got {self.checksums!r}")
        if self.layer_wait not in ("device", "host"):
            raise ValueError(f"layer_wait must be 'device' or 'host', got {self.layer_wait!r}")
        if self.copy_threads < 1:
            raise ValueError(f"copy_threads must be >= 1, got {self.copy_threads}")
        if not 1 <= self.frame_threads <= 64:
            raise ValueError(f"frame_threads must be in [1, 64], got {self.frame_threads}")
        if not 10 <= self.switch_interval_us <= 100_000:
            raise ValueError(f"switch_interval_us must be in [10, 100000], got {self.switch_interval_us}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        for what in ("transfer_timeout_s", "peer_timeout_s", "layer_timeout_s", "nccl_init_timeout_s",
                     "heartbeat_interval_s", "shutdown_timeout_s"):
            if not getattr(self, what) > 0:
                raise ValueError(f"{what} must be > 0, got {getattr(self, what)}")
        names = [n for n, _ in self.peers]
        if len(set(names)) != len(names) or self.name in names:
            raise ValueError(f"peers must have distinct names other than this streamer's: {names}")
