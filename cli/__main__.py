"""`python -m deco_gguf.cli`: the `deco-gguf` command."""

from . import run

run()
