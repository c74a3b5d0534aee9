"""A discrete-event simulator of colocated and disaggregated (prompt/token) pipeline deployments.

What it models, per replica (a deployment of `gpus` GPUs is `replicas` identical pipelines behind a router that
sends each arrival to the replica with the fewest requests in it):
- colocated: one pipeline of D stages, M microbatches of B slots, each microbatch with at most one step in flight
  (bus/scheduler.py): a request joins a microbatch at its next step with its whole prompt as one chunk, a
  finished one frees its slot at once, so prompt passes share the pipeline with decode steps (the bubbles);
- disaggregated: a prompt pipeline of Dp stages (a microbatch = up to B waiting prompts, run as one pass,
  slowed by `stream_slowdown` m; the last stage samples the first token) and a token pipeline of Dt stages
  (decode steps only). As dejavu-serve does (bus/disagg.py), every prompt of a pass holds a prompt slot, of
  `recv_slots` passes' worth (prompt stages + 1 by default), from its pass's start until it has taken a token
  slot: a prompt that found none waits there, parked (the paper's flow control: when every prompt slot is held,
  back-pressure stalls the prompt pipeline). A pass starts with as many waiting prompts as free prompt slots
  allow, streams each prompt stage's layers over its link (bytes / bandwidth, layer by layer overlapped with the
  pass by `overlap`), and its prompts join the token side as token slots free.
Stages are FIFO servers; a step's time on a stage is `LayerTimes.stage_steps` (per-layer times as an affine
function of prompt tokens / decode batch, measured by recovery/profiler.py). A tandem line of FIFO servers keeps
its customers' order, so a step's whole path through the pipeline is computed when it is issued: one event per
step, not per stage, which is what makes 1,000 GPUs and thousands of requests take seconds.
Failures: a stage dies at `at_s`; its pipeline's steps in flight are void (a new epoch); it serves again after
detection + restart (+ the restore of the dead stage's KV from its replica), or every request in it is
recomputed (prompt + committed tokens as one prompt chunk, as bus/controller_stages.py does).

Pure Python, no torch, deterministic: the same config and requests give the same figures. Its inputs (per-layer
times, the deployment, failures, workloads) are in recovery/sim_config.py.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from recovery.sim_config import (  # noqa: F401 - the simulator's vocabulary, imported from here by its users
    MODES,
    RECOVERY_MODES,
    Failure,
    LayerTimes,
    Request,
    SimConfig,
    layer_split,
    loadgen_workload,
    poisson_workload,
)

# ---------------------------------------------------------------- the simulation's parts


class _Req:
    __slots__ = ("i", "arrival", "prompt", "output", "generated", "first", "end", "prefill", "replica")

    def __init__(self, i: int, r: Request) -> None:
        self.i, self.arrival, self.prompt, self.output = i, r.arrival_s, r.prompt_len, r.output_len
        self.generated, self.first, self.end = 0, -1.0, -1.0
        self.prefill = True  # its next step carries prompt + committed tokens as one chunk
        self.replica = -1


class _Stages:
    """A chain of FIFO servers. `run` books a step on every stage in turn and returns its (start, end) spans.
    From `track_from` on (the replica's first failure) the spans are kept, so a failure can void them."""

    def __init__(self, layers: list[int], track_from: float | None) -> None:
        self.layers = layers
        self.free = [0.0] * len(layers)
        self.busy = [0.0] * len(layers)
        self.track_from = math.inf if track_from is None else track_from
        self.spans: list[list[tuple[float, float]]] | None = None if track_from is None else [[] for _ in layers]

    def run(self, t: float, costs: Sequence[float]) -> list[tuple[float, float]]:
        out = []
        free, busy = self.free, self.busy
        for s, c in enumerate(costs):
            start = t if t > free[s] else free[s]
            t = free[s] = start + c
            busy[s] += c
            out.append((start, t))
            if self.spans is not None and t > self.track_from:
                self.spans[s].append((start, t))
        return out

    def run_end(self, t: float, costs: Sequence[float]) -> float:
        """`run` for a caller that needs only the end (the hot path: every microbatch step)."""
        if self.spans is not None:
            return self.run(t, costs)[-1][1]
        free, busy = self.free, self.busy
        for s, c in enumerate(costs):
            start = t if t > free[s] else free[s]
            t = free[s] = start + c
            busy[s] += c
        return t

    def void_after(self, t: float, resume: float) -> None:
        """A failure at t: work booked past t never happened; every stage is free again at `resume`."""
        for s in range(len(self.layers)):
            spans = self.spans[s] if self.spans is not None else []
            while spans and spans[-1][1] > t:
                a, b = spans.pop()
                self.busy[s] -= b - max(a, t)
            self.free[s] = resume


class _Microbatch:
    __slots__ = ("members", "in_flight")

    def __init__(self) -> None:
        self.members: list[_Req] = []  # fixed while a step is in flight: it is the step's
        self.in_flight = False


class _Sim:
    def __init__(self, cfg: SimConfig, requests: Sequence[Request], failures: Sequence[Failure]) -> None:
        self.cfg = cfg
        self.heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = 0
        self.now = 0.0
        self.reqs = [_Req(i, r) for i, r in enumerate(requests)]
        self.tokens = 0
        self.timeline: list[tuple[float, int]] = []  # (time, tokens so far) after every step's commits
        self.failures_out: list[dict[str, Any]] = []
        first = {f.replica: f.at_s for f in sorted(failures, key=lambda f: -f.at_s)}  # each replica's first
        self.replicas = [_Replica(self, k, first.get(k)) for k in range(cfg.replicas)]
        self.outstanding = [0] * cfg.replicas
        for f in failures:
            if f.replica >= cfg.replicas:
                raise ValueError(f"failure in replica {f.replica}, but there are {cfg.replicas}")
            self.push(f.at_s, self.replicas[f.replica].fail, f)
        for r in self.reqs:
            self.push(r.arrival, self.arrive, r)

    def push(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, args))

    def run(self) -> int:
        events = 0
        heap = self.heap
        while heap:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            fn(*args)
            events += 1
        return events

    def arrive(self, r: _Req) -> None:
        k = min(range(len(self.outstanding)), key=self.outstanding.__getitem__)
        self.outstanding[k] += 1
        r.replica = k
        self.replicas[k].admit(r)

    def commit(self, r: _Req) -> bool:
        """One token of r is committed now; True when r is done. (The caller extends the timeline.)"""
        if r.first < 0:
            r.first = self.now
        r.generated += 1
        self.tokens += 1
        if r.generated >= r.output:
            r.end = self.now
            self.outstanding[r.replica] -= 1
            return True
        return False


