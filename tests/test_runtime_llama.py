"""The patched llama.cpp runtime (ggml_patches/, built by scripts/build-runtime.sh) against the reference.

Every check uses F32 GGUFs, an F32 KV cache and flash attention off (the CPU flash-attention path rounds
to F16), so the patched llama.cpp must match deco_gguf.model.reference to 1e-4 relative (max|d| / max|logit|).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_server import llama_server, post  # tests/llama_server.py

from deco_gguf.converter.convert import convert
from deco_gguf.fixtures import VARIANTS as FIXTURES
from deco_gguf.fixtures import write_fixture
from deco_gguf.fixtures.calibrate import fixture_hook
from deco_gguf.model.reference import DecoModel
from deco_gguf.runtime.activity import ActivityCounter
from deco_gguf.runtime.context import MODE_KEY, MODES
from deco_gguf.runtime.native import library

REPO = Path(__file__).resolve().parents[1]
BUILD_BIN = REPO / ".deps" / "build" / "bin"
_lib = library()  # the patched libllama, llama.cpp's logs kept quiet
TOL = 1e-4

llama_cpp.llama_backend_init()


class Runtime:
    """Minimal llama-cpp-python low-level session on one GGUF (F32 KV cache, no flash attention unless asked)."""

    def __init__(
        self,
        path: Path,
        n_ctx: int = 256,
        n_batch: int = 512,
        n_seq: int = 1,
        mode: str = "sparse",
        counter: ActivityCounter | None = None,
        flash_attn: bool = False,
        kv_type: int = 0,  # enum ggml_type: F32
    ):
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = int(os.environ.get("DECO_TEST_NGL", "0"))  # scripts/gpu-check.sh: 99 (all on the GPU)
        overrides = (llama_cpp.llama_model_kv_override * 2)()  # the mode, then the empty key that ends the list
        overrides[0].key = MODE_KEY.encode()
        overrides[0].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        overrides[0].value.val_str = mode.encode()
        mp.kv_overrides = overrides
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"failed to load {path}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = 2
        cp.type_k = cp.type_v = kv_type
        cp.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if counter is not None:
            counter.install(cp)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("failed to create the context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def close(self):
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def decode(
        self, seqs: list[list[int]], start: list[int] | None = None, all_logits: bool = False
    ) -> list[np.ndarray]:
        """One llama_decode over several sequences; returns the last position's logits of each (or all rows)."""
        start = start or [0] * len(seqs)
        n = sum(len(s) for s in seqs)
        batch = llama_cpp.llama_batch_init(n, 0, len(seqs))
        try:
            i = 0
            last = []
            for sid, (s, p0) in enumerate(zip(seqs, start, strict=True)):
                for j, tok in enumerate(s):
                    batch.token[i] = tok
                    batch.pos[i] = p0 + j
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = sid
                    batch.logits[i] = all_logits or j == len(s) - 1
                    i += 1
                last.append(i - 1)
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(self.ctx, batch)
            assert rc == 0, f"llama_decode returned {rc}"
            rows = range(n) if all_logits else last
            return [
                np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, r), shape=(self.n_vocab,)).copy()
                for r in rows
            ]
        finally:
            llama_cpp.llama_batch_free(batch)


def _rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache: dict[str, tuple[Path, DecoModel]] = {}

    def get(variant: str, expert_type: str = "f32") -> tuple[Path, DecoModel]:
        key = f"{variant}-{expert_type}"
        if key not in cache:
            d = tmp_path_factory.mktemp(key)
            write_fixture(d / "hf", variant)
            convert(d / "hf", d / "m.gguf", outtype="f32", expert_type=expert_type)
            cache[key] = (d / "m.gguf", DecoModel.from_pretrained(d / "hf"))
        return cache[key]

    return get


def _ids(ref: DecoModel, n: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(3, ref.config.vocab_size, size=n)]


# Every fixture the converter accepts (the dense `normal` router norm it refuses).
VARIANTS = sorted(name for name, spec in FIXTURES.items() if spec.router_norm_type != "normal")


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_reference(models, variant):
    path, ref = models(variant)
    ids = _ids(ref, 20)
    want = ref(ids).logits[0, -1].float().numpy()
    for mode in MODES:
        rt = Runtime(path, mode=mode)
        try:
            got = rt.decode([ids])[0]
        finally:
            rt.close()
        assert _rel_err(got, want) < TOL, (variant, mode, _rel_err(got, want))


