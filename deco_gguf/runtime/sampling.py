"""How a reply is sampled: llama.cpp's sampler chain (repeat penalty, top-k, top-p, min-p, temperature)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """llama.cpp's defaults (llama-cli): temperature 0 is greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None  # None: a random seed (a chat), or 0 where a generation needs a fixed one
    max_tokens: int = 512  # <= 0: until end of generation or a full context


GREEDY = Sampling(temperature=0.0, top_k=1)  # the argmax (top-k 1 spares sorting the vocabulary)
