"""llama.cpp's own tests of every architecture, on DECO (the patched build's test binaries; offline ones only).

`test-llama-archs` builds a random DECO model from the case ggml_patches adds for it (a dense layer, then a
DECO layer), checks its logits against the CPU reference of every backend present and that saving it and
loading it back gives the same logits; `test-save-load-state` checks sequence state save/load, copies and
removal on that model and on the bundled model. (`test-recurrent-state-rollback` has nothing to check on a
model without recurrent state; the thread-safety and fragmented-restore tests download their model.)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from deco_gguf.converter.convert import convert

REPO = Path(__file__).resolve().parents[1]
BUILD_BIN = REPO / ".deps" / "build" / "bin"


def run(*args, cwd: Path) -> str:
    """Run a test binary of the build in `cwd` (test-save-load-state leaves its state dump there); it must exit
    with status 0, which these tools return only when every check passed. Their tables are printed through
    llama.cpp's asynchronous logger, which can lose the last lines at exit: the tests read them only where
    present."""
    binary = BUILD_BIN / str(args[0])
    if not binary.is_file():
        pytest.skip(f"{binary.name} is not built (scripts/build-runtime.sh builds it)")
    done = subprocess.run([str(binary), *map(str, args[1:])], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)  # the result tables, without colours (logs go to stderr)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """The DECO model test-llama-archs generates and saves (llama_model_saver writes the deco.* keys and tensors)."""
    out = tmp_path_factory.mktemp("test-models")
    run("test-llama-archs", "-a", "deco", "-s", 1, "-o", out, cwd=out)
    assert (out / "deco-moe.gguf").is_file()
    return out


def test_llama_archs_consistency_and_roundtrip(generated, tmp_path):
    """Logits within 1e-4 NMSE of the CPU's and identical after a save/load roundtrip (`generated` shows the
    DECO case is supported rather than skipped)."""
    out = run("test-llama-archs", "-a", "deco", "-s", 1, cwd=tmp_path)
    assert "FAIL" not in out and "no tests executed" not in out, out


def test_state_save_load_on_the_generated_model(generated, tmp_path):
    """Exit status 0: every check passed on every model of the folder (baseline, seq_rm, state load, copies
    between sequences, round trips); its table, when the logger got it out, says so per check."""
    out = run("test-save-load-state", "--models", generated, cwd=tmp_path)
    for row in (line for line in out.splitlines() if line.startswith("deco-moe.gguf")):
        assert row.split()[1:] == ["PASS"] * 9, row


def test_state_save_load_on_the_bundled_model(tmp_path):
    model = tmp_path / "deco-tiny.gguf"
    convert(REPO / "models" / "deco-tiny", model, "f16", "q4_0")
    run("test-save-load-state", "-m", model, cwd=tmp_path)  # exit status 0: every check passed
