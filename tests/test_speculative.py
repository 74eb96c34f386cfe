"""Speculative decoding (deco_gguf.runtime.speculative, libdeco-speculative) against autoregressive decoding.

The truth is llama-cpp-python's own greedy generation (Llama.generate, one token per llama_decode) on a
second instance of the same GGUF, and for sampling the target's exact next-token distributions (softmax of
its logits): drafted tokens must never change what the target would have produced.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
from deco_gguf.runtime.native import is_patched  # noqa: E402

if not is_patched():
    pytest.skip("llama_cpp is not the patched DECO build (run scripts/build-runtime.sh)", allow_module_level=True)

from llama_server import llama_server, post  # noqa: E402  (tests/llama_server.py)

from deco_gguf.converter.convert import convert  # noqa: E402
from deco_gguf.fixtures import write_fixture  # noqa: E402
from deco_gguf.runtime.context import DecoRuntime  # noqa: E402
from deco_gguf.runtime.sampling import Sampling  # noqa: E402
from deco_gguf.runtime.speculative import DraftModel, Speculator  # noqa: E402
from deco_gguf.support.errors import DecoError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "deco-tiny"
BUNDLED_DRAFT = REPO / "models" / "deco-tiny-draft"
N_CTX = 512


@pytest.fixture(scope="module")
def bundled_gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundled") / "deco-tiny-f16.gguf"
    convert(BUNDLED, out, "f16")
    return out


@pytest.fixture(scope="module")
def fixture_gguf(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            d = tmp_path_factory.mktemp(variant)
            write_fixture(d / "hf", variant)
            convert(d / "hf", d / "m.gguf", outtype="f32", expert_type="q4_0")
            made[variant] = d / "m.gguf"
        return made[variant]

    return get


def open_runtime(path: Path) -> DecoRuntime:
    return DecoRuntime(path, n_ctx=N_CTX, n_threads=2, exact=True)


def autoregressive(path: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy generation by llama-cpp-python alone, stopping after an end-of-generation token."""
    rt = open_runtime(path)
    try:
        out: list[int] = []
        for tok in rt.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) == n or llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(rt.llm.model), tok):
                return out
        return out
    finally:
        rt.close()


def repetitive_prompt(rt: DecoRuntime) -> list[int]:
    """A prompt with repeated phrases, so that n-gram lookup finds something to propose."""
    text = "the value of the key in the map is the value of the key in the list; " * 3 + "the value of the"
    return rt.llm.tokenize(text.encode(), add_bos=True)


@pytest.mark.parametrize(
    "draft,options",
    [
        ("none", {}),
        ("lookup", {}),
        ("lookup", {"n_draft": 8, "lookup_n": 2}),
        ("script", {"hit_rate": 1.0}),
        ("script", {"hit_rate": 0.5, "n_draft": 6}),
        ("script", {"hit_rate": 0.0}),
    ],
)
def test_greedy_output_is_the_autoregressive_output(fixture_gguf, draft, options):
    path = fixture_gguf("base")
    rt = open_runtime(path)
    try:
        prompt = repetitive_prompt(rt)
        want = autoregressive(path, prompt, 48)
        script = want if draft == "script" else ()
        with Speculator(rt, draft, script=script, seed=7, **options) as spec:
            got, stats = spec.generate(prompt, 48)
    finally:
        rt.close()
    assert got == want
    assert stats.n_generated == len(want) == stats.n_verify + stats.n_accepted
    if draft == "none":
        assert stats.n_accepted == stats.n_drafted == 0
    elif options.get("hit_rate") == 0.0:
        # one token per verification; the first draft has 4 tokens, every later one 1 (nothing is ever kept),
        # and the last verification has no room for a draft
        assert stats.n_accepted == 0 and stats.n_drafted == 4 + (stats.n_verify - 2)
    elif draft == "lookup":
        assert stats.n_drafted > 0  # the prompt repeats itself; whether a random model follows is luck
    elif options["hit_rate"] == 1.0:
        assert stats.n_verify <= math.ceil(len(want) / 5)  # every draft of 4 accepted: 5 tokens a verification
    else:
        assert 0 < stats.n_accepted < stats.n_drafted


