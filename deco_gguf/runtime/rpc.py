"""Layers on other machines through llama.cpp's RPC backend (docs/distributed.md).

Each remote machine runs `rpc-server` from the patched build (`pip install .` installs it);
`attach()` registers their devices with ggml in this process, after checking that each server
answers with the patched protocol, so that a model loaded with `n_gpu_layers` places those layers
there (llama.cpp's `--rpc` and `-ngl`). ggml keeps attached servers for the life of the process and
reaches them again at every model load: a server that has gone away by then aborts the process.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from ..support.errors import DecoError

# RPC_PROTO_MAJOR_VERSION of the patched ggml-rpc.h (ggml_patches/patches/0001-ggml-deco-moe-op.patch):
# upstream's 7 plus 100, so that stock servers and clients, which do not know the DECO op, refuse us.
PROTOCOL_MAJOR = 107
_HELLO = 14  # RPC_CMD_HELLO, the same in every protocol version
_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE: zeros ask for no transport upgrade
DEFAULT_PORT = 50052

_attached: set[str] = set()


@dataclass(frozen=True)
class Offload:
    """Where layers go besides this machine's CPU."""

    rpc: tuple[str, ...] = ()  # HOST:PORT of rpc-servers
    layers: int | None = None  # layers placed on them (llama.cpp's -ngl); None: all when rpc is given

    @property
    def n_gpu_layers(self) -> int:
        if self.layers is not None:
            return self.layers
        return -1 if self.rpc else 0  # -1: every layer

    @classmethod
    def parse(cls, rpc: str | None, layers: int | None) -> Offload:
        """`--rpc HOST:PORT[,HOST:PORT...]` and `--n-gpu-layers N` as given on the command line."""
        endpoints = tuple(e.strip() for e in (rpc or "").split(",") if e.strip())
        for endpoint in endpoints:
            _split(endpoint)
        return cls(endpoints, layers)


def _split(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DecoError(f"--rpc {endpoint!r}: expected HOST:PORT, e.g. 192.168.1.20:{DEFAULT_PORT}")
    return host.strip("[]"), int(port)


def _receive(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def protocol_version(endpoint: str, timeout: float = 10.0) -> tuple[int, int, int]:
    """The RPC protocol version the server at `endpoint` speaks (its answer to HELLO)."""
    host, port = _split(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("<BQ", _HELLO, _CAPS_SIZE) + bytes(_CAPS_SIZE))
            header = _receive(sock, 8)
            size = struct.unpack("<Q", header)[0] if len(header) == 8 else 0
            answer = _receive(sock, size) if size == 4 + _CAPS_SIZE else b""
    except OSError as e:
        raise DecoError(f"{endpoint}: cannot reach an rpc-server ({e.strerror or e})") from None
    if len(answer) != 4 + _CAPS_SIZE:
        raise DecoError(f"{endpoint}: the server there does not answer as an rpc-server")
    return answer[0], answer[1], answer[2]


def attach(endpoints: tuple[str, ...], lib_dir: Path) -> None:
    """Register the devices of the rpc-servers at `endpoints` with the ggml loaded from `lib_dir`."""
    pending = [e for e in endpoints if e not in _attached]
    if not pending:
        return
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))  # the copy llama_cpp already loaded
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    registry = ggml.ggml_backend_reg_by_name(b"RPC")
    if not registry:
        raise DecoError("this runtime was built without ggml's RPC backend: reinstall with `pip install .`")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
        ggml.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_rpc_add_server")
    )
    for endpoint in pending:
        major, minor, patch = protocol_version(endpoint)
        if major != PROTOCOL_MAJOR:
            raise DecoError(
                f"{endpoint}: the rpc-server speaks RPC protocol {major}.{minor}.{patch}, "
                f"this runtime {PROTOCOL_MAJOR}.x: "
                "run the rpc-server of this project's build (`pip install .` installs it), which knows the DECO op"
            )
        server = add_server(endpoint.encode())
        if not server:
            raise DecoError(f"{endpoint}: the rpc-server offers no device")
        ggml.ggml_backend_register(server)
        _attached.add(endpoint)
