"""Memory-sized slots (issue 20, recovery/sizing.py): `--microbatch-size auto` picks the most slots that every
stage's (fake) device memory holds, the deployment takes the smallest stage's figure, impossible settings are
refused with one clear line, and a real CPU deployment sized by auto serves exactly (HF greedy) and shows its
choice and memory split in status()."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import pytest

from recovery.sizing import (
    AUTO,
    CPU_AUTO_MAX,
    GPU_AUTO_MAX,
    DeviceMemory,
    MemoryBudgetError,
    StageModel,
    SwapFigures,
    from_env,
    planned_swap,
    resolve,
    size_deployment,
    size_with_swap,
)
from recovery.specs import DeploymentConfig
from stages.models.spec import read_spec

GiB = 1 << 30


def gpu(total: float, free: float | None = None, i: int = 0) -> DeviceMemory:
    return DeviceMemory(f"cuda:{i}", int(total * GiB), int((total if free is None else free) * GiB))


def models(cfg: DeploymentConfig, spec) -> list[StageModel]:  # type: ignore[no-untyped-def]
    from recovery.planner import model_facts

    facts = model_facts(spec, cfg.dtype)
    return [StageModel(cfg, facts, p, i, cfg.device != "cpu") for i, p in enumerate(cfg.stage_plan(spec.num_layers))]


def check_split(sizing, cfg: DeploymentConfig) -> None:  # type: ignore[no-untyped-def]
    for s in sizing.stages:
        assert s.slots == cfg.microbatches * sizing.microbatch_size
        assert s.weights + s.activations + s.graphs + s.slots * s.kv_per_slot == s.used <= s.budget
        assert s.budget == (s.free - s.margin) // (cfg.num_stages if cfg.device == "cpu" else 1)
        assert s.margin == round((1 - cfg.gpu_memory_fraction) * s.total)


@pytest.fixture(scope="module")
def tiny(model_factory):  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    return path, read_spec(path)


@pytest.mark.parametrize("stages", [1, 2])
def test_auto_takes_the_most_slots_the_budget_holds(tiny, stages: int) -> None:  # type: ignore[no-untyped-def]
    path, spec = tiny
    cfg = DeploymentConfig(str(path), num_stages=stages, device="cuda", microbatch_size=0, max_seq_len=1024)
    # a budget between what 20 and 21 per microbatch need on the heaviest stage
    heaviest = max(models(cfg, spec), key=lambda m: m.need(20))
    room = (heaviest.need(20) + heaviest.need(21)) // 2
    total = math.ceil(room / 0.9) + 1
    memories = [DeviceMemory(f"cuda:{i}", total, total) for i in range(stages)]
    sizing = size_deployment(cfg, spec, memories)
    assert sizing.microbatch_size == 20 and sizing.auto
    assert [s.fits for s in sizing.stages if s.stage == heaviest.index] == [20]
    check_split(sizing, replace(cfg, microbatch_size=20))
    resolved, again = resolve(cfg, spec, memories)
    assert resolved.microbatch_size == 20 and resolved.num_slots == 20 * stages and resolved.memory_plan
    assert again.microbatch_size == 20
    # a big GPU: capped; a smaller fraction of it holds fewer
    big = size_deployment(cfg, spec, [gpu(80, i=i) for i in range(stages)])
    assert big.microbatch_size == GPU_AUTO_MAX and "cap" in big.how
    less = size_deployment(replace(cfg, gpu_memory_fraction=0.895), spec, memories)  # ~13 MiB less than 0.9
    assert 1 <= less.microbatch_size < 20


def test_with_swap_on_only_the_resident_microbatches_take_device_memory(tiny) -> None:  # type: ignore[no-untyped-def]
    """--swap on keeps 2 microbatches in a stage's own pool and the others in the host's swap pool: auto sizes
    microbatches for the 2 resident, so 6 microbatches get the figure 2 get without swapping, larger than 6 get
    without it."""
    path, spec = tiny
    base = DeploymentConfig(str(path), num_stages=1, device="cuda", microbatch_size=0, max_seq_len=1024)
    m = models(base, spec)[0]
    total = math.ceil((m.weights() + m.activations(8) + m.graphs(8) + 2 * 20 * m.kv_per_slot()) / 0.9)
    mem = [DeviceMemory("cuda:0", total, total)]
    two = size_deployment(replace(base, num_microbatches=2, swap="off"), spec, mem)
    six = size_deployment(replace(base, num_microbatches=6, swap="off"), spec, mem)
    swapped = size_deployment(replace(base, num_microbatches=6, swap="on"), spec, mem)
    assert swapped.microbatch_size == two.microbatch_size > six.microbatch_size
    assert all(s.slots == 2 * swapped.microbatch_size for s in swapped.stages) and "--swap on" in swapped.how


def test_the_deployment_takes_the_smallest_stages_figure(tiny) -> None:  # type: ignore[no-untyped-def]
    path, spec = tiny
    cfg = DeploymentConfig(str(path), num_stages=2, device="cuda", microbatch_size=0, max_seq_len=1024)
    m = models(cfg, spec)[1]
    # stage 1's GPU is mostly taken by another process: memory in use counts against its budget
    free = round(0.1 * 8 * GiB) + (m.need(12) + m.need(13)) // 2
    memories = [gpu(8), DeviceMemory("cuda:1", 8 * GiB, free)]
    sizing = size_deployment(cfg, spec, memories)
    figures = [s.fits for s in sizing.stages]
    assert sizing.microbatch_size == min(figures) == figures[1] == 12 < figures[0]
    assert "stage 1 on cuda:1" in sizing.how
    check_split(sizing, replace(cfg, microbatch_size=sizing.microbatch_size))


def test_cpu_auto_is_eight_unless_less_fits_the_shared_ram(tiny) -> None:  # type: ignore[no-untyped-def]
    path, spec = tiny
    cfg = DeploymentConfig(str(path), num_stages=2, microbatch_size=0, max_seq_len=256)
    assert size_deployment(cfg, spec, [DeviceMemory("cpu", 64 * GiB, 32 * GiB, 2)] * 2).microbatch_size == CPU_AUTO_MAX
    heaviest = max(models(cfg, spec), key=lambda m: m.need(3))
    total = math.ceil(2 * (heaviest.need(3) + heaviest.need(4)) / 2 / 0.9)  # the RAM is shared by both stages
    sizing = size_deployment(cfg, spec, [DeviceMemory("cpu", total, total, 2)] * 2)
    assert sizing.microbatch_size == 3
    check_split(sizing, replace(cfg, microbatch_size=3))
    # an explicit size on CPU is taken as it is, whatever the memory
    tight = size_deployment(replace(cfg, microbatch_size=16), spec, [DeviceMemory("cpu", total, total, 2)] * 2)
    assert tight.microbatch_size == 16 and not tight.warnings


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_a_fraction_outside_0_1_is_refused(tiny, fraction: float) -> None:  # type: ignore[no-untyped-def]
    path, spec = tiny
    with pytest.raises(ValueError, match=r"--gpu-memory-fraction .*\(0, 1\]"):
        DeploymentConfig(str(path), microbatch_size=0, gpu_memory_fraction=fraction)
    from recovery.sizing import check_fraction

    with pytest.raises(MemoryBudgetError, match=r"--gpu-memory-fraction .*\(0, 1\]"):
        check_fraction(fraction)


def test_a_model_that_does_not_fit_is_refused(tiny) -> None:  # type: ignore[no-untyped-def]
    path, spec = tiny
    cfg = DeploymentConfig(str(path), num_stages=2, device="cuda", microbatch_size=0, max_seq_len=1024)
    weights = max(m.weights() for m in models(cfg, spec))
    with pytest.raises(MemoryBudgetError, match="the model does not fit: stage .* GiB of weights"):
        size_deployment(cfg, spec, [DeviceMemory(f"cuda:{i}", weights, weights) for i in range(2)])
    # the weights fit, but not one slot beside them (a long --max-seq-len)
    m = models(cfg, spec)[0]
    total = math.ceil((m.weights() + m.activations(1)) / 0.9) + (1 << 20)
    with pytest.raises(MemoryBudgetError, match="not even one KV slot fits: stage 0 .*lower --max-seq-len"):
        size_deployment(cfg, spec, [DeviceMemory(f"cuda:{i}", total, total) for i in range(2)])


def test_an_explicit_size_is_kept_and_checked_against_the_gpu(tiny) -> None:  # type: ignore[no-untyped-def]
    path, spec = tiny
    cfg = DeploymentConfig(str(path), device="cuda", microbatch_size=8, max_seq_len=1024)
    fine = size_deployment(cfg, spec, [gpu(8)])
    assert fine.microbatch_size == 8 and not fine.auto and not fine.warnings
    m = models(cfg, spec)[0]
    pool = m.weights() + m.slots(64) * m.kv_per_slot()
    tight = DeviceMemory("cuda:0", 4 * pool, pool // 2)
    with pytest.raises(MemoryBudgetError, match="--microbatch-size 64 does not fit: stage 0 on cuda:0 .* GiB free"):
        size_deployment(replace(cfg, microbatch_size=64), spec, [tight])
    # the pool fits the free memory but not with its activations and graphs within the margin: a warning
    near = DeviceMemory("cuda:0", 4 * pool, pool + (1 << 20))
    warned = size_deployment(replace(cfg, microbatch_size=64), spec, [near])
    assert warned.microbatch_size == 64 and "may run out of memory" in warned.warnings[0]


def test_fake_device_memory_from_the_environment() -> None:
    got = from_env("8G/6GiB,1024M", ["cuda:0", "cuda:1", "cuda:2"], False)
    assert [(d.total, d.free) for d in got] == [(8 * GiB, 6 * GiB), (GiB, GiB), (GiB, GiB)]
    with pytest.raises(MemoryBudgetError, match="DEJAVU_DEVICE_MEMORY"):
        from_env("lots", ["cpu"], True)


def test_the_flags(tiny, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from recovery.serve_cli import main, parser

    assert parser().parse_args([]).microbatch_size == "auto"  # the default
    assert parser().parse_args(["--microbatch-size", "12"]).microbatch_size == 12
    with pytest.raises(SystemExit):
        parser().parse_args(["--microbatch-size", "many"])
    assert "invalid value 'many': give a number >= 1 or auto" in capsys.readouterr().err
    path, _ = tiny
    assert main(["--model", str(path), "--microbatch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dejavu-serve: error: --microbatch-size must be >= 1, or auto"
    for argv, message in ((["--gpu-memory-fraction", "1.5"], "--gpu-memory-fraction 1.5: give a fraction in (0, 1]"),
                          (["--gpu-memory-fraction", "0"], "--gpu-memory-fraction 0.0: give a fraction in (0, 1]")):
        assert main(["--model", str(path), *argv]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setenv("DEJAVU_DEVICE_MEMORY", "64K")  # below the tiny model's weights: refused before any process
    assert main(["--model", str(path), "--stages", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dejavu-serve: error: the model does not fit: stage ")


def test_auto_on_cpu_serves_exactly_and_status_shows_the_split(tiny, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tests.bus.test_serving import hf_greedy, run_all_then_status, workload
    from tests.conftest import start_deployment

    path, spec = tiny
    cfg = DeploymentConfig(str(path), num_stages=2, microbatch_size=0, max_seq_len=96)
    heaviest = max(models(cfg, spec), key=lambda m: m.need(3))
    total = math.ceil((heaviest.need(3) + heaviest.need(4)) / 0.9)  # both stages share it: 3 per microbatch
    monkeypatch.setenv("DEJAVU_DEVICE_MEMORY", str(total))
    work = workload(spec.vocab_size)[:16]
    refs = hf_greedy(path, work)
    dep = start_deployment(path, 2, "--microbatch-size", "auto", "--max-seq-len", "96")
    try:
        results, st = asyncio.run(run_all_then_status(dep.address, work))
        logged = [line for line in dep.logs().splitlines() if "[memory]" in line]
    finally:
        assert dep.stop() == 0
    assert [list(r.token_ids) for r in results] == refs
    assert st["microbatch_size"] == 3 and st["slots"] == 6 and "auto" in st["sizing"]
    assert [m["stage"] for m in st["memory"]] == [0, 1]
    for m in st["memory"]:
        assert m["device"] == "cpu" and m["slots"] == 6 and m["fits"] >= 3 and m["fraction"] == 0.9
        assert m["weights"] > 0 and m["kv_per_slot"] > 0
        assert m["weights"] + m["activations"] + m["graphs"] + m["slots"] * m["kv_per_slot"] <= m["budget"]
    assert min(m["fits"] for m in st["memory"]) == 3
    assert len(logged) == 3 and "stage 0 on cpu" in logged[0] and "stage 1 on cpu" in logged[1]
    assert "microbatch size 3 (auto" in logged[2]
    assert "0.00 GiB" not in logged[0] and " KiB" in logged[0]  # a budget of a few MiB reads in MiB and KiB


def test_stages_on_other_machines_are_not_measured(tiny) -> None:  # type: ignore[no-untyped-def]
    path, spec = tiny
    cpu = DeploymentConfig(str(path), hosts=0, microbatch_size=0)
    assert resolve(cpu, spec)[0].microbatch_size == CPU_AUTO_MAX
    assert resolve(replace(cpu, microbatch_size=5), spec)[0].microbatch_size == 5
    assert resolve(replace(cpu, device="cuda", microbatch_size=5), spec)[0].microbatch_size == 5
    with pytest.raises(MemoryBudgetError, match="with --hosts 0 .* give --microbatch-size N"):
        resolve(replace(cpu, device="cuda"), spec)


def test_a_disaggregated_deployment_is_sized_per_pipeline(tiny) -> None:  # type: ignore[no-untyped-def]
    """A prompt stage's pool holds `prompt stages + 1` passes of the prompt batch (default: the microbatch size),
    a token stage's its microbatches: both must fit at the chosen size."""
    path, spec = tiny
    cfg = DeploymentConfig(str(path), num_stages=2, prompt_stages=1, token_stages=1, device="cuda", microbatch_size=0,
                           max_seq_len=1024)
    from recovery.planner import largest

    stages = models(cfg, spec)
    room = max(m.need(20) for m in stages)
    total = math.ceil(room / 0.9) + 1
    sizing = size_deployment(cfg, spec, [DeviceMemory(f"cuda:{i}", total, total) for i in range(2)])
    budget = sizing.stages[0].budget
    b = min(largest(lambda n, m=m: m.need(n) <= budget, 256) for m in stages)
    assert sizing.microbatch_size == b >= 20 and [s.slots for s in sizing.stages] == [2 * b, b]
    assert sizing.stages[0].graphs == 0 < sizing.stages[1].graphs  # prompt stages capture no decode graphs
    assert all(s.used <= s.budget for s in sizing.stages)


