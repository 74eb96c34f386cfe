"""The converter against independent truth: the fixture specs and the source tensors read directly."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file
from sentencepiece import SentencePieceProcessor

from deco_gguf.converter import convert
from deco_gguf.fixtures import VARIANTS, write_fixture


def source_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as float32, read without the project's own reader."""
    if (hf_dir / "pytorch_model.bin").exists():
        state = torch.load(hf_dir / "pytorch_model.bin", weights_only=True)
    else:
        state = {}
        for f in sorted(hf_dir.glob("*.safetensors")):
            state |= load_file(f)
    return {k: v.float().numpy() for k, v in state.items()}


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[Q, np.ndarray]]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))
        tensors[t.name] = (t.tensor_type, data.reshape(shape))
    return fields, tensors


def expected_gguf_tensors(spec, src: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The GGUF tensors docs/gguf-format.md promises, computed from the source in float64 where derived."""
    E, De = spec.num_experts, spec.expert_ffn
    out = {"token_embd.weight": src["model.embed_tokens.weight"], "output_norm.weight": src["model.norm.weight"]}
    if not spec.tied_embeddings:
        out["output.weight"] = src["lm_head.weight"]
    for i, moe in enumerate(spec.moe_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        out[f"{b}.attn_norm.weight"] = src[f"{p}.input_layernorm.weight"]
        out[f"{b}.ffn_norm.weight"] = src[f"{p}.post_attention_layernorm.weight"]
        for ours, theirs in zip(("q", "k", "v", "output"), "qkvo", strict=True):
            out[f"{b}.attn_{ours}.weight"] = src[f"{p}.self_attn.{theirs}_proj.weight"]
        if not moe:
            for part in ("gate", "up", "down"):
                out[f"{b}.ffn_{part}.weight"] = src[f"{p}.mlp.{part}_proj.weight"]
            continue
        m = f"{p}.mlp"
        out[f"{b}.ffn_gate_inp.weight"] = src[f"{m}.moe_router.weight"]
        if spec.router_norm_type != "null":
            if spec.router_norm_fixed:
                out[f"{b}.ffn_router_scale.weight"] = np.array([spec.router_norm_init_var], np.float32)
            else:
                out[f"{b}.ffn_router_scale.weight"] = src[f"{m}.router_norm.weight"].reshape(-1)
        if spec.expert_bias:
            out[f"{b}.exp_probs_b.bias"] = src[f"{m}.expert_bias"]
        up = src[f"{m}.expert_up_proj.weight"]
        out[f"{b}.ffn_up_exps.weight"] = np.stack([up[e * De : (e + 1) * De] for e in range(E)])
        down = src[f"{m}.expert_down_proj.weight"]
        out[f"{b}.ffn_down_exps.weight"] = np.stack([down[:, e * De : (e + 1) * De] for e in range(E)])
        act_rows = up
        if spec.expert_gated:
            gate = src[f"{m}.expert_gate_proj.weight"]
            out[f"{b}.ffn_gate_exps.weight"] = np.stack([gate[e * De : (e + 1) * De] for e in range(E)])
            act_rows = gate
        if spec.expert_act in ("norm_silu", "norm_silu_norms"):
            out[f"{b}.ffn_exps_mean.weight"] = act_rows.astype(np.float64).sum(axis=0) / (E * De)
        if spec.expert_act in ("norm_silu", "norm_silu_nomean"):
            out[f"{b}.ffn_exps_norm.weight"] = src[f"{m}.expert_act.rms_norm.weight"]
        if spec.shared_ffn:
            for part in ("gate", "up", "down"):
                out[f"{b}.ffn_{part}_shexp.weight"] = src[f"{m}.shared_experts.{part}_proj.weight"]
    return out


@pytest.fixture(scope="session")
def fixture_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: write_fixture(root / name, name) for name in VARIANTS}


SPARSE_VARIANTS = sorted(v for v in VARIANTS if VARIANTS[v].router_norm_type != "normal")


@pytest.mark.parametrize("variant", SPARSE_VARIANTS)
def test_f32_conversion_is_exact_and_complete(variant, fixture_dirs, tmp_path):
    spec, hf_dir = VARIANTS[variant], fixture_dirs[variant]
    out = tmp_path / "model.gguf"
    convert(hf_dir, out, outtype="f32")
    fields, tensors = read_gguf(out)

    # Metadata against the fixture spec (what the checkpoint really is, not its stale config keys).
    a = "deco."
    dense = not all(spec.moe_layers)
    expected = {
        "general.architecture": "deco",
        a + "block_count": spec.num_layers,
        a + "embedding_length": spec.hidden_size,
        a + "feed_forward_length": spec.dense_ffn if dense else 0,
        a + "attention.head_count": spec.num_heads,
        a + "attention.head_count_kv": spec.num_kv_heads,
        a + "attention.key_length": spec.head_dim,
        a + "attention.value_length": spec.head_dim,
        a + "rope.dimension_count": spec.head_dim,
        a + "expert_count": spec.num_experts,
        a + "expert_feed_forward_length": spec.expert_ffn,
        a + "expert_shared_feed_forward_length": spec.shared_ffn,
        a + "moe_layer_mask": [int(m) for m in spec.moe_layers],
        a + "expert_gated": spec.expert_gated,
        a + "expert_activation": spec.expert_act,
        a + "router_activation": spec.router_act,
        a + "router_norm": {"null": "none"}.get(spec.router_norm_type, spec.router_norm_type),
        a + "expert_bias": spec.expert_bias or "none",
        "tokenizer.ggml.model": "llama",
    }
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(spec.norm_epsilon)
    assert fields[a + "rope.freq_base"] == pytest.approx(10000.0)
    mup = spec.use_mup
    assert fields[a + "embedding_scale"] == pytest.approx(spec.scale_emb if mup else 1.0)
    assert fields[a + "residual_scale"] == pytest.approx(spec.scale_depth / math.sqrt(spec.num_layers) if mup else 1.0)
    assert fields[a + "logit_scale"] == pytest.approx(spec.hidden_size / spec.dim_model_base if mup else 1.0)

    # Tokenizer: one token per embedding row, ids of the specials, the chat template.
    rows = spec.vocab_size or len(fields["tokenizer.ggml.tokens"])
    assert len(fields["tokenizer.ggml.tokens"]) == rows == fields[a + "vocab_size"]
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.bos_token_id"] == tokens.index("<s>")
    assert fields["tokenizer.ggml.eos_token_id"] == tokens.index("</s>")
    assert fields["tokenizer.ggml.eot_token_id"] == tokens.index("<|im_end|>")
    for special in ("<|im_start|>", "<|im_end|>"):
        assert fields["tokenizer.ggml.token_type"][tokens.index(special)] == gguf.TokenType.CONTROL
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert fields["tokenizer.chat_template"] == tok_config["chat_template"]
    if (hf_dir / "tokenizer.model").exists():
        sp = SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
        assert tokens[: sp.vocab_size()] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]

    # Tensors: exactly the promised set, F32 everywhere here, values exact (the mean row to f32 rounding).
    want = expected_gguf_tensors(spec, source_tensors(hf_dir))
    assert set(tensors) == set(want)
    for name, (qtype, data) in tensors.items():
        assert qtype == Q.F32, name
        assert data.shape == want[name].shape, name
        if name.endswith("ffn_exps_mean.weight"):
            np.testing.assert_allclose(data, want[name], rtol=1e-6, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(data, want[name], err_msg=name)


# Worst-case absolute error of each type, relative to the largest |value| of a block (or the value itself).
def within_quant_error(qtype: Q, data: np.ndarray, ref: np.ndarray) -> None:
    if qtype in (Q.F16, Q.BF16):
        rel = 2.0**-11 if qtype == Q.F16 else 2.0**-8
        np.testing.assert_allclose(data, ref, rtol=rel, atol=1e-7)
        return
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    levels = {Q.Q8_0: 127, Q.Q5_0: 16, Q.Q4_0: 8}[qtype]
    blocks_ref = ref.reshape(-1, block)
    err = np.abs(data.reshape(-1, block) - blocks_ref)
    # Q8_0 rounds to half a step; Q4_0/Q5_0 use d = max/-levels, so the far side is up to one
    # step off. The step d itself is stored as f16: up to levels * 2^-11 steps more.
    step = np.abs(blocks_ref).max(axis=1, keepdims=True) / levels
    bound = step * ((0.5 if qtype == Q.Q8_0 else 1.0) + levels * 2.0**-11) + 1e-7
    assert (err <= bound).all(), f"{qtype.name}: error {err.max()} over bound"


@pytest.mark.parametrize(
    "outtype,expert_type",
    [("f16", "q4_0"), ("q8_0", "q5_0"), ("bf16", "q8_0"), ("f32", "f16"), ("f16", "bf16")],
)
def test_quantized_tensors_within_type_error(outtype, expert_type, fixture_dirs, tmp_path):
    spec, hf_dir = VARIANTS["base"], fixture_dirs["base"]
    out = tmp_path / "model.gguf"
    warnings: list[str] = []
    convert(hf_dir, out, outtype=outtype, expert_type=expert_type, on_warning=warnings.append)
    fields, tensors = read_gguf(out)
    want = expected_gguf_tensors(spec, source_tensors(hf_dir))
    by_name = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q5_0": Q.Q5_0, "q4_0": Q.Q4_0}
    for name, (qtype, data) in tensors.items():
        base = name.split(".")[-2]
        if data.ndim == 1 or base in ("ffn_gate_inp", "ffn_router_scale"):
            assert qtype == Q.F32, name  # routers, scales, norms, mean row stay F32
            if base == "ffn_exps_mean":
                np.testing.assert_allclose(data, want[name], rtol=1e-6, atol=1e-7)
            else:
                np.testing.assert_array_equal(data, want[name])
            continue
        expected_type = by_name[expert_type if base.endswith("_exps") else outtype]
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[expected_type][0]:
            # Rows that don't fit the type's blocks (the shared expert's 48 here) fall back to F16, reported.
            expected_type = Q.F16
            assert any(w.startswith(f"{name}: rows of {data.shape[-1]}") for w in warnings), name
        assert qtype == expected_type, name
        if qtype == Q.F32:
            np.testing.assert_array_equal(data, want[name])
        else:
            within_quant_error(qtype, data, want[name])
    # general.file_type names the type of most matrix weights (docs/gguf-format.md); routers stay F32.
    weights: dict[Q, int] = {}
    for name, (qtype, data) in tensors.items():
        if data.ndim > 1 and "ffn_gate_inp" not in name:
            weights[qtype] = weights.get(qtype, 0) + data.size
    bulk = max(weights, key=weights.get)
    assert (
        fields["general.file_type"]
        == {
            Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
            Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
            Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
            Q.F16: gguf.LlamaFileType.MOSTLY_F16,
            Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
            Q.F32: gguf.LlamaFileType.ALL_F32,
        }[bulk]
    )
    # general.size_label: N, the non-embedding parameters (the precomputed mean row is no parameter)
    n = sum(
        data.size
        for name, (_, data) in tensors.items()
        if name.split(".")[-2] not in ("token_embd", "output", "ffn_exps_mean")
    )
    assert fields["general.size_label"] == gguf.model_weight_count_rounded_notation(n, min_digits=2)


def test_stale_config_keys_are_reported(fixture_dirs, tmp_path):
    warnings: list[str] = []
    convert(fixture_dirs["base"], tmp_path / "m.gguf", outtype="f32", on_warning=warnings.append)
    text = "\n".join(warnings)
    config = json.loads((fixture_dirs["base"] / "config.json").read_text())
    spec = VARIANTS["base"]
    # Each stale key that disagrees is named with both values; agreeing keys are not mentioned.
    stale = {"num_hidden_layers": spec.num_layers, "intermediate_size": spec.dense_ffn, "head_dim": spec.head_dim}
    assert config["num_key_value_heads"] == spec.num_kv_heads and "num_key_value_heads" not in text
    for key, truth in stale.items():
        assert config[key] != truth
        assert f"config.json {key}={config[key]!r} disagrees" in text and f"({truth!r}); using {truth!r}" in text
    assert f"rms_norm_eps={config['rms_norm_eps']!r} ignored" in text
    assert "rope_scaling (longrope) ignored" in text
    assert f"eos_token_id={config['eos_token_id']!r} disagrees with the tokenizer" in text


def test_output_file_has_the_permissions_of_a_new_file(fixture_dirs, tmp_path):
    old = os.umask(0o027)
    try:
        convert(fixture_dirs["base"], tmp_path / "m.gguf", outtype="f32")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_added_tokens_follow_their_special_flag(fixture_dirs, tmp_path):
    """added_tokens_decoder decides CONTROL (special) or USER_DEFINED, also for tokens that gguf's
    SentencePiece reader took from added_tokens.json and for ids past the SentencePiece model."""
    import shutil

    hf_dir = tmp_path / "ckpt"
    shutil.copytree(fixture_dirs["padded_vocab"], hf_dir)
    n = SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model")).get_piece_size()
    (hf_dir / "added_tokens.json").write_text(json.dumps({"<|tool|>": n}))
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] |= {
        str(n): {"content": "<|tool|>", "special": True},
        str(n + 1): {"content": "<|note|>", "special": False},
        str(n + 2): {"content": "<|end_tool|>", "special": True},
    }
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "m.gguf"
    convert(hf_dir, out, outtype="f32")
    fields, _ = read_gguf(out)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[n : n + 3] == ["<|tool|>", "<|note|>", "<|end_tool|>"]
    assert types[n : n + 3] == [gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL]
    assert tokens[n + 3] == f"[PAD{n + 3}]" and types[n + 3] == gguf.TokenType.UNUSED


def test_mup_scales_are_named_and_can_be_overridden(fixture_dirs, tmp_path):
    from typer.testing import CliRunner

    from deco_gguf.cli.main import app

    spec = VARIANTS["mup"]
    out = tmp_path / "m.gguf"
    run = lambda *extra: CliRunner().invoke(app, ["convert", str(fixture_dirs["mup"]), "-o", str(out), "-q", *extra])  # noqa: E731
    result = run()
    assert result.exit_code == 0, result.output
    values = f"scale_emb={spec.scale_emb!r}, scale_depth={spec.scale_depth!r}, dim_model_base={spec.dim_model_base!r}"
    assert f"use_mup is true: using {values}" in " ".join(result.output.split())
    result = run("--override", "scale_emb=10", "--override", "scale_depth=2.0", "--override", "dim_model_base=16")
    assert result.exit_code == 0 and "use_mup" not in result.output, result.output
    fields, _ = read_gguf(out)
    assert fields["deco.embedding_scale"] == pytest.approx(10)
    assert fields["deco.residual_scale"] == pytest.approx(2.0 / math.sqrt(spec.num_layers))
    assert fields["deco.logit_scale"] == pytest.approx(spec.hidden_size / 16)
    bad = run("--override", "scale_emb=big")
    assert bad.exit_code == 1 and "use_mup scales must be non-zero numbers" in bad.output
    assert run("--override", "scale_emb").exit_code == 1
