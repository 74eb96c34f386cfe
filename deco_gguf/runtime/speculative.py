"""Speculative decoding: a draft proposes tokens, the DECO target verifies them in one batch.

The loop runs in C++ (`libdeco-speculative`, ggml_patches/tools/deco-speculative/, on llama.cpp's own
draft implementations and sampler), called once per generation: Python sees one callback per
verification, not per token. A verification batch of k tokens reads only the union of the experts
its tokens activate (docs/deco.md, "DECO FFN": a batch of tokens), so for DECO it costs less than k
decode steps.

Exact: the target keeps a drafted token only while its own sample at that position equals it, so
greedy output is token for token the autoregressive output, and sampled output follows the target's
distribution (docs/speculative.md).

Drafts:
- `model`: a smaller GGUF with the target's vocabulary (in the DECO family, a smaller DECO);
- `lookup`: n-grams of the prompt and of the text generated so far (llama.cpp's ngram-simple);
- `script`: a given continuation, each token replaced by a wrong one at a set rate; it measures the
  engine independently of how good a draft is (benchmarks/speculative.sh, `deco-gguf speed`).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..support.errors import DecoError
from .context import DecoRuntime, load_llama
from .native import library, load_runtime_library
from .sampling import GREEDY, Sampling

DRAFTS = {"none": 0, "model": 1, "lookup": 2, "script": 3}  # enum deco_spec_draft
DEFAULT_DRAFT_MAX = 4  # tokens drafted per verification unless asked otherwise (no draft: 0)
LOOKUP_N = 3  # n-gram length of the lookup draft


class _Params(ctypes.Structure):
    _fields_ = [
        ("draft", ctypes.c_int32),
        ("n_draft", ctypes.c_int32),
        ("lookup_n", ctypes.c_int32),
        ("script", ctypes.POINTER(ctypes.c_int32)),
        ("n_script", ctypes.c_int32),
        ("script_hit_rate", ctypes.c_float),
        ("script_seed", ctypes.c_uint32),
    ]


class _Sampling(ctypes.Structure):
    _fields_ = [
        ("temp", ctypes.c_float),
        ("top_k", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("min_p", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("seed", ctypes.c_uint32),
    ]


class SpecStats(ctypes.Structure):
    """One generation's counts and times (struct deco_spec_stats)."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "n_prompt",
            "n_generated",
            "n_verify",
            "n_drafted",
            "n_accepted",
            "t_prompt_us",
            "t_first_us",
            "t_draft_us",
            "t_verify_us",
            "t_total_us",
        )
    ]

    @property
    def acceptance(self) -> float | None:
        """Accepted draft tokens over drafted ones."""
        return self.n_accepted / self.n_drafted if self.n_drafted else None

    @property
    def tokens_per_verify(self) -> float | None:
        """Generated tokens per target evaluation (1 without speculation)."""
        return self.n_generated / self.n_verify if self.n_verify else None

    @property
    def generation_seconds(self) -> float:
        return (self.t_total_us - self.t_prompt_us) / 1e6


_TokensCallback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.c_void_p)
_ERR_SIZE = 512


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    library()  # libllama loaded first, with our log routing
    lib = load_runtime_library("deco-speculative")
    lib.deco_spec_init.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.POINTER(_Params),
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.deco_spec_init.restype = ctypes.c_void_p
    lib.deco_spec_generate.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_int32),
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.POINTER(_Sampling),
        _TokensCallback,
        ctypes.c_void_p,
        ctypes.POINTER(SpecStats),
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.deco_spec_generate.restype = ctypes.c_int32
    lib.deco_spec_forget_cache.argtypes = [ctypes.c_void_p]
    lib.deco_spec_forget_cache.restype = None
    lib.deco_spec_set_script.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32]
    lib.deco_spec_set_script.restype = None
    lib.deco_spec_free.argtypes = [ctypes.c_void_p]
    lib.deco_spec_free.restype = None
    return lib


# -- the draft model ---------------------------------------------------------------------------------

SPECIAL_TOKENS = ("bos", "eos", "eot", "sep", "pad", "nl")