def test_draft_length_pays_like_the_best_fixed_length():
    """The draft length controller (ggml_patches/tools/deco-speculative/draft-length.h) against simulated drafts
    and verification costs: within 3% of the best fixed length's tokens per second in each case, never slower than
    drafting one more token than the last verification accepted, always the longest draft at acceptance 1 and one
    token at acceptance 0."""
    r = subprocess.run(
        [str(REPO / ".deps" / "build" / "bin" / "test-deco-draft-length")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert r.stdout.count("ok ") == 15 and "0 failed" in r.stdout


@pytest.mark.parametrize("draft_arch", ["deco", "llama"])
def test_draft_model_output_is_the_autoregressive_output(fixture_gguf, tmp_path, draft_arch):
    """A smaller DECO fixture with the same tokenizer drafts for the target (opened by DecoRuntime); so does any
    GGUF with the same vocabulary: the random-weight Llama that `speed --vs-dense` builds beside a DECO
    (deco_gguf.measure.dense_eq), opened through llama-cpp-python."""
    from deco_gguf.measure.dense_eq import build_dense_eq
    from deco_gguf.model.gguf_file import read_gguf

    target = fixture_gguf("base")
    draft = fixture_gguf("de64") if draft_arch == "deco" else build_dense_eq(target, read_gguf(target), tmp_path).path
    rt = open_runtime(target)
    try:
        prompt = repetitive_prompt(rt)
        want = autoregressive(target, prompt, 40)
        dm = DraftModel(draft, rt)
        try:
            assert (dm.runtime is None) == (draft_arch == "llama")
            rt.reset_activity()
            with Speculator(rt, "model", draft_model=dm, n_draft=3) as spec:
                got, stats = spec.generate(prompt, 40)
            target_counts = [a.tokens for a in rt.activity()[:-1] if a is not None]  # the last: output rows only
            draft_counts = [a.tokens for a in dm.runtime.activity() if a is not None] if dm.runtime else [1]
        finally:
            dm.close()
    finally:
        rt.close()
    assert got == want
    assert stats.n_drafted > 0
    # each model counts what its own context evaluated (the draft's tokens never land in the target's counts):
    # the target, the prompt up to its last token, then each verification's last token and draft
    assert target_counts and set(target_counts) == {stats.n_prompt + stats.n_verify + stats.n_drafted}
    assert min(draft_counts) > 0


def test_prompt_cache_is_reused_and_results_do_not_depend_on_it(fixture_gguf):
    """A prompt that extends the previous one is evaluated from where they differ; the output equals a fresh run."""
    path = fixture_gguf("base")
    rt = open_runtime(path)
    try:
        prompt = repetitive_prompt(rt)
        with Speculator(rt, "lookup") as spec:
            first, _ = spec.generate(prompt, 12)
            extended = prompt + first + prompt[1:6]
            second, stats = spec.generate(extended, 16)
            assert stats.n_prompt == len(extended) - 1 - len(prompt + first[:-1])
            other, _ = spec.generate(prompt[:5], 8)  # a shorter, different prompt drops the cache
    finally:
        rt.close()
    assert second == autoregressive(path, extended, 16)
    assert other == autoregressive(path, prompt[:5], 8)


def test_speculators_sharing_a_target_keep_their_outputs(fixture_gguf):
    """Two Speculators on one target (as `speed` keeps one per configuration): one whose KV cache the other has
    overwritten evaluates its whole prompt again, and a script given after init is what the draft proposes."""
    path = fixture_gguf("base")
    rt = open_runtime(path)
    try:
        prompt = repetitive_prompt(rt)
        with Speculator(rt, "lookup") as a, Speculator(rt, "script", n_draft=4) as b:
            first, _ = a.generate(prompt, 12)
            b.set_script(autoregressive(path, prompt[:5], 20))
            scripted, b_stats = b.generate(prompt[:5], 20)  # overwrites the cache a filled
            extended = prompt + first + prompt[1:6]
            second, stats = a.generate(extended, 16)
    finally:
        rt.close()
    assert stats.n_prompt == len(extended) - 1  # nothing of a's earlier prompt was trusted
    assert second == autoregressive(path, extended, 16)
    assert scripted == autoregressive(path, prompt[:5], 20)
    assert b_stats.n_verify <= math.ceil(20 / 5)  # every draft of 4 from the new script accepted


def test_callback_can_stop_and_budget_is_respected(fixture_gguf):
    path = fixture_gguf("base")
    rt = open_runtime(path)
    try:
        prompt = repetitive_prompt(rt)
        want = autoregressive(path, prompt, 30)
        with Speculator(rt, "script", script=want, n_draft=4) as spec:
            runs: list[list[int]] = []
            got, _ = spec.generate(prompt, 30, on_tokens=lambda run: runs.append(run) or len(runs) < 2)
            assert len(runs) == 2 and got == [t for r in runs for t in r] == want[: len(got)]
            got, stats = spec.generate(prompt, 7)
            assert got == want[:7] and stats.n_generated == 7
    finally:
        rt.close()


def test_errors_are_one_line(fixture_gguf):
    path = fixture_gguf("base")
    rt = open_runtime(path)
    try:
        with pytest.raises(DecoError, match=r"vocabulary differs \(size 1100 vs \d+"):
            DraftModel(fixture_gguf("padded_vocab"), rt)
        with pytest.raises(DecoError, match="draft model is needed"):
            Speculator(rt, "model")
        with pytest.raises(DecoError, match="--draft-max must be at least 1"):
            Speculator(rt, "lookup", n_draft=0)
        with Speculator(rt, "lookup") as spec, pytest.raises(DecoError, match="does not fit the context"):
            spec.generate(list(range(3, 3 + N_CTX)), 4)
    finally:
        rt.close()


def _chi_square_p(counts: dict[int, int], probs: np.ndarray) -> float:
    """Goodness of fit of sampled token counts to `probs`; tokens expected fewer than 5 times are pooled.
    p-value by the Wilson-Hilferty approximation of the chi-square distribution."""
    n = sum(counts.values())
    order = np.argsort(-probs)
    big = [int(t) for t in order if probs[t] * n >= 5]
    observed = [counts.get(t, 0) for t in big] + [n - sum(counts.get(t, 0) for t in big)]
    expected = [probs[t] * n for t in big] + [n * (1 - probs[big].sum())]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True) if e > 0)
    k = len(observed) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampling_keeps_the_target_distribution(bundled_gguf):
    """Temperature 1 on the bundled model: the first and second sampled tokens follow softmax of the target's
    logits, although the draft always proposes the greedy tokens (accepted only when the target's own sample
    equals them). The same check rejects samples drawn at temperature 0.7: it can see a skewed sampler."""
    path = bundled_gguf
    rt = open_runtime(path)
    try:
        prompt = rt.llm.tokenize(b"In the beginning God created the heaven and the", add_bos=True)
        greedy = autoregressive(path, prompt, 3)

        def sample(temperature: float, n: int) -> list[list[int]]:
            with Speculator(rt, "script", script=greedy, n_draft=2) as spec:
                return [
                    spec.generate(prompt, 2, Sampling(temperature, top_k=0, top_p=1.0, min_p=0.0, seed=s))[0]
                    for s in range(n)
                ]

        samples, skewed = sample(1.0, 600), sample(0.7, 600)
    finally:
        rt.close()
    ref = open_runtime(path)
    try:

        def softmax(tokens: list[int]) -> np.ndarray:
            ref.llm.reset()
            logits = ref.eval_logits(tokens).astype(np.float64)
            e = np.exp(logits - logits.max())
            return e / e.sum()

        p_first = softmax(prompt)
        second_after = greedy[0]  # the second token, among the samples whose first token was the greedy one
        p_second = softmax(prompt + [second_after])
    finally:
        ref.close()

    def fit(drawn: list[list[int]]) -> tuple[float, float]:
        first: dict[int, int] = {}
        second: dict[int, int] = {}
        for a, b in drawn:
            first[a] = first.get(a, 0) + 1
            if a == second_after:
                second[b] = second.get(b, 0) + 1
        return _chi_square_p(first, p_first), _chi_square_p(second, p_second)

    assert sum(1 for a, _ in samples if a == second_after) >= 200
    assert min(fit(samples)) > 1e-3
    assert max(fit(skewed)) < 1e-4


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deco_gguf.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        cwd=REPO,
    )


