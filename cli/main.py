"""The `deco-gguf` command line."""

from __future__ import annotations

import functools
import json
import statistics
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import DecoError
from ..rpc import Offload
from ..signals import Terminated

ENVIRONMENT = "\n\n".join([
    "Environment variables:",
    "DECO_VERBOSE=1 prints llama.cpp's own log (model loading, buffers, devices) on stderr.",
    "DECO_GGUF_CACHE=DIR holds HF checkpoints converted for chat, perplexity and speed, speed's "
    "dense_eq models and the training corpus (default: $XDG_CACHE_HOME/deco-gguf, else ~/.cache/deco-gguf; "
    "DECO_CORPUS_CACHE=DIR moves the corpus alone).",
    "DECO_FFN=sparse|dense|ops sets the DECO FFN evaluation of llama.cpp's own tools (llama-cli, "
    "llama-server, llama-bench); deco-gguf's commands take --mode instead.",
])

app = typer.Typer(
    help="Convert, inspect and run DECO sparse mixture-of-experts models as GGUF.",
    epilog=ENVIRONMENT,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from ..version import version_lines

        for line in version_lines():
            console.print(line, highlight=False, soft_wrap=True)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True, help="Versions of deco-gguf and its llama.cpp, the ggml patches and build flags, and exit.")] = None,
) -> None:
    """Convert, inspect and run DECO sparse mixture-of-experts models as GGUF."""


def friendly_errors(command):
    """Turn DecoError into one red line on stderr and exit code 1; Ctrl-C into exit 130, SIGTERM
    into exit 143 (outputs being written are removed on the way)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DecoError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Terminated:
            err_console.print("[yellow]terminated[/]")
            raise typer.Exit(143) from None

    return wrapper


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _check_threads(*counts: Optional[int]) -> None:
    """Warn about more threads than cores: ggml's threads wait on each other at every step, and an
    oversubscribed run is slower by orders of magnitude, not by the ratio of threads to cores."""
    from ..runtime import available_cores

    cores = available_cores()
    most = max((c for c in counts if c), default=0)
    if most > cores:
        warn(f"--threads {most} is more than the {cores} core(s) this process may use: expect a run many times slower")


class OutType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


class ExpertType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"
    q5_0 = "q5_0"
    q4_0 = "q4_0"


@app.command()
@friendly_errors
def convert(
    hf_dir: Annotated[Path, typer.Argument(help="Checkpoint directory in the released Hugging Face layout.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="GGUF file to write (replaced only when complete).")],
    outtype: Annotated[OutType, typer.Option(help="Type of the non-expert matrices (attention, dense FFN, shared expert, embeddings).")] = OutType.f16,
    expert_type: Annotated[Optional[ExpertType], typer.Option(help="Type of the routed expert matrices; default: same as --outtype.")] = None,
    override: Annotated[Optional[list[str]], typer.Option(help="Replace a config.json value, KEY=VALUE (VALUE read as JSON, else as text); repeatable. For µP checkpoints whose scale_emb, scale_depth or dim_model_base differ from training.", metavar="KEY=VALUE")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Convert a DECO checkpoint (safetensors or pytorch_model.bin) to GGUF.

    Routers, router scales, norms and the NormSiLU mean row always stay F32.
    Disagreements between config.json and the tensors are reported as warnings;
    the tensors win. The output is written only when complete and never over one
    of the checkpoint's own files.

    With use_mup the µP scales come from config.json, which released converters
    copy from a template: the values used are printed, and --override scale_emb=12
    (etc.) gives the training run's.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from ..converter import convert as run_convert

    progress = Progress(TextColumn("[bold]converting"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[tensor]}"), console=err_console, transient=True, disable=quiet)
    with progress:
        task = progress.add_task("converting", total=None, tensor="")
        converter = run_convert(
            hf_dir, output, outtype.value, expert_type.value if expert_type else None,
            on_progress=lambda tensor, done, total: progress.update(task, completed=done, total=total, tensor=tensor),
            on_warning=warn, overrides=_config_overrides(override or []),
        )
    size = output.stat().st_size
    console.print(f"wrote [bold]{output}[/] ({size / 2**20:.1f} MiB, {len(converter.plans)} tensors)")


def _config_overrides(items: list[str]) -> dict:
    """`KEY=VALUE` strings as a dict, each VALUE read as JSON (numbers, true, null) or else as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DecoError(f"--override {item!r}: expected KEY=VALUE, e.g. scale_emb=12")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@app.command()
