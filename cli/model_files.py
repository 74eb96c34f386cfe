"""Commands that write model files: convert, quantize, imatrix."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..support.errors import DecoError
from .app import app, check_threads, console, err_console, friendly_errors, warn


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
    outtype: Annotated[
        OutType, typer.Option(help="Type of the non-expert matrices (attention, dense FFN, shared expert, embeddings).")
    ] = OutType.f16,
    expert_type: Annotated[
        ExpertType | None, typer.Option(help="Type of the routed expert matrices; default: same as --outtype.")
    ] = None,
    override: Annotated[
        list[str] | None,
        typer.Option(
            help="Replace a config.json value, KEY=VALUE (VALUE read as JSON, else as text); repeatable. For µP "
            "checkpoints whose scale_emb, scale_depth or dim_model_base differ from training.",
            metavar="KEY=VALUE",
        ),
    ] = None,
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

    progress = Progress(
        TextColumn("[bold]converting"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}"),
        console=err_console,
        transient=True,
        disable=quiet,
    )
    with progress:
        task = progress.add_task("converting", total=None, tensor="")
        converter = run_convert(
            hf_dir,
            output,
            outtype.value,
            expert_type.value if expert_type else None,
            on_progress=lambda tensor, done, total: progress.update(task, completed=done, total=total, tensor=tensor),
            on_warning=warn,
            overrides=_config_overrides(override or []),
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
    preset: Annotated[
        str,
        typer.Argument(
            help="Q4_0, Q5_0, Q8_0, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, IQ4_NL, "
            "IQ4_XS, F16 or BF16."
        ),
    ],
    threads: Annotated[int | None, typer.Option(help="Threads; default: all cores.", min=1)] = None,
    allow_requantize: Annotated[
        bool,
        typer.Option(
            "--allow-requantize", help="Accept an already quantized input (errors of both quantizations add up)."
        ),
    ] = False,
    imatrix: Annotated[
        Path | None,
        typer.Option(
            help="Importance matrix from `deco-gguf imatrix` (recommended for Q2_K, Q3_K_*, IQ4_XS).", dir_okay=False
        ),
    ] = None,
) -> None:
    """Quantize a DECO GGUF with llama.cpp's presets (the patched llama-quantize).

    Routers, router scales, norms and the NormSiLU mean row stay F32. Tensors
    whose rows do not fit the preset's blocks (64-wide expert down projections
    under 256-wide K-quants) fall back to a fitting type; each one is listed.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..runtime.tools import quantize as run_quantize

    check_threads(threads)

    progress = Progress(
        TextColumn(f"quantizing to {preset.upper()}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tensor]}"),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )
    task = progress.add_task("tensors", total=None, tensor="")
    with progress:
        fallbacks = run_quantize(
            src,
            dst,
            preset,
            threads,
            allow_requantize,
            imatrix,
            on_tensor=lambda i, n, name: progress.update(task, completed=i - 1, total=n, tensor=name),
        )
    if fallbacks:
        title = f"{len(fallbacks)} tensor(s) fell back: rows do not fit the blocks"
        table = Table("tensor", "row", "wanted", "written as", title=title, title_justify="left")
        for f in fallbacks:
            table.add_row(f.tensor, str(f.row), f.wanted, f.got)
        console.print(table)
    console.print(f"wrote [bold]{dst}[/] ({dst.stat().st_size / 2**20:.1f} MiB)")


@app.command()
@friendly_errors
def imatrix(
    model: Annotated[Path, typer.Argument(help="A DECO GGUF, F16 or F32 (the unquantized weights).")],
    text_file: Annotated[
        Path, typer.Argument(help="Text like the model's use (UTF-8), a few hundred KB.", exists=True, dir_okay=False)
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Importance matrix to write (GGUF; replaced only when complete).")
    ],
    ctx_size: Annotated[int, typer.Option("--ctx-size", "-c", help="Chunk length in tokens.", min=16)] = 512,
    threads: Annotated[int | None, typer.Option("--threads", "-t", help="Threads; default: all cores.", min=1)] = None,
    chunks: Annotated[int | None, typer.Option(help="Use only this many chunks of the text.", min=1)] = None,
) -> None:
    """Importance matrix for low-bit quantization (llama-imatrix through the DECO routing).

    Expert e's up and gate projections get statistics only from the tokens the
    router sends to e, as llama.cpp does for MoE experts; the expert down
    projections get none (their inputs exist only inside the DECO op) and are
    quantized without one. Then: deco-gguf quantize IN OUT Q3_K_M --imatrix FILE.
    """
    from ..runtime.tools import imatrix as run_imatrix

    check_threads(threads)
    with err_console.status("computing the importance matrix") as status:
        run_imatrix(
            model,
            text_file,
            output,
            ctx_size,
            threads,
            chunks,
            on_start=lambda n: status.update(f"computing the importance matrix over {n} chunks of {ctx_size} tokens"),
        )
    console.print(f"wrote [bold]{output}[/] ({output.stat().st_size / 2**20:.1f} MiB)")
