"""Where the model loader puts the expert weights of a DECO-1.2B-shaped model for a CUDA device, without a GPU.

`test-deco-placement` (ggml_patches/tests/test-deco-placement.cpp) registers a stand-in GPU device whose
supports_op for GGML_OP_DECO_MOE is the CUDA backend's own check (ggml-cuda/deco-moe-supported.h) and loads the
model's metadata with every layer on it: every expert tensor (up, gate, down) must be put on the device, and the
device must refuse a DECO node whose expert weights sit in the CPU's repacked layout (docs/cuda.md).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from deco_gguf.converter.convert import convert
from deco_gguf.fixtures import deco_1_2b_layers, write_fixture

BUILD_BIN = Path(__file__).resolve().parents[1] / ".deps" / "build" / "bin"

# The expert layer of DECO-1.2B (d 1792, 102 experts of 64 rows), gated so that all three roles are placed; one
# dense and one DECO layer and the fixture vocabulary, as only the expert shapes matter for the placement.
DECO_1_2B_LAYERS = deco_1_2b_layers(2, dense_ffn=256, expert_gated=True, tokenizer_format="model", vocab_size=None)


@pytest.fixture(scope="module")
def model_1_2b(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("deco-1.2b-layers")
    write_fixture(d / "hf", DECO_1_2B_LAYERS)
    convert(d / "hf", d / "q4_0.gguf", outtype="f16", expert_type="q4_0")
    return d / "q4_0.gguf"


def test_every_expert_tensor_goes_to_the_cuda_device(model_1_2b):
    tool = BUILD_BIN / "test-deco-placement"
    assert tool.is_file(), f"missing {tool}: run scripts/build-runtime.sh"
    r = subprocess.run(
        [str(tool), str(model_1_2b)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LD_LIBRARY_PATH": str(BUILD_BIN)},
    )
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    placed = re.findall(r"^ok  : (blk\.1\.ffn_(up|gate|down)_exps\.weight) q4_0 ", r.stdout, re.M)
    assert sorted(role for _, role in placed) == ["down", "gate", "up"], r.stdout
    assert re.search(r"^0 failed$|^\d+ passed, 0 failed$", r.stdout, re.M), r.stdout
