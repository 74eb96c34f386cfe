"""Train the bundled DECO model (models/deco-tiny) from scratch on the CPU.

    python -m deco_gguf.training.train --out models/deco-tiny --minutes 36

retrains the shipped checkpoint: fixed seed, data order and schedule (the
defaults are the shipped run), equal up to the non-deterministic reduction
order of multi-threaded CPU kernels, so a re-run lands close to, not exactly
on, the shipped weights (docs/bundled-model.md). The corpus comes from Debian
(corpus.py); the log goes to /tmp/deco-tiny-train/ unless --log-dir.

What is trained is DECO as published (docs/deco.md, "Layer stack"
and "DECO FFN"): layer 0 a dense SwiGLU, every other layer a DECO FFN with a
ReLU router, the learned expert-wise router scale (`simple` router norm),
non-gated NormSiLU experts and an unscaled SwiGLU shared expert; GQA, NeoX
RoPE, untied embeddings. The forward pass IS the project's reference model
(`deco_gguf.model.reference.DecoModel`): `TrainableDeco` only hands it
`nn.Parameter`s as its weight dict and runs its layer functions with autograd
on (DecoModel.__call__ itself is no_grad). The reference computes every
expert densely and multiplies by its score s_e, which is exactly 0 for an
inactive expert, so the router weights and the router scale get gradients
through s_e (checked in tests/test_train.py).

Sparsity regulariser (the DECO recipe, docs/deco.md "Where the math comes
from", re-written here): on each DECO layer, the entropy of the normalised post-ReLU router
scores p = r / (sum_e r_e + 1e-5),  H = -sum_e p_e log(p_e + 1e-5), averaged
over tokens, is added to the loss as coef * H / L. Lower entropy concentrates
the mass on fewer experts, pushing the weak ones below zero, where the ReLU
switches them off. After every step the coefficient is multiplied by
`multiplier` if the measured activation rate is above the target (20%) and
divided by it otherwise, never going below its initial value. As in DECO,
one coefficient serves the whole model and follows the mean activation over
all DECO layers (DECO: 1e-8, x1.002 per step over 15k steps; a ~1.5k-step run
needs a larger floor and multiplier: 1e-4, x1.03). `--coef-scope layer` gives
each layer its own coefficient driven by its own rate. Either way the
regulariser only pushes activation down: a layer that the language-model loss
alone makes sparser than the target stays sparser.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import fixtures
from ..model.reference import DecoModel
from .data import sample_batch, token_stream, train_tokenizer
from .evaluate import generate, heldout_eval, unigram_ppl
from .export import export
from .model import AdaptiveCoef, Shape, TrainableDeco, init_state, loss_terms


def lr_at(progress: float, step: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine from peak to floor * peak as progress goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: TrainableDeco, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.named_weights().values():
        (decay if p.dim() == 2 else no_decay).append(p)  # no decay on norms and the router scale
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True, help="HF checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps (the cosine schedule spans them)")
    ap.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget. With --steps the schedule still follows the steps and this is only a "
        "hard stop; with --steps 0 the schedule follows the clock (not reproducible step for step)",
    )
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--target", type=float, default=0.2, help="target activation rate of the routed experts")
    ap.add_argument("--coef-init", type=float, default=1e-4, help="initial (and minimum) regulariser coefficient")
    ap.add_argument("--coef-mult", type=float, default=1.03, help="per-step multiplier of the coefficient")
    ap.add_argument(
        "--coef-scope",
        choices=("layer", "global"),
        default="global",
        help="one coefficient driven by the mean activation (DECO), or one per layer",
    )
    ap.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="stored dtype of everything but the router (fp32)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="run the reference forward eagerly (torch.compile fuses its element-wise ops: ~2x faster here)",
    )
    ap.add_argument("--corpus-cache", type=Path, default=None)
    ap.add_argument(
        "--log-dir",
        type=Path,
        default=Path("/tmp/deco-tiny-train"),
        help="training log (CSV), resumable state, summary JSON",
    )
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--resume", action="store_true", help="continue from <log-dir>/state.pt")
    ap.add_argument("--eval-windows", type=int, default=None, help="limit the held-out evaluation (default: all)")
    ap.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="reuse this tokenizer.model instead of training one (a draft model must share its target's)",
    )
    for f in Shape.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    if args.steps <= 0 and args.minutes is None:
        ap.error("--steps 0 needs --minutes")
    return args


@dataclass
class Data:
    corpus: object  # corpus.Corpus
    tokenizer: bytes  # tokenizer.model
    sp: object  # its SentencePieceProcessor
    train_ids: torch.Tensor
    heldout_ids: torch.Tensor


def load_data(args: argparse.Namespace, shape: Shape) -> Data:
    """The corpus, its tokenizer (trained unless --tokenizer) and both halves as token streams."""
    from .corpus import load_corpus

    t0 = time.time()
    corpus = load_corpus(args.corpus_cache)
    print(
        f"corpus: {corpus.source['train_chars']} train chars, {corpus.source['heldout_chars']} held-out chars, "
        f"sha256 {corpus.source['sha256'][:12]} (bundled: {corpus.source['matches_bundled_model']})",
        flush=True,
    )
    tok = args.tokenizer.read_bytes() if args.tokenizer else train_tokenizer(corpus.train_verses, shape.vocab_size)
    sp = fixtures.sp_processor(tok)
    train_ids, held_ids = token_stream(sp, corpus.train), token_stream(sp, corpus.heldout)
    print(
        f"tokenizer: {sp.get_piece_size()} pieces; {len(train_ids)} train / {len(held_ids)} held-out tokens "
        f"({time.time() - t0:.0f}s)",
        flush=True,
    )
    return Data(corpus, tok, sp, train_ids, held_ids)


@dataclass
class Run:
    """What a run changes as it goes, and what --resume restores: model, optimizer, regulariser
    coefficients, the batch sampler's generator, steps and time."""

    model: TrainableDeco
    opt: torch.optim.Optimizer
    coef: AdaptiveCoef
    gen: torch.Generator
    step: int = 0
    elapsed: float = 0.0  # training seconds before this process

    def save(self, path: Path, elapsed: float) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "opt": self.opt.state_dict(),
                "coef": self.coef.values,
                "gen": self.gen.get_state(),
                "step": self.step,
                "elapsed": elapsed,
            },
            path,
        )

    def load(self, path: Path) -> None:
        st = torch.load(path, weights_only=False)
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.coef.values = st["coef"]
        self.gen.set_state(st["gen"])
        self.step, self.elapsed = st["step"], st["elapsed"]


