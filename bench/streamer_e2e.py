"""End-to-end part of `dejavu-bench streamer`, through two real streamer processes ("hosts" h0 and h1) at a
stage's request - this process plays the stages.

1. Remote transfers: CPU - a shared-memory stage pool on h0 -> a replica pool on h1 over TCP frames. GPU - a GPU
   pool on h0 (cuda:0) -> a GPU pool on h1 (cuda:1) over NCCL, and -> a replica pool in h1's pinned memory
   over TCP. Operations: one prompt layer, one decode step's KV, a microbatch's whole prompt KV in one transfer.
   Reported: the streamer's own transfer time (TransferDone.seconds) and the requester's wall clock, naive vs
   buffered (and buffered with checksums, a deployment's default for these routes), against the transport's
   ceiling; for a prompt layer also a stream of 32 of them, 8 in flight, each
   of the next layer ("stream_fraction").
2. Layer-by-layer streaming overhead on a real prompt pass: a random Llama stage (8 of 8B's 32 layers on GPU,
   a small one on CPU) computes into a pool registered with h0; as soon as a block has written its layer's KV
   (before its attention and MLP) a hook records the layer's event and sends LayerReady, and h0 streams that
   layer (GPU: to another GPU and to pinned memory) while the rest of the pass computes. Compared with the same
   prompt pass without streaming. The streamer is a separate process, as in a deployment, so the two never
   compete for one interpreter lock. Diagnostic shares on GPU: "events-only" (the stage records its
   interprocess events, nothing moves), "copies-only" (the streamer copies the same bytes from another pool on
   the stage's GPU during the pass, ungated) and "signals-only" (the whole per-layer path - events,
   LayerReady, the streamer's gating and waits - with one token per slot and layer to copy). Variants of each
   layered row: "<dst> direct-signal" (LayerReady sent from the compute thread itself, no hop through the
   stage's event loop), "<dst> block-end" (signalled when each block has run, the way before session 5),
   "<dst> checksummed" (checksums on, a deployment's default; on GPU the source digest is a kernel in the
   streamer's context on the stage's GPU) and "<dst> device-wait" (a streamer run with layer_wait="device":
   its copy stream waits on the stage's event, the default before session 5). Each row reports the whole pass
   until the last layer has landed ("overhead") and the stage's compute alone ("compute_overhead": what the
   stage's own work pays).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.streamer_ops import NcclPair, ceiling_zmq_best, gbps, median
from bus.loadgen import progress
from streamer import wire
from streamer.client import LayerSignal, StreamerClient, attach_kv_hooks, attach_layer_hooks
from streamer.layout import PoolLayout, Region

ROOT = Path(__file__).resolve().parents[1]


def _start(name: str, d: str, peer: str, extra: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "streamer", "--name", name, "--control", f"ipc://{d}/{name}.c", "--data",
            f"ipc://{d}/{name}.d", "--peer", f"{peer}=ipc://{d}/{peer}.d", "--no-checksums", *extra]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(f"{d}/{name}.log", "wb"), stderr=subprocess.STDOUT)


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30) + 0.01:.3f}"


def stage_model(on_gpu: bool, model_dir: str | Path) -> tuple[Path, tuple[int, int]]:
    """A random Llama model (config.json only: the stage draws its weights on its device, see
    stages/weights.random_fill) written to `model_dir`, and the layers one stage runs: 8 of an 8B model's 32 (a
    4-stage pipeline)."""
    from bench.runtime_bench import LLAMA3_8B

    if on_gpu:
        config, layers = {**LLAMA3_8B}, (0, 8)
    else:
        config = {**LLAMA3_8B, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
                  "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
                  "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2,
                  "rope_scaling": {**LLAMA3_8B["rope_scaling"], "original_max_position_embeddings": 64}}
        layers = (0, 4)
    config["dejavu_random_weights"] = {"seed": 0, "std": 0.02}
    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path, layers


def overhead_shape(on_gpu: bool) -> tuple[int, int, PoolLayout]:
    """(batch, prompt tokens, the stage's pool layout)."""
    batch, plen = (8, 1000) if on_gpu else (4, 128)
    kv, hd, layers = (8, 128, 8) if on_gpu else (4, 32, 4)
    return batch, plen, PoolLayout(0, layers, batch, plen + 8, kv, hd, torch.bfloat16)


async def _time(c: StreamerClient, src: Any, region: Region, dst: Any, dst_region: Region, buffered: bool,
                repeats: int, checksum: bool = False) -> tuple[float, float]:
    server, wall = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        done = await (await c.stream(src, region, dst=dst, dst_region=dst_region, buffered=buffered,
                                     checksum=checksum)).wait(120)
        if i:  # the first one warms up (and builds the NCCL link)
            server.append(done.seconds)
            wall.append(time.perf_counter() - t0)
    return median(server), median(wall)


def two_gpus() -> bool:
    """GPU pool -> GPU pool rows (NCCL, streaming to cuda:1) need a second GPU; a one-GPU host runs the rest."""
    return torch.cuda.device_count() > 1


async def remote_pools(c0: StreamerClient, c1: StreamerClient, lay: PoolLayout, on_gpu: bool) -> tuple[Any, Any]:
    """The pools of the remote rows: random bytes in a stage pool "p" registered with h0 (GPU: on cuda:0; CPU:
    shared memory), a stage pool "t" on cuda:1 registered with h1 (two GPUs or more) and a replica pool "rep"
    at h1.
    Returns (source memory, destination memory or None): the caller keeps both referenced while registered (the
    exporter frees an IPC allocation on collection) and unregisters "p" and "t" before they go."""
    dst_mem = None
    if on_gpu:
        from streamer.cuda import GpuPoolMemory

        src_mem: Any = GpuPoolMemory(lay, 0)
        if two_gpus():
            dst_mem = GpuPoolMemory(lay, 1)
            await c1.register_pool("t", dst_mem)
    else:
        from streamer.memory import SharedPoolMemory

        src_mem = SharedPoolMemory.create(lay)
    src_mem.tensor.view(torch.uint8).random_(0, 255)
    await c0.register_pool("p", src_mem)
    await c1.alloc_pool("rep", wire.POOL_REPLICA, lay)
    return src_mem, dst_mem


async def _stream(c: StreamerClient, src: Any, regions: list[Region], dst: Any, buffered: bool, count: int = 32,
                  window: int = 8, checksum: bool = False) -> float:
    """Seconds for `count` transfers with `window` in flight, each of the next region in turn (a prompt pass
    streamed layer by layer: a new layer each time), requested and waited for as a stage does."""
    gate = asyncio.Semaphore(window)

    async def one(k: int) -> None:
        async with gate:
            r = regions[k % len(regions)]
            await (await c.stream(src, r, dst=dst, dst_region=r, buffered=buffered, checksum=checksum)).wait(120)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(count)))
    return time.perf_counter() - t0


