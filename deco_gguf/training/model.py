"""The model a training run optimises: its shape, initial weights and the reference forward pass with gradients,
and the loss with the DECO sparsity regulariser (the recipe: deco_gguf/training/train.py's docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import fixtures
from ..model.config import DecoConfig
from ..model.layout import hf_shapes
from ..model.reference import DecoModel

# -- model shape -------------------------------------------------------------------------------------


@dataclass
class Shape:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4  # layer 0 dense, the rest DECO
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    dense_ffn: int = 704
    num_experts: int = 16
    expert_ffn: int = 64  # De
    shared_ffn: int = 128  # Ds
    router_scale_init: float = 0.1  # DECO's --router-norm-init-var

    def config(self) -> DecoConfig:
        return DecoConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dense_ffn_size=self.dense_ffn,
            moe_layers=[False] + [True] * (self.num_layers - 1),
            num_experts=self.num_experts,
            expert_ffn_size=self.expert_ffn,
            shared_ffn_size=self.shared_ffn,
            expert_act="norm_silu",
            router_act="relu",
            router_norm="simple",
            router_scale_size=self.num_experts,
        )

    def fixture_spec(self, dtype: str) -> fixtures.FixtureSpec:
        """The same model as a FixtureSpec, so deco_gguf.fixtures writes config.json exactly as released."""
        return fixtures.FixtureSpec(
            name="deco-tiny",
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dense_ffn=self.dense_ffn,
            num_experts=self.num_experts,
            expert_ffn=self.expert_ffn,
            shared_ffn=self.shared_ffn,
            moe_layer_freq=[0] + [1] * (self.num_layers - 1),
            router_norm_init_var=self.router_scale_init,
            weight_format="safetensors",
            tokenizer_format="both",
            dtype=dtype,
            vocab_size=self.vocab_size,
        )


def init_state(
    config: DecoConfig, seed: int, std: float = 0.02, router_scale_init: float = 0.1
) -> dict[str, torch.Tensor]:
    """fp32 initial weights under their HF names.

    Matrices ~ N(0, std); the matrices that write into the residual stream
    (o_proj, down projections) get std / sqrt(2 L) (Megatron's scaled init);
    RMSNorm weights 1; the router scale router_scale_init (DECO's
    --router-norm-init-var 0.1). The router is N(0, std) like any matrix, so
    about half the experts fire at the start and the regulariser brings that
    down to the target.
    """
    g = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * config.num_layers)
    state = {}
    for name, shape in hf_shapes(config).items():
        if name.endswith("router_norm.weight"):
            t = torch.full(shape, router_scale_init)
        elif name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            t = torch.randn(shape, generator=g) * out_std
        else:
            t = torch.randn(shape, generator=g) * std
        state[name] = t
    return state


# -- the reference model with gradients ----------------------------------------------------------------


class TrainableDeco(nn.Module):
    """nn.Parameters under HF names, run through the reference model's layer functions."""

    def __init__(self, config: DecoConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.names = list(hf_shapes(config))
        self.weights = nn.ParameterList([nn.Parameter(state[n].detach().clone().to(dtype)) for n in self.names])
        self.ref = DecoModel(config, dict(zip(self.names, self.weights, strict=True)), dtype)
        for n, p in zip(self.names, self.weights, strict=True):  # the reference must use the parameters themselves
            assert self.ref.w[n] is p, n

    def named_weights(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.names, self.weights, strict=True))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits [B, T, V] and, per DECO layer, (post-ReLU router scores r [B, T, E], active mask).

        Follows DecoModel.__call__ step by step; r is recomputed from the FFN
        input for the regulariser (the reference returns the scores after the
        router scale, the regulariser reads them before it, as DECO does).
        """
        ref, c = self.ref, self.config
        x = ref.embed(ids)
        routers = []
        for i in range(c.num_layers):
            x = ref.attn_block(i, x)
            h = ref.ffn_input(i, x)
            y, active = ref.ffn(i, h)
            if active is not None:
                r = F.relu(F.linear(h, ref.w[f"model.layers.{i}.mlp.moe_router.weight"]))
                routers.append((r, active))
            x = x + y * c.residual_scale
        return ref.logits(x), routers

    def state_dict_hf(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """HF-named tensors for export: `dtype`, except the router (fp32, as released)."""
        out = {}
        for n, p in self.named_weights().items():
            keep_fp32 = n.endswith("moe_router.weight")
            out[n] = p.detach().to(torch.float32 if keep_fp32 else dtype).contiguous()
        return out


def router_entropy(r: torch.Tensor) -> torch.Tensor:
    """DECO's sparsity regulariser on post-ReLU scores r [.., E]: mean over tokens of H(r / sum r)."""
    p = r / (r.sum(-1, keepdim=True) + 1e-5)
    return (-p * torch.log(p + 1e-5)).sum(-1).mean()


class AdaptiveCoef:
    """The regulariser's coefficient(s), stepped toward a target activation rate (DECO's step_reg_coef)."""

    def __init__(self, n_layers: int, init: float, multiplier: float, target: float, scope: str = "layer"):
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        self.init, self.multiplier, self.target, self.scope = init, multiplier, target, scope
        self.values = [init] * n_layers

    def step(self, rates: list[float]) -> None:
        """rates: the activation rate of each DECO layer on this step's batch."""
        measured = rates if self.scope == "layer" else [sum(rates) / len(rates)] * len(rates)
        for k, rate in enumerate(measured):
            if rate > self.target:
                self.values[k] *= self.multiplier
            else:
                self.values[k] = max(self.values[k] / self.multiplier, self.init)


def loss_terms(
    model: TrainableDeco, ids: torch.Tensor, coef: AdaptiveCoef
) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """(total loss, LM loss, per-layer activation rates, per-layer entropies) on ids [B, T+1]."""
    logits, routers = model(ids[:, :-1])
    lm = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    total = lm
    rates, entropies = [], []
    L = model.config.num_layers
    for k, (r, active) in enumerate(routers):
        ent = router_entropy(r)
        total = total + coef.values[k] * ent / L  # DECO divides by the layer count
        rates.append(active.float().mean().item())
        entropies.append(ent.item())
    return total, lm, rates, entropies
