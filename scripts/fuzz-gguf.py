#!/usr/bin/env python3
"""Load N mutated DECO GGUF files with the patched llama.cpp, each in a forked child.

    .venv/bin/python scripts/fuzz-gguf.py [N] [--seed S] [--keep DIR]

Every file must end in a clean load (then two tokens are evaluated) or a clean
error; a signal (e.g. SIGABRT from a failed GGML_ASSERT), an unexpected exit
code or a hang is a crash. Prints a summary and every crash with its mutations;
exits 1 if any crashed.
"""

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from deco_gguf.converter import convert
from deco_gguf.fixtures import write_fixture
from deco_gguf.fixtures.fuzz import load_in_child, mutants


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", nargs="?", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="write the mutants here instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        valid = work / "valid.gguf"
        convert(write_fixture(work / "hf", "base"), valid, outtype="f16", expert_type="q4_0")
        start = time.monotonic()
        counts: collections.Counter[str] = collections.Counter()
        crashes = []
        for path, applied in mutants(valid, work, args.n, args.seed):
            outcome = load_in_child(path, applied)
            counts[outcome.result] += 1
            if outcome.crashed:
                crashes.append(outcome)
            if not args.keep:
                path.unlink()
        print(
            f"{args.n} mutated files (seed {args.seed}) in {time.monotonic() - start:.0f} s: "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        )
        for c in crashes:
            print(f"CRASH {c.result}: {c.path.name}: {'; '.join(c.mutations)}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
