"""The command line as a whole: --version, --help's environment variables, the threads warning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import deco_gguf

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deco_gguf.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        cwd=REPO,
    )


def test_version_names_the_package_runtime_patches_and_build():
    pytest.importorskip("llama_cpp")
    r = cli("--version")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"deco-gguf {deco_gguf.__version__}"
    pinned = re.search(r"^LCP_VERSION=(\S+)$", (REPO / "scripts" / "build-runtime.sh").read_text(), re.M).group(1)
    vendored = rf"llama\.cpp: ggml-org/llama\.cpp@[0-9a-f]{{7,}} as vendored by llama-cpp-python {re.escape(pinned)}"
    assert re.match(vendored + r" \(ggml ", lines[1])
    patches = sorted(p.stem for p in (REPO / "ggml_patches" / "patches").glob("*.patch"))
    assert lines[2].endswith(": " + ", ".join(patches))
    assert lines[3].startswith("build: Release, native CPU ON") and "RPC ON" in lines[3]
    cpu_flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if "avx2" in cpu_flags:
        assert "AVX2" in lines[4].split()
    import llama_cpp

    assert lines[5] == f"runtime: llama-cpp-python {llama_cpp.__version__} in {Path(llama_cpp.__file__).parent / 'lib'}"
    assert re.fullmatch(rf"{re.escape(pinned)}\+deco\.[0-9a-f]{{12}}", llama_cpp.__version__)


def test_help_documents_the_environment_variables():
    r = cli("--help")
    assert r.returncode == 0
    for name in ("DECO_VERBOSE", "DECO_GGUF_CACHE", "DECO_FFN"):
        assert name in r.stdout


def test_more_threads_than_cores_is_warned():
    cores = len(os.sched_getaffinity(0))
    r = cli("quantize", "missing.gguf", "out.gguf", "Q4_0", "--threads", str(cores + 1))
    assert f"--threads {cores + 1} is more than the {cores} core(s)" in r.stderr
    assert r.returncode == 1 and "missing.gguf" in r.stderr  # and then the command goes on as asked
    r = cli("quantize", "missing.gguf", "out.gguf", "Q4_0", "--threads", str(cores))
    assert "warning" not in r.stderr


# The CLI in a Python where llama_cpp cannot be imported.
WITHOUT_RUNTIME = (
    "import sys; sys.modules['llama_cpp'] = None; from deco_gguf.cli import run; sys.argv[0] = 'deco-gguf'; run()"
)


@pytest.mark.parametrize(
    "command",
    [
        ["chat", "-p", "hi"],
        ["perplexity", "TEXT"],
        ["speed"],
        ["quantize", "OUT", "Q4_0"],
        ["info", "--measure", "TEXT"],
        ["serve"],
    ],
)
def test_runtime_commands_without_the_runtime_say_how_to_get_it(command, tmp_path):
    from deco_gguf.converter import convert

    model, text = tmp_path / "m.gguf", tmp_path / "t.txt"
    convert(REPO / "models" / "deco-tiny", model, "f16")
    text.write_text("In the beginning God created the heaven and the earth. " * 50)
    args = [str(text) if a == "TEXT" else str(tmp_path / "o.gguf") if a == "OUT" else a for a in command]
    r = subprocess.run(
        [sys.executable, "-c", WITHOUT_RUNTIME, command[0], str(model), *args[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: the patched llama.cpp runtime is not installed: run `pip install .`"), r.stderr
