"""The `serve` command: the patched llama-server with a DECO model (deco_gguf.runtime.server; docs/serving.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import app, check_threads, console, err_console, friendly_errors
from .options import (
    CacheType,
    DraftPath,
    EvalMode,
    KvCache,
    Lookup,
    ModelPath,
    RpcLayers,
    RpcServers,
    Threads,
    offload_of,
    speculation_of,
    status,
)

Host = Annotated[
    str, typer.Option(help="Address to listen on; 0.0.0.0 opens the server to the network (it has no authentication).")
]
Port = Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)]
Parallel = Annotated[
    int, typer.Option("--parallel", "-np", help="Slots: conversations decoded together, each its own context.", min=1)
]
SlotContext = Annotated[
    int | None,
    typer.Option("--ctx", "-c", help="Context per slot in tokens; default: the trained context, at most 4096.", min=16),
]
ServeDraftMax = Annotated[
    int | None,
    typer.Option(
        "--draft-max",
        help="Most tokens drafted per verification (default 4, as chat); llama-server drafts up to it, without "
        "chat's adaptive draft length.",
        min=1,
    ),
]
ServeMode = Annotated[EvalMode, typer.Option(help="DECO FFN evaluation: active experts only, or every expert.")]
LlamaServerArgs = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="[-- LLAMA_SERVER_ARGS...]",
        help="Given to llama-server as they are, after `--` (e.g. -- --api-key KEY --temp 0).",
        show_default=False,
    ),
]


@app.command()
@friendly_errors
def serve(
    model: ModelPath,
    llama_server_args: LlamaServerArgs = None,
    host: Host = "127.0.0.1",
    port: Port = 8080,
    parallel: Parallel = 4,
    ctx: SlotContext = None,
    threads: Threads = None,
    mode: ServeMode = EvalMode.sparse,
    cache_type: CacheType = KvCache.f16,
    draft: DraftPath = None,
    lookup: Lookup = False,
    draft_max: ServeDraftMax = None,
    rpc: RpcServers = None,
    n_gpu_layers: RpcLayers = None,
) -> None:
    """Serve a DECO model over HTTP: an OpenAI-compatible API (/v1/chat/completions, /v1/completions, streaming),
    llama.cpp's web chat at / (when the runtime was built with Node.js), and /metrics, /slots, /props.

    llama-server of the patched build runs it: --parallel slots decode their
    conversations together, each with --ctx tokens of context. With --draft
    or --lookup every slot speculates (docs/speculative.md). /metrics and
    /props report each model's per-layer expert activation and the weight
    bytes read per token, the target's and the draft's apart.

    The URL is printed once the model is loaded; Ctrl-C or SIGTERM stops the
    server after the replies under way are cut off, and deco-gguf exits when
    it has. The exit status is the server's. docs/serving.md has examples.
    """
    from ..model.gguf_file import read_gguf
    from ..runtime.server import ServerOptions, run
    from ..support.cache import resolve_model

    offload = offload_of(rpc, n_gpu_layers)
    speculation = speculation_of(draft, lookup, draft_max)
    check_threads(threads)
    path = resolve_model(model, on_status=status)
    trained_context = read_gguf(path).config.context_length  # a one-line error for anything but a DECO GGUF
    options = ServerOptions(
        path,
        host=host,
        port=port,
        parallel=parallel,
        slot_context=ctx,
        threads=threads,
        mode=mode.value,
        kv_cache=cache_type.value,
        draft=speculation.draft if speculation else None,
        lookup=lookup,
        draft_max=draft_max,
        offload=offload,
        extra=list(llama_server_args or []),
    )
    exit_status, reason = run(options, trained_context, on_ready=lambda: _print_ready(options, path.name))
    if exit_status != 0:  # it stopped by itself: its status is ours (killed by a signal: 128 + the signal)
        err_console.print(f"[bold red]error:[/] llama-server stopped: {reason}", highlight=False)
        raise typer.Exit(exit_status if exit_status > 0 else 128 - exit_status)


def _print_ready(options, name: str) -> None:
    from ..runtime.server import GET_WEB_UI, web_ui_built

    console.print(f"serving {name} at {options.url}", highlight=False, soft_wrap=True)
    web_ui = web_ui_built()
    err_console.print(
        f"[dim]{'web chat and API' if web_ui else 'API only'}: {options.url}/v1 (OpenAI-compatible), "
        f"{options.url}/metrics; {options.parallel} slot(s), {options.mode}; Ctrl-C stops[/]",
        highlight=False,
        soft_wrap=True,
    )
    if not web_ui:
        err_console.print(f"[dim]this runtime has no web chat: {GET_WEB_UI}[/]", highlight=False, soft_wrap=True)
