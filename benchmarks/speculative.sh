#!/usr/bin/env bash
# The speculative decoding engine, independently of how good a draft is: a synthetic draft that proposes the
# model's own greedy continuation, each token right with probability RATE (so a draft token is accepted with
# that probability, given the ones before it were), against autoregressive sparse and dense evaluation.
#
#   bash benchmarks/speculative.sh                     # DECO-0.5B shape, Q4_0, 1 and 2 threads (about 10 minutes)
#   SHAPE=deco-0.1b DRAFT_MAX="4 8" PASSAGES=3 bash benchmarks/speculative.sh
#
# The fixture has random weights and routers calibrated to ~20% activation (benchmarks/fixture-model.sh). For
# each draft length (DRAFT_MAX), one `deco-gguf speed --synthetic` run: PASSAGES passages of the built-in text,
# PP prompt tokens and TG generated tokens each, greedy; per passage the configurations run one after the other
# and the speculative ones must generate exactly the autoregressive tokens. Printed: median tokens/s, speed-up
# over autoregressive sparse and dense decoding, acceptance (accepted over drafted tokens), tokens per
# verification and what a verification costs in autoregressive decode steps.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

OUT=${OUT:-out/bench}
SHAPE=${SHAPE:-deco-0.5b}
TYPE=${TYPE:-q4_0}
THREADS=${THREADS:-1,2}
RATES=${RATES:-0.5,0.7,0.8,0.9}
DRAFT_MAX=${DRAFT_MAX:-"4 8"}
PASSAGES=${PASSAGES:-5}
PP=${PP:-32}
TG=${TG:-64}
mkdir -p "$OUT"

source benchmarks/fixture-model.sh
model=$(fixture_model "$OUT" "$SHAPE" "$TYPE")

for n in $DRAFT_MAX; do
    COLUMNS=${COLUMNS:-160} deco-gguf speed "$model" --synthetic "$RATES" --draft-max "$n" --threads "$THREADS" \
        --repetitions "$PASSAGES" --pp "$PP" --tg "$TG"
done
