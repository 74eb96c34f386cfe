"""Outputs that are complete or absent (deco_gguf.support.files), on both kinds of temporary file."""

from __future__ import annotations

import fcntl
import os

import pytest

from deco_gguf.support import files
from deco_gguf.support.errors import DecoError


@pytest.fixture(params=["unnamed", "named"])
def kind(request, monkeypatch):
    """`named`: a system without unnamed temporary files (O_TMPFILE), where `.NAME.part` is used."""
    if request.param == "named":
        monkeypatch.delattr(os, "O_TMPFILE")
    return request.param


def test_output_appears_only_when_complete(kind, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with files.atomic_output(out) as tmp:
        tmp.write_bytes(b"new")
        visible = sorted(p.name for p in tmp_path.iterdir())
        assert out.read_bytes() == b"old"
    assert visible == (["m.gguf"] if kind == "unnamed" else [".m.gguf.part", "m.gguf"])
    assert out.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_failure_leaves_the_old_output(kind, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), files.atomic_output(out) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_stale_part_of_a_killed_run_is_replaced(kind, tmp_path):
    (tmp_path / ".m.gguf.part").write_bytes(b"left by kill -9")
    with files.atomic_output(tmp_path / "m.gguf") as tmp:
        tmp.write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_part_in_use_is_not_taken(monkeypatch, tmp_path):
    monkeypatch.delattr(os, "O_TMPFILE")
    part = tmp_path / ".m.gguf.part"
    with open(part, "wb") as other_writer:
        fcntl.flock(other_writer, fcntl.LOCK_EX)
        with pytest.raises(DecoError, match="another process is writing it"):
            with files.atomic_output(tmp_path / "m.gguf"):
                pass
    assert part.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
