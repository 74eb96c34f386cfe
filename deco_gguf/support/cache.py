"""The user's cache (`DECO_GGUF_CACHE`, else ~/.cache/deco-gguf): HF checkpoints converted once for chat,
perplexity and speed (`converted/`), speed's dense_eq models (`dense-eq/`), the training corpus (`corpus/`).

`resolve_model` takes a GGUF file as it is, or an HF checkpoint directory, converted to F16 into the cache
once and reused while the directory and the converter are unchanged.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from .errors import DecoError


def cache_root() -> Path:
    """`DECO_GGUF_CACHE`, else `$XDG_CACHE_HOME/deco-gguf` (default ~/.cache/deco-gguf)."""
    env = os.environ.get("DECO_GGUF_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deco-gguf"


def _converter_fingerprint() -> str:
    import importlib.util

    spec = importlib.util.find_spec("deco_gguf.converter")  # located, not imported (that would load torch)
    h = hashlib.sha256()
    for source in sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.py")):
        h.update(source.name.encode())
        h.update(source.read_bytes())
    return h.hexdigest()


def dir_fingerprint(hf_dir: Path, outtype: str = "f16") -> str:
    """A key for the conversion of `hf_dir`: every file's relative path, size and mtime, the outtype
    and the converter's source (a changed converter converts again)."""
    h = hashlib.sha256(f"deco-gguf-converted/v1/{outtype}/".encode())
    h.update(_converter_fingerprint().encode())
    for path in sorted(p for p in hf_dir.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(hf_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def resolve_model(path: str | Path, on_status: Callable[[str], None] | None = None) -> Path:
    """A GGUF file as is; an HF directory converted to F16 into the cache (reused when unchanged)."""
    path = Path(path)
    if not path.exists():
        raise DecoError(f"{path}: no such file or directory")
    if not path.is_dir():
        return path
    out_dir = cache_root() / "converted"
    out = out_dir / f"{path.resolve().name}-{dir_fingerprint(path)}.gguf"
    if out.is_file():
        if on_status:
            on_status(f"using the cached conversion {out}")
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    if on_status:
        on_status(f"converting {path} to {out} (F16, once)")
    from ..converter import convert  # imports torch: only when converting

    convert(path, out, "f16", None)
    return out