PROMPTS = 6  # whole prompts in the stream of prompts


def _modes(op: str) -> list[tuple[bool, bool]]:
    """(buffered, checksummed) of the remote rows. The bench's streamers run with --no-checksums;
    "checksummed" is what a deployment's default ("remote": every transfer to another streamer is verified)
    costs."""
    return [(False, False), (True, False)] + ([(True, True)] if op != "decode_step" else [])


async def remote(c0: StreamerClient, c1: StreamerClient, on_gpu: bool, repeats: int,
                 quiet: bool = False) -> list[dict[str, Any]]:
    mb, layers, prompt = (8, 16, 1000) if on_gpu else (4, 4, 256)
    lay = PoolLayout(0, layers, mb, prompt + 24, 8, 128, torch.bfloat16)
    src_mem, dst_mem = await remote_pools(c0, c1, lay, on_gpu)  # noqa: F841 - dst_mem: kept referenced
    slots = range(mb)
    cases = [("prompt_layer", Region.uniform(slots, (layers // 2, layers // 2 + 1), 0, prompt)),
             ("decode_step", Region.uniform(slots, (0, layers), prompt, prompt + 1)),
             # a microbatch's whole prompt KV (every layer) in one transfer: a prompt at rest handed to a token
             # stage, or a microbatch's replica; chunks pipelined within the transfer
             ("prompt", Region.uniform(slots, (0, layers), 0, prompt))]
    nccl = on_gpu and two_gpus()  # one GPU: the GPU pool -> host replica rows over TCP only
    dests = ([("nccl_gpu", wire.PoolRef("t", "h1"), "nccl")] if nccl else []) + \
        [("tcp_host", wire.PoolRef("rep", "h1"), "zmq_tcp")]
    pair = NcclPair() if nccl else None
    out = []
    bar = progress(sum(len(_modes(op)) for op, _ in cases) * len(dests), "end to end, remote", quiet, "figure")
    try:
        for op, region in cases:
            nbytes = region.nbytes(lay)
            for path, dst, ceiling in dests:
                frame = nbytes
                if ceiling == "nccl" and pair is not None:
                    ceil = pair.gbps(nbytes, repeats)
                else:  # the best frame size: the streamer chooses its own chunking too
                    ceil, frame = await ceiling_zmq_best(nbytes, repeats)
                for buffered, check in _modes(op):
                    server, wall = await _time(c0, "p", region, dst, region, buffered, repeats, check)
                    mode = ("buffered" if buffered else "naive") + (" checksummed" if check else "")
                    row = {"section": "e2e", "op": op, "path": path, "mode": mode,
                           "bytes": nbytes, "gbps": gbps(nbytes, server), "wall_gbps": gbps(nbytes, wall),
                           "wall_us": wall * 1e6, "ceiling": ceiling, "ceiling_gbps": ceil,
                           "ceiling_frame_bytes": frame, "fraction": gbps(nbytes, server) / ceil}
                    if op == "prompt_layer":  # a stream of layers, 8 in flight: the rate a prompt pass sustains
                        layer_regions = [region.sub_layers(k, k + 1) for k in range(layers)]
                        await _stream(c0, "p", layer_regions, dst, buffered, count=8, checksum=check)  # warm-up
                        secs = median([await _stream(c0, "p", layer_regions, dst, buffered, checksum=check)
                                       for _ in range(max(1, repeats // 2))])
                        row.update(stream_gbps=gbps(32 * nbytes, secs), stream_transfers=32, in_flight=8,
                                   stream_fraction=gbps(32 * nbytes, secs) / ceil)
                    elif op == "prompt":  # microbatches' prompts back to back, 2 in flight: one transfer's
                        # control-plane latency (request, open, last ack, answer: four process hops) overlaps
                        # the other's bytes - the rate a stream of prompts handed to token stages sustains
                        await _stream(c0, "p", [region], dst, buffered, count=2, window=2, checksum=check)  # warm-up
                        secs = median([await _stream(c0, "p", [region], dst, buffered, count=PROMPTS, window=2,
                                                     checksum=check) for _ in range(max(1, repeats // 3))])
                        row.update(stream_gbps=gbps(PROMPTS * nbytes, secs), stream_transfers=PROMPTS, in_flight=2,
                                   stream_fraction=gbps(PROMPTS * nbytes, secs) / ceil)
                    out.append(row)
                    bar.update(1)
    finally:
        bar.close()
        if pair is not None:
            pair.close()
        await c0.unregister_pool("p")
        if dst_mem is not None:
            await c1.unregister_pool("t")  # before dst_mem (the exporter's allocation) goes away
    return out


async def overhead(c0: StreamerClient, on_gpu: bool, repeats: int, model_dir: str | Path,
                   c_dev: StreamerClient | None = None, quiet: bool = False) -> list[dict[str, Any]]:
    """`c_dev`: a streamer on the same host run with layer_wait="device" (GPU): the layered rows once more
    through it, each named "<dst> device-wait"."""
    from stages.batch import SeqChunk
    from stages.runtime import ShardConfig, ShardRuntime

    path, layers = stage_model(on_gpu, model_dir)
    batch, plen, lay = overhead_shape(on_gpu)
    device = "cuda:0" if on_gpu else "cpu"
    target: Any = None  # a stage pool on cuda:1 (two GPUs or more): layers streamed to the peer GPU
    if on_gpu:
        from streamer.cuda import GpuPoolMemory

        mem: Any = GpuPoolMemory(lay, 0)
        target = GpuPoolMemory(lay, 1) if two_gpus() else None  # kept referenced while h0 has it mapped
        dests = [("pinned", "ov-h")]
        if target is not None:
            await c0.register_pool("ov-t", target)
            dests.insert(0, ("cuda:1", "ov-t"))
    else:
        from streamer.memory import SharedPoolMemory

        mem = SharedPoolMemory.create(lay)
        dests = [("host", "ov-h")]
    await c0.register_pool("ov-p", mem)
    await c0.alloc_pool("ov-h", wire.POOL_SWAP, lay)
    runtime = ShardRuntime(ShardConfig(path, layers=layers, num_slots=batch, max_seq_len=lay.max_seq_len,
                                       dtype="bfloat16", device=device), pool_memory=mem.tensor)
    ids = torch.randint(3, runtime.spec.vocab_size, (batch * plen,), generator=torch.Generator().manual_seed(0))
    chunks = [SeqChunk(i, 0, plen) for i in range(batch)]
    region = Region.uniform(range(batch), (lay.first_layer, lay.first_layer + lay.num_layers), 0, plen)
    stream = torch.cuda.current_stream(torch.device(device)) if on_gpu else None
    loop = asyncio.get_running_loop()
    compute = ThreadPoolExecutor(1)
    # rows: events-only and copies-only (GPU), signals-only, 4 per destination, device-wait per destination
    bar = progress((2 if on_gpu else 0) + 1 + (4 + (c_dev is not None)) * len(dests), "end to end, overhead", quiet,
                   "row")

    def forward() -> tuple[float, float]:  # the stage's compute thread: (seconds, monotonic time at the end)
        t0 = time.perf_counter()
        with torch.inference_mode():
            runtime.forward(chunks, runtime.embed_input(ids.tolist()))
        if stream is not None:
            stream.synchronize()  # the compute stream only
        return time.perf_counter() - t0, time.monotonic()

    out = []
    try:
        async def compare(dst: str, kv_bytes: int, before: Any, after: Any) -> None:
            """The prompt pass alone vs with `before()` set up just ahead of it and `after(state)` awaited
            once it ends (medians; the first round warms both up). If `after` returns a TransferHandle whose
            TransferDone has a timeline, the row also splits the last layer's path relative to the end of
            compute: cleared to move, copies issued, landed, TransferDone sent (wind-down), received here
            (delivery), and how long after compute ended it arrived (0 if before)."""
            base, comp, total = [], [], []
            tail: dict[str, list[float]] = {}
            for i in range(repeats + 1):
                b, _ = await loop.run_in_executor(compute, forward)
                state = await before()
                t0 = time.perf_counter()
                c, c_end = await loop.run_in_executor(compute, forward)
                h = await after(state)
                if i:
                    base.append(b)
                    comp.append(c)
                    total.append(time.perf_counter() - t0)
                    done = h.done.result() if h is not None else None
                    if getattr(done, "timeline", None):
                        last = done.timeline[-1]
                        for k, v in (("ready_before_compute_end_s", c_end - last.ready),
                                     ("fired_after_compute_end_s", last.fired - c_end),
                                     ("issue_s", last.issued - last.fired), ("copy_s", last.landed - last.issued),
                                     ("wind_down_s", done.sent_at - last.landed),
                                     ("delivery_s", h.received_at - done.sent_at),
                                     ("done_after_compute_end_s", max(0.0, h.received_at - c_end))):
                            tail.setdefault(k, []).append(v)
            b, c, t = median(base), median(comp), median(total)
            out.append({"section": "overhead", "dst": dst, "batch": batch, "prompt": plen, "prompt_s": b,
                        "streamed_compute_s": c, "streamed_total_s": t, "overhead": t / b - 1.0,
                        "compute_overhead": c / b - 1.0, "kv_bytes": kv_bytes, "layers": lay.num_layers,
                        "last_layer": {k: median(v) for k, v in tail.items()}})
            bar.update(1)

        async def remove(hooks: list[Any]) -> None:
            for hook in hooks:
                hook.remove()

        def layered(client: StreamerClient, part: Region, pool: str, direct: bool = False,
                    checksum: bool = False, block_end: bool = False) -> tuple[Any, Any]:
            """before/after for `compare`: stream `part` of the stage pool to `pool` layer by layer, signalled as
            soon as each layer has written its KV (`block_end`: when each block has run, the earlier way;
            `direct`: sent by the compute thread itself; `checksum`: as a deployment does by default - the
            bench's streamers run with --no-checksums)."""
            attach = attach_layer_hooks if block_end else attach_kv_hooks
            async def before() -> tuple[Any, list[Any]]:
                h = await client.stream("ov-p", part, dst=pool, dst_region=part, layered=True, timeline=True,
                                        checksum=checksum)
                return h, attach(runtime.shard, LayerSignal(client, mem, [h.xfer], direct=direct))

            async def after(state: tuple[Any, list[Any]]) -> Any:
                await state[0].wait(120)
                await remove(state[1])
                return state[0]

            return before, after

        if on_gpu:  # the stage-side share alone: hooks that only record the pool's interprocess events
            async def events() -> list[Any]:
                return attach_kv_hooks(runtime.shard, mem.record)

            await compare("events-only", 0, events, remove)
            # the copy's share alone: the same bytes copied by the streamer from another pool on the stage's GPU
            # while the stage computes (no layer gating, no interprocess event waits)
            other = GpuPoolMemory(lay, 0)
            await c0.register_pool("ov-o", other)

            async def copies() -> Any:
                return await c0.stream("ov-o", region, dst="ov-h", dst_region=region)

            async def done(h: Any) -> None:
                await h.wait(120)

            await compare("copies-only", region.nbytes(lay), copies, done)
            await c0.unregister_pool("ov-o")
        # the per-layer path alone: events, LayerReady and the streamer's per-layer gating and waits, with one
        # token per slot and layer to copy (the bytes all but gone)
        tiny = Region.uniform(range(batch), (lay.first_layer, lay.first_layer + lay.num_layers), 0, 1)
        await compare("signals-only", tiny.nbytes(lay), *layered(c0, tiny, "ov-h"))
        for where, pool in dests:
            await compare(where, region.nbytes(lay), *layered(c0, region, pool))
            await compare(f"{where} direct-signal", region.nbytes(lay), *layered(c0, region, pool, direct=True))
            await compare(f"{where} checksummed", region.nbytes(lay), *layered(c0, region, pool, checksum=True))
            await compare(f"{where} block-end", region.nbytes(lay), *layered(c0, region, pool, block_end=True))
        if c_dev is not None:  # the same through a streamer whose copy streams wait on the stage's events
            await c_dev.register_pool("ov-p", mem)
            if target is not None:
                await c_dev.register_pool("ov-t", target)
            await c_dev.alloc_pool("ov-h", wire.POOL_SWAP, lay)
            try:
                for where, pool in dests:
                    await compare(f"{where} device-wait", region.nbytes(lay), *layered(c_dev, region, pool))
            finally:
                await c_dev.unregister_pool("ov-p")
                if target is not None:
                    await c_dev.unregister_pool("ov-t")
    finally:
        bar.close()
        compute.shutdown()
        await c0.unregister_pool("ov-p")
        if target is not None:
            await c0.unregister_pool("ov-t")
    return out


async def run_e2e(on_gpu: bool, quick: bool, repeats: int, overhead_too: bool = True, model_dir: str = "",
                  remote_too: bool = True, streamer_args: tuple[str, ...] = (), quiet: bool = False
                  ) -> list[dict[str, Any]]:
    """`streamer_args`: extra options for every streamer process (e.g. --no-inline-dma, for an A/B).
    The streamers' sockets and logs, and the random model unless `model_dir` is given, live in a temporary
    folder that is removed at the end, on error and on Ctrl-C too (after the streamers are gone)."""
    d = tempfile.mkdtemp(prefix="dvb")  # short: ipc:// paths may not exceed ~107 bytes
    procs: list[subprocess.Popen[bytes]] = []
    out: list[dict[str, Any]] = []
    try:
        mb, layers, prompt = (8, 16, 1000) if on_gpu else (4, 4, 256)
        rep = PoolLayout(0, layers, mb, prompt + 24, 8, 128, torch.bfloat16).nbytes
        swap = ["--swap-gib", _gib(overhead_shape(on_gpu)[2].nbytes)]
        procs.append(_start("h0", d, "h1", [*swap, *streamer_args]))
        procs.append(_start("h1", d, "h0", ["--replica-gib", _gib(rep), *streamer_args]))
        device_wait = overhead_too and on_gpu
        if device_wait:  # a second streamer on h0's host, for the layer_wait="device" rows of the overhead
            procs.append(_start("h2", d, "h1", [*swap, "--layer-wait", "device", *streamer_args]))
        c0, c1 = StreamerClient(f"ipc://{d}/h0.c", "bench-p"), StreamerClient(f"ipc://{d}/h1.c", "bench-t")
        c2 = StreamerClient(f"ipc://{d}/h2.c", "bench-w") if device_wait else None
        for c in (c0, c1, c2):
            if c is not None:
                await c.status(timeout=120)
        if remote_too:
            out += await remote(c0, c1, on_gpu, repeats, quiet)
        if overhead_too:
            # 3x the repeats: a row's difference is a few percent of a 50 ms pass (GPU), so noise matters
            out += await overhead(c0, on_gpu, 3 * repeats if on_gpu else repeats, model_dir or Path(d) / "model",
                                  c2, quiet)
        for c in (c0, c1, c2):
            if c is not None:
                await c.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)
        shutil.rmtree(d, ignore_errors=True)
    return out
