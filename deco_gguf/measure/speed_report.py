"""What `deco-gguf speed` reports (deco_gguf.measure.speed measures it): tokens/s per configuration, the
activation rate, the bytes bound beside the measured speed-ups, and the plot.

The bytes bound: decoding reads every non-expert weight once per token (the token-embedding row only,
unless the embeddings are tied to the output head), the active experts' rows, and the KV cache of the
context so far (every layer's K and V rows of every earlier position: at depth D, a `tg` run's token
reads D + (tg + 1) / 2 positions on average), so

    bytes/token (sparse) = non-expert bytes + Σ_layers rate_l × expert bytes_l + KV bytes
    bytes/token (dense)  = non-expert bytes + all expert bytes + KV bytes
    decode ratio bound   = dense bytes / sparse bytes

which is the sparse/dense decode speed-up when decoding is limited by memory bandwidth alone; where
compute and per-expert overheads weigh too (small models, few threads), the measured ratio departs
from it, usually upwards, since skipped experts save those as well. The KV cache is the same for sparse,
dense and dense_eq (equal attention), so the deeper the context, the closer every bound gets to 1.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..model.layout import EXPERT_TENSORS, gguf_name, kind_of
from . import plotting
from .dense_eq import DenseEq

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


def kv_bytes_per_position(config, kv_cache: str) -> int:
    """Bytes of the KV cache per token of context: K and V rows of every layer (head_dim × KV heads each)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kv_cache.upper()]]
    row = config.num_kv_heads * config.head_dim
    return 2 * config.num_layers * (row // block) * size


def file_weight_bytes(path: Path) -> WeightBytes:
    """weight_bytes of any GGUF file (dense_eq's is a plain Llama)."""
    import gguf

    from ..model.gguf_file import TensorInfo

    return weight_bytes(
        [
            TensorInfo(t.name, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)), int(t.n_bytes))
            for t in gguf.GGUFReader(path).tensors
        ]
    )


# -- the report ---------------------------------------------------------------------------------


@dataclass
class Series:
    model: str  # "deco" or "dense_eq"
    mode: str  # sparse, dense (dense_eq: dense)
    threads: int
    test: str  # pp or tg
    tokens: int
    depth: int = 0  # tokens in the KV cache before the run
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
            "depth": self.depth,
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
    depths: list[int]
    kv_cache: str  # the KV cache's element type
    kv_bytes_per_position: int
    series: list[Series]
    layer_rates: dict[int, float]  # measured during sparse tg
    bytes: WeightBytes
    dense_eq: DenseEq | None = None
    dense_eq_bytes: int | None = None
    text_tokens: int = 0

    def find(self, model: str, mode: str, threads: int, test: str, depth: int = 0) -> Series | None:
        key = (model, mode, threads, test, depth)
        return next((s for s in self.series if (s.model, s.mode, s.threads, s.test, s.depth) == key), None)

    def noisy(self, spread: float = 1.5) -> list[Series]:
        """Configurations whose fastest run beat their slowest by more than `spread`x."""
        return [s for s in self.series if max(s.samples) > spread * min(s.samples)]

    @property
    def mean_rate(self) -> float | None:
        return sum(self.layer_rates.values()) / len(self.layer_rates) if self.layer_rates else None

    @property
    def sparse_bytes(self) -> float:
        return self.bytes.sparse(self.layer_rates)

    def kv_bytes(self, depth: int) -> float:
        """KV cache bytes a token of a tg run at `depth` reads, on average."""
        return self.kv_bytes_per_position * (depth + (self.tg + 1) / 2)

    def ratios(self) -> list[dict]:
        """Per threads and depth: measured decode (and prompt) speed-ups beside the bytes bound."""
        out = []
        for t in self.threads:
            for depth in self.depths:
                row: dict = {"threads": t, "depth": depth}
                for test in ("tg", "pp"):
                    s, d = self.find("deco", "sparse", t, test, depth), self.find("deco", "dense", t, test, depth)
                    row[f"sparse_over_dense_{test}"] = s.median / d.median if s and d else None
                    e = self.find("dense_eq", "dense", t, test, depth)
                    row[f"sparse_over_dense_eq_{test}"] = s.median / e.median if s and e else None
                kv = self.kv_bytes(depth)
                row["kv_bytes"] = kv
                row["bound"] = (self.bytes.dense + kv) / (self.sparse_bytes + kv)
                eq = self.dense_eq_bytes
                row["bound_vs_dense_eq"] = (eq + kv) / (self.sparse_bytes + kv) if eq else None
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
                "depths": self.depths,
                "kv_cache": self.kv_cache,
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
                "kv_cache_per_position": self.kv_bytes_per_position,
            },
            "ratios": self.ratios(),
            "dense_eq": self.dense_eq.as_dict() if self.dense_eq else None,
        }


def plot(report: SpeedReport, path: str | Path) -> None:
    """tokens/s, pp and tg side by side, one line per model/mode (median, min-max bars): by threads, or by
    depth when several depths were measured (one line per thread count too)."""
    fig, axes = plotting.subplots(1, 2, figsize=(10, 4))
    labels = sorted({(s.model, s.mode) for s in report.series}, key=lambda x: (x[0] != "deco", x[1] != "sparse"))
    by_depth = len(report.depths) > 1
    xs_all, lines = (report.depths, report.threads) if by_depth else (report.threads, report.depths)
    panels = ((axes[0], "pp", f"prompt processing (pp{report.pp})"), (axes[1], "tg", f"generation (tg{report.tg})"))
    for ax, test, title in panels:
        k, n = 0, len(labels) * len(lines)
        for model, mode in labels:
            for other in lines:
                t_d = [(other, x) if by_depth else (x, other) for x in xs_all]
                rows = [report.find(model, mode, t, test, d) for t, d in t_d]
                spread = 0.04 * (xs_all[-1] - xs_all[0] or 1)
                xs = [x + spread * (k - (n - 1) / 2) / max(n, 1) for x in xs_all]  # keep the bars apart
                med = [r.median for r in rows]
                lo = [r.median - min(r.samples) for r in rows]
                hi = [max(r.samples) - r.median for r in rows]
                name = f"DECO {mode}" if model == "deco" else "dense_eq (equal N)"
                if by_depth and len(lines) > 1:
                    name += f", {other} thread{'s' if other > 1 else ''}"
                ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=name)
                k += 1
        ax.set_title(title + (" at depth" if by_depth else ""))
        ax.set_xlabel("tokens in the KV cache before the run" if by_depth else "threads")
        ax.set_ylabel("tokens/s")
        ax.set_xticks(xs_all)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    rate = report.mean_rate
    name = Path(report.model).name
    fig.suptitle(f"{name}: {rate:.1%} experts active" if rate is not None else name)
    plotting.save(fig, path)