def test_incremental_decode_and_chunked_prefill(models):
    """KV cache: prefill 7 tokens, then one token at a time; every step's logits match the reference."""
    path, ref = models("base")
    ids = _ids(ref, 14, seed=1)
    full = ref(ids).logits[0].float().numpy()
    rt = Runtime(path)
    try:
        got = rt.decode([ids[:7]], all_logits=True)
        for j in range(7):
            assert _rel_err(got[j], full[j]) < TOL
        for j in range(7, len(ids)):
            got = rt.decode([[ids[j]]], start=[j])[0]
            assert _rel_err(got, full[j]) < TOL, j
    finally:
        rt.close()


def test_several_sequences_in_one_batch(models):
    path, ref = models("gated")
    seqs = [_ids(ref, 9, seed=2), _ids(ref, 5, seed=3), _ids(ref, 12, seed=4)]
    rt = Runtime(path, n_seq=3)
    try:
        got = rt.decode(seqs)
    finally:
        rt.close()
    for s, g in zip(seqs, got, strict=True):
        want = ref(s).logits[0, -1].float().numpy()
        assert _rel_err(g, want) < TOL


def test_quantized_experts_sparse_equals_dense(models):
    """Q8_0/Q4_0 experts: sparse, dense and plain-ops evaluation agree; close to the F32 reference."""
    for et, tol in (("q8_0", 2e-2), ("q4_0", 1e-1)):
        path, ref = models("base", et)
        ids = _ids(ref, 16, seed=5)
        want = ref(ids).logits[0, -1].float().numpy()
        out = {}
        for mode in MODES:
            rt = Runtime(path, mode=mode)
            try:
                out[mode] = rt.decode([ids])[0]
            finally:
                rt.close()
        assert _rel_err(out["sparse"], out["dense"]) < 1e-5
        assert _rel_err(out["sparse"], out["ops"]) < 1e-2  # ops quantizes activations per full row
        assert _rel_err(out["sparse"], want) < tol


def _poison_experts(src: Path, dst: Path, inactive: dict[int, np.ndarray]) -> Path:
    """A copy of the Q4_0-expert GGUF src whose experts inactive[layer] have NaN weights (every block scale)."""
    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.ffn_(up|gate|down)_exps\.weight", t.name)
        if not m or int(m[1]) not in inactive:
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        blocks = t.data.reshape(t.data.shape[0], -1, 18)  # [expert, block, bytes]: an F16 scale, then 16 bytes
        blocks[inactive[int(m[1])], :, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), dtype=np.uint8)
    reader.data.flush()
    return dst


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory) -> tuple[Path, DecoModel]:
    """180 experts with routers calibrated to ~5% activation: a few tokens leave many experts unused."""
    d = tmp_path_factory.mktemp("e180-q4_0")
    write_fixture(d / "hf", "e180", state_dict_hook=fixture_hook(0.05))
    convert(d / "hf", d / "m.gguf", outtype="f32", expert_type="q4_0")
    return d / "m.gguf", DecoModel.from_pretrained(d / "hf")


@pytest.mark.parametrize("k", [2, 3, 5, 8, 16])
def test_verification_batch_equals_one_token_at_a_time(sparse_model, tmp_path, k):
    """After a 4-token prompt, k tokens in one batch (a speculative verification) give, row by row, the logits of
    decoding them one at a time, and of dense evaluation; in the batched run the experts that no token activates
    have NaN weights, so any read of them would show."""
    path, ref = sparse_model
    ids = _ids(ref, 4 + k, seed=10 + k)
    out = ref(ids)
    inactive = {il: np.flatnonzero(~a[0].any(0).numpy()) for il, a in enumerate(out.activation) if a is not None}
    assert sum(len(v) for v in inactive.values()) > 0
    poisoned = _poison_experts(path, tmp_path / "poisoned.gguf", inactive)

    def run(model: Path, mode: str, batched: bool) -> np.ndarray:
        rt = Runtime(model, mode=mode)
        try:
            rt.decode([ids[:4]])
            if batched:
                return np.stack(rt.decode([ids[4:]], start=[4], all_logits=True))
            return np.stack([rt.decode([[tok]], start=[4 + j])[0] for j, tok in enumerate(ids[4:])])
        finally:
            rt.close()

    batch = run(poisoned, "sparse", batched=True)
    assert np.isfinite(batch).all()
    assert _rel_err(batch, run(path, "sparse", batched=False)) < 1e-5
    assert _rel_err(batch, run(path, "dense", batched=True)) < 1e-5
    assert _rel_err(batch, out.logits[0, 4:].float().numpy()) < 1e-1  # Q4_0 experts against the F32 reference


