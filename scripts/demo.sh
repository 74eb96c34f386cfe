#!/usr/bin/env bash
# The main job on the bundled trained model: HF checkpoint -> GGUF (F16, Q4_0 experts) -> info ->
# a short chat exchange -> a speed summary (sparse vs dense evaluation).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p out
deco-gguf convert models/deco-tiny -o out/deco-tiny-q4.gguf --outtype f16 --expert-type q4_0
deco-gguf info out/deco-tiny-q4.gguf
deco-gguf chat out/deco-tiny-q4.gguf --system "You are a helpful assistant." \
    --prompt "And the LORD spake unto Moses, saying," --temperature 0 --max-tokens 40
deco-gguf speed out/deco-tiny-q4.gguf --threads 1
