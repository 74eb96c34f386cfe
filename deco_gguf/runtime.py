"""Running DECO GGUF files with the patched llama.cpp (through llama-cpp-python).

`pip install .` builds llama.cpp with `ggml_patches/` (scripts/build-runtime.sh, run by
the build backend) and installs llama-cpp-python on top of those libraries, with
llama-quantize, llama-imatrix and ggml-rpc-server beside them. This module is the layer
the CLI uses: open a model (threads, context, sparse/dense evaluation, layers on
rpc-servers), read the per-layer active-expert counters, quantize with llama-quantize's
presets and compute importance matrices.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import DecoError
from .files import atomic_output, refuse_inputs
from .gguf_file import read_gguf
from .rpc import Offload, attach

# How the DECO FFN layers are evaluated (ggml_patches/src/models/deco.h): `sparse` computes the
# active experts only, `dense` every expert with the same op, `ops` plain ggml ops (a dense reference).
# A model reads its mode at load from the `deco.ffn_mode` override (llama.cpp's kv_overrides).
MODES = ("sparse", "dense", "ops")
MODE_KEY = "deco.ffn_mode"

GET_RUNTIME = "run `pip install .` in a deco-gguf source tree (it builds llama.cpp with ggml_patches/)"
GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level (ggml.h)
# Weights are read into memory, not mapped from the file: this project's ggml puts large buffers in huge pages
# (ggml_patches/README.md), which the page cache behind a mapping is not. The output head, the largest matrix
# left unrepacked, is then read from huge pages too: decode on one thread 10-20% faster, on two no change
# (docs/benchmarks.md, "Huge pages"); the repacked weights were copies either way. Every model a comparison loads (the dense Llama, a draft) is loaded the same way.
USE_MMAP = False
_errors: deque[str] = deque(maxlen=8)  # llama.cpp's recent error lines, for one-line messages


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), the default thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def lib_dir() -> Path:
    """Where llama-cpp-python keeps the libraries: our build's libraries and tools when it is the runtime
    wheel scripts/build-runtime.sh packs (ImportError without llama-cpp-python)."""
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def is_patched() -> bool:
    """Whether llama-cpp-python is installed and runs this project's patched llama.cpp (its ggml has the
    DECO op)."""
    try:
        found = sorted(lib_dir().glob("libggml-base.*")) or sorted(lib_dir().glob("ggml-base.*"))
        return bool(found) and hasattr(ctypes.CDLL(str(found[0])), "ggml_deco_moe")
    except (ImportError, OSError):
        return False


def library():
    """libllama as loaded by llama_cpp, with llama.cpp's logs routed; DecoError if it is missing or stock."""
    try:
        import llama_cpp
    except ImportError:
        raise DecoError(f"the patched llama.cpp runtime is not installed: {GET_RUNTIME}") from None
    lib = llama_cpp.llama_cpp._lib
    if not getattr(lib, "_deco_checked", False):
        if not is_patched():
            raise DecoError(f"the installed llama-cpp-python is not the patched DECO build: {GET_RUNTIME}")
        _route_logs(llama_cpp)
        lib._deco_checked = True
    return lib


@functools.lru_cache(maxsize=1)
def ggml_base() -> ctypes.CDLL:
    """libggml-base of the runtime (the one libllama loaded), with the entry points we call typed: the DECO
    op's activity counters (ggml-deco.h, process-wide) and ggml_quantize_chunk."""
    found = sorted(lib_dir().glob("libggml-base.*")) or sorted(lib_dir().glob("ggml-base.*"))
    if not found:
        raise DecoError(f"no libggml-base beside libllama in {lib_dir()}: {GET_RUNTIME}")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_deco_stats_get.argtypes = [ctypes.c_int32, ctypes.POINTER(ctypes.c_int64)]
    lib.ggml_deco_stats_get.restype = ctypes.c_bool
    lib.ggml_deco_stats_n_layers.restype = ctypes.c_int32
    lib.ggml_deco_stats_reset.restype = None
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


def _route_logs(llama_cpp) -> None:
    """Keep llama.cpp quiet; remember its errors so a failure can be told in one line."""
    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):  # noqa: ARG001
        line = text.decode("utf-8", "replace").strip()
        if level == GGML_LOG_LEVEL_ERROR and line:
            _errors.append(line)
        if os.environ.get("DECO_VERBOSE"):
            os.write(2, text)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _route_logs.callback = callback  # keep the ctypes callback alive


def _last_error(default: str) -> str:
    return _errors[-1] if _errors else default


