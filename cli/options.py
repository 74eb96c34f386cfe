"""Options that the commands running a model share: threads, evaluation mode, layers on rpc-servers
(docs/distributed.md), speculative decoding (docs/speculative.md)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..runtime.native import KV_CACHE_TYPES
from ..runtime.rpc import Offload
from ..support.errors import DecoError
from .app import err_console

# Layers on other machines (docs/distributed.md): the same two options for chat, perplexity and speed.
RpcServers = Annotated[
    str | None,
    typer.Option(
        "--rpc",
        metavar="HOST:PORT[,...]",
        help="Place layers on rpc-servers of other machines (this project's build installs rpc-server); "
        "docs/distributed.md.",
    ),
]
RpcLayers = Annotated[
    int | None,
    typer.Option(
        "--n-gpu-layers",
        "-ngl",
        help="How many layers go to the --rpc servers, the last ones (llama.cpp's -ngl); default: all.",
        min=0,
    ),
]


# Speculative decoding (docs/speculative.md): the same options for chat and speed.
DraftPath = Annotated[
    Path | None,
    typer.Option(
        "--draft",
        "-md",
        help="Speculate with this draft model (GGUF or HF directory): a smaller model with the same vocabulary, "
        "e.g. models/deco-tiny-draft for models/deco-tiny.",
    ),
]
Lookup = Annotated[
    bool,
    typer.Option(
        "--lookup", help="Speculate with n-gram lookup over the prompt and the text so far (no second model)."
    ),
]
DraftMax = Annotated[
    int | None,
    typer.Option(
        "--draft-max",
        help="Most tokens drafted per verification (default 4); each draft is as long as pays, given the "
        "acceptance and the verification times seen so far.",
        min=1,
    ),
]

# Options every command running a model spells the same way.
KvCache = Enum("KvCache", {name: name for name in KV_CACHE_TYPES}, type=str)
CacheType = Annotated[
    KvCache,
    typer.Option(
        "--cache-type",
        "-ctk",
        help="Element type of the KV cache, K and V (llama.cpp's -ctk/-ctv): q8_0 halves the bytes a long "
        "context costs every decoded token, at a small perplexity cost (docs/benchmarks.md).",
    ),
]
Threads = Annotated[int | None, typer.Option("--threads", "-t", help="Threads; default: all cores.", min=1)]
ModelPath = Annotated[
    Path, typer.Argument(help="A DECO GGUF (or an HF checkpoint directory, converted to F16 once and cached).")
]


def status(message: str) -> None:
    err_console.print(f"[dim]{message}[/]", highlight=False)


def speculation_of(draft: Path | None, lookup: bool, draft_max: int | None):
    from ..runtime.speculative import Speculation
    from ..support.cache import resolve_model

    if draft is None and not lookup:
        if draft_max is not None:
            raise DecoError("--draft-max sets how far --draft or --lookup speculates: give one of them")
        return None
    if draft is not None:
        draft = resolve_model(draft, on_status=status)
    return Speculation(draft=draft, lookup=lookup, draft_max=draft_max)


def offload_of(rpc: str | None, layers: int | None) -> Offload:
    if layers is not None and not rpc:
        raise DecoError("--n-gpu-layers places layers on --rpc servers: give --rpc HOST:PORT too")
    return Offload.parse(rpc, layers)


class EvalMode(str, Enum):
    sparse = "sparse"
    dense = "dense"
