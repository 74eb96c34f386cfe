"""Throughput of a DECO GGUF: prompt processing and decoding, sparse against dense, with the bytes bound.

Method (llama-bench's, through the same libllama): `pp` decodes a prompt of `pp` tokens from an
empty KV cache (batches of up to 512, logits of the last token only); `tg` decodes `tg` tokens one at
a time from an empty cache. Tokens are real text (a built-in English paragraph or `--text`), the same
for every configuration, so routing, and hence the sparse work, is that of text rather than of random
token ids. Each (model, mode, threads) configuration gets `warmup` untimed runs, then `repetitions`
timed runs **interleaved** with the other configurations (rep 1 of all, rep 2 of all, ...) so a slow
moment of a shared machine hits all of them; reported: median, min and max tokens/s.

The activation rate is the DECO op's own counters during the sparse `tg` runs. The weight-bytes
bound: decoding reads every non-expert weight once per token (the token-embedding row only, unless the
embeddings are tied to the output head) plus the active experts' rows, so

    bytes/token (sparse) = non-expert bytes + Σ_layers rate_l × expert bytes_l
    bytes/token (dense)  = non-expert bytes + all expert bytes
    decode ratio bound   = dense bytes / sparse bytes

which is the sparse/dense decode speed-up when decoding is limited by weight bandwidth alone; where
compute and per-expert overheads weigh too (small models, few threads), the measured ratio departs
from it, usually upwards, since skipped experts save those as well.

`vs_dense=True` also measures `dense_eq` (deco_gguf.measure.dense_eq): the random-weight Llama of equal N.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..model.layout import EXPERT_TENSORS, gguf_name, kind_of
from ..runtime.rpc import Offload
from ..support.errors import DecoError
from . import plotting
from .dense_eq import DenseEq, build_dense_eq

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


# -- weight bytes --------------------------------------------------------------------------------


@dataclass
class WeightBytes:
    non_expert: int  # read once per decoded token (embedding: one row unless tied)
    expert_by_layer: dict[int, int]  # routed-expert tensors per DECO layer
    embedding_row_only: bool

    @property
    def expert(self) -> int:
        return sum(self.expert_by_layer.values())

    def sparse(self, rates: dict[int, float]) -> float:
        return self.non_expert + sum(rates.get(layer, 1.0) * b for layer, b in self.expert_by_layer.items())

    @property
    def dense(self) -> int:
        return self.non_expert + self.expert


def weight_bytes(tensors) -> WeightBytes:
    """Bytes per decoded token by role, from the GGUF tensor table (deco_gguf.model.gguf_file.TensorInfo)."""
    names = {t.name for t in tensors}
    tied = gguf_name("output") not in names
    non_expert, experts = 0, {}
    for t in tensors:
        if kind_of(t.name) in EXPERT_TENSORS:
            layer = int(t.name.split(".")[1])
            experts[layer] = experts.get(layer, 0) + t.nbytes
        elif t.name == gguf_name("token_embd") and not tied:
            non_expert += t.nbytes // t.shape[0]  # get_rows: one row per token
        else:
            non_expert += t.nbytes
    return WeightBytes(non_expert, experts, not tied)


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class Series:
    model: str  # "deco" or "dense_eq"
    mode: str  # sparse, dense (dense_eq: dense)
    threads: int
    test: str  # pp or tg
    tokens: int
    samples: list[float] = field(default_factory=list)  # tokens/s, one per repetition
    # pp only: time to first token (the prompt, then one decode), as llama-server's timings add it up
    first_token_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def as_dict(self) -> dict:
        out = {
            "model": self.model,
            "mode": self.mode,
            "threads": self.threads,
            "test": self.test,
            "tokens": self.tokens,
            "samples": self.samples,
            "tokens_per_second": {"median": self.median, "min": min(self.samples), "max": max(self.samples)},
        }
        if self.first_token_ms:
            ms = self.first_token_ms
            out["time_to_first_token_ms"] = {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}
        return out


@dataclass
class SpeedReport:
    model: str
    pp: int
    tg: int
    repetitions: int
    warmup: int
    threads: list[int]
    series: list[Series]
    layer_rates: dict[int, float]  # measured during sparse tg
    bytes: WeightBytes
    dense_eq: DenseEq | None = None
    dense_eq_bytes: int | None = None
    text_tokens: int = 0

    def find(self, model: str, mode: str, threads: int, test: str) -> Series | None:
        key = (model, mode, threads, test)
        return next((s for s in self.series if (s.model, s.mode, s.threads, s.test) == key), None)

    def noisy(self, spread: float = 1.5) -> list[Series]:
        """Configurations whose fastest run beat their slowest by more than `spread`x."""
        return [s for s in self.series if max(s.samples) > spread * min(s.samples)]

    @property
    def mean_rate(self) -> float | None:
        return sum(self.layer_rates.values()) / len(self.layer_rates) if self.layer_rates else None

    @property
    def sparse_bytes(self) -> float:
        return self.bytes.sparse(self.layer_rates)

    def ratios(self) -> list[dict]:
        """Per threads: measured decode (and prompt) speed-ups beside the bytes bound."""
        out = []
        for t in self.threads:
            row: dict = {"threads": t}
            for test in ("tg", "pp"):
                s, d = self.find("deco", "sparse", t, test), self.find("deco", "dense", t, test)
                row[f"sparse_over_dense_{test}"] = s.median / d.median if s and d else None
                e = self.find("dense_eq", "dense", t, test)
                row[f"sparse_over_dense_eq_{test}"] = s.median / e.median if s and e else None
            row["bound"] = self.bytes.dense / self.sparse_bytes
            row["bound_vs_dense_eq"] = self.dense_eq_bytes / self.sparse_bytes if self.dense_eq_bytes else None
            out.append(row)
        return out

    def as_dict(self) -> dict:
        b = self.bytes
        return {
            "model": self.model,
            "settings": {
                "pp": self.pp,
                "tg": self.tg,
                "repetitions": self.repetitions,
                "warmup": self.warmup,
                "threads": self.threads,
            },
            "results": [s.as_dict() for s in self.series],
            "activation": {
                "layers": [{"layer": k, "rate": v} for k, v in sorted(self.layer_rates.items())],
                "mean": self.mean_rate,
                "source": "sparse tg runs (the DECO op's counters)",
            },
            "bytes_per_token": {
                "non_expert": b.non_expert,
                "expert_total": b.expert,
                "expert_by_layer": {str(k): v for k, v in sorted(b.expert_by_layer.items())},
                "embedding_row_only": b.embedding_row_only,
                "sparse": self.sparse_bytes,
                "dense": b.dense,
                "dense_eq": self.dense_eq_bytes,
            },
            "ratios": self.ratios(),
            "dense_eq": self.dense_eq.as_dict() if self.dense_eq else None,
        }


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
            eq_bytes = _file_weight_bytes(eq.path).dense
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


def _file_weight_bytes(path: Path) -> WeightBytes:
    """weight_bytes of any GGUF file (dense_eq's is a plain Llama)."""
    import gguf

    from ..model.gguf_file import TensorInfo

    return weight_bytes(
        [
            TensorInfo(t.name, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)), int(t.n_bytes))
            for t in gguf.GGUFReader(path).tensors
        ]
    )


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


