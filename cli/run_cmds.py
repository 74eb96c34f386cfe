"""Commands that run a model: chat, perplexity, speed."""

from __future__ import annotations

import json
import statistics
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import DecoError
from ..rpc import Offload
from .app import app, check_threads, console, err_console, friendly_errors, warn


# Layers on other machines (docs/distributed.md): the same two options for chat, perplexity and speed.
RpcServers = Annotated[Optional[str], typer.Option("--rpc", metavar="HOST:PORT[,...]", help="Place layers on rpc-servers of other machines (this project's build: scripts/setup.sh builds rpc-server); docs/distributed.md.")]
RpcLayers = Annotated[Optional[int], typer.Option("--n-gpu-layers", "-ngl", help="How many layers go to the --rpc servers, the last ones (llama.cpp's -ngl); default: all.", min=0)]


def _offload(rpc: Optional[str], layers: Optional[int]) -> Offload:
    if layers is not None and not rpc:
        raise DecoError("--n-gpu-layers places layers on --rpc servers: give --rpc HOST:PORT too")
    return Offload.parse(rpc, layers)


class EvalMode(str, Enum):
    sparse = "sparse"
    dense = "dense"


@app.command()
@friendly_errors
def chat(
    model: Annotated[Path, typer.Argument(help="A DECO GGUF, or an HF checkpoint directory (converted to F16 once, cached in ~/.cache/deco-gguf/converted).")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Answer this one message, print the reply and exit.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt (kept when old turns are dropped).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "--temp", help="0 = greedy.", min=0.0)] = 0.8,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = all).", min=0)] = 40,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (1 = off).", min=0.0, max=1.0)] = 0.95,
    min_p: Annotated[float, typer.Option(help="Drop tokens below this fraction of the top token's probability (0 = off).", min=0.0, max=1.0)] = 0.05,
    repeat_penalty: Annotated[float, typer.Option(help="Penalty on the last 64 tokens (1 = off).", min=0.0)] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed (default: random).", min=0)] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Longest reply in tokens (0 = until the end token or a full context).")] = 512,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="Threads; default: all cores.", min=1)] = None,
    ctx_size: Annotated[int, typer.Option("--ctx-size", "-c", help="Context in tokens; the oldest turns are dropped when it fills.", min=16)] = 2048,
    mode: Annotated[EvalMode, typer.Option(help="DECO FFN evaluation: active experts only, or every expert.")] = EvalMode.sparse,
    rpc: RpcServers = None,
    n_gpu_layers: RpcLayers = None,
) -> None:
    """Chat with a DECO model, streaming replies, with the GGUF's chat template.

    Interactive on a terminal (commands /reset, /stats, /help, /exit; Ctrl-C
    stops a reply). With --prompt, one reply is printed. With stdin piped,
    every non-empty line is a user turn (commands work too) and each reply is
    printed on stdout followed by a newline; notices go to stderr. A turn that
    cannot be answered (longer than the context) gets an error: line and an
    empty reply, and the session goes on (piped: exit code 1 at the end).
    Input that is not valid UTF-8 is read with U+FFFD in place of bad bytes;
    a chat template that does not compile is replaced by ChatML (a warning).
    Sampling follows llama.cpp (top-k → top-p → min-p → temperature, seeded);
    replies end at EOS / <|im_end|>, --max-tokens, or a full context.
    """
    import sys

    from ..cache import resolve_model
    from ..chat import ChatSession, Sampling
    from .chat import run_chat

    if prompt is not None and not prompt.strip():
        raise DecoError("--prompt is empty")
    offload = _offload(rpc, n_gpu_layers)
    check_threads(threads)
    path = resolve_model(model, on_status=lambda m: err_console.print(f"[dim]{m}[/]", highlight=False))
    sampling = Sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens)
    interactive = prompt is None and sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="replace")  # bytes that are not UTF-8 become U+FFFD
    with ChatSession(path, system=system, n_ctx=ctx_size, n_threads=threads, mode=mode.value, sampling=sampling, offload=offload) as session:
        if session.format.warning:
            warn(session.format.warning)
        if interactive:
            name = session.llm.metadata.get("general.name", path.name)
            err_console.print(
                f"[bold]{name}[/] ({path.name}) · {mode.value} · ctx {session.n_ctx} · "
                f"{session.llm.context_params.n_threads} thread(s) · template: {session.format.source}",
                highlight=False,
            )
        failed = run_chat(session, console, err_console, prompt=prompt, interactive=interactive, lines=sys.stdin)
    if failed and not interactive:
        raise typer.Exit(1)  # each failed turn was reported on its own error: line


