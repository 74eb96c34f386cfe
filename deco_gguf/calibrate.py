"""Router calibration: make a random-weight DECO checkpoint activate ~20% of its experts.

Random routers fire about half the experts (a random row against a random
hidden state is positive half the time); trained DECO models fire about 20%,
and benchmarks of the sparse path need that. A ReLU router has no bias, so
its logits can only be shifted against a direction every hidden state shares.
The calibration makes one:

1. Pin one hidden dimension p: every embedding row gets the same value c in
   column p, and row p of every residual-branch output matrix (o_proj, dense
   down_proj, expert_down_proj, shared down_proj) is zeroed. Then x[..., p]
   is the same constant at every layer and token (a "massive activation", as
   trained LLMs have), so the router input h = RMSNorm(x) * g has
   h_p = g_p c / rms(x): the same sign everywhere, varying only by the
   positive factor 1/rms(x).
2. Layer by layer (later layers see the calibrated earlier ones), for each
   expert e: logit = W[e, p] h_p + rest_e(h) > 0  <=>  W[e, p] sign(h_p) >
   -rest_e / |h_p|, a condition free of the 1/rms(x) factor. Setting W[e, p]
   to the right quantile of -rest_e / |h_p| over the calibration tokens makes
   expert e fire on exactly its target fraction of them. Per-expert targets
   are spread log-normally around `target` (popular and rare experts, as in
   trained models) with their mean equal to `target`.

Only column p of the routers, column p of the embeddings and row p of the
branch outputs change; the result is measured with the reference model
(`CalibrationReport`), on the calibration tokens and on held-out text.
An expert bias (not in released models) can only switch experts off, so
expert-bias variants come out at or below the target.

    report = calibrate_routers("fixtures/deco-0.5b")          # rewrites the weight files in place
    fixtures.write_fixture(out, "deco-0.5b", state_dict_hook=fixture_hook())   # while writing
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import BIN_INDEX, HFCheckpoint, SAFETENSORS_INDEX, expected_shapes, resolve_config
from .config import DecoConfig
from .errors import DecoError
from .reference import DecoModel

BRANCH_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.expert_down_proj.weight", "mlp.shared_experts.down_proj.weight")


@dataclass
class CalibrationReport:
    target: float
    pinned_dim: int | None
    pin_value: float | None
    tokens: int  # calibration tokens
    rates: list[float | None]  # per layer, measured on the calibration tokens (None: dense layer)
    heldout_tokens: int = 0
    heldout_rates: list[float | None] = field(default_factory=list)  # per layer, on held-out text
    seconds: float = 0.0

    @staticmethod
    def _mean(rates):
        r = [x for x in rates if x is not None]
        return sum(r) / len(r) if r else None

    @property
    def mean(self) -> float | None:
        return self._mean(self.rates)

    @property
    def heldout_mean(self) -> float | None:
        return self._mean(self.heldout_rates)

    def summary(self) -> str:
        def fmt(rates):
            return " ".join("-" if r is None else f"{r:.3f}" for r in rates)

        pin = "no pinned dim found" if self.pin_value is None else f"pinned dim {self.pinned_dim} = {self.pin_value:.4g}"
        lines = [
            f"target {self.target:.3f}, {pin}, {self.seconds:.1f} s",
            f"calibration ({self.tokens} tokens): mean {self.mean:.4f}; per layer {fmt(self.rates)}",
        ]
        if self.heldout_tokens:
            lines.append(f"held-out ({self.heldout_tokens} tokens): mean {self.heldout_mean:.4f}; per layer {fmt(self.heldout_rates)}")
        return "\n".join(lines)


def expert_targets(num_experts: int, target: float, spread: float, gen: torch.Generator) -> torch.Tensor:
    """Per-expert activation targets: log-normal around `target`, clipped to [0.02, 0.9], mean = target."""
    t = target * torch.exp(spread * torch.randn(num_experts, generator=gen, dtype=torch.float64) - spread**2 / 2)
    for _ in range(20):  # rescale so the clipped targets still average to `target`
        t = t.clamp(0.02, 0.9)
        t = t * (target / t.mean())
    return t.clamp(0.02, 0.9)


def _pick_dim(config: DecoConfig, state: dict[str, torch.Tensor]) -> int:
    """The dimension whose post-attention norm weight is largest in magnitude in its weakest DECO layer."""
    g = torch.stack([state[f"model.layers.{i}.post_attention_layernorm.weight"].float().abs()
                     for i, moe in enumerate(config.moe_layers) if moe])
    return int(g.min(0).values.argmax())


@torch.no_grad()
def calibrate_state_dict(
    config: DecoConfig,
    state: dict[str, torch.Tensor],
    token_ids: torch.Tensor,
    target: float = 0.2,
    *,
    heldout_ids: torch.Tensor | None = None,
    pin_scale: float = 4.0,
    spread: float = 0.5,
    seed: int = 0,
    measure: bool = True,
) -> CalibrationReport:
    """Calibrate the routers of `state` (HF names) in place, keeping every tensor's dtype.

    token_ids: LongTensor [B, T] of calibration text; heldout_ids likewise,
    only measured. pin_scale: the pinned embedding value as a multiple of the
    embeddings' RMS. Returns the per-layer activation measured afterwards
    with a fresh reference model on the stored tensors (empty if not measure).
    """
    t0 = time.perf_counter()
    if not 0 < target < 1:
        raise DecoError(f"target activation must be in (0, 1), got {target}")
    if not any(config.moe_layers):
        raise DecoError("no DECO layers to calibrate")
    token_ids = torch.as_tensor(token_ids).reshape(-1, torch.as_tensor(token_ids).shape[-1])
    if token_ids.numel() < 10:
        raise DecoError("need at least 10 calibration tokens")
    p = _pick_dim(config, state)
    stored = {name: t.dtype for name, t in state.items()}

    def put(name: str, value: torch.Tensor) -> torch.Tensor:
        """Store value in the checkpoint's dtype; return what the model will actually see."""
        state[name] = value.to(stored[name], copy=True).contiguous()
        return state[name]

    # 1. pin dimension p of the residual stream
    emb = state["model.embed_tokens.weight"].float().clone()
    others = torch.cat([emb[:, :p], emb[:, p + 1:]], 1)
    c = pin_scale * others.pow(2).mean().sqrt().item()
    emb[:, p] = c
    put("model.embed_tokens.weight", emb)
    for i in range(config.num_layers):
        for suffix in BRANCH_OUTPUTS:
            name = f"model.layers.{i}.{suffix}"
            if name in state:
                w = state[name].float().clone()
                w[p] = 0
                put(name, w)

    # 2. calibrate router column p layer by layer, running the model as it is calibrated
    model = DecoModel(config, state, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    x = model.embed(token_ids)
    for i in range(config.num_layers):
        x = model.attn_block(i, x)
        if config.moe_layers[i]:
            name = f"model.layers.{i}.mlp.moe_router.weight"
            w = model.w[name]  # [E, d] in the router dtype
            h = model.ffn_input(i, x).reshape(-1, config.hidden_size).to(w.dtype)
            hp = h[:, p]
            if not (hp.abs() > 0).all() or not ((hp > 0).all() or (hp < 0).all()):
                raise DecoError(f"layer {i}: the pinned dimension {p} does not keep one sign")
            rest = h @ w.T - hp[:, None] * w[:, p]  # [N, E], the logits without column p
            z = (-rest / hp.abs()[:, None]).sort(0).values  # active <=> w[e, p] sign(hp) > z
            n = z.shape[0]
            k = (expert_targets(config.num_experts, target, spread, gen) * n).round().long().clamp(1, n - 1)
            cols = torch.arange(config.num_experts)
            threshold = (z[k - 1, cols] + z[k, cols]) / 2
            new = w.clone()
            new[:, p] = threshold * hp.sign()[0]
            model.w[name] = put(name, new).to(w.dtype)
        x, _ = model.ffn_block(i, x)
    del model, x

    # 3. measure with a fresh reference model on the stored tensors
    report = CalibrationReport(target=target, pinned_dim=p, pin_value=float(state["model.embed_tokens.weight"][0, p]),
                               tokens=token_ids.numel(), rates=[])
    if not measure:
        return report
    fresh = DecoModel(config, state, torch.float32)
    report.rates = fresh(token_ids).activation_rate
    if heldout_ids is not None:
        heldout_ids = torch.as_tensor(heldout_ids).reshape(-1, torch.as_tensor(heldout_ids).shape[-1])
        report.heldout_tokens = heldout_ids.numel()
        report.heldout_rates = fresh(heldout_ids).activation_rate
    report.seconds = time.perf_counter() - t0
    return report


# -- calibration text ------------------------------------------------------------------------


def _sentencepiece(ckpt_dir: Path | None):
    import sentencepiece as spm

    if ckpt_dir is not None and (ckpt_dir / "tokenizer.model").is_file():
        return spm.SentencePieceProcessor(model_file=str(ckpt_dir / "tokenizer.model"))
    from . import fixtures  # a tokenizer.json-only fixture uses the same SentencePiece model

    return spm.SentencePieceProcessor(model_proto=fixtures.tokenizer_model_bytes())


def calibration_tokens(text: str | None, vocab_size: int, num_tokens: int = 512, seq_len: int = 64,
                       ckpt_dir: Path | None = None, heldout_tokens: int = 512,
                       heldout_seq_len: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(calibration ids [num_tokens // seq_len, seq_len], held-out ids [.., heldout_seq_len]), rows start with BOS.

    Calibration text is the start of `text` (default fixtures.fixture_corpus()),
    held-out text starts at its middle (None when the text is too short).
    Many short calibration rows matter: each sequence adds a shared component
    to its hidden states (attention averages over the context), and a
    threshold fitted on few sequences misses that spread; unseen sequences
    then fire more experts (a convex tail), about +0.025 with 2 rows of 128.
    """
    if text is None:
        from . import fixtures

        text = fixtures.fixture_corpus()
    sp = _sentencepiece(ckpt_dir)
    bos = sp.bos_id() if sp.bos_id() >= 0 else 1

    def take(part: str, total: int, row: int):
        row = min(row, total)
        rows = max(1, total // row)
        need = rows * (row - 1)
        ids = []
        for line in part.splitlines():
            ids += sp.encode(line)
            if len(ids) >= need:
                break
        if len(ids) < need:
            return None
        ids = torch.tensor(ids[:need]).clamp_max(vocab_size - 1).view(rows, row - 1)
        return torch.cat([torch.full((rows, 1), bos), ids], 1)

    calib = take(text, num_tokens, seq_len)
    if calib is None:
        raise DecoError(f"calibration text too short for {num_tokens} tokens")
    heldout = take(text[len(text) // 2:], heldout_tokens, heldout_seq_len) if heldout_tokens else None
    return calib, heldout


# -- entry points ----------------------------------------------------------------------------


def _weight_map(ckpt: HFCheckpoint) -> dict[str, str]:
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if (ckpt.path / index).is_file():
            return dict(json.loads((ckpt.path / index).read_text())["weight_map"])
    (only,) = ckpt.weight_files()
    return {name: only.name for name in ckpt.names}


def calibrate_routers(ckpt_dir: str | Path, target: float = 0.2, text: str | None = None, *,
                      num_tokens: int = 512, seq_len: int = 64, **kw) -> CalibrationReport:
    """Calibrate an HF DECO checkpoint directory in place (same files, names and dtypes).

    The reported activation is measured after reloading the rewritten
    checkpoint with the reference model.
    """
    t0 = time.perf_counter()
    ckpt_dir = Path(ckpt_dir)
    ckpt = HFCheckpoint(ckpt_dir)
    config = ckpt.config
    state = {name: ckpt.tensor(name) for name in ckpt.names}
    before = dict(state)
    calib, heldout = calibration_tokens(text, config.vocab_size, num_tokens, seq_len, ckpt_dir)
    calibrate_state_dict(config, state, calib, target, measure=False, **kw)

    # rewrite every weight file holding a changed tensor (write a temp file, then rename)
    weight_map = _weight_map(ckpt)
    changed_files = {weight_map[n] for n in state if state[n] is not before[n]}
    del ckpt, before
    for file_name in sorted(changed_files):
        tensors = {n: state[n].contiguous() for n, f in weight_map.items() if f == file_name}
        path = ckpt_dir / file_name
        tmp = path.with_name(path.name + ".calibrating")
        if file_name.endswith(".bin"):
            torch.save(tensors, tmp)
        else:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    del state

    # measure what is on disk now
    model = DecoModel.from_pretrained(ckpt_dir)
    p, pin = None, None
    emb = model.w["model.embed_tokens.weight"]
    col_const = (emb == emb[0]).all(0)
    if col_const.any():
        p = int(col_const.nonzero()[0])
        pin = float(emb[0, p])
    report = CalibrationReport(target=target, pinned_dim=p, pin_value=pin, tokens=calib.numel(),
                               rates=model(calib).activation_rate)
    if heldout is not None:
        report.heldout_tokens = heldout.numel()
        report.heldout_rates = model(heldout).activation_rate
    report.seconds = time.perf_counter() - t0
    return report


class _StateView:
    """Just enough of HFCheckpoint for resolve_config / expected_shapes over an in-memory state dict."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.path = Path("<state dict>")
        self._state = state
        self.names = list(state)

    def has(self, name: str) -> bool:
        return name in self._state

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._state:
            raise DecoError(f"missing tensor {name}")
        return tuple(self._state[name].shape)


def config_for_state(raw_config: dict, state: dict[str, torch.Tensor]) -> DecoConfig:
    """The DecoConfig of an in-memory HF state dict and its config.json dict."""
    config = resolve_config(raw_config, _StateView(state))
    missing = [n for n in expected_shapes(config) if n not in state]
    if missing:
        raise DecoError(f"missing tensor {missing[0]}")
    return config


def fixture_hook(target: float = 0.2, text: str | None = None, num_tokens: int = 512, seq_len: int = 64,
                 reports: list | None = None, verbose: bool = False, **kw):
    """A `state_dict_hook` for fixtures.write_fixture that calibrates the routers before writing.

    Each CalibrationReport is appended to `reports` (if given) and printed if verbose.
    """

    def hook(spec, state):
        from . import fixtures

        config = config_for_state(fixtures.hf_config(spec), state)
        calib, heldout = calibration_tokens(text, config.vocab_size, num_tokens, seq_len)
        report = calibrate_state_dict(config, state, calib, target, heldout_ids=heldout, **kw)
        if reports is not None:
            reports.append(report)
        if verbose:
            print(f"{spec.name}: {report.summary()}")
        return state

    return hook
