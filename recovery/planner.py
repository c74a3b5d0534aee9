"""The deployment planner (`dejavu-plan`): how to split N GPUs into a prompt and a token pipeline, and how large a
microbatch fits, from a model's facts, its measured per-layer times (recovery/profiler.py) and GPU memory.

The paper's model ("Prompt-token disaggregation", docs: shared PAPER.md): with Y the prompt pass of one microbatch,
t one decode step of a microbatch (both over all L layers), N decode steps per request and m >= 1 the prompt
pass's slowdown from streaming its KV, the two pipelines' inverse throughputs m*D*Y/Dp and N*D*t/Dt balance at

    Dt = D*N*t / (m*Y + N*t),   Dp = D - Dt,

subject to memory minimums, and disaggregation pays when Y/t > (D-1)/(D*(2-m)-1). Here N counts the decode steps
on the token pipeline (output length - 1: the prompt pass samples the first token). The closed forms propose
(the rounded split and its neighbours, each with the largest microbatch that fits); the simulator
(recovery/simulator.py) disposes: the plan is the option with the highest simulated steady throughput.

Pure and torch-free: runs in the dejavu-plan process; profiling lives in recovery/profiler.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from recovery.preflight import DTYPE_BYTES
from recovery.simulator import LayerTimes, SimConfig, layer_split, poisson_workload, simulate
from stages.models.spec import ModelSpec


class PlanError(ValueError):
    """A setting the planner cannot plan for; its message is one line that says what to change."""


# ---------------------------------------------------------------- model facts


@dataclass(frozen=True)
class ModelFacts:
    family: str
    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_positions: int  # 0: no limit from the architecture
    dtype: str
    layer_bytes: int  # W0: one decoder layer's weights
    embed_bytes: int  # the first stage's embedding
    head_bytes: int  # the last stage's final norm + LM head
    kv_bytes_per_token_layer: int  # K and V of one token in one layer

    @property
    def head_layers(self) -> float:
        """The last stage's head in layers (its bytes over a layer's): what a decode step reads of it, and how
        dejavu-serve's --layer-split balanced weighs it."""
        return round(self.head_bytes / self.layer_bytes, 4) if self.layer_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelFacts:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def layer_params(spec: ModelSpec) -> int:
    """Parameters of one decoder layer, as stages/models/<family>.py declares them."""
    h, f, o = spec.hidden_size, spec.intermediate_size, spec.options
    q, kv = spec.num_heads * spec.head_dim, spec.kv_dim
    if spec.family == "llama":
        n = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h  # qkv, o, gate|up + down, two RMSNorms
        n += (q + 2 * kv) * o.get("qkv_bias", False) + h * o.get("o_bias", False)
        return n + (2 * f + h) * o.get("mlp_bias", False)
    if spec.family == "opt":
        n = 4 * h * h + 2 * h * f + (4 * h + f + h) * o.get("bias", True)  # qkv + out, fc1 + fc2, biases
        return n + 4 * h * o.get("affine", True)  # two LayerNorms
    if spec.family == "bloom":
        return 3 * h * h + 3 * h + h * h + h + 8 * h * h + 5 * h + 4 * h  # qkv, dense, up + down, two LayerNorms
    raise PlanError(f"no parameter count for model family {spec.family!r}")


def embed_head_params(spec: ModelSpec) -> tuple[int, int]:
    h, v, o = spec.hidden_size, spec.vocab_size, spec.options
    if spec.family == "opt":
        proj = o["proj_dim"]
        embed = v * proj + (spec.max_positions + 2) * h + (proj * h if proj != h else 0)
        head = 2 * h * (o["affine"] and o["final_norm"]) + (h * proj if proj != h else 0) + proj * v
        return embed, head
    if spec.family == "bloom":
        return v * h + 2 * h, v * h + 2 * h
    return v * h, v * h + h  # llama: embedding; RMSNorm + LM head (a tied head is still a copy on its stage)


