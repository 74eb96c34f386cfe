"""What `deco-gguf --version` reports: this package, the llama.cpp it runs and how that was built."""

from __future__ import annotations

import json
import re

from .. import __version__
from .native import ggml_base, lib_dir


def version_lines() -> list[str]:
    """One line per fact; the runtime's lines say how to get it when it is not installed."""
    lines = [f"deco-gguf {__version__}"]
    try:
        import llama_cpp
    except ImportError:
        return lines + [
            "runtime: not installed (`pip install .` in the source tree builds and installs the patched llama.cpp)"
        ]
    build_file = lib_dir() / "deco-build.json"
    if not build_file.is_file():
        return lines + [
            f"runtime: llama-cpp-python {llama_cpp.__version__}, not this project's build "
            "(`pip install .` in the source tree)"
        ]
    build = json.loads(build_file.read_text())
    cmake = build["cmake"]
    cuda = f"on (archs {cmake['CMAKE_CUDA_ARCHITECTURES']})" if cmake.get("GGML_CUDA") == "ON" else "off"
    # llama_print_system_info: "CPU : SSE3 = 1 | AVX = 1 | ..."; the features compiled in and usable here
    features = [
        name for name, on in re.findall(r"(\w+) = (\d)", llama_cpp.llama_print_system_info().decode()) if on == "1"
    ]
    return lines + [
        f"llama.cpp: ggml-org/llama.cpp@{build['llama_cpp_commit'] or 'unknown'} as vendored by llama-cpp-python "
        f"{build['llama_cpp_python']} (ggml {ggml_base().ggml_version().decode()})",
        f"ggml patches: set {build['patch_set']}: {', '.join(p.removesuffix('.patch') for p in build['patches'])}"
        if build["patches"]
        else "ggml patches: none (a pristine build: the DECO architecture is missing)",
        f"build: {cmake.get('CMAKE_BUILD_TYPE')}, native CPU {cmake.get('GGML_NATIVE')}, CUDA {cuda}, "
        f"RPC {cmake.get('GGML_RPC')}",
        f"CPU features: {' '.join(features)}",
        # the runtime wheel's version carries a hash of the build (scripts/build-runtime.sh)
        f"runtime: llama-cpp-python {llama_cpp.__version__} in {lib_dir()}",
    ]
