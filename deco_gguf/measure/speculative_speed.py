"""Speculative decoding against autoregressive decoding, side by side in one run (`deco-gguf speed --draft /
--lookup / --synthetic`, benchmarks/speculative.sh).

Method: the text is cut into passages of `prompt` + `tg` tokens; for each passage and thread count, the
configurations run one after the other (a slow moment of a shared machine hits all of them):
autoregressive sparse and autoregressive dense evaluation (one token per target evaluation, through the
same C loop as speculation, so the loop's own cost is on both sides), then each speculative draft.
At each of the `depths`, every passage's prompt is `depth` more tokens long: generation then runs over a
KV cache that deep, as in a chat a few turns in.
Greedy; the tokens of every speculative configuration must be the sparse autoregressive ones (dense
evaluation equals sparse evaluation to rounding, which can flip a near-tie of a random-weight model, so
its tokens are not compared). Timed: generation
only (the prompt is evaluated first, untimed); tokens/s = generated tokens / generation time, median
over passages.

Each configuration keeps one engine for all passages of a thread count, as a chat keeps one for all its
replies, so its draft lengths start from what the earlier passages taught it (docs/speculative.md).

`synthetic` hit rates measure the engine independently of how good a draft is: the draft proposes the
target's own greedy continuation of the passage, each token replaced by a wrong one with probability
1 - rate (so `rate` is the chance that a drafted token is accepted, given the ones before it were).

The verification cost in decode steps is the mean time of a verification over the mean time of an
autoregressive step: what a batch of 1 + drafted tokens costs, in units of one token.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.context import DecoRuntime
from ..runtime.sampling import GREEDY
from ..runtime.speculative import DEFAULT_DRAFT_MAX, DraftModel, SpecStats, Speculator
from ..support.errors import DecoError
from . import plotting

AUTOREGRESSIVE = ("sparse", "dense")


@dataclass
class Config:
    """One way of generating: autoregressive (sparse/dense) or a draft on the sparse model."""

    name: str  # sparse, dense, draft, lookup, synthetic 0.8
    threads: int
    depth: int = 0  # tokens of context before each passage's prompt
    runs: list[SpecStats] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> list[float]:
        return [r.n_generated / r.generation_seconds for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_second)

    def total(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.runs)

    @property
    def acceptance(self) -> float | None:
        return self.total("n_accepted") / self.total("n_drafted") if self.total("n_drafted") else None

    @property
    def tokens_per_verify(self) -> float:
        return self.total("n_generated") / self.total("n_verify")

    @property
    def verify_us(self) -> float:
        return self.total("t_verify_us") / self.total("n_verify")

    def as_dict(self, baseline: Config) -> dict:
        return {
            "name": self.name,
            "threads": self.threads,
            "depth": self.depth,
            "tokens_per_second": self.tokens_per_second,
            "median": self.median,
            "acceptance": self.acceptance,
            "tokens_per_verify": self.tokens_per_verify,
            "verify_cost_steps": self.verify_us / baseline.verify_us,
            "speedup_vs_sparse": self.median / baseline.median,
            "draft_ms": self.total("t_draft_us") / 1e3,
            "verify_ms": self.total("t_verify_us") / 1e3,
        }


@dataclass
class SpeculativeReport:
    model: str
    draft_max: int
    prompt: int
    tg: int
    passages: int
    configs: list[Config]
    kv_cache: str = "f16"

    def find(self, name: str, threads: int, depth: int = 0) -> Config:
        return next(c for c in self.configs if (c.name, c.threads, c.depth) == (name, threads, depth))

    def as_dict(self) -> dict:
        return {
            "settings": {
                "draft_max": self.draft_max,
                "prompt": self.prompt,
                "tg": self.tg,
                "passages": self.passages,
                "kv_cache": self.kv_cache,
            },
            "results": [
                c.as_dict(self.find("sparse", c.threads, c.depth))
                | {"speedup_vs_dense": c.median / self.find("dense", c.threads, c.depth).median}
                for c in self.configs
            ],
        }


def plot(report: SpeculativeReport, path: str | Path) -> None:
    """tokens/s of every configuration, one bar per thread count and depth (median, min-max), each labelled with
    its speed-up over autoregressive sparse decoding at the same thread count and depth."""
    names = list(dict.fromkeys(c.name for c in report.configs))
    groups = sorted({(c.threads, c.depth) for c in report.configs})
    fig, ax = plotting.subplots(figsize=(max(6.0, 1.2 * len(names) * len(groups)), 4.5))
    width = 0.8 / len(groups)
    for k, (t, depth) in enumerate(groups):
        configs = [report.find(name, t, depth) for name in names]
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(names))]
        medians = [c.median for c in configs]
        errors = [
            [c.median - min(c.tokens_per_second) for c in configs],
            [max(c.tokens_per_second) - c.median for c in configs],
        ]
        label = f"{t} thread{'s' if t > 1 else ''}" + (f", depth {depth}" if depth else "")
        bars = ax.bar(xs, medians, width, yerr=errors, capsize=3, label=label)
        sparse = report.find("sparse", t, depth).median
        ax.bar_label(bars, labels=[f"×{m / sparse:.2f}" for m in medians], padding=2, fontsize=8)
    ticks = [f"autoregressive\n{n}" if n in AUTOREGRESSIVE else n.replace(" ", "\n", 1) for n in names]
    ax.set_xticks(range(len(names)), ticks)
    ax.set_ylabel("tokens/s (labels: × autoregressive sparse)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(
        f"{report.model}: greedy, {report.passages} passage(s) of {report.prompt}+{report.tg} tokens, "
        f"draft max {report.draft_max}",
        fontsize=10,
    )
    plotting.save(fig, path)


def passages(llm, text: str, prompt: int, tg: int, n: int) -> list[list[int]]:
    """n prompts of `prompt` tokens from consecutive windows of prompt + tg tokens of the text (repeated
    when it is shorter than n windows)."""
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    if not tokens:
        raise DecoError("the benchmark text tokenizes to nothing")
    window = prompt + tg
    while len(tokens) < n * window:  # a short text is repeated
        tokens += tokens
    return [[llm.token_bos(), *tokens[s : s + prompt]] for s in range(0, n * window, window)]


def measure_speculative(
    path: Path,
    text: str,
    *,
    draft: Path | None = None,
    lookup: bool = False,
    synthetic: tuple[float, ...] = (),
    draft_max: int = DEFAULT_DRAFT_MAX,
    prompt: int = 64,
    tg: int = 64,
    n_passages: int = 3,
    threads: list[int],
    depths: list[int] | None = None,
    kv_cache: str = "f16",
    on_step: Callable[[int, int], None] | None = None,
) -> SpeculativeReport:
    kinds = (["draft"] if draft else []) + (["lookup"] if lookup else []) + [f"synthetic {r:g}" for r in synthetic]
    if not kinds:
        raise DecoError("nothing to compare: give --draft, --lookup or --synthetic")
    depths = depths or [0]
    configs: list[Config] = []
    total, done = len(threads) * len(depths) * n_passages * (len(AUTOREGRESSIVE) + len(kinds)), 0
    for t in threads:
        n_ctx = max(depths) + prompt + tg + draft_max + 8
        runtimes = {
            mode: DecoRuntime(path, n_ctx=n_ctx, n_threads=t, mode=mode, kv_cache=kv_cache) for mode in AUTOREGRESSIVE
        }
        draft_model = DraftModel(draft, runtimes["sparse"]) if draft else None
        engines: dict[str, Speculator] = {}
        try:
            _open_engines(engines, (*AUTOREGRESSIVE, *kinds), runtimes, draft_max, draft_model)
            for depth in depths:
                prompts = passages(runtimes["sparse"].llm, text, depth + prompt, tg, n_passages)
                row = {name: Config(name, t, depth) for name in (*AUTOREGRESSIVE, *kinds)}
                for p in prompts:
                    for _ in _passage_runs(engines, row, p, tg, t):
                        done += 1
                        if on_step:
                            on_step(done, total)
                configs += row.values()
        finally:
            for engine in engines.values():
                engine.close()
            if draft_model is not None:
                draft_model.close()
            for rt in runtimes.values():
                rt.close()
    return SpeculativeReport(path.name, draft_max, prompt, tg, n_passages, configs, kv_cache)


def _open_engines(
    engines: dict[str, Speculator],
    names: Iterable[str],
    runtimes: dict[str, DecoRuntime],
    draft_max: int,
    draft_model: DraftModel | None,
) -> None:
    """An engine for each configuration in `names`, put into `engines` one by one (the caller closes the
    ones opened when a later one fails): autoregressive ones on their own runtime, drafts on the sparse one."""
    for name in names:
        rt = runtimes[name if name in AUTOREGRESSIVE else "sparse"]
        if name in AUTOREGRESSIVE:
            engines[name] = Speculator(rt)
        elif name == "draft":
            engines[name] = Speculator(rt, "model", n_draft=draft_max, draft_model=draft_model)
        elif name == "lookup":
            engines[name] = Speculator(rt, "lookup", n_draft=draft_max)
        else:
            engines[name] = Speculator(rt, "script", n_draft=draft_max, hit_rate=float(name.split()[1]))


def _passage_runs(
    engines: dict[str, Speculator], row: dict[str, Config], passage: list[int], tg: int, threads: int
) -> Iterator[None]:
    """Generate `tg` tokens from `passage` with every configuration of `row` in turn (the first is
    autoregressive sparse), adding each run to its configuration and yielding after each. Every
    configuration but autoregressive dense must generate the first one's tokens."""
    want = None
    for name, cfg in row.items():
        if name.startswith("synthetic"):
            engines[name].set_script(want)
        tokens, stats = engines[name].generate(passage, tg, GREEDY)
        want = want or tokens
        if tokens != want and name != "dense":
            # the first token that differs (zip stops at the shorter list: the longer one differs there)
            pairs = enumerate(zip(tokens, want, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), min(len(tokens), len(want)))
            raise DecoError(
                f"{name} (threads {threads}) generated other tokens than autoregressive sparse decoding, "
                f"from token {at}"
            )
        cfg.runs.append(stats)
        yield
