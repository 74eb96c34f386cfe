"""What `deco-gguf speed` prints: the tables of a speed report (sparse/dense/dense_eq at every thread count and
depth, the bytes read per token, the ratios beside the bound) and of a speculative report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.table import Table

from .app import console, warn

# The series of a sparse/dense measurement: (model, mode) -> its name in the tables.
SERIES_NAMES = {("deco", "sparse"): "DECO sparse", ("deco", "dense"): "DECO dense", ("dense_eq", "dense"): "dense_eq"}


def print_speculative(report, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"model": report.model, "speculative": report.as_dict()}, indent=2))
        return
    title = (
        f"Speculative decoding on {report.model}: greedy, {report.passages} passage(s) of "
        f"depth+{report.prompt}+{report.tg} tokens, draft max {report.draft_max}, {report.kv_cache} KV cache, "
        "median t/s"
    )
    table = Table(
        "threads",
        "depth",
        "",
        "t/s",
        "× sparse",
        "× dense",
        "acceptance",
        "tokens / verification",
        "verification cost",
        title=title,
        title_justify="left",
    )
    for r in report.as_dict()["results"]:
        speculating = r["name"] not in ("sparse", "dense")
        name = r["name"] if speculating else f"autoregressive {r['name']}"
        speedups = [f"{r['median']:,.1f}", f"{r['speedup_vs_sparse']:.2f}", f"{r['speedup_vs_dense']:.2f}"]
        if speculating:
            acceptance = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
            verification = [acceptance, f"{r['tokens_per_verify']:.2f}", f"{r['verify_cost_steps']:.2f} steps"]
        else:
            verification = ["", "", ""]
        table.add_row(str(r["threads"]), str(r["depth"]), name, *speedups, *verification)
    console.print(table)
    console.print(
        "[dim]every configuration generated the same tokens; verification cost: a verification's time over "
        "one autoregressive sparse step[/]",
        highlight=False,
    )


def print_speed(report, path: Path, pp: int, tg: int, repetitions: int) -> None:
    _print_speed_table(report, path, pp, tg, repetitions)
    _print_weight_bytes(report)
    _print_ratios(report)
    noisy = report.noisy()
    if noisy:
        which = ", ".join(f"{SERIES_NAMES[(s.model, s.mode)]} t{s.threads} {s.test}" for s in noisy)
        warn(
            f"{len(noisy)} configuration(s) varied by more than 1.5x between runs ({which}): the machine was busy; "
            "trust those ratios less, or raise --repetitions"
        )
    if report.dense_eq is not None:
        e = report.dense_eq
        substituted = f" (substituted for {e.substituted})" if e.substituted else ""
        note = f"; types {e.types['ffn']} FFN, {e.types['attn_q']} attention{substituted}"
        console.print(
            f"dense_eq: FFN width {e.ffn_width}, N {e.params / 1e6:.3f} M vs DECO {e.deco_params / 1e6:.3f} M{note}",
            highlight=False,
        )


def _print_speed_table(report, path: Path, pp: int, tg: int, repetitions: int) -> None:
    """Tokens/s of every series at every depth, and the time to first token."""

    def cells(s) -> list[str]:
        return [f"{s.median:,.1f}", f"[dim]{min(s.samples):,.0f}-{max(s.samples):,.0f}[/]"] if s else ["-", ""]

    table = Table(
        "threads",
        "depth",
        "",
        f"pp{pp} t/s",
        "min-max",
        f"tg{tg} t/s",
        "min-max",
        title=f"Speed of {path.name}: median of {repetitions} interleaved runs, {report.kv_cache} KV cache",
        title_justify="left",
    )
    for t in report.threads:
        for depth in report.depths:
            for (m, md), name in SERIES_NAMES.items():
                if report.find(m, md, t, "tg", depth):
                    pp_cells, tg_cells = (
                        cells(report.find(m, md, t, "pp", depth)),
                        cells(report.find(m, md, t, "tg", depth)),
                    )
                    table.add_row(str(t), str(depth), name, *pp_cells, *tg_cells)
    console.print(table)
    first_tokens = ", ".join(
        f"{SERIES_NAMES[(s.model, s.mode)]} t{s.threads}{f' d{s.depth}' if s.depth else ''} "
        f"{statistics.median(s.first_token_ms):,.1f} ms"
        for s in report.series
        if s.test == "pp"
    )
    console.print(f"time to first token (pp{pp} prompt, then one decode): {first_tokens}", highlight=False)


def _print_weight_bytes(report) -> None:
    """The activation measured and the bytes each decoded token reads: weights, and the KV cache at depth."""
    b = report.bytes
    layers = ", ".join(f"L{k} {v:.1%}" for k, v in sorted(report.layer_rates.items()))
    console.print(f"expert activation (sparse tg): mean {report.mean_rate:.1%} ({layers})", highlight=False)
    table = Table(
        "", "MiB / decoded token", title="Bytes read per decoded token", title_justify="left", show_header=False
    )
    non_expert = "non-expert weights" + (" (embedding: one row)" if b.embedding_row_only else "")
    table.add_row(non_expert, f"{b.non_expert / 2**20:.3f}")
    table.add_row("routed experts, all", f"{b.expert / 2**20:.3f}")
    table.add_row("DECO sparse weights (at the measured rate)", f"{report.sparse_bytes / 2**20:.3f}")
    table.add_row("DECO dense weights", f"{b.dense / 2**20:.3f}")
    if report.dense_eq_bytes:
        table.add_row("dense_eq weights", f"{report.dense_eq_bytes / 2**20:.3f}")
    per_position = report.kv_bytes_per_position
    for depth in report.depths:
        where = f"depth {depth}, tg{report.tg}: {depth + (report.tg + 1) / 2:,.0f} positions × {per_position:,} B"
        table.add_row(f"{report.kv_cache} KV cache ({where})", f"{report.kv_bytes(depth) / 2**20:.3f}")
    console.print(table)


def _print_ratios(report) -> None:
    """The measured speed-ups of sparse decoding beside the bytes bound."""
    table = Table(
        "threads",
        "depth",
        "tg sparse/dense",
        "bound",
        "pp sparse/dense",
        title="Speed-up of DECO sparse: measured vs the bytes bound (weights + KV cache)",
        title_justify="left",
    )
    has_eq = report.dense_eq is not None
    if has_eq:
        table.add_column("tg vs dense_eq")
        table.add_column("bound")

    def fmt(v: float | None) -> str:
        return f"{v:.2f}x" if v is not None else "-"

    for r in report.ratios():
        row = [str(r["threads"]), str(r["depth"]), fmt(r["sparse_over_dense_tg"]), fmt(r["bound"])]
        row.append(fmt(r["sparse_over_dense_pp"]))
        if has_eq:
            row += [fmt(r["sparse_over_dense_eq_tg"]), fmt(r["bound_vs_dense_eq"])]
        table.add_row(*row)
    console.print(table)
    if any(r["sparse_over_dense_tg"] and r["sparse_over_dense_tg"] > 1.05 * r["bound"] for r in report.ratios()):
        console.print(
            "[dim]measured above the bound: decode time here is not set by the bytes read alone (compute "
            "and per-expert overheads, which skipped experts also save, count too)[/]",
            highlight=False,
        )
