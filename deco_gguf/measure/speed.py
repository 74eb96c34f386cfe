"""Throughput of a DECO GGUF: prompt processing and decoding, sparse against dense, with the bytes bound.

Method (llama-bench's, through the same libllama): `pp` decodes a prompt of `pp` tokens (batches of up
to 512, logits of the last token only); `tg` decodes `tg` tokens one at a time. Both start at each of
the `depths`: the KV cache holds that many tokens of the text first (evaluated once per model and depth,
untimed; each run removes what the one before it added), as a chat's cache holds the turns before, so
`pp` at a depth is a follow-up prompt and `tg` the reply to it. Tokens are real text (a built-in English
paragraph or `--text`), the same for every configuration, so routing, and hence the sparse work, is that
of text rather than of random token ids. Each (model, mode, threads, depth) configuration gets `warmup`
untimed runs, then `repetitions` timed runs **interleaved** with the other configurations (rep 1 of all,
rep 2 of all, ...) so a slow moment of a shared machine hits all of them; reported: median, min and max
tokens/s.

The activation rate is counted during the sparse `tg` runs; the bytes bound beside the measured speed-ups
(weights and, at depth, the KV cache) is deco_gguf.measure.speed_report's.

`vs_dense=True` also measures `dense_eq` (deco_gguf.measure.dense_eq): the random-weight Llama of equal N.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..runtime.rpc import Offload
from ..support.errors import DecoError
from .dense_eq import cached_dense_eq
from .speed_report import Series, SpeedReport, file_weight_bytes, kv_bytes_per_position, weight_bytes

# Ordinary English prose (written for this benchmark), repeated as needed.
DEFAULT_TEXT = (
    "The river rose slowly through the night, and by morning the low fields on the eastern bank "
    "were under water. The farmers who lived along the road had moved their animals to the hill the "
    "day before, and now they stood together near the old stone bridge, watching the brown current "
    "carry branches, fence posts and once a small wooden boat past the village. Nobody spoke much. "
    "An old woman said that she had seen the river this high only once before, when she was a girl, "
    "and that it had gone down again within three days. Her grandson asked what they had done then, "
    "and she told him that they had waited, repaired what could be repaired, and planted again in "
    "the spring. In the afternoon the rain stopped, the clouds broke apart over the western hills, "
    "and the light came back across the wet roofs and the flooded meadows. "
)

MAX_BATCH = 512


def _tokens(llm, text: str, n: int) -> list[int]:
    base = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    body = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    if not body:
        raise DecoError("the benchmark text tokenizes to nothing")
    tokens = list(base)
    while len(tokens) < n:
        tokens += body
    return tokens[:n]


class _Bench:
    """One loaded model (a DECO runtime in one mode, or the dense_eq Llama) and its timed runs, each from the
    context that `fill` put into its KV cache."""

    def __init__(self, label: str, mode: str, llm, runtime=None, pool=None):
        import llama_cpp

        self.label, self.mode, self.llm, self.rt, self.pool = label, mode, llm, runtime, pool
        self.ctx, self.api = llm.ctx, llama_cpp
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.depth = 0

    def fill(self, context: list[int], threads: int) -> None:
        """Evaluate `context` into an empty KV cache (untimed): the depth every run starts from."""
        self.api.llama_set_n_threads(self.ctx, threads, threads)
        self.api.llama_memory_clear(self.memory, True)
        for i in range(0, len(context), self.llm.n_batch):
            self._decode(context[i : i + self.llm.n_batch])
        self.depth = len(context)

    def _prepare(self, threads: int) -> None:
        """Back to the filled context: what the previous run added is removed."""
        self.api.llama_set_n_threads(self.ctx, threads, threads)
        if not self.api.llama_memory_seq_rm(self.memory, -1, self.depth, -1):
            raise DecoError(f"llama.cpp cannot cut its KV cache back to {self.depth} tokens ({self.label})")

    def _decode(self, tokens: list[int]) -> None:
        arr = (self.api.llama_token * len(tokens))(*tokens)
        if self.api.llama_decode(self.ctx, self.api.llama_batch_get_one(arr, len(tokens))) != 0:
            raise DecoError(f"llama_decode failed ({self.label}, {self.mode})")

    def pp(self, tokens: list[int], threads: int) -> tuple[float, float]:
        """Prompt tokens/s, and the seconds to the first token: the prompt, then one decode."""
        self._prepare(threads)
        start = time.perf_counter()
        for i in range(0, len(tokens), self.llm.n_batch):
            self._decode(tokens[i : i + self.llm.n_batch])
        self.api.llama_synchronize(self.ctx)
        prompt_seconds = time.perf_counter() - start
        self._decode(tokens[:1])  # the first generated token; which one does not change the work
        self.api.llama_synchronize(self.ctx)
        return len(tokens) / prompt_seconds, time.perf_counter() - start

    def tg(self, tokens: list[int], threads: int) -> float:
        self._prepare(threads)
        arrays = [(self.api.llama_token * 1)(t) for t in tokens]
        start = time.perf_counter()
        for arr in arrays:
            if self.api.llama_decode(self.ctx, self.api.llama_batch_get_one(arr, 1)) != 0:
                raise DecoError(f"llama_decode failed ({self.label}, {self.mode})")
            self.api.llama_synchronize(self.ctx)
        return len(tokens) / (time.perf_counter() - start)

    def close(self) -> None:
        (self.rt or self.llm).close()
        if self.pool is not None:
            self.pool.close()  # after the context that used it


def measure(
    model: str | Path,
    *,
    pp: int = 128,
    tg: int = 64,
    repetitions: int = 3,
    warmup: int = 1,
    threads: list[int] | None = None,
    depths: list[int] | None = None,
    kv_cache: str = "f16",
    modes: tuple[str, ...] = ("sparse", "dense"),
    vs_dense: bool = False,
    text: str | None = None,
    on_status: Callable[[str], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    offload: Offload | None = None,
) -> SpeedReport:
    """Run the benchmark; `on_step(done, total)` after every timed or warm-up run."""
    from ..runtime.context import DecoRuntime
    from ..runtime.native import library

    library()  # one error line when the runtime is missing
    threads, depths = _checked_settings(pp, tg, repetitions, warmup, threads, depths, modes)
    model = Path(model)
    n_ctx = depths[-1] + pp + tg + 16
    n_batch = min(pp, MAX_BATCH)
    most_threads = max(threads)  # a DECO runtime's thread pool has this many; each run asks for its own count
    benches: list[_Bench] = []
    try:
        for mode in modes:
            rt = DecoRuntime(
                model,
                n_ctx=n_ctx,
                n_threads=most_threads,
                n_batch=n_batch,
                mode=mode,
                kv_cache=kv_cache,
                offload=offload,
            )
            benches.append(_Bench("deco", mode, rt.llm, rt))
        info = benches[0].rt.info
        tokens = _tokens(benches[0].llm, text or DEFAULT_TEXT, depths[-1] + max(pp, tg))
        eq = eq_bytes = None
        if vs_dense:
            eq, bench = _dense_eq_bench(model, info, n_ctx, most_threads, n_batch, kv_cache, offload, on_status)
            benches.append(bench)
            eq_bytes = file_weight_bytes(eq.path).dense
        runs = _Runs(benches, threads, depths, warmup, repetitions, on_step)
        runs.run(tokens, pp, tg)
        return SpeedReport(
            model=str(model),
            pp=pp,
            tg=tg,
            repetitions=repetitions,
            warmup=warmup,
            threads=list(threads),
            depths=depths,
            kv_cache=kv_cache,
            kv_bytes_per_position=kv_bytes_per_position(info.config, kv_cache),
            series=list(runs.series.values()),
            layer_rates=runs.layer_rates(),
            bytes=weight_bytes(info.tensors),
            dense_eq=eq,
            dense_eq_bytes=eq_bytes,
            text_tokens=len(tokens),
        )
    finally:
        for b in reversed(benches):
            b.close()


def _checked_settings(
    pp: int,
    tg: int,
    repetitions: int,
    warmup: int,
    threads: list[int] | None,
    depths: list[int] | None,
    modes: tuple[str, ...],
) -> tuple[list[int], list[int]]:
    """The thread counts (default: all cores) and depths (default: 0) to measure, once every setting is checked."""
    from ..runtime.native import available_cores

    if pp < 1 or tg < 1 or repetitions < 1 or warmup < 0:
        raise DecoError("--pp, --tg and --repetitions must be at least 1, --warmup at least 0")
    threads = threads or [available_cores()]
    if any(t < 1 for t in threads):
        raise DecoError("--threads: every count must be at least 1")
    depths = sorted(set(depths or [0]))
    if depths[0] < 0:
        raise DecoError("--depth: every depth must be at least 0")
    if "sparse" not in modes:
        raise DecoError("the sparse mode is needed (its counters give the activation rate)")
    return threads, depths


def _dense_eq_bench(model: Path, info, n_ctx: int, threads: int, n_batch: int, kv_cache: str, offload, on_status):
    """dense_eq for `model` (built once into the cache) and a bench of it, with a thread pool of its own as every
    DECO runtime has (without one, ggml starts and joins its threads for every graph)."""
    from ..runtime.context import load_llama
    from ..runtime.native import ThreadPool

    eq = cached_dense_eq(model, info, on_status)
    llm = load_llama(
        eq.path,
        n_ctx=n_ctx,
        n_threads=threads,
        n_batch=n_batch,
        kv_cache=kv_cache,
        seed=0,
        n_gpu_layers=offload.n_gpu_layers,
    )
    pool = ThreadPool(threads)
    pool.attach(llm.ctx)
    return eq, _Bench("dense_eq", "dense", llm, pool=pool)


class _Runs:
    """Every bench at every depth and thread count: at each depth every bench's cache is filled once, then
    per thread count --warmup untimed runs each and --repetitions timed rounds, each round running every
    bench once (interleaved, so a busy moment spreads over all). The activity is counted over the sparse
    bench's timed tg runs."""

    def __init__(self, benches: list[_Bench], threads: list[int], depths: list[int], warmup, repetitions, on_step):
        self.benches, self.threads, self.depths = benches, threads, depths
        self.warmup, self.repetitions, self.on_step = warmup, repetitions, on_step
        self.series: dict[tuple, Series] = {}
        per_depth = len(benches) * (1 + len(threads) * 2 * (warmup + repetitions))
        self.total, self.done = len(depths) * per_depth, 0
        self.counted: dict = {}  # layer -> its runtime.activity.LayerActivity, summed

    def step(self) -> None:
        self.done += 1
        if self.on_step:
            self.on_step(self.done, self.total)

    def run(self, tokens: list[int], pp: int, tg: int) -> None:
        """At each depth D: the first D tokens are the context, the next pp the prompt, the next tg generated."""
        for depth in self.depths:
            prompt, generated = tokens[depth : depth + pp], tokens[depth : depth + tg]
            for b in self.benches:
                b.fill(tokens[:depth], self.threads[-1])
                self.step()
            for t in self.threads:
                for b in self.benches:
                    for test in ("pp", "tg"):
                        n = len(prompt if test == "pp" else generated)
                        self.series[(b.label, b.mode, t, test, depth)] = Series(b.label, b.mode, t, test, n, depth)
                    for _ in range(self.warmup):
                        b.pp(prompt, t)
                        self.step()
                        b.tg(generated, t)
                        self.step()
                for _ in range(self.repetitions):
                    for b in self.benches:
                        self.timed(b, t, depth, prompt, generated)

    def timed(self, b: _Bench, t: int, depth: int, prompt: list[int], generated: list[int]) -> None:
        series = self.series[(b.label, b.mode, t, "pp", depth)]
        tokens_per_second, first_token = b.pp(prompt, t)
        series.samples.append(tokens_per_second)
        series.first_token_ms.append(first_token * 1e3)
        self.step()
        sparse = b is self.benches[0]
        if sparse:
            b.rt.reset_activity()
        self.series[(b.label, b.mode, t, "tg", depth)].samples.append(b.tg(generated, t))
        self.step()
        if sparse:
            for a in b.rt.activity():
                if a is not None:
                    self.counted[a.layer] = self.counted[a.layer] + a if a.layer in self.counted else a

    def layer_rates(self) -> dict[int, float]:
        return {layer: a.rate for layer, a in self.counted.items() if a.tokens}
