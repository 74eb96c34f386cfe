"""DECO GGUF files: the architecture's key names, and `read_gguf`: a file's DecoConfig and tensor table.

The converter writes with these names and gguf's (gguf.Keys), the runtime and `deco-gguf info` read them
here; the C++ side (ggml_patches/src/models/deco.cpp) reads the same list, documented in
docs/gguf-format.md.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..support.errors import DecoError
from .accounting import Accounting, account
from .config import DecoConfig
from .layout import gguf_name, kind_of

ARCH = "deco"
# This architecture's own keys (docs/gguf-format.md); the others are gguf's (gguf.Keys), written through
# GGUFWriter's helpers
KEY_MOE_LAYER_MASK = f"{ARCH}.moe_layer_mask"
KEY_EXPERT_GATED = f"{ARCH}.expert_gated"
KEY_EXPERT_ACTIVATION = f"{ARCH}.expert_activation"
KEY_ROUTER_ACTIVATION = f"{ARCH}.router_activation"
KEY_ROUTER_NORM = f"{ARCH}.router_norm"
KEY_EXPERT_BIAS = f"{ARCH}.expert_bias"


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
            {t.name: t.shape for t in self.tensors},
            c.hidden_size,
            c.num_layers,
            context or c.context_length,
            activation_rate,
            source,
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

    def key(name: str, default=None):  # name: one of ours, or a gguf.Keys template
        name = name.format(arch=ARCH)
        f = reader.fields.get(name)
        if f is not None:
            return f.contents()
        if default is None:
            raise DecoError(f"{path}: missing key {name}")
        return default

    K = gguf.Keys
    config = DecoConfig(
        vocab_size=key(K.LLM.VOCAB_SIZE),
        hidden_size=key(K.LLM.EMBEDDING_LENGTH),
        num_layers=key(K.LLM.BLOCK_COUNT),
        num_heads=key(K.Attention.HEAD_COUNT),
        num_kv_heads=key(K.Attention.HEAD_COUNT_KV),
        head_dim=key(K.Attention.KEY_LENGTH),
        dense_ffn_size=key(K.LLM.FEED_FORWARD_LENGTH),
        moe_layers=[bool(m) for m in key(KEY_MOE_LAYER_MASK)],
        num_experts=key(K.LLM.EXPERT_COUNT),
        expert_ffn_size=key(K.LLM.EXPERT_FEED_FORWARD_LENGTH),
        shared_ffn_size=key(K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH),
        expert_gated=key(KEY_EXPERT_GATED),
        expert_act=key(KEY_EXPERT_ACTIVATION),
        router_act=key(KEY_ROUTER_ACTIVATION),
        router_norm=key(KEY_ROUTER_NORM),
        expert_bias=key(KEY_EXPERT_BIAS),
        norm_eps=key(K.Attention.LAYERNORM_RMS_EPS),
        rope_theta=key(K.Rope.FREQ_BASE),
        context_length=key(K.LLM.CONTEXT_LENGTH),
        embedding_scale=key(K.LLM.EMBEDDING_SCALE, 1.0),
        residual_scale=key(K.LLM.RESIDUAL_SCALE, 1.0),
        logit_scale=key(K.LLM.LOGIT_SCALE, 1.0),
    )
    tensors = [
        TensorInfo(t.name, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)), int(t.n_bytes))
        for t in reader.tensors
    ]
    names = {t.name for t in tensors}
    config.tied_embeddings = gguf_name("output") not in names
    scale = next((t for t in tensors if kind_of(t.name) == "ffn_router_scale"), None)
    config.router_scale_size = math.prod(scale.shape) if scale else 0
    config.validate()
    templates = [f.contents() for name, f in reader.fields.items() if name.startswith("tokenizer.chat_template")]
    return ModelInfo(path, "gguf", config, tensors, chat_templates=templates)
