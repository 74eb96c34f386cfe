"""The aarch64 cross build (scripts/build-aarch64.sh) under qemu-user, against x86 and the reference, and
test-backend-ops' DECO_MOE and flash-decoding FLASH_ATTN_EXT cases there (NEON against the reference path).

The binaries target Jetson Orin's Cortex-A78AE cores (-march=armv8.2-a+dotprod+fp16) and run on an
emulated Cortex-A76, the closest CPU qemu has (the same ARMv8.2 level with dotprod and fp16), so an
instruction beyond it would trap. A missing build or qemu fails these tests; DECO_SKIP_AARCH64=1 skips
them on purpose (docs/arm.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_runtime import dequantized_reference

from deco_gguf.converter import convert
from deco_gguf.fixtures import write_fixture
from deco_gguf.model.reference import DecoModel
from deco_gguf.runtime.context import DecoRuntime

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".deps" / "build-aarch64" / "bin"
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "cortex-a76"]
PROMPT = "And the LORD spake unto Moses, saying, Speak unto the children of Israel, that they bring me an offering"

pytestmark = pytest.mark.skipif(os.environ.get("DECO_SKIP_AARCH64") == "1", reason="DECO_SKIP_AARCH64=1")


@pytest.fixture(scope="module", autouse=True)
def cross_build():
    tools = (BIN / "test-deco-ffn", BIN / "test-deco-logits", BIN / "test-backend-ops-ggml")
    missing = [str(p) for p in tools if not p.is_file()]
    missing += [] if shutil.which(QEMU[0]) else [QEMU[0]]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/build-aarch64.sh (or set DECO_SKIP_AARCH64=1)")


def qemu(args: list[str], timeout: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(QEMU + args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def test_op_against_naive_reference_on_aarch64():
    r = qemu([str(BIN / "test-deco-ffn"), "2"], timeout=900)
    assert r.returncode == 0 and " 0 failed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    # the expert weights also went through the CPU_REPACK buffer, i.e. ggml's NEON repacked kernels
    assert "(repacked weights: q4_0 q8_0" in r.stdout, r.stdout[-500:]


def backend_ops(*args: str, timeout: int) -> int:
    """test-backend-ops on the aarch64 CPU backend, compared with its reference path; how many cases ran (all of
    them passed)."""
    r = qemu([str(BIN / "test-backend-ops-ggml"), "test", "-b", "CPU", *args], timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+)/(\d+) tests passed", r.stdout)
    assert passed and passed[1] == passed[2], r.stdout[-2000:]
    return int(passed[1])


def test_backend_ops_deco_cases_on_aarch64():
    """The DECO_MOE cases at the DECO-0.5B and DECO-1.2B expert layers, 1 to 33 tokens (rows of 40 and 56 quantized
    blocks through NEON; ~1 min of qemu). Both sides run deco-moe.cpp, so this shows the op runs at those shapes and
    agrees with itself across thread counts; test-deco-ffn above checks it against a reference on small shapes.
    The 512-token cases and the 169 small ones (6 more minutes of qemu) run on x86 only."""
    assert backend_ops("-o", "DECO_MOE", "-p", r"d=(1280|1792),.*,T=(1|2|5|16|33),", timeout=900) == 10


# the cases of test-backend-ops-fa-decode.inc whose cache lengths upstream's cases do not use (so none of those
# thousands): MHA and GQA, head sizes 64 and 128, F16 and Q8_0 caches at 1031 positions (not a multiple of the
# tile) with 1, 3 and 16 rows, and the extras (no mask, sinks, ALiBi, softcap, mixed K/V, short caches, sparse
# masks)
FA_DECODE_QEMU_CASES = r"kv=(3|37|250|517|545|601|1031|1500|2000|2053|3001),nb=(1|2|3|4|16),"


def test_flash_decoding_cases_on_aarch64():
    """fa-decode.cpp's NEON path against the CPU backend's reference path (~30 s of qemu)."""
    assert backend_ops("-o", "FLASH_ATTN_EXT", "-p", FA_DECODE_QEMU_CASES, timeout=900) == 43


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def aarch64_logits(path: Path, ids: list[int], mode: str, tmp: Path) -> np.ndarray:
    """All positions' logits [T, V] from test-deco-logits under qemu."""
    out = tmp / f"logits-{mode}.f32"
    r = qemu([str(BIN / "test-deco-logits"), str(path), str(out), "2", *map(str, ids)], timeout=300, DECO_FFN=mode)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.fromfile(out, dtype="<f4").reshape(len(ids), -1)


