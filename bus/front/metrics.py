"""/metrics in the Prometheus text format (prometheus_client), in the front's own registry.

Measured here, per request: dejavu_requests_total{endpoint, outcome} (bus/front/errors.py OUTCOMES), time to first
token, time per output token and end-to-end latency histograms, prompt and generated token counters, requests in
flight. From the controller's status, polled every status_interval (`StatusCollector`, rendered at scrape time
from the latest answer): queue length, running requests (busy slots) and slots, per-stage busy seconds, steps,
step time and idle fraction (over the last poll interval; each stage labelled with its pipeline: colocated, or
prompt and token when disaggregated), KV bytes streamed by kind, prompts waiting for a receive slot, replica
lag, process restarts and stage recoveries by source, hosts by state, the deployment's state. Nothing is
invented: every gauge of a status the controller did not answer is absent (dejavu_status_up says so)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bus.front.errors import OUTCOMES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENDPOINTS = ("completions", "chat")
KV_KINDS = ("prompt_to_token", "swap", "replica")  # what the streamer moves (DESIGN.md section 1)
GENERATION_SHIFT = 16  # a stage's incarnation = placement << 16 | restarts in place (recovery/hosts.py)
STAGE_LABELS = ["stage", "pipeline"]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


def restarts(role: str, incarnation: int) -> int:
    """Process starts after the first: a stage's moves to another host (a streamer's host's new boots) count, as do
    their restarts in place."""
    if role in ("stage", "streamer"):
        return (incarnation >> GENERATION_SHIFT) + (incarnation & ((1 << GENERATION_SHIFT) - 1))
    return max(0, incarnation)


class StatusCollector(Collector):
    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None
        self.windows: dict[int, tuple[float | None, float | None]] = {}  # stage -> (step s, idle fraction)
        self.recovered: Tally[str] = Tally()
        self.seen: set[tuple[Any, ...]] = set()

    def update(self, status: dict[str, Any] | None) -> None:
        """A poll's answer (None: unanswered). Windows: each stage's step time and idle fraction since the last."""
        if status is not None:
            before = {p["index"]: p for p in _stages(self.status)} if self.status else {}
            for p in _stages(status):
                old = before.get(p["index"])
                if old is not None and old.get("incarnation") == p.get("incarnation"):
                    busy = p.get("busy_s", 0.0) - old.get("busy_s", 0.0)
                    steps = p.get("steps", 0) - old.get("steps", 0)
                    up = p.get("uptime_s", 0.0) - old.get("uptime_s", 0.0)
                    last_step = self.windows.get(p["index"], (None, None))[0]  # kept while it computes nothing
                    self.windows[p["index"]] = (busy / steps if steps > 0 else last_step,
                                                min(1.0, max(0.0, 1.0 - busy / up)) if up > 0 else None)
            for r in status.get("recoveries", []):
                key = (r.get("stage"), r.get("epoch"), r.get("detected_at"), r.get("serving_at"))
                if key not in self.seen:
                    self.seen.add(key)
                    self.recovered[str(r.get("source", "?"))] += 1
        self.status = status

    def collect(self) -> Iterator[Metric]:
        st = self.status
        up = GaugeMetricFamily("dejavu_status_up", "1 when the controller answered the front's last status poll")
        up.add_metric([], 1.0 if st is not None else 0.0)
        yield up
        recovered = CounterMetricFamily("dejavu_recoveries", "stages that came back after a failure, by where "
                                        "their KV came from (replica, recompute, kept)", labels=["source"])
        for source in sorted({"replica", "recompute", "kept", *self.recovered}):
            recovered.add_metric([source], float(self.recovered[source]))
        yield recovered
        if st is None:
            return
        yield from self._deployment(st)
        yield from self._stage_metrics(st)
        yield from self._kv(st)
        yield from self._processes(st)

    def _deployment(self, st: dict[str, Any]) -> Iterator[Metric]:
        state = GaugeMetricFamily("dejavu_deployment_state", "1 for the deployment's current state", labels=["state"])
        for s in ("starting", "serving", "degraded", "stopping"):
            state.add_metric([s], 1.0 if st.get("state") == s else 0.0)
        yield state
        for name, key, text in (("dejavu_queue_length", "waiting", "requests waiting for a slot"),
                                ("dejavu_running_requests", "running", "requests holding a slot (busy slots)"),
                                ("dejavu_slots", "slots", "requests the deployment runs at once"),
                                ("dejavu_receive_waiting", "receive_waiting", "prompts done, waiting for a receive "
                                 "slot in the token pipeline (disaggregated)")):
            g = GaugeMetricFamily(name, text)
            g.add_metric([], float(st.get(key, 0)))
            yield g
        waits = CounterMetricFamily("dejavu_receive_waits", "requests that had to wait for a receive slot "
                                    "(back-pressure of the token pipeline; since the controller started)")
        waits.add_metric([], float(st.get("receive_waits", 0)))
        yield waits
        dropped = CounterMetricFamily("dejavu_lookahead_dropped_rows", "rows computed for requests that had already "
                                      "stopped on a sampled token (--lookahead; since the controller started)")
        dropped.add_metric([], float(st.get("lookahead_dropped_rows", 0)))
        yield dropped
        hosts = GaugeMetricFamily("dejavu_hosts", "host agents by state", labels=["state"])
        for state_, n in sorted(Tally(h.get("state", "?") for h in st.get("hosts", [])).items()):
            hosts.add_metric([state_], float(n))
        yield hosts

    def _stage_metrics(self, st: dict[str, Any]) -> Iterator[Metric]:
        busy = CounterMetricFamily("dejavu_stage_busy_seconds", "seconds each stage spent computing steps (since "
                                   "its process started)", labels=STAGE_LABELS)
        steps = CounterMetricFamily("dejavu_stage_steps", "steps each stage computed (since its process started)",
                                    labels=STAGE_LABELS)
        step_s = GaugeMetricFamily("dejavu_stage_step_seconds", "mean seconds per step over the last status "
                                   "interval in which the stage computed", labels=STAGE_LABELS)
        idle = GaugeMetricFamily("dejavu_stage_idle_fraction", "fraction of the last status interval a stage did "
                                 "not compute", labels=STAGE_LABELS)
        for p in _stages(st):
            label = [str(p["index"]), p.get("pipeline") or "colocated"]
            busy.add_metric(label, float(p.get("busy_s", 0.0)))
            steps.add_metric(label, float(p.get("steps", 0)))
            window = self.windows.get(p["index"], (None, None))
            if window[0] is not None:
                step_s.add_metric(label, window[0])
            if window[1] is not None:
                idle.add_metric(label, window[1])
        yield from (busy, steps, step_s, idle)

    def _kv(self, st: dict[str, Any]) -> Iterator[Metric]:
        replicas = st.get("replicas", [])
        kv = CounterMetricFamily("dejavu_kv_streamed_bytes", "KV-cache bytes streamed, by kind: prompt_to_token "
                                 "(landed in the token pipeline, since the controller started), replica (since each "
                                 "stage started), swap (out to the host's swap pool and back in, since each stage started)",
                                 labels=["kind"])
        swapped = sum(int(p["swap"].get("bytes_in", 0)) + int(p["swap"].get("bytes_out", 0))
                      for p in _stages(st) if p.get("swap"))
        totals = {"prompt_to_token": int(st.get("kv_streamed_bytes", 0)), "swap": swapped,
                  "replica": sum(int(r.get("bytes", 0)) for r in replicas)}
        for kind in KV_KINDS:
            kv.add_metric([kind], float(totals[kind]))
        yield kv
        lag = GaugeMetricFamily("dejavu_replica_lag_steps", "the most steps of any microbatch computed but not yet in "
                                "the stage's replica", labels=["stage"])
        lag_tokens = GaugeMetricFamily("dejavu_replica_lag_tokens", "positions cached by the stage but not in its "
                                       "replica", labels=["stage"])
        for r in replicas:
            lag.add_metric([str(r["stage"])], float(r.get("lag_steps", 0)))
            lag_tokens.add_metric([str(r["stage"])], float(r.get("lag_tokens", 0)))
        yield lag
        yield lag_tokens

    def _processes(self, st: dict[str, Any]) -> Iterator[Metric]:
        starts = CounterMetricFamily("dejavu_process_restarts", "process starts after the first, per process (a "
                                     "stage moved to another host counts)", labels=["role", "index"])
        for p in st.get("processes", []):
            if p.get("incarnation", -1) >= 0:
                starts.add_metric([p["role"], str(p["index"])], float(restarts(p["role"], p["incarnation"])))
        yield starts


def _stages(st: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [p for p in (st or {}).get("processes", []) if p.get("role") == "stage"]


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dejavu_requests", "HTTP generation requests, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        for endpoint in ENDPOINTS:
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)  # every series exists from the start, at 0
        self.ttft = Histogram("dejavu_time_to_first_token_seconds", "arrival of a request to its first token",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("dejavu_time_per_output_token_seconds", "mean seconds between a request's tokens "
                              "after the first", ["endpoint"], buckets=TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("dejavu_request_latency_seconds", "arrival of a request to its last token",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dejavu_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("dejavu_generation_tokens", "tokens generated (handed out)", registry=r)
        self.in_flight = Gauge("dejavu_front_requests_in_flight", "requests the front holds now", registry=r)
        self.status = StatusCollector()
        r.register(self.status)

    def outcome(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint, outcome).inc()

    def served(self, endpoint: str, ttft: float | None, tpot: float | None, latency: float, tokens: int) -> None:
        if ttft is not None:
            self.ttft.labels(endpoint).observe(ttft)
        if tpot is not None:
            self.tpot.labels(endpoint).observe(tpot)
        self.latency.labels(endpoint).observe(latency)
        self.generation_tokens.inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
