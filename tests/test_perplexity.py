"""`deco-gguf perplexity` against llama.cpp's own llama-perplexity (the patched build) on the bundled model.

Same GGUF (F16 conversion of models/deco-tiny), same held-out text (the first chapters of the
held-out KJV split), same context: the PPL, its ± and the per-chunk running values must agree within
1% (in practice they agree to the printed digits). The error paths end with one `error:` line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "deco-tiny"
BIN = REPO / ".deps" / "build" / "bin"
LLAMA_PERPLEXITY = BIN / "llama-perplexity"

llama_cpp = pytest.importorskip("llama_cpp")
from deco_gguf.runtime.native import is_patched  # noqa: E402

if not is_patched():
    pytest.skip("llama_cpp is not the patched DECO build (run scripts/build-runtime.sh)", allow_module_level=True)

CTX = 256
TEXT_CHARS = 7000  # ~1750 tokens: 6 chunks of 256


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from deco_gguf.converter import convert
    from deco_gguf.training.corpus import load_corpus

    d = tmp_path_factory.mktemp("ppl")
    gguf = d / "deco-tiny-f16.gguf"
    convert(BUNDLED, gguf, "f16")
    text = ""
    for chapter in load_corpus().heldout:
        text += chapter + "\n"
        if len(text) >= TEXT_CHARS:
            break
    (d / "heldout.txt").write_text(text, encoding="utf-8")
    return {"gguf": gguf, "text": d / "heldout.txt", "dir": d}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deco_gguf.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=REPO,
    )


def ours(gguf: Path, text: Path, ctx: int, *extra: str) -> dict:
    r = cli("perplexity", gguf, text, "--ctx-size", str(ctx), "--threads", "1", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def reference(gguf: Path, text: Path, ctx: int, *extra: str) -> tuple[str, float | None, float | None, list[float]]:
    """llama-perplexity's output, its final PPL and ±, and its per-chunk running values."""
    if not LLAMA_PERPLEXITY.exists():
        pytest.skip(f"{LLAMA_PERPLEXITY} is not built (scripts/build-runtime.sh)")
    r = subprocess.run(
        [str(LLAMA_PERPLEXITY), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-t", "1", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LD_LIBRARY_PATH": str(BIN)},
    )
    out = r.stdout + r.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    chunks = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", out)]
    return out, float(m.group(1)) if m else None, float(m.group(2)) if m else None, chunks


def test_matches_llama_perplexity(files):
    got = ours(files["gguf"], files["text"], CTX)
    _, ppl, err, chunks = reference(files["gguf"], files["text"], CTX)
    assert ppl is not None, "llama-perplexity printed no final estimate"
    assert got["chunks"] == len(chunks) == got["tokens"] // CTX >= 4
    assert got["scored_tokens"] == got["chunks"] * (CTX - 1 - CTX // 2)
    assert abs(got["ppl"] - ppl) / ppl < 0.01
    assert abs(got["ppl_error"] - err) / err < 0.01
    for a, b in zip(got["chunk_ppl"], chunks, strict=True):
        assert abs(a - b) / b < 0.01
    assert 10 < got["ppl"] < 80  # a trained model on held-out text from its own domain
    assert got["add_bos"] is True and 0.05 < got["mean_activation"] < 0.5


def test_q8_0_cache_matches_llama_perplexity(files):
    """--cache-type q8_0 is llama-perplexity's -ctk q8_0 -ctv q8_0: the same number, which is not the F16 cache's."""
    got = ours(files["gguf"], files["text"], CTX, "--cache-type", "q8_0")
    _, ppl, err, _ = reference(files["gguf"], files["text"], CTX, "-ctk", "q8_0", "-ctv", "q8_0")
    f16 = ours(files["gguf"], files["text"], CTX)
    assert got["kv_cache"] == "q8_0" and f16["kv_cache"] == "f16"
    assert abs(got["ppl"] - ppl) < 1e-4 and abs(got["ppl_error"] - err) < 1e-5  # the digits llama-perplexity prints
    assert abs(got["ppl"] - f16["ppl"]) > 1e-3, (got["ppl"], f16["ppl"])


def test_dense_mode_gives_the_same_number(files):
    sparse = ours(files["gguf"], files["text"], 128)
    dense = ours(files["gguf"], files["text"], 128, "--mode", "dense")
    assert abs(sparse["ppl"] - dense["ppl"]) / sparse["ppl"] < 1e-3  # skipping inactive experts is exact


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_errors(files, tmp_path):
    gguf, text = files["gguf"], files["text"]
    _one_line_error(cli("perplexity", tmp_path / "missing.gguf", text), "no such file")
    _one_line_error(cli("perplexity", gguf, tmp_path / "missing.txt"), "file not found")

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    _one_line_error(cli("perplexity", gguf, empty), "empty text")

    import gguf as gguf_py
    import numpy as np

    llama = tmp_path / "llama.gguf"
    w = gguf_py.GGUFWriter(llama, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(cli("perplexity", llama, text), "not a DECO GGUF")

    _one_line_error(cli("perplexity", gguf, text, "--ctx-size", "4096"), "not enough tokens")


def test_chunks_side_by_side_or_split_give_the_same_number(files):
    """Many chunks per decode (the default, as llama-perplexity) and one chunk over several decodes."""
    from deco_gguf.measure.perplexity import perplexity

    side_by_side = perplexity(files["gguf"], files["text"], ctx_size=CTX, n_threads=1)
    split = perplexity(files["gguf"], files["text"], ctx_size=CTX, n_threads=1, n_batch=CTX // 4)
    assert side_by_side.chunks == split.chunks >= 4
    assert abs(side_by_side.ppl - split.ppl) / split.ppl < 1e-4
    for a, b in zip(side_by_side.chunk_ppl, split.chunk_ppl, strict=True):
        assert abs(a - b) / b < 1e-4
