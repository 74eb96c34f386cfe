"""`deco-gguf speed` on the bundled model with tiny settings: the --json schema, sane values, the bytes
bound, the plot, and the equal-N dense model (--vs-dense)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "deco-tiny"

llama_cpp = pytest.importorskip("llama_cpp")
from deco_gguf.runtime.native import is_patched  # noqa: E402

if not is_patched():
    pytest.skip("llama_cpp is not the patched DECO build (run scripts/build-runtime.sh)", allow_module_level=True)

from deco_gguf.measure.dense_eq import dense_eq_plan  # noqa: E402
from deco_gguf.model.gguf_file import read_gguf  # noqa: E402

TINY = ["--pp", "16", "--tg", "8", "--repetitions", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    from deco_gguf.converter import convert

    out = tmp_path_factory.mktemp("speed") / "deco-tiny-f16.gguf"
    convert(BUNDLED, out, "f16")
    return out


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deco_gguf.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
        cwd=REPO,
    )


def test_json_schema_and_values(gguf_path, tmp_path):
    png = tmp_path / "speed.png"
    r = cli("speed", gguf_path, *TINY, "--json", "--plot", png)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert set(rep) == {"model", "settings", "results", "activation", "bytes_per_token", "ratios", "dense_eq"}
    settings = {"pp": 16, "tg": 8, "repetitions": 1, "warmup": 1, "threads": [1], "depths": [0], "kv_cache": "f16"}
    assert rep["settings"] == settings
    combos = {(s["model"], s["mode"], s["threads"], s["test"], s["depth"]) for s in rep["results"]}
    assert combos == {("deco", m, 1, t, 0) for m in ("sparse", "dense") for t in ("pp", "tg")}
    for s in rep["results"]:
        assert s["tokens"] == (16 if s["test"] == "pp" else 8)
        assert len(s["samples"]) == 1 and s["samples"][0] > 0
        tps = s["tokens_per_second"]
        assert tps["min"] == tps["median"] == tps["max"] == s["samples"][0]
        if s["test"] == "pp":  # the prompt's own time (its tokens at the measured rate) plus one decode
            assert s["time_to_first_token_ms"]["median"] > 1e3 * s["tokens"] / s["samples"][0]
        else:
            assert "time_to_first_token_ms" not in s

    layers = rep["activation"]["layers"]
    assert [x["layer"] for x in layers] == [1, 2, 3]  # the DECO layers of the bundled model
    assert all(0 < x["rate"] < 1 for x in layers)
    assert rep["activation"]["mean"] == pytest.approx(sum(x["rate"] for x in layers) / 3)

    b = rep["bytes_per_token"]
    info = read_gguf(gguf_path)
    experts = sum(t.nbytes for t in info.tensors if "_exps." in t.name)
    embd = next(t for t in info.tensors if t.name == "token_embd.weight")
    assert b["expert_total"] == experts
    assert b["non_expert"] == info.total_bytes - experts - embd.nbytes + embd.nbytes // embd.shape[0]
    rates = {x["layer"]: x["rate"] for x in layers}
    active_experts = sum(rates[int(k)] * v for k, v in b["expert_by_layer"].items())
    assert b["sparse"] == pytest.approx(b["non_expert"] + active_experts)
    assert b["dense"] == b["non_expert"] + b["expert_total"] > b["sparse"]
    (ratio,) = rep["ratios"]
    kv = kv_row_bytes(gguf_path, 2) * 4.5  # tg 8 from depth 0: positions 1..8 read, 4.5 on average
    assert ratio["threads"] == 1 and ratio["depth"] == 0 and ratio["kv_bytes"] == pytest.approx(kv)
    assert ratio["bound"] == pytest.approx((b["dense"] + kv) / (b["sparse"] + kv)) and ratio["bound"] > 1
    assert ratio["sparse_over_dense_tg"] > 0 and ratio["sparse_over_dense_eq_tg"] is None
    assert rep["dense_eq"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def kv_row_bytes(path: Path, bytes_per_element: float) -> float:
    """K and V of every layer for one position, from the GGUF's attention metadata."""
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("deco.")}
    row = fields["deco.attention.key_length"] + fields["deco.attention.value_length"]
    return fields["deco.block_count"] * fields["deco.attention.head_count_kv"] * row * bytes_per_element