class _Pipe:
    """A pipeline that runs microbatch steps (colocated, or the token side): takes members from `source`."""

    def __init__(self, sim: _Sim, stages: int, take: Callable[[int], list[_Req]], track: float | None) -> None:
        cfg = sim.cfg
        self.sim, self.take = sim, take
        self.stages = _Stages(layer_split(cfg.layers, stages, cfg.head_layers), track)
        self.mbs = [_Microbatch() for _ in range(cfg.microbatches or stages)]
        self.epoch = 0
        self.down = False
        self.used = self.max_used = 0  # slots holding a request
        self.decode_costs: dict[int, list[float]] = {}  # per batch: a decode step's time on each stage

    def wake(self) -> None:
        if self.down:
            return
        for mb in self.mbs:
            if not mb.in_flight:
                self.issue(mb)

    def issue(self, mb: _Microbatch) -> None:
        sim, cfg = self.sim, self.sim.cfg
        free = cfg.microbatch_size - len(mb.members)
        if free > 0:
            new = self.take(free)
            if new:
                mb.members.extend(new)
                self.used += len(new)
                self.max_used = max(self.max_used, self.used)
        if not mb.members:
            mb.in_flight = False
            return
        prompt_tokens = decodes = 0
        for r in mb.members:
            if r.prefill:
                prompt_tokens += r.prompt + r.generated
            else:
                decodes += 1
        if prompt_tokens:
            costs = cfg.times.stage_steps(self.stages.layers, prompt_tokens, decodes)
        else:
            costs = self.decode_costs.get(decodes) or self.decode_costs.setdefault(
                decodes, cfg.times.stage_steps(self.stages.layers, 0, decodes))
        end = self.stages.run_end(sim.now, costs)
        mb.in_flight = True
        sim.push(end, self.done, mb, self.epoch)

    def done(self, mb: _Microbatch, epoch: int) -> None:
        if epoch != self.epoch:
            return  # voided by a failure
        sim = self.sim
        keep = []
        commit = sim.commit
        for r in mb.members:
            r.prefill = False
            if not commit(r):
                keep.append(r)
        sim.timeline.append((sim.now, sim.tokens))
        self.used -= len(mb.members) - len(keep)
        mb.members, mb.in_flight = keep, False
        self.issue(mb)

    def fail(self, f: Failure) -> dict[str, Any]:
        sim = self.sim
        self.epoch += 1
        members = [r for mb in self.mbs for r in mb.members]
        restore_s = 0.0
        if f.recovery == "replica":
            layers = self.stages.layers[min(f.stage, len(self.stages.layers) - 1)]
            cached = sum(r.prompt + r.generated - (1 if r.generated else 0) for r in members if not r.prefill)
            restore_s = layers * cached * sim.cfg.kv_bytes_per_token_layer * 8 / (f.restore_gbps * 1e9)
        recompute = members if f.recovery == "recompute" else []  # with those whose prompt step was voided
        for r in recompute:
            r.prefill = True
        resume = sim.now + f.detect_s + f.restart_s + restore_s
        self.stages.void_after(sim.now, resume)
        for mb in self.mbs:
            mb.in_flight = False
        self.down = True
        sim.push(resume, self.resume, self.epoch)
        return {"restore_s": restore_s, "resumed_at_s": resume, "in_flight_requests": len(members),
                "recomputed_requests": len(recompute),
                "recomputed_tokens": sum(r.prompt + r.generated for r in recompute)}

    def resume(self, epoch: int) -> None:
        if epoch == self.epoch:  # else a later failure moved the resumption
            self.down = False
            self.wake()


