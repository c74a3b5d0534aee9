"""Where a serving decode step loses against the bare runtime's (issue 20's lean step) - a lead, not a figure of
record. One process, one GPU, an OPT-shaped model with random weights: for each batch, every slot holding
`--context` cached tokens,
- `runtime`: ShardRuntime.forward of one decode step (what `dejavu-bench pipeline` calls the baseline);
- `stage`: StageCore.run of the same step as a StepRequest (token ids embedded, forward, greedy sampling, the
  tokens read back to the host) - the stage's compute thread's whole work for a step;
- its parts, each synchronised: embed, forward, sample, the read-back;
- `events`: the span between CUDA events recorded around StageCore.run, as a stage's status() busy_s counts it;
- the host time StageCore.run spends before its first GPU wait, and a torch.profiler table of 10 stage steps.

    python bench/profile_step.py [--shape opt-13b] [--batches 8,48] [--context 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline_bench import SHAPES, write_model  # noqa: E402
from bus.messages import Chunk, Sampling, StepRequest  # noqa: E402
from stages.batch import SeqChunk  # noqa: E402
from stages.layers.sampling import SamplingParams, sample  # noqa: E402
from stages.runtime import ShardConfig  # noqa: E402
from stages.stage import StageCore  # noqa: E402


def timed(fn, repeats: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"median_ms": statistics.median(times[3:]) * 1e3, "min_ms": min(times[3:]) * 1e3}


def profile_batch(model: Path, batch: int, context: int, max_seq_len: int, repeats: int,
                  trace_dir: Path | None = None) -> dict:
    core = StageCore(ShardConfig(model, None, batch, max_seq_len, "bfloat16", "cuda"))
    rt = core.runtime
    ids = torch.randint(3, 1000, (context,)).tolist()
    for s in range(batch):
        rt.forward([SeqChunk(s, 0, context)], rt.embed_input(ids))
    chunks = [SeqChunk(i, context, 1) for i in range(batch)]
    token = rt.embed_input([5] * batch)
    step = StepRequest(0, 0, 0, [Chunk(i, context, 1) for i in range(batch)], [5] * batch,
                       [Sampling()] * batch)
    out: dict = {"batch": batch, "context": context}
    out["runtime"] = timed(lambda: rt.forward(chunks, token), repeats)
    out["stage"] = timed(lambda: core.run(step, None), repeats)
    out["embed"] = timed(lambda: rt.embed_input(step.token_ids), repeats)
    out["forward_from_embed"] = timed(lambda: rt.forward(chunks, rt.embed_input(step.token_ids)), repeats)
    logits = rt.forward(chunks, token)
    params = [SamplingParams() for _ in range(batch)]
    positions = [context + 1] * batch
    out["sample"] = timed(lambda: sample(logits, params, positions), repeats)
    toks = sample(logits, params, positions)
    out["tolist"] = timed(lambda: toks.tolist(), repeats)
    spans, host = [], []
    for _ in range(repeats + 3):  # as stages/proc.py counts a step: events around the call, the call's host time
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        a.record()
        core.run(step, None)
        b.record()
        host.append(time.perf_counter() - t)
        b.synchronize()
        spans.append(a.elapsed_time(b))
    out["events"] = {"median_ms": statistics.median(spans[3:]), "min_ms": min(spans[3:])}
    out["stage_call_wall"] = {"median_ms": statistics.median(host[3:]) * 1e3}
    out["stage_over_runtime"] = out["stage"]["median_ms"] / out["runtime"]["median_ms"]
    out["events_over_runtime"] = out["events"]["median_ms"] / out["runtime"]["median_ms"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            core.run(step, None)
        torch.cuda.synchronize()
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_dir / f"inprocess-b{batch}-trace.json"))
    out["profile_cpu"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    out["profile_cuda"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    core = rt = None  # type: ignore[assignment]  # the next batch needs the memory (graphs hold cycles)
    gc.collect()
    torch.cuda.empty_cache()
    return out


def gaps(trace: Path, top: int = 12) -> str:
    """A Chrome trace (torch.profiler's, of a stage's steps or of this script's): per step (a gap of 2 ms+ with no
    device work separates steps), the span from its first device activity to its last, the device's busy time
    in it, and the largest idle gaps inside steps with the host operators running when each began."""
    ev = json.loads(trace.read_text())["traceEvents"]
    dev = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in ev
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    cpu = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in ev
           if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime", "python_function")]
    if not dev:
        return f"{trace}: no device activity"
    steps, cur = [], [dev[0]]
    for d in dev[1:]:
        if d[0] - max(c[1] for c in cur) > 2000:
            steps.append(cur)
            cur = []
        cur.append(d)
    steps.append(cur)
    lines, inner = [], []
    for st in steps:
        end = max(d[1] for d in st)
        busy, last = 0.0, st[0][0]
        for a, b, name in st:
            if a > last:
                inner.append((a - last, last, name))
            busy += max(0.0, b - max(a, last))
            last = max(last, b)
        lines.append(f"step: span {(end - st[0][0]) / 1e3:.3f} ms, device busy {busy / 1e3:.3f} ms, "
                     f"{len(st)} device ops")
    lines.append(f"idle inside steps: {sum(g for g, _, _ in inner) / 1e3 / len(steps):.3f} ms per step")
    for g, at, nxt in sorted(inner, reverse=True)[:top]:
        running = sorted((b - a, n) for a, b, n in cpu if a <= at <= b)[:3]
        lines.append(f"  gap {g / 1e3:.3f} ms before {nxt[:50]!r}; host ops then: "
                     + ", ".join(n[:40] for _, n in running))
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--gaps":
        print(gaps(Path(sys.argv[2])))
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="opt-13b", choices=sorted(SHAPES))
    p.add_argument("--batches", default="8,48")
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--max-seq-len", type=int, default=0, help="0: context + 128")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    model = write_model(args.shape, Path(tempfile.mkdtemp()))
    res = {"shape": args.shape, "card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv), "batches": []}
    for b in [int(x) for x in args.batches.split(",")]:
        r = profile_batch(model, b, args.context, args.max_seq_len or args.context + 128, args.repeats, args.out)
        res["batches"].append(r)
        print(f"batch {b}: " + ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in r.items()
                                          if isinstance(v, dict)) +
              f"; stage/runtime {r['stage_over_runtime']:.3f}x, events/runtime {r['events_over_runtime']:.3f}x",
              flush=True)
        print(r["profile_cpu"], flush=True)
        print(r["profile_cuda"], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_step.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
