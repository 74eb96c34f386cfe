"""The expert activity a loaded model counts: per DECO layer, the tokens routed through it and their
active experts (docs/deco.md, "Resource accounting").

Each context counts its own: ggml_deco_activity_eval (ggml-deco.h) is the context's eval callback and adds
every evaluated DECO layer into a `ggml_deco_activity` this module allocates for that context, so a draft
model, a second model or a second runtime in the same process never mixes its counts into another's.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass

from .native import ggml_base


@dataclass(frozen=True)
class LayerActivity:
    """What was counted in one layer: the tokens routed through it and their active experts.

    `a + b` pools two counts of the same layer; `after - before` is what happened between two readings
    of the counters (its min/max per token are unknown: None).
    """

    layer: int
    tokens: int  # tokens routed through this layer
    active: int  # active experts summed over those tokens
    min_active: int | None  # fewest active experts of one token
    max_active: int | None  # most active experts of one token
    num_experts: int

    @property
    def rate(self) -> float:
        return self.active / (self.tokens * self.num_experts) if self.tokens else 0.0

    def __add__(self, other: LayerActivity) -> LayerActivity:
        assert (self.layer, self.num_experts) == (other.layer, other.num_experts)
        if not other.tokens:
            return self
        if not self.tokens:
            return other
        known = None not in (self.min_active, self.max_active, other.min_active, other.max_active)
        return LayerActivity(
            self.layer,
            self.tokens + other.tokens,
            self.active + other.active,
            min(self.min_active, other.min_active) if known else None,
            max(self.max_active, other.max_active) if known else None,
            self.num_experts,
        )

    def __sub__(self, other: LayerActivity) -> LayerActivity:
        assert (self.layer, self.num_experts) == (other.layer, other.num_experts)
        return LayerActivity(
            self.layer, self.tokens - other.tokens, self.active - other.active, None, None, self.num_experts
        )


def mean_rate(activity: Iterable[LayerActivity | None]) -> float | None:
    """The mean over the layers that saw tokens of their expert activation rates."""
    rates = [a.rate for a in activity if a is not None and a.tokens]
    return sum(rates) / len(rates) if rates else None


class _LayerCounts(ctypes.Structure):  # struct ggml_deco_layer_activity
    _fields_ = [
        ("n_tokens", ctypes.c_int64),
        ("n_active", ctypes.c_int64),
        ("min_active", ctypes.c_int64),
        ("max_active", ctypes.c_int64),
    ]


class _Counts(ctypes.Structure):  # struct ggml_deco_activity
    _fields_ = [("n_layers", ctypes.c_int32), ("layers", ctypes.POINTER(_LayerCounts))]


class ActivityCounter:
    """The per-layer counts of one llama.cpp context: `install(params)` before the context is created."""

    def __init__(self, moe_layers: list[bool], num_experts: int):
        self.moe_layers = moe_layers
        self.num_experts = num_experts
        self._layers = (_LayerCounts * len(moe_layers))()
        self._counts = _Counts(len(moe_layers), self._layers)
        self.reset()

    def install(self, params) -> None:
        """Make `params` (a llama_context_params) count into this counter. The counter must outlive the
        context."""
        callback = ggml_base().ggml_deco_activity_eval
        params.cb_eval = ctypes.cast(callback, type(params.cb_eval))
        params.cb_eval_user_data = ctypes.cast(ctypes.pointer(self._counts), ctypes.c_void_p)

    def reset(self) -> None:
        for counts in self._layers:
            counts.n_tokens = counts.n_active = counts.max_active = 0
            counts.min_active = -1

    def read(self) -> list[LayerActivity | None]:
        """Per layer, what was counted since the last reset (None for dense layers).

        llama.cpp evaluates the last layer only for positions whose logits are requested.
        """
        return [
            LayerActivity(
                layer,
                c.n_tokens,
                c.n_active,
                c.min_active if c.n_tokens else None,
                c.max_active if c.n_tokens else None,
                self.num_experts,
            )
            if is_moe
            else None
            for layer, (c, is_moe) in enumerate(zip(self._layers, self.moe_layers, strict=True))
        ]
