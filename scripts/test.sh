#!/usr/bin/env bash
# Run the test suite; extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
# CUDA compile check of our ggml-cuda code (nvcc only, no GPU needed; skipped without nvcc)
bash scripts/check-cuda.sh || exit 1
.venv/bin/pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests: the suite is broken" >&2
    exit 1
fi
exit "$status"
