"""Throughput of a DECO GGUF: prompt processing and decoding, sparse against dense, with the bytes bound.

Method (llama-bench's, through the same libllama): `pp` decodes a prompt of `pp` tokens from an
empty KV cache (batches of up to 512, logits of the last token only); `tg` decodes `tg` tokens one at
a time from an empty cache. Tokens are real text (a built-in English paragraph or `--text`), the same
for every configuration, so routing, and hence the sparse work, is that of text rather than of random
token ids. Each (model, mode, threads) configuration gets `warmup` untimed runs, then `repetitions`
timed runs **interleaved** with the other configurations (rep 1 of all, rep 2 of all, ...) so a slow
moment of a shared machine hits all of them; reported: median, min and max tokens/s.

The activation rate is the DECO op's own counters during the sparse `tg` runs; the weight-bytes bound
beside the measured speed-ups is deco_gguf.measure.speed_report's.

`vs_dense=True` also measures `dense_eq` (deco_gguf.measure.dense_eq): the random-weight Llama of equal N.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..runtime.rpc import Offload
from ..support.errors import DecoError
from .dense_eq import build_dense_eq
from .speed_report import Series, SpeedReport, file_weight_bytes, weight_bytes

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
    """One loaded model (a DECO runtime in one mode, or the dense_eq Llama) and its timed runs."""

    def __init__(self, label: str, mode: str, llm, runtime=None):
        import llama_cpp

        self.label, self.mode, self.llm, self.rt = label, mode, llm, runtime
        self.ctx, self.api = llm.ctx, llama_cpp
        self.memory = llama_cpp.llama_get_memory(self.ctx)

    def _prepare(self, threads: int) -> None:
        self.api.llama_set_n_threads(self.ctx, threads, threads)
        self.api.llama_memory_clear(self.memory, True)

    def _decode(self, tokens: list[int]) -> None:
        arr = (self.api.llama_token * len(tokens))(*tokens)
        if self.api.llama_decode(self.ctx, self.api.llama_batch_get_one(arr, len(tokens))) != 0:
            raise DecoError(f"llama_decode failed ({self.label}, {self.mode})")

    def pp(self, tokens: list[int], threads: int) -> tuple[float, float]:
        """Prompt tokens/s, and the seconds to the first token: the prompt, then one decode."""
        self._prepare(threads)
        start = time.perf_counter()
        for i in range(0, len(tokens), MAX_BATCH):
            self._decode(tokens[i : i + MAX_BATCH])
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


def measure(
    model: str | Path,
    *,
    pp: int = 128,
    tg: int = 64,
    repetitions: int = 3,
    warmup: int = 1,
    threads: list[int] | None = None,
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
    threads = _checked_settings(pp, tg, repetitions, warmup, threads, modes)
    model = Path(model)
    n_ctx = pp + tg + 16
    benches: list[_Bench] = []
    try:
        for mode in modes:
            rt = DecoRuntime(
                model, n_ctx=n_ctx, n_threads=threads[0], n_batch=min(pp, MAX_BATCH), mode=mode, offload=offload
            )
            benches.append(_Bench("deco", mode, rt.llm, rt))
        info = benches[0].rt.info
        tokens = _tokens(benches[0].llm, text or DEFAULT_TEXT, max(pp, tg))
        eq = eq_bytes = None
        if vs_dense:
            eq, bench = _dense_eq_bench(model, info, n_ctx, threads[0], pp, benches[0].rt.offload, on_status)
            benches.append(bench)
            eq_bytes = file_weight_bytes(eq.path).dense
        runs = _Runs(benches, threads, warmup, repetitions, on_step)
        runs.run(tokens[:pp], tokens[:tg])
        return SpeedReport(
            model=str(model),
            pp=pp,
            tg=tg,
            repetitions=repetitions,
            warmup=warmup,
            threads=list(threads),
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
    pp: int, tg: int, repetitions: int, warmup: int, threads: list[int] | None, modes: tuple[str, ...]
) -> list[int]:
    """The thread counts to measure (default: all cores), once every setting is checked."""
    from ..runtime.native import available_cores

    if pp < 1 or tg < 1 or repetitions < 1 or warmup < 0:
        raise DecoError("--pp, --tg and --repetitions must be at least 1, --warmup at least 0")
    threads = threads or [available_cores()]
    if any(t < 1 for t in threads):
        raise DecoError("--threads: every count must be at least 1")
    if "sparse" not in modes:
        raise DecoError("the sparse mode is needed (its counters give the activation rate)")
    return threads


def _dense_eq_bench(model: Path, info, n_ctx: int, threads: int, pp: int, offload: Offload, on_status):
    """dense_eq for `model` (built once into the cache) and a bench of it."""
    from ..runtime.context import load_llama
    from ..support.cache import cache_root

    eq = build_dense_eq(model, info, cache_root() / "dense-eq", on_status)
    llm = load_llama(
        eq.path, n_ctx=n_ctx, n_threads=threads, n_batch=min(pp, MAX_BATCH), seed=0, n_gpu_layers=offload.n_gpu_layers
    )
    return eq, _Bench("dense_eq", "dense", llm)


class _Runs:
    """Every bench at every thread count: --warmup untimed runs each, then --repetitions timed rounds, each
    round running every bench once (interleaved, so a busy moment spreads over all). The activity is
    counted over the sparse bench's timed tg runs."""

    def __init__(self, benches: list[_Bench], threads: list[int], warmup: int, repetitions: int, on_step):
        self.benches, self.threads, self.warmup, self.repetitions = benches, threads, warmup, repetitions
        self.on_step = on_step
        self.series: dict[tuple, Series] = {}
        self.total, self.done = len(threads) * len(benches) * 2 * (warmup + repetitions), 0
        self.counted: dict = {}  # layer -> its runtime.activity.LayerActivity, summed

    def step(self) -> None:
        self.done += 1
        if self.on_step:
            self.on_step(self.done, self.total)

    def run(self, prompt: list[int], generated: list[int]) -> None:
        self.series = {
            (b.label, b.mode, t, test): Series(b.label, b.mode, t, test, len(prompt if test == "pp" else generated))
            for t in self.threads
            for b in self.benches
            for test in ("pp", "tg")
        }
        for t in self.threads:
            for b in self.benches:
                for _ in range(self.warmup):
                    b.pp(prompt, t)
                    self.step()
                    b.tg(generated, t)
                    self.step()
            for _ in range(self.repetitions):
                for b in self.benches:
                    self.timed(b, t, prompt, generated)

    def timed(self, b: _Bench, t: int, prompt: list[int], generated: list[int]) -> None:
        series = self.series[(b.label, b.mode, t, "pp")]
        tokens_per_second, first_token = b.pp(prompt, t)
        series.samples.append(tokens_per_second)
        series.first_token_ms.append(first_token * 1e3)
        self.step()
        sparse = b is self.benches[0]
        if sparse:
            b.rt.reset_activity()
        self.series[(b.label, b.mode, t, "tg")].samples.append(b.tg(generated, t))
        self.step()
        if sparse:
            for a in b.rt.activity():
                if a is not None:
                    self.counted[a.layer] = self.counted[a.layer] + a if a.layer in self.counted else a

    def layer_rates(self) -> dict[int, float]:
        return {layer: a.rate for layer, a in self.counted.items() if a.tokens}
