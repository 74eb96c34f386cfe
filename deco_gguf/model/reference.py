"""A small, readable PyTorch reference of the DECO forward pass.

This is the numerical truth the converter and the GGUF runtime are tested
against, so it favours plain code over speed: no KV cache, full causal
attention on every call, every expert computed densely and weighted by its
router score (an inactive expert's score is exactly 0, so its contribution is
exactly 0; docs/deco.md, "DECO FFN").

Section names ("Layer stack", "DECO FFN", ...) refer to docs/deco.md; its
section "Where the math comes from" says where each detail the paper leaves
open is settled.

    model = DecoModel.from_pretrained("path/to/DECO-0.5B")
    out = model(torch.tensor([1, 2, 3]))
    out.logits            # [B, T, V] fp32
    out.activation        # per layer: bool mask [B, T, E] (None for dense layers)
    out.activation_rate   # per layer: mean fraction of active experts (None for dense)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..support.errors import DecoError
from .checkpoint import HFCheckpoint
from .config import DecoConfig
from .layout import hf_shapes


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norm statistics and the router run in at least fp32 (fp64 stays fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, statistics in fp32.

    eps is inside the square root, for every RMSNorm of the model (docs/deco.md,
    "Where the math comes from").
    """
    xf = x.to(_compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE over the whole head of x [B, T, H, hd], positions 0..T-1 (docs/deco.md, Layer stack).

    Entry j is rotated together with entry j + hd/2 by the angle pos * theta^(-2j/hd).
    """
    T, hd = x.shape[1], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # [hd/2]
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # [T, hd/2]
    cos = torch.cat([angle.cos(), angle.cos()], -1)[None, :, None, :].to(x.dtype)
    sin = torch.cat([angle.sin(), angle.sin()], -1)[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    rotated = torch.cat([-x2, x1], -1)
    return x * cos + rotated * sin


def swiglu(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(h)) * up(h)): dense FFN layers and the shared expert."""
    return F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)


@dataclass
class DecoOutput:
    logits: torch.Tensor  # [B, T, V], fp32 (fp64 for an fp64 model)
    activation: list[torch.Tensor | None]  # per layer: active-expert mask [B, T, E]; None for dense layers

    @property
    def activation_rate(self) -> list[float | None]:
        """Per layer: the mean fraction of active experts over all tokens (None for dense layers)."""
        return [None if m is None else m.float().mean().item() for m in self.activation]

    @property
    def mean_activation(self) -> float | None:
        """The mean of activation_rate over the DECO layers."""
        rates = [r for r in self.activation_rate if r is not None]
        return sum(rates) / len(rates) if rates else None