def start_run(args: argparse.Namespace, shape: Shape, state_path: Path) -> Run:
    config = shape.config()
    model = TrainableDeco(config, init_state(config, args.seed, router_scale_init=shape.router_scale_init))
    run = Run(
        model=model,
        opt=make_optimizer(model, args.lr, args.weight_decay),
        coef=AdaptiveCoef(config.num_moe_layers, args.coef_init, args.coef_mult, args.target, args.coef_scope),
        gen=torch.Generator().manual_seed(args.seed + 1),
    )
    if args.resume and state_path.is_file():
        run.load(state_path)
        print(f"resumed at step {run.step}", flush=True)
    return run


def train(args: argparse.Namespace, shape: Shape, run: Run, data: Data, state_path: Path) -> tuple[float, float | None]:
    """Step until --steps or --minutes, logging every step and saving every --save-every; then export the
    checkpoint. Returns the training seconds and the smoothed language-model loss."""
    n_moe = run.model.config.num_moe_layers
    log_path = args.log_dir / "train_log.csv"
    new_log = not (args.resume and log_path.is_file())
    with open(log_path, "w" if new_log else "a", newline="") as log_f:
        log = csv.writer(log_f)
        if new_log:
            log.writerow(
                ["step", "elapsed_s", "lr", "loss", "lm_loss"]
                + [f"act{k}" for k in range(n_moe)]
                + [f"coef{k}" for k in range(n_moe)]
                + [f"entropy{k}" for k in range(n_moe)]
            )
        budget = args.minutes * 60 if args.minutes else None
        t_start = time.time() - run.elapsed
        ema_loss = None
        run.model.train()
        max_steps = args.steps if args.steps > 0 else 10**9
        while run.step < max_steps:
            elapsed = time.time() - t_start
            if budget is not None and elapsed >= budget:
                print(f"time budget reached at step {run.step}", flush=True)
                break
            lr = lr_at(run.step / args.steps if args.steps > 0 else elapsed / budget, run.step, args.lr, args.warmup)
            lm, rates, coefs_used, ents, loss = train_step(args, run, data.train_ids, lr)
            ema_loss = lm if ema_loss is None else 0.98 * ema_loss + 0.02 * lm
            log.writerow(
                [run.step, f"{time.time() - t_start:.1f}", f"{lr:.3g}", f"{loss:.4f}", f"{lm:.4f}"]
                + [f"{r:.4f}" for r in rates]
                + [f"{c:.4g}" for c in coefs_used]
                + [f"{e:.4f}" for e in ents]
            )
            if run.step % 10 == 0 or run.step == 1:
                log_f.flush()
                acts, coefs = " ".join(f"{r:.2f}" for r in rates), " ".join(f"{c:.2g}" for c in run.coef.values)
                print(
                    f"step {run.step:5d}  {time.time() - t_start:7.0f}s  lr {lr:.2e}  "
                    f"lm {lm:.3f} (ema {ema_loss:.3f})  act {acts}  coef {coefs}",
                    flush=True,
                )
            if run.step % args.save_every == 0:
                run.save(state_path, time.time() - t_start)
                export(run.model, shape, data.tokenizer, args.out, args.dtype)  # a usable checkpoint at every save
    train_seconds = time.time() - t_start
    export(run.model, shape, data.tokenizer, args.out, args.dtype)
    run.save(state_path, train_seconds)
    return train_seconds, ema_loss


