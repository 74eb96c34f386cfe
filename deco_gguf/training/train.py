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

Sparsity regulariser (the DECO recipe, thunlp/DECO
megatron/core/transformer/blockffn/router_entropy.py and training.py, re-written
here): on each DECO layer, the entropy of the normalised post-ReLU router
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
from dataclasses import asdict
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
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="HF checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps (the cosine schedule spans them)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock budget. With --steps the schedule still follows the steps and this is only a "
                         "hard stop; with --steps 0 the schedule follows the clock (not reproducible step for step)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--target", type=float, default=0.2, help="target activation rate of the routed experts")
    ap.add_argument("--coef-init", type=float, default=1e-4, help="initial (and minimum) regulariser coefficient")
    ap.add_argument("--coef-mult", type=float, default=1.03, help="per-step multiplier of the coefficient")
    ap.add_argument("--coef-scope", choices=("layer", "global"), default="global",
                    help="one coefficient driven by the mean activation (DECO), or one per layer")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="stored dtype of everything but the router (fp32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true",
                    help="run the reference forward eagerly (torch.compile fuses its element-wise ops: ~2x faster here)")
    ap.add_argument("--corpus-cache", type=Path, default=None)
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp/deco-tiny-train"),
                    help="training log (CSV), resumable state, summary JSON")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--resume", action="store_true", help="continue from <log-dir>/state.pt")
    ap.add_argument("--eval-windows", type=int, default=None, help="limit the held-out evaluation (default: all)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="reuse this tokenizer.model instead of training one (a draft model must share its target's)")
    for f in Shape.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)

    from .corpus import load_corpus

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = Shape(**{k: getattr(args, k) for k in Shape.__dataclass_fields__})
    log_dir: Path = args.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    corpus = load_corpus(args.corpus_cache)
    print(f"corpus: {corpus.source['train_chars']} train chars, {corpus.source['heldout_chars']} held-out chars, "
          f"sha256 {corpus.source['sha256'][:12]} (bundled: {corpus.source['matches_bundled_model']})", flush=True)
    tok = args.tokenizer.read_bytes() if args.tokenizer else train_tokenizer(corpus.train_verses, shape.vocab_size)
    sp = fixtures.sp_processor(tok)
    train_ids, held_ids = token_stream(sp, corpus.train), token_stream(sp, corpus.heldout)
    print(f"tokenizer: {sp.get_piece_size()} pieces; {len(train_ids)} train / {len(held_ids)} held-out tokens "
          f"({time.time() - t0:.0f}s)", flush=True)

    config = shape.config()
    model = TrainableDeco(config, init_state(config, args.seed, router_scale_init=shape.router_scale_init))
    opt = make_optimizer(model, args.lr, args.weight_decay)
    n_moe = config.num_moe_layers
    coef = AdaptiveCoef(n_moe, args.coef_init, args.coef_mult, args.target, args.coef_scope)
    g = torch.Generator().manual_seed(args.seed + 1)
    step, elapsed_before = 0, 0.0
    state_path = log_dir / "state.pt"
    if args.resume and state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        coef.values = st["coef"]
        g.set_state(st["gen"])
        step, elapsed_before = st["step"], st["elapsed"]
        print(f"resumed at step {step}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    if not args.no_compile:  # same math, fused; the first step pays ~1 min of compilation
        model.forward = torch.compile(model.forward)
    print(f"model: {n_params / 1e6:.2f}M parameters, {asdict(shape)}", flush=True)

    log_path = log_dir / "train_log.csv"
    new_log = not (args.resume and log_path.is_file())
    with open(log_path, "w" if new_log else "a", newline="") as log_f:
        log = csv.writer(log_f)
        if new_log:
            log.writerow(["step", "elapsed_s", "lr", "loss", "lm_loss"]
                         + [f"act{k}" for k in range(n_moe)] + [f"coef{k}" for k in range(n_moe)]
                         + [f"entropy{k}" for k in range(n_moe)])

        budget = args.minutes * 60 if args.minutes else None
        t_start = time.time() - elapsed_before
        ema_loss = None
        model.train()
        max_steps = args.steps if args.steps > 0 else 10**9
        if args.steps <= 0 and budget is None:
            ap.error("--steps 0 needs --minutes")
        while step < max_steps:
            elapsed = time.time() - t_start
            if budget is not None and elapsed >= budget:
                print(f"time budget reached at step {step}", flush=True)
                break
            progress = step / args.steps if args.steps > 0 else elapsed / budget
            lr = lr_at(progress, step, args.lr, args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            ids = sample_batch(train_ids, args.batch, args.seq, g)
            loss, lm, rates, ents = loss_terms(model, ids, coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            coefs_used = list(coef.values)
            coef.step(rates)
            step += 1
            ema_loss = lm.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * lm.item()
            log.writerow([step, f"{time.time() - t_start:.1f}", f"{lr:.3g}", f"{loss.item():.4f}", f"{lm.item():.4f}"]
                         + [f"{r:.4f}" for r in rates] + [f"{c:.4g}" for c in coefs_used] + [f"{e:.4f}" for e in ents])
            if step % 10 == 0 or step == 1:
                log_f.flush()
                print(f"step {step:5d}  {time.time() - t_start:7.0f}s  lr {lr:.2e}  lm {lm.item():.3f} (ema {ema_loss:.3f})  "
                      f"act {' '.join(f'{r:.2f}' for r in rates)}  coef {' '.join(f'{c:.2g}' for c in coef.values)}", flush=True)
            if step % args.save_every == 0:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "coef": coef.values,
                            "gen": g.get_state(), "step": step, "elapsed": time.time() - t_start}, state_path)
                export(model, shape, tok, args.out, args.dtype)  # a usable checkpoint at every save
    train_seconds = time.time() - t_start
    export(model, shape, tok, args.out, args.dtype)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "coef": coef.values,
                "gen": g.get_state(), "step": step, "elapsed": train_seconds}, state_path)
    print(f"trained {step} steps in {train_seconds / 60:.1f} min; evaluating {args.out}", flush=True)

    # Evaluate what was shipped: the HF directory, through the plain reference model.
    ref = DecoModel.from_pretrained(args.out)
    ev = heldout_eval(ref, held_ids, ctx=args.seq, max_windows=args.eval_windows)
    summary = {
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "tokens_seen": step * args.batch * args.seq,
        "final_train_lm_loss_ema": round(ema_loss, 4) if ema_loss is not None else None,
        "heldout": ev,
        "unigram_ppl": unigram_ppl(train_ids, held_ids, shape.vocab_size),
        "final_coef": coef.values,
        "corpus": {k: v for k, v in corpus.source.items() if not k.startswith("_") and k != "heldout_refs"},
        "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids),
        "parameters": n_params,
        "shape": asdict(shape),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    prompts = ["In the beginning", "And the LORD said unto Moses,", "Blessed are the"]
    summary["samples"] = [
        {"prompt": p, "greedy": generate(ref, sp, p, 40), "t0.8": generate(ref, sp, p, 40, temperature=0.8, seed=k)}
        for k, p in enumerate(prompts)
    ]
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("steps", "train_seconds", "final_train_lm_loss_ema", "heldout", "unigram_ppl")}, indent=2))
    for s in summary["samples"]:
        print(f"\n{s['prompt']!r}\n  greedy: {s['greedy']}\n  t=0.8:  {s['t0.8']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
