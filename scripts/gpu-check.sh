#!/usr/bin/env bash
# GPU check of the CUDA DECO op, for a machine with an NVIDIA GPU (not part of CI, which has none):
#
#   bash scripts/gpu-check.sh
#
# 1. builds the patched tree with the CUDA backend (scripts/setup.sh, i.e. scripts/build-runtime.sh, with
#    DECO_CUDA_ARCH; installed into .venv like the CPU build, which it replaces in .deps/build);
# 2. test-backend-ops -b CUDA0 -o DECO_MOE: every DECO case (types x E 13/42/77/180 x T 1/7/33, activations,
#    router norms, expert bias, dense) on CUDA against the CPU backend; fails on a failed case and on a case
#    that CUDA does not support (the scheduler would silently run it on the CPU); then the perf cases;
# 3. tests/test_runtime_llama.py with every layer on the GPU (DECO_TEST_NGL=99): logits of every fixture
#    variant vs the reference (sparse, dense, ops), KV cache, batches, Q8_0/Q4_0 experts, activity counts;
# 4. llama-bench -ngl 99 on a random DECO-0.5B-shaped model (~20% activation, Q4_0 with a Q6_K head),
#    DECO_FFN=sparse vs dense: decode (tg64) and prefill (pp512).
#
# Knobs: DECO_CUDA_ARCH (default native), DECO_JOBS (default: all cores), DECO_GPU_BENCH=0 skips 4.
# Log of every step: .deps/gpu-check/; exit status non-zero on the first failed step.
set -euo pipefail
cd "$(dirname "$0")/.."

export DECO_CUDA_ARCH="${DECO_CUDA_ARCH:-native}"
export DECO_JOBS="${DECO_JOBS:-$(nproc)}"
BIN=.deps/build/bin
OUT=.deps/gpu-check
mkdir -p "$OUT"

step() { printf '\n==> [gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader

step "1/4 setup + CUDA build (DECO_CUDA_ARCH=$DECO_CUDA_ARCH, -j$DECO_JOBS)"
bash scripts/setup.sh
grep -q 'GGML_CUDA:BOOL=ON' .deps/build/CMakeCache.txt || { echo "error: .deps/build is not a CUDA build" >&2; exit 1; }

step "2/4 test-backend-ops -b CUDA0 -o DECO_MOE (CUDA vs CPU)"
set +e
"$BIN/test-backend-ops" test -b CUDA0 -o DECO_MOE > "$OUT/test-backend-ops.log" 2>&1
rc=$?
set -e
grep -E 'DECO_MOE|tests passed|Backend' "$OUT/test-backend-ops.log" | tail -n 5
n_ok=$(grep -c 'DECO_MOE(.*OK' "$OUT/test-backend-ops.log" || true)
n_unsupported=$(grep -c 'DECO_MOE(.*not supported' "$OUT/test-backend-ops.log" || true)
n_fail=$(grep -c 'DECO_MOE(.*FAIL' "$OUT/test-backend-ops.log" || true)
echo "DECO_MOE cases: $n_ok OK, $n_fail failed, $n_unsupported not supported on CUDA0"
if [ "$rc" -ne 0 ] || [ "$n_ok" -eq 0 ] || [ "$n_fail" -ne 0 ] || [ "$n_unsupported" -ne 0 ]; then
    grep -E 'FAIL|not supported' "$OUT/test-backend-ops.log" | head -n 20 >&2
    echo "error: test-backend-ops failed (log: $OUT/test-backend-ops.log)" >&2
    exit 1
fi
"$BIN/test-backend-ops" perf -b CUDA0 -o DECO_MOE > "$OUT/test-backend-ops-perf.log" 2>&1
grep -E 'DECO_MOE|MUL_MAT' "$OUT/test-backend-ops-perf.log" || true

step "3/4 runtime tests with all layers on the GPU (DECO_TEST_NGL=99)"
DECO_TEST_NGL=99 .venv/bin/pytest -q tests/test_runtime_llama.py 2>&1 | tee "$OUT/pytest.log"
test "${PIPESTATUS[0]}" -eq 0

if [ "${DECO_GPU_BENCH:-1}" = 0 ]; then
    step "4/4 skipped (DECO_GPU_BENCH=0)"
    exit 0
fi
step "4/4 llama-bench -ngl 99: sparse vs dense on a DECO-0.5B-shaped Q4_0 model"
M="$OUT/deco-0.5b"
if [ ! -f "$M/q4_0.gguf" ]; then
    .venv/bin/python - "$M" <<'EOF'
import sys
from pathlib import Path
from deco_gguf import calibrate, fixtures
from deco_gguf.converter.convert import convert
out = Path(sys.argv[1])
fixtures.write_fixture(out / "hf", "deco-0.5b", state_dict_hook=calibrate.fixture_hook())  # ~20% active
convert(out / "hf", out / "f16.gguf", outtype="f16")
EOF
    "$BIN/llama-quantize" "$M/f16.gguf" "$M/q4_0.gguf" Q4_0 > "$OUT/quantize.log" 2>&1
fi
for mode in sparse dense; do
    echo "DECO_FFN=$mode"
    DECO_FFN=$mode "$BIN/llama-bench" -m "$M/q4_0.gguf" -ngl 99 -p 512 -n 64 -r 3 2>&1 | tee "$OUT/bench-$mode.log"
done
step "done: all checks passed (logs in $OUT)"
