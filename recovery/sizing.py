"""Memory-sized microbatches (`dejavu-serve --microbatch-size auto`, issue 20): how many KV slots fit on each
stage's device, and the deployment's choice, the smallest stage's figure.

A stage's budget is what its device has free less the safety margin, (1 - --gpu-memory-fraction) of the
device's total memory: budget = free - (1 - f) x total, so memory other processes hold counts against it.
Within the budget go the stage's weights, the largest step's activations (a microbatch of whole prompts, or of
--prefill-chunk chunks; the last stage's logits and sampling), its CUDA graphs (decode steps: their working set
and static buffers) and its KV pool: slots x KV per slot (its layers x --max-seq-len tokens). The figures are
estimates from the model's shapes, the planner's memory model (recovery/planner.py), made by dejavu-serve before
any process starts: every stage, and every restart of one, allocates the same pool, and the controller's
scheduler knows its slots from the start.

Device memory: CUDA - measured by a short probe process (torch.cuda.mem_get_info on each stage's GPU, stage i on
cuda:i, as the supervisor places them; the probe's CUDA context is not counted as free, nor will the stage's
be); CPU - the host's RAM (/proc/meminfo: MemTotal, MemAvailable), shared equally by the stages, and there
`auto` is 8 per microbatch (the fixed default before issue 20) unless less fits. DEJAVU_DEVICE_MEMORY
overrides the measurement (tests; `dejavu-bench swap --off-slots` emulating a smaller device): "TOTAL[/FREE]" for
every device, or a comma-separated list, one per stage; sizes in bytes or with K, M, G, T (KiB...). GPUs still
time their copies for --swap auto where it needs them.

Torch-free: the supervisor imports it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from recovery.planner import ModelFacts, activation_bytes, largest, model_facts
from recovery.preflight import DTYPE_BYTES, UsageError
from recovery.specs import DeploymentConfig, StagePlan
from stages.models.spec import ModelSpec
from stages.swap_policy import RESIDENT_FRAMES, SwapDecision, decide_swap, settled

AUTO = 0  # DeploymentConfig.microbatch_size: memory-sized
CPU_AUTO_MAX = 8  # CPU: today's default, unless less fits (a CPU step is compute-bound long before)
GPU_AUTO_MAX = 256  # beyond, a step's host work and the scheduler's grow with no gain on one GPU
# cuBLAS/cuDNN workspaces and the caching allocator's rounding: at its largest step an OPT-1.3B-shaped stage sized
# by auto held 1.5 GiB beyond its plan on an H100 (2026-12-07, tests/recovery/test_sizing_gpu.py; 256 MiB before)
CUDA_RESERVE = 1536 << 20
# the host streamer's CUDA context on each GPU whose pools it serves: 730 MiB on an H100 (CUDA 13), the same run;
# the probe that measures free memory holds a context like the stage's, so the stage's own is counted already
STREAMER_CONTEXT = 768 << 20
GRAPH_OVERHEAD = 1 << 20  # per captured decode graph: its executable and its buffers' rounding
GRAPH_BUCKET = 256  # stages/runtime.py ShardConfig.graph_bucket: keys read up to a multiple of this
SAMPLING_BYTES = 24  # per logit of the last stage's sampling: float32 copy, sorted values, int64 order, probs
ENV = "DEJAVU_DEVICE_MEMORY"
GiB = float(1 << 30)


def amount(n: float) -> str:
    """Bytes in the unit that keeps 3 significant figures: '13.50 GiB', '6.0 MiB', '512 B' (an emulated CPU budget
    of a few MiB printed as GiB read 0.00)."""
    for unit, size in (("GiB", GiB), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


class MemoryBudgetError(UsageError):
    """The model or the asked-for pool does not fit the devices' memory; the message says what to change."""


@dataclass(frozen=True)
class DeviceMemory:
    device: str
    total: int
    free: int
    shared_by: int = 1  # stages computing in this memory (CPU: every stage on the host's RAM)


