#!/usr/bin/env bash
# GPU run of the KV streaming library (issue 4) on a 1-, 2- or 4-GPU machine (H100/H200; one GPU: no peer or NCCL rows):
#   1. the gpu-marked streamer tests: checksums across devices, GPU <-> pinned/pageable host and GPU -> GPU
#      copies (buffered and naive), the stage's "layer ready" event gating a copy, CUDA IPC pools through a
#      real streamer process, NCCL between two streamer processes, an NCCL send to a frozen peer aborted;
#   2. the full `dejavu-bench streamer`: ceilings (peer, H2D, D2H, HBM, NCCL, ZeroMQ) across sizes, naive vs
#      buffered on 8B/70B KV layouts as fractions of the ceilings, end to end through two streamer processes
#      (NCCL and TCP), and the overhead of layer-by-layer streaming on a real 8 x 1,000-token prompt pass.
#
#   bench/gpu_streamer.sh OUT_DIR
#
# Writes into OUT_DIR: environment.txt, gpu_tests.log (+ gpu_tests.xml or gpu_tests.json),
# streamer_bench.jsonl (one record per line, kept even if the run is cut short), streamer_bench.json,
# streamer_bench.png, streamer_bench.log, streamer_logs/ (every streamer process's log). Each phase has its own time limit (TEST_LIMIT, BENCH_LIMIT seconds)
# so the whole script stays under 10 minutes; exits non-zero if a phase failed or ran out of time.
# BENCH_ARGS adds options to the benchmark (e.g. --no-inline-dma); SKIP_TESTS=1 runs the benchmark alone.
# Needs python3 with torch, cupy (NCCL), pyzmq, msgspec, msgpack, uvloop; pytest is optional.
set -uo pipefail

OUT=${1:?usage: bench/gpu_streamer.sh OUT_DIR}
TEST_LIMIT=${TEST_LIMIT:-240}
BENCH_LIMIT=${BENCH_LIMIT:-330}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
    date -u
    nvidia-smi || true
    nvidia-smi topo -m || true
    python3 - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count())
try:
    import cupy
    from cupy.cuda import nccl
    print("cupy", cupy.__version__, "nccl", nccl.get_version())
except Exception as e:
    print("cupy/nccl unavailable:", repr(e))
import zmq, msgspec
print("pyzmq", zmq.__version__, "msgspec", msgspec.__version__)
PY
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

status=0
echo "== gpu tests (limit ${TEST_LIMIT}s)"
if [[ -n "${SKIP_TESTS:-}" ]]; then
    echo "skipped (SKIP_TESTS)" > "$OUT/gpu_tests.log"
elif python3 -c "import pytest" 2>/dev/null; then
    timeout -k 10 "$TEST_LIMIT" python3 -m pytest -v -m gpu tests/streamer/test_gpu.py -p no:cacheprovider \
        --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1 || status=1
else
    timeout -k 10 "$TEST_LIMIT" python3 -m tests.streamer.gpu_runner "$OUT/gpu_tests.json" \
        > "$OUT/gpu_tests.log" 2>&1 || status=1
fi
tail -n 40 "$OUT/gpu_tests.log"

echo "== dejavu-bench streamer (limit ${BENCH_LIMIT}s)"
timeout -k 10 "$BENCH_LIMIT" python3 -m bench.streamer_bench --device cuda --out "$OUT" ${BENCH_ARGS:-} \
    > "$OUT/streamer_bench.jsonl" 2> "$OUT/streamer_bench.log" || status=1
tail -n 20 "$OUT/streamer_bench.log"
python3 - "$OUT/streamer_bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    s = r.get("section")
    if s == "ceiling" and "gbps" in r:
        print(f"ceiling  {r['name']:8} {r['bytes'] / 2**20:8.1f} MiB {r['gbps']:8.1f} GB/s")
    elif s in ("op", "e2e"):
        stream = f"  stream of {r['stream_transfers']} ({r['in_flight']} in flight): {r['stream_gbps']:8.1f} GB/s {100 * r['stream_fraction']:5.1f}%" \
            if "stream_fraction" in r else ""
        print(f"{s:8} {r.get('shape', ''):5} {r['op']:13} {r['path']:9} {r['mode']:8} {r['bytes'] / 2**20:8.2f} MiB "
              f"{r.get('stream_gbps', r['gbps']) if s == 'op' else r['gbps']:8.1f} GB/s  {100 * r['fraction']:5.1f}% "
              f"of {r['ceiling']}{stream}")
    elif s == "overhead":
        last = r.get("last_layer") or {}
        split = " ".join(f"{k[:-2]} {1e3 * v:.2f}" for k, v in last.items())
        print(f"overhead -> {r['dst']:7} prompt {1e3 * r['prompt_s']:.1f} ms, streamed {1e3 * r['streamed_total_s']:.1f} ms "
              f"({100 * r['overhead']:+.2f}%; compute {100 * r['compute_overhead']:+.2f}%)"
              + (f"; last layer, ms: {split}" if split else ""))
    elif s == "summary":
        print("summary ", json.dumps(r))
PY
# the streamer processes' own logs (tests: /tmp/dv*, benchmark: /tmp/dvb*), for a post-mortem of one run
mkdir -p "$OUT/streamer_logs"
for f in /tmp/dv*/*.log; do
    [ -f "$f" ] && cp "$f" "$OUT/streamer_logs/$(basename "$(dirname "$f")")-$(basename "$f")"
done
echo "== results in $OUT (status $status)"
exit "$status"
