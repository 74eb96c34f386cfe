"""Mutated DECO GGUF files end in a clean error or a clean load in the patched llama.cpp, never a crash.

CI runs a sample; `scripts/fuzz-gguf.py 1000` is the full run.
"""

from deco_gguf.converter import convert
from deco_gguf.fixtures import write_fixture
from deco_gguf.fixtures.fuzz import load_in_child, mutants


def test_mutated_files_never_crash(tmp_path):
    valid = tmp_path / "valid.gguf"
    convert(write_fixture(tmp_path / "hf", "base"), valid, outtype="f16", expert_type="q4_0")
    assert load_in_child(valid, []).result == "loaded"  # the loader runs for real
    outcomes = [load_in_child(path, applied) for path, applied in mutants(valid, tmp_path, 80, seed=7)]
    crashes = [f"{o.result}: {'; '.join(o.mutations)}" for o in outcomes if o.crashed]
    assert not crashes, crashes
    results = {o.result for o in outcomes}
    assert results == {"loaded", "error"}  # the sample exercises both outcomes
