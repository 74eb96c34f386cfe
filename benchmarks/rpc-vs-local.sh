#!/usr/bin/env bash
# Layers on a local rpc-server against local evaluation, in one llama-bench run (docs/distributed.md).
#
#   bash benchmarks/rpc-vs-local.sh                   # DECO-0.5B shape, Q4_0, 2 threads
#   SHAPE=deco-0.1b TYPE=q8_0 THREADS=1 bash benchmarks/rpc-vs-local.sh
#
# One llama-bench invocation measures, interleaving nothing but keeping every configuration in the same
# process and minute: local with repacked weights (--repack 1, the default), local with plain weights
# (--repack 0: the layout rpc-server keeps), and every layer on the rpc-server (-ngl 99). The server runs
# on this machine with the same thread count, so the difference is the RPC path itself, not the network.
# Models: random-weight fixtures in the released shapes with routers calibrated to ~20% activation
# (cached in $OUT, shared with benchmarks/sparse-vs-dense.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

OUT=${OUT:-out/bench}
SHAPE=${SHAPE:-deco-0.5b}
TYPE=${TYPE:-q4_0}
THREADS=${THREADS:-2}
REPS=${REPS:-5}
BIN=.deps/build/bin
[ -x "$BIN/ggml-rpc-server" ] || { echo "run scripts/setup.sh first (no $BIN/ggml-rpc-server)" >&2; exit 1; }
mkdir -p "$OUT"

source benchmarks/fixture-model.sh
model=$(fixture_model "$OUT" "$SHAPE" "$TYPE")

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN/ggml-rpc-server" -H 127.0.0.1 -p "$port" -t "$THREADS" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
python -c "
import sys, time
from deco_gguf.runtime.rpc import protocol_version
for _ in range(100):
    try:
        protocol_version('127.0.0.1:$port', timeout=1); sys.exit(0)
    except Exception:
        time.sleep(0.1)
sys.exit('the rpc-server did not start')"

"$BIN/llama-bench" -m "$model" -t "$THREADS" -p 0,64 -n 64 -r "$REPS" --rpc "127.0.0.1:$port" \
    -ngl 0,99 --repack 1,0 -o json > "$OUT/rpc-vs-local.json"
python - "$OUT/rpc-vs-local.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
def tps(ngl, repack, test):  # test: "pp" (n_prompt tokens, no generation) or "tg" (n_gen tokens)
    count = "n_gen" if test == "tg" else "n_prompt"
    return next(r["avg_ts"] for r in rows if r["n_gpu_layers"] == ngl and r["repack"] == repack and r[count] > 0)
print(f"{'':34} {'pp64 t/s':>10} {'tg64 t/s':>10}  tg vs local")
base = tps(0, True, "tg")
for name, ngl, repack in (("local, repacked weights", 0, True), ("local, plain weights", 0, False),
                          ("all layers on the rpc-server", 99, True)):
    tg = tps(ngl, repack, "tg")
    print(f"{name:34} {tps(ngl, repack, 'pp'):10.1f} {tg:10.1f}  x{tg / base:.2f}")
PY
