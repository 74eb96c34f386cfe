#!/usr/bin/env bash
# Held-out perplexity of low-bit quantizations of the bundled model with and without an importance matrix.
#
#   bash benchmarks/imatrix.sh            # Q3_K_M and IQ4_XS (TYPES="Q2_K Q3_K_M IQ4_XS" for more)
#
# The importance matrix comes from 200 KB of the training split, the perplexity from the held-out split
# (docs/bundled-model.md), context 256, as the README's perplexity figures.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-out/bench}
TYPES=${TYPES:-"Q3_K_M IQ4_XS"}
THREADS=${THREADS:-2}
mkdir -p "$OUT"

python - "$OUT" <<'PY'
import sys
from pathlib import Path
from deco_gguf.training.corpus import load_corpus
out, corpus = Path(sys.argv[1]), load_corpus()
(out / "train-200k.txt").write_text("\n".join(corpus.train)[:200_000])
(out / "heldout.txt").write_text("\n".join(corpus.heldout))
PY
f16="$OUT/deco-tiny-f16.gguf"
[ -f "$f16" ] || deco-gguf convert models/deco-tiny -o "$f16" -q 2>/dev/null
deco-gguf imatrix "$f16" "$OUT/train-200k.txt" -o "$OUT/deco-tiny.imatrix.gguf" -c 256 -t "$THREADS" >/dev/null

ppl() { deco-gguf perplexity "$1" "$OUT/heldout.txt" -c 256 -t "$THREADS" --json | python -c 'import json, sys; r = json.load(sys.stdin); print("%.4f ± %.4f" % (r["ppl"], r["ppl_error"]))'; }
echo "| type | size MiB | PPL without imatrix | PPL with imatrix |"
echo "|---|---|---|---|"
echo "| F16 | $(du -m "$f16" | cut -f1) | $(ppl "$f16") | |"
for type in $TYPES; do
    deco-gguf quantize "$f16" "$OUT/deco-tiny-$type.gguf" "$type" --threads "$THREADS" > "$OUT/quantize-$type.log"
    deco-gguf quantize "$f16" "$OUT/deco-tiny-$type-imatrix.gguf" "$type" --threads "$THREADS" \
        --imatrix "$OUT/deco-tiny.imatrix.gguf" > /dev/null
    size=$(python -c "import os; print(f'{os.path.getsize(\"$OUT/deco-tiny-$type.gguf\") / 2**20:.2f}')")
    echo "| $type | $size | $(ppl "$OUT/deco-tiny-$type.gguf") | $(ppl "$OUT/deco-tiny-$type-imatrix.gguf") |"
done
echo
echo "Tensors that fell back to another type (quantize's table, $(echo $TYPES | cut -d' ' -f1)):"
cat "$OUT/quantize-$(echo $TYPES | cut -d' ' -f1).log"
