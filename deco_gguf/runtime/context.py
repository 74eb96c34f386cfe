"""A DECO GGUF loaded by the patched llama.cpp (through llama-cpp-python): the layer the CLI uses to open
a model with its threads, context, sparse/dense evaluation and layers on rpc-servers, and to read the expert
activity it counted."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ..model.gguf_file import read_gguf
from ..support.errors import DecoError
from .activity import ActivityCounter, LayerActivity, mean_rate
from .native import ThreadPool, available_cores, kv_cache_type, lib_dir, library, llama_errors
from .rpc import Offload, attach

# How the DECO FFN layers are evaluated (ggml_patches/src/models/deco.h): `sparse` computes the
# active experts only, `dense` every expert with the same op, `ops` plain ggml ops (a dense reference).
# A model reads its mode at load from the `deco.ffn_mode` override (llama.cpp's kv_overrides).
MODES = ("sparse", "dense", "ops")
MODE_KEY = "deco.ffn_mode"
# Weights are read into memory, not mapped from the file: this project's ggml puts large buffers in huge pages
# (ggml_patches/README.md), which the page cache behind a mapping is not. The output head, the largest matrix
# left unrepacked, is then read from huge pages too: decode on one thread 10-20% faster, on two no change
# (docs/benchmarks.md, "Huge pages"); the repacked weights were copies either way. Every model a comparison
# loads (the dense Llama, a draft) is loaded the same way.
USE_MMAP = False


def load_llama(
    path: Path, *, n_ctx: int, n_threads: int, n_batch: int, exact: bool = False, kv_cache: str = "f16", **options
):
    """A GGUF of any architecture through llama-cpp-python, loaded as every model of a comparison is (into
    memory, `n_batch`-token ubatches, a `kv_cache` KV cache and flash attention; `exact`: an F32 cache and
    attention without flash attention); DecoError with llama.cpp's own reason when it cannot be loaded."""
    from llama_cpp import Llama

    kv_type = kv_cache_type("f32" if exact else kv_cache)
    with llama_errors() as errors:
        try:
            return Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=False,
                flash_attn=not exact,
                type_k=kv_type,
                type_v=kv_type,
                use_mmap=USE_MMAP,
                **options,
            )
        except (ValueError, RuntimeError) as e:
            raise DecoError(f"{path}: llama.cpp cannot load it: {errors[-1] if errors else e}") from None


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
        def __init__(self, template: str, **kwargs):  # noqa: ARG002  the template that does not compile
            super().__init__(llama_chat_format.CHATML_CHAT_TEMPLATE, **kwargs)

    llama_chat_format.Jinja2ChatFormatter = ChatMLFormatter
    try:
        yield
    finally:
        llama_chat_format.Jinja2ChatFormatter = original


class DecoRuntime:
    """A DECO GGUF loaded by the patched llama.cpp: a `llama_cpp.Llama` plus the DECO switches.

    `mode` (sparse, dense, ops) is fixed per instance: llama.cpp reads it when it builds a graph.
    `kv_cache` is the KV cache's element type (KV_CACHE_TYPES); `exact=True` keeps it in F32 with flash
    attention off, for logits comparisons.
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
        kv_cache: str = "f16",
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
        offload = self.offload = offload or Offload()
        if offload.rpc:
            attach(offload.rpc, lib_dir())

        self.mode = mode
        threads = n_threads or available_cores()
        self.counter = ActivityCounter(self.config.moe_layers, self.config.num_experts)
        broken_template = any(template_error(t) for t in self.info.chat_templates)
        with _chatml_while_loading() if broken_template else contextlib.nullcontext(), self._counting_contexts():
            self.llm = load_llama(
                self.path,
                n_ctx=n_ctx,
                n_threads=threads,
                n_batch=n_batch,
                exact=exact,
                kv_cache=kv_cache,
                seed=seed,
                logits_all=all_logits,
                n_gpu_layers=offload.n_gpu_layers,
                kv_overrides={MODE_KEY: mode},
            )
        self.threads = ThreadPool(threads)
        self.threads.attach(self.llm.ctx)

    @contextlib.contextmanager
    def _counting_contexts(self):
        """While it runs, the contexts llama-cpp-python creates count into this runtime's counter:
        llama-cpp-python builds its context parameters inside `Llama()`, from llama_context_default_params."""
        from llama_cpp import llama_cpp

        default_params = llama_cpp.llama_context_default_params

        def counting_params():
            params = default_params()
            self.counter.install(params)
            return params

        llama_cpp.llama_context_default_params = counting_params
        try:
            yield
        finally:
            llama_cpp.llama_context_default_params = default_params

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
        """Per layer, what this model's context counted since the last reset (None for dense layers).

        llama.cpp evaluates the last layer only for positions whose logits are requested.
        """
        return self.counter.read()

    def reset_activity(self) -> None:
        self.counter.reset()

    def mean_activation(self) -> float | None:
        return mean_rate(self.activity())

    def close(self) -> None:
        self.llm.close()
        self.threads.close()  # after the context that used it

    def __enter__(self) -> DecoRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