@pytest.mark.parametrize("variant", ["base", "expert_bias_rms", "router_sqrelu"])
def test_activity_counters_match_reference(models, variant):
    path, ref = models(variant)
    ids = _ids(ref, 18, seed=6)
    act = ref(ids).activation
    counter = ActivityCounter(ref.config.moe_layers, ref.config.num_experts)
    rt = Runtime(path, counter=counter)
    try:
        rt.decode([ids], all_logits=True)  # all rows: the last layer then sees every token
    finally:
        rt.close()
    for a, counted in zip(act, counter.read(), strict=True):
        if a is None:
            assert counted is None
            continue
        per_tok = a[0].sum(-1)
        assert counted.tokens == len(ids)
        assert counted.active == int(per_tok.sum())
        assert (counted.min_active, counted.max_active) == (int(per_tok.min()), int(per_tok.max()))


def test_activity_belongs_to_the_context_that_counted_it(models):
    """Two models in one process, evaluated in turns: each context's counts are the tokens it evaluated."""
    (path_a, ref_a), (path_b, ref_b) = models("base"), models("router_sqrelu")
    counters = [ActivityCounter(r.config.moe_layers, r.config.num_experts) for r in (ref_a, ref_b)]
    runtimes = [Runtime(p, counter=c) for p, c in zip((path_a, path_b), counters, strict=True)]
    try:
        runtimes[0].decode([_ids(ref_a, 7, seed=1)], all_logits=True)
        runtimes[1].decode([_ids(ref_b, 5, seed=2)], all_logits=True)
        runtimes[0].decode([_ids(ref_a, 3, seed=3)], start=[7], all_logits=True)
    finally:
        for rt in runtimes:
            rt.close()
    for counter, n_tokens in zip(counters, (10, 5), strict=True):
        assert [a.tokens for a in counter.read() if a is not None] == [n_tokens] * sum(counter.moe_layers)


def _mutate(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    data = src.read_bytes()
    assert old in data and len(old) == len(new)
    dst.write_bytes(data.replace(old, new, 1))
    return dst


def test_malformed_files_fail_cleanly(models, tmp_path):
    path, _ = models("base")
    bad = [
        _mutate(path, tmp_path / "act.gguf", b"norm_silu", b"norm_xilu"),
        _mutate(path, tmp_path / "router.gguf", b"deco.router_activation", b"deco.router_activatiom"),
        _mutate(path, tmp_path / "mask.gguf", b"deco.moe_layer_mask", b"deco.moe_layer_masq"),
    ]
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    bad.append(trunc)
    for p in bad:
        with pytest.raises(RuntimeError, match="failed to load"):
            Runtime(p)


def _backend_ops_on_cpu(*args: str) -> int:
    """test-backend-ops on the CPU backend, which it compares with the CPU's reference path; how many cases ran
    (all of them passed)."""
    r = subprocess.run(
        [str(BUILD_BIN / "test-backend-ops"), "-b", "CPU", *args],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "LD_LIBRARY_PATH": str(BUILD_BIN)},
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+)/(\d+) tests passed", r.stdout)
    assert passed and passed[1] == passed[2], r.stdout[-2000:]
    return int(passed[1])


def test_backend_ops_deco_cases_on_cpu():
    """test-backend-ops' DECO_MOE cases (types, odd shapes, all-inactive/all-active rows, the expert layers of DECO-0.5B
    and DECO-1.2B) run on the CPU."""
    assert _backend_ops_on_cpu("-o", "DECO_MOE") >= 181  # every case ran: 169 small, 12 at real shapes


