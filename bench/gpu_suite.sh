#!/usr/bin/env bash
# GPU suite of issue 6, run from the repository root on a CUDA machine:
#
#   bash bench/gpu_suite.sh
#
# Steps, in order: precompile_cold (a worker start after emptying the compile caches: the cold
# compile time), precompile_warm (the same start again: the warm start time), Triton kernel tests
# (native), CUDA-graph equality tests (token2wav, vision, audio unit, a whole fast session), decoder step
# benchmark (with and without the decode-step kernels, and without the decode fusion), fast-vs-eager
# layer-by-layer tests, the fp32 whole-session greedy token equality, kernel micro-benchmark, GEMV config
# sweep, the fast-mode component profile, and the duplex benchmark of all modes. Every step runs under its
# own time limit, logs its wall time and exit code to $OUT/summary.txt, and the suite goes on after a
# failure. Results and logs go to $OUT (default bench/results/gpu_suite). The device tool allows 10
# minutes per command: run the suite in a few calls made back to back (the machine and its compile cache
# stay warm), e.g.
#   SUITE_STEPS="precompile_cold precompile_warm graph_tests kernels_test"
#   SUITE_STEPS="fast_equivalence"
#   SUITE_STEPS="session_equivalence"   (one eager and two fast fp32 sessions, and the token steps'
#                                        sampled sessions: 2-3 minutes on an H200)
#   SUITE_STEPS="gemv_sweep profile"
#   SUITE_STEPS=kernels_bench KERNELS_BENCH_KERNELS=gemv   (the whole kernel table may need two calls)
#   SUITE_STEPS="duplex"
#
# Environment:
#   OUT               where results and logs go
#   SUITE_STEPS       space-separated subset of:
#                     precompile_cold precompile_warm kernels_test graph_tests fast_equivalence
#                     session_equivalence decode_steps kernels_bench gemv_sweep profile duplex
#   SUITE_MAX_STEP_S  cap on every step's time limit (seconds)
#   SUITE_BUDGET_S    the whole suite's time (seconds): a step gets at most what is left of it, less a
#                     margin for packing the logs, and is skipped when too little is left
#   DECODE_MODES      the decoder step benchmark's modes (default eager,compile-default,fast)
#   DECODE_VARIANTS   the fast-mode variants the decode_steps step runs after it, space-separated
#                     (default both: without_decode_kernels without_decode_fusion; empty: none)
#   KERNELS_BENCH_KERNELS   the kernels_bench step's kernels, comma-separated (default all; the whole
#                     table does not fit one call: `python -m bench.kernels --help` names them)
#   KERNELS_BENCH_LIMIT_S   the kernels_bench step's time limit (default 420; the table is written after
#                     every case, so a step cut short keeps the cases it finished)
#   DUPLEX_MODES, DUPLEX_UNITS, DUPLEX_WARMUP_UNITS   the duplex benchmark's modes and unit counts
#   PYTHON            interpreter (default python3)
set -u

OUT=${OUT:-bench/results/gpu_suite}
PYTHON=${PYTHON:-python3}
SUITE_STEPS=${SUITE_STEPS:-precompile_cold precompile_warm kernels_test graph_tests fast_equivalence session_equivalence decode_steps kernels_bench gemv_sweep profile duplex}
DECODE_VARIANTS=${DECODE_VARIANTS-without_decode_kernels without_decode_fusion}
for name in $DECODE_VARIANTS; do
    [[ $name == without_decode_kernels || $name == without_decode_fusion ]] \
        || { echo "unknown DECODE_VARIANTS entry: $name" >&2; exit 2; }
done
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"

source bench/device_env.sh
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/torch_compile_cache}
mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
# Inductor reports CUDA-graph problems ("skipping cudagraphs ...") as perf hints; they land in the logs.
export TORCH_LOGS=${TORCH_LOGS:-perf_hints}

wanted() { [[ " $SUITE_STEPS " == *" $1 "* ]]; }
variant() { [[ " $DECODE_VARIANTS " == *" $1 "* ]]; }

