"""`deco-gguf info`: resource accounting against hand-counted parameters, GGUF and HF alike."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deco_gguf.cli.main import app
from deco_gguf.converter import convert
from deco_gguf.fixtures import VARIANTS, write_fixture


def hand_count(spec) -> tuple[int, int, int]:
    """(N, routed expert params, embedding params) of a fixture, counted from its spec."""
    d, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    E, De, Ds = spec.num_experts, spec.expert_ffn, spec.shared_ffn
    n = d  # final norm
    experts = 0
    for moe in spec.moe_layers:
        n += 2 * d + d * q + 2 * d * kv + q * d  # two norms, q, k, v, o
        if not moe:
            n += 3 * d * spec.dense_ffn
            continue
        layer_experts = 2 * E * De * d  # up and down
        n += E * d + E + De + 3 * d * Ds + layer_experts  # router, scale, block norm, shared, experts
        experts += layer_experts
    return n, experts, 2 * 1024 * d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    hf = write_fixture(root / "base", "base")
    out = root / "base.gguf"
    convert(hf, out, outtype="f16", expert_type="q8_0")
    return hf, out


def info_json(*args):
    result = CliRunner().invoke(app, ["info", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_accounting_matches_hand_count(which, base):
    spec = VARIANTS["base"]
    n, experts, embedding = hand_count(spec)
    report = info_json(base[0] if which == "hf" else base[1], "--activation-rate", 0.25, "--context", 512)
    acct = report["accounting"]
    assert acct["non_embedding_params"] == n
    assert acct["routed_expert_params"] == experts
    assert acct["embedding_params"] == embedding
    n_a = n - 0.75 * experts
    assert acct["active_params"] == round(n_a)
    assert acct["active_ratio"] == pytest.approx(n_a / n)
    attention = 4 * spec.hidden_size * spec.num_layers * 512
    assert acct["compute_ratio"] == pytest.approx((2 * n_a + attention) / (2 * n + attention))
    assert acct["activation_source"] == "given"
    assert report["config"]["num_experts"] == 13 and report["config"]["moe_layers"] == [False, True, True]


def test_gguf_bytes_by_type(base):
    report = info_json(base[1])
    reader = gguf.GGUFReader(base[1])
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    assert report["bytes_by_type"] == by_type
    assert set(by_type) == {"F32", "F16", "Q8_0"}
    assert report["accounting"]["activation_source"] == "assumed"


def test_human_output_names_the_accounting(base):
    result = CliRunner().invoke(app, ["info", str(base[1])])
    assert result.exit_code == 0
    for text in ("N (non-embedding params)", "N_a (active per token)", "r_a = N_a / N", "R_c vs equal-N dense"):
        assert text in result.output


def test_info_errors(tmp_path):
    other = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(other, "llama")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
    for path, fragment in (
        (other, "not a DECO GGUF (architecture 'llama')"),
        (tmp_path / "junk.gguf", "not a readable GGUF"),
        (tmp_path / "absent", "no such file"),
    ):
        result = CliRunner().invoke(app, ["info", str(path)])
        assert result.exit_code == 1 and fragment in result.output, result.output


def test_measured_activation_feeds_the_accounting(base, tmp_path):
    from deco_gguf.fixtures import fixture_corpus
    from deco_gguf.fixtures.calibrate import calibrate_routers

    hf = write_fixture(tmp_path / "calibrated", "base")
    calibrate_routers(hf, 0.2)
    text = tmp_path / "text.txt"
    text.write_text(fixture_corpus()[-20000:])
    report = info_json(hf, "--measure", text)
    rates = report["measured_layer_rates"]
    assert rates[0] is None and all(0.1 < r < 0.35 for r in rates[1:])  # layer 0 is dense
    acct = report["accounting"]
    assert acct["activation_source"] == "measured"
    assert acct["activation_rate"] == pytest.approx(sum(rates[1:]) / 2)
    n, experts, _ = hand_count(VARIANTS["base"])
    assert acct["active_params"] == round(n - (1 - acct["activation_rate"]) * experts)

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for args, fragment in (
        ([hf, "--measure", text, "--activation-rate", "0.3"], "not both"),
        ([hf, "--measure", empty], "empty text"),
    ):
        result = CliRunner().invoke(app, ["info", *map(str, args)])
        assert result.exit_code == 1 and fragment in result.output, result.output


def test_measured_activation_of_a_gguf_is_the_reference_models(tmp_path):
    from deco_gguf.fixtures import fixture_corpus
    from deco_gguf.fixtures.calibrate import calibrate_routers
    from deco_gguf.model.reference import DecoModel
    from deco_gguf.runtime.context import DecoRuntime

    hf = write_fixture(tmp_path / "calibrated", "base")
    calibrate_routers(hf, 0.2)
    gguf_path = tmp_path / "calibrated.gguf"
    convert(hf, gguf_path, outtype="f32")
    text = fixture_corpus()[-6000:]
    (tmp_path / "text.txt").write_text(text)
    rates = info_json(gguf_path, "--measure", tmp_path / "text.txt")["measured_layer_rates"]

    # the same rows (BOS + 255 tokens of llama.cpp's tokenization) through the reference model
    with DecoRuntime(gguf_path) as rt:
        ids = rt.llm.tokenize(text.encode(), add_bos=False)[:1024]
        bos = rt.llm.token_bos()
    model = DecoModel.from_pretrained(hf)
    rows = [[bos] + ids[i : i + 255] for i in range(0, len(ids), 255)]
    per_row = [model(torch.tensor([row])).activation_rate for row in rows]
    n = sum(len(r) for r in rows)
    want = [
        None if per_row[0][layer] is None else sum(pr[layer] * len(r) for pr, r in zip(per_row, rows, strict=True)) / n
        for layer in range(len(rates))
    ]
    assert rates[0] is None and want[0] is None
    assert rates[1:] == pytest.approx(want[1:], abs=2e-3)


def test_info_on_the_bundled_model():
    """The shipped model: N is every stored tensor but the embeddings and the head, counted with safetensors."""
    from pathlib import Path

    from safetensors import safe_open

    bundled = Path(__file__).resolve().parents[1] / "models" / "deco-tiny"
    with safe_open(str(bundled / "model.safetensors"), framework="pt") as f:
        sizes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    embedding = sum(np.prod(s) for n, s in sizes.items() if n in ("model.embed_tokens.weight", "lm_head.weight"))
    experts = sum(np.prod(s) for n, s in sizes.items() if "expert_" in n and "proj" in n)
    report = info_json(bundled)
    acct = report["accounting"]
    assert acct["embedding_params"] == embedding
    assert acct["non_embedding_params"] == sum(np.prod(s) for s in sizes.values()) - embedding
    assert acct["routed_expert_params"] == experts
    assert report["config"]["moe_layers"] == [False, True, True, True] and report["warnings"] == []
