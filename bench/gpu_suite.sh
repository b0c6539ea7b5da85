#!/usr/bin/env bash
# GPU suite of issue 6, run from the repository root on a CUDA machine:
#
#   bash bench/gpu_suite.sh
#
# Steps: Triton kernel tests (native), decoder step benchmark (eager / compile-default / fast),
# fast-vs-eager layer-by-layer tests, kernel micro-benchmark, and the duplex benchmark per mode when
# bench/duplex.py exists. Every step runs under its own time limit, logs its wall time and exit code to
# $OUT/summary.txt, and the suite goes on after a failure. Results and logs go to $OUT
# (default bench/results/gpu_suite).
#
# Environment:
#   OUT               where results and logs go
#   SUITE_STEPS       space-separated subset of:
#                     kernels_test decode_steps fast_equivalence kernels_bench duplex
#   SUITE_MAX_STEP_S  cap on every step's time limit (seconds)
#   DUPLEX_MODES, DUPLEX_UNITS, DUPLEX_WARMUP_UNITS   the duplex benchmark's modes and unit counts
#   PYTHON            interpreter (default python3)
set -u

OUT=${OUT:-bench/results/gpu_suite}
PYTHON=${PYTHON:-python3}
SUITE_STEPS=${SUITE_STEPS:-kernels_test decode_steps fast_equivalence kernels_bench duplex}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"

source bench/device_env.sh
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/torch_compile_cache}
mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
# Inductor reports CUDA-graph problems ("skipping cudagraphs ...") as perf hints; they land in the logs.
export TORCH_LOGS=${TORCH_LOGS:-perf_hints}

wanted() { [[ " $SUITE_STEPS " == *" $1 "* ]]; }

# step NAME LIMIT_S COMMAND...: stdout to $OUT/NAME.out, stderr to $OUT/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n "${SUITE_MAX_STEP_S:-}" && "$SUITE_MAX_STEP_S" -lt "$limit" ]]; then
        limit=$SUITE_MAX_STEP_S
    fi
    local began=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - began)) limit=$limit :: $*" | tee -a "$SUMMARY"
}

{ echo "== gpu_suite $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; \
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee -a "$SUMMARY"

if wanted kernels_test; then
    step kernels_test 180 "$PYTHON" -m pytest -p no:cacheprovider -m gpu -q -rA tests/test_kernels.py
fi
if wanted decode_steps; then
    step decode_steps 900 "$PYTHON" -m bench.decode_steps --preset minicpm-o-4.5 --json \
        --out "$OUT/decode_steps.json"
fi
if wanted fast_equivalence; then
    step fast_equivalence 420 "$PYTHON" -m pytest -p no:cacheprovider -m gpu -q -s -rA \
        tests/test_fast_equivalence.py
fi
if wanted kernels_bench; then
    step kernels_bench 300 "$PYTHON" -m bench.kernels --out "$OUT/kernels.json"
fi
if wanted duplex; then
    # All modes in one process, side by side; the JSON is rewritten after each mode, so a step that
    # runs out of time still leaves the modes it finished.
    step duplex 900 "$PYTHON" -m bench.duplex --preset minicpm-o-4.5 --device cuda --schedule forced \
        --mode "${DUPLEX_MODES:-eager,fast,compile-default}" --units "${DUPLEX_UNITS:-16}" \
        --warmup-units "${DUPLEX_WARMUP_UNITS:-8}" --out "$OUT/duplex.json"
fi
grep -h "skipping cudagraphs" "$OUT"/*.log >>"$SUMMARY" 2>/dev/null || true
# Logs travel as one archive (the device tool returns at most 8 files).
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls ./*.log ./*.out 2>/dev/null) && rm -f "$OUT"/*.log "$OUT"/*.out
echo "== done" | tee -a "$SUMMARY"