# Bounds on max|d| / max|logit| (measured values in docs/arm.md).
# F32 weights, whatever the experts: aarch64 and x86 run the same math and round activations for the
# quantized experts identically; only the summation order of the SIMD dot products differs (NEON 4 lanes
# vs AVX2 8, other tilings), so they agree to float rounding.
# F16 weights: ggml's ARM kernels with FP16 vector arithmetic (vec_dot_f16, tinyBLAS) accumulate F16 dot
# products in F16, where x86 converts to F32 (F16C): ~2^-11 relative per partial sum, ~2e-3 measured.
# Q8_0 weights everywhere: Q8_0 activation rounding makes this model's logits jump by ~6e-3 at the
# slightest change upstream (on x86 alone, +1 ulp on the F32 weights of one norm moves them by 5.9e-3;
# the F32 file moves by 3e-7): aarch64 and x86 differ by that much, as does either from the reference.
# The reference runs on the weights the file holds (dequantized), so only activation rounding remains;
# the F32 bound is the one of tests/test_runtime_llama.py.
TOL_F32 = (1e-5, 1e-4)
# name -> (HF source, GGUF outtype, expert type, (bound vs x86, bound vs reference))
GGUFS = {
    "tiny-f32": ("tiny", "f32", "f32", TOL_F32),
    "tiny-f32-q4_0": ("tiny", "f32", "q4_0", (1e-5, 5e-3)),
    "tiny-f16-q4_0": ("tiny", "f16", "q4_0", (1e-2, 1e-2)),  # what scripts/demo.sh converts
    "tiny-q8_0": ("tiny", "q8_0", "q8_0", (2e-2, 2e-2)),
    "gated-f32": ("gated", "f32", "f32", TOL_F32),
    "expert_bias_rms-f32": ("expert_bias_rms", "f32", "f32", TOL_F32),
}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    cache: dict[str, tuple[Path, DecoModel]] = {}

    def get(name: str) -> tuple[Path, DecoModel]:
        if name not in cache:
            source, outtype, expert_type, _ = GGUFS[name]
            d = tmp_path_factory.mktemp(name)
            hf = REPO / "models" / "deco-tiny" if source == "tiny" else write_fixture(d / "hf", source)
            convert(hf, d / "m.gguf", outtype=outtype, expert_type=expert_type)
            ref = DecoModel.from_pretrained(hf)
            exact = outtype == expert_type == "f32"
            cache[name] = (d / "m.gguf", ref if exact else dequantized_reference(d / "m.gguf", ref))
        return cache[name]

    return get


def prompt_ids(path: Path, ref: DecoModel) -> list[int]:
    with DecoRuntime(path, n_ctx=64, n_threads=2) as rt:
        ids = rt.llm.tokenize(PROMPT.encode(), add_bos=True)
    assert max(ids) < ref.config.vocab_size
    return ids[:24]


@pytest.mark.parametrize("name", GGUFS)
def test_logits_agree_with_x86_and_reference(gguf_file, name, tmp_path):
    path, ref = gguf_file(name)
    ids = prompt_ids(path, ref)
    want = ref(ids).logits[0].float().numpy()
    tol_x86, tol_ref = GGUFS[name][3]
    got = {}
    for mode in ("sparse", "dense"):
        got[mode] = aarch64_logits(path, ids, mode, tmp_path)
        with DecoRuntime(path, n_ctx=64, n_threads=2, mode=mode, exact=True) as rt:
            x86 = rt.eval_logits(ids)
        errs = (rel_err(got[mode][-1], x86), rel_err(got[mode], want))
        print(f"{name} {mode}: vs x86 {errs[0]:.2e}, vs reference {errs[1]:.2e}")
        assert errs[0] < tol_x86, (mode, "x86", errs)
        assert errs[1] < tol_ref, (mode, "reference", errs)
    assert rel_err(got["sparse"], got["dense"]) < 1e-5  # the same kernels; dense adds zero-weight experts
