#!/usr/bin/env bash
# Quantization presets at their bytes: decode (tg32) and 2-16-token batches (pp2..pp16) of one model quantized
# to several presets, each preset's tokens/s against Q4_0's scaled by the bytes each reads per token.
#
#   bash benchmarks/presets.sh                       # DECO-0.5B shape, Q4_0 Q4_K_M Q5_K_M Q6_K Q8_0, 1 and 2 threads
#   OUT=/work/bench ROUNDS=7 PRESETS="q4_0 q4_k_m" BEFORE=/path/to/old/bin/llama-bench bash benchmarks/presets.sh
#
# The patched llama-bench (`-p 2,4,8,16 -n 32 -r 3`) runs the presets in turn, ROUNDS times, so that all see the
# same machine at about the same moment (it is shared and noisy: only ratios within one run mean anything). With
# BEFORE (another build's llama-bench) each preset is also timed with that build, alternately.
# Bytes per token: the weights a decoded token reads (deco_gguf.measure.speed_report.weight_bytes: every
# non-expert weight, one embedding row, the active experts), at the activation each preset's routers give 32
# random tokens decoded one at a time (as llama-bench's tg). Reported per preset and test: median tokens/s and
#   at bytes = t/s / (Q4_0's t/s x Q4_0's bytes / the preset's bytes)
# (1.0: the preset runs as fast per byte as Q4_0).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

OUT=${OUT:-out/bench}
SHAPE=${SHAPE:-deco-0.5b}
PRESETS=${PRESETS:-"q4_0 q4_k_m q5_k_m q6_k q8_0"}
THREADS=${THREADS:-1,2}
ROUNDS=${ROUNDS:-5}
AFTER=${AFTER:-.deps/build/bin/llama-bench}
BEFORE=${BEFORE:-}
mkdir -p "$OUT"

source benchmarks/fixture-model.sh
models=()
for preset in $PRESETS; do
    models+=("$(fixture_model "$OUT" "$SHAPE" "$preset")")
done

python - "$THREADS" "$ROUNDS" "$AFTER" "$BEFORE" "${models[@]}" <<'EOF'
import json, random, statistics, subprocess, sys
from pathlib import Path

import llama_cpp
from deco_gguf.runtime.context import DecoRuntime
from deco_gguf.measure.speed_report import file_weight_bytes

threads, rounds, after, before, *models = sys.argv[1:]
builds = {"after": after} | ({"before": before} if before else {})
names = [Path(m).stem.split("-")[-1].upper() for m in models]


def bytes_per_token(model: str) -> float:
    """Weight bytes one decoded token reads, at the activation of 32 random tokens."""
    deco = DecoRuntime(model, n_ctx=64, n_threads=2, n_batch=1, mode="sparse")
    rng = random.Random(0)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(deco.llm.model))
    for _ in range(32):
        deco.llm.eval([rng.randrange(vocab)])
    rates = {a.layer: a.rate for a in deco.activity() if a is not None}
    deco.close()
    return file_weight_bytes(Path(model)).sparse(rates)


weights = {name: bytes_per_token(m) for name, m in zip(names, models)}
samples: dict = {}
for r in range(int(rounds)):
    print(f"round {r + 1}/{rounds}", file=sys.stderr)
    for name, model in zip(names, models):
        for build, bench in builds.items():
            cmd = [bench, "-m", model, "-t", threads, "-p", "2,4,8,16", "-n", "32", "-r", "3", "-o", "json"]
            for test in json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout):
                kind = f"tg{test['n_gen']}" if test["n_gen"] else f"pp{test['n_prompt']}"
                samples.setdefault((build, name, test["n_threads"], kind), []).append(test["avg_ts"])

med = {key: statistics.median(v) for key, v in samples.items()}
tests = ["tg32", "pp2", "pp4", "pp8", "pp16"]
print(f"\nmedian tokens/s over {rounds} rounds (llama-bench -r 3 each); at bytes = t/s / (Q4_0 t/s x Q4_0 bytes / bytes)")
for build in builds:
    for th in sorted({k[2] for k in med}):
        print(f"\n{build}, {th} thread(s)")
        print(f"| preset | MB/token | " + " | ".join(tests) + " |")
        print("|---|---|" + "---|" * len(tests))
        for name in names:
            cells = []
            for test in tests:
                ts, base = med[(build, name, th, test)], med[(build, names[0], th, test)]
                cells.append(f"{ts:.1f} ({ts / (base * weights[names[0]] / weights[name]):.2f})")
            print(f"| {name} | {weights[name] / 1e6:.0f} | " + " | ".join(cells) + " |")
if before:
    print("\nafter / before (same preset, same run)")
    for th in sorted({k[2] for k in med}):
        for name in names:
            print(f"  {th} thread(s) {name}: " + ", ".join(
                f"{t} x{med[('after', name, th, t)] / med[('before', name, th, t)]:.2f}" for t in tests))
EOF