class DecoModel:
    """DECO forward pass over a dict of HF-named tensors (see layout.hf_shapes)."""

    def __init__(self, config: DecoConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        config.validate()
        self.config = config
        self.dtype = dtype
        self.router_dtype = _compute_dtype(dtype)  # docs/deco.md, DECO FFN: router logits in F32 at least
        self.w: dict[str, torch.Tensor] = {}
        for name in hf_shapes(config):
            if name not in state:
                raise DecoError(f"missing tensor {name}")
            t = state[name]
            fp32_kept = name.endswith(("moe_router.weight", "router_norm.weight", "expert_bias"))
            self.w[name] = t.to(self.router_dtype if fp32_kept else dtype)
        if config.tied_embeddings:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> DecoModel:
        ckpt = HFCheckpoint(path)
        state = {name: ckpt.tensor(name) for name in hf_shapes(ckpt.config)}
        return cls(ckpt.config, state, dtype)

    # -- one layer ------------------------------------------------------------

    def attention(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Causal GQA self-attention of layer i on h [B, T, d] (docs/deco.md, Layer stack)."""
        c, p = self.config, f"model.layers.{i}.self_attn."
        B, T, _ = h.shape
        q = F.linear(h, self.w[p + "q_proj.weight"]).view(B, T, c.num_heads, c.head_dim)
        k = F.linear(h, self.w[p + "k_proj.weight"]).view(B, T, c.num_kv_heads, c.head_dim)
        v = F.linear(h, self.w[p + "v_proj.weight"]).view(B, T, c.num_kv_heads, c.head_dim)
        q, k = rope(q, c.rope_theta), rope(k, c.rope_theta)
        # Query head j reads KV group j // (heads per group).
        group = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c.head_dim)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores.to(_compute_dtype(scores.dtype)), -1).to(h.dtype)
        o = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, c.num_heads * c.head_dim)
        return F.linear(o, self.w[p + "o_proj.weight"])

    def route(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router of DECO layer i: (scores [.., E] in router dtype, active mask [.., E]).

        active = the experts whose post-ReLU score is non-zero, decided before
        the router norm (docs/deco.md, "DECO FFN" and "Where the math comes
        from"). The norm may make scores negative or zero without changing
        which experts are active.
        """
        c, p = self.config, f"model.layers.{i}.mlp."
        raw = F.linear(h.to(self.router_dtype), self.w[p + "moe_router.weight"])
        score = F.relu(raw) if c.router_act == "relu" else F.relu(raw).square()  # sqrelu = relu^2
        if c.expert_bias != "none":
            # Expert bias changes only the routing decision, never the score
            # (docs/deco.md, "DECO FFN").
            bias = self.w[p + "expert_bias"]
            if c.expert_bias == "rms":
                bias = bias * raw.pow(2).mean(-1, keepdim=True).sqrt()
            score = score * (raw + bias > 0)
        active = score != 0

        # Router norm, eps = norm_epsilon (docs/deco.md, "DECO FFN").
        if c.router_norm != "none":
            scale = (
                torch.tensor(c.router_scale_constant, dtype=score.dtype)
                if c.router_scale_constant is not None
                else self.w[p + "router_norm.weight"].reshape(-1)
            )
            if c.router_norm == "normal":
                # Mean over all E scores, zeros included: inactive experts get the
                # non-zero score -mean/rms * scale, and a dense forward uses it
                # (docs/deco.md, "DECO FFN": every expert is multiplied by its score).
                score = score - score.mean(-1, keepdim=True)
            if c.router_norm in ("rms", "normal"):
                score = score * torch.rsqrt(score.pow(2).mean(-1, keepdim=True) + c.norm_eps)
            score = score * scale
        return score, active

    def expert_act(self, i: int, a: torch.Tensor) -> torch.Tensor:
        """The expert activation on a [.., E*De] (the up projection, or the gate in gated variants)."""
        c = self.config
        if c.expert_act == "relu":
            return F.relu(a)
        if c.has_mean_row:  # mean over ALL E*De entries, active experts or not (docs/deco.md, DECO FFN)
            a = a - a.mean(-1, keepdim=True)
        if c.has_block_norm:  # RMSNorm over each expert's De entries, act_norm weight shared by all experts
            blocks = a.unflatten(-1, (c.num_experts, c.expert_ffn_size))
            a = rms_norm(blocks, self.w[f"model.layers.{i}.mlp.expert_act.rms_norm.weight"], c.norm_eps).flatten(-2)
        return F.silu(a)  # norm_silu, norm_silu_nomean, norm_silu_norms, silu

    def deco_ffn(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DECO FFN of layer i on h [.., d]: (output [.., d], active mask [.., E]) (docs/deco.md, DECO FFN)."""
        c, p = self.config, f"model.layers.{i}.mlp."
        score, active = self.route(i, h)
        u = F.linear(h, self.w[p + "expert_up_proj.weight"])
        if c.expert_gated:
            v = self.expert_act(i, F.linear(h, self.w[p + "expert_gate_proj.weight"])) * u
        else:
            v = self.expert_act(i, u)
        v = v.unflatten(-1, (c.num_experts, c.expert_ffn_size)) * score.to(v.dtype).unsqueeze(-1)
        y = F.linear(v.flatten(-2), self.w[p + "expert_down_proj.weight"])
        if c.shared_ffn_size:  # added unscaled, no shared-expert gate
            s = p + "shared_experts."
            y = y + swiglu(h, *(self.w[s + f"{part}_proj.weight"] for part in ("gate", "up", "down")))
        return y, active

    def ffn(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.config.moe_layers[i]:
            return self.deco_ffn(i, h)
        p = f"model.layers.{i}.mlp."
        return swiglu(h, *(self.w[p + f"{part}_proj.weight"] for part in ("gate", "up", "down"))), None

    def attn_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x + residual_scale * Attn(RMSNorm(x) * input_layernorm)."""
        h = rms_norm(x, self.w[f"model.layers.{i}.input_layernorm.weight"], self.config.norm_eps)
        return x + self.attention(i, h) * self.config.residual_scale

    def ffn_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm(x) * post_attention_layernorm: what the FFN (and the router) of layer i reads."""
        return rms_norm(x, self.w[f"model.layers.{i}.post_attention_layernorm.weight"], self.config.norm_eps)

    def ffn_block(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x + residual_scale * FFN_i(RMSNorm(x) * post_attention_layernorm), and the active mask."""
        y, active = self.ffn(i, self.ffn_input(i, x))
        return x + y * self.config.residual_scale, active

    # -- whole model ----------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w["model.embed_tokens.weight"][ids] * self.config.embedding_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.w["model.norm.weight"], self.config.norm_eps)
        return F.linear(h, self.w["lm_head.weight"]).to(_compute_dtype(x.dtype)) / self.config.logit_scale

    @torch.no_grad()
    def __call__(self, input_ids) -> DecoOutput:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise DecoError(f"input_ids must be [T] or [B, T] with T > 0, got shape {list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise DecoError(f"token id out of range [0, {self.config.vocab_size})")
        x = self.embed(ids)
        activation = []
        for i in range(self.config.num_layers):
            x = self.attn_block(i, x)
            x, active = self.ffn_block(i, x)
            activation.append(active)
        return DecoOutput(logits=self.logits(x), activation=activation)

    def generate_greedy(self, ids, n: int) -> list[int]:
        """The n tokens greedy decoding appends to the 1-D prompt ids (full recompute each step)."""
        tokens = [int(t) for t in torch.as_tensor(ids).reshape(-1)]
        new = []
        for _ in range(n):
            nxt = int(self(tokens).logits[0, -1].argmax())
            tokens.append(nxt)
            new.append(nxt)
        return new
