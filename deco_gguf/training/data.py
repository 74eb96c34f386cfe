"""What a training run reads: its SentencePiece tokenizer and the token batches."""

from __future__ import annotations

import io

import torch

from .. import fixtures


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
