#!/usr/bin/env bash
# Compile check of our CUDA code without a GPU: nvcc on the patched tree's ggml-cuda/deco-moe.cu and the patched
# ggml-cuda/ggml-cuda.cu (dispatch + supports_op), for sm_87 (Jetson Orin) and sm_90 (H100), with the defines and
# flags of ggml-cuda's CMake build (ggml/src/ggml-cuda/CMakeLists.txt, ggml/src/CMakeLists.txt) plus -Werror for
# host and device warnings. Objects are written to a temporary folder and discarded; nothing is linked or run.
#
#   scripts/check-cuda.sh              # prepares the patched tree if needed (build-runtime.sh --source-only)
#
# Knobs: DECO_CUDA_CHECK_ARCHS (default "87 90"), DECO_CUDA_CHECK_FILES (default "deco-moe.cu ggml-cuda.cu"),
# NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), DECO_DEPS (default <repo>/.deps), DECO_VENV.
# Without nvcc it says so and exits 0 (DECO_REQUIRE_CUDA=1: exits 1). The toolkit's cublas_v2.h is needed by
# ggml-cuda's headers; when the toolkit has none (a compiler-only install), the headers are taken from the
# nvidia-cublas wheel (pip download, cached in ~/.cache/deco-gguf/cublas-include).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="${DECO_DEPS:-$REPO/.deps}"
VENV="${DECO_VENV:-$REPO/.venv}"
LLAMA="$DEPS/llama_cpp_python-0.3.36/vendor/llama.cpp"
ARCHS="${DECO_CUDA_CHECK_ARCHS:-87 90}"
FILES="${DECO_CUDA_CHECK_FILES:-deco-moe.cu ggml-cuda.cu}"
CUBLAS_WHEEL_VERSION=13.1.1.3

log() { printf '[check-cuda %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

NVCC="${NVCC:-$(command -v nvcc || true)}"
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
if [ -z "$NVCC" ]; then
    log "no nvcc: CUDA compile check skipped"
    [ "${DECO_REQUIRE_CUDA:-0}" = 1 ] && exit 1
    exit 0
fi
# the toolkit's include folder, as nvcc itself finds it (nvcc may be a wrapper script)
CUDA_INC="$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES=.*"-I\([^"]*\)".*/\1/p' | head -n 1)"

# the patched tree (no compile; quick when up to date); if that fails but a tree is there (e.g. unexported
# edits in it), the tree is checked as it is
mkdir -p "$DEPS"
if ! DECO_VENV="$VENV" DECO_DEPS="$DEPS" bash "$REPO/scripts/build-runtime.sh" --source-only \
        >/dev/null 2>"$DEPS/check-cuda-source.log"; then
    if [ ! -f "$LLAMA/ggml/src/ggml-cuda/deco-moe.cu" ]; then
        cat "$DEPS/check-cuda-source.log" >&2
        log "error: no patched tree"; exit 1
    fi
    log "warning: build-runtime.sh --source-only failed (see $DEPS/check-cuda-source.log); checking the tree as it is"
fi

# cuBLAS headers
INCLUDES=(-I"$LLAMA/ggml/src/ggml-cuda/.." -I"$LLAMA/ggml/src/../include")
[ -n "$CUDA_INC" ] && INCLUDES+=(-isystem="$CUDA_INC")  # as CMake: no warnings from the toolkit headers
if [ ! -f "${CUDA_INC:-/nonexistent}/cublas_v2.h" ]; then
    CUBLAS_INC="$HOME/.cache/deco-gguf/cublas-include/$CUBLAS_WHEEL_VERSION"
    if [ ! -f "$CUBLAS_INC/cublas_v2.h" ]; then
        log "no cublas_v2.h in ${CUDA_INC:-the toolkit}: taking the headers from the nvidia-cublas $CUBLAS_WHEEL_VERSION wheel"
        PY="$VENV/bin/python"; [ -x "$PY" ] || PY=python3
        tmp="$(mktemp -d)"
        "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "nvidia-cublas==$CUBLAS_WHEEL_VERSION" >&2
        mkdir -p "$CUBLAS_INC"
        "$PY" - "$tmp" "$CUBLAS_INC" <<'EOF'
import glob, os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
(whl,) = glob.glob(os.path.join(src, "*.whl"))
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if "/include/" in n and n.endswith(".h"):
            with open(os.path.join(dst, os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
EOF
        rm -rf "$tmp"
    fi
    INCLUDES+=(-isystem="$CUBLAS_INC")
fi

# as ggml-cuda's CMake build (Release, shared libs, CUDA graphs), warnings as errors
FLAGS=(
    -DGGML_BACKEND_BUILD -DGGML_BACKEND_SHARED -DGGML_CUDA_USE_GRAPHS -DGGML_SCHED_MAX_COPIES=4 -DGGML_SHARED
    -D_GNU_SOURCE -D_XOPEN_SOURCE=600 -Dggml_cuda_EXPORTS
    -O3 -DNDEBUG -std=c++17 -use_fast_math -extended-lambda -Werror all-warnings
    -Xcompiler=-fPIC,-Wmissing-declarations,-Wmissing-noreturn,-Wall,-Wextra,-Wcast-qual,-Wno-unused-function,-Wno-array-bounds,-Wextra-semi,-Werror
)
for a in $ARCHS; do FLAGS+=("--generate-code=arch=compute_$a,code=[sm_$a]"); done

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
log "$("$NVCC" --version | tail -n 1); archs: $ARCHS"
t_all=$SECONDS
for f in $FILES; do
    t0=$SECONDS
    if ! "$NVCC" "${FLAGS[@]}" "${INCLUDES[@]}" -x cu -c "$LLAMA/ggml/src/ggml-cuda/$f" -o "$out/${f%.cu}.o"; then
        log "FAILED: nvcc $f"
        exit 1
    fi
    log "ok: $f ($((SECONDS - t0)) s)"
done
log "CUDA compile check passed ($((SECONDS - t_all)) s)"
