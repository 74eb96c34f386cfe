#!/usr/bin/env bash
# Cross-build the patched llama.cpp CPU backend for aarch64 (Jetson Orin's Cortex-A78AE cores), to be
# run under qemu-user by tests/test_aarch64.py. See docs/arm.md.
#
#   scripts/build-aarch64.sh
#
# 1. installs qemu-user and g++-aarch64-linux-gnu with apt-get when missing (apt-get update if needed);
# 2. gets the patched source tree from scripts/build-runtime.sh --source-only;
# 3. configures .deps/build-aarch64 once (re-configures when the arguments change): shared libs,
#    -march=armv8.2-a+dotprod+fp16 (GGML_CPU_ARM_ARCH), ggml's thread pool, ccache;
# 4. builds libllama/libggml*, the two DECO checks test-deco-ffn and test-deco-logits, and test-backend-ops (its
#    DECO_MOE and flash-decoding cases; test-backend-ops-ggml, linked to ggml only), incrementally.
#
# Log: .deps/build-aarch64.log. Knobs: DECO_VENV, DECO_DEPS, DECO_JOBS (default 2), DECO_ARM_ARCH,
# CCACHE_DIR, as in build-runtime.sh.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DECO_VENV:-$REPO/.venv}"
DEPS="${DECO_DEPS:-$REPO/.deps}"
JOBS="${DECO_JOBS:-2}"
ARM_ARCH="${DECO_ARM_ARCH:-armv8.2-a+dotprod+fp16}"
BUILD="$DEPS/build-aarch64"
LOG="$DEPS/build-aarch64.log"
SYSROOT=/usr/aarch64-linux-gnu
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$REPO}"
export CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-true}"

log() { printf '[build-aarch64 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
T0=$(date +%s)
mkdir -p "$DEPS"

# 1. toolchain and emulator
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
    PKGS=(qemu-user g++-aarch64-linux-gnu)
    command -v apt-get >/dev/null \
        || { echo "error: need ${PKGS[*]} (Debian/Ubuntu packages) and there is no apt-get" >&2; exit 1; }
    SUDO=()
    [ "$(id -u)" = 0 ] || SUDO=(sudo -n)
    log "installing ${PKGS[*]}"
    apt_install() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PKGS[@]}"; }
    if ! apt_install >"$DEPS/apt-aarch64.log" 2>&1; then
        "${SUDO[@]}" apt-get update -q >>"$DEPS/apt-aarch64.log" 2>&1 || true
        apt_install >>"$DEPS/apt-aarch64.log" 2>&1 || {
            tail -n 20 "$DEPS/apt-aarch64.log" >&2
            echo "error: could not install ${PKGS[*]} with apt-get (root or passwordless sudo and network needed)" >&2
            exit 1
        }
    fi
fi

# 2. the patched source tree (shared with the x86 build)
LLAMA="$(DECO_VENV="$VENV" DECO_DEPS="$DEPS" bash "$REPO/scripts/build-runtime.sh" --source-only | tail -n 1)"

# 3. configure
CCACHE="$(command -v ccache || echo "$VENV/bin/ccache")"
[ -x "$CCACHE" ] || { echo "error: no ccache (scripts/build-runtime.sh installs one into $VENV)" >&2; exit 1; }
GEN=()
if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
CMAKE_ARGS=(
    "${GEN[@]}"
    -DCMAKE_SYSTEM_NAME=Linux
    -DCMAKE_SYSTEM_PROCESSOR=aarch64
    -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc
    -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++
    -DCMAKE_FIND_ROOT_PATH="$SYSROOT"
    -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER
    -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY
    -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY
    -DCMAKE_C_COMPILER_LAUNCHER="$CCACHE"
    -DCMAKE_CXX_COMPILER_LAUNCHER="$CCACHE"
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON
    -DCMAKE_INSTALL_RPATH='$ORIGIN'
    -DGGML_NATIVE=OFF
    -DGGML_CPU_ARM_ARCH="$ARM_ARCH"
    -DGGML_OPENMP=OFF
    -DGGML_CCACHE=OFF
    -DLLAMA_BUILD_COMMON=ON   # the tests folder is only configured with it; nothing built links it
    -DLLAMA_BUILD_TESTS=ON
    -DLLAMA_BUILD_TOOLS=OFF
    -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_LLGUIDANCE=OFF
)
: >"$LOG"
CONFIG_STAMP="$(printf '%s\n' "$LLAMA" "${CMAKE_ARGS[@]}" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$BUILD/CMakeCache.txt" ] || [ "$(cat "$BUILD/.deco-configured" 2>/dev/null)" != "$CONFIG_STAMP" ]; then
    log "configuring $BUILD (-march=$ARM_ARCH)"
    rm -rf "$BUILD"
    cmake -S "$LLAMA" -B "$BUILD" "${CMAKE_ARGS[@]}" >>"$LOG" 2>&1 \
        || { tail -n 60 "$LOG" >&2; echo "configure failed, full log: $LOG" >&2; exit 1; }
    echo "$CONFIG_STAMP" > "$BUILD/.deco-configured"
fi

# 4. build
TARGETS=(llama ggml ggml-base ggml-cpu test-deco-ffn test-deco-logits test-backend-ops-ggml)
log "building ${TARGETS[*]} (-j$JOBS)"
cmake --build "$BUILD" --target "${TARGETS[@]}" -j "$JOBS" >>"$LOG" 2>&1 \
    || { tail -n 80 "$LOG" >&2; echo "build failed, full log: $LOG" >&2; exit 1; }
log "done in $(( $(date +%s) - T0 )) s; binaries in $BUILD/bin"
