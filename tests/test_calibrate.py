"""Router calibration of random fixtures to ~20% expert activation, measured with the reference model."""

from __future__ import annotations

import json

import pytest
import torch

from deco_gguf.fixtures.calibrate import calibrate_routers, expert_targets, fixture_hook
from deco_gguf.fixtures.calibration_text import calibration_tokens
from deco_gguf.model.checkpoint import HFCheckpoint
from deco_gguf.model.reference import DecoModel
from deco_gguf.support.errors import DecoError

fixtures = pytest.importorskip("deco_gguf.fixtures")

BRANCH_OUTPUTS = ("o_proj.weight", "mlp.down_proj.weight", "expert_down_proj.weight", "shared_experts.down_proj.weight")


def measured_rates(path, text_start: float = 0.75, tokens: int = 384, row: int = 128) -> list[float | None]:
    """Per-layer activation of the checkpoint at path on a third slice of the corpus (not calibration, not held-out)."""
    corpus = fixtures.fixture_corpus()
    model = DecoModel.from_pretrained(path)
    ids, _ = calibration_tokens(
        corpus[int(len(corpus) * text_start) :], model.config.vocab_size, tokens, row, path, heldout_tokens=0
    )
    return model(ids).activation_rate


def assert_sane(rates, target=0.2, mean_tol=0.05, layer_band=(0.1, 0.32)):
    deco = [r for r in rates if r is not None]
    assert deco, "no DECO layers"
    assert abs(sum(deco) / len(deco) - target) <= mean_tol, rates
    assert all(layer_band[0] <= r <= layer_band[1] for r in deco), rates


@pytest.mark.parametrize("variant", ["base", "sharded", "router_bf16", "gated", "dense_middle", "mup"])
def test_calibrated_fixture_activates_about_20_percent(tmp_path, variant):
    path = fixtures.write_fixture(tmp_path / variant, variant)
    before = HFCheckpoint(path)
    old = {n: before.tensor(n).clone() for n in before.names}
    files = sorted(p.name for p in path.iterdir())
    assert_sane(
        DecoModel.from_pretrained(path)(torch.arange(1, 200)).activation_rate,
        target=0.5,
        mean_tol=0.15,
        layer_band=(0.3, 0.7),
    )  # uncalibrated: about half

    report = calibrate_routers(path)

    # the report is measured after reloading; calibration tokens hit the per-expert targets closely
    assert abs(report.mean - 0.2) < 0.01
    assert_sane(report.heldout_rates)
    assert_sane(measured_rates(path))  # independent text, independent measurement

    # same files, names, dtypes; only column p of routers / embeddings and row p of branch outputs changed
    after = HFCheckpoint(path)
    assert sorted(p.name for p in path.iterdir()) == files
    assert after.names == before.names
    p = report.pinned_dim
    for name, t in old.items():
        new = after.tensor(name)
        assert new.dtype == t.dtype and new.shape == t.shape, name
        if name.endswith("moe_router.weight") or name == "model.embed_tokens.weight":
            keep = torch.ones(t.shape[1], dtype=torch.bool)
            keep[p] = False
            assert torch.equal(new[:, keep], t[:, keep]), name
        elif name.endswith(BRANCH_OUTPUTS):
            assert torch.equal(new[:p], t[:p]) and torch.equal(new[p + 1 :], t[p + 1 :]), name
            assert (new[p] == 0).all(), name
        else:
            assert torch.equal(new, t), name
    emb = after.tensor("model.embed_tokens.weight")
    assert (emb[:, p] == emb[0, p]).all() and emb[0, p] != 0


def test_pinned_dimension_stays_constant_through_the_layers(tmp_path):
    path = fixtures.write_fixture(tmp_path / "base", "base")
    p = calibrate_routers(path).pinned_dim
    m = DecoModel.from_pretrained(path)
    x = m.embed(torch.arange(1, 40)[None])
    pinned = x[..., p].clone()
    for i in range(m.config.num_layers):
        x, _ = m.ffn_block(i, m.attn_block(i, x))
        assert torch.equal(x[..., p], pinned)


def test_state_dict_hook_calibrates_while_writing(tmp_path):
    reports = []
    path = fixtures.write_fixture(tmp_path / "hooked", "base", state_dict_hook=fixture_hook(reports=reports))
    (report,) = reports
    assert abs(report.mean - 0.2) < 0.01
    assert_sane(report.heldout_rates)
    assert_sane(measured_rates(path))


def test_other_target(tmp_path):
    path = fixtures.write_fixture(tmp_path / "de64", "de64")
    report = calibrate_routers(path, target=0.1)
    assert_sane(report.heldout_rates, target=0.1, mean_tol=0.04, layer_band=(0.03, 0.2))


def test_expert_bias_variant_ends_at_or_below_target(tmp_path):
    path = fixtures.write_fixture(tmp_path / "bias", "expert_bias_rms")
    report = calibrate_routers(path)
    assert all(r <= 0.21 for r in report.rates if r is not None)
    assert all(0.05 < r for r in report.rates if r is not None)


def test_expert_targets_average_to_target():
    t = expert_targets(77, 0.2, 0.5, torch.Generator().manual_seed(0))
    assert abs(t.mean().item() - 0.2) < 1e-6
    assert t.min() >= 0.02 and t.max() <= 0.9 and t.std() > 0.03


def test_bad_target_is_rejected(tmp_path):
    path = fixtures.write_fixture(tmp_path / "base", "base")
    with pytest.raises(DecoError, match="target"):
        calibrate_routers(path, target=1.5)
    json.loads((path / "config.json").read_text())  # untouched and readable
