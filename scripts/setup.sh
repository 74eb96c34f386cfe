#!/usr/bin/env bash
# Set up deco-gguf in ./.venv: Python dependencies (CPU torch) and the package itself.
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
echo "==> ready: .venv/bin/deco-gguf"