def train_step(args: argparse.Namespace, run: Run, train_ids: torch.Tensor, lr: float):
    """One optimizer step at learning rate `lr`, then the regulariser's coefficient update. Returns the
    language-model loss, the activation rates, the coefficients used, the router entropies and the loss."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    ids = sample_batch(train_ids, args.batch, args.seq, run.gen)
    loss, lm, rates, ents = loss_terms(run.model, ids, run.coef)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.opt.step()
    coefs_used = list(run.coef.values)
    run.coef.step(rates)
    run.step += 1
    return lm.item(), rates, coefs_used, ents, loss.item()


def summarize(
    args: argparse.Namespace,
    shape: Shape,
    data: Data,
    run: Run,
    n_params: int,
    train_seconds: float,
    ema_loss: float | None,
) -> dict:
    """Evaluate what was shipped: the HF directory, through the plain reference model."""
    ref = DecoModel.from_pretrained(args.out)
    ev = heldout_eval(ref, data.heldout_ids, ctx=args.seq, max_windows=args.eval_windows)
    source = data.corpus.source
    summary = {
        "steps": run.step,
        "train_seconds": round(train_seconds, 1),
        "tokens_seen": run.step * args.batch * args.seq,
        "final_train_lm_loss_ema": round(ema_loss, 4) if ema_loss is not None else None,
        "heldout": ev,
        "unigram_ppl": unigram_ppl(data.train_ids, data.heldout_ids, shape.vocab_size),
        "final_coef": run.coef.values,
        "corpus": {k: v for k, v in source.items() if not k.startswith("_") and k != "heldout_refs"},
        "train_tokens": len(data.train_ids),
        "heldout_tokens": len(data.heldout_ids),
        "parameters": n_params,
        "shape": asdict(shape),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    prompts = ["In the beginning", "And the LORD said unto Moses,", "Blessed are the"]
    summary["samples"] = [
        {
            "prompt": p,
            "greedy": generate(ref, data.sp, p, 40),
            "t0.8": generate(ref, data.sp, p, 40, temperature=0.8, seed=k),
        }
        for k, p in enumerate(prompts)
    ]
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = Shape(**{k: getattr(args, k) for k in Shape.__dataclass_fields__})
    args.log_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.log_dir / "state.pt"

    data = load_data(args, shape)
    run = start_run(args, shape, state_path)
    n_params = sum(p.numel() for p in run.model.parameters())
    if not args.no_compile:  # same math, fused; the first step pays ~1 min of compilation
        run.model.forward = torch.compile(run.model.forward)
    print(f"model: {n_params / 1e6:.2f}M parameters, {asdict(shape)}", flush=True)

    train_seconds, ema_loss = train(args, shape, run, data, state_path)
    print(f"trained {run.step} steps in {train_seconds / 60:.1f} min; evaluating {args.out}", flush=True)
    summary = summarize(args, shape, data, run, n_params, train_seconds, ema_loss)
    (args.log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    headline = ("steps", "train_seconds", "final_train_lm_loss_ema", "heldout", "unigram_ppl")
    print(json.dumps({k: summary[k] for k in headline}, indent=2))
    for s in summary["samples"]:
        print(f"\n{s['prompt']!r}\n  greedy: {s['greedy']}\n  t=0.8:  {s['t0.8']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
