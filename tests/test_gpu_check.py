"""scripts/gpu-check.sh on a machine without a GPU: it must say so at once, exit non-zero, and build or write nothing
(the checkout's CPU build in .deps/build stays as it was)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-check.sh"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under folder, its CMake and ninja state included."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def run_without_gpu(bin_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    """The script with PATH = bin_dir: the two tools its first lines use, and a failing nvidia-smi or none."""
    for tool in ("dirname", "head"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bin_dir)}
    t0 = time.monotonic()
    r = subprocess.run(
        [shutil.which("bash"), str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )
    return r, time.monotonic() - t0


@pytest.fixture
def build_untouched():
    build, out = REPO / ".deps" / "build", REPO / ".deps" / "gpu-check"
    before = snapshot(build) if build.is_dir() else {}
    out_existed = out.exists()
    yield
    assert (snapshot(build) if build.is_dir() else {}) == before
    assert out.exists() == out_existed


def test_no_nvidia_smi(tmp_path, build_untouched):
    r, seconds = run_without_gpu(tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: no NVIDIA GPU here (no nvidia-smi on PATH)"), r.stderr
    assert "nothing was built" in r.stderr and r.stdout == ""
    assert seconds < 5


def test_nvidia_smi_without_a_driver(tmp_path, build_untouched):
    # what nvidia-smi prints and returns on a machine that has the tool but no working driver or GPU
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\necho "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n'
    )
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    r, seconds = run_without_gpu(tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: no NVIDIA GPU here (nvidia-smi: NVIDIA-SMI has failed"), r.stderr
    assert seconds < 5
