"""The model steps of scripts/gpu-check.sh.

gpu_check_model.py OUT_DIR N_LAYERS
    writes a random DECO-1.2B-shaped checkpoint (deco_gguf.fixtures.deco_1_2b_layers, routers calibrated to ~20%
    active experts) and converts it to OUT_DIR/f16.gguf (gpu-check.sh quantizes it to Q4_0).
gpu_check_model.py --compare MODEL TEST_DECO_LOGITS OUT_DIR
    the model's logits on the GPU (all layers) against the CPU (none), from the same build's test-deco-logits: a
    40-token batch, then 8 tokens decoded one at a time, sparse and dense; prints the errors and the greedy
    (argmax) agreement, exit status 1 beyond the bounds below.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

N_BATCH, N_DECODE = 40, 8
# max|GPU - CPU| / max|CPU logit|. Both sides read the same Q4_0 weights; the CPU rounds the activations of the
# expert products to q8_0, CUDA to q8_1, which moves a random model's logits by ~1e-2 (docs/cuda.md, Numerics).
# A first bound, to be tightened once measured; a wrong kernel is off by O(1).
TOL_GPU_CPU = 5e-2
# argmax agreement where the CPU's top two logits are further apart than the GPU error
MIN_GREEDY_AGREEMENT = 0.9
# dense = sparse on the GPU: the same kernels, inactive experts weighted by exactly 0, but other tilings of the
# sums; on the CPU this model's dense and sparse logits differ by 4e-4 (2 layers, Q4_0; x86 Zen 4)
TOL_DENSE_SPARSE = 2e-3


def write_model(out: Path, num_layers: int) -> None:
    from deco_gguf.converter.convert import convert
    from deco_gguf.fixtures import calibrate, deco_1_2b_layers, write_fixture

    write_fixture(out / "hf", deco_1_2b_layers(num_layers), state_dict_hook=calibrate.fixture_hook())
    convert(out / "hf", out / "f16.gguf", outtype="f16")


def logits(tool: str, model: str, out: Path, ids: list[int], n_gpu_layers: int, mode: str) -> np.ndarray:
    path = out / f"logits-ngl{n_gpu_layers}-{mode}.f32"
    env = {**os.environ, "DECO_FFN": mode, "DECO_N_GPU_LAYERS": str(n_gpu_layers), "DECO_DECODE_LAST": str(N_DECODE)}
    r = subprocess.run([tool, model, str(path), "4", *map(str, ids)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{tool} (DECO_N_GPU_LAYERS={n_gpu_layers}, DECO_FFN={mode}) failed:\n{r.stderr[-3000:]}")
    return np.fromfile(path, dtype="<f4").reshape(len(ids), -1)


def compare(model: str, tool: str, out: Path) -> bool:
    # token ids every fixture vocabulary has (numpy is all this step needs)
    ids = np.random.default_rng(0).integers(3, 512, N_BATCH + N_DECODE).tolist()
    ok = True
    gpu = {}
    for mode in ("sparse", "dense"):
        cpu, gpu[mode] = (logits(tool, model, out, ids, ngl, mode) for ngl in (0, 99))
        err = np.abs(gpu[mode] - cpu).max(axis=1) / np.abs(cpu).max()
        top2 = np.sort(cpu, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * err.max() * np.abs(cpu).max()
        agree = (gpu[mode].argmax(1) == cpu.argmax(1))[clear].mean() if clear.any() else 1.0
        print(
            f"{mode}: GPU vs CPU max|d|/max|logit| batch {err[:N_BATCH].max():.2e}, decode {err[N_BATCH:].max():.2e}; "
            f"greedy tokens agree at {agree:.0%} of {clear.sum()} positions with a clear top token "
            f"(bounds {TOL_GPU_CPU:g}, {MIN_GREEDY_AGREEMENT:.0%})"
        )
        ok &= bool(err.max() < TOL_GPU_CPU and agree >= MIN_GREEDY_AGREEMENT)
    dense_sparse = float(np.abs(gpu["dense"] - gpu["sparse"]).max() / np.abs(gpu["sparse"]).max())
    print(f"GPU dense vs sparse: {dense_sparse:.2e} (bound {TOL_DENSE_SPARSE:g})")
    return ok and dense_sparse < TOL_DENSE_SPARSE


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(0 if compare(sys.argv[2], sys.argv[3], Path(sys.argv[4])) else 1)
    write_model(Path(sys.argv[1]), int(sys.argv[2]))
