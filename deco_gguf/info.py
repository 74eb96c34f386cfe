"""What `deco-gguf info` reports for a DECO GGUF file or an HF checkpoint directory."""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from .accounting import Accounting, account
from .config import DecoConfig
from .errors import DecoError

ARCH = "deco"


@dataclass
class TensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # numpy order
    nbytes: int


@dataclass
class ModelInfo:
    path: Path
    kind: str  # "gguf" or "hf"
    config: DecoConfig
    tensors: list[TensorInfo]
    warnings: list[str] = field(default_factory=list)
    chat_templates: list[str] = field(default_factory=list)  # a GGUF's default and named templates

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_by_type(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for t in self.tensors:
            totals[t.type] += t.nbytes
        return dict(totals)

    def accounting(self, activation_rate: float, source: str, context: int | None = None) -> Accounting:
        c = self.config
        return account(
            {t.name: t.shape for t in self.tensors}, c.hidden_size, c.num_layers,
            context or c.context_length, activation_rate, source,
        )


def read_gguf(path: Path) -> ModelInfo:
    """The DecoConfig and tensor table of a DECO GGUF file (read once per version of the file:
    gguf's reader takes a good part of a second over a 73k-token vocabulary)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DecoError(f"{path}: file not found") from None
    return _read_gguf(Path(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=4)
def _read_gguf(path: Path, size: int, mtime_ns: int, inode: int) -> ModelInfo:  # noqa: ARG001 (the cache key)
    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise DecoError(f"{path}: file not found") from None
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise DecoError(f"{path}: not a readable GGUF file ({e})") from None
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != ARCH:
        raise DecoError(f"{path}: not a DECO GGUF (architecture {arch.contents() if arch else None!r})")

    def key(name: str, default=None):
        f = reader.fields.get(f"{ARCH}.{name}")
        if f is not None:
            return f.contents()
        if default is None:
            raise DecoError(f"{path}: missing key {ARCH}.{name}")
        return default

    layer_mask = key("moe_layer_mask")
    config = DecoConfig(
        vocab_size=key("vocab_size"),
        hidden_size=key("embedding_length"),
        num_layers=key("block_count"),
        num_heads=key("attention.head_count"),
        num_kv_heads=key("attention.head_count_kv"),
        head_dim=key("attention.key_length"),
        dense_ffn_size=key("feed_forward_length"),
        moe_layers=[bool(m) for m in layer_mask],
        num_experts=key("expert_count"),
        expert_ffn_size=key("expert_feed_forward_length"),
        shared_ffn_size=key("expert_shared_feed_forward_length"),
        expert_gated=key("expert_gated"),
        expert_act=key("expert_activation"),
        router_act=key("router_activation"),
        router_norm=key("router_norm"),
        expert_bias=key("expert_bias"),
        norm_eps=key("attention.layer_norm_rms_epsilon"),
        rope_theta=key("rope.freq_base"),
        context_length=key("context_length"),
        embedding_scale=key("embedding_scale", 1.0),
        residual_scale=key("residual_scale", 1.0),
        logit_scale=key("logit_scale", 1.0),
    )
    tensors = [
        TensorInfo(t.name, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)), int(t.n_bytes))
        for t in reader.tensors
    ]
    names = {t.name for t in tensors}
    config.tied_embeddings = "output.weight" not in names
    scale = next((t for t in tensors if t.name.endswith("ffn_router_scale.weight")), None)
    config.router_scale_size = math.prod(scale.shape) if scale else 0
    config.validate()
    templates = [f.contents() for name, f in reader.fields.items() if name.startswith("tokenizer.chat_template")]
    return ModelInfo(path, "gguf", config, tensors, chat_templates=templates)


def read_hf(path: Path) -> ModelInfo:
    """The same table for an HF checkpoint, as the converter would write it (F32 = source size)."""
    from .checkpoint import HFCheckpoint
    from .converter import DecoConverter

    converter = DecoConverter(HFCheckpoint(path), outtype="f32")
    tensors = [TensorInfo(p.name, p.qtype.name, p.shape, p.nbytes) for p in converter.tensor_plans()]
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
    from .runtime import DecoRuntime

    with DecoRuntime(path, n_ctx=seq_len, n_batch=seq_len, all_logits=True) as rt:
        ids = rt.llm.tokenize(text.encode("utf-8"), add_bos=False)[:num_tokens]
        if not ids:
            raise DecoError("the text gives no tokens")
        rt.reset_activity()
        for start in range(0, len(ids), seq_len - 1):
            rt.llm.reset()
            rt.llm.eval([rt.llm.token_bos()] + ids[start:start + seq_len - 1])
        return [a.rate if a is not None else None for a in rt.activity()]


def measure_activation_hf(path: Path, text: str, num_tokens: int = 1024, seq_len: int = 256) -> list[float | None]:
    """Per layer: fraction of experts active on `text`, with the reference model (None for dense layers)."""
    from .calibrate import calibration_tokens
    from .reference import DecoModel

    model = DecoModel.from_pretrained(path)
    ids, _ = calibration_tokens(text, model.config.vocab_size, num_tokens, seq_len, Path(path), heldout_tokens=0)
    return model(ids).activation_rate
