"""HF DECO checkpoint -> GGUF (layout: docs/gguf-format.md).

Tensors are streamed: the plan (names, shapes, types) is written first, then
each tensor is read from the memory-mapped checkpoint, converted, quantized,
written and dropped, so peak memory is about one tensor. The output appears
only when complete: it is written to a temporary file beside it and renamed.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from ..model import layout
from ..model.accounting import account
from ..model.checkpoint import HFCheckpoint
from ..model.config import DecoConfig
from ..model.gguf_file import (
    ARCH,
    KEY_EXPERT_ACTIVATION,
    KEY_EXPERT_BIAS,
    KEY_EXPERT_GATED,
    KEY_MOE_LAYER_MASK,
    KEY_ROUTER_ACTIVATION,
    KEY_ROUTER_NORM,
)
from ..support.errors import DecoError
from ..support.files import atomic_output, refuse_inputs
from ..support.signals import held_interrupts
from .vocab import Vocab, load_vocab

# Types a user may ask for, and the file type each one names.
OUT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
EXPERT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q5_0": Q.Q5_0, "q4_0": Q.Q4_0}
FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
}
# The expert matrices (layout.EXPERT_TENSORS) take the expert type; everything 1-D, the router, its scale
# and the mean row stay F32.
F32_TENSORS = ("ffn_gate_inp", "ffn_router_scale", "exp_probs_b", "ffn_exps_mean", "ffn_exps_norm")


@dataclass
class TensorPlan:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order
    qtype: Q
    produce: Callable[[], np.ndarray]  # float32 data of `shape`, read when written

    @property
    def nbytes(self) -> int:
        return math.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))

    def encode(self) -> np.ndarray:
        data = np.ascontiguousarray(self.produce(), dtype=np.float32)
        return gguf.quants.quantize(data, self.qtype)


def bulk_type(plans: list[TensorPlan]) -> Q:
    """The type of most of the matrices' weights: what `general.file_type` names, as llama-quantize's
    presets name the bulk of a file (routers, kept F32, do not count; docs/gguf-format.md)."""
    weights: Counter[Q] = Counter()
    for p in plans:
        if len(p.shape) > 1 and layout.kind_of(p.name) not in F32_TENSORS:
            weights[p.qtype] += math.prod(p.shape)
    return weights.most_common(1)[0][0]


def size_label(plans: list[TensorPlan]) -> str:
    """N, the non-embedding parameters that DECO's model names give, in llama.cpp's notation."""
    n = account({p.name: p.shape for p in plans}, 0, 0, 0, 0.0, "assumed").non_embedding_params
    return gguf.model_weight_count_rounded_notation(n, min_digits=2)


class DecoConverter:
    """One HF DECO checkpoint, described as GGUF metadata and a stream of tensors."""

    def __init__(self, ckpt: HFCheckpoint, outtype: str = "f16", expert_type: str | None = None):
        if outtype not in OUT_TYPES:
            raise DecoError(f"unknown --outtype {outtype!r} (choose from {', '.join(OUT_TYPES)})")
        expert_type = expert_type or outtype
        if expert_type not in EXPERT_TYPES:
            raise DecoError(f"unknown --expert-type {expert_type!r} (choose from {', '.join(EXPERT_TYPES)})")
        self.ckpt = ckpt
        self.config: DecoConfig = ckpt.config
        if self.config.router_norm == "normal":
            # Subtracting the mean score gives inactive experts a non-zero score that the
            # authors' forward uses: such a layer is dense and has no exact sparse evaluation.
            raise DecoError(
                "router_norm_type 'normal' gives inactive experts non-zero scores: the model is not sparse and "
                "cannot be converted"
            )
        self.outtype = OUT_TYPES[outtype]
        self.expert_type = EXPERT_TYPES[expert_type]
        self.vocab: Vocab = load_vocab(ckpt.path, ckpt.raw_config)
        self.vocab.pad_to(self.config.vocab_size)
        self.warnings: list[str] = list(self.config.warnings) + self.vocab.warnings

    # -- metadata -------------------------------------------------------------

    def add_metadata(self, w: gguf.GGUFWriter, name: str, plans: list[TensorPlan]) -> None:
        c = self.config
        w.add_name(name)
        w.add_size_label(size_label(plans))
        w.add_file_type(FILE_TYPES[bulk_type(plans)])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(c.context_length)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_layers)
        w.add_feed_forward_length(c.dense_ffn_size)
        w.add_vocab_size(c.vocab_size)
        w.add_head_count(c.num_heads)
        w.add_head_count_kv(c.num_kv_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.head_dim)
        w.add_array(KEY_MOE_LAYER_MASK, [int(m) for m in c.moe_layers])
        w.add_expert_count(c.num_experts)
        w.add_expert_feed_forward_length(c.expert_ffn_size)
        w.add_expert_shared_feed_forward_length(c.shared_ffn_size)
        w.add_bool(KEY_EXPERT_GATED, c.expert_gated)
        w.add_string(KEY_EXPERT_ACTIVATION, c.expert_act)
        w.add_string(KEY_ROUTER_ACTIVATION, c.router_act)
        w.add_string(KEY_ROUTER_NORM, c.router_norm)
        w.add_string(KEY_EXPERT_BIAS, c.expert_bias)
        w.add_embedding_scale(c.embedding_scale)
        w.add_residual_scale(c.residual_scale)
        w.add_logit_scale(c.logit_scale)
        self.vocab.add_to_gguf(w)

    # -- tensors --------------------------------------------------------------

    def _read(self, hf_name: str) -> Callable[[], np.ndarray]:
        return lambda: self.ckpt.tensor(hf_name).float().numpy()

    def _type_for(self, gguf_name: str, shape: tuple[int, ...]) -> Q:
        kind = layout.kind_of(gguf_name)
        if len(shape) == 1 or kind in F32_TENSORS:
            return Q.F32
        qtype = self.expert_type if kind in layout.EXPERT_TENSORS else self.outtype
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape[-1] % block:
            fallback = Q.F16
            self.warnings.append(
                f"{gguf_name}: rows of {shape[-1]} do not fit {qtype.name} blocks of {block}; "
                f"written as {fallback.name}"
            )
            return fallback
        return qtype

    @functools.cached_property
    def plans(self) -> list[TensorPlan]:
        """Every tensor to write, planned once (planning adds a warning for a type that does not fit)."""
        return list(self._plan_tensors())

    def _plan_tensors(self) -> Iterator[TensorPlan]:
        for t in layout.tensors(self.config):
            shape, produce = self._gguf_tensor(t)
            yield TensorPlan(t.gguf_name, shape, self._type_for(t.gguf_name, shape), produce)

    def _gguf_tensor(self, t: layout.Tensor) -> tuple[tuple[int, ...], Callable[[], np.ndarray]]:
        """The GGUF shape of a tensor of the table and how to produce its data (docs/gguf-format.md)."""
        c = self.config
        d, E, De = c.hidden_size, c.num_experts, c.expert_ffn_size
        if t.kind == "ffn_exps_mean":
            # mean(u) = w_mean . h, w_mean = mean of the rows the activation reads (docs/deco.md, DECO FFN).
            read = self._read(layout.hf_name("ffn_gate_exps" if c.expert_gated else "ffn_up_exps", t.layer))
            return t.shape, lambda: read().astype(np.float64).mean(axis=0)
        if t.kind == "ffn_router_scale" and not t.in_checkpoint:
            constant = c.router_scale_constant
            return t.shape, lambda: np.full(1, constant, np.float32)
        read = self._read(t.hf_name)
        if t.kind == "ffn_router_scale":  # a scalar scale may be stored as [] or [1]
            return t.shape, lambda: read().reshape(-1)
        # Expert e owns rows e*De..(e+1)*De-1 of up/gate and the same columns of down.
        if t.kind in ("ffn_gate_exps", "ffn_up_exps"):
            return (E, De, d), lambda: read().reshape(E, De, d)
        if t.kind == "ffn_down_exps":
            return (E, d, De), lambda: read().reshape(d, E, De).transpose(1, 0, 2)
        return t.shape, read


def convert(
    hf_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f16",
    expert_type: str | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    overrides: dict | None = None,
) -> DecoConverter:
    """Convert `hf_dir` to the GGUF file `out_path`; nothing is left behind on failure or interrupt,
    and an output that is one of the checkpoint's files is refused. `on_progress(tensor, bytes written,
    total bytes)` after every tensor."""
    out_path = Path(out_path)
    # Ctrl-C and SIGTERM are held while reading (see signals.held_interrupts) and act between tensors.
    with held_interrupts() as check_interrupts:
        ckpt = HFCheckpoint(hf_dir, overrides)
        refuse_inputs(out_path, ckpt.input_files())
        converter = DecoConverter(ckpt, outtype, expert_type)
        plans = converter.plans
        if on_warning:
            for message in converter.warnings:
                on_warning(message)

        with atomic_output(out_path) as tmp_path:
            writer = gguf.GGUFWriter(tmp_path, ARCH)
            converter.add_metadata(writer, Path(hf_dir).resolve().name, plans)
            for p in plans:
                writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            total, written = sum(p.nbytes for p in plans), 0
            for p in plans:
                check_interrupts()
                data = p.encode()
                if data.nbytes != p.nbytes:
                    raise DecoError(f"internal: {p.name} encodes to {data.nbytes} bytes, planned {p.nbytes}")
                writer.write_tensor_data(data)
                written += p.nbytes
                if on_progress:
                    on_progress(p.name, written, total)
            writer.close()
    return converter
