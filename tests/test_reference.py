"""The reference model against hand-computed numbers and an independent loop implementation.

The reference is the numerical truth for every later test, so nothing here
compares it with itself:
- pieces (RMSNorm, RoPE, router + every router norm / scale / bias, every
  expert activation, one whole FFN layer) are checked against literal numbers
  derived by hand in the comments;
- whole forwards of every variant are checked against `loop_forward`, a
  second implementation written per token / per head / per active expert
  with plain numpy and python loops;
- every fixture variant loads from an HF directory and gives finite logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deco_gguf.model.config import DecoConfig
from deco_gguf.model.layout import hf_shapes
from deco_gguf.model.reference import DecoModel, rms_norm, rope
from deco_gguf.support.errors import DecoError

F64 = torch.float64


# -- tiny configs and weights ----------------------------------------------------


def tiny_config(**kw) -> DecoConfig:
    base = dict(
        vocab_size=5,
        hidden_size=4,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=2,
        dense_ffn_size=3,
        moe_layers=[True],
        num_experts=3,
        expert_ffn_size=2,
        shared_ffn_size=2,
        router_scale_size=3,
    )
    base.update(kw)
    return DecoConfig(**base)


def random_state(c: DecoConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of c; the router scale has a zero and a negative entry."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in hf_shapes(c).items():
        if name.endswith("router_norm.weight"):
            t = 0.5 + torch.rand(shape, generator=g, dtype=F64)
            if t.numel() >= 3:
                t[0], t[1] = 0.0, -0.7
        elif name.endswith("norm.weight"):
            t = 1 + 0.2 * torch.randn(shape, generator=g, dtype=F64)
        elif name.endswith("expert_bias"):
            t = 0.5 * torch.randn(shape, generator=g, dtype=F64)
        else:
            t = torch.randn(shape, generator=g, dtype=F64) * (1.0 if "embed" in name else 0.7)
        state[name] = t
    return state


def router_model(router_norm="simple", scale=None, **kw) -> DecoModel:
    """A 1-layer DECO model with d=2, E=3 whose router is [[1,0],[0,1],[-1,-1]]."""
    size = 0 if router_norm == "none" else (len(scale) if scale is not None else 1)  # no tensor: fixed constant
    c = tiny_config(hidden_size=2, num_heads=1, head_dim=2, router_norm=router_norm, router_scale_size=size, **kw)
    state = random_state(c)
    state["model.layers.0.mlp.moe_router.weight"] = torch.tensor([[1.0, 0], [0, 1], [-1, -1]])
    if scale is not None:
        state["model.layers.0.mlp.router_norm.weight"] = torch.tensor(scale, dtype=F64)
    return DecoModel(c, state, F64)


H = torch.tensor([2.0, 1.0], dtype=F64)  # router logits [2, 1, -3], relu [2, 1, 0]


# -- pieces against literal numbers ------------------------------------------------


def test_rms_norm_eps_inside_the_square_root():
    # mean(x^2) = (9 + 16) / 2 = 12.5; eps 0.5 inside the root: 1 / sqrt(13)
    y = rms_norm(torch.tensor([3.0, 4.0], dtype=F64), torch.tensor([1.0, 2.0], dtype=F64), 0.5)
    assert torch.allclose(y, torch.tensor([3 / math.sqrt(13), 8 / math.sqrt(13)], dtype=F64), atol=1e-12)


def test_rope_rotate_half_two_positions():
    # hd=4, theta=100: frequencies 100^0 = 1 and 100^(-2/4) = 0.1.
    # Position 0 is the identity. Position 1 pairs (x0, x2) by 1 rad and (x1, x3) by 0.1 rad:
    # x0' = 1 cos1 - 3 sin1 = -1.98411, x2' = 3 cos1 + 1 sin1 = 2.46238,
    # x1' = 2 cos.1 - 4 sin.1 = 1.59067, x3' = 4 cos.1 + 2 sin.1 = 4.17968.
    x = torch.tensor([1.0, 2, 3, 4], dtype=F64).expand(1, 2, 1, 4)
    y = rope(x, 100.0)[0, :, 0]
    assert torch.allclose(y[0], x[0, 0, 0])
    assert torch.allclose(y[1], torch.tensor([-1.9841106, 1.5906747, 2.4623779, 4.1796835], dtype=F64), atol=1e-6)


@pytest.mark.parametrize(
    "router_norm, scale, kw, want_score",
    [
        # relu(raw) = [2, 1, 0] times the scale vector; scale 0 / negative keeps the expert active
        ("simple", [0.5, 0.0, -2.0], {}, [1.0, 0.0, -0.0]),
        ("simple", [-0.5, 3.0, 1.0], {}, [-1.0, 3.0, 0.0]),
        ("simple", [3.0], {}, [6.0, 3.0, 0.0]),  # router_norm_scalar: one scale for all
        ("simple", None, {"router_scale_constant": 0.1}, [0.2, 0.1, 0.0]),  # router_norm_fixed
        # rms: mean(r^2) = 5/3 -> r / sqrt(5/3 + 1e-5) * [1, 2, 3] = [1.54919, 1.54919, 0]
        ("rms", [1.0, 2.0, 3.0], {}, [1.5491887, 1.5491887, 0.0]),
        # normal: mean(r) = 1 -> [1, 0, -1], mean sq 2/3 -> [1.22474, 0, -1.22474] * [1, 2, 3];
        # the inactive expert gets -3.67421 (blockffn/layernorm.py normal_layernorm)
        ("normal", [1.0, 2.0, 3.0], {}, [1.2247357, 0.0, -3.6742071]),
        ("none", None, {}, [2.0, 1.0, 0.0]),
        # sqrelu: relu(raw)^2 = [4, 1, 0]
        ("simple", [1.0, 1.0, 1.0], {"router_act": "sqrelu"}, [4.0, 1.0, 0.0]),
    ],
)
def test_router_scores_and_activity(router_norm, scale, kw, want_score):
    m = router_model(router_norm, scale, **kw)
    score, active = m.route(0, H)
    assert torch.allclose(score, torch.tensor(want_score, dtype=F64), atol=1e-6)
    # activity is relu(raw) > 0, decided before any scaling or norm
    assert active.tolist() == [True, True, False]


def test_expert_bias_base_changes_activity_not_score():
    # raw [2, 1, -3] + bias [-2.5, 0, 5] = [-0.5, 1, 2]: expert 0 is switched off; expert 2 is
    # routed but relu(raw) = 0, so its score is 0 and it is not counted active (statistics.py counts
    # router_score != 0). Expert 1 keeps its unbiased score relu(1) = 1 (times scale 1).
    m = router_model("simple", [1.0, 1.0, 1.0], expert_bias="base")
    m.w["model.layers.0.mlp.expert_bias"] = torch.tensor([-2.5, 0.0, 5.0], dtype=F64)
    score, active = m.route(0, H)
    assert score.tolist() == [0.0, 1.0, 0.0]
    assert active.tolist() == [False, True, False]


def test_expert_bias_rms_scales_bias_by_raw_rms():
    # k = sqrt(mean(raw^2)) = sqrt((4 + 1 + 9) / 3) = 2.16025 (raw logits, before relu)
    # raw + b k with b = [-0.5, -1, 2]: [0.91988, -1.16025, 1.32049] -> routed [T, F, T]
    # score = relu(raw) on routed = [2, 0, 0]
    m = router_model("simple", [1.0, 1.0, 1.0], expert_bias="rms")
    m.w["model.layers.0.mlp.expert_bias"] = torch.tensor([-0.5, -1.0, 2.0], dtype=F64)
    score, active = m.route(0, H)
    assert score.tolist() == [2.0, 0.0, 0.0]
    assert active.tolist() == [True, False, False]
    # with b = [-1, ...] expert 0 is off: 2 - 2.16025 < 0 (a base bias of -1 would keep it on)
    m.w["model.layers.0.mlp.expert_bias"] = torch.tensor([-1.0, -1.0, 2.0], dtype=F64)
    assert m.route(0, H)[1].tolist() == [False, False, False]


U = torch.tensor([1.0, 3.0, -2.0, 6.0], dtype=F64)  # E=2 blocks of De=2: [1, 3] and [-2, 6]


@pytest.mark.parametrize(
    "act, want",
    [
        # mean of all 4 entries = 2 -> [-1, 1 | -4, 4]; block mean squares 1 and 16; eps 0.5 inside
        # the root: [-1, 1] / sqrt(1.5), [-4, 4] / sqrt(16.5); times act_norm [2, 0.5]:
        # [-1.63299, 0.40825, -1.96946, 0.49237] -> silu
        ("norm_silu", [-0.26686495, 0.24522159, -0.24115393, 0.30559365]),
        # no mean: block mean squares (1 + 9) / 2 = 5 and (4 + 36) / 2 = 20:
        # [1, 3] / sqrt(5.5) * [2, .5] = [0.85280, 0.63960]; [-2, 6] / sqrt(20.5) * [2, .5] = [-0.88345, 0.66259]
        ("norm_silu_nomean", [0.59794680, 0.41872419, -0.25837700, 0.43720400]),
        # mean only: silu([-1, 1, -4, 4])
        ("norm_silu_norms", [-0.26894142, 0.73105858, -0.07194484, 3.92805516]),
        ("silu", [0.73105858, 2.85772238, -0.23840584, 5.98516426]),
        ("relu", [1.0, 3.0, 0.0, 6.0]),
    ],
)
def test_expert_activations(act, want):
    c = tiny_config(num_experts=2, router_scale_size=2, expert_act=act, norm_eps=0.5)
    state = random_state(c)
    if c.has_block_norm:
        state["model.layers.0.mlp.expert_act.rms_norm.weight"] = torch.tensor([2.0, 0.5])
    m = DecoModel(c, state, F64)
    assert torch.allclose(m.expert_act(0, U), torch.tensor(want, dtype=F64), atol=1e-7)


def ffn_model(expert_act="relu", gated=False) -> DecoModel:
    """d=2, E=2, De=2, Ds=1 with small integer weights (see test_deco_ffn_layer_*)."""
    c = tiny_config(
        hidden_size=2,
        num_heads=1,
        head_dim=2,
        num_experts=2,
        router_scale_size=2,
        shared_ffn_size=1,
        expert_act=expert_act,
        expert_gated=gated,
    )
    state = random_state(c)
    p = "model.layers.0.mlp."
    state |= {
        p + "moe_router.weight": torch.tensor([[1.0, 0.0], [0.0, -1.0]]),  # h=[1,2]: raw [1, -2]
        p + "router_norm.weight": torch.tensor([2.0, 5.0]),
        # expert 0 rows [1, 1], [1, -1]; expert 1 rows [2, 0], [0, 1]
        p + "expert_up_proj.weight": torch.tensor([[1.0, 1], [1, -1], [2, 0], [0, 1]]),
        # columns of expert 0: [1, 3] and [2, 4]; expert 1's columns are never used
        p + "expert_down_proj.weight": torch.tensor([[1.0, 2, 100, 100], [3, 4, 100, 100]]),
        p + "shared_experts.gate_proj.weight": torch.tensor([[1.0, 0.0]]),
        p + "shared_experts.up_proj.weight": torch.tensor([[0.0, 1.0]]),
        p + "shared_experts.down_proj.weight": torch.tensor([[1.0], [-1.0]]),
    }
    if gated:
        state[p + "expert_gate_proj.weight"] = torch.tensor([[0.0, 1], [1, 0], [1, 1], [0, 0]])  # gate0 = [2, 1]
    if c.has_block_norm:
        state[p + "expert_act.rms_norm.weight"] = torch.tensor([1.0, 0.5])
    return DecoModel(c, state, F64)


HF = torch.tensor([1.0, 2.0], dtype=F64)
SHARED = 2 * 0.7310585786300049  # silu(gate . h = 1) * (up . h = 2) = 1.46212, down [1, -1]


def test_deco_ffn_layer_relu():
    # router: raw [1, -2] -> relu [1, 0] -> times scale [2, 5] -> s = [2, 0]; only expert 0 active.
    # u0 = [1+2, 1-2] = [3, -1]; relu -> [3, 0]; W_down block 0 . v0 = 3*[1, 3] + 0*[2, 4] = [3, 9]
    # y = 2 * [3, 9] + shared [1.46212, -1.46212] = [7.46212, 16.53788]
    y, active = ffn_model("relu").deco_ffn(0, HF)
    assert active.tolist() == [True, False]
    assert torch.allclose(y, torch.tensor([6 + SHARED, 18 - SHARED], dtype=F64), atol=1e-12)


def test_deco_ffn_layer_norm_silu():
    # u = [3, -1, 2, 2] (expert 1 is inactive but still in the mean): mean 1.5
    # block 0 centred [1.5, -2.5], mean square 4.25 -> / sqrt(4.25 + 1e-5) * [1, 0.5]
    # v0 = silu([0.727607, -0.606339]) = [0.49033, -0.21271]
    # y = 2 * (v0[0] [1, 3] + v0[1] [2, 4]) + shared
    y, _ = ffn_model("norm_silu").deco_ffn(0, HF)
    r = math.sqrt(4.25 + 1e-5)
    v0 = [silu(1.5 / r), silu(-2.5 / r * 0.5)]
    want = [2 * (v0[0] * 1 + v0[1] * 2) + SHARED, 2 * (v0[0] * 3 + v0[1] * 4) - SHARED]
    assert torch.allclose(y, torch.tensor(want, dtype=F64), atol=1e-12)


def test_deco_ffn_layer_gated_silu():
    # gated: v = act(gate) * up; gate0 = [2, 1], up0 = [3, -1]: v0 = [silu(2) * 3, silu(1) * -1]
    y, _ = ffn_model("silu", gated=True).deco_ffn(0, HF)
    v0 = [silu(2) * 3, -silu(1)]
    want = [2 * (v0[0] + 2 * v0[1]) + SHARED, 2 * (3 * v0[0] + 4 * v0[1]) - SHARED]
    assert torch.allclose(y, torch.tensor(want, dtype=F64), atol=1e-12)


def test_deco_ffn_layer_gated_norm_silu_mean_is_over_the_gate():
    # gate = [2, 1, 3, 0]: mean 1.5 -> block 0 [0.5, -0.5], mean square 0.25
    # act0 = silu([0.5, -0.5 * 0.5] / sqrt(0.25 + 1e-5)); v0 = act0 * up0 [3, -1]
    y, _ = ffn_model("norm_silu", gated=True).deco_ffn(0, HF)
    r = math.sqrt(0.25 + 1e-5)
    v0 = [silu(0.5 / r) * 3, silu(-0.25 / r) * -1]
    want = [2 * (v0[0] + 2 * v0[1]) + SHARED, 2 * (3 * v0[0] + 4 * v0[1]) - SHARED]
    assert torch.allclose(y, torch.tensor(want, dtype=F64), atol=1e-12)


def test_inactive_expert_contributes_exactly_zero():
    m = ffn_model("norm_silu")
    y, _ = m.deco_ffn(0, HF)
    m.w["model.layers.0.mlp.expert_down_proj.weight"][:, 2:] = 1e30  # expert 1 is inactive
    assert torch.equal(m.deco_ffn(0, HF)[0], y)


def test_zero_scale_expert_is_active_and_contributes_zero():
    m = ffn_model("relu")
    m.w["model.layers.0.mlp.router_norm.weight"] = torch.tensor([0.0, 5.0], dtype=F64)
    y, active = m.deco_ffn(0, HF)
    assert active.tolist() == [True, False]
    assert torch.allclose(y, torch.tensor([SHARED, -SHARED], dtype=F64), atol=1e-12)


def test_non_sparse_router_activation_is_rejected():
    with pytest.raises(DecoError, match="not sparse"):
        DecoModel(tiny_config(router_act="gelu"), {}, F64)


# -- whole forwards against an independent loop implementation --------------------


def silu(z: float) -> float:
    return z / (1 + math.exp(-z))


def loop_rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return np.array([x[j] / math.sqrt(sum(v * v for v in x) / len(x) + eps) * w[j] for j in range(len(x))])


def loop_rope(v: np.ndarray, pos: int, theta: float) -> np.ndarray:
    half, out = len(v) // 2, v.copy()
    for j in range(half):
        a = pos * theta ** (-2 * j / len(v))
        out[j] = v[j] * math.cos(a) - v[j + half] * math.sin(a)
        out[j + half] = v[j + half] * math.cos(a) + v[j] * math.sin(a)
    return out


def loop_swiglu(h, gate, up, down):
    return down @ np.array([silu(g) * u for g, u in zip(gate @ h, up @ h, strict=True)])


def loop_deco_ffn(c: DecoConfig, W: dict, p: str, h: np.ndarray):
    E, De = c.num_experts, c.expert_ffn_size
    raw = W[p + "moe_router.weight"] @ h
    r = [max(z, 0.0) ** (2 if c.router_act == "sqrelu" else 1) for z in raw]
    if c.expert_bias != "none":
        k = 1.0 if c.expert_bias == "base" else math.sqrt(sum(z * z for z in raw) / E)
        r = [r[e] if raw[e] + W[p + "expert_bias"][e] * k > 0 else 0.0 for e in range(E)]
    active = [r[e] > 0 for e in range(E)]
    if c.router_scale_constant is not None:
        scale = [c.router_scale_constant] * E
    elif c.router_norm != "none":
        w = W[p + "router_norm.weight"].reshape(-1)
        scale = [w[0]] * E if len(w) == 1 else list(w)
    if c.router_norm == "simple":
        s = [r[e] * scale[e] for e in range(E)]
    elif c.router_norm == "rms":
        n = math.sqrt(sum(z * z for z in r) / E + c.norm_eps)
        s = [r[e] / n * scale[e] for e in range(E)]
    elif c.router_norm == "normal":
        m = sum(r) / E
        n = math.sqrt(sum((z - m) ** 2 for z in r) / E + c.norm_eps)
        s = [(r[e] - m) / n * scale[e] for e in range(E)]
    else:
        s = r
    u = W[p + "expert_up_proj.weight"] @ h
    a = W[p + "expert_gate_proj.weight"] @ h if c.expert_gated else u
    if c.expert_act in ("norm_silu", "norm_silu_norms"):
        a = a - sum(a) / len(a)
    if c.expert_act in ("norm_silu", "norm_silu_nomean"):
        block_norm = W[p + "expert_act.rms_norm.weight"]
        a = np.concatenate([loop_rms(a[e * De : (e + 1) * De], block_norm, c.norm_eps) for e in range(E)])
    a = np.array([max(z, 0.0) if c.expert_act == "relu" else silu(z) for z in a])
    v = a * u if c.expert_gated else a
    y = np.zeros(c.hidden_size)
    for e in range(E):
        if s[e] != 0:  # only experts with a non-zero score (normal router norm: all of them)
            y += s[e] * (W[p + "expert_down_proj.weight"][:, e * De : (e + 1) * De] @ v[e * De : (e + 1) * De])
    if c.shared_ffn_size:
        q = p + "shared_experts."
        y += loop_swiglu(h, W[q + "gate_proj.weight"], W[q + "up_proj.weight"], W[q + "down_proj.weight"])
    return y, active


def loop_forward(c: DecoConfig, state: dict, ids: list[int]):
    """Logits [T, V] and per-layer active lists, one token / head / expert at a time."""
    W = {k: v.double().numpy() for k, v in state.items()}
    if c.tied_embeddings:
        W["lm_head.weight"] = W["model.embed_tokens.weight"]
    T, hd, eps = len(ids), c.head_dim, c.norm_eps
    xs = [W["model.embed_tokens.weight"][t] * c.embedding_scale for t in ids]
    masks = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        hs = [loop_rms(x, W[p + "input_layernorm.weight"], eps) for x in xs]
        q, k, v = (W[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        Q = [
            [loop_rope(q[j * hd : (j + 1) * hd] @ hs[t], t, c.rope_theta) for j in range(c.num_heads)] for t in range(T)
        ]
        K = [
            [loop_rope(k[g * hd : (g + 1) * hd] @ hs[t], t, c.rope_theta) for g in range(c.num_kv_heads)]
            for t in range(T)
        ]
        V = [[v[g * hd : (g + 1) * hd] @ hs[t] for g in range(c.num_kv_heads)] for t in range(T)]
        for t in range(T):
            heads = []
            for j in range(c.num_heads):
                g = j // (c.num_heads // c.num_kv_heads)
                z = [float(Q[t][j] @ K[s][g]) / math.sqrt(hd) for s in range(t + 1)]
                e = [math.exp(zz - max(z)) for zz in z]
                heads.append(sum(e[s] / sum(e) * V[s][g] for s in range(t + 1)))
            xs[t] = xs[t] + c.residual_scale * (W[p + "self_attn.o_proj.weight"] @ np.concatenate(heads))
        layer_mask = []
        for t in range(T):
            h = loop_rms(xs[t], W[p + "post_attention_layernorm.weight"], eps)
            if c.moe_layers[i]:
                y, active = loop_deco_ffn(c, W, p + "mlp.", h)
                layer_mask.append(active)
            else:
                y = loop_swiglu(h, *(W[p + f"mlp.{part}_proj.weight"] for part in ("gate", "up", "down")))
            xs[t] = xs[t] + c.residual_scale * y
        masks.append(layer_mask if c.moe_layers[i] else None)
    logits = [W["lm_head.weight"] @ loop_rms(x, W["model.norm.weight"], eps) / c.logit_scale for x in xs]
    return np.array(logits), masks


CASES = {
    "deco_gqa": {},
    "mha": dict(num_kv_heads=2),
    "gqa_4_heads_2_groups": dict(num_heads=4, num_kv_heads=2),
    "dense_then_deco": dict(num_layers=2, moe_layers=[False, True]),
    "deco_then_dense": dict(num_layers=2, moe_layers=[True, False]),
    "all_dense": dict(num_layers=2, moe_layers=[False, False], num_experts=0, expert_ffn_size=0, router_scale_size=0),
    "gated": dict(expert_gated=True),
    "gated_norm_silu_nomean": dict(expert_gated=True, expert_act="norm_silu_nomean"),
    "norm_silu_nomean": dict(expert_act="norm_silu_nomean"),
    "norm_silu_norms": dict(expert_act="norm_silu_norms"),
    "silu": dict(expert_act="silu"),
    "relu": dict(expert_act="relu"),
    "router_scalar": dict(router_scale_size=1),
    "router_fixed": dict(router_scale_size=1, router_scale_constant=0.3),
    "router_rms": dict(router_norm="rms"),
    "router_normal": dict(router_norm="normal"),
    "router_none": dict(router_norm="none", router_scale_size=0),
    "sqrelu": dict(router_act="sqrelu"),
    "bias_base": dict(expert_bias="base"),
    "bias_rms": dict(expert_bias="rms"),
    "mup": dict(
        embedding_scale=12.0, residual_scale=1.4 / math.sqrt(2), logit_scale=4.0, num_layers=2, moe_layers=[False, True]
    ),
    "tied": dict(tied_embeddings=True),
    "no_shared": dict(shared_ffn_size=0),
    "rope_theta_small": dict(rope_theta=3.0, head_dim=4, num_heads=1, hidden_size=4),
    "wide_heads": dict(head_dim=4, num_heads=2, num_kv_heads=1),  # heads * head_dim != d
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_loop_implementation(name):
    c = tiny_config(**CASES[name])
    state = random_state(c, seed=len(name))
    ids = [1, 4, 0, 3, 3, 2]
    out = DecoModel(c, state, F64)(torch.tensor(ids))
    want, masks = loop_forward(c, state, ids)
    assert out.logits.shape == (1, len(ids), c.vocab_size)
    np.testing.assert_allclose(out.logits[0].numpy(), want, rtol=1e-10, atol=1e-10)
    for i, mask in enumerate(masks):
        if mask is None:
            assert out.activation[i] is None
        else:
            assert out.activation[i][0].tolist() == mask
    rates = [r for r in out.activation_rate if r is not None]
    if rates:  # the random cases have both active and inactive experts
        assert 0 < out.mean_activation < 1


def test_fp32_model_close_to_fp64():
    c = tiny_config(num_layers=2, moe_layers=[False, True])
    state = random_state(c)
    ids = torch.tensor([1, 2, 3])
    a, b = DecoModel(c, state, torch.float32)(ids), DecoModel(c, state, F64)(ids)
    assert a.logits.dtype == torch.float32
    assert torch.allclose(a.logits.double(), b.logits, atol=1e-5)


def test_batch_rows_are_independent_and_causal():
    c = tiny_config(num_layers=2, moe_layers=[False, True])
    m = DecoModel(c, random_state(c), F64)
    batch = m(torch.tensor([[1, 2, 3, 4], [1, 2, 0, 0]]))
    assert torch.allclose(batch.logits[0], m(torch.tensor([1, 2, 3, 4])).logits[0], atol=1e-12)
    assert torch.allclose(batch.logits[1], m(torch.tensor([1, 2, 0, 0])).logits[0], atol=1e-12)
    # causal: the first two positions do not see tokens 3..4
    assert torch.allclose(batch.logits[0, :2], batch.logits[1, :2], atol=1e-12)
    assert batch.activation[1].shape == (2, 4, 3)


def test_generate_greedy_follows_argmax_of_the_loop_implementation():
    c = tiny_config(num_layers=2, moe_layers=[False, True])
    state = random_state(c, seed=3)
    got = DecoModel(c, state, F64).generate_greedy([1, 2], 4)
    ids = [1, 2]
    for _ in range(4):
        ids.append(int(np.argmax(loop_forward(c, state, ids)[0][-1])))
    assert got == ids[2:]


def test_one_token_dense_forward_by_hand():
    # V=3, d=2, one head of 2, one dense layer, eps 1e-5. Token 2, embedding [3, -4].
    c = tiny_config(
        vocab_size=3,
        hidden_size=2,
        num_heads=1,
        num_kv_heads=1,
        head_dim=2,
        dense_ffn_size=1,
        moe_layers=[False],
        num_experts=0,
        expert_ffn_size=0,
        router_scale_size=0,
    )
    one = torch.ones(2, dtype=F64)
    state = {
        "model.embed_tokens.weight": torch.tensor([[1.0, 0], [0, 2], [3, -4]]),
        "model.norm.weight": one,
        "lm_head.weight": torch.tensor([[1.0, 0], [0, 1], [1, 1]]),
        "model.layers.0.input_layernorm.weight": one,
        "model.layers.0.post_attention_layernorm.weight": one,
        "model.layers.0.self_attn.q_proj.weight": torch.eye(2),
        "model.layers.0.self_attn.k_proj.weight": torch.eye(2),
        "model.layers.0.self_attn.v_proj.weight": torch.eye(2),
        "model.layers.0.self_attn.o_proj.weight": 0.5 * torch.eye(2),
        "model.layers.0.mlp.gate_proj.weight": torch.tensor([[1.0, 0]]),
        "model.layers.0.mlp.up_proj.weight": torch.tensor([[0.0, 1]]),
        "model.layers.0.mlp.down_proj.weight": torch.tensor([[1.0], [1.0]]),
    }
    # one token: attention returns v = h = [3, -4] / sqrt(12.5 + eps) = [0.84853, -1.13137]
    n1 = math.sqrt(12.5 + 1e-5)
    x = [3 + 0.5 * 3 / n1, -4 - 0.5 * 4 / n1]  # [3.42426, -4.56569]
    n2 = math.sqrt((x[0] ** 2 + x[1] ** 2) / 2 + 1e-5)
    f = silu(x[0] / n2) * (x[1] / n2)  # silu(0.8485) * -1.1314 = -0.67153
    x = [x[0] + f, x[1] + f]
    n3 = math.sqrt((x[0] ** 2 + x[1] ** 2) / 2 + 1e-5)
    h = [x[0] / n3, x[1] / n3]
    logits = DecoModel(c, state, F64)(torch.tensor([2])).logits[0, 0]
    assert torch.allclose(logits, torch.tensor([h[0], h[1], h[0] + h[1]], dtype=F64), atol=1e-12)


# -- loading HF directories (fixtures) ------------------------------------------------

fixtures = pytest.importorskip("deco_gguf.fixtures")


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    return {name: fixtures.write_fixture(root / name, name) for name in fixtures.VARIANTS}


@pytest.mark.parametrize("name", sorted(fixtures.VARIANTS))
def test_every_fixture_variant_loads_and_gives_finite_logits(fixture_dirs, name):
    m = DecoModel.from_pretrained(fixture_dirs[name])
    out = m(torch.arange(1, 25))
    assert out.logits.shape == (1, 24, m.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert [a is not None for a in out.activation] == m.config.moe_layers
    assert all(0 < r < 1 for r in out.activation_rate if r is not None)


@pytest.mark.parametrize("name", ["base", "bf16", "sharded", "router_fixed", "tied", "mup", "expert_bias_rms"])
def test_loaded_fixture_matches_loop_implementation(fixture_dirs, name):
    m = DecoModel.from_pretrained(fixture_dirs[name], dtype=F64)
    from deco_gguf.model.checkpoint import HFCheckpoint

    ckpt = HFCheckpoint(fixture_dirs[name])
    state = {n: ckpt.tensor(n) for n in hf_shapes(ckpt.config)}
    ids = [5, 17, 300, 2]
    want, masks = loop_forward(ckpt.config, state, ids)
    out = m(torch.tensor(ids))
    np.testing.assert_allclose(out.logits[0].numpy(), want, rtol=1e-9, atol=1e-9)
    for i, mask in enumerate(masks):
        if mask is not None:
            assert out.activation[i][0].tolist() == mask


def test_bf16_checkpoint_keeps_router_in_fp32(fixture_dirs):
    m = DecoModel.from_pretrained(fixture_dirs["router_bf16"], dtype=torch.bfloat16)
    assert m.w["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert m.w["model.layers.1.mlp.moe_router.weight"].dtype == torch.float32
    out = m(torch.arange(1, 9))
    assert torch.isfinite(out.logits).all()
    ref = DecoModel.from_pretrained(fixture_dirs["router_bf16"])(torch.arange(1, 9))
    assert torch.allclose(out.logits, ref.logits, atol=0.3)  # bf16 activations vs fp32: same model


def test_loading_matches_state_dict_construction(fixture_dirs):
    spec = fixtures.VARIANTS["sharded"]
    state = fixtures.make_state_dict(spec)
    cfg = DecoModel.from_pretrained(fixture_dirs["sharded"]).config
    a = DecoModel(cfg, state)(torch.arange(3, 11))
    b = DecoModel.from_pretrained(fixture_dirs["sharded"])(torch.arange(3, 11))
    assert torch.equal(a.logits, b.logits)


def test_missing_tensor_is_a_clear_error():
    c = tiny_config()
    state = random_state(c)
    del state["model.layers.0.mlp.expert_up_proj.weight"]
    with pytest.raises(DecoError, match="expert_up_proj"):
        DecoModel(c, state)


def test_router_none_ignores_a_stored_router_norm_weight():
    c = tiny_config(router_norm="none", router_scale_size=0)
    state = random_state(c)
    want = DecoModel(c, state, F64)(torch.tensor([1, 2])).logits
    state["model.layers.0.mlp.router_norm.weight"] = torch.full((3,), 7.0)
    assert torch.equal(DecoModel(c, state, F64)(torch.tensor([1, 2])).logits, want)
