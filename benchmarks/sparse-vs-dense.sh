#!/usr/bin/env bash
# Sparse against dense evaluation of DECO on the CPU, measured side by side in one run, beside the bounds.
#
#   bash benchmarks/sparse-vs-dense.sh            # everything below (about 20 minutes on 2 cores)
#   SHAPES=deco-0.5b TYPES=q4_0 THREADS=2 bash benchmarks/sparse-vs-dense.sh
#
# 1. The FFN layer alone (.deps/build/bin/bench-deco-ffn: router mat-vec + GGML_OP_DECO_MOE + shared expert,
#    exactly 20% of the experts active per token, a stack of layers with their own weights so that they stream
#    from memory, sparse and dense runs alternating; time per layer): decode (1 token, bound = weight bytes),
#    small batches (2, 4, 8, 16 tokens: speculative verification; beside the bytes bound of the union of the
#    experts the batch activates, the multiply-add bound, and the batch's cost in one-token steps) and prefill
#    (512 tokens, bound = multiply-adds).
# 2. The whole model (deco-gguf speed --vs-dense): random-weight fixtures in the released shapes with routers
#    calibrated to ~20% activation on text, F16-converted then quantized; pp512 and tg64, sparse, dense and a
#    stock Llama of equal N (dense_eq), interleaved repetitions; bound = weight bytes per decoded token.
# Everything is written as JSON to $OUT (default out/bench) and summarised as tables at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

OUT=${OUT:-out/bench}
SHAPES=${SHAPES:-"deco-0.1b deco-0.5b"}
TYPES=${TYPES:-"q4_0 q8_0"}
THREADS=${THREADS:-"1 2"}
REPS=${REPS:-3}
BENCH_FFN=.deps/build/bin/bench-deco-ffn
[ -x "$BENCH_FFN" ] || { echo "run scripts/setup.sh first (no $BENCH_FFN)" >&2; exit 1; }
mkdir -p "$OUT"

# shape of one DECO FFN layer of a fixture preset (the released shapes, deco_gguf.fixtures.PRESETS)
ffn_args() {
    python -c "from deco_gguf.fixtures import PRESETS; p = PRESETS['$1']
print(f'--d {p.hidden_size} --De {p.expert_ffn} --E {p.num_experts} --Ds {p.shared_ffn}')" 2>/dev/null
}
for shape in $SHAPES; do
    ffn_args "$shape" >/dev/null || { echo "unknown shape $shape (fixture presets: deco-0.1b deco-0.5b)" >&2; exit 2; }
done

echo "== FFN layer alone" >&2
: > "$OUT/ffn.jsonl"
for shape in $SHAPES; do
    for type in $TYPES; do
        for t in $THREADS; do
            # shellcheck disable=SC2046
            "$BENCH_FFN" $(ffn_args "$shape") --type "$type" --threads "$t" --tokens 1,2,4,8,16 \
                | sed "s/^{/{\"shape\": \"$shape\", /" >> "$OUT/ffn.jsonl"
            # shellcheck disable=SC2046
            "$BENCH_FFN" $(ffn_args "$shape") --type "$type" --threads "$t" --tokens 512 --reps 3 --layers 4 \
                | sed "s/^{/{\"shape\": \"$shape\", /" >> "$OUT/ffn.jsonl"
        done
    done
done

echo "== whole model" >&2
source benchmarks/fixture-model.sh
for shape in $SHAPES; do
    for type in $TYPES; do
        model=$(fixture_model "$OUT" "$shape" "$type")
        deco-gguf speed "$model" --pp 512 --tg 64 -r "$REPS" --threads "${THREADS// /,}" --vs-dense --json \
            > "$OUT/speed-$shape-$type.json"
    done
done

python - "$OUT" $SHAPES -- $TYPES <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
sep = sys.argv.index("--")
shapes, types = sys.argv[2:sep], sys.argv[sep + 1:]

print("\nFFN layer alone (router + DECO op + shared expert), median µs, sparse vs dense; union: experts some token of "
      "the batch activates; steps: sparse time over that of one token")
print(f"{'shape':10} {'type':5} {'repack':6} {'thr':>3} {'tokens':>6} {'rate':>5} {'union':>5} {'sparse':>10} {'dense':>10} "
      f"{'ratio':>6} {'bytes bd':>8} {'MACs bd':>7} {'steps':>5}")
for line in (out / "ffn.jsonl").read_text().splitlines():
    r = json.loads(line)
    steps = f"{r['steps']:>5.2f}" if r.get("steps") is not None else f"{'':>5}"
    print(f"{r['shape']:10} {r['type']:5} {str(r['repacked']):6} {r['threads']:>3} {r['tokens']:>6} {r['rate']:>5.3f} "
          f"{r['union']:>5.3f} {r['sparse_us']:>10.1f} {r['dense_us']:>10.1f} {r['ratio']:>6.2f} "
          f"{r['bound_bytes']:>8.2f} {r['bound_macs']:>7.2f} {steps}")

print("\nWhole model, median tokens/s (pp512, tg64), sparse vs dense and vs dense_eq (stock Llama, equal N)")
print(f"{'shape':10} {'type':5} {'thr':>3} {'rate':>5} {'tg sparse':>9} {'tg dense':>8} {'tg eq':>6} {'tg ratio':>8} "
      f"{'bound':>6} {'of bound':>8} {'vs eq':>6} {'eq bound':>8} {'pp sparse':>9} {'pp dense':>8} {'pp ratio':>8}")
for shape in shapes:
    for t in types:
        s = json.loads((out / f"speed-{shape}-{t}.json").read_text())
        med = {(r["model"], r["mode"], r["threads"], r["test"]): r["tokens_per_second"]["median"] for r in s["results"]}
        for ra in s["ratios"]:
            th = ra["threads"]
            print(f"{shape:10} {t:5} {th:>3} {s['activation']['mean']:>5.3f} {med[('deco', 'sparse', th, 'tg')]:>9.1f} "
                  f"{med[('deco', 'dense', th, 'tg')]:>8.1f} {med[('dense_eq', 'dense', th, 'tg')]:>6.1f} "
                  f"{ra['sparse_over_dense_tg']:>8.2f} {ra['bound']:>6.2f} {ra['sparse_over_dense_tg'] / ra['bound']:>8.2f} "
                  f"{ra['sparse_over_dense_eq_tg']:>6.2f} {ra['bound_vs_dense_eq']:>8.2f} "
                  f"{med[('deco', 'sparse', th, 'pp')]:>9.1f} {med[('deco', 'dense', th, 'pp')]:>8.1f} "
                  f"{ra['sparse_over_dense_pp']:>8.2f}")
EOF
