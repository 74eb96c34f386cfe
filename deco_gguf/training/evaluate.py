"""Held-out evaluation and generation of a trained model, with the plain reference model as loaded from the
exported HF directory."""

from __future__ import annotations

import math

import torch

from ..model.reference import DecoModel


@torch.no_grad()
def heldout_eval(model: DecoModel, stream: torch.Tensor, ctx: int = 256, max_windows: int | None = None) -> dict:
    """Token-level perplexity and per-layer activation over non-overlapping windows of ctx tokens.

    The held-out stream is cut into consecutive windows of `ctx` tokens; in
    each window every token but the first is predicted from the tokens before
    it in that window (so contexts range from 1 to ctx-1 tokens), and
    ppl = exp(total NLL / number of predicted tokens).
    """
    n_windows = len(stream) // ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    nll, count = 0.0, 0
    act_sum: list[float] | None = None
    for w in range(n_windows):
        ids = stream[w * ctx : (w + 1) * ctx]
        out = model(ids[None])
        logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
        nll -= logp.gather(-1, ids[1:, None]).sum().item()
        count += ctx - 1
        rates = [r for r in out.activation_rate if r is not None]
        act_sum = rates if act_sum is None else [a + b for a, b in zip(act_sum, rates, strict=True)]
    rates = [a / n_windows for a in act_sum] if act_sum else []
    return {
        "tokens_predicted": count,
        "context": ctx,
        "nll": nll / count,
        "ppl": math.exp(nll / count),
        "activation_per_layer": rates,
        "activation_mean": sum(rates) / len(rates) if rates else None,
    }


def unigram_ppl(train: torch.Tensor, heldout: torch.Tensor, vocab: int) -> float:
    """Perplexity of the add-one unigram model of the training tokens on the held-out tokens."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[heldout[1:]].mean().item())


@torch.no_grad()
def generate(
    model: DecoModel, sp, prompt: str, n: int, temperature: float = 0.0, seed: int = 0, top_k: int = 40
) -> str:
    """Greedy (temperature 0) or top-k temperature sampling from the reference model; returns the continuation."""
    ids = [sp.bos_id()] + sp.encode(prompt)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        logits = model(ids[-256:]).logits[0, -1]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            v, i = logits.topk(top_k)
            nxt = int(i[torch.multinomial(torch.softmax(v / temperature, -1), 1, generator=g)])
        if nxt == sp.eos_id():
            break
        ids.append(nxt)
    return sp.decode(ids[1:]).removeprefix(prompt)
