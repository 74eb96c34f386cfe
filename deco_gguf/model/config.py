"""DecoConfig: every hyperparameter of a DECO model, resolved and validated.

The converter, the reference model and `info` all read a checkpoint through
this one description. How it is resolved from a released checkpoint (tensors
first, then the Megatron keys) lives in `resolve.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..support.errors import DecoError

EXPERT_ACTIVATIONS = ("norm_silu", "norm_silu_nomean", "norm_silu_norms", "silu", "relu")
ROUTER_ACTIVATIONS = ("relu", "sqrelu")
ROUTER_NORMS = ("simple", "rms", "normal", "none")
# Released config.json files write router_norm_type "null" (or a JSON null) for "none".
ROUTER_NORM_NONE_IN_JSON = "null"
EXPERT_BIAS_METHODS = ("none", "base", "rms")


@dataclass
class DecoConfig:
    vocab_size: int
    hidden_size: int  # d
    num_layers: int  # L
    num_heads: int
    num_kv_heads: int  # num_query_groups
    head_dim: int
    dense_ffn_size: int  # SwiGLU width of dense layers, 0 if there are none
    moe_layers: list[bool]  # per layer: True = DECO FFN, False = dense SwiGLU
    num_experts: int  # E
    expert_ffn_size: int  # De
    shared_ffn_size: int  # Ds, 0 = no shared expert
    expert_gated: bool = False
    expert_act: str = "norm_silu"
    router_act: str = "relu"
    router_norm: str = "simple"
    # Shape of the router scale: E (expert-wise), 1 (router_norm_scalar). A
    # router_norm_fixed checkpoint stores no tensor: the scale is the constant
    # router_norm_init_var, which the converter writes as a [1] tensor.
    router_scale_size: int = 0
    router_scale_constant: float | None = None
    expert_bias: str = "none"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    context_length: int = 4096
    tied_embeddings: bool = False
    embedding_scale: float = 1.0  # scale_emb if use_mup
    residual_scale: float = 1.0  # scale_depth / sqrt(L) if use_mup
    logit_scale: float = 1.0  # logits are divided by d / dim_model_base if use_mup
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def has_mean_row(self) -> bool:
        """The activation subtracts mean(u) over all E*De entries (docs/deco.md, DECO FFN)."""
        return self.expert_act in ("norm_silu", "norm_silu_norms")

    @property
    def has_block_norm(self) -> bool:
        """The activation applies RMSNorm over each expert's De entries."""
        return self.expert_act in ("norm_silu", "norm_silu_nomean")

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    def validate(self) -> None:
        """Raise DecoError for combinations the model cannot have."""
        checks = [
            (self.expert_act in EXPERT_ACTIVATIONS, f"unknown expert activation {self.expert_act!r}"),
            (
                self.router_act in ROUTER_ACTIVATIONS,
                f"router activation {self.router_act!r} is not sparse: only relu and sqrelu give exact zeros",
            ),
            (self.router_norm in ROUTER_NORMS, f"unknown router norm type {self.router_norm!r}"),
            (self.expert_bias in EXPERT_BIAS_METHODS, f"unknown expert bias method {self.expert_bias!r}"),
            (len(self.moe_layers) == self.num_layers, "moe layer list does not match the layer count"),
            (self.num_heads > 0 and self.num_kv_heads > 0, "head counts must be positive"),
            (
                self.num_heads % self.num_kv_heads == 0,
                f"{self.num_heads} heads not divisible into {self.num_kv_heads} KV groups",
            ),
            (self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for rope"),
            (
                not any(self.moe_layers) or (self.num_experts > 0 and self.expert_ffn_size > 0),
                "DECO layers need experts",
            ),
            (all(self.moe_layers) or self.dense_ffn_size > 0, "dense layers need a feed-forward width"),
            (self.norm_eps > 0 and math.isfinite(self.norm_eps), f"norm epsilon must be positive, got {self.norm_eps}"),
            (
                self.router_norm == "none" or self.router_scale_size in (1, self.num_experts),
                "router scale must have E or 1 entries",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise DecoError(message)


def router_norm_from_json(value: str | None) -> str:
    """config.json's router_norm_type as one of ROUTER_NORMS."""
    return "none" if value in (None, ROUTER_NORM_NONE_IN_JSON) else value


def router_norm_to_json(router_norm: str) -> str:
    """One of ROUTER_NORMS as released config.json files spell it."""
    return ROUTER_NORM_NONE_IN_JSON if router_norm == "none" else router_norm
