"""Chatting with a DECO model: the layer under `deco-gguf chat`.

The prompt is the GGUF's own chat template (`tokenizer.chat_template`, rendered by llama-cpp-python's
`Jinja2ChatFormatter`; ChatML when the file has none), tokenized as llama.cpp does (the vocabulary's
BOS in front, a BOS the template writes itself is not doubled), and the reply is streamed by
`Llama.create_chat_completion` with llama.cpp's sampler chain (top-k, top-p, min-p, temperature,
repeat penalty). Generation ends on an end-of-generation token (EOS, `<|im_end|>`), at
`max_tokens`, or when the context is full. Before every turn the oldest turns are dropped (the system
prompt is kept) until the prompt leaves room for a reply. The model is a GGUF or an HF checkpoint
directory (deco_gguf.support.cache.resolve_model).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import queue
import random
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..support.errors import DecoError
from .rpc import Offload
from .sampling import Sampling
from .speculative import Speculation

if TYPE_CHECKING:
    from .activity import LayerActivity
    from .speculative import SpecStats

STOP_STRINGS = ["<|im_end|>"]  # besides the end-of-generation token ids llama.cpp knows


def valid_text(text: str) -> str:
    """`text` with bytes that were not UTF-8 (kept by Python as surrogates, e.g. in argv) replaced by
    U+FFFD, so that it can be encoded for the tokenizer."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# -- templates -------------------------------------------------------------------------------------


class ChatFormat:
    """The model's chat template as a llama-cpp-python chat formatter, with llama.cpp's BOS rule.

    A template that does not compile is replaced by ChatML; `warning` says so."""

    def __init__(self, template: str | None, bos: str, eos: str, add_bos: bool):
        from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter

        self.source = "gguf" if template else "chatml (the GGUF has no tokenizer.chat_template)"
        self.warning: str | None = None
        try:
            self.jinja = Jinja2ChatFormatter(template=template or CHATML_CHAT_TEMPLATE, eos_token=eos, bos_token=bos)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            self.source = "chatml (the GGUF's chat template does not compile)"
            self.warning = f"the model's chat template does not compile ({str(e).splitlines()[0]}); using ChatML"
            self.jinja = Jinja2ChatFormatter(template=CHATML_CHAT_TEMPLATE, eos_token=eos, bos_token=bos)
        self.bos, self.add_bos = bos, add_bos

    def render(self, messages: list[dict]) -> str:
        try:
            prompt = self.jinja(messages=messages).prompt
        except Exception as e:  # the template's raise_exception, undefined names
            raise DecoError(f"the model's chat template refuses these messages: {e}") from None
        if self.add_bos and self.bos and prompt.startswith(self.bos):
            prompt = prompt[len(self.bos) :]  # the tokenizer adds it (llama.cpp strips it the same way)
        return prompt

    def __call__(self, *, messages, **kwargs):  # noqa: ARG002  llama_cpp's ChatFormatter protocol passes more
        from llama_cpp.llama_chat_format import ChatFormatterResponse

        return ChatFormatterResponse(prompt=self.render(messages), stop=list(STOP_STRINGS), added_special=False)

    def tokens(self, llm, messages: list[dict]) -> list[int]:
        """Exactly what the chat handler tokenizes (vocabulary BOS added, special tokens parsed)."""
        return llm.tokenize(self.render(messages).encode("utf-8"), add_bos=True, special=True)


# -- sessions --------------------------------------------------------------------------------------


@dataclass
class ReplyStats:
    prompt_tokens: int = 0  # the whole prompt (history included)
    prompt_evaluated: int = 0  # the part not already in the KV cache
    prompt_seconds: float = 0.0
    generated_tokens: int = 0  # sampled, the end-of-generation token included
    decoded_tokens: int = 0  # decoded one at a time (every sampled token but the last)
    decode_seconds: float = 0.0
    wall_seconds: float = 0.0
    first_token_seconds: float | None = None  # request to first token: prompt evaluation and one sample
    finish_reason: str = ""  # stop, length, interrupted
    trimmed_turns: int = 0
    context_used: int = 0
    n_ctx: int = 0
    prompt_activity: list[LayerActivity] | None = None  # DECO layers only
    reply_activity: list[LayerActivity] = field(default_factory=list)
    speculative: SpecStats | None = None  # drafts and verifications, when the session speculates

    @property
    def prompt_tps(self) -> float | None:
        return self.prompt_evaluated / self.prompt_seconds if self.prompt_seconds > 0 else None

    @property
    def decode_tps(self) -> float | None:
        return self.decoded_tokens / self.decode_seconds if self.decode_seconds > 0 else None


