"""Perplexity of a DECO GGUF on a text file, computed the way `llama-perplexity` computes it.

The method of llama.cpp's tools/perplexity (its default mode, no stride), re-implemented:

- the whole file is read as bytes, one trailing newline dropped (`-f`), and tokenized in one go with
  the vocabulary's special tokens added (a BOS in front when the model adds one) and special-token
  text left as plain text;
- fewer than 2 × n_ctx tokens is an error; otherwise the tokens are cut into floor(n / n_ctx)
  non-overlapping chunks of n_ctx tokens (the tail is dropped), each evaluated from an empty KV cache,
  2048 / n_ctx of them side by side in one decode as separate sequences (llama-perplexity's n_seq);
- when the model adds a BOS, the first token of every chunk is replaced by BOS for the evaluation;
- only the second half of each chunk is scored: the logits at positions n_ctx/2 … n_ctx-2 predict
  the tokens at n_ctx/2+1 … n_ctx-1 (n_ctx - 1 - n_ctx/2 tokens per chunk), so every scored token
  has at least n_ctx/2 tokens of context;
- PPL = exp(mean NLL); the ± is llama.cpp's: sqrt((mean(NLL²) - mean(NLL)²) / (count - 1)) × PPL.

The KV cache and flash attention are llama.cpp's defaults (F16 cache), as in `llama-perplexity`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.native import kv_cache_type
from ..runtime.rpc import Offload
from ..support.errors import DecoError

DEFAULT_BATCH = 2048  # llama-perplexity's -b: with a smaller context, several chunks per decode
MICRO_BATCH = 512  # llama-perplexity's -ub


@dataclass
class PerplexityResult:
    model: str
    text: str
    ctx_size: int
    mode: str
    threads: int
    tokens: int  # the whole text, BOS included
    chunks: int
    scored_tokens: int
    add_bos: bool
    ppl: float
    ppl_error: float  # llama.cpp's "+/-"
    mean_nll: float
    seconds: float
    kv_cache: str = "f16"  # the KV cache's element type
    chunk_ppl: list[float] = field(default_factory=list)  # running PPL after each chunk ([i] in llama.cpp's log)
    activation: list[dict] = field(default_factory=list)  # per DECO layer: layer, tokens, rate
    mean_activation: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.chunks * self.ctx_size / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"tokens_per_second": self.tokens_per_second}


def read_text(path: str | Path) -> bytes:
    """The file as `llama-perplexity -f` reads it: bytes, one trailing newline dropped."""
    path = Path(path)
    if path.is_dir():
        raise DecoError(f"{path}: is a directory, expected a text file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DecoError(f"{path}: file not found") from None
    except OSError as e:
        raise DecoError(f"{path}: cannot read it ({e.strerror})") from None
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data.strip():
        raise DecoError(f"{path}: empty text")
    return data


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, as llama.cpp computes it: exp in float32, sums in float64."""
    m = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=1, dtype=np.float64)) + m[:, 0]
    return lse - logits[np.arange(len(targets)), targets]


