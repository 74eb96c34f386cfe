#!/usr/bin/env bash
# GPU check of the CUDA DECO op, in one command, for a machine with an NVIDIA GPU (CI has none):
#
#   bash scripts/gpu-check.sh
#
# 0. asks nvidia-smi for a GPU and looks for nvcc; without either it says so and exits 2 at once, before
#    building or writing anything (the checkout's .deps/build and .venv are never touched);
# 1. builds the patched tree with the CUDA backend into its own folder, .deps/build-cuda (the CPU build in
#    .deps/build stays as it is): test-backend-ops, test-deco-placement, test-deco-logits, llama-quantize,
#    llama-bench, libllama and libdeco-speculative;
# 2. test-backend-ops -b CUDA0: every DECO_MOE case (real DECO-0.5B/1.2B shapes included) and the flash-decoding
#    FLASH_ATTN_EXT cases, CUDA against the CPU; fails on a failed case and on a DECO case CUDA does not support
#    (the scheduler would silently run it on the CPU);
# 3. a random DECO-1.2B-shaped model (d 1792, 102 experts of 64; DECO_GPU_CHECK_LAYERS layers, ~20% of the
#    experts active), Q4_0 with a Q6_K head: every expert tensor must be put on CUDA0 with -ngl 99
#    (test-deco-placement MODEL CUDA0);
# 4. its logits on the GPU against the CPU (the same build, -ngl 0): a 40-token batch, then 8 tokens decoded one
#    at a time, sparse and dense; relative error and greedy (argmax) agreement; then tests/test_runtime_llama.py
#    with all layers on the GPU (DECO_TEST_NGL=99, LLAMA_CPP_LIB_PATH: every fixture variant against the
#    reference, the activity counts read from device logits) when scripts/setup.sh built .deps/build;
# 5. speed: test-backend-ops perf of the DECO layers (sparse, dense) beside the mul_mat and mul_mat_id baselines,
#    and llama-bench -ngl 99 of the model with DECO_FFN=sparse and dense.
# Everything goes to .deps/gpu-check/: one log per step and report.md, the summary. Exit status 1 on the first
# failed step. Knobs: DECO_CUDA_ARCH (default native), DECO_JOBS (default: all cores), DECO_GPU_CHECK_LAYERS
# (default 8), DECO_GPU_BENCH=0 skips step 5; for a machine without network (docs/cuda.md): DECO_LLAMA_SRC (a
# patched tree, e.g. from scripts/build-runtime.sh --source-only elsewhere), DECO_GPU_CHECK_MODEL (a Q4_0 GGUF
# written elsewhere by scripts/gpu_check_model.py + llama-quantize), DECO_PYTHON (a python with numpy; default
# .venv/bin/python, made by scripts/setup.sh when missing). Not measured yet: on a 16-core machine the build
# should take ~5 min (less with ccache), the rest ~3 min.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=.deps/gpu-check
BUILD=.deps/build-cuda
BIN=$BUILD/bin
REPORT=$OUT/report.md

# 0. a GPU and a CUDA compiler, before anything is built or written
if ! command -v nvidia-smi >/dev/null; then
    no_gpu="no nvidia-smi on PATH"
elif ! gpus="$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>&1)" || [ -z "$gpus" ]; then
    no_gpu="nvidia-smi: $(printf '%s' "${gpus:-no GPU listed}" | head -n 1)"
fi
if [ -n "${no_gpu:-}" ]; then
    echo "error: no NVIDIA GPU here ($no_gpu); gpu-check.sh needs one, nothing was built" >&2
    exit 2
fi
NVCC="$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true)"
if [ -z "$NVCC" ]; then
    echo "error: a GPU ($gpus) but no nvcc on PATH or in /usr/local/cuda/bin; nothing was built" >&2
    exit 2
fi