class _Replica:
    """One pipeline (colocated) or one prompt pipeline + one token pipeline (disaggregated)."""

    def __init__(self, sim: _Sim, index: int, track: float | None) -> None:
        cfg = sim.cfg
        self.sim, self.index = sim, index
        self.waiting: deque[_Req] = deque()
        self.wake_pending = False
        if cfg.mode == "colocated":
            self.pipe = _Pipe(sim, cfg.stages, self._take_waiting, track)
            self.prompt: _PromptSide | None = None
        else:
            self.prompt = _PromptSide(sim, self, track)
            self.pipe = _Pipe(sim, cfg.token_stages, self.prompt.take_received, track)

    def _take_waiting(self, n: int) -> list[_Req]:
        w = self.waiting
        if not w:
            return []
        return [w.popleft() for _ in range(min(n, len(w)))]

    def admit(self, r: _Req) -> None:
        """r waits; steps are formed once every arrival of this instant is in (as the controller's loop takes
        every message it has before it schedules)."""
        self.waiting.append(r)
        if not self.wake_pending:
            self.wake_pending = True
            self.sim.push(self.sim.now, self._wake)

    def _wake(self) -> None:
        self.wake_pending = False
        if self.prompt is None:
            self.pipe.wake()
        else:
            self.prompt.start()

    def fail(self, f: Failure) -> None:
        sim = self.sim
        entry: dict[str, Any] = {"at_s": sim.now, "replica": self.index, "pipeline": f.pipeline, "stage": f.stage,
                                 "recovery": f.recovery, "detect_s": f.detect_s, "restart_s": f.restart_s}
        if self.prompt is not None and f.pipeline == "prompt":
            entry.update(self.prompt.fail(f))
        else:
            if self.prompt is not None:
                self.prompt.lose_received()
            entry.update(self.pipe.fail(f))
        sim.failures_out.append(entry)


