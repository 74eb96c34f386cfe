"""What `deco-gguf info` reports for a DECO GGUF file (deco_gguf.model.gguf_file) or an HF checkpoint directory,
and the expert activation it measures on text."""

from __future__ import annotations

from pathlib import Path

from ..model.gguf_file import ModelInfo, TensorInfo, read_gguf
from ..support.errors import DecoError


def read_hf(path: Path) -> ModelInfo:
    """The same table for an HF checkpoint, as the converter would write it (F32 = source size)."""
    from ..converter import DecoConverter
    from ..model.checkpoint import HFCheckpoint

    converter = DecoConverter(HFCheckpoint(path), outtype="f32")
    tensors = [TensorInfo(p.name, p.qtype.name, p.shape, p.nbytes) for p in converter.plans]
    return ModelInfo(path, "hf", converter.config, tensors, converter.warnings)


def read_model(path: str | Path) -> ModelInfo:
    path = Path(path)
    if path.is_dir():
        return read_hf(path)
    if not path.exists():
        raise DecoError(f"{path}: no such file or directory")
    return read_gguf(path)


def measure_activation_gguf(path: Path, text: str, num_tokens: int = 1024, seq_len: int = 256) -> list[float | None]:
    """Per layer: fraction of experts active on `text`, counted by the DECO op of the patched llama.cpp
    (None for dense layers). Rows of `seq_len` tokens starting with BOS, as `measure_activation_hf`; every
    position's logits are requested, so that llama.cpp evaluates the last layer for all of them."""
    from ..runtime.context import DecoRuntime

    with DecoRuntime(path, n_ctx=seq_len, n_batch=seq_len, all_logits=True) as rt:
        ids = rt.llm.tokenize(text.encode("utf-8"), add_bos=False)[:num_tokens]
        if not ids:
            raise DecoError("the text gives no tokens")
        rt.reset_activity()
        for start in range(0, len(ids), seq_len - 1):
            rt.llm.reset()
            rt.llm.eval([rt.llm.token_bos()] + ids[start : start + seq_len - 1])
        return [a.rate if a is not None else None for a in rt.activity()]


def measure_activation_hf(path: Path, text: str, num_tokens: int = 1024, seq_len: int = 256) -> list[float | None]:
    """Per layer: fraction of experts active on `text`, with the reference model (None for dense layers)."""
    from ..fixtures.calibration_text import calibration_tokens
    from ..model.reference import DecoModel

    model = DecoModel.from_pretrained(path)
    ids, _ = calibration_tokens(text, model.config.vocab_size, num_tokens, seq_len, Path(path), heldout_tokens=0)
    return model(ids).activation_rate