ARCH="${DECO_CUDA_ARCH:-native}"
JOBS="${DECO_JOBS:-$(nproc)}"
LAYERS="${DECO_GPU_CHECK_LAYERS:-8}"
mkdir -p "$OUT"
step() { printf '\n==> [gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
report() { printf '%s\n' "$*" >> "$REPORT"; }
fail() { report "" "**FAILED**: $*"; echo "error: $* (report: $REPORT)" >&2; exit 1; }
{ echo "# gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo; echo "GPU: $gpus; $("$NVCC" --version | tail -n 1)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?'); arch $ARCH"; } > "$REPORT"

step "1/5 CUDA build into $BUILD (arch $ARCH, -j$JOBS)"
PY="${DECO_PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || bash scripts/setup.sh  # the Python side of steps 3-4 (fixtures, converter, numpy)
LLAMA="${DECO_LLAMA_SRC:-$(bash scripts/build-runtime.sh --source-only | tail -n 1)}"
[ -d .venv/bin ] && PATH="$PWD/.venv/bin:$PATH"  # cmake, ninja and ccache where setup.sh installed them
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
CCACHE="$(command -v ccache || true)"
LAUNCH=()
[ -n "$CCACHE" ] && LAUNCH=(-DCMAKE_C_COMPILER_LAUNCHER="$CCACHE" -DCMAKE_CXX_COMPILER_LAUNCHER="$CCACHE" -DCMAKE_CUDA_COMPILER_LAUNCHER="$CCACHE")
t0=$SECONDS
cmake -S "$LLAMA" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
    -DGGML_OPENMP=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_CUDA_COMPILER="$NVCC" "${LAUNCH[@]}" \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_LLGUIDANCE=OFF -DGGML_CCACHE=OFF \
    > "$OUT/configure.log" 2>&1 || { tail -n 40 "$OUT/configure.log" >&2; fail "cmake configure (log: $OUT/configure.log)"; }
# the tools of steps 2-5, and the libraries llama-cpp-python and deco_gguf load for the runtime tests of step 4
cmake --build "$BUILD" -j "$JOBS" --target test-backend-ops test-deco-placement test-deco-logits llama-quantize llama-bench \
    llama deco-speculative \
    > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log" >&2; fail "build (log: $OUT/build.log)"; }
report "" "build: $((SECONDS - t0)) s"

step "2/5 test-backend-ops -b CUDA0: DECO_MOE and flash-decoding FLASH_ATTN_EXT, CUDA against the CPU"
FA_DECODE_CASES='kv=(512|517|545|601|1024|1031|1500|2000|2053|3001|4096|8192),nb=(1|2|3|4|16),'
backend_ops() {  # name, args...: runs test-backend-ops test -b CUDA0 ARGS, checks and reports its counts
    local name=$1; shift
    "$BIN/test-backend-ops" test -b CUDA0 "$@" > "$OUT/$name.log" 2>&1 && rc=0 || rc=$?
    local ok fails unsupported
    ok=$(grep -c '): .*OK' "$OUT/$name.log" || true)
    fails=$(grep -c '): .*FAIL' "$OUT/$name.log" || true)
    unsupported=$(grep -c 'not supported' "$OUT/$name.log" || true)
    report "" "$name: $ok OK, $fails failed, $unsupported not supported on CUDA0 (exit $rc)"
    grep -E 'FAIL|not supported' "$OUT/$name.log" | head -n 20 | sed 's/^/    /' >> "$REPORT" || true
    echo "$name: $ok OK, $fails failed, $unsupported not supported"
    [ "$rc" -eq 0 ] && [ "$ok" -gt 0 ] && [ "$fails" -eq 0 ] || fail "test-backend-ops $name (log: $OUT/$name.log)"
    [ "$name" != deco_moe ] || [ "$unsupported" -eq 0 ] || fail "DECO_MOE cases that CUDA does not support"
}
backend_ops deco_moe -o DECO_MOE
backend_ops flash_attn -o FLASH_ATTN_EXT -p "$FA_DECODE_CASES"

step "3/5 a random DECO-1.2B-shaped Q4_0 model ($LAYERS layers): every expert tensor on CUDA0"
MODEL="${DECO_GPU_CHECK_MODEL:-$OUT/deco-1.2b-$LAYERS/q4_0.gguf}"
if [ ! -f "$MODEL" ]; then
    M="$(dirname "$MODEL")"
    "$PY" scripts/gpu_check_model.py "$M" "$LAYERS" > "$OUT/model.log" 2>&1 || fail "model (log: $OUT/model.log)"
    "$BIN/llama-quantize" "$M/f16.gguf" "$MODEL" Q4_0 >> "$OUT/model.log" 2>&1 || fail "llama-quantize (log: $OUT/model.log)"
fi
"$BIN/test-deco-placement" "$MODEL" CUDA0 > "$OUT/placement.log" 2>&1 || {
    grep FAIL "$OUT/placement.log" | head -n 10 | sed 's/^/    /' >> "$REPORT"; fail "expert placement (log: $OUT/placement.log)"; }
report "" "placement: $(tail -n 1 "$OUT/placement.log") (every expert tensor of $MODEL on CUDA0 with -ngl 99)"

step "4/5 logits on the GPU against the CPU: a 40-token batch, then 8 tokens decoded one at a time"
"$PY" scripts/gpu_check_model.py --compare "$MODEL" "$BIN/test-deco-logits" "$OUT" \
    > "$OUT/logits.log" 2>&1 && rc=0 || rc=$?
sed 's/^/    /' "$OUT/logits.log" >> "$REPORT"
cat "$OUT/logits.log"
[ "$rc" -eq 0 ] || fail "GPU logits differ from the CPU's (log: $OUT/logits.log)"
if [ -d .deps/build/bin ]; then  # the runtime tests need the CPU build's tools beside it (scripts/setup.sh)
    # every fixture variant against the reference with all layers on the GPU, the activity counts read from device
    # logits (tests/test_runtime_llama.py, DECO_TEST_NGL); llama-cpp-python loads the CUDA build's libraries
    LLAMA_CPP_LIB_PATH="$PWD/$BIN" DECO_TEST_NGL=99 "$PY" -m pytest -q tests/test_runtime_llama.py > "$OUT/pytest.log" 2>&1 \
        || { tail -n 30 "$OUT/pytest.log" >&2; fail "runtime tests with -ngl 99 (log: $OUT/pytest.log)"; }
    report "" "runtime tests with all layers on the GPU: $(tail -n 1 "$OUT/pytest.log")"
else
    report "" "runtime tests with all layers on the GPU: not run (no .deps/build: scripts/setup.sh)"
fi

if [ "${DECO_GPU_BENCH:-1}" = 0 ]; then
    step "5/5 skipped (DECO_GPU_BENCH=0)"
else
    step "5/5 speed: the DECO layers (sparse, dense) and the mul_mat / mul_mat_id baselines; llama-bench -ngl 99"
    # test-backend-ops-deco.inc's perf cases: DECO layers of DECO-0.5B / 1.2B and their baselines
    PERF_CASES='E=(77|102),|n_mats=(77|102),|m=(1920|2560),n=(1|512),k=(1280|1792),'
    "$BIN/test-backend-ops" perf -b CUDA0 -o DECO_MOE,MUL_MAT_ID,MUL_MAT -p "$PERF_CASES" > "$OUT/perf.log" 2>&1 \
        || fail "test-backend-ops perf (log: $OUT/perf.log)"
    report "" '```' "$(grep -E '^ *(DECO_MOE|MUL_MAT)' "$OUT/perf.log")" '```'
    for mode in sparse dense; do
        DECO_FFN=$mode "$BIN/llama-bench" -m "$MODEL" -ngl 99 -p 512 -n 64 -r 3 > "$OUT/bench-$mode.log" 2>&1 \
            || fail "llama-bench DECO_FFN=$mode (log: $OUT/bench-$mode.log)"
        report "" "llama-bench -ngl 99 -p 512 -n 64 -r 3, DECO_FFN=$mode:" "$(grep -E '^\|' "$OUT/bench-$mode.log")"
    done
fi
report "" "all checks passed"
step "done: all checks passed; report: $REPORT"
cat "$REPORT"
