"""The DecoConfig of a released checkpoint (docs/deco.md, "Released checkpoints and their config.json").

Shapes come from the tensors, the rest from the Megatron keys; the HF-style keys are template values and
are only compared, with a warning naming both values when they disagree. `ckpt` is anything with the
HFCheckpoint's `path`, `names`, `has(name)`, `shape(name)` and `overrides`.
"""

from __future__ import annotations

import math
import re

from ..support.errors import DecoError
from .config import DecoConfig, router_norm_from_json
from .layout import HF_LAYER, hf_name

DEFAULT_CONTEXT = 4096  # DECO's training context
MUP_KEYS = ("scale_emb", "scale_depth", "dim_model_base")
LAYER_RE = re.compile("^" + re.escape(HF_LAYER).replace(re.escape("{i}"), r"(\d+)") + r"\.")


def resolve_config(raw: dict, ckpt) -> DecoConfig:
    """The config of checkpoint `ckpt` whose config.json (overrides applied) is `raw`; its warnings say
    where config.json and the tensors disagree."""
    return _Resolver(raw, ckpt).config()


def _layer_indices(names: list[str]) -> list[int]:
    layers = sorted({int(m.group(1)) for n in names if (m := LAYER_RE.match(n))})
    if layers != list(range(len(layers))):
        raise DecoError(f"layer indices are not contiguous from 0: {layers}")
    return layers


