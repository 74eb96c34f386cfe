"""llama.cpp's tools of the patched build, installed beside its libraries: quantization with
llama-quantize's presets and importance matrices from llama-imatrix."""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..model.gguf_file import read_gguf
from ..support.errors import DecoError
from ..support.files import atomic_output, refuse_inputs
from .native import GET_RUNTIME, available_cores, lib_dir, library

# -- quantization ----------------------------------------------------------------------------------

# llama-quantize's presets (the patched build's, installed beside libllama); routers, norms, scales and
# the mean row stay F32 (1-D tensors and ffn_gate_inp are never quantized), and tensors whose rows do not
# fit the preset's block size fall back to a fitting type. The low-bit ones gain most from an imatrix.
PRESETS = (
    "Q4_0",
    "Q5_0",
    "Q8_0",
    "Q2_K",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
    "F16",
    "BF16",
)


KEPT_F32 = ("ffn_gate_inp.weight",)  # the router: 2-D, never quantized by libllama


@dataclass
class Fallback:
    tensor: str
    row: int  # row length
    wanted: str  # the preset's block type that does not fit
    got: str


def _preset_block_type(preset: str) -> gguf.GGMLQuantizationType:
    name = preset.split("_K")[0] + "_K" if "_K" in preset else preset
    return gguf.GGMLQuantizationType[name]


# llama.cpp's quantizer logs "[  12/  57] blk.1.attn_q.weight - [...]" as it starts each tensor;
# its tools prefix log lines with the time and the level ("0.00.040.363 E ").
TENSOR_LOG = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
LOG_PREFIX = re.compile(r"^[\d.]+ [A-Z] ")


def tool(name: str) -> Path:
    """A llama.cpp tool of the patched build, installed beside its libraries."""
    library()
    path = lib_dir() / name
    if not path.is_file():
        raise DecoError(f"{name} is not installed with the runtime: {GET_RUNTIME}")
    return path


def run_tool(args: list, on_line: Callable[[str], None], what: str, env: dict | None = None) -> None:
    """Run a llama.cpp tool, its output line by line to `on_line`; DecoError with its last error line
    when it fails. Interrupted (Ctrl-C, SIGTERM), the tool is stopped too."""
    import subprocess

    lines: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(
        [str(a) for a in args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, **(env or {})},
    )
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            on_line(line)
            if os.environ.get("DECO_VERBOSE"):
                os.write(2, line.encode())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode != 0:
        failed = [line for line in lines if "failed" in line or "error" in line.lower()] or list(lines)[-1:] or [""]
        reason = LOG_PREFIX.sub("", failed[0]).strip()
        raise DecoError(f"{what} failed: {reason or f'exit code {proc.returncode}'}")


def quantize(
    src: str | Path,
    dst: str | Path,
    preset: str,
    n_threads: int | None = None,
    allow_requantize: bool = False,
    imatrix: str | Path | None = None,
    on_tensor: Callable[[int, int, str], None] | None = None,
) -> list[Fallback]:
    """Quantize a DECO GGUF with a llama-quantize preset; the output appears only when complete.

    `allow_requantize` accepts an already quantized input (its quantization errors add up); `imatrix`
    is an importance matrix from `imatrix()`; `on_tensor(i, n, name)` is called as the i-th of n
    tensors starts. Returns the tensors that fell back to another type because their rows do not fit
    the preset's blocks (e.g. 64-wide expert down projections under 256-wide K-quants).
    """
    src, dst = Path(src), Path(dst)
    preset = preset.upper()
    if preset not in PRESETS:
        raise DecoError(f"unknown quantization type {preset!r} (choose from {', '.join(PRESETS)})")
    read_gguf(src)  # a DECO GGUF, or a one-line error
    if imatrix is not None and not Path(imatrix).is_file():
        raise DecoError(f"{imatrix}: file not found")
    refuse_inputs(dst, [src] + ([Path(imatrix)] if imatrix else []))
    binary = tool("llama-quantize")

    def progress(line: str) -> None:
        if on_tensor and (m := TENSOR_LOG.match(line)):
            on_tensor(int(m.group(1)), int(m.group(2)), m.group(3))

    options = (["--allow-requantize"] if allow_requantize else []) + (["--imatrix", imatrix] if imatrix else [])
    with atomic_output(dst) as tmp:
        try:
            run_tool(
                [binary, *options, src, tmp, preset, n_threads or available_cores()], progress, f"quantizing {src}"
            )
        except DecoError as e:
            hint = " (--allow-requantize accepts it, at a cost in quality)" if "requantiz" in str(e) else ""
            raise DecoError(f"{e}{hint}") from None
    wanted = _preset_block_type(preset)
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return [
        Fallback(t.name, int(t.shape[0]), wanted.name, t.tensor_type.name)
        for t in gguf.GGUFReader(dst).tensors
        if len(t.shape) > 1 and int(t.shape[0]) % block and t.tensor_type != wanted and not t.name.endswith(KEPT_F32)
    ]


# -- importance matrix ------------------------------------------------------------------------------


def imatrix(
    model: str | Path,
    text: str | Path,
    out: str | Path,
    ctx_size: int = 512,
    n_threads: int | None = None,
    chunks: int | None = None,
    on_start: Callable[[int], None] | None = None,
) -> None:
    """The importance matrix of `model` on `text` for `quantize(imatrix=...)`, by llama-imatrix (GGUF
    format). Its collector follows the DECO routing: expert e's up and gate projections get statistics
    from the tokens the router sends to e; the down projections, whose inputs exist only inside the
    op, get none (ggml_patches/patches/0006-imatrix-deco.patch). `on_start(chunks)` once it knows."""
    model, text, out = Path(model), Path(text), Path(out)
    read_gguf(model)
    if not text.is_file():
        raise DecoError(f"{text}: file not found")
    refuse_inputs(out, [model, text])
    binary = tool("llama-imatrix")

    def started(line: str) -> None:
        if on_start and (m := re.search(r"computing over (\d+) chunks", line)):
            on_start(int(m.group(1)))

    # llama-imatrix puts 2048 / ctx chunks side by side in one batch and needs that to divide evenly
    batch = 2048 if ctx_size > 2048 or 2048 % ctx_size == 0 else ctx_size
    args = [
        binary,
        "-m",
        model,
        "-f",
        text,
        "--output-format",
        "gguf",
        "-c",
        ctx_size,
        "-b",
        batch,
        "-t",
        n_threads or available_cores(),
    ]
    if chunks:
        args += ["--chunks", chunks]
    with atomic_output(out) as tmp:
        # the DECO op, which the collector reads, is the sparse evaluation's (DECO_FFN=ops would hide it)
        run_tool([*args, "-o", tmp], started, f"computing the importance matrix of {model}", env={"DECO_FFN": "sparse"})
