"""`dejavu-demo`: the whole system in one command, on the embedded default model (no downloads).

Starts `dejavu-serve` (controller + N stage processes + supervisor) as a subprocess, sends concurrent
requests and prints their tokens as they stream in, prints throughput and latency, and stops the deployment
with SIGINT — checking it exits cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from bus.client import AsyncClient

PROMPTS = [
    "The pipeline has four stages and",
    "KV-cache streaming lets a failed stage",
    "Prompt tokens and decode tokens",
    "Microbatch swapping moves idle caches to",
    "Once upon a time, a GPU",
    "def fibonacci(n):",
    "Dear reader,",
    "DéjàVu resumes generation where it",
]


async def run_clients(address: str, n: int, max_new: int) -> None:
    async with AsyncClient(address, timeout=120) as c:
        st = await c.status()
        roles = ", ".join(f"{p['role']}{'' if p['role'] != 'stage' else ' ' + str(p['index'])} (pid {p['pid']})"
                          for p in st["processes"])
        print(f"deployment: {roles}")
        texts: dict[int, str] = {}
        t0 = time.perf_counter()

        async def one(i: int) -> tuple[float, float, int]:
            prompt = PROMPTS[i % len(PROMPTS)]
            start = time.perf_counter()
            first = None
            count = 0
            sampled = dict(temperature=0.8, top_k=20, seed=i) if i % 2 else {}
            async with c.stream(prompt, max_new_tokens=max_new, **sampled) as s:
                async for ev in s:
                    if first is None:
                        first = time.perf_counter() - start
                    count += len(ev.token_ids)
                    texts[i] = texts.get(i, "") + (ev.text or "")
                    if i == 0:  # show one stream live
                        print(ev.text or "", end="", flush=True)
            return first or 0.0, time.perf_counter() - start, count

        print(f"\n[request 0 streaming] {PROMPTS[0]}", end="", flush=True)
        stats = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
        print("\n")
        for i in range(1, n):
            print(f"[request {i}] {PROMPTS[i % len(PROMPTS)]}{texts.get(i, '')}")
        tokens = sum(s[2] for s in stats)
        ttft = [s[0] for s in stats]
        lat = [s[1] for s in stats]
        print(f"\n{n} concurrent requests, {tokens} tokens in {wall:.2f}s: {tokens / wall:.1f} tokens/s; "
              f"time to first token p50 {statistics.median(ttft) * 1e3:.0f} ms; "
              f"latency p50 {statistics.median(lat):.2f}s, max {max(lat):.2f}s; "
              f"normalized latency {statistics.mean(x / max(1, s[2]) for x, s in zip(lat, stats)) * 1e3:.1f} ms/token")


def main(argv: list[str] | None = None) -> int:
    from recovery.launch import Deployment

    p = argparse.ArgumentParser(prog="dejavu-demo", description=__doc__)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--startup-timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    print(f"starting: dejavu-serve --model default --stages {args.stages} --microbatch-size 4", flush=True)
    try:
        dep = Deployment.start("default", args.stages, "--microbatch-size", "4", timeout=args.startup_timeout,
                               log_level="WARNING")
    except RuntimeError as e:
        print(f"dejavu-demo: {e}", file=sys.stderr)
        return 1
    print(f"ready: {dep.address}", flush=True)
    try:
        asyncio.run(run_clients(dep.address, args.requests, args.max_new_tokens))
    finally:
        code = dep.stop()
    print(f"deployment stopped cleanly (exit code {code}, no process left behind)")
    return 0 if code == 0 else 1