class _PromptSide:
    """The prompt pipeline, its links to the token side, and the token side's receive slots."""

    def __init__(self, sim: _Sim, replica: _Replica, track: float | None) -> None:
        cfg = sim.cfg
        self.sim, self.replica = sim, replica
        self.stages = _Stages(layer_split(cfg.layers, cfg.prompt_stages), track)
        self.link_free = [0.0] * cfg.prompt_stages
        self.slots = (cfg.recv_slots or cfg.prompt_stages + 1) * cfg.microbatch_size  # prompt slots
        self.free_slots = self.slots
        self.max_in_use = 0
        self.received: deque[list[_Req]] = deque()  # per prompt microbatch, its requests not yet in a token slot
        self.in_flight: dict[int, list[_Req]] = {}
        self.batch_id = 0
        self.epoch = 0
        self.down = False
        self.wake_at = -1.0
        self.stall_since = -1.0
        self.stall_s = 0.0

    def start(self) -> None:
        """Start prompt microbatches while stage 0 is free, prompts wait and a prompt slot is free."""
        sim, cfg = self.sim, self.sim.cfg
        waiting = self.replica.waiting
        while waiting and not self.down:
            if self.stages.free[0] > sim.now:
                if self.wake_at != self.stages.free[0]:
                    self.wake_at = self.stages.free[0]
                    sim.push(self.wake_at, self.start)
                return
            if self.free_slots == 0:
                if self.stall_since < 0:
                    self.stall_since = sim.now
                return
            if self.stall_since >= 0:
                self.stall_s += sim.now - self.stall_since
                self.stall_since = -1.0
            batch = [waiting.popleft() for _ in range(min(cfg.microbatch_size, len(waiting), self.free_slots))]
            self.free_slots -= len(batch)
            self.max_in_use = max(self.max_in_use, self.slots - self.free_slots)
            self._run(batch)

    def _run(self, batch: list[_Req]) -> None:
        sim, cfg = self.sim, self.sim.cfg
        tokens = sum(r.prompt + r.generated for r in batch)
        spans = self.stages.run(sim.now, cfg.times.stage_steps(self.stages.layers, tokens, 0, cfg.stream_slowdown))
        received = spans[-1][1]
        if cfg.link_gbps > 0:
            for s, ((a, b), n) in enumerate(zip(spans, self.stages.layers)):
                dur = n * tokens * cfg.kv_bytes_per_token_layer * 8 / (cfg.link_gbps * 1e9)
                exposed = max(dur / n, dur - cfg.overlap * (b - a))  # the last layer always goes after the pass
                done = max(b + exposed, self.link_free[s] + dur)
                self.link_free[s] = done
                received = max(received, done)
        self.batch_id += 1
        self.in_flight[self.batch_id] = batch
        sim.push(spans[-1][1], self._first_tokens, batch, self.epoch)
        sim.push(received, self._received, self.batch_id, self.epoch)

    def _first_tokens(self, batch: list[_Req], epoch: int) -> None:
        if epoch == self.epoch:
            for r in batch:
                r.prefill = False
                self.sim.commit(r)
            self.sim.timeline.append((self.sim.now, self.sim.tokens))

    def _received(self, bid: int, epoch: int) -> None:
        if epoch != self.epoch:
            return
        ran = self.in_flight.pop(bid)
        batch = [r for r in ran if r.end < 0]
        if self.replica.pipe.down:  # streamed into a dead token stage: that part of the prompt KV is lost
            for r in batch:
                r.prefill = True
        if batch:
            self.received.append(batch)
            self.replica.pipe.wake()
        if len(batch) < len(ran):  # (ended at their first token: their prompt slots free now)
            self._release(len(ran) - len(batch))

    def _release(self, n: int) -> None:
        self.free_slots += n
        self.start()

    def take_received(self, n: int) -> list[_Req]:
        out: list[_Req] = []
        while self.received and len(out) < n:
            group = self.received[0]
            k = min(n - len(out), len(group))
            out += group[:k]
            del group[:k]
            if not group:
                self.received.popleft()
        if out:
            self._release(len(out))
        return out

    def lose_received(self) -> None:
        """The token side failed: prompt KV waiting in its receive slots is not replicated; recompute it there."""
        for group in self.received:
            for r in group:
                r.prefill = True

    def fail(self, f: Failure) -> dict[str, Any]:
        sim = self.sim
        self.epoch += 1
        # passes in flight, and the parked prompts (their KV is in the prompt stages' pools), run again
        voided = list(self.received) + list(self.in_flight.values())
        self.in_flight.clear()
        self.received.clear()
        back = [r for batch in voided for r in batch if r.end < 0]
        for r in reversed(back):
            r.prefill = True
            self.replica.waiting.appendleft(r)
        self.free_slots += sum(len(batch) for batch in voided)
        resume = sim.now + f.detect_s + f.restart_s
        self.stages.void_after(sim.now, resume)
        self.link_free = [min(x, sim.now) for x in self.link_free]
        self.down = True
        sim.push(resume, self._resume, self.epoch)
        return {"restore_s": 0.0, "resumed_at_s": resume, "in_flight_requests": len(back),
                "recomputed_requests": len(back), "recomputed_tokens": sum(r.prompt + r.generated for r in back)}

    def _resume(self, epoch: int) -> None:
        if epoch == self.epoch:
            self.down = False
            self.start()


# ---------------------------------------------------------------- running and figures


