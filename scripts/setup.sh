#!/usr/bin/env bash
# Set up deco-gguf in ./.venv: Python dependencies (CPU torch), the package, the patched llama.cpp runtime.
# Safe to rerun: finished steps are skipped by pip.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# The CPU build of torch first: with it installed, the package's loose torch bound pulls nothing more.
echo "==> installing Python dependencies"
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"

# The patched llama.cpp (ggml_patches/) and llama-cpp-python on top of it; incremental on reruns.
echo "==> building the patched llama.cpp runtime (first time: about 11 minutes on 2 cores)"
bash scripts/build-runtime.sh

# The bundled model's corpus (public-domain KJV from Debian): its held-out split is what perplexity
# is measured on. apt-get download needs the package lists; fill them once if they are empty.
echo "==> fetching the bundled model's corpus"
if ! .venv/bin/python -m deco_gguf.corpus >/dev/null 2>&1; then
    apt-get update -qq || echo "warning: apt-get update failed" >&2
    .venv/bin/python -m deco_gguf.corpus >/dev/null
fi
echo "==> ready: .venv/bin/deco-gguf"