def perplexity(
    model: str | Path,
    text_path: str | Path,
    *,
    ctx_size: int = 512,
    n_threads: int | None = None,
    mode: str = "sparse",
    kv_cache: str = "f16",
    n_batch: int = DEFAULT_BATCH,
    on_start: Callable[[int, int], None] | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
    offload: Offload | None = None,
) -> PerplexityResult:
    """llama-perplexity's number for `model` on `text_path` with chunks of `ctx_size` tokens.

    `on_start(chunks, tokens)` is called once the text is tokenized, `on_chunk(i, running_ppl)`
    after each chunk.
    """
    from ..model.gguf_file import read_gguf
    from ..runtime.context import DecoRuntime
    from ..runtime.native import library

    library()  # one error line when the runtime is missing
    import llama_cpp

    if ctx_size < 4:
        raise DecoError(f"--ctx-size {ctx_size} is too small: at least 4 (half of each chunk is scored)")
    read_gguf(Path(model))  # a missing file or a non-DECO GGUF fails here, before the text is read
    text = read_text(text_path)
    # llama-perplexity's layout: n_seq = n_batch / ctx chunks side by side in one decode, each its own
    # sequence in a context of n_seq * ctx tokens; a context over n_batch takes several decodes per chunk.
    n_seq = max(1, n_batch // ctx_size)
    n_batch = min(n_batch, n_seq * ctx_size)
    rt = DecoRuntime(
        model,
        n_ctx=ctx_size,
        n_threads=n_threads,
        n_batch=min(n_batch, ctx_size),
        mode=mode,
        kv_cache=kv_cache,
        offload=offload,
    )
    ctx = None
    try:
        tokens, bos = _tokenize(llama_cpp, rt.llm, text, ctx_size, model, text_path)
        n_chunks = len(tokens) // ctx_size
        if on_start:
            on_start(n_chunks, len(tokens))
        ctx, threads = _context(llama_cpp, rt, n_seq, ctx_size, n_batch, kv_cache)
        decoder = _ChunkDecoder(llama_cpp, ctx, model, n_batch, ctx_size, rt.llm.n_vocab())
        chunks = tokens[: n_chunks * ctx_size].reshape(n_chunks, ctx_size)
        nll, seconds = _timed_score(decoder, rt, chunks, n_seq, bos, on_chunk)
        run = {"model": str(model), "text": str(text_path), "ctx_size": ctx_size, "mode": mode, "threads": threads}
        run["kv_cache"] = kv_cache
        run |= {"tokens": len(tokens), "chunks": n_chunks, "add_bos": bos is not None, "seconds": seconds}
        return _result(rt, nll, **run)
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        rt.close()


def _timed_score(decoder: _ChunkDecoder, rt, chunks: np.ndarray, n_seq: int, bos: int | None, on_chunk):
    """The chunks' NLL (the decoder freed afterwards) with the runtime's activity counted over them alone,
    and the seconds it took."""
    rt.reset_activity()
    start = time.perf_counter()
    try:
        nll = decoder.score(chunks, n_seq, bos, on_chunk)
    finally:
        decoder.free()
    return nll, time.perf_counter() - start


def _result(rt, nll: _Nll, **run) -> PerplexityResult:
    """The result: the `run`'s own fields (model, text, ctx_size, mode, threads, tokens, chunks, add_bos,
    seconds), the perplexity of its NLL and the expert activity the runtime counted."""
    mean, ppl, err = nll.ppl()
    layers = [
        {"layer": a.layer, "tokens": a.tokens, "rate": a.rate} for a in rt.activity() if a is not None and a.tokens
    ]
    return PerplexityResult(
        **run,
        scored_tokens=nll.count,
        ppl=ppl,
        ppl_error=err,
        mean_nll=mean,
        chunk_ppl=nll.chunk_ppl,
        activation=layers,
        mean_activation=rt.mean_activation(),
    )


def _tokenize(llama_cpp, llm, text: bytes, ctx_size: int, model, text_path) -> tuple[np.ndarray, int | None]:
    """The text's tokens (a BOS in front when the model adds one) and the BOS that starts every chunk, or
    None when the model adds none."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    if llama_cpp.llama_vocab_get_add_eos(vocab):
        raise DecoError(f"{model}: the vocabulary adds an EOS to every text; llama-perplexity refuses such models")
    tokens = np.asarray(llm.tokenize(text, add_bos=True, special=False), dtype=np.int32)
    if len(tokens) < 2 * ctx_size:
        raise DecoError(
            f"{text_path}: not enough tokens: the text is {len(tokens)} tokens and a context of "
            f"{ctx_size} needs at least {2 * ctx_size} (context too large for this text: lower --ctx-size)"
        )
    return tokens, llama_cpp.llama_vocab_bos(vocab) if add_bos else None


def _context(llama_cpp, rt, n_seq: int, ctx_size: int, n_batch: int, kv_cache: str):
    """A context of llama.cpp's defaults (flash attention when it applies), as llama-perplexity's, with a
    `kv_cache` KV cache, for n_seq sequences, counting expert activity into the runtime's counter; and its
    thread count."""
    llm = rt.llm
    params = llama_cpp.llama_context_default_params()
    rt.counter.install(params)
    params.n_ctx = n_seq * ctx_size
    params.n_batch = n_batch
    params.n_ubatch = min(MICRO_BATCH, n_batch)
    params.n_seq_max = n_seq
    params.type_k = params.type_v = kv_cache_type(kv_cache)
    params.n_threads = params.n_threads_batch = llm.context_params.n_threads
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if not ctx:
        raise DecoError(f"{rt.path}: llama.cpp cannot create a context of {n_seq} x {ctx_size} tokens")
    return ctx, int(params.n_threads)


@dataclass
class _Nll:
    """Sums over the scored tokens' NLL, and the running PPL after each chunk."""

    total: float = 0.0
    squares: float = 0.0
    count: int = 0
    chunk_ppl: list[float] = field(default_factory=list)

    def add(self, nll: np.ndarray) -> float:
        self.total += float(nll.sum())
        self.squares += float((nll * nll).sum())
        self.count += len(nll)
        self.chunk_ppl.append(math.exp(self.total / self.count))
        return self.chunk_ppl[-1]

    def ppl(self) -> tuple[float, float, float]:
        """Mean NLL, PPL and llama.cpp's ± (module docstring)."""
        mean = self.total / self.count
        var = self.squares / self.count - mean * mean
        ppl = math.exp(mean)
        err = math.sqrt(var / (self.count - 1)) * ppl if var > 0 and self.count > 1 else float("nan")
        return mean, ppl, err


class _ChunkDecoder:
    """Chunks decoded as llama-perplexity does: n_seq side by side, each its own sequence from an empty KV
    cache, logits requested for the scored half only."""

    def __init__(self, llama_cpp, ctx, model, n_batch: int, ctx_size: int, n_vocab: int):
        self.llama_cpp, self.ctx, self.model = llama_cpp, ctx, model
        self.n_batch, self.ctx_size, self.n_vocab = n_batch, ctx_size, n_vocab
        self.first = ctx_size // 2  # the first position whose logits are scored
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        # the batch's token, pos and logits arrays as numpy views; every token has one sequence id
        self.token, self.pos, self.wants_logits = (
            np.ctypeslib.as_array(getattr(self.batch, name), shape=(n_batch,)) for name in ("token", "pos", "logits")
        )
        np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_batch,))[:] = 1
        self.memory = llama_cpp.llama_get_memory(ctx)

    def free(self) -> None:
        self.llama_cpp.llama_batch_free(self.batch)

    def score(self, chunks: np.ndarray, n_seq: int, bos: int | None, on_chunk) -> _Nll:
        """The NLL of the second half of every chunk [n_chunks, ctx_size], n_seq chunks per decode."""
        nll = _Nll()
        scored = self.ctx_size - 1 - self.first  # per chunk
        for i in range(0, len(chunks), n_seq):
            group = chunks[i : i + n_seq].copy()
            if bos is not None:
                group[:, 0] = bos
            for seq, logits in enumerate(self.logits(group, i)):
                # positions first .. n_ctx-2 predict the text's tokens first+1 .. n_ctx-1, never the BOS
                running_ppl = nll.add(_nll(logits[:scored], chunks[i + seq, self.first + 1 :].astype(np.int64)))
                if on_chunk:
                    on_chunk(i + seq, running_ppl)
        return nll

    def logits(self, group: np.ndarray, chunk_index: int) -> list[np.ndarray]:
        """Per sequence of `group`, the logits of its positions from `first` on, in decodes of n_batch tokens."""
        self.llama_cpp.llama_memory_clear(self.memory, True)
        rows: list[list[np.ndarray]] = [[] for _ in group]
        for j in range(0, self.ctx_size, self.n_batch):
            size = min(self.n_batch, self.ctx_size - j)
            n = len(group) * size
            positions = np.arange(j, j + size)
            self.token[:n] = group[:, j : j + size].reshape(-1)
            self.pos[:n] = np.tile(positions, len(group))
            self.wants_logits[:n] = np.tile(positions >= self.first, len(group))
            for k in range(n):
                self.batch.seq_id[k][0] = k // size
            self.batch.n_tokens = n
            rc = self.llama_cpp.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise DecoError(f"{self.model}: llama_decode failed ({rc}) on chunk {chunk_index + 1}")
            per_seq = j + size - max(self.first, j)  # outputs of each sequence in this decode
            if per_seq > 0:
                shape = (len(group) * per_seq * self.n_vocab,)
                out = np.ctypeslib.as_array(self.llama_cpp.llama_get_logits(self.ctx), shape=shape)
                for seq, logits in enumerate(out.reshape(len(group), per_seq, self.n_vocab)):
                    rows[seq].append(logits.copy())
        return [np.concatenate(r) for r in rows]