def simulate(cfg: SimConfig, requests: Sequence[Request], failures: Sequence[Failure] = ()) -> dict[str, Any]:
    """Run the deployment over `requests` (with `failures`) to the end; its figures as a JSON-able dict."""
    import time

    from bus.loadgen import percentiles

    for f in failures:
        depth = cfg.stages if cfg.mode == "colocated" else (
            cfg.prompt_stages if f.pipeline == "prompt" else cfg.token_stages)
        if f.stage >= depth:
            raise ValueError(f"failure of stage {f.stage}, but the {f.pipeline} pipeline has {depth} stages")
    t0 = time.perf_counter()
    sim = _Sim(cfg, requests, failures)
    events = sim.run()
    done = [r for r in sim.reqs if r.end >= 0]
    makespan = max((r.end for r in done), default=0.0)
    out: dict[str, Any] = {
        "mode": cfg.mode, "gpus": cfg.gpus, "replicas": cfg.replicas, "microbatch_size": cfg.microbatch_size,
        **({"stages": cfg.stages} if cfg.mode == "colocated" else
           {"prompt_stages": cfg.prompt_stages, "token_stages": cfg.token_stages}),
        "microbatches": cfg.microbatches or (cfg.stages if cfg.mode == "colocated" else cfg.token_stages),
        "requests": len(sim.reqs), "completed": len(done), "generated_tokens": sim.tokens, "makespan_s": makespan,
        "tokens_per_s": sim.tokens / makespan if makespan > 0 else None,
        "steady_tokens_per_s": steady_rate(sim.timeline),
        "requests_per_s": len(done) / makespan if makespan > 0 else None,
        "normalized_latency_s": percentiles([(r.end - r.arrival) / r.output for r in done]),
        "ttft_s": percentiles([r.first - r.arrival for r in done]),
        "tpot_s": percentiles([(r.end - r.first) / (r.output - 1) for r in done if r.output > 1]),
        "idle_fraction": idle_fractions(sim, makespan),
        "events": events, "wall_s": time.perf_counter() - t0,
    }
    if cfg.mode == "disaggregated":
        sides = [rep.prompt for rep in sim.replicas if rep.prompt is not None]
        out["receive_slots"] = {"slots": sides[0].slots, "max_in_use": max(p.max_in_use for p in sides),
                                "prompt_stall_s": sum(p.stall_s for p in sides) / len(sides)}
    out["token_slots"] = {"slots": cfg.microbatch_size * len(sim.replicas[0].pipe.mbs),
                          "max_in_use": max(rep.pipe.max_used for rep in sim.replicas)}
    if failures:
        out["failures"] = sim.failures_out
    return out


def steady_rate(timeline: list[tuple[float, int]]) -> float | None:
    """Tokens per second between the steps that committed the 10% and the 90% marks of all tokens: the rate
    without the ramp-up and the drain of the longest outputs."""
    if len(timeline) < 10:
        return None
    total = timeline[-1][1]
    counts = [n for _, n in timeline]
    a = timeline[bisect.bisect_left(counts, total * 0.1)]
    b = timeline[bisect.bisect_left(counts, total * 0.9)]
    return (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else None


def idle_fractions(sim: _Sim, makespan: float) -> dict[str, Any]:
    """1 - busy / makespan for every stage; `per_stage` names replica 0's (p<i>: prompt, t<i>: token, <i>:
    colocated), `mean` / `max` / `min` are over every GPU of the deployment."""
    per: dict[str, float] = {}
    every: list[float] = []
    for k, rep in enumerate(sim.replicas):
        chains = ([("p", rep.prompt.stages)] if rep.prompt is not None else []) + [
            ("t" if rep.prompt is not None else "", rep.pipe.stages)]
        for tag, st in chains:
            for i, b in enumerate(st.busy):
                f = max(0.0, 1.0 - b / makespan) if makespan > 0 else 1.0
                every.append(f)
                if k == 0:
                    per[f"{tag}{i}"] = f
    return {"per_stage": per, "mean": sum(every) / len(every), "min": min(every), "max": max(every)}


def summary_line(r: dict[str, Any]) -> str:
    """A simulation's figures in one line (for stderr)."""
    shape = (f"{r['stages']} stages" if r["mode"] == "colocated"
             else f"{r['prompt_stages']} prompt + {r['token_stages']} token stages")
    nl, tt = r["normalized_latency_s"], r["ttft_s"]

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    return (f"{r['mode']} {shape} x{r['replicas']}, microbatch {r['microbatch_size']}: {r['completed']}/"
            f"{r['requests']} done, {fmt(r['tokens_per_s'])} tok/s (steady {fmt(r['steady_tokens_per_s'])}); "
            f"normalized latency p50 {fmt(nl['p50'])} p95 {fmt(nl['p95'])} s/token; TTFT p50 {fmt(tt['p50'])} "
            f"p95 {fmt(tt['p95'])} s; idle {r['idle_fraction']['mean']:.0%} on average")