def template_error(template: str) -> str | None:
    """Why llama-cpp-python cannot compile `template`; None when it can."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    try:
        Jinja2ChatFormatter(template=template, eos_token="", bos_token="")
    except Exception as e:  # jinja2.TemplateSyntaxError and friends
        return str(e).splitlines()[0]
    return None


@contextlib.contextmanager
def _chatml_while_loading():
    """llama-cpp-python compiles every chat template of a GGUF while it loads the model, and one that
    does not compile aborts the load; while loading, templates are compiled as ChatML instead. The
    chat session falls back to ChatML the same way, with a warning (chat.ChatFormat)."""
    from llama_cpp import llama_chat_format

    original = llama_chat_format.Jinja2ChatFormatter

    class ChatMLFormatter(original):  # a subclass: the formatter reaches its nested classes through the module
        def __init__(self, template: str, **kwargs):
            super().__init__(llama_chat_format.CHATML_CHAT_TEMPLATE, **kwargs)

    llama_chat_format.Jinja2ChatFormatter = ChatMLFormatter
    try:
        yield
    finally:
        llama_chat_format.Jinja2ChatFormatter = original


@dataclass(frozen=True)
class LayerActivity:
    """What the DECO op counted in one layer: the tokens routed through it and their active experts.

    `a + b` pools two counts of the same layer; `after - before` is what happened between two readings
    of the counters (its min/max per token are unknown: None).
    """

    layer: int
    tokens: int  # tokens routed through this layer
    active: int  # active experts summed over those tokens
    min_active: int | None  # fewest active experts of one token
    max_active: int | None  # most active experts of one token
    num_experts: int

    @property
    def rate(self) -> float:
        return self.active / (self.tokens * self.num_experts) if self.tokens else 0.0

    def __add__(self, other: LayerActivity) -> LayerActivity:
        assert (self.layer, self.num_experts) == (other.layer, other.num_experts)
        if not other.tokens:
            return self
        if not self.tokens:
            return other
        known = None not in (self.min_active, self.max_active, other.min_active, other.max_active)
        return LayerActivity(self.layer, self.tokens + other.tokens, self.active + other.active,
                             min(self.min_active, other.min_active) if known else None,
                             max(self.max_active, other.max_active) if known else None, self.num_experts)

    def __sub__(self, other: LayerActivity) -> LayerActivity:
        assert (self.layer, self.num_experts) == (other.layer, other.num_experts)
        return LayerActivity(self.layer, self.tokens - other.tokens, self.active - other.active, None, None,
                             self.num_experts)


def mean_rate(activity: Iterable[LayerActivity | None]) -> float | None:
    """The mean over the layers that saw tokens of their expert activation rates."""
    rates = [a.rate for a in activity if a is not None and a.tokens]
    return sum(rates) / len(rates) if rates else None


class DecoRuntime:
    """A DECO GGUF loaded by the patched llama.cpp: a `llama_cpp.Llama` plus the DECO switches.

    `mode` (sparse, dense, ops) is fixed per instance: llama.cpp reads it when it builds a graph.
    `exact=True` keeps the KV cache in F32 and flash attention off, for logits comparisons.
    `offload` places layers on rpc-servers of other machines (docs/distributed.md).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        mode: str = "sparse",
        exact: bool = False,
        all_logits: bool = False,
        seed: int = 0,
        offload: Offload | None = None,
    ):
        if mode not in MODES:
            raise DecoError(f"unknown evaluation mode {mode!r} (choose from {', '.join(MODES)})")
        self.path = Path(path)
        self.kv_owner: object | None = None  # the Speculator whose idea of the KV cache is current
        self.info = read_gguf(self.path)  # DecoError for a missing or non-DECO file
        self.lib = library()
        from llama_cpp import GGML_TYPE_F16, GGML_TYPE_F32, Llama

        offload = self.offload = offload or Offload()
        if offload.rpc:
            attach(offload.rpc, lib_dir())

        self.mode = mode
        threads = n_threads or available_cores()
        _errors.clear()
        broken_template = any(template_error(t) for t in self.info.chat_templates)
        try:
            with _chatml_while_loading() if broken_template else contextlib.nullcontext():
                self.llm = Llama(
                    model_path=str(self.path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                    n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False,
                    flash_attn=not exact, type_k=GGML_TYPE_F32 if exact else GGML_TYPE_F16,
                    type_v=GGML_TYPE_F32 if exact else GGML_TYPE_F16, logits_all=all_logits,
                    n_gpu_layers=offload.n_gpu_layers, kv_overrides={MODE_KEY: mode}, use_mmap=USE_MMAP,
                )
        except (ValueError, RuntimeError) as e:
            raise DecoError(f"{self.path}: llama.cpp cannot load it: {_last_error(str(e))}") from None

    @property
    def config(self):
        return self.info.config

    def eval_logits(self, tokens: list[int]) -> np.ndarray:
        """Evaluate `tokens` after what the context holds; the logits of the last position."""
        import llama_cpp

        self.llm.eval(tokens)
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).copy()

    def activity(self) -> list[LayerActivity | None]:
        """Per layer, what the DECO op counted since the last reset (None for dense layers).

        llama.cpp evaluates the last layer only for positions whose logits are requested.
        """
        out = (ctypes.c_int64 * 4)()
        result: list[LayerActivity | None] = []
        for layer, is_moe in enumerate(self.config.moe_layers):
            if not is_moe or not ggml_base().ggml_deco_stats_get(layer, out):
                result.append(None)
                continue
            result.append(LayerActivity(layer, out[0], out[1], out[2], out[3], self.config.num_experts))
        return result

    def reset_activity(self) -> None:
        ggml_base().ggml_deco_stats_reset()

    def mean_activation(self) -> float | None:
        return mean_rate(self.activity())

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "DecoRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- quantization ----------------------------------------------------------------------------------

# llama-quantize's presets (the patched build's, installed beside libllama); routers, norms, scales and
# the mean row stay F32 (1-D tensors and ffn_gate_inp are never quantized), and tensors whose rows do not
# fit the preset's block size fall back to a fitting type. The low-bit ones gain most from an imatrix.
PRESETS = ("Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
           "Q6_K", "IQ4_NL", "IQ4_XS", "F16", "BF16")


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
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env={**os.environ, **(env or {})})
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
            run_tool([binary, *options, src, tmp, preset, n_threads or available_cores()], progress, f"quantizing {src}")
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
    args = [binary, "-m", model, "-f", text, "--output-format", "gguf", "-c", ctx_size, "-b", batch,
            "-t", n_threads or available_cores()]
    if chunks:
        args += ["--chunks", chunks]
    with atomic_output(out) as tmp:
        # the DECO op, which the collector reads, is the sparse evaluation's (DECO_FFN=ops would hide it)
        run_tool([*args, "-o", tmp], started, f"computing the importance matrix of {model}", env={"DECO_FFN": "sparse"})