class ChatSession:
    """A multi-turn conversation with one model; `reply()` streams the answer to one user turn."""

    def __init__(
        self,
        model: str | Path,
        *,
        system: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        mode: str = "sparse",
        kv_cache: str = "f16",
        sampling: Sampling | None = None,
        offload: Offload | None = None,
        speculation: Speculation | None = None,
    ):
        from .context import DecoRuntime
        from .native import library

        library()  # one error line when the runtime is missing
        import llama_cpp
        from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

        self.sampling = sampling or Sampling()
        if self.sampling.temperature < 0:
            raise DecoError("--temperature must be >= 0")
        self.rt = DecoRuntime(
            model,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_batch=min(512, n_ctx),
            mode=mode,
            kv_cache=kv_cache,
            offload=offload,
        )
        llm = self.llm = self.rt.llm
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        bos_id, eos_id = llm.token_bos(), llm.token_eos()
        bos = llm._model.token_get_text(bos_id) if bos_id >= 0 else ""
        eos = llm._model.token_get_text(eos_id) if eos_id >= 0 else ""
        self.format = ChatFormat(
            llm.metadata.get("tokenizer.chat_template"), bos, eos, bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        )
        llm.chat_handler = chat_formatter_to_chat_completion_handler(self.format)
        self.system = valid_text(system) if system is not None else None
        self.turns: list[tuple[str, str]] = []  # (user, assistant)
        self._rng = random.Random(self.sampling.seed if self.sampling.seed is not None else secrets.randbits(64))
        self.last: ReplyStats | None = None
        self.spec = None  # a Speculator when the session speculates
        if speculation is not None:
            try:
                self.spec = speculation.open(self.rt)
            except BaseException:
                self.rt.close()
                raise

    @property
    def n_ctx(self) -> int:
        # llama.cpp pads the context (to 256); llama-cpp-python's token buffer has the requested size
        return min(self.llm.n_ctx(), len(self.llm.input_ids))

    def messages(self, turns: list[tuple[str, str]], user: str | None = None) -> list[dict]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in turns:
            out += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        if user is not None:
            out.append({"role": "user", "content": user})
        return out

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays); the next reply is a fresh session's."""
        self.turns.clear()
        self.llm.reset()
        self.last = None

    def _reserve(self) -> int:
        """Room kept for the reply when trimming history."""
        m = self.sampling.max_tokens
        return min(m, self.n_ctx // 2) if m > 0 else self.n_ctx // 4

    def _fit(self, user: str) -> tuple[list[dict], list[int], int]:
        """The messages and prompt tokens for this turn, dropping the oldest turns until they fit."""
        dropped = 0
        while True:
            messages = self.messages(self.turns[dropped:], user)
            tokens = self.format.tokens(self.llm, messages)
            if len(tokens) + self._reserve() <= self.n_ctx or dropped == len(self.turns):
                break
            dropped += 1
        if len(tokens) >= self.n_ctx:
            raise DecoError(
                f"the prompt is {len(tokens)} tokens and the context holds {self.n_ctx}: "
                f"shorten the message{' or the system prompt' if self.system else ''}, or raise --ctx-size"
            )
        return messages, tokens, dropped

    def reply(self, user: str) -> Iterator[str]:
        """Stream the reply to `user`; the turn is recorded even when the stream is closed early
        (Ctrl-C): the partial reply joins the history, `last` says `interrupted`."""
        user = valid_text(user)
        messages, prompt, dropped = self._fit(user)
        if dropped:
            del self.turns[:dropped]
        s = self.sampling
        room = self.n_ctx - len(prompt)  # _fit leaves at least one token
        n_predict = min(s.max_tokens, room) if s.max_tokens > 0 else room
        stats = ReplyStats(prompt_tokens=len(prompt), trimmed_turns=dropped, n_ctx=self.n_ctx)
        self.rt.reset_activity()
        start = time.perf_counter()
        stream = (
            self._speculate(prompt, n_predict, stats)
            if self.spec
            else self._complete(messages, prompt, n_predict, stats)
        )
        pieces: list[str] = []
        stats.finish_reason = "interrupted"
        try:
            for text in stream:
                pieces.append(text)
                yield text
        finally:
            with contextlib.suppress(Exception):
                stream.close()
            self.turns.append((user, "".join(pieces)))
            stats.wall_seconds = time.perf_counter() - start
            after = self._activity()
            if stats.prompt_activity is None:  # nothing was generated
                stats.prompt_activity = after
            stats.reply_activity = [a - b for a, b in zip(after, stats.prompt_activity, strict=True)]
            self.last = stats

    def _complete(self, messages: list[dict], prompt: list[int], n_predict: int, stats: ReplyStats) -> Iterator[str]:
        """The reply by llama-cpp-python's chat completion, one decode per token."""
        import llama_cpp

        s = self.sampling
        ctx = self.llm.ctx
        llama_cpp.llama_perf_context_reset(ctx)
        start = time.perf_counter()
        stream = self.llm.create_chat_completion(
            messages=messages,
            stream=True,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            repeat_penalty=s.repeat_penalty,
            seed=self._rng.randrange(2**32),
            max_tokens=n_predict,
        )
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                if stats.prompt_activity is None:
                    stats.first_token_seconds = time.perf_counter() - start
                    stats.prompt_activity = self._activity()  # the prompt is evaluated, the first token sampled
                text = choice["delta"].get("content")
                if text:
                    yield text
                if choice["finish_reason"]:
                    stats.finish_reason = choice["finish_reason"]
        except ValueError as err:  # llama-cpp-python's "Requested tokens exceed context window"
            raise DecoError(str(err)) from None
        finally:
            with contextlib.suppress(Exception):
                stream.close()
            perf = llama_cpp.llama_perf_context(ctx)
            stats.context_used = self.llm.n_tokens
            evaluated = max(0, self.llm.n_tokens - len(prompt))
            stats.generated_tokens = evaluated + (1 if stats.prompt_activity is not None else 0)
            # perf counts a batch of one as a decode: attribute by what this turn evaluated
            stats.decoded_tokens = min(perf.n_eval, evaluated) if evaluated else 0
            stats.decode_seconds = perf.t_eval_ms / 1e3 if stats.decoded_tokens else 0.0
            stats.prompt_evaluated = perf.n_p_eval if perf.t_p_eval_ms > 0 else 0
            stats.prompt_seconds = perf.t_p_eval_ms / 1e3

    def _speculate(self, prompt: list[int], n_predict: int, stats: ReplyStats) -> Iterator[str]:
        """The reply by speculative decoding (deco_gguf.runtime.speculative); its loop runs in a worker thread
        and hands over each run of accepted tokens."""
        import llama_cpp

        sampling = dataclasses.replace(self.sampling, seed=self._rng.randrange(2**32))
        runs: queue.Queue[list[int] | None] = queue.Queue()
        stop = threading.Event()
        outcome: dict = {}

        def on_tokens(run: list[int]) -> bool:
            if stats.prompt_activity is None:
                stats.prompt_activity = self._activity()  # the prompt and the first verification
            runs.put(run)
            return not stop.is_set()

        def work() -> None:
            try:
                outcome["result"] = self.spec.generate(prompt, n_predict, sampling, on_tokens)
            except BaseException as e:  # raised in the consumer below
                outcome["error"] = e
            finally:
                runs.put(None)

        worker = threading.Thread(target=work, name="speculative decoding", daemon=True)
        worker.start()
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two runs
        try:
            while (run := runs.get()) is not None:
                text = utf8.decode(self.llm.detokenize(run))
                if text:
                    yield text
        finally:
            stop.set()
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        tokens, spec = outcome["result"]
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        eog = bool(tokens) and llama_cpp.llama_vocab_is_eog(vocab, tokens[-1])
        stats.finish_reason = "stop" if eog else "length"
        stats.speculative = spec
        stats.prompt_evaluated, stats.prompt_seconds = spec.n_prompt, spec.t_prompt_us / 1e6
        stats.first_token_seconds = spec.t_first_us / 1e6
        stats.generated_tokens = stats.decoded_tokens = spec.n_generated
        stats.decode_seconds = spec.generation_seconds
        stats.context_used = len(prompt) + len(tokens) - 1

    def _activity(self) -> list[LayerActivity]:
        """The DECO op's counters of every DECO layer since the turn began."""
        return [a for a in self.rt.activity() if a is not None]

    def close(self) -> None:
        if self.spec is not None:
            self.spec.close()
            if self.spec.draft_model is not None:
                self.spec.draft_model.close()
        self.rt.close()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
