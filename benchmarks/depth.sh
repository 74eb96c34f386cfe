#!/usr/bin/env bash
# Decode where a chat is: tokens/s after 0, 1k and 3k tokens of context, DECO against the dense Llama of equal N,
# flash attention on and off, with the patched llama-bench (one process per model and setting, in turns).
#
#   bash benchmarks/depth.sh                                     # DECO-0.5B shape, Q4_0, 1 and 2 threads
#   SHAPE=deco-0.1b DEPTHS=0,4096 THREADS=2 REPS=3 bash benchmarks/depth.sh
#   CACHE=q8_0 bash benchmarks/depth.sh                          # a Q8_0 KV cache (K and V)
#   BENCH=/path/to/other/llama-bench bash benchmarks/depth.sh    # another build on the same models
#
# The DECO fixture (random weights, routers calibrated to ~20% activation) and dense_eq (the random-weight Llama
# that `deco-gguf speed --vs-dense` compares with) run llama-bench -p $PP -n $TG -d $DEPTHS; the table gives tg and
# pp t/s at each depth (mean ± sd of REPS); pp at a depth is a prompt of PP tokens after that many (PP=0: none).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

OUT=${OUT:-out/bench}
SHAPE=${SHAPE:-deco-0.5b}
TYPE=${TYPE:-q4_0}
THREADS=${THREADS:-"1 2"}
DEPTHS=${DEPTHS:-0,1024,3072}
TG=${TG:-32}
PP=${PP:-0}
CACHE=${CACHE:-f16}
REPS=${REPS:-3}
BENCH=${BENCH:-.deps/build/bin/llama-bench}
mkdir -p "$OUT"

source benchmarks/fixture-model.sh
model=$(fixture_model "$OUT" "$SHAPE" "$TYPE")
dense_eq=$(python -m deco_gguf.measure.dense_eq "$model")

# one table row per llama-bench run (its JSON on stdin), the header before the first
row_of_json=$(cat <<'PY'
import json
import sys

threads, fa, name, first = sys.argv[1:]
tests = json.load(sys.stdin)
labels = [f"{'pp' if r['n_prompt'] else 'tg'}{r['n_prompt'] or r['n_gen']} @ d{r['n_depth']}" for r in tests]
if first == "1":
    print("| threads | flash attn | model | " + " | ".join(labels) + " |")
    print("|---" * (3 + len(tests)) + "|")
cells = [f"{r['avg_ts']:.1f} ± {r['stddev_ts']:.1f}" for r in tests]
print(f"| {threads} | {fa} | {name} | " + " | ".join(cells) + " |")
PY
)

echo "$CACHE KV cache; llama-bench -p $PP -n $TG -d $DEPTHS -r $REPS"
first=1
for t in $THREADS; do
    for fa in 1 0; do
        for m in "$model" "$dense_eq"; do
            name=$([ "$m" = "$model" ] && echo DECO || echo dense_eq)
            LD_LIBRARY_PATH="$(dirname "$BENCH")" "$BENCH" -m "$m" -p "$PP" -n "$TG" -d "$DEPTHS" -fa "$fa" -t "$t" \
                -ctk "$CACHE" -ctv "$CACHE" -r "$REPS" -o json 2>/dev/null \
                | python -c "$row_of_json" "$t" "$fa" "$name" "$first"
            first=0
        done
    done
done