@dataclass(frozen=True)
class StageSizing:
    """One stage's memory split at the deployment's microbatch size (bytes; status() reports it)."""

    stage: int
    device: str
    total: int  # the device's memory (CPU: the host's RAM)
    free: int  # free when measured
    margin: int  # (1 - fraction) x total, kept free
    budget: int  # free - margin (CPU: its share)
    weights: int
    activations: int
    graphs: int
    kv_per_slot: int
    slots: int  # its KV pool's slots at the chosen size
    fits: int  # the largest microbatch size this stage alone could take (0: not one)
    fraction: float

    @property
    def used(self) -> int:
        return self.weights + self.activations + self.graphs + self.slots * self.kv_per_slot

    def line(self) -> str:
        return (f"stage {self.stage} on {self.device}: budget {amount(self.budget)} = free {amount(self.free)} - "
                f"margin {amount(self.margin)} ({1 - self.fraction:.2g} of {amount(self.total)}); uses weights "
                f"{amount(self.weights)} + activations {amount(self.activations)} + graphs {amount(self.graphs)} + "
                f"KV {self.slots} slots x {amount(self.kv_per_slot)} = {amount(self.used)}; fits {self.fits} per "
                f"microbatch")


@dataclass(frozen=True)
class Sizing:
    microbatch_size: int
    auto: bool
    how: str  # one line: what was chosen and why
    stages: tuple[StageSizing, ...]
    warnings: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"microbatch_size": self.microbatch_size, "how": self.how,
                           "stages": [asdict(s) for s in self.stages]})

    def lines(self) -> list[str]:
        return [s.line() for s in self.stages] + [self.how]


