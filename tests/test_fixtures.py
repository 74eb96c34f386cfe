"""The fixture generator writes the released HF layout (docs/deco.md, "Released checkpoints").

Everything here is read back with independent readers (safetensors.safe_open,
torch.load(weights_only=True), json, sentencepiece) and checked against
expectations derived from docs/deco.md, not from the generator's own tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from deco_gguf import fixtures as F
from deco_gguf.fixtures import PRESETS, VARIANTS, FixtureSpec, write_fixture

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- helpers


def expected_layout(spec: FixtureSpec, vocab: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes straight from the tensor list of docs/deco.md."""
    d, E, De, Ds = spec.hidden_size, spec.num_experts, spec.expert_ffn, spec.shared_ffn
    w, rd = DT[spec.dtype], DT[spec.router_dtype]
    qd, kvd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    out = {"model.embed_tokens.weight": ((vocab, d), w), "model.norm.weight": ((d,), w)}
    if not spec.tied_embeddings:
        out["lm_head.weight"] = ((vocab, d), w)
    freq = spec.moe_layer_freq
    for i in range(spec.num_layers):
        moe = (i % freq == 0) if isinstance(freq, int) else bool(freq[i])
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = ((d,), w)
        out[p + "post_attention_layernorm.weight"] = ((d,), w)
        out[p + "self_attn.q_proj.weight"] = ((qd, d), w)
        out[p + "self_attn.k_proj.weight"] = ((kvd, d), w)
        out[p + "self_attn.v_proj.weight"] = ((kvd, d), w)
        out[p + "self_attn.o_proj.weight"] = ((d, qd), w)
        if not moe:
            f = spec.dense_ffn
            out[p + "mlp.gate_proj.weight"] = ((f, d), w)
            out[p + "mlp.up_proj.weight"] = ((f, d), w)
            out[p + "mlp.down_proj.weight"] = ((d, f), w)
            continue
        out[p + "mlp.moe_router.weight"] = ((E, d), rd)
        if not spec.router_norm_fixed:  # present even for router_norm_type null
            out[p + "mlp.router_norm.weight"] = (((1 if spec.router_norm_scalar else E),), w)
        out[p + "mlp.expert_up_proj.weight"] = ((E * De, d), w)
        if spec.expert_gated:
            out[p + "mlp.expert_gate_proj.weight"] = ((E * De, d), w)
        out[p + "mlp.expert_down_proj.weight"] = ((d, E * De), w)
        if spec.expert_act in ("norm_silu", "norm_silu_nomean"):
            out[p + "mlp.expert_act.rms_norm.weight"] = ((De,), w)
        if Ds:
            out[p + "mlp.shared_experts.gate_proj.weight"] = ((Ds, d), w)
            out[p + "mlp.shared_experts.up_proj.weight"] = ((Ds, d), w)
            out[p + "mlp.shared_experts.down_proj.weight"] = ((d, Ds), w)
        if spec.expert_bias:
            out[p + "mlp.expert_bias"] = ((E,), torch.float32)
    return out


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load the weights however they are stored, checking the file layout on the way."""
    single, index, binf = path / "model.safetensors", path / "model.safetensors.index.json", path / "pytorch_model.bin"
    if binf.exists():
        assert not single.exists() and not index.exists()
        sd = torch.load(binf, weights_only=True, map_location="cpu")
        assert type(sd) is dict
        return sd
    if single.exists():
        assert not index.exists()
        with safe_open(str(single), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    idx = json.loads(index.read_text())
    files = sorted(set(idx["weight_map"].values()))
    n = len(files)
    assert n >= 2
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in path.glob("model-*.safetensors")) == files
    sd: dict[str, torch.Tensor] = {}
    for fname in files:
        with safe_open(str(path / fname), framework="pt") as f:
            for k in f.keys():
                assert idx["weight_map"][k] == fname, k
                assert k not in sd
                sd[k] = f.get_tensor(k)
    assert set(sd) == set(idx["weight_map"])
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    return sd


def bpe_encode(tok: dict, text: str) -> list[int]:
    """A minimal HF-BPE encoder (normalizer: prepend + space->U+2581, byte fallback)."""
    model = tok["model"]
    vocab = model["vocab"]
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(model["merges"])}
    syms: list[str] = []
    for ch in "\u2581" + text.replace(" ", "\u2581"):
        syms.extend([ch] if ch in vocab else [f"<0x{b:02X}>" for b in ch.encode("utf-8")])
    while True:
        best = min(
            ((ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(syms, syms[1:], strict=False))),
            default=(math.inf, -1),
        )
        if best[0] == math.inf:
            break
        i = best[1]
        syms[i : i + 2] = [syms[i] + syms[i + 1]]
    return [vocab[s] for s in syms]


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=F.tokenizer_model_bytes())


# ---------------------------------------------------------------- per variant


REQUIRED = [
    "base",
    "de64",
    "dense_middle",
    "freq_int",
    "gated",
    "act_norm_silu_nomean",
    "act_norm_silu_norms",
    "act_silu",
    "act_relu",
    "router_rms",
    "router_normal",
    "router_null",
    "router_scalar",
    "router_fixed",
    "router_sqrelu",
    "expert_bias_base",
    "expert_bias_rms",
    "mup",
    "tied",
    "sharded",
    "bin",
    "bf16",
    "tokenizer_json",
    "e180",
]


def test_required_variants_exist():
    assert set(REQUIRED) <= set(VARIANTS)
    for name, spec in VARIANTS.items():
        assert spec.name == name
        assert 64 <= spec.hidden_size <= 128 and 2 <= spec.num_layers <= 4
    assert len({hash(s) for s in VARIANTS.values()}) == len(VARIANTS)  # specs are hashable


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_layout(name: str, tmp_path: Path, sp: spm.SentencePieceProcessor):
    spec = VARIANTS[name]
    out = write_fixture(tmp_path / name, name, seed=0)
    assert out == tmp_path / name

    # ---- tensors
    vocab = spec.vocab_size or sp.get_piece_size()
    sd = read_tensors(out)
    want = expected_layout(spec, vocab)
    assert set(sd) == set(want), set(sd) ^ set(want)
    for k, t in sd.items():
        shape, dtype = want[k]
        assert tuple(t.shape) == shape, k
        assert t.dtype == dtype, (k, t.dtype)
        assert torch.isfinite(t.float()).all(), k
    routers = [k for k in sd if k.endswith("mlp.moe_router.weight")]
    assert routers and all(sd[k].dtype == DT[spec.router_dtype] for k in routers)
    if spec.router_dtype == "float32":
        assert all(sd[k].dtype == torch.float32 for k in routers)
    for k, t in sd.items():
        if k.endswith("norm.weight") and "router_norm" not in k:
            assert abs(t.float().mean().item() - 1.0) < 0.2, k  # norms ~1
    if spec.router_norm_type != "null" and not spec.router_norm_fixed and not spec.router_norm_scalar:
        scales = [sd[k].float() for k in sd if k.endswith("router_norm.weight")]
        assert any((s == 0).any() for s in scales) and any((s < 0).any() for s in scales)

    # ---- config.json: Megatron keys tell the truth, HF template keys are stale
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BlockFFNForCausalLM"] and cfg["model_type"] == "blockffn"
    assert "AutoModelForCausalLM" in cfg["auto_map"]
    truth = {
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "ffn_hidden_size": spec.dense_ffn,
        "num_attention_heads": spec.num_heads,
        "num_query_groups": spec.num_kv_heads,
        "norm_epsilon": 1e-5,
        "num_experts": spec.num_experts,
        "moe_ffn_hidden_size": spec.expert_ffn,
        "moe_shared_expert_intermediate_size": spec.shared_ffn or None,
        "moe_layer_freq": spec.moe_layer_freq,
        "router_act_func": spec.router_act,
        "router_norm_type": spec.router_norm_type,
        "router_norm_fixed": spec.router_norm_fixed,
        "router_norm_scalar": spec.router_norm_scalar,
        "router_norm_init_var": spec.router_norm_init_var,
        "expert_act_func": spec.expert_act,
        "expert_act_norm_type": "normal",
        "expert_not_gated": not spec.expert_gated,
        "moe_router_enable_expert_bias": spec.expert_bias is not None,
        "use_mup": spec.use_mup,
        "use_blockffn": True,
    }
    for k, v in truth.items():
        assert cfg[k] == v, k
    if spec.expert_bias:
        assert cfg["moe_expert_bias_apply_method"] == spec.expert_bias
    assert isinstance(cfg["moe_layer_freq"], type(spec.moe_layer_freq))
    # never written by the converter
    for k in ("kv_channels", "seq_length"):
        assert k not in cfg
    # stale template keys: present, and disagreeing with the tensors / Megatron keys
    assert cfg["num_hidden_layers"] != spec.num_layers
    assert cfg["intermediate_size"] != spec.dense_ffn
    assert cfg["rms_norm_eps"] != cfg["norm_epsilon"]
    assert cfg["vocab_size"] != vocab or spec.vocab_size == 73448
    assert cfg["head_dim"] != spec.head_dim
    assert cfg["num_key_value_heads"] == 2  # template; equals the truth only by accident
    if spec.num_kv_heads != 2:
        assert cfg["num_key_value_heads"] != spec.num_kv_heads
    assert cfg["rope_scaling"]["rope_type"] == "longrope"
    assert cfg["tie_word_embeddings"] is False  # even for the tied variant
    for k in ("scale_emb", "scale_depth", "dim_model_base"):
        assert k in cfg  # present whether or not use_mup
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == [2, 73440]
    if spec.use_mup:
        assert (cfg["scale_emb"], cfg["scale_depth"], cfg["dim_model_base"]) == (12, 1.4, 32)

    # ---- tokenizer
    has_model, has_json = (out / "tokenizer.model").exists(), (out / "tokenizer.json").exists()
    assert (has_model, has_json) == {"model": (True, False), "json": (False, True), "both": (True, True)}[
        spec.tokenizer_format
    ]
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    smap = json.loads((out / "special_tokens_map.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"] and tcfg["bos_token"] == "<s>"
    assert smap["eos_token"]["content"] == tcfg["eos_token"] == "</s>"
    decoder = {v["content"]: int(k) for k, v in tcfg["added_tokens_decoder"].items()}
    if has_model:
        tsp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        assert (tsp.unk_id(), tsp.bos_id(), tsp.eos_id()) == (0, 1, 2)
        assert [tsp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
        ids = tsp.encode("<|im_start|>user")
        im_start = tsp.piece_to_id("<|im_start|>")
        assert ids.count(im_start) == 1 and decoder["<|im_start|>"] == im_start
        assert decoder["<|im_end|>"] == tsp.piece_to_id("<|im_end|>")
        assert tsp.get_piece_size() == sp.get_piece_size()
    if has_json:
        tj = json.loads((out / "tokenizer.json").read_text())
        vocab_map = tj["model"]["vocab"]
        assert vocab_map == {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        added = {a["content"]: a["id"] for a in tj["added_tokens"]}
        assert added == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
        assert all(a["special"] for a in tj["added_tokens"])
        assert tj["model"]["type"] == "BPE" and tj["model"]["byte_fallback"] is True


# ---------------------------------------------------------------- details


def test_tokenizer_json_merges_reproduce_sentencepiece(sp):
    tj = F.tokenizer_json()
    paragraphs = [p for p in F.fixture_corpus().splitlines() if p.isascii()][:40:4]
    paragraphs.append("Return 12345 items, then x ~ y^2 and caf\u00e9.")
    for text in paragraphs:
        assert bpe_encode(tj, text) == sp.encode(text), text


def test_chat_template_renders(tmp_path):
    jinja2 = pytest.importorskip("jinja2")
    write_fixture(tmp_path, "base")
    tmpl = json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    text = jinja2.Template(tmpl).render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_corpus_is_english_and_deterministic():
    text = F.fixture_corpus()
    assert 200_000 <= len(text) <= 600_000
    assert text == F.fixture_corpus()
    words = text.split()
    assert sum(w.lower() in ("the", "a", "of", "to", "is") for w in words) > len(words) / 20
    assert ">>>" not in text


def test_seeded_and_reproducible(tmp_path):
    a = read_tensors(write_fixture(tmp_path / "a", "base", seed=0))
    b = read_tensors(write_fixture(tmp_path / "b", "base", seed=0))
    c = read_tensors(write_fixture(tmp_path / "c", "base", seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.1.mlp.expert_up_proj.weight"], c["model.layers.1.mlp.expert_up_proj.weight"])
    # a tensor does not depend on the layout it is written in
    s = read_tensors(write_fixture(tmp_path / "s", "sharded", seed=0))
    assert all(torch.equal(a[k], s[k]) for k in a)


def test_bf16_stores_router_in_fp32_with_same_values(tmp_path):
    f32 = read_tensors(write_fixture(tmp_path / "f", "base"))
    b16 = read_tensors(write_fixture(tmp_path / "b", "bf16"))
    k = "model.layers.1.mlp.moe_router.weight"
    assert torch.equal(f32[k], b16[k])
    up = "model.layers.1.mlp.expert_up_proj.weight"
    assert torch.equal(f32[up].to(torch.bfloat16), b16[up])


def test_many_small_shards_and_rewrite(tmp_path):
    out = write_fixture(tmp_path, "sharded", max_shard_bytes=64 * 1024)
    sd = read_tensors(out)
    n_files = len(list(out.glob("model-*.safetensors")))
    assert n_files > 3
    assert set(sd) == set(expected_layout(VARIANTS["sharded"], sd["model.embed_tokens.weight"].shape[0]))
    # rewriting the directory in another format leaves no stale weight files
    write_fixture(tmp_path, "bin")
    assert not list(out.glob("*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    read_tensors(out)


def test_hooks(tmp_path):
    seen = []

    def router_hook(layer, w):
        seen.append(layer)
        return torch.zeros_like(w) + layer

    sd = read_tensors(write_fixture(tmp_path / "r", "base", router_hook=router_hook))
    assert seen == [1, 2]
    assert (sd["model.layers.2.mlp.moe_router.weight"] == 2).all()

    def sd_hook(spec, state):
        assert spec.name == "sharded"
        state["model.layers.1.mlp.moe_router.weight"] = state["model.layers.1.mlp.moe_router.weight"] * 0 - 1

    sd = read_tensors(write_fixture(tmp_path / "s", "sharded", state_dict_hook=sd_hook))
    assert (sd["model.layers.1.mlp.moe_router.weight"] == -1).all()
    assert sd["model.layers.1.mlp.moe_router.weight"].dtype == torch.float32


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from deco_gguf.cli.main import app

    result = CliRunner().invoke(app, ["fixture", "bin", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    sd = read_tensors(tmp_path / "x")
    assert sd["model.layers.1.mlp.expert_up_proj.weight"].dtype == torch.float32
    assert sd["model.layers.1.mlp.moe_router.weight"].dtype == torch.float32
    listing = CliRunner().invoke(app, ["fixture", "--list"])
    assert all(name in listing.output for name in ("e180", "deco-0.5b"))
    unknown = CliRunner().invoke(app, ["fixture", "nope", str(tmp_path / "y")])
    assert unknown.exit_code == 1 and "unknown fixture 'nope'" in unknown.output


def test_presets_match_released_shapes():
    # Cheap: the plan only (writing 0.5B is a benchmark, not a test).
    released = {
        "deco-0.1b": dict(L=16, d=768, H=6, hd=128, kv=6, ff=1920, E=42, De=64, Ds=128),
        "deco-0.5b": dict(L=27, d=1280, H=10, hd=128, kv=10, ff=3360, E=77, De=64, Ds=128),
    }
    for name, r in released.items():
        s = PRESETS[name]
        got = dict(
            L=s.num_layers,
            d=s.hidden_size,
            H=s.num_heads,
            hd=s.head_dim,
            kv=s.num_kv_heads,
            ff=s.dense_ffn,
            E=s.num_experts,
            De=s.expert_ffn,
            Ds=s.shared_ffn,
        )
        assert got == r
        assert s.vocab_size == 73448 and s.moe_layer_freq == [0] + [1] * (r["L"] - 1)
        assert not s.tied_embeddings and not s.expert_gated and s.expert_act == "norm_silu"
        assert s.weight_format == "sharded" and s.dtype == "bfloat16"
        plan = F.tensor_plan(s)
        assert set(k for k, _, _ in plan) == set(expected_layout(s, 73448))
    n = sum(math.prod(shape) for _, shape, _ in F.tensor_plan(PRESETS["deco-0.5b"]))
    assert 0.65e9 < n < 0.8e9
