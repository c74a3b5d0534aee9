#!/usr/bin/env bash
# Microbatch swapping on one GPU (issue 20), in one device call of under 10 minutes: `dejavu-bench swap` twice, one
# stage with 4 microbatches standing for a stage of a 4-deep pipeline (bench/swap_bench.py), settings off, on, auto:
#   1. paper: OPT-13B at 2,048 positions, 1,000-token prompts, --gpu-memory-fraction 0.6 (so the swap pool stays
#      within the host's memory) - the sizing's rule predicts auto off and on well below off (PCIe-bound)  (~4 min)
#   2. tight: 128 positions, the device memory set so that off holds 2 slots per microbatch (--off-slots 2) - the
#      weights nearly fill it; auto swaps at the largest microbatch a step hides (1xH100 12-08: 3, 1.38x)   (~2 min)
#   3. tight8 (not in the default RUNS): the same with 8 microbatches, 2 resident - a swapping microbatch may grow
#      4x; auto caps it where the swap-in still hides under the step                                   (~3 min)
#
#   bench/gpu_swap.sh OUT_DIR          (on the device: bench/gpu_swap.sh $OUT)
#   SWAP_SMOKE=1 bench/gpu_swap.sh DIR (this machine: the same two runs on the tiny model on CPU, to check the script)
#   RUNS=tight bench/gpu_swap.sh DIR   (one of the two; LIMIT=S sets each run's limit)
#
# Writes OUT_DIR/swap-paper/ and OUT_DIR/swap-tight/ (swap_bench.json/.png and every deployment's log), tarred.
set -uo pipefail
OUT=${1:?usage: bench/gpu_swap.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
echo "== $(date -u) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [[ "${SWAP_SMOKE:-0}" == 1 ]]; then
    DEV=(--shape tiny --device cpu --dtype float32 --num-requests 6)
    PAPER=(--max-seq-len 128 --context 32 --prompt-len 32 --output-len 4:12 --decode-tokens 12 --rates none)
    TIGHT=(--max-seq-len 96 --context 16 --prompt-len 16 --output-len 4:12 --decode-tokens 12 --off-slots 2 --rates 8)
    TIGHT8=("${TIGHT[@]}" --microbatches 8)
    LIMIT=${LIMIT:-120}
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    DEV=(--shape opt-13b --num-requests 24)
    PAPER=(--max-seq-len 2048 --context 1000 --decode-tokens 24 --gpu-memory-fraction 0.6 --rates none)
    TIGHT=(--max-seq-len 128 --context 64 --prompt-len 64 --output-len 16:60 --decode-tokens 48 --off-slots 2
           --rates 2,8)
    TIGHT8=("${TIGHT[@]}" --microbatches 8 --num-requests 64)
    LIMIT=${LIMIT:-280}
fi
RUNS=${RUNS:-paper tight}
for run in $RUNS; do
    declare -n args=${run^^}
    echo "== $(date -u) swap $run: ${args[*]}"
    # shellcheck disable=SC2068
    timeout -k 10 "$LIMIT" bin/dejavu-bench swap ${DEV[@]} --settings off,on,auto ${args[@]} --out "$OUT/swap-$run" \
        --quiet 2>&1 | grep '^\[swap ' | tail -30
    grep -h '\[swap\]\|\[memory\]' "$OUT/swap-$run"/deployment-*.log 2>/dev/null | grep -v 'incarnation' | tail -12
done
dirs=()
for run in $RUNS; do dirs+=("swap-$run"); done
(cd "$OUT" && tar czf swap.tgz "${dirs[@]}" && rm -rf "${dirs[@]}")
echo "== $(date -u) done: $OUT/swap.tgz"
