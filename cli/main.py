"""The `deco-gguf` command line: the Typer app (cli/app.py) and its commands, imported in the order --help
lists them (importing a module registers its commands)."""

from . import (
    inspect_cmds,  # noqa: F401  info, fixture
    model_files,  # noqa: F401  convert, quantize, imatrix
    run_cmds,  # noqa: F401  chat, perplexity
    serve_cmd,  # noqa: F401  serve
    speed_cmd,  # noqa: F401  speed
)
from .app import app

if __name__ == "__main__":
    app()
