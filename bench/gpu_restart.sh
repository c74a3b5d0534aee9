#!/usr/bin/env bash
# A restarted GPU stage's first steps (issue 18), on one GPU, in one device call of under 10 minutes:
#   1. bench/cudnn_first_use.py in fresh processes: what cuDNN attention's first use costs (its libraries, a
#      compile per shape, per thread or not, with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, and whether a compile on
#      one thread stalls GEMMs on another stream)                                  (~80 s; SKIP_PROBE=1 skips)
#   2. `dejavu-bench failure` on the OPT-13B shape at 2 req/s with FAIL_ARGS (default: 48 requests, one decode
#      phase per setting, off then on): kill to first token split, inflation, and the restarted stage's
#      `[graphs]` lines (the restore's warm-up and captures, then the steps' own)           (FAIL_LIMIT, 470 s)
#
#   bench/gpu_restart.sh OUT_DIR        (on the device: bench/gpu_restart.sh $OUT)
#
# Writes OUT_DIR/cudnn-first-use-*.json and OUT_DIR/fail.tgz (failure_bench.json/.png and every deployment's log).
set -uo pipefail
OUT=${1:?usage: bench/gpu_restart.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 2
echo "== $(date -u) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version --format=csv
if [[ "${SKIP_PROBE:-0}" != 1 ]]; then
    for v in "default none" "default conv" "cudnn none"; do
        set -- $v
        echo "== cuDNN first use: backend $1, preload $2"
        python3 bench/cudnn_first_use.py --backend "$1" --preload "$2" --out "$OUT/cudnn-first-use-$1-$2.json"
    done
    echo "== TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1"
    TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python3 bench/cudnn_first_use.py \
        --order 8:256,8:512,8:1024,8:1280,8:2048,4:1024,16:1024 --out "$OUT/cudnn-first-use-avoid-recompile.json"
    echo "== key buckets, and a compile's stall of another stream"
    python3 bench/cudnn_first_use.py --order 8:256,8:512,8:768,8:1024,8:1280,8:1536,8:1792,8:2048,1:256,2:256,4:256,16:256,32:256 \
        --stall 8:1536,4:768,2:512 --out "$OUT/cudnn-first-use-buckets.json"
fi
FAIL_ARGS=${FAIL_ARGS:---num-requests 48 --cost-repeats 1 --settings off,on}
echo "== $(date -u) failure: --rate 2 $FAIL_ARGS"
mkdir -p "$OUT/fail"
# shellcheck disable=SC2086
timeout -k 10 "${FAIL_LIMIT:-470}" bin/dejavu-bench failure --shape opt-13b --stages 1 --hosts 1 --rate 2 $FAIL_ARGS \
    --out "$OUT/fail" --quiet 2>&1 | grep -v '^\s*$' | tail -40
echo "== $(date -u) the restarted stages' start, warm-up and captures"
for f in "$OUT"/fail/failure-*.log; do
    echo "== $f"
    grep -h '\[graphs\]\|\[startup\]\|standby\|\[replica\] restored\|\[step\]\|recover' "$f" | grep -v 'incarnation 0' | tail -40
done
(cd "$OUT" && tar czf fail.tgz fail && rm -rf fail)