def test_depth_and_q8_0_cache(gguf_path):
    """--depth 0,48 --cache-type q8_0: every series at both depths, the KV cache of each depth in the bound
    (Q8_0: 34 bytes per 32 elements), the deeper bound nearer 1."""
    r = cli("speed", gguf_path, *TINY, "--depth", "48,0", "--cache-type", "q8_0", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["settings"]["depths"] == [0, 48] and rep["settings"]["kv_cache"] == "q8_0"
    combos = {(s["mode"], s["test"], s["depth"]) for s in rep["results"]}
    assert combos == {(m, t, d) for m in ("sparse", "dense") for t in ("pp", "tg") for d in (0, 48)}
    b = rep["bytes_per_token"]
    assert b["kv_cache_per_position"] == kv_row_bytes(gguf_path, 34 / 32)
    bounds = {}
    for ratio in rep["ratios"]:
        kv = b["kv_cache_per_position"] * (ratio["depth"] + 4.5)
        assert ratio["kv_bytes"] == pytest.approx(kv)
        assert ratio["bound"] == pytest.approx((b["dense"] + kv) / (b["sparse"] + kv))
        bounds[ratio["depth"]] = ratio["bound"]
    assert 1 < bounds[48] < bounds[0]
    table = cli("speed", gguf_path, *TINY, "--depth", "0,48")
    assert table.returncode == 0, table.stderr
    assert "depth" in table.stdout and "f16 KV cache (depth 48" in " ".join(table.stdout.split())


def test_runs_start_at_the_filled_depth(gguf_path):
    """Every timed run starts from the context `fill` evaluated: what a run adds is gone before the next one."""
    from deco_gguf.measure.speed import _Bench
    from deco_gguf.runtime.context import DecoRuntime

    with DecoRuntime(gguf_path, n_ctx=128, n_threads=1, n_batch=16) as rt:
        bench = _Bench("deco", "sparse", rt.llm, rt)
        last_position = lambda: llama_cpp.llama_memory_seq_pos_max(bench.memory, 0)  # noqa: E731
        tokens = rt.llm.tokenize(b"In the beginning God created the heaven and the earth. " * 8)
        bench.fill(tokens[:40], 1)
        assert last_position() == 39
        for _ in range(2):
            bench.tg(tokens[40:48], 1)
            assert last_position() == 47
            bench.pp(tokens[40:60], 1)  # the prompt, then one decoded token
            assert last_position() == 60
        bench.fill([], 1)
        bench.tg(tokens[:5], 1)
        assert last_position() == 4


def test_table_output(gguf_path):
    r = cli("speed", gguf_path, *TINY)
    assert r.returncode == 0, r.stderr
    for words in (
        "DECO sparse",
        "DECO dense",
        "pp16 t/s",
        "time to first token",
        "tg8 t/s",
        "expert activation",
        "bound",
        "Bytes read per decoded token",
    ):
        assert words in r.stdout


def test_vs_dense_equal_parameters(gguf_path, tmp_path):
    env = {"DECO_GGUF_CACHE": str(tmp_path / "cache")}
    r = cli("speed", gguf_path, *TINY, "--vs-dense", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    eq = rep["dense_eq"]
    assert eq["built"] is True and Path(eq["path"]).is_file()
    assert abs(eq["params"] - eq["deco_params"]) / eq["deco_params"] < 0.02  # equal N up to the FFN width's rounding
    assert eq["ffn_width"] % 32 == 0 and eq["types"]["ffn"] == "F16"
    combos = {(s["model"], s["test"]) for s in rep["results"]}
    assert ("dense_eq", "tg") in combos and ("dense_eq", "pp") in combos
    assert all(s["samples"][0] > 0 for s in rep["results"])
    (ratio,) = rep["ratios"]
    assert ratio["sparse_over_dense_eq_tg"] > 0 and ratio["bound_vs_dense_eq"] > 1

    arch = gguf.GGUFReader(eq["path"]).fields["general.architecture"].contents()
    assert arch == "llama"
    again = json.loads(cli("speed", gguf_path, *TINY, "--vs-dense", "--json", env=env).stdout)
    assert again["dense_eq"]["built"] is False and again["dense_eq"]["path"] == eq["path"]


def test_dense_eq_follows_quantized_experts(tmp_path):
    """Q4_0 experts: the dense_eq FFN is written Q4_0 too, attention stays as the DECO model's."""
    from deco_gguf.converter import convert
    from deco_gguf.measure.dense_eq import build_dense_eq

    q = tmp_path / "deco-tiny-q4e.gguf"
    convert(BUNDLED, q, "f16", "q4_0")
    info = read_gguf(q)
    ff, n, deco_n, types, substituted = dense_eq_plan(info)
    assert types["ffn"] == "Q4_0" and types["attn_q"] == "F16" and substituted == {}
    eq = build_dense_eq(q, info, tmp_path / "cache")
    from llama_cpp import Llama

    llm = Llama(model_path=str(eq.path), n_ctx=64, n_threads=1, verbose=False)
    try:
        llm.eval([1, 100, 200])  # loads and runs
    finally:
        llm.close()
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(eq.path).tensors}
    assert written["blk.0.ffn_up.weight"] == written["blk.3.ffn_down.weight"] == "Q4_0"
    assert written["blk.0.attn_q.weight"] == "F16" and written["blk.0.attn_norm.weight"] == "F32"
    assert eq.params == n and eq.ffn_width == ff and abs(n - deco_n) / deco_n < 0.02


def test_bad_threads_is_one_line(gguf_path):
    r = cli("speed", gguf_path, "--threads", "one,two")
    assert r.returncode == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1


def test_dense_eq_keeps_k_quant_types(gguf_path, tmp_path):
    """llama.cpp's Q4_0 preset writes a Q6_K output head: dense_eq writes Q6_K too (libggml's quantizer)."""
    import numpy as np

    from deco_gguf.measure.dense_eq import _quantize, build_dense_eq
    from deco_gguf.runtime.tools import quantize

    x = np.random.default_rng(0).standard_normal((4, 512), dtype=np.float32)
    back = gguf.quants.dequantize(_quantize(x, "Q6_K"), gguf.GGMLQuantizationType.Q6_K)
    assert back.shape == x.shape and np.abs(back - x).max() < 0.1

    q4 = tmp_path / "deco-tiny-q4_0.gguf"
    quantize(gguf_path, q4, "Q4_0", n_threads=1)
    info = read_gguf(q4)
    _, _, _, types, substituted = dense_eq_plan(info)
    assert types["output"] == next(t.type for t in info.tensors if t.name == "output.weight") == "Q6_K"
    assert types["ffn"] == types["attn_q"] == "Q4_0" and substituted == {}
    eq = build_dense_eq(q4, info, tmp_path / "cache")
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(eq.path).tensors}
    assert written["output.weight"] == "Q6_K" and written["blk.1.ffn_gate.weight"] == "Q4_0"