# step NAME LIMIT_S COMMAND...: stdout to $OUT/NAME.out, stderr to $OUT/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n "${SUITE_MAX_STEP_S:-}" && "$SUITE_MAX_STEP_S" -lt "$limit" ]]; then
        limit=$SUITE_MAX_STEP_S
    fi
    if [[ -n "${SUITE_BUDGET_S:-}" ]]; then
        local left=$((SUITE_BUDGET_S - SECONDS - 20))
        if [[ "$left" -lt 15 ]]; then
            echo "$name skipped: ${left}s of the suite's budget left" | tee -a "$SUMMARY"
            return
        fi
        [[ "$left" -lt "$limit" ]] && limit=$left
    fi
    local began=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - began)) limit=$limit :: $*" | tee -a "$SUMMARY"
}

{ echo "== gpu_suite $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; \
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee -a "$SUMMARY"

# The worker start, as `precompile.py` runs it (fast mode, warm-up MP4), into the suite's compile cache
# emptied first (Inductor's and Triton's: a cold start), then again (a warm start); later steps reuse it.
PRECOMPILE_ARGS=(precompile.py --set model.preset=minicpm-o-4.5 --set service.warmup_seconds=5
                 --set compile.cache_dir="$TORCHINDUCTOR_CACHE_DIR")
if wanted precompile_cold; then
    rm -rf "$TORCHINDUCTOR_CACHE_DIR" "${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
    mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
    step precompile_cold 600 "$PYTHON" "${PRECOMPILE_ARGS[@]}"
fi
if wanted precompile_warm; then
    step precompile_warm 300 "$PYTHON" "${PRECOMPILE_ARGS[@]}"
fi
cp "$TORCHINDUCTOR_CACHE_DIR/precompile.json" "$OUT/precompile.json" 2>/dev/null
if wanted kernels_test; then
    step kernels_test 300 "$PYTHON" -m pytest -p no:cacheprovider -m gpu -q -rA tests/test_kernels.py
fi
if wanted graph_tests; then
    step graph_tests 300 "$PYTHON" -m pytest -p no:cacheprovider -m gpu -q -rA \
        tests/test_graphs_static_paths.py tests/test_model_audio_static.py
fi
if wanted decode_steps; then
    step decode_steps 900 "$PYTHON" -m bench.decode_steps --preset minicpm-o-4.5 --json \
        --modes "${DECODE_MODES:-eager,compile-default,fast}" --out "$OUT/decode_steps.json"
    # fast mode without the decode-step kernels (GEMV, split-KV attention): what they are worth
    variant without_decode_kernels && OMNI_TRITON_GEMV=0 OMNI_TRITON_DECODE_ATTENTION=0 \
        step decode_steps_without_decode_kernels 600 \
        "$PYTHON" -m bench.decode_steps --preset minicpm-o-4.5 --modes fast --json \
        --out "$OUT/decode_steps_without_decode_kernels.json"
    # fast mode without the decode fusion (which folds norms and residual adds into the GEMVs and runs q/k
    # norm + RoPE + KV write as one kernel; compile.decode_fusion, on by default)
    variant without_decode_fusion && OMNI_TRITON_DECODE_FUSION=0 step decode_steps_without_decode_fusion 600 \
        "$PYTHON" -m bench.decode_steps --preset minicpm-o-4.5 --modes fast --json \
        --out "$OUT/decode_steps_without_decode_fusion.json"
fi
if wanted fast_equivalence; then
    step fast_equivalence 420 "$PYTHON" -m pytest -p no:cacheprovider -m gpu -q -s -rA \
        tests/test_fast_equivalence.py
fi
if wanted session_equivalence; then
    step session_equivalence 540 "$PYTHON" -m pytest -p no:cacheprovider -m gpu -q -rA \
        tests/test_session_equivalence.py tests/test_token_steps.py
fi
if wanted kernels_bench; then
    step kernels_bench "${KERNELS_BENCH_LIMIT_S:-420}" "$PYTHON" -m bench.kernels --out "$OUT/kernels.json" \
        ${KERNELS_BENCH_KERNELS:+--kernels "$KERNELS_BENCH_KERNELS"}
fi
if wanted gemv_sweep; then
    step gemv_sweep 300 "$PYTHON" -m bench.kernels --sweep-gemv --out "$OUT/gemv_sweep.json"
fi
if wanted profile; then
    step profile 400 "$PYTHON" -m bench.profile_unit --out "$OUT/profile.json"
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
