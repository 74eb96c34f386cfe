"""What every `deco-gguf` command shares: the Typer app, its consoles, errors and warnings."""

from __future__ import annotations

import functools
from typing import Annotated

import typer
from rich.console import Console

from ..support.errors import DecoError
from ..support.signals import Terminated

ENVIRONMENT = "\n\n".join(
    [
        "Environment variables:",
        "DECO_VERBOSE=1 prints llama.cpp's own log (model loading, buffers, devices) on stderr.",
        "DECO_GGUF_CACHE=DIR holds HF checkpoints converted for chat, perplexity and speed, speed's "
        "dense_eq models and the training corpus (default: $XDG_CACHE_HOME/deco-gguf, else ~/.cache/deco-gguf; "
        "DECO_CORPUS_CACHE=DIR moves the corpus alone).",
        "DECO_FFN=sparse|dense|ops sets the DECO FFN evaluation of llama.cpp's own tools (llama-cli, "
        "llama-server, llama-bench); deco-gguf's commands take --mode instead.",
    ]
)

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
        from ..runtime.version import version_lines

        for line in version_lines():
            console.print(line, highlight=False, soft_wrap=True)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool | None,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Versions of deco-gguf and its llama.cpp, the ggml patches and build flags, and exit.",
        ),
    ] = None,
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


def check_threads(*counts: int | None) -> None:
    """Warn about more threads than cores: ggml's threads wait on each other at every step, and an
    oversubscribed run is slower by orders of magnitude, not by the ratio of threads to cores."""
    from ..runtime.native import available_cores

    cores = available_cores()
    most = max((c for c in counts if c), default=0)
    if most > cores:
        warn(f"--threads {most} is more than the {cores} core(s) this process may use: expect a run many times slower")