def test_bundled_pair_chat_replies_are_the_same(bundled_gguf):
    """`chat` with the trained draft and with lookup gives, greedy, the reply it gives without speculation;
    /stats reports the verifications."""
    chat = [str(bundled_gguf), "--temperature", "0", "--max-tokens", "40", "--threads", "1"]
    lines = "And the LORD spake unto Moses, saying,\nWho is the LORD?\n"
    plain = cli("chat", *chat, stdin=lines)
    assert plain.returncode == 0, plain.stderr
    for extra in (["--draft", str(BUNDLED_DRAFT)], ["--lookup", "--draft-max", "6"]):
        spec = cli("chat", *chat, *extra, stdin=lines + "/stats\n")
        assert spec.returncode == 0, spec.stderr
        assert spec.stdout.startswith(plain.stdout), extra
        assert re.search(r"speculation +│ \d+ verifications, [\d.]+ tokens each; acceptance", spec.stdout), spec.stdout


def test_chat_refuses_a_draft_with_another_vocabulary(fixture_gguf, bundled_gguf):
    done = cli("chat", str(bundled_gguf), "--draft", str(fixture_gguf("base")), "--prompt", "hi")
    assert done.returncode == 1
    message = " ".join(done.stderr.split())  # one line, however the console wrapped it
    assert re.fullmatch(
        r"error: \S+m\.gguf: cannot draft for this model, its vocabulary differs "
        r"\(size \d+ vs 4096 in the target\)",
        message,
    ), done.stderr