def test_swap_auto_is_settled_before_start_where_no_stage_figures_are_needed(tiny) -> None:  # type: ignore[no-untyped-def]
    """`--swap auto` with a size auto chose holds every microbatch on the device, so it is off before any stage
    starts and the hosts get no swap space (a GPU host's streamer would page-lock it whole at start); with a size
    that does not fit, the stages decide from their figures."""
    path, spec = tiny
    cpu = DeploymentConfig(str(path), num_stages=2, num_microbatches=6, microbatch_size=4)
    d = planned_swap(cpu)
    assert d is not None and not d.on and "CPU stage" in d.reason
    assert planned_swap(replace(cpu, swap="on")) is None
    assert planned_swap(replace(cpu, swap="off")).reason == "--swap off"  # type: ignore[union-attr]
    few = planned_swap(replace(cpu, device="cuda", num_microbatches=2))
    assert few is not None and not few.on and "nothing to swap" in few.reason
    gpu_cfg = DeploymentConfig(str(path), num_stages=2, device="cuda", num_microbatches=6, microbatch_size=AUTO,
                               max_seq_len=1024)
    sized_cfg, _ = resolve(gpu_cfg, spec, [gpu(80, i=i) for i in range(2)])
    d = planned_swap(sized_cfg)
    assert d is not None and not d.on and "fit in device memory" in d.reason
    # no memory plan (stages on other machines, an explicit size): the stages measure and decide
    assert planned_swap(replace(gpu_cfg, microbatch_size=4, memory_plan="")) is None


