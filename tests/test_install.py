"""`pip install` of the sdist into a new virtual environment builds and installs the patched runtime
(build_backend/deco_build.py): the installed package reports the patches, runs llama.cpp's tools and
chats and serves as this checkout does."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from llama_server import Served, post  # tests/llama_server.py

REPO = Path(__file__).resolve().parents[1]


def run(*args, env: dict | None = None) -> str:
    r = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=REPO,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})},
    )
    assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture
def venv(tmp_path):
    """A new virtual environment, removed afterwards (with torch it takes about a GB)."""
    path = tmp_path / "venv"
    run(sys.executable, "-m", "venv", path)
    yield path
    shutil.rmtree(path)


def test_pip_install_of_the_sdist_builds_and_installs_the_patched_runtime(tmp_path, venv):
    run(sys.executable, "-m", "build", "--sdist", "--outdir", tmp_path / "dist", REPO)
    [sdist] = (tmp_path / "dist").glob("deco_gguf-*.tar.gz")
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "install", "-q", "torch==2.13.0")  # the CPU build, as scripts/setup.sh installs it first
    run(*pip, "install", "-q", sdist, env={"DECO_WHEELS": str(tmp_path / "wheels")})

    assert re.search(r"^Version: 0\.3\.36\+deco\.[0-9a-f]{12}$", run(*pip, "show", "llama-cpp-python"), re.M)
    run(*pip, "check")
    installed = venv / "bin" / "deco-gguf"
    patches = sorted(p.stem for p in (REPO / "ggml_patches" / "patches").glob("*.patch"))
    assert run(installed, "--version").splitlines()[2].endswith(": " + ", ".join(patches))

    # llama-quantize ships with the runtime
    model = tmp_path / "tiny-q4.gguf"
    run(installed, "convert", REPO / "models" / "deco-tiny", "-o", tmp_path / "tiny.gguf")
    run(installed, "quantize", tmp_path / "tiny.gguf", model, "Q4_0")
    chat = ["chat", model, "-p", "And God said", "--temp", "0", "--max-tokens", "24", "--threads", "1"]
    reply = run(installed, *chat)
    assert reply == run(sys.executable, "-m", "deco_gguf.cli", *chat)

    # and llama-server, for `deco-gguf serve`: the same greedy reply through its API, the web chat at /
    with Served(str(model), "--threads", "1", command=str(installed)) as served:
        answer = post(
            served.url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "And God said"}], "temperature": 0, "max_tokens": 24},
        )
        page = urllib.request.Request(served.url + "/", headers={"Accept-Encoding": "gzip"})  # served compressed
        with urllib.request.urlopen(page, timeout=30) as r:
            assert b"<html" in gzip.decompress(r.read())[:2000].lower()
    assert answer["choices"][0]["message"]["content"] == reply.removesuffix("\n")
