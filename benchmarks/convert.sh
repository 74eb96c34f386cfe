#!/usr/bin/env bash
# Peak RAM and wall time of converting the DECO-0.5B-shaped fixture (random weights, bf16, sharded).
# Usage: bash benchmarks/convert.sh [OUTTYPE] [EXPERT_TYPE]   (default: f16 q4_0)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
outtype=${1:-f16}
expert_type=${2:-q4_0}
mkdir -p out
[ -f out/deco-0.5b/config.json ] || deco-gguf fixture deco-0.5b out/deco-0.5b
out=out/deco-0.5b-$outtype-$expert_type.gguf
log=$(mktemp)
/usr/bin/time -v deco-gguf convert out/deco-0.5b -o "$out" --outtype "$outtype" --expert-type "$expert_type" --quiet 2>"$log" >/dev/null
peak_kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$log")
size=$(stat -c %s "$out")
src=$(du -cb out/deco-0.5b/*.safetensors | tail -1 | cut -f1)
python3 - "$peak_kib" "$size" "$src" "$wall" "$outtype" "$expert_type" <<'PY'
import sys
peak, size, src, wall, outtype, expert = int(sys.argv[1]) * 1024, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
print(f"convert deco-0.5b --outtype {outtype} --expert-type {expert}")
print(f"  source {src / 2**20:.0f} MiB (bf16), output {size / 2**20:.0f} MiB")
print(f"  wall {wall}, peak RSS {peak / 2**20:.0f} MiB = {peak / size:.2f} x output size")
PY
rm -f "$log"