def plot(report: SpeedReport, path: str | Path) -> None:
    """tokens/s by threads, pp and tg side by side, one line per model/mode (median, min-max bars)."""
    fig, axes = plotting.subplots(1, 2, figsize=(10, 4))
    labels = sorted({(s.model, s.mode) for s in report.series}, key=lambda x: (x[0] != "deco", x[1] != "sparse"))
    panels = ((axes[0], "pp", f"prompt processing (pp{report.pp})"), (axes[1], "tg", f"generation (tg{report.tg})"))
    for ax, test, title in panels:
        for k, (model, mode) in enumerate(labels):
            rows = [report.find(model, mode, t, test) for t in report.threads]
            xs = [t + 0.04 * (k - (len(labels) - 1) / 2) for t in report.threads]  # keep the bars apart
            med = [r.median for r in rows]
            lo = [r.median - min(r.samples) for r in rows]
            hi = [max(r.samples) - r.median for r in rows]
            name = f"DECO {mode}" if model == "deco" else "dense_eq (equal N)"
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("threads")
        ax.set_ylabel("tokens/s")
        ax.set_xticks(report.threads)
        ax.grid(alpha=0.3)
        ax.legend()
    rate = report.mean_rate
    name = Path(report.model).name
    fig.suptitle(f"{name}: {rate:.1%} experts active" if rate is not None else name)
    plotting.save(fig, path)
