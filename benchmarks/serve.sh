#!/usr/bin/env bash
# Serving under load: N = 1, 2, 4, 8 concurrent clients against llama-server, DECO against the dense Llama of
# equal N (dense_eq, what `deco-gguf speed --vs-dense` compares with), served the same way.
#
#   bash benchmarks/serve.sh                                 # DECO-0.5B shape, Q4_0 (about 10 minutes)
#   MODEL=deco-0.5b-q4_0.gguf CLIENTS=1,4 ROUNDS=2 GEN=32 THREADS=1 bash benchmarks/serve.sh
#
# Both models are served at once by the patched llama-server with the command line `deco-gguf serve` builds
# (deco_gguf.runtime.server.server_args: --parallel 8 slots, PROMPT+GEN tokens each, THREADS threads (default: all
# cores; on a machine other jobs share, 1 avoids threads waiting on each other), --metrics), and
# measured alternately, N by N (DECO N, dense_eq N, DECO N', ...), ROUNDS times, so that both see the same machine
# at the same moment; the idle one sleeps. Client i sends held-out KJV chapter i's first PROMPT tokens (different
# real prompts: the union of the experts a batch activates grows with distinct tokens), asks for GEN tokens
# (greedy, no early end, no prompt cache) and streams the reply. Per N: aggregate generated tokens/s (all
# clients' tokens / wall time from the first request to the last token) and the median time to first token,
# median over the rounds, DECO over dense_eq, and DECO's mean expert activation from /metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

OUT=${OUT:-out/bench}
CLIENTS=${CLIENTS:-1,2,4,8}
ROUNDS=${ROUNDS:-3}
PROMPT=${PROMPT:-64}
GEN=${GEN:-64}
THREADS=${THREADS:-0}
mkdir -p "$OUT"
if [ -z "${MODEL:-}" ]; then
    source benchmarks/fixture-model.sh
    MODEL=$(fixture_model "$OUT" deco-0.5b q4_0)
fi

python - "$MODEL" "$CLIENTS" "$ROUNDS" "$PROMPT" "$GEN" "$THREADS" <<'EOF'
import json, re, socket, statistics, sys, threading, time, urllib.request
from pathlib import Path

from deco_gguf.measure.dense_eq import cached_dense_eq
from deco_gguf.model.gguf_file import read_gguf
from deco_gguf.runtime.server import Server, ServerOptions, server_args
from deco_gguf.training.corpus import load_corpus

model, clients, (rounds, prompt_len, gen, threads) = sys.argv[1], [int(n) for n in sys.argv[2].split(",")], map(int, sys.argv[3:])
info = read_gguf(Path(model))
dense = cached_dense_eq(Path(model), info, lambda s: print(s, file=sys.stderr)).path
slots = max(clients)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(path: Path) -> Server:
    options = ServerOptions(path, port=free_port(), parallel=slots, slot_context=prompt_len + gen + 16, threads=threads or None)
    server = Server(server_args(options, info.config.context_length), options.url, {"DECO_FFN": "sparse"})
    server.wait_ready()
    return server


servers = {"DECO": start(Path(model)), "dense_eq": start(dense)}


def post(url: str, body: dict):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


# client i's prompt: the first prompt_len tokens of held-out chapter i (the server's own tokenizer)
chapters = load_corpus().heldout[:slots]
prompts = [post(servers["DECO"].url + "/tokenize", {"content": c}).read() for c in chapters]
prompts = [json.loads(p)["tokens"][:prompt_len] for p in prompts]


def one_request(url: str, prompt: list[int], out: dict) -> None:
    body = {"prompt": prompt, "n_predict": gen, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
            "stream": True}
    start, first, n = time.perf_counter(), None, 0
    with post(url + "/completion", body) as r:
        for line in r:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                first = first or time.perf_counter()
                if event.get("stop"):  # the last event counts the tokens (one event may carry several)
                    n = event["timings"]["predicted_n"]
    out.update(ttft=first - start, tokens=n, end=time.perf_counter())


def run(url: str, n: int) -> tuple[float, float]:
    results = [{} for _ in range(n)]
    threads = [threading.Thread(target=one_request, args=(url, prompts[i], results[i])) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - start
    assert all(r["tokens"] == gen for r in results), [r["tokens"] for r in results]
    return sum(r["tokens"] for r in results) / wall, statistics.median(r["ttft"] for r in results)


def activation(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    rates = [float(v) for v in re.findall(r'^llamacpp:deco_layer_activation\{model="target",layer="\d+"\} (\S+)$', text, re.M)]
    return sum(rates) / len(rates)


try:
    for name, server in servers.items():  # warm-up: every slot once
        run(server.url, slots)
    samples: dict = {}
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", file=sys.stderr)
        for n in clients:
            for name, server in servers.items():
                time.sleep(0.2)  # the other server's threads go to sleep
                samples.setdefault((name, n), []).append(run(server.url, n))
    rate = activation(servers["DECO"].url)
finally:
    for server in servers.values():
        server.stop()

print(f"\n{Path(model).name} against dense_eq ({dense.name}), llama-server with {slots} slots, "
      f"{threads or 'all'} thread(s); "
      f"prompts of {prompt_len} tokens, replies of {gen}; median of {rounds} rounds; DECO activation {rate:.1%}")
print(f"{'clients':>7} {'DECO t/s':>9} {'dense t/s':>9} {'ratio':>6} {'DECO TTFT ms':>12} {'dense TTFT ms':>13}")
for n in clients:
    d_tps, d_ttft = (statistics.median(x) for x in zip(*samples[("DECO", n)]))
    e_tps, e_ttft = (statistics.median(x) for x in zip(*samples[("dense_eq", n)]))
    print(f"{n:>7} {d_tps:>9.1f} {e_tps:>9.1f} {d_tps / e_tps:>6.2f} {d_ttft * 1e3:>12.1f} {e_ttft * 1e3:>13.1f}")
EOF
