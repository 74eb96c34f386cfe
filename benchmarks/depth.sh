#!/usr/bin/env bash
# Decode where a chat is: tokens/s after 0, 1k and 3k tokens of context, DECO against the dense Llama of equal N,
# flash attention on and off, with the patched llama-bench (one process per model and setting, in turns).
#
#   bash benchmarks/depth.sh                                     # DECO-0.5B shape, Q4_0, 1 and 2 threads
#   SHAPE=deco-0.1b DEPTHS=0,4096 THREADS=2 REPS=3 bash benchmarks/depth.sh
#   BENCH=/path/to/other/llama-bench bash benchmarks/depth.sh    # another build on the same models
#
# The DECO fixture (random weights, routers calibrated to ~20% activation) and dense_eq (the random-weight Llama
# that `deco-gguf speed --vs-dense` compares with) run llama-bench -p 0 -n $TG -d $DEPTHS, F16 KV cache; the table
# gives tg t/s at each depth (mean ± sd of REPS).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

OUT=${OUT:-out/bench}
SHAPE=${SHAPE:-deco-0.5b}
TYPE=${TYPE:-q4_0}
THREADS=${THREADS:-"1 2"}
DEPTHS=${DEPTHS:-0,1024,3072}
TG=${TG:-32}
REPS=${REPS:-3}
BENCH=${BENCH:-.deps/build/bin/llama-bench}
mkdir -p "$OUT"

source benchmarks/fixture-model.sh
model=$(fixture_model "$OUT" "$SHAPE" "$TYPE")
dense_eq=$(python - "$model" <<'EOF'
import sys
from pathlib import Path

from deco_gguf.measure.dense_eq import build_dense_eq
from deco_gguf.model.gguf_file import read_gguf
from deco_gguf.support.cache import cache_root

model = Path(sys.argv[1])
print(build_dense_eq(model, read_gguf(model), cache_root() / "dense-eq", lambda s: print(s, file=sys.stderr)).path)
EOF
)

echo "| threads | flash attn | model | $(tr ',' '\n' <<<"$DEPTHS" | sed 's/^/tg'"$TG"' @ d/' | paste -sd'|' | sed 's/|/ | /g') |"
for t in $THREADS; do
    for fa in 1 0; do
        for m in "$model" "$dense_eq"; do
            name=$([ "$m" = "$model" ] && echo DECO || echo dense_eq)
            row=$(LD_LIBRARY_PATH="$(dirname "$BENCH")" "$BENCH" -m "$m" -p 0 -n "$TG" -d "$DEPTHS" -fa "$fa" -t "$t" \
                  -r "$REPS" -o md 2>/dev/null | grep "tg$TG" | awk -F'|' '{gsub(/ +$|^ +/, "", $(NF-1)); print $(NF-1)}' \
                  | paste -sd'|' | sed 's/|/ | /g')
            echo "| $t | $fa | $name | $row |"
        done
    done
done