def model_facts(spec: ModelSpec, dtype: str) -> ModelFacts:
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    b = DTYPE_BYTES[dtype]
    embed, head = embed_head_params(spec)
    return ModelFacts(spec.family, spec.architecture, spec.num_layers, spec.hidden_size, spec.num_heads,
                      spec.num_kv_heads, spec.head_dim, spec.intermediate_size, spec.vocab_size, spec.max_positions,
                      dtype, layer_params(spec) * b, embed * b, head * b, 2 * spec.kv_dim * b)


# ---------------------------------------------------------------- workload lengths


@dataclass(frozen=True)
class Lengths:
    prompt_mean: float
    output_mean: float
    prompt_max: int
    output_max: int

    @property
    def max_seq_len(self) -> int:
        return self.prompt_max + self.output_max


def dist_mean_max(d: Any) -> tuple[float, int]:
    """Mean and bound of a bus.loadgen.LengthDist (an unclamped lognormal: its 99.9th percentile)."""
    if d.kind == "fixed":
        return float(d.a), int(d.a)
    if d.kind == "uniform":
        return (d.a + d.b) / 2, int(d.b)
    rng = random.Random("planner:lengths")  # a fixed stream: the same plan every time
    mean = sum(d.sample(rng) for _ in range(20000)) / 20000
    hi = d.hi if d.hi < (1 << 30) else math.ceil(math.exp(math.log(d.a) + 3.09 * d.b))
    return mean, max(d.lo, int(hi))


def lengths_of(prompt: Any, output: Any, max_positions: int) -> Lengths:
    (pm, px), (om, ox) = dist_mean_max(prompt), dist_mean_max(output)
    if max_positions and px + ox > max_positions:
        raise PlanError(f"prompts up to {px} + outputs up to {ox} tokens exceed the model's {max_positions} "
                        "positions: shorten --prompt-len / --output-len")
    return Lengths(pm, om, px, ox)


# ---------------------------------------------------------------- the paper's closed forms


def token_stages_formula(gpus: int, n_steps: float, t: float, y: float, m: float) -> float:
    """Dt = D*N*t / (m*Y + N*t): the token pipeline's share that balances both pipelines (a real number)."""
    return gpus * n_steps * t / (m * y + n_steps * t)


def paper_minimums(layers: int, memory: float, w0: float, c0: float, k0: float) -> tuple[int | None, int | None]:
    """(Dp, Dt) minimums: Dp >= ceil(L / floor(M/(C0+W0))), Dt >= ceil(L / floor((M - L*(C0+K0))/W0));
    None where no number of machines is enough."""
    per_prompt = math.floor(memory / (c0 + w0))
    per_token = math.floor((memory - layers * (c0 + k0)) / w0)
    return (math.ceil(layers / per_prompt) if per_prompt >= 1 else None,
            math.ceil(layers / per_token) if per_token >= 1 else None)


def disaggregation_pays(y: float, t: float, gpus: int, m: float) -> dict[str, Any]:
    """The paper's condition Y/t > (D-1)/(D*(2-m)-1) (never, where the denominator is <= 0)."""
    denominator = gpus * (2 - m) - 1
    threshold = (gpus - 1) / denominator if denominator > 0 else math.inf
    return {"y_over_t": y / t, "threshold": threshold if math.isfinite(threshold) else None,
            "pays": y / t > threshold}


# ---------------------------------------------------------------- memory


def activation_bytes(facts: ModelFacts, tokens: int) -> int:
    """A pass's working set over `tokens` tokens (~ tokens x (4 hidden + 2 ffn) elements): what the planner and
    dejavu-serve's memory-sized microbatches (recovery/sizing.py) both reserve for a step's activations."""
    return tokens * (4 * facts.hidden + 2 * facts.ffn) * DTYPE_BYTES[facts.dtype]


