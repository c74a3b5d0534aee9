"""Where does a transfer's host time go? Sampled profiles (py-spy, raw stacks) of the streamer's hot paths while
they run for a few seconds each:

  peer_stream   in this process (the library, no sockets): prompt layers to a peer GPU, 8 in flight
  nccl_single   through two streamer processes: one prompt layer at a time, GPU pool -> GPU pool over NCCL
  nccl_stream   the same with 8 in flight
  tcp_single    one prompt layer at a time into a replica pool over ZeroMQ frames
  tcp_stream    the same with 8 in flight
  *_prompt      a microbatch's whole prompt KV (16 layers, 512 MiB) in one transfer, one at a time

Each phase reports its rate and, where py-spy is on PATH, writes `<phase>-<process>.txt` (py-spy's raw format:
one stack per line with its sample count) into OUT_DIR; `python3 bench/probe_remote.py --summary OUT_DIR` prints
the hottest functions of each. On a CPU-only host only the TCP phases run (from a shared-memory pool).

    python3 bench/probe_remote.py OUT_DIR [--seconds 3] [--streamer-args "--switch-interval-us 5000"] [--no-local]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.streamer_e2e import _gib, _start, remote_pools  # noqa: E402
from bench.streamer_ops import Lib  # noqa: E402
from streamer import wire  # noqa: E402
from streamer.client import StreamerClient  # noqa: E402
from streamer.layout import (
    PoolLayout,
    Region,  # noqa: E402
)


def spy(pid: int, path: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "400",
                             "--nonblocking", "-t", "-f", "raw", "-o", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def phase(name: str, out: Path, pids: dict[str, int], seconds: float, one: Any, in_flight: int,
                nbytes: int, results: dict[str, Any]) -> None:
    """Run `one()` with `in_flight` at a time for `seconds` under py-spy (sampling every pid of `pids`)."""
    for _ in range(3):
        await one()  # warm-up
    spies = [spy(pid, out / f"{name}-{who}.txt", seconds) for who, pid in pids.items()]
    await asyncio.sleep(0.3)  # py-spy attaches
    t0, c0 = time.perf_counter(), time.thread_time()
    n = 0

    async def worker() -> None:
        nonlocal n
        while time.perf_counter() - t0 < seconds:
            await one()
            n += 1

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    dt = time.perf_counter() - t0
    results[name] = {"transfers": n, "gbps": n * nbytes / dt / 1e9, "us_per_transfer": dt / n * 1e6,
                     "this_loop_cpu_us_per_transfer": (time.thread_time() - c0) / n * 1e6}
    print(name, json.dumps(results[name]), flush=True)
    for s in spies:
        if s is not None:
            s.wait(30)


async def main(out: Path, seconds: float, streamer_args: list[str], local_too: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    lay = PoolLayout(0, 16, 8, 1024, 8, 128, torch.bfloat16)
    layers = [Region.uniform(range(8), (k, k + 1), 0, 1000) for k in range(16)]
    nbytes = layers[0].nbytes(lay)
    results: dict[str, Any] = {"bytes": nbytes, "gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu",
                               "streamer_args": streamer_args}
    turn = iter(range(1 << 30))

    def layer() -> Region:  # a stream of layers, as a prompt pass sends them
        return layers[next(turn) % len(layers)]

    if on_gpu and local_too:
        lib = Lib(True, staging_bytes=16 << 20)
        await lib.start()
        src, dst = lib.endpoint("s", lay, "cuda:0"), lib.endpoint("d", lay, "cuda:1")

        async def local() -> None:
            r = layer()
            await lib.transfer(src, r, dst, r, True).run()

        await phase("peer_stream", out, {"self": os.getpid()}, seconds, local, 8, nbytes, results)
        await lib.close()
    d = tempfile.mkdtemp(prefix="dvp")
    os.environ["DEJAVU_STREAMER_TRACE"] = str(out / "trace")  # the streamers' step timelines (streamer/trace.py)
    procs = [_start("h0", d, "h1", streamer_args),
             _start("h1", d, "h0", ["--replica-gib", _gib(lay.nbytes), *streamer_args])]
    c0, c1 = StreamerClient(f"ipc://{d}/h0.c", "probe-p"), StreamerClient(f"ipc://{d}/h1.c", "probe-t")
    try:
        await c0.status(timeout=120)
        await c1.status(timeout=120)
        pids = {"h0": procs[0].pid, "h1": procs[1].pid}
        src_mem, dst_mem = await remote_pools(c0, c1, lay, on_gpu)  # noqa: F841 - dst_mem: kept referenced
        client: list[tuple[int, float, float]] = []  # (xfer, request sent, answer received), monotonic
        whole = Region.uniform(range(8), (0, 16), 0, 1000)  # a microbatch's prompt KV, every layer, one transfer

        def to(dst: wire.PoolRef, region: Any) -> Any:
            async def one() -> None:
                r = region()
                t0 = time.monotonic()
                h = await c0.stream("p", r, dst=dst, dst_region=r)
                await h.wait(60)
                client.append((h.xfer, t0, h.received_at))
            return one

        paths = ([("nccl", wire.PoolRef("t", "h1"))] if on_gpu else []) + [("tcp", wire.PoolRef("rep", "h1"))]
        for path, dst in paths:
            for kind, k, region, size in (("single", 1, layer, nbytes), ("stream", 8, layer, nbytes),
                                          ("prompt", 1, lambda: whole, whole.nbytes(lay))):
                first = len(client)
                await phase(f"{path}_{kind}", out, pids, seconds, to(dst, region), k, size, results)
                results[f"{path}_{kind}"]["xfers"] = [client[first][0], client[-1][0]]
        await c0.unregister_pool("p")
        if on_gpu:
            await c1.unregister_pool("t")
        await c0.close()
        await c1.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
    (out / "trace" / "client.jsonl").write_text("".join(json.dumps(c) + "\n" for c in client))
    (out / "probe_remote.json").write_text(json.dumps(results, indent=1))
    timeline(out)


def timeline(out: Path) -> None:
    """Median time of each step of a transfer after the step before it (client -> h0 -> h1 -> h0 -> client),
    per phase, from the streamers' traces (DEJAVU_STREAMER_TRACE) and the client's own times."""
    results = json.loads((out / "probe_remote.json").read_text())
    tr = out / "trace"
    h0: dict[int, list[tuple[float, str]]] = collections.defaultdict(list)
    h1: dict[int, list[tuple[float, str]]] = collections.defaultdict(list)
    rseq_of: dict[int, int] = {}
    for f in tr.glob("h*-*.jsonl"):
        for line in f.read_text().splitlines():
            t, event, ids = json.loads(line)
            if f.name.startswith("h0-"):
                h0[ids[0]].append((t, event + ("" if len(ids) < 3 else f"#{ids[2]}")))
                if event == "open":
                    rseq_of[ids[0]] = ids[1]
            else:
                h1[ids[0]].append((t, "h1:" + event + ("" if len(ids) < 2 else f"#{ids[1]}")))
    client = {x: (a, b) for x, a, b in (json.loads(v) for v in (tr / "client.jsonl").read_text().splitlines())}
    for name, r in results.items():
        if not isinstance(r, dict) or "xfers" not in r:
            continue
        lo, hi = r["xfers"]
        steps: dict[str, list[float]] = collections.defaultdict(list)
        order: dict[str, int] = {}
        for x in range(lo, hi + 1):
            if x not in client:
                continue
            ev = [(client[x][0], "client:sent"), *h0.get(x, []), *h1.get(rseq_of.get(x, -1), []),
                  (client[x][1], "client:answer")]
            ev.sort()
            for k, ((t0, _), (t1, e)) in enumerate(zip(ev, ev[1:])):
                steps[e].append((t1 - t0) * 1e6)
                order.setdefault(e, k)
        print(f"== {name}: median us after the previous step")
        for e in sorted(steps, key=lambda e: order[e]):
            v = sorted(steps[e])
            print(f"  {e:24s} {v[len(v) // 2]:9.1f}   (n={len(v)})")


def summary(out: Path, top: int = 25) -> None:
    """The hottest functions (own samples, and inclusive) of each profile in `out`, per thread."""
    for f in sorted(out.glob("*.txt")):
        own: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        threads: collections.Counter[str] = collections.Counter()
        total = 0
        for line in f.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack:
                continue
            frames, k = stack.split(";"), int(n)
            total += k
            threads[frames[0]] += k
            own[frames[-1]] += k
            for fr in set(frames[1:]):
                incl[fr] += k
        print(f"== {f.name}: {total} samples")
        for k, v in threads.most_common(6):
            print(f"{v:7d}  thread {k}")
        for k, v in own.most_common(top):
            print(f"{v:7d}  own   {k}")
        for k, v in incl.most_common(top + 15):
            print(f"{v:7d}  incl  {k}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--summary", action="store_true", help="summarise the profiles and traces already in OUT")
    ap.add_argument("--streamer-args", default="", help="extra options for both streamer processes (an A/B)")
    ap.add_argument("--no-local", action="store_true", help="skip the in-process phase")
    a = ap.parse_args()
    if a.summary:
        summary(Path(a.out))
        timeline(Path(a.out))
    else:
        try:
            import uvloop
        except ImportError:
            uvloop = None
        (uvloop.run if uvloop is not None else asyncio.run)(main(Path(a.out), a.seconds, shlex.split(a.streamer_args),
                                                                 not a.no_local))
