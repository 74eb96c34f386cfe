"""Resource accounting (docs/deco.md, "Resource accounting"): N, N_a, r_a and R_c.

Counts come from tensor shapes in GGUF naming (layout.py), so a GGUF file and an HF
checkpoint (through the converter's tensor plan) are counted the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .layout import DERIVED_TENSORS, EMBEDDING_TENSORS, EXPERT_TENSORS, kind_of


@dataclass
class Accounting:
    embedding_params: int  # token embeddings and the output head
    non_embedding_params: int  # N
    routed_expert_params: int  # the part of N that is active only when its expert is
    activation_rate: float  # fraction of routed experts active per token
    activation_source: str  # "measured", "given" or "assumed"
    hidden_size: int
    num_layers: int
    context: int  # context length of the attention compute term

    @property
    def active_params(self) -> int:
        """N_a: everything but the routed experts, plus their active share."""
        return round(self.non_embedding_params - (1 - self.activation_rate) * self.routed_expert_params)

    @property
    def active_ratio(self) -> float:
        """r_a = N_a / N."""
        return self.active_params / self.non_embedding_params

    @property
    def attention_flops(self) -> int:
        """4 d L ctx: attention over the context, the same for MoE and dense."""
        return 4 * self.hidden_size * self.num_layers * self.context

    @property
    def flops_per_token(self) -> int:
        """M ~ 2 N_a + 4 d L ctx."""
        return 2 * self.active_params + self.attention_flops

    @property
    def dense_flops_per_token(self) -> int:
        """M of a dense model with the same N."""
        return 2 * self.non_embedding_params + self.attention_flops

    @property
    def compute_ratio(self) -> float:
        """R_c = M_moe / M_dense at equal N."""
        return self.flops_per_token / self.dense_flops_per_token

    def as_dict(self) -> dict:
        extra = {
            "active_params": self.active_params,
            "active_ratio": self.active_ratio,
            "flops_per_token": self.flops_per_token,
            "dense_flops_per_token": self.dense_flops_per_token,
            "compute_ratio": self.compute_ratio,
        }
        return asdict(self) | extra


def account(
    shapes: dict[str, tuple[int, ...]],
    hidden_size: int,
    num_layers: int,
    context: int,
    activation_rate: float,
    activation_source: str,
) -> Accounting:
    """Count parameters by role from `{gguf tensor name: shape}`."""
    if not 0.0 <= activation_rate <= 1.0:
        raise ValueError(f"activation rate must be in [0, 1], got {activation_rate}")
    embedding = non_embedding = experts = 0
    for name, shape in shapes.items():
        kind = kind_of(name)
        size = math.prod(shape)
        if kind in DERIVED_TENSORS:
            continue
        if kind in EMBEDDING_TENSORS:
            embedding += size
            continue
        non_embedding += size
        if kind in EXPERT_TENSORS:
            experts += size
    return Accounting(
        embedding, non_embedding, experts, activation_rate, activation_source, hidden_size, num_layers, context
    )