@dataclass(frozen=True)
class Memory:
    """Bytes one stage needs. Every stage keeps room for the larger of embedding and head (the first and the
    last stage hold them) and for a pass's activations (~ tokens x (4 hidden + 2 ffn) elements); KV pools are
    sized per slot for the longest sequence (prompt_max + output_max), as dejavu-serve's --max-seq-len does."""

    facts: ModelFacts
    lengths: Lengths
    device_bytes: int
    safety: float = 0.9

    @property
    def budget(self) -> float:
        f = self.facts
        return self.safety * self.device_bytes - max(f.embed_bytes, f.head_bytes)

    def activations(self, tokens: int) -> int:
        return activation_bytes(self.facts, tokens)

    def c0(self, b: int) -> int:
        """Prompt KV of one microbatch in one layer."""
        return b * self.lengths.prompt_max * self.facts.kv_bytes_per_token_layer

    def k0(self, b: int) -> int:
        """Generated tokens' KV of one microbatch in one layer."""
        return b * self.lengths.output_max * self.facts.kv_bytes_per_token_layer

    def colocated(self, stages: int, b: int) -> float:
        n = max(layer_split(self.facts.layers, stages, self.facts.head_layers))
        return n * self.facts.layer_bytes + n * stages * (self.c0(b) + self.k0(b)) + self.activations(
            b * self.lengths.prompt_max)

    def prompt_stage(self, stages: int, b: int) -> float:
        """As dejavu-serve reserves it: stages + 1 prompt microbatches of b slots, each slot sized for the longest
        sequence (--max-seq-len)."""
        n = max(layer_split(self.facts.layers, stages))
        return (n * self.facts.layer_bytes + n * (stages + 1) * (self.c0(b) + self.k0(b))
                + self.activations(b * self.lengths.prompt_max))

    def token_stage(self, stages: int, b: int, recv_slots: int = 0) -> float:
        """As dejavu-serve reserves it: a microbatch of b slots per token stage; a prompt's receive slot is one of
        those slots (reserved before the pass), so receiving needs no memory of its own (recv_slots: kept for the
        simulator's model, which counts prompts in flight apart)."""
        n = max(layer_split(self.facts.layers, stages, self.facts.head_layers))
        return n * self.facts.layer_bytes + n * stages * (self.c0(b) + self.k0(b)) + self.activations(b)


def largest(fits: Callable[[int], bool], cap: int) -> int:
    """The largest b in [1, cap] with fits(b) (monotone), 0 if none."""
    if cap < 1 or not fits(1):
        return 0
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


# ---------------------------------------------------------------- throughput model


def colocated_tokens_per_s(times: LayerTimes, layers: int, stages: int, b: int, lengths: Lengths,
                           head_layers: float = 0.0) -> float:
    """A colocated pipeline of `stages` stages and as many microbatches of b, saturated: each slot's step is a
    prompt with probability 1/output (K ~ Binomial(b, 1/output) prompts in a step), and every round of the
    microbatches through the ring lasts as long as its slowest step (the bubble): b / E[max_M c(K)] tokens/s.
    head_layers: the split's weight of the head (--layer-split balanced)."""
    split = layer_split(layers, stages, head_layers)
    q = min(1.0, 1.0 / max(lengths.output_mean, 1.0))
    p = round(lengths.prompt_mean)
    pmf = [math.comb(b, k) * q**k * (1 - q) ** (b - k) for k in range(b + 1)]
    expected, cdf_prev = 0.0, 0.0
    for k in range(b + 1):
        cdf = min(1.0, cdf_prev + pmf[k])
        expected += max(times.stage_steps(split, k * p, b - k)) * (cdf**stages - cdf_prev**stages)
        cdf_prev = cdf
    return b / expected


