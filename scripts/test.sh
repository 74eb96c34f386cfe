#!/usr/bin/env bash
# Run the test suite; extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
# CUDA compile check of our ggml-cuda code (nvcc only, no GPU needed; skipped without nvcc)
bash scripts/check-cuda.sh || exit 1
# the aarch64 cross build that tests/test_aarch64.py runs under qemu (docs/arm.md)
if [ "${DECO_SKIP_AARCH64:-}" != 1 ]; then
    bash scripts/build-aarch64.sh || exit 1
fi
.venv/bin/pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests: the suite is broken" >&2
    exit 1
fi
exit "$status"
