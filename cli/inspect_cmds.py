"""Commands that describe models: info, and fixture (random checkpoints in the released layouts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..support.errors import DecoError
from .app import app, console, friendly_errors, warn


@app.command()
@friendly_errors
def info(
    model: Annotated[Path, typer.Argument(help="A DECO GGUF file or an HF checkpoint directory.")],
    activation_rate: Annotated[
        float | None,
        typer.Option(
            help="Fraction of routed experts active per token, for N_a and R_c; default 0.2 (assumed).",
            min=0.0,
            max=1.0,
        ),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(
            help="Context length for the attention term of the compute estimate; default: the model's.", min=1
        ),
    ] = None,
    measure: Annotated[
        Path | None,
        typer.Option(
            help="Measure the per-layer activation rate on this text file and use it for N_a: a GGUF runs in "
            "the patched llama.cpp, an HF checkpoint in the PyTorch reference model.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
) -> None:
    """Architecture, tensor types and sizes, and resource accounting (N, N_a, r_a, R_c)."""
    from ..measure.info import measure_activation_gguf, measure_activation_hf, read_model

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
    gated = "gated" if c.expert_gated else "non-gated"
    scale = f" (scale [{c.router_scale_size}])" if c.router_scale_size else ""
    tied = " (tied embeddings)" if c.tied_embeddings else ""
    rows = [
        ("layers", f"{c.num_layers} ({len(dense)} dense {dense}, {len(moe)} DECO)"),
        ("hidden size d", str(c.hidden_size)),
        (
            "attention",
            f"{c.num_heads} heads × {c.head_dim}, {c.num_kv_heads} KV groups, rope θ {c.rope_theta:g} (NeoX)",
        ),
        ("dense FFN", f"SwiGLU {c.dense_ffn_size}" if dense else "none"),
        ("experts", f"E {c.num_experts} × De {c.expert_ffn_size}, {gated}, {c.expert_act}"),
        ("shared expert", f"SwiGLU {c.shared_ffn_size}" if c.shared_ffn_size else "none"),
        ("router", f"{c.router_act}, norm {c.router_norm}{scale}, expert bias {c.expert_bias}"),
        ("norm eps", f"{c.norm_eps:g}"),
        ("mup scales", f"embedding ×{c.embedding_scale:g}, residual ×{c.residual_scale:g}, logits ÷{c.logit_scale:g}"),
        ("vocab / context", f"{c.vocab_size} / {c.context_length}{tied}"),
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
    name: Annotated[
        str | None,
        typer.Argument(help="A variant (small, for tests) or a preset (deco-0.1b, deco-0.5b: released shapes)."),
    ] = None,
    out_dir: Annotated[Path | None, typer.Argument(help="Directory to write the checkpoint into.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
    calibrate: Annotated[
        float | None,
        typer.Option(
            help="Calibrate the routers so that about this fraction of experts is active on ordinary text "
            "(e.g. 0.2), and report the measured rates.",
            min=0.01,
            max=0.99,
        ),
    ] = None,
    list_all: Annotated[bool, typer.Option("--list", help="List the variants and presets.")] = False,
) -> None:
    """Write a random DECO checkpoint in the exact released Hugging Face layout.

    The config carries the released inconsistencies (stale HF-style keys) and a
    real SentencePiece tokenizer with the ChatML tokens; for tests and benchmarks.
    """
    from .. import fixtures

    if list_all:
        table = Table(
            "name", "layers", "d", "experts", "De", "weights", "dtype", title="Fixtures", title_justify="left"
        )
        for spec in [*fixtures.VARIANTS.values(), *fixtures.PRESETS.values()]:
            sizes = (spec.num_layers, spec.hidden_size, spec.num_experts, spec.expert_ffn)
            table.add_row(spec.name, *map(str, sizes), spec.weight_format, spec.dtype)
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
        from ..fixtures.calibrate import calibrate_routers

        with console.status(f"calibrating routers to {calibrate:.0%} activation"):
            report = calibrate_routers(path, calibrate)
        console.print(report.summary())