def vocabulary_signature(llm) -> dict:
    """What a draft must share with its target: the vocabulary's size and special tokens."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return {"size": llm.n_vocab()} | {name: getattr(llama_cpp, f"llama_vocab_{name}")(vocab) for name in SPECIAL_TOKENS}


def check_draft_vocabulary(target, draft, draft_path: Path) -> None:
    """One error line when the draft's vocabulary size or special tokens differ from the target's."""
    t, d = vocabulary_signature(target), vocabulary_signature(draft)
    differ = [f"{k} {d[k]} vs {t[k]}" for k in t if t[k] != d[k]]
    if differ:
        raise DecoError(
            f"{draft_path}: cannot draft for this model, its vocabulary differs ({', '.join(differ)} in the target)"
        )


class DraftModel:
    """A draft GGUF opened beside a target: a DECO through DecoRuntime (sparse), another architecture
    through llama-cpp-python, same context and threads as the target."""

    def __init__(self, path: str | Path, target: DecoRuntime):
        self.path = Path(path)
        if not self.path.is_file():
            raise DecoError(f"{self.path}: file not found")
        try:
            arch = gguf.GGUFReader(self.path).fields["general.architecture"].contents()
        except (ValueError, OSError, KeyError, IndexError) as e:
            raise DecoError(f"{self.path}: not a readable GGUF file ({e})") from None
        tp = target.llm.context_params
        if arch == "deco":
            self.runtime = DecoRuntime(self.path, n_ctx=target.llm.n_ctx(), n_threads=tp.n_threads, n_batch=tp.n_batch)
            self.llm = self.runtime.llm
        else:
            self.runtime = None
            self.llm = load_llama(self.path, n_ctx=target.llm.n_ctx(), n_threads=tp.n_threads, n_batch=tp.n_batch)
        try:
            check_draft_vocabulary(target.llm, self.llm, self.path)
        except DecoError:
            self.close()
            raise

    def close(self) -> None:
        (self.runtime or self.llm).close()


# -- the engine --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speculation:
    """What `chat` and `speed` speculate with: a draft model (a GGUF path) or n-gram lookup."""

    draft: Path | None = None
    lookup: bool = False
    draft_max: int | None = None  # None: DEFAULT_DRAFT_MAX

    def __post_init__(self):
        if (self.draft is None) == (not self.lookup):
            raise DecoError("speculate with a draft model (--draft) or with lookup (--lookup), one of the two")

    @property
    def kind(self) -> str:
        return "model" if self.draft is not None else "lookup"

    def describe(self) -> str:
        return f"draft {self.draft.name}" if self.draft is not None else "lookup"

    def open(self, target: DecoRuntime) -> Speculator:
        """A Speculator on `target`; the caller closes its `draft_model` after it."""
        draft_model = DraftModel(self.draft, target) if self.draft is not None else None
        try:
            return Speculator(target, self.kind, n_draft=self.draft_max, draft_model=draft_model)
        except BaseException:
            if draft_model is not None:
                draft_model.close()
            raise


class Speculator:
    """Generation on `target` with one kind of draft (DRAFTS); the KV cache is shared between calls,
    so a prompt that extends the previous one (a chat) is evaluated only from where it differs. Like
    the target, the draft model stays open when the Speculator closes.

    The engine owns the target's (and draft's) KV cache from here on: do not evaluate on
    `target.llm` directly while a Speculator is open on it. Several Speculators may share a target
    (and a draft model): one whose caches another has used since its last call starts afresh.
    """

    def __init__(
        self,
        target: DecoRuntime,
        draft: str = "none",
        *,
        n_draft: int | None = None,
        draft_model: DraftModel | None = None,
        lookup_n: int = LOOKUP_N,
        script: Sequence[int] = (),
        hit_rate: float = 1.0,
        seed: int = 0,
    ):
        if draft not in DRAFTS:
            raise DecoError(f"unknown draft {draft!r} (choose from {', '.join(DRAFTS)})")
        if (draft == "model") != (draft_model is not None):
            raise DecoError("a draft model is needed for, and only for, draft='model'")
        if n_draft is None:
            n_draft = 0 if draft == "none" else DEFAULT_DRAFT_MAX
        if n_draft < 0 or (n_draft == 0 and draft != "none"):
            raise DecoError("--draft-max must be at least 1")
        if not 0.0 <= hit_rate <= 1.0:
            raise DecoError("the script's hit rate must be within [0, 1]")
        self.target, self.draft, self.n_draft, self.draft_model = target, draft, n_draft, draft_model
        self._script = (ctypes.c_int32 * len(script))(*script)
        params = _Params(DRAFTS[draft], n_draft, lookup_n, self._script, len(script), hit_rate, seed)
        err = ctypes.create_string_buffer(_ERR_SIZE)
        handle = _lib().deco_spec_init(
            target.llm.ctx, draft_model.llm.ctx if draft_model else None, ctypes.byref(params), err, _ERR_SIZE
        )
        if not handle:
            raise DecoError(f"speculative decoding cannot start: {err.value.decode(errors='replace')}")
        self._handle = handle
        target.kv_owner = self  # the engine has just emptied the caches

    def set_script(self, script: Sequence[int]) -> None:
        """draft='script': the continuation the next generations propose from."""
        _lib().deco_spec_set_script(self._handle, (ctypes.c_int32 * len(script))(*script), len(script))

    def generate(
        self,
        prompt: Sequence[int],
        n_predict: int,
        sampling: Sampling = GREEDY,
        on_tokens: Callable[[list[int]], bool | None] | None = None,
    ) -> tuple[list[int], SpecStats]:
        """Up to `n_predict` tokens after `prompt` (ending early at an end-of-generation token, which is
        included); `on_tokens(run)` gets each run of accepted tokens and may return False to stop.
        `sampling.max_tokens` is not read (n_predict is the budget); a seed of None is 0."""
        tokens: list[int] = []
        raised: list[BaseException] = []

        @_TokensCallback
        def callback(data, n, _user):
            run = data[:n]
            tokens.extend(run)
            try:
                return on_tokens is None or on_tokens(run) is not False
            except BaseException as e:  # Ctrl-C in a chat: stop here, raise once the engine has returned
                raised.append(e)
                return False

        if self.target.kv_owner is not self:  # another Speculator on this target evaluated since our last call
            _lib().deco_spec_forget_cache(self._handle)
            self.target.kv_owner = self
        s = sampling
        c_sampling = _Sampling(s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty, (s.seed or 0) % 2**32)
        c_prompt = (ctypes.c_int32 * len(prompt))(*prompt)
        stats = SpecStats()
        err = ctypes.create_string_buffer(_ERR_SIZE)
        rc = _lib().deco_spec_generate(
            self._handle,
            c_prompt,
            len(prompt),
            n_predict,
            ctypes.byref(c_sampling),
            callback,
            None,
            ctypes.byref(stats),
            err,
            _ERR_SIZE,
        )
        if raised:
            raise raised[0]
        if rc != 0:
            raise DecoError(f"speculative generation failed: {err.value.decode(errors='replace')}")
        return tokens, stats

    def close(self) -> None:
        if self._handle:
            _lib().deco_spec_free(self._handle)
            self._handle = None

    def __enter__(self) -> Speculator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
