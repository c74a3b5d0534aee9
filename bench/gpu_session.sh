#!/usr/bin/env bash
# Everything this repository measures on a 4-GPU machine, in one device call of under 10 minutes, so a session's
# 30 minutes of device time go to measuring rather than to machine starts:
#   1. the DMA probe (bench/probe_dma.py)                                          PROBE_LIMIT   (default  40 s)
#   2. GPU tests of the streamer and the bench (bench/gpu_streamer.sh)   TEST_LIMIT + BENCH_LIMIT (120 + 200 s)
#   3. the serving GPU tests: HF equality on 1/2/4 GPUs, kill -9 of a stage and of the controller, the 4-stage
#      long-prompt stall test                                                        SERVE_LIMIT   (default 300 s)
#   4. the 4-stage OPT-66B pipeline benchmark                                        PIPE_LIMIT    (default 540 s)
# PIPE_ARGS adds options to the pipeline benchmark (e.g. --no-cudnn-attention).
# PHASES picks them (default "probe streamer": about 6 minutes); then PHASES=serving and PHASES=pipeline, each
# in a call of its own on the same warm machine (a device call may run 10 minutes at most).
#
#   bench/gpu_session.sh OUT_DIR        (on the device: bench/gpu_session.sh $OUT)
#
# Results land in OUT_DIR/session.tgz (one file: the device tool returns only a few) plus session.log.
set -uo pipefail
OUT=${1:?usage: bench/gpu_session.sh OUT_DIR}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/gpu-session-XXXX)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[[ -d "$ROOT/.site/bin" ]] && export PATH="$ROOT/.site/bin:$PATH"  # py-spy from .whl: native stacks of a stall
PHASES=${PHASES:-probe streamer}
{
    echo "== $(date -u) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    if [[ " $PHASES " == *" probe "* ]]; then
        echo "== probe"
        timeout -k 5 "${PROBE_LIMIT:-40}" python3 bench/probe_dma.py > "$WORK/probe.txt" 2>&1
        tail -n 3 "$WORK/probe.txt"
    fi
    if [[ " $PHASES " == *" streamer "* ]]; then
        echo "== streamer"
        TEST_LIMIT=${TEST_LIMIT:-120} BENCH_LIMIT=${BENCH_LIMIT:-200} bash bench/gpu_streamer.sh "$WORK/streamer" \
            > "$WORK/streamer.txt" 2>&1
        grep -E "passed|failed" "$WORK/streamer/gpu_tests.log" | tail -n 2
        sed -n '/^op \|^e2e\|^overhead\|^summary/p' "$WORK/streamer.txt"
    fi
    if [[ " $PHASES " == *" serving "* ]]; then
        echo "== serving GPU tests"
        timeout -k 5 "${SERVE_LIMIT:-300}" python3 -m pytest -q -m gpu tests/bus/test_serving_gpu.py tests/stages/test_nccl_activation.py \
            -p no:cacheprovider > "$WORK/serving_gpu.txt" 2>&1
        tail -n 5 "$WORK/serving_gpu.txt"
    fi
    if [[ " $PHASES " == *" pipeline "* ]]; then
        echo "== pipeline, OPT-66B shape, 4 stages"
        timeout -k 10 "${PIPE_LIMIT:-540}" bin/dejavu-bench pipeline --shape opt-66b --stages 4 --rates 1,2,3,4 \
            --num-requests 48 --timeout 150 ${PIPE_ARGS:-} --out "$WORK/pipeline4" > "$WORK/pipeline4.txt" 2>&1
        grep "^\[pipeline" "$WORK/pipeline4.txt" | cut -c1-400
    fi
    echo "== $(date -u) done"
} 2>&1 | tee "$OUT/session.log"
tar czf "$OUT/session.tgz" -C "$WORK" .
