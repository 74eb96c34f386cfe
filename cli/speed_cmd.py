"""`deco-gguf speed`: tokens/s of DECO sparse vs dense decoding, or of speculative decoding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..support.errors import DecoError
from .app import app, check_threads, console, err_console, friendly_errors
from .options import (
    CacheType,
    DraftMax,
    DraftPath,
    KvCache,
    Lookup,
    ModelPath,
    RpcLayers,
    RpcServers,
    offload_of,
    status,
)
from .speed_tables import print_speculative, print_speed


def _counts(value: str, option: str, minimum: int, example: str) -> list[int]:
    """The distinct whole numbers of a comma-separated option, in increasing order; each at least `minimum`."""
    try:
        counts = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise DecoError(f"{option} {value!r}: expected whole numbers separated by commas, e.g. {example}") from None
    if not counts or min(counts) < minimum:
        raise DecoError(f"{option} {value!r}: every number must be at least {minimum}")
    return sorted(set(counts))


def _rates(value: str | None) -> tuple[float, ...]:
    if value is None:
        return ()
    try:
        rates = tuple(float(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise DecoError(f"--synthetic {value!r}: expected probabilities separated by commas, e.g. 0.5,0.8") from None
    if not rates or not all(0 <= r <= 1 for r in rates):
        raise DecoError(f"--synthetic {value!r}: every rate must be within [0, 1]")
    return rates


PromptTokens = Annotated[int, typer.Option(help="Prompt-processing test: tokens in the prompt.", min=1)]
GeneratedTokens = Annotated[int, typer.Option(help="Generation test: tokens decoded one at a time.", min=1)]
Repetitions = Annotated[
    int, typer.Option("--repetitions", "-r", help="Timed runs of every configuration (interleaved).", min=1)
]
Warmup = Annotated[int, typer.Option(help="Untimed runs of every configuration first.", min=0)]
ThreadCounts = Annotated[
    str | None, typer.Option("--threads", "-t", help="Thread counts to sweep, e.g. 1,2; default: all cores.")
]
Depths = Annotated[
    str | None,
    typer.Option(
        "--depth",
        "-d",
        metavar="TOKENS",
        help="Measure after this many tokens of context, e.g. 0,1024,4096 (a chat a few turns in): the KV cache "
        "holds them first (untimed), pp is then a follow-up prompt and tg its reply. Default: 0.",
    ),
]
SampleText = Annotated[
    Path | None,
    typer.Option(
        help="Take the benchmark tokens from this text (default: a built-in English paragraph).",
        exists=True,
        dir_okay=False,
    ),
]
VsDense = Annotated[
    bool,
    typer.Option(
        "--vs-dense",
        help="Also measure dense_eq: a random-weight Llama with the same d, layers, heads, vocab and tensor types "
        "and an FFN width giving the same N (built once into ~/.cache/deco-gguf/dense-eq).",
    ),
]
SpeedJson = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout (schema below).")]
PlotFile = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Write a PNG of tokens/s by threads, sparse vs dense (and dense_eq); with speculation, of every "
        "configuration with its speed-up.",
        dir_okay=False,
    ),
]
Synthetic = Annotated[
    str | None,
    typer.Option(
        metavar="RATES",
        help="Speculate with a synthetic draft: the model's own greedy continuation, each token right with these "
        "probabilities, e.g. 0.5,0.8 (measures the engine, not a draft).",
    ),
]


@app.command()
@friendly_errors
def speed(
    model: ModelPath,
    pp: PromptTokens = 128,
    tg: GeneratedTokens = 64,
    repetitions: Repetitions = 3,
    warmup: Warmup = 1,
    threads: ThreadCounts = None,
    depth: Depths = None,
    cache_type: CacheType = KvCache.f16,
    text: SampleText = None,
    vs_dense: VsDense = False,
    as_json: SpeedJson = False,
    plot_file: PlotFile = None,
    draft: DraftPath = None,
    lookup: Lookup = False,
    draft_max: DraftMax = None,
    synthetic: Synthetic = None,
    rpc: RpcServers = None,
    n_gpu_layers: RpcLayers = None,
) -> None:
    """Prompt (pp) and generation (tg) tokens/s, DECO sparse vs dense in one run, with the bytes bound.

    --depth measures where a chat is after a few turns: the KV cache holds
    that many tokens of the text before every run, so each decoded token also
    reads the cache (its bytes are part of the bound; the deeper, the closer
    every ratio gets to 1). With speculation, each passage's prompt is
    depth + pp tokens.

    With --draft, --lookup or --synthetic: speculative decoding against
    autoregressive sparse and dense decoding instead, greedy, on --repetitions
    passages of the text (--pp prompt tokens, --tg generated), the same tokens
    asserted; reported: tokens/s, speed-ups, acceptance, tokens per
    verification and a verification's cost in decode steps. --json gives
    {model, speculative: {settings, results: list of {name, threads, depth, median,
    tokens_per_second, acceptance, tokens_per_verify, verify_cost_steps,
    speedup_vs_sparse, speedup_vs_dense, draft_ms, verify_ms}}}.

    TTFT: time to first token, the pp prompt evaluated and then one token decoded.

    Every configuration (sparse, dense, dense_eq × threads) gets --warmup
    untimed runs, then --repetitions timed runs interleaved with the others;
    reported: median, min and max. The activation rate is counted
    during the sparse tg runs; bytes read per decoded token = non-expert
    weight bytes + Σ_layer rate × expert bytes + the KV cache at the depth,
    and the sparse/dense decode ratio bound = dense bytes / sparse bytes
    (reached only when decoding is memory-bound), printed beside the
    measured ratio.

    --json schema: {model, settings: {pp, tg, repetitions, warmup, threads: list,
    depths: list, kv_cache},
    results: list of {model: deco|dense_eq, mode: sparse|dense, threads, test: pp|tg,
    tokens, depth, samples: list of t/s, tokens_per_second: {median, min, max},
    time_to_first_token_ms (pp only): {median, min, max}},
    activation: {layers: list of {layer, rate}, mean, source},
    bytes_per_token: {non_expert, expert_total, expert_by_layer: {layer: bytes},
    embedding_row_only, sparse, dense, dense_eq|null, kv_cache_per_position},
    ratios: list of {threads, depth, sparse_over_dense_tg, sparse_over_dense_pp,
    sparse_over_dense_eq_tg|null, sparse_over_dense_eq_pp|null, kv_bytes, bound,
    bound_vs_dense_eq|null}, dense_eq: null | {path, ffn_width, params,
    deco_params, types: {role: type}, substituted: {role: deco type}, built}}.
    """
    from ..support.cache import resolve_model

    counts = _counts(threads, "--threads", 1, "1,2") if threads is not None else None
    depths = _counts(depth, "--depth", 0, "0,1024,4096") if depth is not None else [0]
    check_threads(*(counts or []))
    offload = offload_of(rpc, n_gpu_layers)
    if plot_file is not None and not plot_file.parent.is_dir():
        raise DecoError(f"{plot_file.parent}: output directory does not exist")
    sample = text.read_text(encoding="utf-8", errors="replace") if text else None
    if sample is not None and not sample.strip():
        raise DecoError(f"{text}: empty text")
    path = resolve_model(model, on_status=status)
    speculative = draft is not None or lookup or synthetic is not None
    if speculative:
        from ..measure.speculative_speed import plot

        rates = _rates(synthetic)
        if offload.rpc or vs_dense:
            raise DecoError("--rpc and --vs-dense are not available with speculative decoding")
        if draft is not None:
            draft = resolve_model(draft, on_status=status)
        settings = (pp, tg, repetitions, counts, depths, cache_type.value)
        report = _measure_speculative(path, sample, draft, lookup, rates, draft_max, settings)
    else:
        from ..measure.speed_report import plot

        settings = (pp, tg, repetitions, warmup, counts, depths, cache_type.value)
        report = _measure_speed(path, settings, vs_dense, sample, offload)
    if plot_file is not None:
        plot(report, plot_file)
    if speculative:
        print_speculative(report, as_json)
    elif as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print_speed(report, path, pp, tg, repetitions)
    if plot_file is not None:
        (err_console if as_json else console).print(f"wrote {plot_file}", highlight=False)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("measuring"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )


def _measure_speculative(path, sample, draft, lookup, rates, draft_max, settings):
    from ..measure.speculative_speed import measure_speculative
    from ..measure.speed import DEFAULT_TEXT
    from ..runtime.native import available_cores
    from ..runtime.speculative import DEFAULT_DRAFT_MAX

    pp, tg, repetitions, counts, depths, kv_cache = settings
    progress = _progress()
    with progress:
        task = progress.add_task("runs", total=None)
        return measure_speculative(
            path,
            sample or DEFAULT_TEXT,
            draft=draft,
            lookup=lookup,
            synthetic=rates,
            draft_max=draft_max or DEFAULT_DRAFT_MAX,
            prompt=pp,
            tg=tg,
            n_passages=repetitions,
            threads=counts or [available_cores()],
            depths=depths,
            kv_cache=kv_cache,
            on_step=lambda done, total: progress.update(task, completed=done, total=total),
        )


def _measure_speed(path, settings, vs_dense, sample, offload):
    from ..measure.speed import measure

    pp, tg, repetitions, warmup, counts, depths, kv_cache = settings
    progress = _progress()
    with progress:
        task = progress.add_task("runs", total=None)
        return measure(
            path,
            pp=pp,
            tg=tg,
            repetitions=repetitions,
            warmup=warmup,
            threads=counts,
            depths=depths,
            kv_cache=kv_cache,
            vs_dense=vs_dense,
            text=sample,
            on_status=status,
            offload=offload,
            on_step=lambda done, total: progress.update(task, completed=done, total=total),
        )