# ---------------------------------------------------------------- device memory


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if m is None:
        raise MemoryBudgetError(f"{ENV}: cannot read {text!r} as a size (bytes, or with K, M, G or T)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def from_env(value: str, devices: Sequence[str], shared: bool) -> list[DeviceMemory]:
    """DEJAVU_DEVICE_MEMORY: "TOTAL[/FREE]" for every device, or one per device, comma-separated."""
    items = [v for v in value.split(",") if v.strip()]
    out = []
    for i, device in enumerate(devices):
        total_s, _, free_s = items[min(i, len(items) - 1)].partition("/")
        total = parse_bytes(total_s)
        out.append(DeviceMemory(device, total, parse_bytes(free_s) if free_s else total,
                                len(devices) if shared else 1))
    return out


def host_memory() -> tuple[int, int]:
    """(MemTotal, MemAvailable) of this machine, bytes."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, info.get("MemAvailable", total)


PROBE = ("import json, sys, time, torch\n"
         "mem = [torch.cuda.mem_get_info(i) for i in range(int(sys.argv[1]))]\n"
         "bw = None\n"
         "if sys.argv[2] == '1':  # --swap auto's figures on cuda:0: pinned host -> device and device copies, best of 3\n"
         "    def rate(src, dst, n):\n"
         "        best = 1e9\n"
         "        for _ in range(3):\n"
         "            t = time.perf_counter(); dst.copy_(src, non_blocking=True); torch.cuda.synchronize(0)\n"
         "            best = min(best, time.perf_counter() - t)\n"
         "        return n / best\n"
         "    h = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)\n"
         "    d = torch.empty(256 << 20, dtype=torch.uint8, device='cuda:0')\n"
         "    bw = [rate(h, d[: 64 << 20], 64 << 20), 2 * rate(d, torch.empty_like(d), 256 << 20)]\n"
         "print(json.dumps({'mem': mem, 'bw': bw}))")


@dataclass(frozen=True)
class SwapFigures:
    """What --swap auto predicts with: host -> device bandwidth (pinned) and device memory bandwidth, B/s."""

    h2d_bps: float
    device_bps: float


def probe_gpus(count: int, timeout: float = 120.0,
               bandwidth: bool = False) -> tuple[list[tuple[int, int]], SwapFigures | None]:
    """(free, total) of cuda:0 .. cuda:count-1 (and, asked, cuda:0's copy bandwidths), from a process of its own
    (this one stays torch-free). The bandwidth probe adds ~0.3 s and 320 MiB for a moment."""
    try:
        out = subprocess.run([sys.executable, "-c", PROBE, str(count), "1" if bandwidth else "0"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MemoryBudgetError(f"cannot measure GPU memory: {e}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise MemoryBudgetError(f"cannot measure GPU memory ({last}); give --microbatch-size N")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    bw = got.get("bw")
    return [(int(f), int(t)) for f, t in got["mem"]], SwapFigures(*bw) if bw else None


def auto_may_swap(cfg: DeploymentConfig) -> bool:
    """--swap auto with something to decide: GPUs, a streamer, more microbatches than the resident frames."""
    return cfg.swap_mode == "auto" and cfg.device != "cpu" and cfg.microbatches > RESIDENT_FRAMES


def wants_swap_figures(cfg: DeploymentConfig) -> bool:
    """--swap auto may turn on here, and the flags do not give both figures: the probe measures them."""
    return auto_may_swap(cfg) and not (cfg.swap_bandwidth and cfg.swap_step_ms)


def measure(cfg: DeploymentConfig) -> list[DeviceMemory]:
    """Each stage's device memory, stage i first (CPU: the host's RAM, shared by all stages)."""
    return measure_all(cfg)[0]


def measure_all(cfg: DeploymentConfig) -> tuple[list[DeviceMemory], SwapFigures | None]:
    """measure(), and on GPUs --swap auto's figures when it needs them (None where not measured)."""
    n, cpu = cfg.num_stages, cfg.device == "cpu"
    devices = ["cpu"] * n if cpu else [f"cuda:{i}" for i in range(n)]
    if os.environ.get(ENV):  # the memory is given (tests; a benchmark emulating a smaller device) - the copy
        given = from_env(os.environ[ENV], devices, cpu)  # bandwidths --swap auto predicts with are still the GPU's
        if cpu or not wants_swap_figures(cfg):
            return given, None
        try:
            return given, probe_gpus(n, bandwidth=True)[1]
        except MemoryBudgetError:  # no GPU to time here: auto says it has no figure (or give --swap-bandwidth)
            return given, None
    if cpu:
        total, free = host_memory()
        return [DeviceMemory("cpu", total, free, n) for _ in devices], None
    probed, figures = probe_gpus(n, bandwidth=wants_swap_figures(cfg))
    return [DeviceMemory(d, total, free) for d, (free, total) in zip(devices, probed)], figures


# ---------------------------------------------------------------- the memory model


@dataclass(frozen=True)
class StageModel:
    """A stage's bytes as functions of the microbatch size b (the planner's facts; estimates)."""

    cfg: DeploymentConfig
    facts: ModelFacts
    plan: StagePlan
    index: int
    cuda: bool

    @property
    def layers(self) -> int:
        return self.plan.layers[1] - self.plan.layers[0]

    @property
    def first(self) -> bool:
        return self.index == self.plan.first

    @property
    def last(self) -> bool:
        return self.index == self.plan.last

    def weights(self) -> int:
        f = self.facts
        return self.layers * f.layer_bytes + f.embed_bytes * self.first + f.head_bytes * self.last

    def kv_per_slot(self) -> int:
        return self.layers * self.cfg.max_seq_len * self.facts.kv_bytes_per_token_layer

    def batch(self, b: int) -> int:
        """Sequences in one step."""
        return self.cfg.prompt_microbatch_size or b if self.plan.pipeline == "prompt" else b

    def slots(self, b: int) -> int:
        """Its KV pool's slots: every microbatch's - or, with `--swap on`, only the resident frames' (the others
        wait in the host streamer's swap pool, in host memory: stages/swap.py)."""
        if self.plan.pipeline == "prompt":
            return self.cfg.prompt_microbatches * self.batch(b)
        return self.resident_microbatches * b

    @property
    def resident_microbatches(self) -> int:
        m = self.cfg.microbatches
        return min(m, RESIDENT_FRAMES) if self.cfg.swap == "on" else m

    def activations(self, b: int) -> int:
        """The largest step: every sequence of the microbatch feeds a whole prompt (or a --prefill-chunk chunk),
        up to --max-seq-len tokens (a recomputation after a failure feeds all its tokens): the layers' working
        set, the attention mask, the last stage's logits and sampling; rotary tables; CUDA workspaces."""
        f, cfg = self.facts, self.cfg
        rows, chunk = self.batch(b), min(cfg.prefill_chunk or cfg.max_seq_len, cfg.max_seq_len)
        tokens = rows * chunk
        out = activation_bytes(f, tokens) + tokens * cfg.max_seq_len + 2 * cfg.max_seq_len * f.head_dim * 4
        if self.last:
            out += rows * f.vocab * (DTYPE_BYTES[f.dtype] + SAMPLING_BYTES)
        return out + (CUDA_RESERVE + (STREAMER_CONTEXT if cfg.streamer else 0) if self.cuda else 0)

    def graphs(self, b: int) -> int:
        """Decode graphs (stages/graphs.py), captured lazily per microbatch range and key bucket, and padded
        batches: one decode step's working set (keys gathered for a padded batch) in their shared pool, and each
        graph's static buffers."""
        cfg, f = self.cfg, self.facts
        if not (self.cuda and cfg.cuda_graphs and self.plan.pipeline != "prompt"):
            return 0
        slots = self.slots(b)
        rows = min(slots, 1 << max(0, b - 1).bit_length())  # a padded batch: the next power of two
        buckets = math.ceil(cfg.max_seq_len / GRAPH_BUCKET)
        graphs = (self.resident_microbatches + rows.bit_length()) * buckets
        out_row = (f.vocab if self.last else f.hidden) * DTYPE_BYTES[f.dtype]
        step = activation_bytes(f, rows) + rows * cfg.max_seq_len * (f.kv_bytes_per_token_layer + 1)
        return step + graphs * (GRAPH_OVERHEAD + rows * (out_row + f.hidden * DTYPE_BYTES[f.dtype] + 24))

    def need(self, b: int) -> int:
        return self.weights() + self.activations(b) + self.graphs(b) + self.slots(b) * self.kv_per_slot()


def stage_models(cfg: DeploymentConfig, spec: ModelSpec) -> list[StageModel]:
    """Every stage's memory model, stage 0 first, as cfg splits the layers."""
    facts = model_facts(spec, cfg.dtype)
    cuda = cfg.device != "cpu"
    return [StageModel(cfg, facts, p, i, cuda) for i, p in enumerate(cfg.stage_plan(spec.num_layers))]


def budget(mem: DeviceMemory, fraction: float) -> tuple[int, int]:
    """(margin, budget) of one stage on `mem`."""
    margin = int(round((1 - fraction) * mem.total))
    return margin, max(0, mem.free - margin) // mem.shared_by


def check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise MemoryBudgetError(f"--gpu-memory-fraction {fraction}: give a fraction in (0, 1] of each device's "
                                "memory (default 0.9)")


def size_deployment(cfg: DeploymentConfig, spec: ModelSpec, memories: Sequence[DeviceMemory],
                    chosen_by: str = "--microbatch-size") -> Sizing:
    """Every stage's split and the deployment's microbatch size: cfg's (explicit; chosen_by says who chose it), or
    the smallest stage's figure (cfg.microbatch_size == AUTO). Raises MemoryBudgetError for what cannot fit."""
    fraction = cfg.gpu_memory_fraction
    check_fraction(fraction)
    cuda = cfg.device != "cpu"
    models = stage_models(cfg, spec)
    if len(memories) != len(models):
        raise ValueError(f"{len(memories)} device memories for {len(models)} stages")
    auto = cfg.microbatch_size == AUTO
    cap = GPU_AUTO_MAX if cuda else CPU_AUTO_MAX
    figures = []
    for m, mem in zip(models, memories):
        margin, room = budget(mem, fraction)
        fits = largest(lambda b, m=m, room=room: m.need(b) <= room, cap)  # type: ignore[misc]
        figures.append((margin, room, fits))
        if not auto:
            continue
        where = f"stage {m.index} (layers {m.plan.layers[0]}-{m.plan.layers[1] - 1}) on {mem.device}"
        room_s = (f"its budget is {room / GiB:.2f} GiB (free {mem.free / GiB:.2f} GiB less the margin "
                  f"{margin / GiB:.2f} GiB, 1 - --gpu-memory-fraction {fraction:g} of {mem.total / GiB:.2f} GiB"
                  f"{f', shared by {mem.shared_by} stages' if mem.shared_by > 1 else ''})")
        if m.weights() > room:
            raise MemoryBudgetError(
                f"the model does not fit: {where} holds {m.weights() / GiB:.2f} GiB of weights and {room_s}; use more "
                f"stages, a smaller --dtype, or a larger --gpu-memory-fraction")
        if fits == 0:
            raise MemoryBudgetError(
                f"not even one KV slot fits: {where} needs {m.need(1) / GiB:.2f} GiB for microbatches of one "
                f"sequence (weights {m.weights() / GiB:.2f}, activations {m.activations(1) / GiB:.2f}, graphs "
                f"{m.graphs(1) / GiB:.2f}, KV {m.slots(1)} x {m.kv_per_slot() / 2**20:.1f} MiB at --max-seq-len "
                f"{cfg.max_seq_len}) and {room_s}; lower --max-seq-len, --microbatches or --prefill-chunk, or use "
                "more stages")
    warnings: list[str] = []
    resident = models[0].resident_microbatches if models else cfg.microbatches
    swapped = (f" ({resident} microbatches resident on each stage's device, the rest in its host's swap pool: "
               "--swap on)") if resident < cfg.microbatches else ""
    if auto:
        size = min(f for _, _, f in figures)
        small = min(range(len(models)), key=lambda i: (figures[i][2], i))
        limit = (f"the cap{' on CPU' if not cuda else ''}: every stage holds at least {cap}" if size == cap else
                 f"the smallest stage's figure: stage {small} on {memories[small].device}")
        how = (f"microbatch size {size} (auto, {limit}; --gpu-memory-fraction {fraction:g}): "
               f"{cfg.microbatches} microbatch(es) x {size} = {cfg.microbatches * size} slots{swapped}")
    else:
        size = cfg.microbatch_size
        how = (f"microbatch size {size} ({chosen_by}): {cfg.microbatches} microbatch(es) x {size} = "
               f"{cfg.microbatches * size} slots{swapped}")
        for m, mem, (_, room, fits) in zip(models, memories, figures):
            if not cuda:
                break  # on CPU an explicit size is taken as it is (a pool beyond /dev/shm is a warning of its own)
            pool = m.weights() + m.slots(size) * m.kv_per_slot()
            if pool > mem.free:
                raise MemoryBudgetError(
                    f"--microbatch-size {size} does not fit: stage {m.index} on {mem.device} needs "
                    f"{pool / GiB:.2f} GiB for its weights and its KV pool alone ({m.slots(size)} slots x "
                    f"{m.kv_per_slot() / 2**20:.1f} MiB at --max-seq-len {cfg.max_seq_len}) and the GPU has "
                    f"{mem.free / GiB:.2f} GiB free; at most {fits} per microbatch fit there "
                    "(--microbatch-size auto chooses it)")
            if m.need(size) > room:
                warnings.append(
                    f"--microbatch-size {size}: stage {m.index} on {mem.device} may run out of memory: it needs "
                    f"{m.need(size) / GiB:.2f} GiB with its largest step's activations and its CUDA graphs "
                    f"(estimated), over its budget of {room / GiB:.2f} GiB (--gpu-memory-fraction {fraction:g}); "
                    f"{fits} per microbatch fit it")
    stages = tuple(
        StageSizing(m.index, mem.device, mem.total, mem.free, margin, room, m.weights(), m.activations(size),
                    m.graphs(size), m.kv_per_slot(), m.slots(size), fits, fraction)
        for m, mem, (margin, room, fits) in zip(models, memories, figures))
    return Sizing(size, auto, how, stages, tuple(warnings))


def resolve(cfg: DeploymentConfig, spec: ModelSpec,
            memories: Sequence[DeviceMemory] | None = None) -> tuple[DeploymentConfig, Sizing]:
    """cfg with its microbatch size fixed (auto resolved), its memory plan (cfg.memory_plan, JSON) and its layer
    split's head weight (cfg.head_layers: the LM head's bytes over a layer's) set."""
    check_fraction(cfg.gpu_memory_fraction)
    cfg = with_head(cfg, spec)
    if memories is None and cfg.hosts == 0:  # every stage runs on other machines: nothing here to measure
        if cfg.microbatch_size == AUTO and cfg.device != "cpu":
            raise MemoryBudgetError("--microbatch-size auto measures the GPUs of this machine, and with --hosts 0 "
                                    "every stage runs on other machines: give --microbatch-size N")
        size = cfg.microbatch_size or CPU_AUTO_MAX
        how = "auto: 8 on CPU" if cfg.microbatch_size == AUTO else "--microbatch-size"
        sizing = Sizing(size, cfg.microbatch_size == AUTO, f"microbatch size {size} ({how}; the stages run on other "
                        "machines, whose memory is not measured)", ())
    else:
        figures = None
        if memories is None:
            memories, figures = measure_all(cfg)
        cfg, sizing = size_with_swap(cfg, spec, memories, figures)
    split = layer_split_line(cfg, spec)
    if split:
        sizing = replace(sizing, how=f"{sizing.how}; {split}")
    return replace(cfg, microbatch_size=sizing.microbatch_size, memory_plan=sizing.to_json()), sizing


def with_head(cfg: DeploymentConfig, spec: ModelSpec) -> DeploymentConfig:
    """cfg.head_layers from the model: what a decode step reads of the last stage's final norm and LM head, in
    layers (ModelFacts.head_bytes / layer_bytes; --layer-split balanced splits by it)."""
    return replace(cfg, head_layers=model_facts(spec, cfg.dtype).head_layers)


def layer_split_line(cfg: DeploymentConfig, spec: ModelSpec) -> str:
    """The balanced split where it differs from the even one (else ""), e.g. "layers by stage 0-8 | 9-11
    (--layer-split balanced: the LM head weighs 5.45 layers; even would be 0-5 | 6-11)"."""
    plans = [p for p in cfg.stage_plan(spec.num_layers) if p.pipeline != "prompt"]
    even = [p for p in replace(cfg, layer_split="even").stage_plan(spec.num_layers) if p.pipeline != "prompt"]
    if [p.layers for p in plans] == [p.layers for p in even]:
        return ""
    ranges = " | ".join(f"{a}-{b - 1}" for a, b in (p.layers for p in plans))
    return (f"layers by {'token ' if cfg.disaggregated else ''}stage {ranges} (--layer-split balanced: the LM head "
            f"weighs {cfg.head_layers:.3g} layers; even would be {' | '.join(f'{a}-{b - 1}' for a, b in (p.layers for p in even))})")


def size_with_swap(cfg: DeploymentConfig, spec: ModelSpec, memories: Sequence[DeviceMemory],
                   figures: SwapFigures | None) -> tuple[DeploymentConfig, Sizing]:
    """size_deployment, with `--swap auto` decided here where it may turn on (GPUs, 3+ microbatches, a streamer):
    sized with every microbatch resident and with 2 (the rest in the hosts' swap pools), it is on when fewer
    microbatches than configured fit the device at the size swapping allows and a swap-in of one microbatch
    (its KV at --max-seq-len on the heaviest swapping stage / the host -> device bandwidth) is predicted under a
    decode step (that stage's weights / the device's bandwidth): the paper's rule, stages/swap_policy.py. The
    figures: --swap-bandwidth / --swap-step-ms, else the GPU probe's. cfg comes back with swap_settled set."""
    if not auto_may_swap(cfg):
        return cfg, size_deployment(cfg, spec, memories)
    try:
        off: Sizing | None = size_deployment(replace(cfg, swap="off"), spec, memories)
        off_error = None
    except MemoryBudgetError as e:
        off, off_error = None, e
    try:
        on: Sizing | None = size_deployment(replace(cfg, swap="on"), spec, memories)
    except MemoryBudgetError:
        on = None
    if on is None:  # nothing fits even with 2 resident: off's answer (or its error) stands
        if off is None:
            assert off_error is not None
            raise off_error
        return cfg, off
    swapping = [m for m in stage_models(cfg, spec) if m.plan.pipeline != "prompt"]  # (GPUs: auto_may_swap)
    heavy = max(swapping, key=lambda m: m.kv_per_slot())
    bw = cfg.swap_bandwidth * 1e9 or (figures.h2d_bps if figures else 0.0)
    step_s = cfg.swap_step_ms / 1e3 or (max(m.weights() for m in swapping) / figures.device_bps if figures else 0.0)
    largest_on, on = on.microbatch_size, capped(cfg, spec, memories, on, heavy.kv_per_slot(), bw, step_s)
    size, mbs = on.microbatch_size, cfg.microbatches
    held = min(s.fits for s in off.stages if s.stage >= (cfg.prompt_stages if cfg.disaggregated else 0)) \
        if off is not None else 0
    fit = held * mbs // size  # microbatches of swapping's size the device holds all at once
    decision = decide_swap("auto", mbs, fit, heavy.kv_per_slot() * size, bw, step_s)
    if size < largest_on and not decision.on and fit >= mbs:  # capped down to what off holds already
        decision = SwapDecision(False, (
            f"auto: a swap-in fits under a decode step ({step_s * 1e3:.3g} ms at {bw / 1e9:.3g} GB/s) only up to "
            f"{size} per microbatch, and all {mbs} microbatches hold {held} each without swapping (swapping's 2 "
            f"frames would hold {largest_on})"), "auto")
    if not decision.on and off is None:
        assert off_error is not None
        raise MemoryBudgetError(f"{off_error}; swapping would not pay here ({decision.reason})")
    chosen = on if decision.on else off
    assert chosen is not None
    chosen = replace(chosen, how=f"{chosen.how}; --swap {decision.reason}")
    return replace(cfg, swap_settled=decision.reason, swap_settled_on=decision.on), chosen


def capped(cfg: DeploymentConfig, spec: ModelSpec, memories: Sequence[DeviceMemory], on: Sizing, kv_per_slot: int,
           bw: float, step_s: float) -> Sizing:
    """`on` (swapping's sizing, as large as its 2 resident frames allow), or - with a memory-sized microbatch whose
    swap-in (kv_per_slot x size / bw) would not fit under a decode step (step_s) - the largest microbatch whose
    swap-in does: a swapping stage waits for a swap-in longer than a step at every step, while one a little smaller
    than the memory allows still beats keeping every microbatch resident wherever it exceeds off's size."""
    if cfg.microbatch_size != AUTO or bw <= 0 or step_s <= 0 or kv_per_slot <= 0:
        return on
    cap = math.ceil(step_s * bw / kv_per_slot) - 1  # swap-in strictly under the step, as decide_swap asks
    if not 0 < cap < on.microbatch_size:
        return on
    sized = size_deployment(replace(cfg, swap="on", microbatch_size=cap), spec, memories, chosen_by=(
        f"auto, swapping: the largest whose swap-in fits under a decode step; the memory holds {on.microbatch_size}; "
        f"--gpu-memory-fraction {cfg.gpu_memory_fraction:g}"))
    return replace(sized, auto=True)


def planned_swap(cfg: DeploymentConfig) -> SwapDecision | None:
    """`--swap` as far as it is decided before any stage starts: `auto` as resolve settled it with figures
    (size_with_swap), or where none are needed (stages/swap_policy.py settled: `off`, 2 microbatches or fewer, CPU);
    None for `on` and where each stage decides at its start (stages on other machines, whose memory is not measured
    here). The supervisor gives hosts swap space only where swapping may run: a GPU host's streamer page-locks its
    arenas whole at start (13.4 GB took 9 s on an H100 VM)."""
    if cfg.swap_mode == "on":
        return None
    if cfg.swap_mode == "auto" and cfg.swap_settled:
        return SwapDecision(cfg.swap_settled_on, cfg.swap_settled, "auto")
    return settled(cfg.swap_mode, cfg.microbatches, None if cfg.device == "cpu" else 0)
