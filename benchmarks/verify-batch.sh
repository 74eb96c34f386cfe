#!/usr/bin/env bash
# Small batches (the verification batch of speculative decoding, a short prompt): DECO against the dense Llama
# of equal N, whole model, in one run.
#
#   bash benchmarks/verify-batch.sh                  # DECO-0.5B shape, Q4_0, 1 and 2 threads (about 5 minutes)
#   SHAPE=deco-0.1b TYPE=q8_0 THREADS=2 ROUNDS=3 LOGITS=all bash benchmarks/verify-batch.sh
#
# The DECO fixture (random weights, routers calibrated to ~20% activation) and dense_eq (the random-weight Llama
# that `deco-gguf speed --vs-dense` compares with) are loaded in one process and timed alternately, batch size by
# batch size (DECO k, dense_eq k, DECO k', ...), ROUNDS times, so that both see the same machine at the same
# moment. A batch is k tokens decoded in one call on an empty context, with the logits of the last token only
# (as llama-bench -p k), or of all k tokens with LOGITS=all (what a speculative verification needs). Per batch
# size k: median tokens/s of each, DECO's ppk/pp1 (a k-token batch costs k / (ppk/pp1) single-token steps) and
# DECO over dense_eq.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

OUT=${OUT:-out/bench}
SHAPE=${SHAPE:-deco-0.5b}
TYPE=${TYPE:-q4_0}
THREADS=${THREADS:-"1 2"}
ROUNDS=${ROUNDS:-7}
BATCHES=${BATCHES:-1,2,4,8,16}
LOGITS=${LOGITS:-last}
mkdir -p "$OUT"

source benchmarks/fixture-model.sh
model=$(fixture_model "$OUT" "$SHAPE" "$TYPE")

python - "$model" "$THREADS" "$BATCHES" "$ROUNDS" "$LOGITS" <<'EOF'
import statistics, sys, time
from pathlib import Path

import llama_cpp
from deco_gguf.runtime.context import DecoRuntime, load_llama
from deco_gguf.runtime.native import ThreadPool
from deco_gguf.measure.dense_eq import cached_dense_eq

model, threads, batches, rounds, logits = sys.argv[1:]
threads = [int(t) for t in threads.split()]
batches = [int(k) for k in batches.split(",")]
n_ctx = max(batches) + 16
# thread pools as large as the largest thread count (each run asks for its own), the dense model's as DECO's
deco = DecoRuntime(model, n_ctx=n_ctx, n_threads=max(threads), n_batch=max(batches), mode="sparse")
eq_path = cached_dense_eq(Path(model), deco.info, lambda s: print(s, file=sys.stderr)).path
eq = load_llama(eq_path, n_ctx=n_ctx, n_threads=max(threads), n_batch=max(batches), seed=0)
eq_pool = ThreadPool(max(threads))
eq_pool.attach(eq.ctx)
models = {"DECO": deco.llm, "dense_eq": eq}
tokens = deco.llm.tokenize(b" In the beginning God created the heaven and the earth." * 4)[:max(batches)]


def seconds_per_batch(llm, k: int, th: int) -> float:
    """Median seconds of one k-token batch on an empty context."""
    llama_cpp.llama_set_n_threads(llm.ctx, th, th)
    batch = llama_cpp.llama_batch_init(k, 0, 1)
    for i, tok in enumerate(tokens[:k]):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = tok, i, 1, 0
        batch.logits[i] = logits == "all" or i == k - 1
    batch.n_tokens = k
    times = []
    for _ in range(max(3, 32 // k)):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        start = time.perf_counter()
        if llama_cpp.llama_decode(llm.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        llama_cpp.llama_synchronize(llm.ctx)
        times.append(time.perf_counter() - start)
    llama_cpp.llama_batch_free(batch)
    return statistics.median(times)


samples: dict = {}
for r in range(int(rounds)):
    print(f"round {r + 1}/{rounds}", file=sys.stderr)
    for th in threads:
        for k in batches:
            for name, llm in models.items():
                time.sleep(0.05)  # the other model's threads stop polling for work and sleep
                samples.setdefault((name, th, k), []).append(k / seconds_per_batch(llm, k, th))
med = {key: statistics.median(v) for key, v in samples.items()}
print(f"\n{Path(model).name}: median tokens/s over {rounds} rounds, logits of "
      f"{'all tokens' if logits == 'all' else 'the last token'}")
print(f"{'threads':>7} {'k':>3} {'DECO':>8} {'dense_eq':>8} {'DECO ppk/pp1':>12} {'dense ppk/pp1':>13} {'DECO/dense_eq':>13}")
for th in threads:
    for k in batches:
        d, e = med[("DECO", th, k)], med[("dense_eq", th, k)]
        print(f"{th:>7} {k:>3} {d:>8.1f} {e:>8.1f} {d / med[('DECO', th, 1)]:>12.2f} "
              f"{e / med[('dense_eq', th, 1)]:>13.2f} {d / e:>13.2f}")
eq.close()
eq_pool.close()  # after the context that used it
deco.close()
EOF
