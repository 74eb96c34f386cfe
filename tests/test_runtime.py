"""deco_gguf.runtime: the patched llama.cpp through llama-cpp-python, against the reference model."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deco_gguf.cli.main import app
from deco_gguf.converter import convert
from deco_gguf.fixtures import VARIANTS, write_fixture
from deco_gguf.model import layout
from deco_gguf.model.reference import DecoModel
from deco_gguf.runtime.context import DecoRuntime
from deco_gguf.runtime.tools import quantize
from deco_gguf.support.errors import DecoError

# d 256 so that only the 64-wide expert down projections (and the 48-wide shared one) miss K-quant blocks.
WIDE = dataclasses.replace(VARIANTS["de64"], name="wide", hidden_size=256, num_heads=4, head_dim=64, dense_ffn=512)


def dequantized_reference(path, ref: DecoModel) -> DecoModel:
    """The reference model on the weights a GGUF really holds (dequantized)."""
    state = dict(ref.w)
    table = {t.gguf_name: t for t in layout.tensors(ref.config)}
    for t in gguf.GGUFReader(path).tensors:
        entry = table[t.name]
        if not entry.in_checkpoint:  # derived, not a weight of the HF model
            continue
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        if entry.kind == "ffn_down_exps":  # [E, d, De] -> [d, E*De]
            data = data.transpose(1, 0, 2)
        hf = entry.hf_name
        state[hf] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(state[hf].shape))
    return DecoModel(ref.config, state)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    hf = write_fixture(root / "hf", WIDE)
    paths = {}
    for name, (outtype, expert_type) in {"f32": ("f32", "f32"), "q8_0": ("f32", "q8_0"), "f16": ("f16", "f16")}.items():
        paths[name] = root / f"{name}.gguf"
        convert(hf, paths[name], outtype=outtype, expert_type=expert_type)
    return hf, paths, DecoModel.from_pretrained(hf)


PROMPT = [1, 17, 93, 250, 400, 7, 612, 88, 901, 33, 45, 1000]


def test_sparse_and_dense_match_the_reference(model):
    _, paths, ref = model
    want = ref(PROMPT).logits[0, -1].numpy()
    got = {}
    for mode in ("sparse", "dense"):
        with DecoRuntime(paths["f32"], n_ctx=64, n_threads=2, mode=mode, exact=True) as rt:
            got[mode] = rt.eval_logits(PROMPT)
    assert rel_err(got["sparse"], want) < 1e-4
    assert rel_err(got["sparse"], got["dense"]) < 1e-6


def test_quantized_experts_stay_close(model):
    """Q8_0 experts: each weight is off by at most half a step of amax/127 per 32-block, so the
    FFN outputs move by well under 1%; the logits stay within 2e-2 relative (measured ~3e-3)."""
    _, paths, ref = model
    want = ref(PROMPT).logits[0, -1].numpy()
    with DecoRuntime(paths["q8_0"], n_ctx=64, n_threads=2, exact=True) as rt:
        got = rt.eval_logits(PROMPT)
    assert rel_err(got, want) < 2e-2
    assert int(got.argmax()) == int(want.argmax())


def test_each_runtime_keeps_the_mode_it_was_loaded_with(model):
    """Runtimes in different modes live side by side: an `ops` runtime (plain ggml ops, no DECO op, so no
    counts) stays in its mode while a sparse one is opened, used and closed."""
    _, paths, _ = model

    def counted(rt: DecoRuntime) -> int:
        rt.reset_activity()
        rt.llm.reset()
        rt.llm.eval(PROMPT)
        return sum(a.tokens for a in rt.activity() if a is not None)

    with DecoRuntime(paths["f16"], n_ctx=64, n_threads=2, mode="ops") as ops:
        assert counted(ops) == 0
        with DecoRuntime(paths["f16"], n_ctx=64, n_threads=2, mode="sparse") as sparse:
            assert counted(sparse) > 0
            assert counted(ops) == 0
        assert counted(ops) == 0


def test_activity_counters_match_the_reference(model):
    _, paths, ref = model
    masks = ref(PROMPT).activation
    with DecoRuntime(paths["f16"], n_ctx=64, n_threads=2) as rt:
        rt.reset_activity()
        rt.llm.eval(PROMPT)
        activity = rt.activity()
    for layer, (mask, act) in enumerate(zip(masks, activity, strict=True)):
        if mask is None:
            assert act is None
            continue
        per_token = mask[0].sum(-1)
        # The last layer is evaluated only where logits are wanted: the last position.
        counted = per_token[-1:] if layer == len(masks) - 1 else per_token
        assert (act.tokens, act.active) == (len(counted), int(counted.sum()))
        assert (act.min_active, act.max_active) == (int(counted.min()), int(counted.max()))
        assert act.rate == pytest.approx(float(counted.sum()) / (len(counted) * WIDE.num_experts))


def test_load_errors_are_one_line(model, tmp_path):
    _, paths, _ = model
    data = bytearray(paths["f16"].read_bytes())
    start = data.find(b"blk.1.ffn_down_exps.weight")
    data[start : start + 5] = b"blk.7"  # a tensor of a layer the model does not have
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(DecoError, match="llama.cpp cannot load it"):
        DecoRuntime(bad, n_ctx=32)
    with pytest.raises(DecoError, match="file not found"):
        DecoRuntime(tmp_path / "absent.gguf")
    with pytest.raises(DecoError, match="unknown evaluation mode"):
        DecoRuntime(paths["f16"], mode="fast")


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q8_0"])
def test_quantize_keeps_deco_tensors_f32_and_reports_fallbacks(model, tmp_path, preset):
    _, paths, ref = model
    out = tmp_path / f"{preset}.gguf"
    fallbacks = quantize(paths["f16"], out, preset, n_threads=2)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name, t in tensors.items():
        if len(t.shape) == 1 or "ffn_gate_inp" in name:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
    fallen = {f.tensor for f in fallbacks}
    if preset == "Q4_K_M":
        # Exactly the tensors whose rows (64 expert rows, 48 shared rows) do not fit 256-blocks.
        misfits = {
            n for n, t in tensors.items() if len(t.shape) > 1 and int(t.shape[0]) % 256 and "ffn_gate_inp" not in n
        }
        assert fallen == misfits and any("ffn_down_exps" in n for n in fallen)
        assert all(tensors[f.tensor].tensor_type.name == f.got for f in fallbacks)
    else:
        assert fallen == {n for n in tensors if "ffn_down_shexp" in n}  # 48 does not fit Q8_0's 32
    # Against the reference on the dequantized weights: only the runtime's 8-bit activations differ.
    with DecoRuntime(out, n_ctx=64, n_threads=2, exact=True) as rt:
        got = rt.eval_logits(PROMPT)
    # Measured ~1.2% for both presets (8-bit rounding of every matmul input); weights alone would be ~18% at
    # Q4_K_M here.
    assert rel_err(got, dequantized_reference(out, ref)(PROMPT).logits[0, -1].numpy()) < 3e-2


def test_quantize_cli(model, tmp_path):
    _, paths, _ = model
    args = ["quantize", str(paths["f16"]), str(tmp_path / "q.gguf"), "q4_k_m", "--threads", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fell back" in result.output and "ffn_down_exps" in result.output
    bad = CliRunner().invoke(app, ["quantize", str(paths["f16"]), str(tmp_path / "x.gguf"), "q9"])
    assert bad.exit_code == 1 and "unknown quantization type 'Q9'" in bad.output
    assert not (tmp_path / "x.gguf").exists()


def test_quantize_reports_every_tensor_and_requantizes_only_when_asked(model, tmp_path):
    _, paths, _ = model
    q8, seen = tmp_path / "q8.gguf", []
    quantize(paths["f16"], q8, "Q8_0", n_threads=2, on_tensor=lambda i, n, name: seen.append((i, n, name)))
    names = [t.name for t in gguf.GGUFReader(q8).tensors]
    assert seen == [(i + 1, len(names), name) for i, name in enumerate(names)]
    with pytest.raises(DecoError, match="requantizing from type q8_0 is disabled.*--allow-requantize"):
        quantize(q8, tmp_path / "q4.gguf", "Q4_0", n_threads=2)
    assert not (tmp_path / "q4.gguf").exists()
    quantize(q8, tmp_path / "q4.gguf", "Q4_0", n_threads=2, allow_requantize=True)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "q4.gguf").tensors}
    assert types["blk.1.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.Q4_0


IMATRIX_TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
    "said, Let there be light: and there was light. And God saw the light, that it was good: and God divided "
    "the light from the darkness."
)


def test_imatrix_follows_the_deco_routing(tmp_path):
    """llama-imatrix on the bundled model: per expert, the sum of x² over exactly the tokens the router
    sends to that expert (the reference model's routing), and no statistics for the down projections."""
    from pathlib import Path

    from deco_gguf.runtime.tools import imatrix

    bundled = Path(__file__).resolve().parents[1] / "models" / "deco-tiny"
    ctx = 64
    model, text, out = tmp_path / "m.gguf", tmp_path / "t.txt", tmp_path / "imatrix.gguf"
    convert(bundled, model, "f32")
    text.write_text(IMATRIX_TEXT + " " + IMATRIX_TEXT)  # llama-imatrix wants two chunks of text; it reads one
    imatrix(model, text, out, ctx_size=ctx, n_threads=2, chunks=1)
    stats = {t.name: np.array(t.data, dtype=np.float64) for t in gguf.GGUFReader(out).tensors}
    assert not any("ffn_down_exps" in name for name in stats)

    with DecoRuntime(model, n_ctx=ctx) as rt:
        ids = rt.llm.tokenize(IMATRIX_TEXT.encode(), add_bos=True)[:ctx]  # the first chunk, BOS in front
    assert len(ids) == ctx
    ref = DecoModel.from_pretrained(bundled)
    c = ref.config
    with torch.no_grad():
        x = ref.embed(torch.tensor([ids]))
        for i in range(c.num_layers):
            x = ref.attn_block(i, x)
            if c.moe_layers[i]:
                h = ref.ffn_input(i, x)[0].double()
                active = ref.route(i, h.float())[1].double()  # [T, E]
                want_counts, want_sums = active.sum(0).numpy(), (active.T @ h.square()).numpy()  # [E], [E, d]
                counts = stats[f"blk.{i}.ffn_up_exps.weight.counts"].reshape(-1)
                sums = stats[f"blk.{i}.ffn_up_exps.weight.in_sum2"].reshape(c.num_experts, c.hidden_size)
                # routing decisions within float rounding of zero may differ: at most one in a thousand
                assert np.abs(counts - want_counts).sum() <= max(1, active.numel() // 1000), (counts, want_counts)
                same = counts == want_counts
                np.testing.assert_allclose(sums[same], want_sums[same], rtol=1e-3, atol=1e-3 * want_sums.max())
            x, _ = ref.ffn_block(i, x)


def test_quantize_with_a_missing_imatrix_is_one_error(model, tmp_path):
    _, paths, _ = model
    out = tmp_path / "q.gguf"
    out.write_bytes(b"previous contents")
    with pytest.raises(DecoError, match="missing.imatrix: file not found"):
        quantize(paths["f16"], out, "Q4_0", imatrix=tmp_path / "missing.imatrix")
    assert out.read_bytes() == b"previous contents"
