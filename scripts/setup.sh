#!/usr/bin/env bash
# Set up deco-gguf in ./.venv for development: `pip install -e ".[test]"` (which builds the patched llama.cpp
# runtime: build_backend/deco_build.py), with CPU torch first, plus the tools the tests and benchmarks run.
# Safe to rerun: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# The CPU build of torch first: with it installed, the package's loose torch bound pulls nothing more.
echo "==> installing CPU torch"
"${PIP[@]}" "torch==2.13.0"
echo "==> pip install -e .[test]: deco-gguf, its dependencies and the patched llama.cpp runtime"
echo "    (first time: about 5 minutes on 2 cores; log in .deps/cmake-build.log)"
"${PIP[@]}" -e ".[test]"

# The same build folder, incremental: llama-server, llama-bench, llama-perplexity and the test tools.
echo "==> building the tools the tests and benchmarks run (.deps/build/bin)"
bash scripts/build-runtime.sh

# The browser tests/test_web_chat.py drives (the web chat of `deco-gguf serve`): Debian's chromium and its driver.
if ! command -v chromedriver >/dev/null; then
    echo "==> installing chromium and chromium-driver for the web-chat test (apt-get)"
    SUDO=(); [ "$(id -u)" = 0 ] || SUDO=(sudo)
    { "${SUDO[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq \
        chromium chromium-driver >/dev/null; } || echo "warning: chromium was not installed (tests/test_web_chat.py needs it)" >&2
fi

# The bundled model's corpus (public-domain KJV from Debian): its held-out split is what perplexity
# is measured on. apt-get download needs the package lists; fill them once if they are empty.
echo "==> fetching the bundled model's corpus"
if ! .venv/bin/python -m deco_gguf.training.corpus >/dev/null 2>&1; then
    apt-get update -qq || echo "warning: apt-get update failed" >&2
    .venv/bin/python -m deco_gguf.training.corpus >/dev/null
fi
echo "==> ready: .venv/bin/deco-gguf"
