"""The patched llama.cpp's libraries as this package loads them, and llama.cpp's log lines.

`pip install .` builds llama.cpp with `ggml_patches/` (scripts/build-runtime.sh, run by the build backend)
and installs llama-cpp-python on top of those libraries, with llama-quantize, llama-imatrix and
ggml-rpc-server beside them in llama_cpp's `lib/` folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from pathlib import Path

from ..support.errors import DecoError

GET_RUNTIME = "run `pip install .` in a deco-gguf source tree (it builds llama.cpp with ggml_patches/)"
GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level (ggml.h)
_error_sinks: list[list[str]] = []  # the lists of the `llama_errors()` blocks running now


# Element types of the KV cache (llama.cpp's --cache-type-k/-v, for K and V alike), the default first. Flash
# attention reads F16 and Q8_0 caches directly, and for a few query rows over a long cache (decode) through
# the flash-decoding kernel of this project's ggml (ggml_patches/README.md, patch 0011). Q8_0 halves what a
# decoded token reads from a long cache, at a perplexity cost docs/benchmarks.md measures.
KV_CACHE_TYPES = ("f16", "q8_0", "f32")


def kv_cache_type(name: str) -> int:
    """The ggml type of a KV cache type name; DecoError for another name."""
    import llama_cpp

    if name not in KV_CACHE_TYPES:
        raise DecoError(f"unknown KV cache type {name!r} (choose from {', '.join(KV_CACHE_TYPES)})")
    return getattr(llama_cpp, f"GGML_TYPE_{name.upper()}")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), the default thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def lib_dir() -> Path:
    """Where llama-cpp-python takes the libraries from: LLAMA_CPP_LIB_PATH when set (its own override; e.g. a CUDA
    build's bin folder, scripts/gpu-check.sh), else its lib folder, our build's libraries and tools when it is the
    runtime wheel scripts/build-runtime.sh packs (ImportError without llama-cpp-python)."""
    if override := os.environ.get("LLAMA_CPP_LIB_PATH"):
        return Path(override)
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def runtime_library(name: str) -> Path | None:
    """The runtime's shared library `name` (e.g. "ggml-base": libggml-base.so on Linux), None if absent."""
    found = sorted(lib_dir().glob(f"lib{name}.*")) or sorted(lib_dir().glob(f"{name}.*"))
    return found[0] if found else None


def load_runtime_library(name: str) -> ctypes.CDLL:
    """The runtime's shared library `name`, loaded (the copy libllama uses); DecoError when it is missing."""
    found = runtime_library(name)
    if found is None:
        raise DecoError(f"lib{name} is not installed with the runtime in {lib_dir()}: {GET_RUNTIME}")
    return ctypes.CDLL(str(found))


def is_patched() -> bool:
    """Whether llama-cpp-python is installed and runs this project's patched llama.cpp (its ggml has the
    DECO op)."""
    try:
        found = runtime_library("ggml-base")
        return found is not None and hasattr(ctypes.CDLL(str(found)), "ggml_deco_moe")
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
        lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.llama_attach_threadpool.restype = None
        lib._deco_checked = True
    return lib


@functools.lru_cache(maxsize=1)
def ggml_base() -> ctypes.CDLL:
    """libggml-base of the runtime, with the entry points we call typed: ggml's quantizer, its version and the
    thread pool parameters (the DECO op's activity collector is passed to llama.cpp, never called here)."""
    lib = load_runtime_library("ggml-base")
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_version.restype = ctypes.c_char_p
    lib.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_ThreadpoolParams), ctypes.c_int]
    lib.ggml_threadpool_params_init.restype = None
    return lib


@functools.lru_cache(maxsize=1)
def ggml_cpu() -> ctypes.CDLL:
    """libggml-cpu of the runtime, with its thread pool calls typed."""
    lib = load_runtime_library("ggml-cpu")
    lib.ggml_threadpool_new.argtypes = [ctypes.POINTER(_ThreadpoolParams)]
    lib.ggml_threadpool_new.restype = ctypes.c_void_p
    lib.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    lib.ggml_threadpool_free.restype = None
    return lib


class _ThreadpoolParams(ctypes.Structure):  # struct ggml_threadpool_params (ggml.h, GGML_MAX_N_THREADS 512)
    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class ThreadPool:
    """A ggml thread pool of n_threads for a context to keep (`attach`). Without one, ggml starts and joins its
    threads for every graph it computes: once per decode step, and once per piece when an eval callback (the
    activity counter) cuts the graph at every DECO layer. Close it after the context."""

    def __init__(self, n_threads: int):
        params = _ThreadpoolParams()
        ggml_base().ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        # no polling: a pool's threads sleep as soon as a graph is done, instead of spinning for many
        # milliseconds, so the pools of a target and its draft (or of the runtimes a benchmark takes turns with)
        # never take the cores from each other
        params.poll = 0
        self.handle = ggml_cpu().ggml_threadpool_new(ctypes.byref(params))
        if not self.handle:
            raise DecoError(f"ggml cannot start a pool of {n_threads} threads")

    def attach(self, ctx) -> None:
        """The pool of `ctx` (a llama_context) for its decode and batch graphs."""
        library().llama_attach_threadpool(ctx, self.handle, self.handle)

    def close(self) -> None:
        if self.handle:
            ggml_cpu().ggml_threadpool_free(self.handle)
            self.handle = None


def _route_logs(llama_cpp) -> None:
    """Keep llama.cpp quiet; hand its error lines to the `llama_errors()` blocks running."""

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):  # noqa: ARG001
        line = text.decode("utf-8", "replace").strip()
        if level == GGML_LOG_LEVEL_ERROR and line:
            for sink in _error_sinks:
                sink.append(line)
        if os.environ.get("DECO_VERBOSE"):
            os.write(2, text)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _route_logs.callback = callback  # keep the ctypes callback alive


@contextlib.contextmanager
def llama_errors() -> Iterator[list[str]]:
    """The error lines llama.cpp logs while the block runs, so that a failure can be told in one line.
    llama.cpp's log is one per process: each block gets its own list, and another model's errors from
    before or after it never appear in it."""
    lines: list[str] = []
    _error_sinks.append(lines)
    try:
        yield lines
    finally:
        _error_sinks.remove(lines)
