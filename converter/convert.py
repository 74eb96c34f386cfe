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

from ..model.accounting import account
from ..model.checkpoint import HFCheckpoint
from ..model.config import DecoConfig
from ..support.errors import DecoError
from ..support.files import atomic_output, refuse_inputs
from ..model.gguf_file import (
    ARCH,
    KEY_EXPERT_ACTIVATION,
    KEY_EXPERT_BIAS,
    KEY_EXPERT_GATED,
    KEY_MOE_LAYER_MASK,
    KEY_ROUTER_ACTIVATION,
    KEY_ROUTER_NORM,
)
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
# Matrices that take the expert type; everything 1-D, the router, its scale and the mean row stay F32.
EXPERT_TENSORS = ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps")
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
        if len(p.shape) > 1 and p.name.split(".")[-2] not in F32_TENSORS:
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
            raise DecoError("router_norm_type 'normal' gives inactive experts non-zero scores: the model is not sparse and cannot be converted")
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
        base = gguf_name.split(".")[-2]
        if len(shape) == 1 or base in F32_TENSORS:
            return Q.F32
        qtype = self.expert_type if base in EXPERT_TENSORS else self.outtype
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape[-1] % block:
            fallback = Q.F16
            self.warnings.append(f"{gguf_name}: rows of {shape[-1]} do not fit {qtype.name} blocks of {block}; written as {fallback.name}")
            return fallback
        return qtype

    @functools.cached_property
    def plans(self) -> list[TensorPlan]:
        """Every tensor to write, planned once (planning adds a warning for a type that does not fit)."""
        return list(self._plan_tensors())

    def _plan_tensors(self) -> Iterator[TensorPlan]:
        c = self.config
        d, E, De = c.hidden_size, c.num_experts, c.expert_ffn_size

        def plan(name: str, shape: tuple[int, ...], produce: Callable[[], np.ndarray]) -> TensorPlan:
            return TensorPlan(name, shape, self._type_for(name, shape), produce)

        def same(name: str, hf_name: str) -> TensorPlan:
            return plan(name, tuple(self.ckpt.shape(hf_name)), self._read(hf_name))

        yield same("token_embd.weight", "model.embed_tokens.weight")
        yield same("output_norm.weight", "model.norm.weight")
        if not c.tied_embeddings:
            yield same("output.weight", "lm_head.weight")
        for i, is_moe in enumerate(c.moe_layers):
            hf, blk = f"model.layers.{i}", f"blk.{i}"
            yield same(f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight")
            for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")):
                yield same(f"{blk}.attn_{ours}.weight", f"{hf}.self_attn.{theirs}_proj.weight")
            yield same(f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")
            if not is_moe:
                for part in ("gate", "up", "down"):
                    yield same(f"{blk}.ffn_{part}.weight", f"{hf}.mlp.{part}_proj.weight")
                continue
            mlp = f"{hf}.mlp"
            yield same(f"{blk}.ffn_gate_inp.weight", f"{mlp}.moe_router.weight")
            if c.router_scale_constant is not None:
                constant = c.router_scale_constant
                yield plan(f"{blk}.ffn_router_scale.weight", (1,), lambda v=constant: np.full(1, v, np.float32))
            elif c.router_scale_size:
                read = self._read(f"{mlp}.router_norm.weight")
                yield plan(f"{blk}.ffn_router_scale.weight", (c.router_scale_size,), lambda r=read: r().reshape(-1))
            if c.expert_bias != "none":
                yield plan(f"{blk}.exp_probs_b.bias", (E,), self._read(f"{mlp}.expert_bias"))
            # Expert e owns rows e*De..(e+1)*De-1 of up/gate and the same columns of down.
            for part in ("gate", "up") if c.expert_gated else ("up",):
                read = self._read(f"{mlp}.expert_{part}_proj.weight")
                yield plan(f"{blk}.ffn_{part}_exps.weight", (E, De, d), lambda r=read: r().reshape(E, De, d))
            read = self._read(f"{mlp}.expert_down_proj.weight")
            yield plan(f"{blk}.ffn_down_exps.weight", (E, d, De), lambda r=read: r().reshape(d, E, De).transpose(1, 0, 2))
            if c.has_mean_row:
                # mean(u) = w_mean . h, w_mean = mean of the rows the activation reads (docs/deco.md, DECO FFN).
                read = self._read(f"{mlp}.expert_{'gate' if c.expert_gated else 'up'}_proj.weight")
                yield plan(f"{blk}.ffn_exps_mean.weight", (d,), lambda r=read: r().astype(np.float64).mean(axis=0))
            if c.has_block_norm:
                yield same(f"{blk}.ffn_exps_norm.weight", f"{mlp}.expert_act.rms_norm.weight")
            if c.shared_ffn_size:
                for part in ("gate", "up", "down"):
                    yield same(f"{blk}.ffn_{part}_shexp.weight", f"{mlp}.shared_experts.{part}_proj.weight")


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
        for message in converter.warnings:
            (on_warning or (lambda m: None))(message)

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
