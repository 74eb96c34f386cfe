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
# the linter and the formatter (pyproject.toml, [tool.ruff]): the code as ruff leaves it
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
.venv/bin/pytest --junitxml="$report" "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests: the suite is broken" >&2
    exit 1
fi
# after scripts/setup.sh every test can run here: a skip (other than the aarch64 tests DECO_SKIP_AARCH64 asks
# to skip) means a part is missing or a test's check for it is wrong
.venv/bin/python - "$report" <<'PY' || exit 1
import sys
import xml.etree.ElementTree as ET

skipped = [(case.get("classname"), case.get("name"), s.get("message", ""))
           for case in ET.parse(sys.argv[1]).iter("testcase") for s in case.findall("skipped")]
unexpected = [c for c in skipped if "DECO_SKIP_AARCH64" not in c[2]]
for cls, name, why in unexpected:
    print(f"error: skipped {cls}::{name}: {why}", file=sys.stderr)
sys.exit(1 if unexpected else 0)
PY
exit "$status"