def test_speed_speculative_json(fixture_gguf, tmp_path):
    """`speed --synthetic`: a draft that is always right is always accepted, draft-max + 1 tokens a verification;
    one that is always wrong never is. --plot writes a PNG of the five configurations."""
    png = tmp_path / "speculative.png"
    done = cli(
        "speed",
        str(fixture_gguf("base")),
        "--synthetic",
        "1,0",
        "--lookup",
        "--draft-max",
        "3",
        "--pp",
        "16",
        "--tg",
        "24",
        "-r",
        "2",
        "-t",
        "1",
        "--json",
        "--plot",
        str(png),
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {png}" in done.stderr
    width, height = struct.unpack(">II", png.read_bytes()[16:24])  # the PNG's IHDR chunk
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and width >= 720 and height == 540
    results = {r["name"]: r for r in json.loads(done.stdout)["speculative"]["results"]}
    assert set(results) == {"sparse", "dense", "lookup", "synthetic 1", "synthetic 0"}
    assert results["synthetic 1"]["acceptance"] == 1.0 and results["synthetic 1"]["tokens_per_verify"] == 4.0
    assert results["synthetic 0"]["acceptance"] == 0.0 and results["synthetic 0"]["tokens_per_verify"] == 1.0
    assert results["sparse"]["speedup_vs_sparse"] == 1.0


def test_speed_speculative_at_depth(fixture_gguf):
    """`speed --synthetic 1 --depth 0,40`: each configuration at both depths, the same tokens as autoregressive
    decoding at each (asserted by speed itself), and a draft that is always right is always accepted there too."""
    done = cli(
        "speed",
        str(fixture_gguf("base")),
        *("--synthetic", "1", "--draft-max", "3", "--depth", "40,0", "--cache-type", "f32"),
        *("--pp", "8", "--tg", "16", "-r", "1", "-t", "1", "--json"),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["speculative"]
    assert report["settings"]["kv_cache"] == "f32"
    results = {(r["name"], r["depth"]): r for r in report["results"]}
    assert set(results) == {(n, d) for n in ("sparse", "dense", "synthetic 1") for d in (0, 40)}
    for d in (0, 40):
        assert (
            results[("synthetic 1", d)]["acceptance"] == 1.0 and results[("synthetic 1", d)]["tokens_per_verify"] == 4
        )


def test_llama_server_with_a_deco_draft(bundled_gguf, tmp_path):
    """`llama-server -m TARGET -md DRAFT --spec-type draft-simple` with the bundled DECO pair: greedy completions are
    the target's autoregressive tokens, and the server reports drafted and accepted tokens."""
    draft = tmp_path / "draft.gguf"
    convert(BUNDLED_DRAFT, draft, "f16")
    rt = open_runtime(bundled_gguf)
    try:
        prompt = rt.llm.tokenize(b"And the LORD spake unto Moses, saying,", add_bos=True)
    finally:
        rt.close()
    want = autoregressive(bundled_gguf, prompt, 32)
    with llama_server(
        "-m",
        str(bundled_gguf),
        "-md",
        str(draft),
        "--spec-type",
        "draft-simple",
        "--spec-draft-n-max",
        "4",
        "-c",
        "512",
        "-t",
        "2",
        "-fa",
        "off",
        "-ctk",
        "f32",
        "-ctv",
        "f32",
        "--no-warmup",
    ) as url:
        out = post(
            url + "/completion",
            {
                "prompt": prompt,
                "n_predict": len(want),
                "temperature": 0,
                "top_k": 1,
                "return_tokens": True,
                "cache_prompt": False,
            },
        )
    assert out["tokens"] == want
    timings = out["timings"]
    assert timings["draft_n"] > 0 and 0 < timings["draft_n_accepted"] <= timings["draft_n"], timings
