#!/usr/bin/env bash
# A bounded soak of `deco-gguf serve` on loopback: REQUESTS requests from WORKERS clients at once, a mix of good
# chat requests, streams dropped after their first piece, malformed JSON, prompts longer than a slot's context and
# bodies of the wrong shape; it stops by itself and fails (exit 1) on a crash or on resident memory still growing.
#
#   bash benchmarks/serve-soak.sh                       # the bundled model, 4000 requests (about a minute)
#   MODEL=out/deco-tiny-q4.gguf REQUESTS=500 WORKERS=4 bash benchmarks/serve-soak.sh
#
# The server runs as `deco-gguf serve` runs it (deco_gguf.runtime.server, 4 slots of 512 tokens, one thread: the
# soak is about robustness, and one thread never waits on another that a busy machine descheduled; the bundled
# draft when MODEL is the bundled model). Its resident memory (VmRSS of llama-server) is read after every tenth of
# the requests; "stops growing" means that no reading of the second half exceeds the one at half time by more than
# 5% (the first half fills the KV cache, the prompt cache and the allocator's pools). llama-server keeps the states of idle
# slots in a prompt cache of up to --cache-ram MiB (8192 by default), which grows with every distinct prompt by
# design; the soak caps it at CACHE_RAM MiB (default 32) so that a leak is not hidden behind it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

MODEL=${MODEL:-models/deco-tiny}
DRAFT=${DRAFT:-$( [ "$MODEL" = models/deco-tiny ] && echo models/deco-tiny-draft || true )}
REQUESTS=${REQUESTS:-4000}
WORKERS=${WORKERS:-8}
CACHE_RAM=${CACHE_RAM:-32}

python - "$MODEL" "$DRAFT" "$REQUESTS" "$WORKERS" "$CACHE_RAM" <<'EOF'
import http.client, json, random, socket, sys, threading, time
from collections import Counter
from pathlib import Path

from deco_gguf.model.gguf_file import read_gguf
from deco_gguf.runtime.server import ServerOptions, start
from deco_gguf.support.cache import resolve_model

model, draft, requests, workers, cache_ram = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = resolve_model(model)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
options = ServerOptions(model, port=port, parallel=4, slot_context=512, threads=1,
                        draft=resolve_model(Path(draft)) if draft else None, extra=["--cache-ram", cache_ram])
server = start(options, read_gguf(model).config.context_length)
server.wait_ready()
pid = server.proc.pid
words = "And God said, Let there be light: and there was light. ".split()


def rss_kib() -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def send(body: bytes, stream_drop: bool = False) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if stream_drop:
            r.fp.readline()  # the first piece, then the client goes away mid-reply
            conn.sock.shutdown(socket.SHUT_RDWR)
            return "dropped"
        r.read()
        return str(r.status)
    finally:
        conn.close()


def chat(text: str, **extra) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}).encode()


KINDS = {
    "good": lambda rng: send(chat(" ".join(rng.choices(words, k=rng.randint(3, 40))), temperature=rng.random())),
    "dropped stream": lambda rng: send(chat(" ".join(rng.choices(words, k=20)), stream=True, max_tokens=64), True),
    "malformed JSON": lambda rng: send(chat("hello")[: rng.randint(1, 30)]),
    "too long": lambda rng: send(chat(" ".join(rng.choices(words, k=2000)))),
    "wrong shape": lambda rng: send(rng.choice([b"[]", b'{"messages": 3}', b'{"messages": [{"role": 1}]}', b""])),
}
WEIGHTS = [50, 20, 10, 10, 10]
outcomes: Counter = Counter()
rss: list[int] = []
lock = threading.Lock()
done = 0


def worker(seed: int) -> None:
    global done
    rng = random.Random(seed)
    while True:
        with lock:
            if done >= requests:
                return
            done += 1
            if done % (requests // 10) == 0:
                rss.append(rss_kib())
        kind = rng.choices(list(KINDS), WEIGHTS)[0]
        try:
            result = KINDS[kind](rng)
        except OSError as e:  # the server closed a connection
            result = type(e).__name__
        with lock:
            outcomes[(kind, result)] += 1


start_time = time.time()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
alive = server.proc.poll() is None
health = False
if alive:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    health = conn.getresponse().status == 200
status = server.stop()

print(f"{requests} requests from {workers} clients in {time.time() - start_time:.0f} s against {model.name}"
      f"{' with draft ' + Path(draft).name if draft else ''}")
for (kind, result), n in sorted(outcomes.items()):
    print(f"  {kind:>15}: {result} x{n}")
print("llama-server resident memory (MiB) every tenth: " + " ".join(f"{r / 1024:.0f}" for r in rss))
half = rss[len(rss) // 2 - 1]
steady = all(r <= 1.05 * half for r in rss[len(rss) // 2 :])
print(f"alive at the end: {alive}, /health: {health}, exit status on SIGTERM: {status}, memory steady: {steady}")
sys.exit(0 if alive and health and status == 0 and steady else 1)
EOF