@app.command()
@friendly_errors
def perplexity(
    model: Annotated[Path, typer.Argument(help="A DECO GGUF (or an HF checkpoint directory, converted to F16 once and cached).")],
    text_file: Annotated[Path, typer.Argument(help="The text to score (UTF-8; read like llama-perplexity -f).")],
    ctx_size: Annotated[int, typer.Option("--ctx-size", "-c", help="Chunk length in tokens; the text needs at least twice as many.", min=4)] = 512,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="Threads; default: all cores.", min=1)] = None,
    mode: Annotated[EvalMode, typer.Option(help="DECO FFN evaluation: active experts only, or every expert (same result).")] = EvalMode.sparse,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    rpc: RpcServers = None,
    n_gpu_layers: RpcLayers = None,
) -> None:
    """Perplexity on a text file, computed exactly as llama.cpp's llama-perplexity does.

    The text is tokenized whole (BOS in front when the model adds one), cut
    into chunks of --ctx-size tokens, each chunk starts with BOS and only its
    second half is scored; PPL = exp(mean NLL), ± as llama-perplexity prints it.
    Also reports the measured expert activation per DECO layer on the text.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..cache import resolve_model
    from ..gguf_file import read_gguf
    from ..perplexity import perplexity as run_perplexity

    offload = _offload(rpc, n_gpu_layers)
    check_threads(threads)
    path = resolve_model(model, on_status=lambda m: err_console.print(f"[dim]{m}[/]", highlight=False))
    trained = read_gguf(path).config.context_length  # a one-line error for anything but a DECO GGUF
    if ctx_size > trained:
        warn(f"the model was trained on only {trained} context tokens ({ctx_size} specified)")
    progress = Progress(
        TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TextColumn("ppl {task.fields[ppl]}"),
        TimeRemainingColumn(), console=err_console, transient=True, disable=not err_console.is_terminal,
    )
    task = None

    def on_start(chunks: int, tokens: int) -> None:
        nonlocal task
        task = progress.add_task("chunks", total=chunks, ppl="-")

    def on_chunk(i: int, ppl: float) -> None:
        progress.update(task, completed=i + 1, ppl=f"{ppl:.4f}")

    with progress:
        result = run_perplexity(path, text_file, ctx_size=ctx_size, n_threads=threads, mode=mode.value, on_start=on_start, on_chunk=on_chunk, offload=offload)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    r = result
    table = Table(title=f"Perplexity of {path.name} on {text_file.name}", show_header=False, title_justify="left")
    table.add_row("PPL", f"[bold]{r.ppl:.4f}[/] ± {r.ppl_error:.5f}")
    table.add_row("mean NLL", f"{r.mean_nll:.5f} nats/token")
    table.add_row("tokens", f"{r.tokens} ({'BOS added' if r.add_bos else 'no BOS'}); {r.chunks} chunks × {r.ctx_size}, {r.scored_tokens} scored")
    table.add_row("evaluation", f"{r.mode}, {r.threads} thread(s), {r.seconds:.1f} s ({r.tokens_per_second:,.0f} tokens/s)")
    if r.activation:
        layers = ", ".join(f"L{a['layer']} {a['rate']:.1%}" for a in r.activation)
        table.add_row("expert activation", f"mean {r.mean_activation:.1%} ({layers})")
    console.print(table)
    console.print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_error:.5f}", highlight=False)


def _thread_list(value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        counts = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise DecoError(f"--threads {value!r}: expected counts separated by commas, e.g. 1,2") from None
    if not counts or min(counts) < 1:
        raise DecoError(f"--threads {value!r}: every count must be at least 1")
    return sorted(set(counts))


@app.command()
@friendly_errors
def speed(
    model: Annotated[Path, typer.Argument(help="A DECO GGUF (or an HF checkpoint directory, converted to F16 once and cached).")],
    pp: Annotated[int, typer.Option(help="Prompt-processing test: tokens in the prompt.", min=1)] = 128,
    tg: Annotated[int, typer.Option(help="Generation test: tokens decoded one at a time.", min=1)] = 64,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Timed runs of every configuration (interleaved).", min=1)] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed runs of every configuration first.", min=0)] = 1,
    threads: Annotated[Optional[str], typer.Option("--threads", "-t", help="Thread counts to sweep, e.g. 1,2; default: all cores.")] = None,
    text: Annotated[Optional[Path], typer.Option(help="Take the benchmark tokens from this text (default: a built-in English paragraph).", exists=True, dir_okay=False)] = None,
    vs_dense: Annotated[bool, typer.Option("--vs-dense", help="Also measure dense_eq: a random-weight Llama with the same d, layers, heads, vocab and tensor types and an FFN width giving the same N (built once into ~/.cache/deco-gguf/dense-eq).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout (schema below).")] = False,
    plot_file: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of tokens/s by threads, sparse vs dense (and dense_eq).", dir_okay=False)] = None,
    rpc: RpcServers = None,
    n_gpu_layers: RpcLayers = None,
) -> None:
    """Prompt (pp) and generation (tg) tokens/s, DECO sparse vs dense in one run, with the bytes bound.

    TTFT: time to first token, the pp prompt evaluated and then one token decoded.

    Every configuration (sparse, dense, dense_eq × threads) gets --warmup
    untimed runs, then --repetitions timed runs interleaved with the others;
    reported: median, min and max. The activation rate is the DECO op's counters
    during the sparse tg runs; bytes read per decoded token = non-expert
    weight bytes + Σ_layer rate × expert bytes, and the sparse/dense decode
    ratio bound = dense bytes / sparse bytes (reached only when decoding is
    memory-bound), printed beside the measured ratio.

    --json schema: {model, settings: {pp, tg, repetitions, warmup, threads: list},
    results: list of {model: deco|dense_eq, mode: sparse|dense, threads, test: pp|tg,
    tokens, samples: list of t/s, tokens_per_second: {median, min, max},
    time_to_first_token_ms (pp only): {median, min, max}},
    activation: {layers: list of {layer, rate}, mean, source},
    bytes_per_token: {non_expert, expert_total, expert_by_layer: {layer: bytes},
    embedding_row_only, sparse, dense, dense_eq|null},
    ratios: list of {threads, sparse_over_dense_tg, sparse_over_dense_pp,
    sparse_over_dense_eq_tg|null, sparse_over_dense_eq_pp|null, bound,
    bound_vs_dense_eq|null}, dense_eq: null | {path, ffn_width, params,
    deco_params, types: {role: type}, substituted: {role: deco type}, built}}.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..cache import resolve_model
    from ..speed import measure, plot

    counts = _thread_list(threads)
    check_threads(*(counts or []))
    offload = _offload(rpc, n_gpu_layers)
    if plot_file is not None and not plot_file.parent.is_dir():
        raise DecoError(f"{plot_file.parent}: output directory does not exist")
    sample = text.read_text(encoding="utf-8", errors="replace") if text else None
    if sample is not None and not sample.strip():
        raise DecoError(f"{text}: empty text")
    status = lambda m: err_console.print(f"[dim]{m}[/]", highlight=False)  # noqa: E731
    path = resolve_model(model, on_status=status)
    progress = Progress(TextColumn("measuring"), BarColumn(), MofNCompleteColumn(), console=err_console,
                        transient=True, disable=not err_console.is_terminal)
    with progress:
        task = progress.add_task("runs", total=None)
        report = measure(path, pp=pp, tg=tg, repetitions=repetitions, warmup=warmup, threads=counts, vs_dense=vs_dense,
                         text=sample, on_status=status, on_step=lambda done, total: progress.update(task, completed=done, total=total),
                         offload=offload)
    if plot_file is not None:
        plot(report, plot_file)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        if plot_file is not None:
            err_console.print(f"wrote {plot_file}", highlight=False)
        return

    def cells(s) -> list[str]:
        return [f"{s.median:,.1f}", f"[dim]{min(s.samples):,.0f}-{max(s.samples):,.0f}[/]"] if s else ["-", ""]

    table = Table("threads", "", f"pp{pp} t/s", "min-max", f"tg{tg} t/s", "min-max",
                  title=f"Speed of {path.name}: median of {repetitions} interleaved runs", title_justify="left")
    names = {("deco", "sparse"): "DECO sparse", ("deco", "dense"): "DECO dense", ("dense_eq", "dense"): "dense_eq"}
    for t in report.threads:
        for (m, md), name in names.items():
            if report.find(m, md, t, "tg"):
                table.add_row(str(t), name, *cells(report.find(m, md, t, "pp")), *cells(report.find(m, md, t, "tg")))
    console.print(table)
    first_tokens = ", ".join(f"{names[(s.model, s.mode)]} t{s.threads} {statistics.median(s.first_token_ms):,.1f} ms"
                             for s in report.series if s.test == "pp")
    console.print(f"time to first token (pp{pp} prompt, then one decode): {first_tokens}", highlight=False)

    b = report.bytes
    layers = ", ".join(f"L{k} {v:.1%}" for k, v in sorted(report.layer_rates.items()))
    console.print(f"expert activation (sparse tg): mean {report.mean_rate:.1%} ({layers})", highlight=False)
    bt = Table("", "MiB / decoded token", title="Weight bytes read per decoded token", title_justify="left", show_header=False)
    bt.add_row("non-expert" + (" (embedding: one row)" if b.embedding_row_only else ""), f"{b.non_expert / 2**20:.3f}")
    bt.add_row("routed experts, all", f"{b.expert / 2**20:.3f}")
    bt.add_row("DECO sparse (at the measured rate)", f"{report.sparse_bytes / 2**20:.3f}")
    bt.add_row("DECO dense", f"{b.dense / 2**20:.3f}")
    if report.dense_eq_bytes:
        bt.add_row("dense_eq", f"{report.dense_eq_bytes / 2**20:.3f}")
    console.print(bt)

    rt = Table("threads", "tg sparse/dense", "bound", "pp sparse/dense", title="Speed-up of DECO sparse: measured vs the weight-bytes bound", title_justify="left")
    has_eq = report.dense_eq is not None
    if has_eq:
        rt.add_column("tg vs dense_eq")
        rt.add_column("bound")
    fmt = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
    for r in report.ratios():
        row = [str(r["threads"]), fmt(r["sparse_over_dense_tg"]), fmt(r["bound"]), fmt(r["sparse_over_dense_pp"])]
        if has_eq:
            row += [fmt(r["sparse_over_dense_eq_tg"]), fmt(r["bound_vs_dense_eq"])]
        rt.add_row(*row)
    console.print(rt)
    if any(r["sparse_over_dense_tg"] and r["sparse_over_dense_tg"] > 1.05 * r["bound"] for r in report.ratios()):
        console.print("[dim]measured above the bound: decode time here is not set by weight bytes alone (compute "
                      "and per-expert overheads, which skipped experts also save, count too)[/]", highlight=False)
    noisy = report.noisy()
    if noisy:
        warn(f"{len(noisy)} configuration(s) varied by more than 1.5x between runs "
             f"({', '.join(f'{names[(s.model, s.mode)]} t{s.threads} {s.test}' for s in noisy)}): the machine was busy; "
             "trust those ratios less, or raise --repetitions")
    if has_eq:
        e = report.dense_eq
        note = f"; types {e.types['ffn']} FFN, {e.types['attn_q']} attention" + (f" (substituted for {e.substituted})" if e.substituted else "")
        console.print(f"dense_eq: FFN width {e.ffn_width}, N {e.params / 1e6:.3f} M vs DECO {e.deco_params / 1e6:.3f} M{note}", highlight=False)
    if plot_file is not None:
        console.print(f"wrote {plot_file}", highlight=False)