def test_swap_auto_on_gpus_turns_on_where_it_buys_larger_microbatches_and_pays(tiny) -> None:  # type: ignore[no-untyped-def]
    """4 stages, 4 microbatches: without swapping each microbatch gets a quarter of the KV room, with it a half.
    auto takes the larger size when a microbatch's swap-in is predicted under a decode step, and says why; a slow
    host link keeps it off at the smaller size; an explicit size that fits only with swapping, where
    swapping would not pay gets sizing's warning, as without swapping."""
    path, spec = tiny
    cfg = DeploymentConfig(str(path), num_stages=4, device="cuda", microbatch_size=AUTO, max_seq_len=1024,
                           swap_bandwidth=25.0, swap_step_ms=10.0)
    off_cfg = replace(cfg, swap="off")
    heaviest = max(models(off_cfg, spec), key=lambda m: m.need(20))
    total = math.ceil((heaviest.need(20) + heaviest.need(21)) // 2 / 0.9) + 1
    memories = [DeviceMemory(f"cuda:{i}", total, total) for i in range(4)]
    off = size_deployment(off_cfg, spec, memories)
    assert off.microbatch_size == 20
    on_cfg, on = size_with_swap(cfg, spec, memories, None)
    assert on_cfg.swap_settled_on and "auto: swap-in" in on_cfg.swap_settled and "--swap auto: swap-in" in on.how
    assert on.microbatch_size > off.microbatch_size  # 2 resident of 4 (this tiny model's room is mostly activations)
    d = planned_swap(on_cfg)
    assert d is not None and d.on and d.mode == "auto"
    slow_cfg, slow = size_with_swap(replace(cfg, swap_bandwidth=1e-9), spec, memories, None)
    assert not slow_cfg.swap_settled_on and "slower than compute" in slow_cfg.swap_settled
    assert slow.microbatch_size == 20
    figures = SwapFigures(h2d_bps=25e9, device_bps=2e12)  # the probe's, where the flags give none
    probed_cfg, _ = size_with_swap(replace(cfg, swap_bandwidth=0.0, swap_step_ms=0.0), spec, memories, figures)
    assert probed_cfg.swap_settled  # decided either way, with the probe's figures in its reason
    assert "GB/s" in probed_cfg.swap_settled or "fit" in probed_cfg.swap_settled
    # an explicit size that fits only with swapping, where it would not pay: off, with sizing's warning
    ex_cfg, ex = size_with_swap(replace(cfg, microbatch_size=on.microbatch_size, swap_bandwidth=1e-9), spec,
                                memories, None)
    assert not ex_cfg.swap_settled_on and any("may run out of memory" in w for w in ex.warnings)
    # --swap on, off, or 2 microbatches: not decided here
    two, _ = size_with_swap(replace(cfg, num_stages=2), spec, memories[:2], None)
    assert not two.swap_settled


def test_swap_auto_caps_a_microbatch_at_what_a_step_hides_and_says_why_where_that_gains_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An OPT-13B-shaped stage on an H100 (53 GB/s pinned host -> device, 3 TB/s device memory: a decode step's
    weight read 8.74 ms), 4 microbatches. Swapping pays only while a microbatch's KV is under ~1.5% of the weights:
    - the paper's workload (2,048 positions, 90% of the GPU): even one slot's swap-in (1.6 GiB, 32 ms) is 3.6x a
      step: off;
    - a budget the weights nearly fill (128 positions, 36%): the 2 frames would hold 5 per microbatch, whose swap-in
      (9.9 ms) a step does not hide; 4 per microbatch (7.9 ms) it does, and beat off's 2: on, at 4;
    - the same positions with room (90%): off holds 107 per microbatch, more than a step hides: off, saying so."""
    from bench.pipeline_bench import write_model

    spec = read_spec(write_model("opt-13b", tmp_path))
    figures = SwapFigures(h2d_bps=53e9, device_bps=3.0e12)
    h100 = [gpu(80, 79)]

    def auto(max_seq_len: int, fraction: float) -> tuple[DeploymentConfig, int]:
        cfg = DeploymentConfig(str(tmp_path), num_stages=1, device="cuda", microbatch_size=AUTO, dtype="bfloat16",
                               max_seq_len=max_seq_len, num_microbatches=4, gpu_memory_fraction=fraction)
        settled, sizing = size_with_swap(cfg, spec, h100, figures)
        return settled, sizing.microbatch_size

    paper, size = auto(2048, 0.9)
    assert not paper.swap_settled_on and size == 6
    assert "swapping would be slower than compute: swap-in 380 ms (1.92e+04 MiB at 53 GB/s) vs step 8.74 ms" in \
        paper.swap_settled  # swapping's 12 per microbatch

    tight, size = auto(128, 0.36)
    off = size_deployment(replace(tight, swap="off"), spec, h100).microbatch_size
    largest = size_deployment(replace(tight, swap="on"), spec, h100).microbatch_size
    assert (off, largest, size) == (2, 5, 4) and tight.swap_settled_on
    assert "swap-in 7.91 ms (400 MiB at 53 GB/s) vs step 8.74 ms" in tight.swap_settled
    _, sizing = size_with_swap(replace(tight, swap="auto", swap_settled="", swap_settled_on=False), spec, h100, figures)
    assert "microbatch size 4 (auto, swapping: the largest whose swap-in fits under a decode step; the memory " \
           "holds 5" in sizing.how and sizing.auto

    roomy, size = auto(128, 0.9)
    assert not roomy.swap_settled_on and size == 107
    assert "only up to 4 per microbatch, and all 4 microbatches hold 107 each without swapping" in roomy.swap_settled


def test_a_given_device_memory_still_takes_the_gpus_copy_figures_for_swap_auto(tiny, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """DEJAVU_DEVICE_MEMORY sets the memory (a benchmark emulating a smaller GPU); --swap auto's bandwidths are still
    timed on the GPUs where it needs them, and where none can be timed it decides with no figure, as before."""
    import recovery.sizing as sizing

    path, _ = tiny
    cfg = DeploymentConfig(str(path), num_stages=1, device="cuda", microbatch_size=AUTO, num_microbatches=4)
    monkeypatch.setenv("DEJAVU_DEVICE_MEMORY", "4G")
    asked: list[tuple[int, bool]] = []

    def probe(count: int, timeout: float = 120.0, bandwidth: bool = False):  # type: ignore[no-untyped-def]
        asked.append((count, bandwidth))
        return [(1 << 40, 1 << 40)] * count, SwapFigures(53e9, 3e12)

    monkeypatch.setattr(sizing, "probe_gpus", probe)
    mems, figures = sizing.measure_all(cfg)
    assert [(m.total, m.free) for m in mems] == [(4 * GiB, 4 * GiB)]  # the given memory, not the probe's
    assert figures == SwapFigures(53e9, 3e12) and asked == [(1, True)]
    for other in (replace(cfg, swap="off"), replace(cfg, num_microbatches=2),
                  replace(cfg, swap_bandwidth=25.0, swap_step_ms=5.0), replace(cfg, device="cpu")):
        assert sizing.measure_all(other)[1] is None  # nothing to decide, or the flags give both figures
    assert asked == [(1, True)]

    def no_gpu(count: int, timeout: float = 120.0, bandwidth: bool = False):  # type: ignore[no-untyped-def]
        raise MemoryBudgetError("cannot measure GPU memory (no GPU)")

    monkeypatch.setattr(sizing, "probe_gpus", no_gpu)
    assert sizing.measure_all(cfg)[1] is None


def test_the_layer_split_weighs_the_lm_head_and_keeps_the_tiny_test_models_even(model_factory) -> None:  # type: ignore[no-untyped-def]
    """resolve() sets cfg.head_layers from the model (the head's bytes over a layer's) and says the split where
    balancing moved layers; --layer-split even and a prompt pipeline keep equal counts. The tiny test models' heads
    are light, so every other test's stages hold the layers they always held."""
    for name in ("llama", "mistral", "qwen2", "opt", "opt_postnorm", "bloom"):
        path = model_factory(name)
        spec = read_spec(path)
        for stages in range(1, spec.num_layers + 1):
            cfg, sizing = resolve(DeploymentConfig(str(path), num_stages=stages, microbatch_size=4), spec)
            assert 0 < cfg.head_layers < 1, (name, cfg.head_layers)
            assert [p.layers for p in cfg.stage_plan(spec.num_layers)] == [
                p.layers for p in replace(cfg, layer_split="even").stage_plan(spec.num_layers)]
            assert "layers by stage" not in sizing.how
    path = model_factory("llama_bighead")
    spec = read_spec(path)
    cfg, sizing = resolve(DeploymentConfig(str(path), num_stages=2, microbatch_size=4), spec)
    assert 7 < cfg.head_layers < 9 and [p.layers for p in cfg.stage_plan(4)] == [(0, 3), (3, 4)]
    assert "layers by stage 0-2 | 3-3 (--layer-split balanced: the LM head weighs" in sizing.how
    assert "even would be 0-1 | 2-3" in sizing.how
    even, sizing = resolve(DeploymentConfig(str(path), num_stages=2, microbatch_size=4, layer_split="even"), spec)
    assert [p.layers for p in even.stage_plan(4)] == [(0, 2), (2, 4)] and "layers by" not in sizing.how
    disagg, sizing = resolve(DeploymentConfig(str(path), num_stages=4, prompt_stages=2, token_stages=2,
                                              microbatch_size=4), spec)
    assert [(p.pipeline, p.layers) for p in disagg.stage_plan(4)] == [
        ("prompt", (0, 2)), ("prompt", (2, 4)), ("token", (0, 3)), ("token", (3, 4))]
    assert "layers by token stage 0-2 | 3-3" in sizing.how
    with pytest.raises(ValueError, match="--layer-split must be balanced or even"):
        DeploymentConfig(str(path), layer_split="odd")
