#!/usr/bin/env bash
# Held-out perplexity of the bundled model through the GGUF path, per quantization (ctx 256,
# llama.cpp's method: chunks of 256 tokens, the second half of each scored).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
dir=out/ppl
mkdir -p $dir
python -c "from deco_gguf.training.corpus import load_corpus; open('$dir/heldout.txt', 'w').write('\n\n'.join(load_corpus().heldout) + '\n')"
deco-gguf convert models/deco-tiny -o $dir/f32.gguf --outtype f32 -q
deco-gguf convert models/deco-tiny -o $dir/f16.gguf --outtype f16 -q
deco-gguf convert models/deco-tiny -o $dir/q8_0.gguf --outtype q8_0 -q
deco-gguf convert models/deco-tiny -o $dir/q4_0-experts.gguf --outtype f16 --expert-type q4_0 -q
deco-gguf quantize $dir/f16.gguf $dir/q4_k_m.gguf Q4_K_M >/dev/null
for m in f32 f16 q8_0 q4_0-experts q4_k_m; do
    printf '%-14s ' "$m"
    deco-gguf perplexity $dir/$m.gguf $dir/heldout.txt --ctx-size 256 --json \
        | python -c "import json, sys; d = json.load(sys.stdin); print(f\"{d['ppl']:.4f} +/- {d['ppl_error']:.4f} ({d['tokens']} tokens)\")"
done