@friendly_errors
def quantize(
    src: Annotated[Path, typer.Argument(help="A DECO GGUF (typically F16 or F32 from `convert`).")],
    dst: Annotated[Path, typer.Argument(help="GGUF file to write (replaced only when complete).")],
    preset: Annotated[str, typer.Argument(help="Q4_0, Q5_0, Q8_0, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, IQ4_NL, IQ4_XS, F16 or BF16.")],
    threads: Annotated[Optional[int], typer.Option(help="Threads; default: all cores.", min=1)] = None,
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Accept an already quantized input (errors of both quantizations add up).")] = False,
    imatrix: Annotated[Optional[Path], typer.Option(help="Importance matrix from `deco-gguf imatrix` (recommended for Q2_K, Q3_K_*, IQ4_XS).", dir_okay=False)] = None,
) -> None:
    """Quantize a DECO GGUF with llama.cpp's presets (the patched llama-quantize).

    Routers, router scales, norms and the NormSiLU mean row stay F32. Tensors
    whose rows do not fit the preset's blocks (64-wide expert down projections
    under 256-wide K-quants) fall back to a fitting type; each one is listed.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..runtime import quantize as run_quantize

    _check_threads(threads)

    progress = Progress(TextColumn(f"quantizing to {preset.upper()}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[tensor]}"), console=err_console, transient=True,
                        disable=not err_console.is_terminal)
    task = progress.add_task("tensors", total=None, tensor="")
    with progress:
        fallbacks = run_quantize(
            src, dst, preset, threads, allow_requantize, imatrix,
            on_tensor=lambda i, n, name: progress.update(task, completed=i - 1, total=n, tensor=name),
        )
    if fallbacks:
        table = Table("tensor", "row", "wanted", "written as", title=f"{len(fallbacks)} tensor(s) fell back: rows do not fit the blocks", title_justify="left")
        for f in fallbacks:
            table.add_row(f.tensor, str(f.row), f.wanted, f.got)
        console.print(table)
    console.print(f"wrote [bold]{dst}[/] ({dst.stat().st_size / 2**20:.1f} MiB)")


@app.command()
@friendly_errors
def imatrix(
    model: Annotated[Path, typer.Argument(help="A DECO GGUF, F16 or F32 (the unquantized weights).")],
    text_file: Annotated[Path, typer.Argument(help="Text like the model's use (UTF-8), a few hundred KB.", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Importance matrix to write (GGUF; replaced only when complete).")],
    ctx_size: Annotated[int, typer.Option("--ctx-size", "-c", help="Chunk length in tokens.", min=16)] = 512,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="Threads; default: all cores.", min=1)] = None,
    chunks: Annotated[Optional[int], typer.Option(help="Use only this many chunks of the text.", min=1)] = None,
) -> None:
    """Importance matrix for low-bit quantization (llama-imatrix through the DECO routing).

    Expert e's up and gate projections get statistics only from the tokens the
    router sends to e, as llama.cpp does for MoE experts; the expert down
    projections get none (their inputs exist only inside the DECO op) and are
    quantized without one. Then: deco-gguf quantize IN OUT Q3_K_M --imatrix FILE.
    """
    from ..runtime import imatrix as run_imatrix

    _check_threads(threads)
    with err_console.status("computing the importance matrix") as status:
        run_imatrix(model, text_file, output, ctx_size, threads, chunks,
                    on_start=lambda n: status.update(f"computing the importance matrix over {n} chunks of {ctx_size} tokens"))
    console.print(f"wrote [bold]{output}[/] ({output.stat().st_size / 2**20:.1f} MiB)")


@app.command()
@friendly_errors
def info(
    model: Annotated[Path, typer.Argument(help="A DECO GGUF file or an HF checkpoint directory.")],
    activation_rate: Annotated[Optional[float], typer.Option(help="Fraction of routed experts active per token, for N_a and R_c; default 0.2 (assumed).", min=0.0, max=1.0)] = None,
    context: Annotated[Optional[int], typer.Option(help="Context length for the attention term of the compute estimate; default: the model's.", min=1)] = None,
    measure: Annotated[Optional[Path], typer.Option(help="Measure the per-layer activation rate on this text file and use it for N_a: a GGUF runs in the patched llama.cpp (the DECO op's counters), an HF checkpoint in the PyTorch reference model.", exists=True, dir_okay=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
) -> None:
    """Architecture, tensor types and sizes, and resource accounting (N, N_a, r_a, R_c)."""
    from ..info import measure_activation_gguf, measure_activation_hf, read_model

    found = read_model(model)
    rate, source = (activation_rate, "given") if activation_rate is not None else (0.2, "assumed")
    measured = None
    if measure is not None:
        if activation_rate is not None:
            raise DecoError("give either --activation-rate or --measure, not both")
        text = measure.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DecoError(f"{measure}: empty text")
        if found.kind == "hf":
            with console.status("measuring activation with the reference model"):
                measured = measure_activation_hf(found.path, text)
        else:
            with console.status("measuring activation with the patched llama.cpp"):
                measured = measure_activation_gguf(found.path, text)
        moe_rates = [r for r in measured if r is not None]
        rate, source = sum(moe_rates) / len(moe_rates), "measured"
    acct = found.accounting(rate, source, context)
    c = found.config
    summary = {
        "path": str(found.path),
        "kind": found.kind,
        "config": {k: v for k, v in vars(c).items() if k != "warnings"},
        "bytes_total": found.total_bytes,
        "bytes_by_type": found.bytes_by_type(),
        "accounting": acct.as_dict(),
        "measured_layer_rates": measured,
        "warnings": found.warnings,
        "tensors": [vars(t) | {"shape": list(t.shape)} for t in found.tensors] if tensors else None,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for message in found.warnings:
        warn(message)
    _print_info(found, acct, tensors)
    if measured is not None:
        layers = ", ".join(f"{i}: {r:.1%}" for i, r in enumerate(measured) if r is not None)
        console.print(f"measured activation per DECO layer: {layers}")


def _print_info(found, acct, list_tensors: bool) -> None:
    c = found.config
    moe = [i for i, m in enumerate(c.moe_layers) if m]
    dense = [i for i, m in enumerate(c.moe_layers) if not m]
    arch = Table(title=f"DECO model: {found.path} ({found.kind})", show_header=False, title_justify="left")
    rows = [
        ("layers", f"{c.num_layers} ({len(dense)} dense {dense}, {len(moe)} DECO)"),
        ("hidden size d", str(c.hidden_size)),
        ("attention", f"{c.num_heads} heads × {c.head_dim}, {c.num_kv_heads} KV groups, rope θ {c.rope_theta:g} (NeoX)"),
        ("dense FFN", f"SwiGLU {c.dense_ffn_size}" if dense else "none"),
        ("experts", f"E {c.num_experts} × De {c.expert_ffn_size}, {'gated' if c.expert_gated else 'non-gated'}, {c.expert_act}"),
        ("shared expert", f"SwiGLU {c.shared_ffn_size}" if c.shared_ffn_size else "none"),
        ("router", f"{c.router_act}, norm {c.router_norm}" + (f" (scale [{c.router_scale_size}])" if c.router_scale_size else "") + f", expert bias {c.expert_bias}"),
        ("norm eps", f"{c.norm_eps:g}"),
        ("mup scales", f"embedding ×{c.embedding_scale:g}, residual ×{c.residual_scale:g}, logits ÷{c.logit_scale:g}"),
        ("vocab / context", f"{c.vocab_size} / {c.context_length}" + (" (tied embeddings)" if c.tied_embeddings else "")),
    ]
    for k, v in rows:
        arch.add_row(k, v)
    console.print(arch)

    types = Table(title="Tensor bytes by type", title_justify="left", min_width=40)
    types.add_column("type")
    types.add_column("MiB", justify="right")
    for t, n in sorted(found.bytes_by_type().items(), key=lambda kv: -kv[1]):
        types.add_row(t, f"{n / 2**20:.2f}")
    types.add_row("[bold]total", f"[bold]{found.total_bytes / 2**20:.2f}")
    console.print(types)

    if list_tensors:
        table = Table(title="Tensors", title_justify="left")
        for col in ("name", "type", "shape", "bytes"):
            table.add_column(col, justify="right" if col == "bytes" else "left")
        for t in found.tensors:
            table.add_row(t.name, t.type, str(list(t.shape)), str(t.nbytes))
        console.print(table)

    a = acct
    res = Table(title="Resource accounting (docs/deco.md: N, N_a, r_a, R_c)", show_header=False, title_justify="left")
    res.add_row("N (non-embedding params)", f"{a.non_embedding_params / 1e6:.2f} M")
    res.add_row("  of which routed experts", f"{a.routed_expert_params / 1e6:.2f} M")
    res.add_row("embedding + output params", f"{a.embedding_params / 1e6:.2f} M")
    res.add_row("activation rate", f"{a.activation_rate:.1%} ({a.activation_source})")
    res.add_row("N_a (active per token)", f"{a.active_params / 1e6:.2f} M")
    res.add_row("r_a = N_a / N", f"{a.active_ratio:.1%}")
    res.add_row(f"R_c vs equal-N dense (ctx {a.context})", f"{a.compute_ratio:.3f}")
    console.print(res)


@app.command()
@friendly_errors
def fixture(
    name: Annotated[Optional[str], typer.Argument(help="A variant (small, for tests) or a preset (deco-0.1b, deco-0.5b: released shapes).")] = None,
    out_dir: Annotated[Optional[Path], typer.Argument(help="Directory to write the checkpoint into.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
    calibrate: Annotated[Optional[float], typer.Option(help="Calibrate the routers so that about this fraction of experts is active on ordinary text (e.g. 0.2), and report the measured rates.", min=0.01, max=0.99)] = None,
    list_all: Annotated[bool, typer.Option("--list", help="List the variants and presets.")] = False,
) -> None:
    """Write a random DECO checkpoint in the exact released Hugging Face layout.

    The config carries the released inconsistencies (stale HF-style keys) and a
    real SentencePiece tokenizer with the ChatML tokens; for tests and benchmarks.
    """
    from .. import fixtures

    if list_all:
        table = Table("name", "layers", "d", "experts", "De", "weights", "dtype", title="Fixtures", title_justify="left")
        for spec in [*fixtures.VARIANTS.values(), *fixtures.PRESETS.values()]:
            table.add_row(spec.name, str(spec.num_layers), str(spec.hidden_size), str(spec.num_experts), str(spec.expert_ffn), spec.weight_format, spec.dtype)
        console.print(table)
        return
    if name is None or out_dir is None:
        raise DecoError("give a fixture NAME and an OUT_DIR (see --list)")
    if name not in fixtures.VARIANTS and name not in fixtures.PRESETS:
        raise DecoError(f"unknown fixture {name!r}; see `deco-gguf fixture --list`")
    with console.status(f"writing {name}"):
        path = fixtures.write_fixture(out_dir, name, seed=seed)
    console.print(f"wrote [bold]{path}[/]")
    if calibrate is not None:
        from ..calibrate import calibrate_routers

        with console.status(f"calibrating routers to {calibrate:.0%} activation"):
            report = calibrate_routers(path, calibrate)
        console.print(report.summary())



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
    _check_threads(threads)
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
    _check_threads(threads)
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
    _check_threads(*(counts or []))
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


if __name__ == "__main__":
    app()