def _moe_layer_freq(value, num_layers: int) -> list[bool] | None:
    """moe_layer_freq as written: a list of 0/1 per layer, or an int N (layer i is DECO if i % N == 0)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise DecoError(f"config.json moe_layer_freq must be an int or a list, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise DecoError(f"config.json moe_layer_freq must be >= 1, got {value}")
        return [i % value == 0 for i in range(num_layers)]
    return [bool(v) for v in value]


class _Resolver:
    """One resolution: each step returns DecoConfig fields and appends its warnings, in this order."""

    def __init__(self, raw: dict, ckpt):
        self.raw = raw
        self.ckpt = ckpt
        self.warnings: list[str] = []

    def config(self) -> DecoConfig:
        if self.raw.get("use_blockffn") is False:
            raise DecoError("config.json use_blockffn is false: this is not a DECO (BlockFFN) checkpoint")
        model = self.model_shape()
        moe_layers = model["moe_layers"]
        fields = model | self.attention_shape() | self.dense_shape(moe_layers) | self.expert_shape(moe_layers)
        fields |= self.router(moe_layers)
        fields |= self.norm_and_context()
        fields |= self.mup_scales(fields["num_layers"], fields["hidden_size"])
        config = DecoConfig(**fields, tied_embeddings=not self.ckpt.has(hf_name("output")), warnings=self.warnings)
        config.validate()
        return config

    def compare(self, key: str, truth, what: str) -> None:
        """Warn when a config.json key disagrees with the value taken from the tensors."""
        value = self.raw.get(key)
        if value is not None and value != truth:
            self.warnings.append(f"config.json {key}={value!r} disagrees with the {what} ({truth!r}); using {truth!r}")

    def shape(self, kind: str, layer: int | None = None) -> tuple[int, ...]:
        return self.ckpt.shape(hf_name(kind, layer))

    def has(self, kind: str, layer: int | None = None) -> bool:
        return self.ckpt.has(hf_name(kind, layer))

    def model_shape(self) -> dict:
        """Vocabulary, width, layers and their kinds (from the tensors; moe_layer_freq is only compared)."""
        for kind in ("token_embd", "output_norm"):
            if not self.has(kind):
                raise DecoError(f"{self.ckpt.path}: missing tensor {hf_name(kind)}")
        vocab_size, d = self.shape("token_embd")
        layers = _layer_indices(self.ckpt.names)
        if not layers:
            raise DecoError(f"{self.ckpt.path}: no model.layers.* tensors")
        moe_layers = []
        for i in layers:
            is_moe = self.has("ffn_gate_inp", i)
            if not is_moe and not self.has("ffn_gate", i):
                raise DecoError(f"layer {i} has neither a router (DECO FFN) nor a dense gate_proj")
            moe_layers.append(is_moe)
        declared = _moe_layer_freq(self.raw.get("moe_layer_freq"), len(layers))
        if declared is not None and declared != moe_layers:
            self.warnings.append(
                f"config.json moe_layer_freq={self.raw['moe_layer_freq']!r} disagrees with the tensors "
                f"(DECO layers {[i for i, m in enumerate(moe_layers) if m]}); using the tensors"
            )
        self.compare("num_layers", len(layers), "tensors' layer count")
        self.compare("num_hidden_layers", len(layers), "tensors' layer count")
        self.compare("hidden_size", d, "embedding width")
        self.compare("vocab_size", vocab_size, "embedding rows")
        return dict(vocab_size=vocab_size, hidden_size=d, num_layers=len(layers), moe_layers=moe_layers)

    def attention_shape(self) -> dict:
        """Head size and KV heads from q_proj and k_proj: the head count is the one thing the tensors
        cannot tell."""
        num_heads = self.raw.get("num_attention_heads")
        if not isinstance(num_heads, int) or num_heads < 1:
            raise DecoError("config.json num_attention_heads is missing or invalid")
        q_rows, k_rows = self.shape("attn_q", 0)[0], self.shape("attn_k", 0)[0]
        if q_rows % num_heads:
            raise DecoError(f"q_proj has {q_rows} rows, not divisible by num_attention_heads={num_heads}")
        head_dim = q_rows // num_heads
        if k_rows % head_dim:
            raise DecoError(f"k_proj has {k_rows} rows, not a multiple of head_dim {head_dim}")
        num_kv_heads = k_rows // head_dim
        self.compare("kv_channels", head_dim, "head_dim from q_proj")
        self.compare("head_dim", head_dim, "head_dim from q_proj")
        self.compare("num_query_groups", num_kv_heads, "KV groups from k_proj")
        self.compare("num_key_value_heads", num_kv_heads, "KV groups from k_proj")
        return dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)

    def dense_shape(self, moe_layers: list[bool]) -> dict:
        dense = [i for i, is_moe in enumerate(moe_layers) if not is_moe]
        if not dense:
            return dict(dense_ffn_size=0)
        dense_ffn = self.shape("ffn_gate", dense[0])[0]
        self.compare("ffn_hidden_size", dense_ffn, "dense gate_proj rows")
        self.compare("intermediate_size", dense_ffn, "dense gate_proj rows")
        return dict(dense_ffn_size=dense_ffn)

    def expert_shape(self, moe_layers: list[bool]) -> dict:
        """E, De, Ds and gated experts, from the first DECO layer's tensors."""
        moe = [i for i, is_moe in enumerate(moe_layers) if is_moe]
        if not moe:
            return dict(num_experts=0, expert_ffn_size=0, shared_ffn_size=0, expert_gated=False)
        num_experts = self.shape("ffn_gate_inp", moe[0])[0]
        up_rows = self.shape("ffn_up_exps", moe[0])[0]
        if num_experts < 1 or up_rows % num_experts:
            raise DecoError(f"expert_up_proj has {up_rows} rows, not a multiple of {num_experts} experts")
        expert_ffn = up_rows // num_experts
        shared_ffn = self.shape("ffn_gate_shexp", moe[0])[0] if self.has("ffn_gate_shexp", moe[0]) else 0
        gated_layers = {self.has("ffn_gate_exps", i) for i in moe}
        if len(gated_layers) > 1:
            raise DecoError("some DECO layers have expert_gate_proj and others do not")
        gated = gated_layers.pop()
        self.compare("num_experts", num_experts, "router rows")
        self.compare("moe_ffn_hidden_size", expert_ffn, "expert width from expert_up_proj")
        self.compare("moe_shared_expert_intermediate_size", shared_ffn, "shared expert width")
        self.compare("expert_not_gated", not gated, "presence of expert_gate_proj (gated experts)")
        return dict(num_experts=num_experts, expert_ffn_size=expert_ffn, shared_ffn_size=shared_ffn, expert_gated=gated)

    def router(self, moe_layers: list[bool]) -> dict:
        """Activations, router norm and its scale (a tensor of E or 1 entries, or a fixed constant), expert
        bias."""
        raw = self.raw
        router_norm = router_norm_from_json(raw.get("router_norm_type", "simple"))
        scale_size, scale_constant = 0, None
        first_moe = moe_layers.index(True) if any(moe_layers) else None
        if first_moe is not None and router_norm != "none":
            if raw.get("router_norm_fixed"):
                scale_size, scale_constant = 1, float(raw.get("router_norm_init_var", 0.1))
            elif self.has("ffn_router_scale", first_moe):
                scale_size = math.prod(self.shape("ffn_router_scale", first_moe))
                self.compare("router_norm_scalar", scale_size == 1, "router_norm.weight size")
            else:
                scale_name = hf_name("ffn_router_scale", first_moe)
                raise DecoError(f"router_norm_type {router_norm!r} needs {scale_name} (or router_norm_fixed)")
        expert_bias = "none"
        if raw.get("moe_router_enable_expert_bias"):
            expert_bias = raw.get("moe_expert_bias_apply_method") or "base"
        return dict(
            expert_act=raw.get("expert_act_func", "norm_silu"),
            router_act=raw.get("router_act_func", "relu"),
            router_norm=router_norm,
            router_scale_size=scale_size,
            router_scale_constant=scale_constant,
            expert_bias=expert_bias,
        )

    def norm_and_context(self) -> dict:
        """The eps from norm_epsilon, never rms_norm_eps; rope_scaling ignored; the training context."""
        raw = self.raw
        norm_eps = raw.get("norm_epsilon")
        if norm_eps is None:
            norm_eps = 1e-5
            self.warnings.append(
                "config.json has no norm_epsilon; using 1e-5 (rms_norm_eps is a template value and is not trusted)"
            )
        elif raw.get("rms_norm_eps") not in (None, norm_eps):
            self.warnings.append(
                f"config.json rms_norm_eps={raw['rms_norm_eps']!r} ignored; using norm_epsilon={norm_eps!r}"
            )
        if rope_scaling := raw.get("rope_scaling"):
            is_dict = isinstance(rope_scaling, dict)
            kind = rope_scaling.get("rope_type", rope_scaling.get("type")) if is_dict else rope_scaling
            self.warnings.append(f"config.json rope_scaling ({kind}) ignored: DECO was trained without rope scaling")
        # The authors' converter never writes seq_length; max_position_embeddings is the template's.
        context_length = int(raw.get("seq_length") or DEFAULT_CONTEXT)
        if "seq_length" not in raw and raw.get("max_position_embeddings") not in (None, DEFAULT_CONTEXT):
            self.warnings.append(
                f"config.json max_position_embeddings={raw['max_position_embeddings']!r} is a template value; "
                f"using the training context {DEFAULT_CONTEXT}"
            )
        return dict(
            norm_eps=float(norm_eps),
            rope_theta=float(raw.get("rotary_base") or raw.get("rope_theta") or 10000.0),
            context_length=context_length,
        )

    def mup_scales(self, num_layers: int, d: int) -> dict:
        """docs/deco.md, Layer stack: the µP scales, applied only when use_mup is true."""
        raw = self.raw
        if not raw.get("use_mup"):
            return dict(embedding_scale=1.0, residual_scale=1.0, logit_scale=1.0)
        missing = [k for k in MUP_KEYS if raw.get(k) is None]
        if missing:
            raise DecoError(f"config.json use_mup is true but {', '.join(missing)} is missing")
        try:
            scales = dict(
                embedding_scale=float(raw["scale_emb"]),
                residual_scale=float(raw["scale_depth"]) / math.sqrt(num_layers),
                logit_scale=d / float(raw["dim_model_base"]),
            )
        except (TypeError, ValueError, ZeroDivisionError):
            values = ", ".join(f"{k}={raw[k]!r}" for k in MUP_KEYS)
            raise DecoError(f"use_mup scales must be non-zero numbers: {values}") from None
        # The authors' converter copies these from a template, never from the training run (docs/deco.md,
        # Released checkpoints): values that differ from training give wrong logits without any error.
        from_file = [k for k in MUP_KEYS if k not in self.ckpt.overrides]
        if from_file:
            values = ", ".join(f"{k}={raw[k]!r}" for k in MUP_KEYS)
            self.warnings.append(
                f"use_mup is true: using {values}; {', '.join(from_file)} from config.json may be template values, "
                "not the training run's; if they differ, give the true ones with --override KEY=VALUE"
            )
        return scales
