"""The training recipe of the bundled model, and the bundled model itself (models/deco-tiny).

- the reference forward is differentiable where training needs it: the
  router weights and the expert-wise router scale get their gradient through
  the expert scores s_e (autograd against finite differences, fp64);
- the adaptive sparsity regulariser (DECO's router-entropy loss with a
  coefficient stepped toward the target) moves a tiny model's activation from
  ~50% to the 20% target within a few dozen steps;
- the corpus split is deterministic and disjoint (chapters, hashed refs);
- the shipped checkpoint has the released layout, loads through HFCheckpoint
  and the reference model, fires 10-30% of its experts on held-out text and
  predicts it far better than a unigram model.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deco_gguf.model.checkpoint import HFCheckpoint
from deco_gguf.model.reference import DecoModel
from deco_gguf.training.corpus import HELDOUT_PERCENT, is_heldout, parse_chapters, split_chapters
from deco_gguf.training.data import sample_batch
from deco_gguf.training.model import AdaptiveCoef, Shape, TrainableDeco, init_state, loss_terms, router_entropy
from deco_gguf.training.train import make_optimizer

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "deco-tiny"

TINY = Shape(
    vocab_size=64,
    hidden_size=32,
    num_layers=3,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    dense_ffn=64,
    num_experts=8,
    expert_ffn=8,
    shared_ffn=16,
)


# -- gradients ------------------------------------------------------------------


def test_router_and_scale_get_gradients_through_scores():
    torch.manual_seed(0)
    shape = Shape(
        vocab_size=11,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        dense_ffn=12,
        num_experts=5,
        expert_ffn=4,
        shared_ffn=6,
        router_scale_init=0.7,
    )
    c = shape.config()
    state = init_state(c, seed=3, std=0.5, router_scale_init=0.7)
    model = TrainableDeco(c, state, dtype=torch.float64)
    w = model.named_weights()
    router, scale = w["model.layers.1.mlp.moe_router.weight"], w["model.layers.1.mlp.router_norm.weight"]
    ids = torch.tensor([[1, 4, 2, 9, 3, 7]])

    def loss() -> torch.Tensor:
        logits, _ = model(ids)
        return torch.log_softmax(logits, -1)[0, torch.arange(5), ids[0, 1:]].sum()

    l0 = loss()
    _, routers = model(ids)
    active = routers[0][1]
    assert 0 < active.float().mean() < 1  # some experts on, some off: the ReLU matters here
    l0.backward()
    assert router.grad is not None and scale.grad is not None
    assert router.grad.abs().sum() > 0 and scale.grad.abs().sum() > 0
    # An expert never active on these tokens gets no gradient on its scale: s_e = 0 exactly.
    never = ~active[0].any(0)
    assert torch.all(scale.grad[never] == 0)

    eps = 1e-6
    for p, idx in [(router, (0, 0)), (router, (3, 5)), (scale, (1,)), (scale, (4,))]:
        with torch.no_grad():
            p[idx] += eps
            up = loss().item()
            p[idx] -= 2 * eps
            down = loss().item()
            p[idx] += eps
        numeric = (up - down) / (2 * eps)
        assert p.grad[idx].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_router_entropy():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # one active expert: entropy 0; four equal: log 4 (up to the 1e-5 guards)
    assert router_entropy(r[:1]).item() == pytest.approx(0.0, abs=1e-4)
    assert router_entropy(r[1:]).item() == pytest.approx(math.log(4), abs=1e-4)


# -- the adaptive coefficient ------------------------------------------------------


def test_adaptive_coef_rule():
    c = AdaptiveCoef(2, init=1e-3, multiplier=2.0, target=0.2)
    c.step([0.5, 0.1])  # above target: x2; below: /2 but never below init
    assert c.values == [2e-3, 1e-3]
    c.step([0.5, 0.5])
    assert c.values == [4e-3, 2e-3]
    c.step([0.1, 0.3])
    assert c.values == [2e-3, 4e-3]
    g = AdaptiveCoef(2, init=1e-3, multiplier=2.0, target=0.2, scope="global")
    g.step([0.1, 0.35])  # mean 0.225 > 0.2: both up
    assert g.values == [2e-3, 2e-3]


def _train_tiny(coef: AdaptiveCoef, steps: int = 40) -> list[list[float]]:
    torch.manual_seed(0)
    c = TINY.config()
    model = TrainableDeco(c, init_state(c, seed=0))
    opt = make_optimizer(model, 3e-3, 0.0)
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, TINY.vocab_size, (4000,), generator=g)
    history = []
    for _ in range(steps):
        loss, _, rates, _ = loss_terms(model, sample_batch(stream, 4, 32, g), coef)
        opt.zero_grad()
        loss.backward()
        opt.step()
        coef.step(rates)
        history.append(rates)
    return history


def test_regulariser_moves_activation_toward_target():
    torch.set_num_threads(1)
    free = _train_tiny(AdaptiveCoef(2, init=0.0, multiplier=1.0, target=0.2))
    reg = _train_tiny(AdaptiveCoef(2, init=1e-3, multiplier=1.3, target=0.2))
    start = sum(free[0]) / 2
    free_end = sum(sum(r) for r in free[-10:]) / 20
    reg_end = sum(sum(r) for r in reg[-10:]) / 20
    assert start > 0.35  # a fresh ReLU router fires about half the experts
    assert free_end > 0.35  # ... and nothing else brings that down in 40 steps
    assert 0.08 < reg_end < 0.32, reg_end
    assert abs(reg_end - 0.2) < 0.5 * abs(free_end - 0.2)


# -- corpus split -------------------------------------------------------------------

SYNTHETIC = "\n".join(
    f"{book}{ch}:{v} Verse {v} of {book} {ch}, and it came to pass."
    for book in ("Ge", "Exo", "1Sm", "Mat", "Luke", "Rev")
    for ch in range(1, 40)
    for v in range(1, 4)
)


def test_corpus_split_is_deterministic_and_disjoint():
    chapters = parse_chapters(SYNTHETIC)
    assert len(chapters) == 6 * 39 and all(len(c.verses) == 3 for c in chapters)
    assert chapters[0].ref == "Ge 1" and chapters[0].text.startswith("Verse 1 of Ge 1")
    train, held = split_chapters(chapters)
    train2, held2 = split_chapters(list(reversed(chapters)))
    assert {c.ref for c in held} == {c.ref for c in held2}  # order-independent
    assert {c.ref for c in train} == {c.ref for c in train2}
    assert not ({c.ref for c in train} & {c.ref for c in held})
    assert len(train) + len(held) == len(chapters) and held
    # Pinned: the split of the real corpus (and so the bundled model's held-out set) never moves.
    assert is_heldout("Luke 15") and is_heldout("Mat 6") and is_heldout("Rev 7")
    assert not is_heldout("Ge 1") and not is_heldout("John 3")
    assert HELDOUT_PERCENT == 3


def test_real_corpus_split(tmp_path):
    """The real corpus (fetched from Debian by scripts/setup.sh, or here if missing)."""
    from deco_gguf.training.corpus import load_corpus

    c = load_corpus()
    assert c.source["chapters"] == 1189 and c.source["heldout_chapters"] == 39
    assert not set(c.train) & set(c.heldout)
    assert c.source["matches_bundled_model"]


# -- the bundled model -----------------------------------------------------------------

# Luke 15:11-24 (KJV, public domain): Luke 15 is a held-out chapter.
HELDOUT_SNIPPET = (
    "And he said, A certain man had two sons: And the younger of them said to his father, Father, give me the "
    "portion of goods that falleth to me. And he divided unto them his living. And not many days after the "
    "younger son gathered all together, and took his journey into a far country, and there wasted his substance "
    "with riotous living. And when he had spent all, there arose a mighty famine in that land; and he began to be "
    "in want. And he went and joined himself to a citizen of that country; and he sent him into his fields to "
    "feed swine. And he would fain have filled his belly with the husks that the swine did eat: and no man gave "
    "unto him. And when he came to himself, he said, How many hired servants of my father's have bread enough and "
    "to spare, and I perish with hunger! I will arise and go to my father, and will say unto him, Father, I have "
    "sinned against heaven, and before thee, And am no more worthy to be called thy son: make me as one of thy "
    "hired servants. And he arose, and came to his father. But when he was yet a great way off, his father saw "
    "him, and had compassion, and ran, and fell on his neck, and kissed him. And the son said unto him, Father, I "
    "have sinned against heaven, and in thy sight, and am no more worthy to be called thy son. But the father said "
    "to his servants, Bring forth the best robe, and put it on him; and put a ring on his hand, and shoes on his "
    "feet: And bring hither the fatted calf, and kill it; and let us eat, and be merry: For this my son was dead, "
    "and is alive again; he was lost, and is found. And they began to be merry."
)
# Perplexities on the whole held-out split (39 chapters, 32.6k predicted
# tokens; docs/bundled-model.md): add-one unigram model of the training
# tokens 419, Witten-Bell interpolated bigram model 67, the bundled model 32.8
# (42.4 on this snippet, whose context restarts at its first token). Below 60
# means the model predicts held-out text better than a bigram model does
# over the split; a broken or untrained model is in the hundreds or thousands.
PPL_BOUND = 60.0


@pytest.fixture(scope="module")
def bundled():
    if not (BUNDLED / "model.safetensors").is_file():
        pytest.fail(f"{BUNDLED} is missing: the repository ships it (python -m deco_gguf.training.train reproduces it)")
    import sentencepiece as spm

    return DecoModel.from_pretrained(BUNDLED), spm.SentencePieceProcessor(model_file=str(BUNDLED / "tokenizer.model"))


def test_bundled_layout():
    total = sum(f.stat().st_size for f in BUNDLED.iterdir())
    assert total <= 20 * 2**20, total
    for name in ("model.safetensors", "config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (BUNDLED / name).is_file(), name
    cfg = json.loads((BUNDLED / "config.json").read_text())
    assert cfg["architectures"] == ["BlockFFNForCausalLM"] and cfg["use_blockffn"] is True
    assert cfg["moe_layer_freq"][0] == 0 and all(cfg["moe_layer_freq"][1:])
    assert cfg["router_act_func"] == "relu" and cfg["router_norm_type"] == "simple"
    assert cfg["expert_act_func"] == "norm_silu" and cfg["expert_not_gated"] is True
    tok_cfg = json.loads((BUNDLED / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    ckpt = HFCheckpoint(BUNDLED)
    c = ckpt.config
    assert not c.warnings  # its HF-style keys agree with the tensors (unlike the releases' template values)
    assert c.moe_layers == [False] + [True] * (c.num_layers - 1)
    assert c.expert_act == "norm_silu" and not c.expert_gated and c.shared_ffn_size > 0
    assert c.router_norm == "simple" and c.router_scale_size == c.num_experts
    assert not c.tied_embeddings
    assert ckpt.tensor("model.layers.1.mlp.moe_router.weight").dtype == torch.float32


def test_bundled_tokenizer(bundled):
    _, sp = bundled
    for i, piece in enumerate(("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")):
        assert sp.id_to_piece(i) == piece
    # ChatML markers are user-defined symbols: one piece each, never split
    # (the leading "▁" is SentencePiece's dummy prefix).
    pieces = sp.encode("<|im_start|>user\nHello<|im_end|>", out_type=str)
    assert pieces[:2] == ["▁", "<|im_start|>"] and pieces[-1] == "<|im_end|>"
    assert sp.decode(sp.encode("And God said, Let there be light")) == "And God said, Let there be light"


def test_bundled_model_on_heldout_text(bundled):
    model, sp = bundled
    ids = torch.tensor([sp.bos_id()] + sp.encode(HELDOUT_SNIPPET))
    assert 250 < len(ids) <= 512
    out = model(ids)
    logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
    ppl = math.exp(-logp.gather(-1, ids[1:, None]).mean().item())
    assert ppl < PPL_BOUND, ppl
    rates = [r for r in out.activation_rate if r is not None]
    assert len(rates) == model.config.num_layers - 1
    mean = sum(rates) / len(rates)
    assert 0.1 <= mean <= 0.3, rates
    assert all(0.05 <= r <= 0.4 for r in rates), rates


def test_bundled_model_generates_english(bundled):
    model, sp = bundled
    prompt = [sp.bos_id()] + sp.encode("And the LORD said unto Moses,")
    text = sp.decode(model.generate_greedy(prompt, 16))
    words = text.split()
    assert len(words) >= 5
    vocab = set(HELDOUT_SNIPPET.lower().replace(",", " ").replace(".", " ").split()) | {
        "the",
        "and",
        "of",
        "unto",
        "lord",
        "thou",
        "thy",
        "i",
        "my",
        "god",
        "shall",
        "israel",
        "children",
        "say",
        "speak",
        "them",
        "him",
        "he",
        "that",
        "is",
        "be",
        "ye",
        "moses",
        "aaron",
        "all",
        "which",
        "this",
        "for",
    }
    known = sum(w.strip(",.;:!?'").lower() in vocab for w in words)
    assert known >= len(words) // 2, text


def test_bundled_model_converts(tmp_path):
    exe = shutil.which("deco-gguf") or str(Path(sys.executable).parent / "deco-gguf")
    if not Path(exe).exists():
        pytest.skip("deco-gguf CLI not installed")
    out = tmp_path / "deco-tiny.gguf"
    r = subprocess.run(
        [exe, "convert", str(BUNDLED), "-o", str(out), "-q"], check=False, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert out.stat().st_size > 1_000_000
