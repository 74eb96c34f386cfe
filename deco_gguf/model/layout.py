"""The tensors of a DECO model, one table: their names in HF checkpoints and in GGUF files, and their shapes.

`tensors(config)` lists every tensor of a model in the GGUF file's order (docs/gguf-format.md, Tensors). Each
one has a kind, its GGUF name without `blk.N.` and the suffix (`attn_q`, `ffn_up_exps`, ...), as llama.cpp's
gguf-py names tensor kinds; `HF_NAMES` maps each kind to its checkpoint name (docs/deco.md, "Tensors read
from the checkpoint"). The checkpoint reader, the converter, the fixtures and the tests all read this table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .config import DecoConfig

# Checkpoint names by kind; {i} is the layer.
HF_LAYER = "model.layers.{i}"
HF_NAMES = {
    "token_embd": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
    "attn_norm": HF_LAYER + ".input_layernorm.weight",
    "attn_q": HF_LAYER + ".self_attn.q_proj.weight",
    "attn_k": HF_LAYER + ".self_attn.k_proj.weight",
    "attn_v": HF_LAYER + ".self_attn.v_proj.weight",
    "attn_output": HF_LAYER + ".self_attn.o_proj.weight",
    "ffn_norm": HF_LAYER + ".post_attention_layernorm.weight",
    "ffn_gate": HF_LAYER + ".mlp.gate_proj.weight",
    "ffn_up": HF_LAYER + ".mlp.up_proj.weight",
    "ffn_down": HF_LAYER + ".mlp.down_proj.weight",
    "ffn_gate_inp": HF_LAYER + ".mlp.moe_router.weight",
    "ffn_router_scale": HF_LAYER + ".mlp.router_norm.weight",
    "exp_probs_b": HF_LAYER + ".mlp.expert_bias",
    "ffn_gate_exps": HF_LAYER + ".mlp.expert_gate_proj.weight",
    "ffn_up_exps": HF_LAYER + ".mlp.expert_up_proj.weight",
    "ffn_down_exps": HF_LAYER + ".mlp.expert_down_proj.weight",
    "ffn_exps_norm": HF_LAYER + ".mlp.expert_act.rms_norm.weight",
    "ffn_gate_shexp": HF_LAYER + ".mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp": HF_LAYER + ".mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp": HF_LAYER + ".mlp.shared_experts.down_proj.weight",
}
GGUF_BIASES = ("exp_probs_b",)  # the GGUF names of these end in .bias, the others in .weight

# The routed experts' matrices: N_a counts them at the activation rate, the converter writes them in
# --expert-type.
EXPERT_TENSORS = ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps")
# Computed from other weights at conversion time: not a parameter of the model.
DERIVED_TENSORS = ("ffn_exps_mean",)
EMBEDDING_TENSORS = ("token_embd", "output")


def hf_name(kind: str, layer: int | None = None) -> str:
    return HF_NAMES[kind].format(i=layer)


def gguf_name(kind: str, layer: int | None = None) -> str:
    suffix = "bias" if kind in GGUF_BIASES else "weight"
    return f"{kind}.{suffix}" if layer is None else f"blk.{layer}.{kind}.{suffix}"


def kind_of(gguf_tensor_name: str) -> str:
    """`blk.3.ffn_up_exps.weight` -> `ffn_up_exps`."""
    return gguf_tensor_name.split(".")[-2]


@dataclass(frozen=True)
class Tensor:
    kind: str
    layer: int | None  # None for the tensors outside the layers
    shape: tuple[int, ...]  # torch order: as the checkpoint stores it (as the GGUF does, if computed)
    # False for what the converter computes and no checkpoint holds: the mean row, the constant scale of
    # router_norm_fixed (docs/deco.md, DECO FFN).
    in_checkpoint: bool = True

    @property
    def hf_name(self) -> str:
        return hf_name(self.kind, self.layer)

    @property
    def gguf_name(self) -> str:
        return gguf_name(self.kind, self.layer)


def tensors(c: DecoConfig) -> Iterator[Tensor]:
    """Every tensor of a model with config `c`, in the GGUF file's order."""
    d, V = c.hidden_size, c.vocab_size
    yield Tensor("token_embd", None, (V, d))
    yield Tensor("output_norm", None, (d,))
    if not c.tied_embeddings:
        yield Tensor("output", None, (V, d))
    for i, is_moe in enumerate(c.moe_layers):
        yield from _attention(c, i)
        yield from _deco_ffn(c, i) if is_moe else _dense_ffn(c, i)


def hf_shapes(c: DecoConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint with this config must have: HF names, torch shapes."""
    return {t.hf_name: t.shape for t in tensors(c) if t.in_checkpoint}


def _attention(c: DecoConfig, i: int) -> Iterator[Tensor]:
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    yield Tensor("attn_norm", i, (d,))
    yield Tensor("attn_q", i, (q, d))
    yield Tensor("attn_k", i, (kv, d))
    yield Tensor("attn_v", i, (kv, d))
    yield Tensor("attn_output", i, (d, q))
    yield Tensor("ffn_norm", i, (d,))


def _swiglu(c: DecoConfig, i: int, width: int, kinds: tuple[str, str, str]) -> Iterator[Tensor]:
    gate, up, down = kinds
    yield Tensor(gate, i, (width, c.hidden_size))
    yield Tensor(up, i, (width, c.hidden_size))
    yield Tensor(down, i, (c.hidden_size, width))


def _dense_ffn(c: DecoConfig, i: int) -> Iterator[Tensor]:
    yield from _swiglu(c, i, c.dense_ffn_size, ("ffn_gate", "ffn_up", "ffn_down"))


def _deco_ffn(c: DecoConfig, i: int) -> Iterator[Tensor]:
    """docs/deco.md, DECO FFN: expert e owns rows e*De..(e+1)*De-1 of up/gate and those columns of down."""
    d, E, rows = c.hidden_size, c.num_experts, c.num_experts * c.expert_ffn_size
    yield Tensor("ffn_gate_inp", i, (E, d))
    if c.router_scale_constant is not None:
        yield Tensor("ffn_router_scale", i, (1,), in_checkpoint=False)
    elif c.router_scale_size:
        yield Tensor("ffn_router_scale", i, (c.router_scale_size,))
    if c.expert_bias != "none":
        yield Tensor("exp_probs_b", i, (E,))
    if c.expert_gated:
        yield Tensor("ffn_gate_exps", i, (rows, d))
    yield Tensor("ffn_up_exps", i, (rows, d))
    yield Tensor("ffn_down_exps", i, (d, rows))
    if c.has_mean_row:
        yield Tensor("ffn_exps_mean", i, (d,), in_checkpoint=False)
    if c.has_block_norm:
        yield Tensor("ffn_exps_norm", i, (c.expert_ffn_size,))
    if c.shared_ffn_size:
        yield from _swiglu(c, i, c.shared_ffn_size, ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"))
