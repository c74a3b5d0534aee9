"""What a simulation (recovery/simulator.py) is given: per-layer step times, the requests, the deployment and its
failures, with the workloads of the load generator. Pure, torch-free data; validated where built.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stages.models.spec import split_layers

RECOVERY_MODES = ("replica", "recompute")
MODES = ("colocated", "disaggregated")


@dataclass(frozen=True)
class LayerTimes:
    """Seconds per layer: a step with prompt tokens costs prompt_fixed + prompt_per_token * tokens
    (+ decode_per_seq for each decode riding along); a decode-only step decode_fixed + decode_per_seq * batch.
    `step_overhead_s` is added per stage per step (activation hand-off, scheduling; 0 = compute only), `head_s`
    per step on a pipeline's last stage (final norm, LM head and sampling of one token per sequence)."""

    prompt_fixed_s: float
    prompt_per_token_s: float
    decode_fixed_s: float
    decode_per_seq_s: float
    step_overhead_s: float = 0.0
    head_s: float = 0.0

    def __post_init__(self) -> None:
        for name, v in vars(self).items():
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"LayerTimes.{name} must be a finite number >= 0, got {v}")
        if self.prompt_per_token_s + self.prompt_fixed_s <= 0 or self.decode_fixed_s + self.decode_per_seq_s <= 0:
            raise ValueError("LayerTimes: a prompt token and a decode step must take some time")

    def prompt(self, tokens: int) -> float:
        """One layer's prompt pass over `tokens` new tokens."""
        return self.prompt_fixed_s + self.prompt_per_token_s * tokens

    def decode(self, batch: int) -> float:
        """One layer's decode step at `batch` sequences."""
        return self.decode_fixed_s + self.decode_per_seq_s * batch

    def per_layer(self, prompt_tokens: int, decodes: int) -> float:
        """One layer's share of a step with these prompt tokens and decoding sequences."""
        if prompt_tokens > 0:
            return self.prompt(prompt_tokens) + self.decode_per_seq_s * decodes
        return self.decode(decodes)

    def stage_steps(self, layers: Sequence[int], prompt_tokens: int, decodes: int, slowdown: float = 1.0
                    ) -> list[float]:
        """A step's time on each stage of a pipeline whose stages hold `layers` (the last one has the head)."""
        x = self.per_layer(prompt_tokens, decodes) * slowdown
        out = [n * x + self.step_overhead_s for n in layers]
        out[-1] += self.head_s
        return out


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class SimConfig:
    mode: str
    layers: int
    times: LayerTimes
    microbatch_size: int
    stages: int = 0  # colocated
    prompt_stages: int = 0  # disaggregated
    token_stages: int = 0
    microbatches: int = 0  # per (token) pipeline; 0: one per stage, as dejavu-serve's default
    replicas: int = 1
    stream_slowdown: float = 1.0  # m: the prompt pass with layer-by-layer streaming over without
    kv_bytes_per_token_layer: int = 0  # K and V of one token in one layer
    link_gbps: float = 0.0  # prompt stage -> token side, Gbit/s per prompt stage; 0: transfers take no time
    overlap: float = 1.0  # share of a stage's KV transfer that may run under its prompt pass (1 = layer by layer)
    recv_slots: int = 0  # prompt passes' worth of prompt slots (a prompt holds one until it joins); 0: stages + 1
    head_layers: float = 0.0  # the LM head in layers, as --layer-split balanced splits a decoding pipeline; 0: even

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        depth = self.stages if self.mode == "colocated" else self.prompt_stages + self.token_stages
        if self.mode == "colocated" and not 1 <= self.stages <= self.layers:
            raise ValueError(f"a colocated pipeline needs 1 <= stages <= layers ({self.layers}), got {self.stages}")
        if self.mode == "disaggregated" and not (1 <= self.prompt_stages <= self.layers
                                                 and 1 <= self.token_stages <= self.layers):
            raise ValueError(f"prompt and token stages must each be in [1, layers={self.layers}], got "
                             f"{self.prompt_stages} and {self.token_stages}")
        checks = [(self.microbatch_size >= 1, "microbatch_size must be >= 1"), (depth >= 1, "no stages"),
                  (self.microbatches >= 0, "microbatches must be >= 0"), (self.replicas >= 1, "replicas must be >= 1"),
                  (self.stream_slowdown >= 1.0, "stream_slowdown must be >= 1"),
                  (0.0 <= self.overlap <= 1.0, "overlap must be in [0, 1]"), (self.link_gbps >= 0, "link_gbps >= 0"),
                  (self.recv_slots >= 0, "recv_slots must be >= 0"), (self.kv_bytes_per_token_layer >= 0, "kv bytes")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SimConfig: {message}")

    @property
    def gpus(self) -> int:
        per = self.stages if self.mode == "colocated" else self.prompt_stages + self.token_stages
        return per * self.replicas


@dataclass(frozen=True)
class Failure:
    at_s: float
    stage: int = 0  # index inside its pipeline
    pipeline: str = "token"  # disaggregated: "token" or "prompt" (colocated: its one pipeline)
    replica: int = 0
    detect_s: float = 3.0  # heartbeat timeout
    restart_s: float = 10.0  # process start + weight load
    recovery: str = "replica"  # or "recompute"
    restore_gbps: float = 40.0  # replica -> restarted stage

    def __post_init__(self) -> None:
        if self.recovery not in RECOVERY_MODES:
            raise ValueError(f"recovery must be one of {', '.join(RECOVERY_MODES)}, got {self.recovery!r}")
        if self.pipeline not in ("token", "prompt"):
            raise ValueError(f"pipeline must be token or prompt, got {self.pipeline!r}")
        if min(self.at_s, self.detect_s, self.restart_s) < 0 or self.restore_gbps <= 0 or self.stage < 0:
            raise ValueError("Failure: times must be >= 0, restore_gbps > 0, stage >= 0")


def layer_split(layers: int, stages: int, head_layers: float = 0.0) -> list[int]:
    """Layers per stage, as dejavu-serve splits them (stages/models/spec.split_layers): a decoding pipeline's last
    stage counts its LM head as head_layers layers (--layer-split balanced; ModelFacts.head_layers), a prompt
    pipeline's split is even (head_layers 0)."""
    return [b - a for a, b in split_layers(layers, stages, head_layers)]


# ---------------------------------------------------------------- workloads


def poisson_workload(n: int, rate: float, prompt: Any, output: Any, seed: int = 0) -> list[Request]:
    """n requests, Poisson arrivals at `rate`/s (0: all at time 0, a saturated deployment), lengths drawn from
    bus.loadgen.LengthDist `prompt` / `output` with a stream of their own (no prompt token ids are drawn)."""
    from bus.loadgen import poisson_arrivals

    arrivals = [0.0] * n if rate == 0 else poisson_arrivals(rate, seed, n=n)
    rng = random.Random(f"lengths:{seed}")
    out = []
    for t in arrivals:
        p = prompt.sample(rng)
        out.append(Request(t, p, output.sample(rng)))
    return out


def loadgen_workload(n: int, rate: float, prompt: Any, output: Any, vocab_size: int, seed: int = 0) -> list[Request]:
    """The very requests `dejavu-bench serve` / `pipeline` send for this seed (it draws token ids between the
    lengths, so this is slower): to set a simulation beside a measured run."""
    from bus.loadgen import draw_requests, poisson_arrivals

    arrivals = poisson_arrivals(rate, seed, n=n)
    return [Request(t, len(p), o) for t, (p, o) in zip(arrivals, draw_requests(n, prompt, output, vocab_size, seed))]
