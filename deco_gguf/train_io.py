"""What a training run (deco_gguf.train) reads and writes: its tokenizer and token batches, the held-out
evaluation with the reference model, and the export in the released Hugging Face layout."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import fixtures
from .reference import DecoModel

if TYPE_CHECKING:
    from .train import Shape, TrainableDeco


# --------------------------------------------------------------------------
# Tokenizer and data
# --------------------------------------------------------------------------


def train_tokenizer(sentences: list[str], vocab_size: int) -> bytes:
    """SentencePiece BPE with the fixtures' settings (byte fallback, unk 0 / bos 1 / eos 2, ChatML symbols)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    args = dict(fixtures.SP_TRAIN_ARGS)
    args.update(vocab_size=vocab_size, num_threads=1)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, **args)
    return buf.getvalue()


def token_stream(sp, documents: list[str]) -> torch.Tensor:
    """bos + tokens + eos for every document, concatenated (int64)."""
    ids: list[int] = []
    for doc in documents:
        ids.append(sp.bos_id())
        ids.extend(sp.encode(doc))
        ids.append(sp.eos_id())
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(stream: torch.Tensor, batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
    return torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])


# --------------------------------------------------------------------------
# Evaluation (with the plain reference model, as loaded from the HF directory)
# --------------------------------------------------------------------------


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
        act_sum = rates if act_sum is None else [a + b for a, b in zip(act_sum, rates)]
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
def generate(model: DecoModel, sp, prompt: str, n: int, temperature: float = 0.0, seed: int = 0, top_k: int = 40) -> str:
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


# --------------------------------------------------------------------------
# Export in the released layout
# --------------------------------------------------------------------------


def export(model: TrainableDeco, shape: Shape, tokenizer: bytes, out: Path, dtype: str = "bfloat16") -> Path:
    """Write model.safetensors, config.json (Megatron + template keys), tokenizer files: the released layout."""
    spec = shape.fixture_spec(dtype)
    sd = model.state_dict_hf(fixtures.DTYPES[dtype])
    fixtures.write_fixture(out, spec, state_dict_hook=lambda _spec, _sd: sd, tokenizer_model=tokenizer)
    make_hf_keys_consistent(out, shape, dtype)
    return out


def make_hf_keys_consistent(out: Path, shape: Shape, dtype: str) -> None:
    """Give config.json's HF-style keys this model's values.

    fixtures.hf_config reproduces the released files, whose HF-style keys are
    stale MiniCPM template values (docs/deco.md, "Released checkpoints"); the converter
    then warns about each one. The bundled model keeps both key families but
    makes them agree, so converting it prints no warnings. eos ids: </s> and
    <|im_end|>, as the released [2, 73440] are.
    """
    sp = fixtures.sp_processor((out / "tokenizer.model").read_bytes())
    eos = [sp.eos_id(), sp.piece_to_id(fixtures.CHATML_TOKENS[1])]
    path = out / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.update(
        num_hidden_layers=shape.num_layers,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.dense_ffn,
        vocab_size=sp.get_piece_size(),
        rms_norm_eps=cfg["norm_epsilon"],
        rope_scaling=None,
        max_position_embeddings=4096,
        eos_token_id=eos,
        torch_dtype=dtype,
    )
    fixtures.dump_json(path, cfg, indent=4)
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8"))
    gen["eos_token_id"] = eos
    fixtures.dump_json(gen_path, gen, indent=2)
