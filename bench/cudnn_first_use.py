"""What a fresh process pays for cuDNN attention at first use: its libraries loading, or a compile per shape.

A restarted stage's first decode step took 1.8 s with cuDNN on and 0.26 s with it off (bench/NOTES.md, the failure
section). This probe splits that in a fresh CUDA process on the stage's own tensors' layout (a pool of
[2, slots, max_seq, heads, head_dim] per layer, a decode graph's bool mask and a range view of the pool): the
first SDPA call pays the libraries' load and its shape's compile, a second shape pays only a compile, and a
repeated shape pays neither. `--order` sets the shapes as batch:keys, in order; repeats are the baseline.

    python bench/cudnn_first_use.py --out bench/results/cudnn-first-use-X.json  (CUDA only)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=40)  # OPT-13B's attention
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-seq", type=int, default=2048)
    p.add_argument("--order", default="8:1024,8:1024,8:1280,8:1280,16:1024,8:2048,4:512,8:1024",
                   help="decode shapes batch:keys, in order (a repeat shows a shape's steady cost)")
    p.add_argument("--backend", choices=("default", "cudnn"), default="default",
                   help="default: SDPA's own choice (what serving runs); cudnn: cuDNN only")
    p.add_argument("--preload", choices=("none", "conv", "version"), default="none",
                   help="before the first attention: load cuDNN's libraries by a convolution or its version call")
    p.add_argument("--stall", default="",
                   help="batch:keys shapes compiled on a second thread while this one times GEMMs on its own stream: "
                        "does a compile stall other work on the device?")
    p.add_argument("--out", default="")
    args = p.parse_args()

    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t_import = time.perf_counter() - t0
    dev = torch.device("cuda")

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    t_ctx = timed(lambda: torch.zeros(1, device=dev))
    a = torch.randn(1024, 1024, device=dev, dtype=torch.float16)
    t_gemm = timed(lambda: a @ a)
    t_pre = 0.0
    if args.preload == "conv":
        x = torch.randn(1, 8, 16, 16, device=dev, dtype=torch.float16)
        w = torch.randn(8, 8, 3, 3, device=dev, dtype=torch.float16)
        t_pre = timed(lambda: F.conv2d(x, w))
    elif args.preload == "version":
        t_pre = timed(lambda: torch.backends.cudnn.version())
    h, d = args.heads, args.head_dim
    pool = torch.randn(2, args.slots, args.max_seq, h, d, device=dev, dtype=torch.float16)

    def tensors(b: int, keys: int):  # type: ignore[no-untyped-def]
        q = torch.randn(b, 1, h, d, device=dev, dtype=torch.float16).transpose(1, 2)
        k = pool[0, :b, :keys].transpose(1, 2)  # a range view of the pool, as a "range" decode graph reads it
        v = pool[1, :b, :keys].transpose(1, 2)
        mask = (torch.arange(keys, device=dev)[None, :] <= keys - 7).view(1, 1, 1, keys).expand(b, 1, 1, keys)
        return q, k, v, mask

    backends = [SDPBackend.CUDNN_ATTENTION] if args.backend == "cudnn" else None
    rows = []
    seen: set[tuple[int, int]] = set()
    for item in args.order.split(","):
        b, keys = (int(v) for v in item.split(":"))
        q, k, v, mask = tensors(b, keys)

        def attend(q=q, k=k, v=v, mask=mask) -> None:  # type: ignore[no-untyped-def]
            if backends is None:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5)
            else:
                with sdpa_kernel(backends):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5)

        first = timed(attend)
        again = min(timed(attend) for _ in range(3))
        with sdpa_kernel([SDPBackend.MATH]):  # the reference: does this path compute the same attention?
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=d**-0.5)
        with sdpa_kernel(backends) if backends is not None else contextlib.nullcontext():
            got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5)
        err = (got.float() - ref).abs().max().item()
        rows.append({"batch": b, "keys": keys, "new_shape": (b, keys) not in seen, "first_s": round(first, 4),
                     "steady_s": round(again, 5), "max_abs_err": err})
        seen.add((b, keys))
        print(f"batch {b:3d} keys {keys:5d}: first {first * 1e3:9.2f} ms, then {again * 1e3:7.3f} ms, "
              f"max |err| {err:.2e}", flush=True)
    # PyTorch keeps compiled cuDNN attention graphs per thread (thread_local): the same shapes on a new thread
    other: list[dict] = []

    def again_elsewhere() -> None:
        for row in rows:
            if row["new_shape"]:
                b, keys = row["batch"], row["keys"]
                q, k, v, mask = tensors(b, keys)
                t = timed(lambda q=q, k=k, v=v, mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
                other.append({"batch": b, "keys": keys, "first_s": round(t, 4)})
                print(f"other thread: batch {b:3d} keys {keys:5d}: first {t * 1e3:9.2f} ms", flush=True)

    import threading

    th = threading.Thread(target=again_elsewhere)
    th.start()
    th.join()
    stall = stall_probe(args, pool) if args.stall else None
    result = {
        "figure": "cuDNN attention's first use in a fresh process (a restarted stage's first decode step)",
        "command": "python bench/cudnn_first_use.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                  vars(args).items() if k != "out" and v != ""),
        "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(), "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "import_s": round(t_import, 3), "context_s": round(t_ctx, 3), "first_gemm_s": round(t_gemm, 3),
        "avoid_recompile_env": os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", ""),
        "preload": args.preload, "preload_s": round(t_pre, 4), "rows": rows, "other_thread": other, "stall": stall,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def stall_probe(args, pool) -> dict:  # type: ignore[no-untyped-def]
    """GEMMs timed on one stream, alone and while a second thread compiles new attention shapes: the longest
    gap between consecutive GEMMs' ends says whether a compile holds the whole device."""
    import threading

    import torch
    import torch.nn.functional as F

    dev = pool.device
    h, d = args.heads, args.head_dim
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    stream = torch.cuda.Stream(dev)

    def gemms(seconds: float) -> list[float]:
        ends = []
        with torch.cuda.stream(stream):
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                a @ a
                stream.synchronize()
                ends.append(time.perf_counter())
        return [round(y - x, 5) for x, y in zip(ends, ends[1:])]

    alone = gemms(1.0)
    compiled: list[float] = []

    def compile_shapes() -> None:
        time.sleep(0.2)
        for item in args.stall.split(","):
            b, keys = (int(v) for v in item.split(":"))
            q = torch.randn(b, 1, h, d, device=dev, dtype=torch.float16).transpose(1, 2)
            k = pool[0, :b, :keys].transpose(1, 2)
            v = pool[1, :b, :keys].transpose(1, 2)
            mask = torch.ones(b, 1, 1, keys, device=dev, dtype=torch.bool)
            t = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.cuda.current_stream(dev).synchronize()
            compiled.append(round(time.perf_counter() - t, 4))

    th = threading.Thread(target=compile_shapes)
    th.start()
    during = gemms(0.4 + 0.6 * len(args.stall.split(",")))
    th.join()
    out = {"gemm_gap_alone_max_s": max(alone), "gemm_gap_alone_median_s": sorted(alone)[len(alone) // 2],
           "gemm_gap_during_max_s": max(during), "gemm_gap_during_median_s": sorted(during)[len(during) // 2],
           "compiles_s": compiled}
    print("stall probe:", json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