def disaggregated_tokens_per_s(times: LayerTimes, layers: int, dp: int, dt: int, b: int, lengths: Lengths,
                               m: float, kv_bytes: int, link_gbps: float, head_layers: float = 0.0) -> float:
    """The slower of the prompt pipeline (a microbatch per bottleneck stage pass, or per its KV transfer when
    the link is slower) and the token pipeline (b tokens per bottleneck decode step), in tokens/s."""
    lp = layer_split(layers, dp)
    tokens = b * round(lengths.prompt_mean)
    cycle = max(times.stage_steps(lp, tokens, 0, m))
    if link_gbps > 0:
        cycle = max(cycle, max(lp) * tokens * kv_bytes * 8 / (link_gbps * 1e9))
    requests = b / cycle
    steps = lengths.output_mean - 1
    if steps > 0:
        requests = min(requests, b / (max(times.stage_steps(layer_split(layers, dt, head_layers), 0, b)) * steps))
    return requests * lengths.output_mean


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanSettings:
    gpus: int
    device_bytes: int
    safety: float = 0.9
    max_microbatch: int = 64
    stream_slowdown: float = 1.02  # m; the streamer benchmark measured +0.1-1.5% for layer-by-layer streaming
    link_gbps: float = 40.0  # the paper's testbed between VMs
    overlap: float = 1.0
    recv_slots: int = 0  # 0: prompt stages + 1
    sim_requests: int = 0  # 0: 6 x the token side's slots (at least 64)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [(self.gpus >= 1, f"--gpus must be >= 1, got {self.gpus}"),
                  (self.device_bytes > 0, "device memory must be > 0"),
                  (0 < self.safety <= 1, f"--safety must be in (0, 1], got {self.safety}"),
                  (self.max_microbatch >= 1, f"--max-microbatch must be >= 1, got {self.max_microbatch}"),
                  (self.stream_slowdown >= 1, f"--stream-slowdown must be >= 1, got {self.stream_slowdown}"),
                  (self.link_gbps >= 0, "--link-gbps must be >= 0"), (0 <= self.overlap <= 1, "--overlap in [0, 1]"),
                  (self.recv_slots >= 0, "--recv-slots must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise PlanError(message)


class Planner:
    def __init__(self, facts: ModelFacts, times: LayerTimes, lengths: Lengths, settings: PlanSettings,
                 prompt: Any, output: Any) -> None:
        self.facts, self.times, self.lengths, self.s = facts, times, lengths, settings
        self.prompt_dist, self.output_dist = prompt, output
        self.mem = Memory(facts, lengths, settings.device_bytes, settings.safety)

    def recv(self, dp: int) -> int:
        return self.s.recv_slots or dp + 1

    def colocated_b(self, stages: int) -> int:
        return largest(lambda b: self.mem.colocated(stages, b) <= self.mem.budget, self.s.max_microbatch)

    def split_b(self, dp: int, dt: int) -> int:
        m = self.mem
        return largest(lambda b: m.prompt_stage(dp, b) <= m.budget
                       and m.token_stage(dt, b, self.recv(dp)) <= m.budget, self.s.max_microbatch)

    def y_t(self, b: int) -> tuple[float, float]:
        """(Y, t): one microbatch's prompt pass and decode step over all layers, seconds."""
        L = self.facts.layers
        return L * self.times.prompt(b * round(self.lengths.prompt_mean)), L * self.times.decode(b)

    def model_rate(self, dp: int, dt: int, b: int) -> float:
        return disaggregated_tokens_per_s(self.times, self.facts.layers, dp, dt, b, self.lengths,
                                          self.s.stream_slowdown, self.facts.kv_bytes_per_token_layer,
                                          self.s.link_gbps, self.facts.head_layers)

    def split_candidates(self) -> tuple[list[int], dict[str, Any]]:
        """Token-stage counts to evaluate: the formula's, rounded down and up, and their neighbours, among the
        splits where both sides fit at some microbatch size. The microbatch size and the split depend on each
        other (Y and t are per microbatch): iterate until the best candidate's size stops changing."""
        D, L = self.s.gpus, self.facts.layers
        feasible = [dt for dt in range(1, D) if D - dt <= L and dt <= L and self.split_b(D - dt, dt) >= 1]
        if not feasible:
            return [], {}
        b, formula = self.s.max_microbatch, {}
        for _ in range(5):
            y, t = self.y_t(b)
            steps = max(self.lengths.output_mean - 1, 1e-9)
            real = token_stages_formula(D, steps, t, y, self.s.stream_slowdown)
            near = {math.floor(real) + k for k in (-1, 0, 1, 2)}
            cands = sorted(dt for dt in feasible if dt in near) or [min(feasible, key=lambda d: abs(d - real))]
            best = max(cands, key=lambda dt: self.model_rate(D - dt, dt, self.split_b(D - dt, dt)))
            formula = {"gpus": D, "decode_steps_per_request": steps, "microbatch_size": b, "prompt_pass_s": y,
                       "decode_step_s": t, "stream_slowdown": self.s.stream_slowdown, "token_stages_real": real,
                       "condition": disaggregation_pays(y, t, D, self.s.stream_slowdown)}
            nb = self.split_b(D - best, best)
            if nb == b:
                break
            b = nb
        return cands, formula

    def simulate_option(self, cfg: SimConfig) -> dict[str, Any]:
        """The option saturated: 6 requests per token slot (at least 64, at most 20,000) waiting at time 0."""
        slots = cfg.microbatch_size * (cfg.microbatches or (cfg.stages or cfg.token_stages))
        n = self.s.sim_requests or min(20000, max(64, 6 * slots))
        r = simulate(cfg, poisson_workload(n, 0, self.prompt_dist, self.output_dist, self.s.seed))
        r["steady_tokens_per_s"] = r["steady_tokens_per_s"] or r["tokens_per_s"]  # too few steps for a window
        return r

    def options(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        f, D = self.facts, self.s.gpus
        out: list[dict[str, Any]] = []
        dc = min(D, f.layers)
        b = self.colocated_b(dc)
        opt: dict[str, Any] = {"mode": "colocated", "stages": dc, "microbatch_size": b}
        if dc < D:
            opt["note"] = f"a pipeline has at most one stage per layer: {D - dc} GPU(s) left unused"
        if b:
            opt["model_tokens_per_s"] = colocated_tokens_per_s(self.times, f.layers, dc, b, self.lengths, f.head_layers)
            sim = self.simulate_option(SimConfig("colocated", f.layers, self.times, b, stages=dc,
                                                 head_layers=f.head_layers))
            opt["simulated_tokens_per_s"] = sim["steady_tokens_per_s"]
            opt["simulated_idle_fraction"] = sim["idle_fraction"]["mean"]
        else:
            opt["infeasible"] = f"{f.layers} layers over {dc} stages do not fit in memory even at microbatch 1"
        out.append(opt)
        formula: dict[str, Any] = {}
        if D < 2:
            out.append({"mode": "disaggregated", "infeasible": "disaggregation needs at least 2 GPUs "
                        "(a prompt and a token stage): falling back to colocated"})
            return out, formula
        if D > 2 * f.layers:
            out.append({"mode": "disaggregated", "infeasible": f"{D} GPUs: a prompt and a token pipeline hold at most "
                        f"one layer per stage each ({2 * f.layers} GPUs); plan one deployment per {2 * f.layers} GPUs"})
            return out, formula
        cands, formula = self.split_candidates()
        if not cands:
            out.append({"mode": "disaggregated", "infeasible": f"no split of {D} GPUs into prompt and token stages "
                        "fits the model in memory at microbatch 1"})
        for dt in cands:
            dp = D - dt
            b = self.split_b(dp, dt)
            cfg = SimConfig("disaggregated", f.layers, self.times, b, prompt_stages=dp, token_stages=dt,
                            stream_slowdown=self.s.stream_slowdown, kv_bytes_per_token_layer=f.kv_bytes_per_token_layer,
                            link_gbps=self.s.link_gbps, overlap=self.s.overlap, recv_slots=self.s.recv_slots,
                            head_layers=f.head_layers)
            sim = self.simulate_option(cfg)
            out.append({"mode": "disaggregated", "prompt_stages": dp, "token_stages": dt, "microbatch_size": b,
                        "recv_slots": self.recv(dp), "model_tokens_per_s": self.model_rate(dp, dt, b),
                        "simulated_tokens_per_s": sim["steady_tokens_per_s"],
                        "simulated_idle_fraction": sim["idle_fraction"]["mean"],
                        "receive_slots_max_in_use": sim["receive_slots"]["max_in_use"]})
        return out, formula

    def minimums(self, b: int) -> dict[str, Any]:
        """Memory minimums at microbatch b: the paper's formulas (on the budget) and this model's (exact layer
        splits, receive slots and activations), found by search."""
        m, L = self.mem, self.facts.layers
        dp, dt = paper_minimums(L, m.budget, self.facts.layer_bytes, m.c0(b), m.k0(b))
        ours_c = next((d for d in range(1, L + 1) if m.colocated(d, b) <= m.budget), None)
        ours_p = next((d for d in range(1, L + 1) if m.prompt_stage(d, b) <= m.budget), None)
        ours_t = next((d for d in range(1, L + 1) if m.token_stage(d, b, self.recv(ours_p or 1)) <= m.budget), None)
        return {"microbatch_size": b, "paper": {"prompt_stages": dp, "token_stages": dt},
                "with_reserves": {"colocated_stages": ours_c, "prompt_stages": ours_p, "token_stages": ours_t}}


def make_plan(facts: ModelFacts, times: LayerTimes, lengths: Lengths, settings: PlanSettings, prompt: Any,
              output: Any) -> dict[str, Any]:
    """Every option considered and the recommendation (PlanError when nothing fits)."""
    p = Planner(facts, times, lengths, settings, prompt, output)
    options, formula = p.options()
    usable = [o for o in options if "infeasible" not in o]
    if not usable:
        raise PlanError(f"the model does not fit on {settings.gpus} GPU(s) of {settings.device_bytes / 2**30:.1f} "
                        f"GiB (x{settings.safety} safety) even at microbatch 1: use more GPUs, more memory or "
                        "shorter sequences")
    best = max(usable, key=lambda o: (o["simulated_tokens_per_s"] or 0.0, o["model_tokens_per_s"]))
    colocated = next((o for o in usable if o["mode"] == "colocated"), None)
    chosen: dict[str, Any] = {
        "mode": best["mode"], "prompt_stages": best.get("prompt_stages", 0), "token_stages": best.get("token_stages", 0),
        "stages": best.get("stages", best.get("prompt_stages", 0) + best.get("token_stages", 0)),
        "microbatch_size": best["microbatch_size"], "max_seq_len": lengths.max_seq_len,
        "predicted_tokens_per_s": best["simulated_tokens_per_s"], "model_tokens_per_s": best["model_tokens_per_s"],
    }
    if colocated is not None and best is not colocated:
        chosen["speedup_over_colocated"] = best["simulated_tokens_per_s"] / colocated["simulated_tokens_per_s"]
    reasons = [o["infeasible"] for o in options if "infeasible" in o]
    if reasons:
        chosen["notes"] = reasons
    m = p.mem
    return {
        "workload": {"prompt_mean": lengths.prompt_mean, "output_mean": lengths.output_mean,
                     "prompt_max": lengths.prompt_max, "output_max": lengths.output_max},
        "memory": {"device_bytes": settings.device_bytes, "safety": settings.safety, "budget_bytes": m.budget,
                   "layer_bytes": facts.layer_bytes, "prompt_kv_per_layer_per_seq": m.c0(1),
                   "output_kv_per_layer_per_seq": m.k0(1)},
        "formula": formula, "memory_minimums": p.minimums(max(1, best["microbatch_size"])),
        "options": options, "plan": chosen,
        "assumptions": {"stream_slowdown": settings.stream_slowdown, "link_gbps": settings.link_gbps,
                        "overlap": settings.overlap, "step_overhead_s": times.step_overhead_s,
                        "recv_slots": settings.recv_slots or "prompt stages + 1",
                        "simulated_with": "every request at time 0 (saturated), steady tokens/s (10%-90% of tokens)"},
    }


def serve_command(plan: dict[str, Any], model: str, device: str, dtype: str) -> list[str]:
    """The dejavu-serve command line for a plan (colocated: --stages; disaggregated: --prompt-stages / --token-stages)."""
    shape = (["--stages", str(plan["stages"])] if plan["mode"] == "colocated" else
             ["--prompt-stages", str(plan["prompt_stages"]), "--token-stages", str(plan["token_stages"])])
    return ["dejavu-serve", "--model", model, *shape, "--microbatch-size", str(plan["microbatch_size"]),
            "--max-seq-len", str(plan["max_seq_len"]), "--device", "cuda" if device.startswith("cuda") else "cpu",
            "--dtype", dtype]