def test_small_batch_plain_row_mul_mat_against_the_reference_path():
    """Upstream's MUL_MAT cases of Q5_K, Q6_K, Q8_0, Q5_0 and Q5_1 weights (2-16 columns, Q5_K and Q6_K from 1, go
    through the plain-row kernels of ggml-cpu/small-batch.cpp and small-batch-q8.cpp) against the CPU backend's
    reference path, which keeps ggml's vec_dot."""
    assert _backend_ops_on_cpu("-o", "MUL_MAT", "-p", "type_a=(q(5|6)_K|q8_0|q5_0|q5_1),") >= 120  # 120 today


# the cases of ggml_patches/tests/test-backend-ops-fa-decode.inc at cache lengths upstream's short cases do not use
# (1031 stands for 1024, 517-601 for 512, 3-250 for 113: the ~3,100 upstream cases at 113, 512 and 1024 would take
# minutes), and upstream's own 14 at 4096 and 8192
FA_DECODE_CASES = r"kv=(3|37|250|517|545|601|1031|1500|2000|2053|3001|4096|8192),nb=(1|2|3|4|16),"


def test_flash_decoding_cases_against_the_reference_path():
    """FLASH_ATTN_EXT of 1-16 query rows over KV caches of chat depth (ggml-cpu/fa-decode.cpp: F16, Q8_0 and F32
    caches, MHA and GQA, head sizes 64 and 128, short caches, lengths off its tile, sinks, ALiBi, a softcap, sparse
    masks) against the CPU backend's reference path, as test-backend-ops compares them."""
    assert _backend_ops_on_cpu("-o", "FLASH_ATTN_EXT", "-p", FA_DECODE_CASES) == 105


@pytest.mark.parametrize("kv_type, tol", [(0, 1e-4), (1, 2e-2)])  # F32, F16 caches
def test_flash_decoding_at_depth_gives_plain_attention_logits(models, kv_type, tol):
    """After a 700-token prompt, single tokens and a 4-token batch decoded with flash attention (the flash-decoding
    path) give the logits of plain attention over an F32 cache: exactly up to rounding with an F32 cache, within
    F16 rounding with an F16 one."""
    path, ref = models("base")
    ids = _ids(ref, 710, seed=21)

    def run(flash_attn: bool, kv: int) -> np.ndarray:
        rt = Runtime(path, n_ctx=1024, n_batch=1024, flash_attn=flash_attn, kv_type=kv)
        try:
            rows = [rt.decode([ids[:700]])[0]]
            rows += [rt.decode([[tok]], start=[700 + j])[0] for j, tok in enumerate(ids[700:706])]
            rows += rt.decode([ids[706:710]], start=[706], all_logits=True)
            return np.stack(rows)
        finally:
            rt.close()

    plain, flash = run(False, 0), run(True, kv_type)
    assert _rel_err(flash, plain) < tol
    assert (flash.argmax(-1) == plain.argmax(-1)).all()


def test_op_against_naive_reference():
    r = subprocess.run([str(BUILD_BIN / "test-deco-ffn"), "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " 0 failed" in r.stdout


def test_llama_server_completion(models):
    """llama-server serves a DECO GGUF on loopback: greedy completion = the reference's greedy tokens."""
    path, ref = models("base")
    with llama_server(
        "-m", str(path), "-c", "256", "-np", "2", "-t", "2", "-fa", "off", "-ctk", "f32", "-ctv", "f32", "--no-warmup"
    ) as url:
        ids = _ids(ref, 10, seed=7)
        out = post(
            url + "/completion",
            {"prompt": ids, "n_predict": 4, "temperature": 0, "top_k": 1, "return_tokens": True, "cache_prompt": False},
        )
        assert out["tokens"] == ref.generate_greedy(ids, 4)


def test_mode_override_reaches_the_model(models):
    """The `deco.ffn_mode` override picks the graph: `ops` has no DECO op (nothing is counted)."""
    path, ref = models("base")
    ids = _ids(ref, 6, seed=11)
    counted = {}
    for mode in ("ops", "sparse"):
        counter = ActivityCounter(ref.config.moe_layers, ref.config.num_experts)
        rt = Runtime(path, mode=mode, counter=counter)
        try:
            rt.decode([ids])
        finally:
            rt.close()
        counted[mode] = sum(a.tokens for a in counter.read() if a is not None)
    assert counted["ops"] == 0 and counted["sparse"] >= len(ids)
