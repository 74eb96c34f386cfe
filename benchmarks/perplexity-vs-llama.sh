#!/usr/bin/env bash
# Wall time of `deco-gguf perplexity` against llama.cpp's llama-perplexity on the same file, context and
# threads, runs alternating, medians compared; the two final estimates must agree (to 1e-6 relative).
#
#   bash benchmarks/perplexity-vs-llama.sh MODEL.gguf TEXT [CTX] [THREADS] [RUNS]
#   bash benchmarks/perplexity-vs-llama.sh                      # the bundled model, 60 KB of held-out KJV
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-out/bench}
mkdir -p "$OUT"

MODEL=${1:-}
TEXT=${2:-}
CTX=${3:-512}
THREADS=${4:-2}
RUNS=${5:-5}
if [ -z "$MODEL" ]; then
    MODEL="$OUT/deco-tiny-f16.gguf"
    [ -f "$MODEL" ] || deco-gguf convert models/deco-tiny -o "$MODEL" -q 2>/dev/null
fi
if [ -z "$TEXT" ]; then
    TEXT="$OUT/heldout-60k.txt"
    python -c "from deco_gguf.training.corpus import load_corpus; print('\n'.join(load_corpus().heldout)[:60000])" > "$TEXT"
fi

python - "$MODEL" "$TEXT" "$CTX" "$THREADS" "$RUNS" <<'PY'
import json, re, statistics, subprocess, sys, time
model, text, ctx, threads, runs = sys.argv[1:4] + [sys.argv[4], int(sys.argv[5])]
ours_cmd = ["deco-gguf", "perplexity", model, text, "-c", ctx, "-t", threads, "--json"]
theirs_cmd = [".deps/build/bin/llama-perplexity", "-m", model, "-f", text, "-c", ctx, "-t", threads]
times = {"deco-gguf perplexity": [], "llama-perplexity": []}
for _ in range(runs):
    for name, cmd in (("deco-gguf perplexity", ours_cmd), ("llama-perplexity", theirs_cmd)):
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        times[name].append(time.perf_counter() - start)
        if name == "deco-gguf perplexity":
            ours = json.loads(run.stdout)
        else:
            theirs = float(re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr).group(1))
print(f"{model}, {text}, ctx {ctx}, {threads} thread(s), {runs} alternating runs")
for name, samples in times.items():
    print(f"  {name:22} median {statistics.median(samples):6.2f} s  (min {min(samples):.2f}, max {max(samples):.2f})")
ratio = statistics.median(times["deco-gguf perplexity"]) / statistics.median(times["llama-perplexity"])
print(f"  wall-time ratio deco-gguf / llama-perplexity: {ratio:.2f}")
print(f"  PPL: deco-gguf {ours['ppl']:.4f}, llama-perplexity {theirs:.4f}")
if abs(ours["ppl"] - theirs) > max(5e-5, 1e-6 * theirs):  # llama-perplexity prints 4 decimals
    sys.exit("the final estimates differ")
PY
