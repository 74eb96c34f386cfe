#!/usr/bin/env bash
# The main job: a DECO checkpoint in the released layout -> GGUF (experts Q4_0) -> info.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p out
deco-gguf fixture base out/deco-fixture
deco-gguf convert out/deco-fixture -o out/deco-fixture.gguf --outtype f16 --expert-type q4_0
deco-gguf info out/deco-fixture.gguf
