"""Layers on an rpc-server (ggml RPC, docs/distributed.md): the bundled model through a local
rpc-server gives the logits and greedy tokens of local evaluation, and servers that do not speak the
patched protocol, or none at all, get one error line.

Everything that attaches an rpc-server runs in a child process: ggml keeps attached servers for the
life of a process and would reconnect to them from later tests after the server is gone.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
from deco_gguf.runtime.native import is_patched  # noqa: E402

if not is_patched():
    pytest.skip("llama_cpp is not the patched DECO build (run scripts/build-runtime.sh)", allow_module_level=True)

from deco_gguf.runtime.rpc import PROTOCOL_MAJOR, protocol_version  # noqa: E402
from deco_gguf.runtime.tools import tool  # noqa: E402
from deco_gguf.support.errors import DecoError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "deco-tiny"
SERVER = tool("ggml-rpc-server")
QUESTION = "Who is the LORD?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_server():
    """A fresh rpc-server on localhost (one thread) for each test; its HOST:PORT."""
    port = free_port()
    proc = subprocess.Popen(
        [str(SERVER), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            protocol_version(endpoint, timeout=1)
            break
        except DecoError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    from deco_gguf.converter import convert

    out = tmp_path_factory.mktemp("rpc") / "deco-tiny-f16.gguf"
    convert(BUNDLED, out, "f16")
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deco_gguf.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=REPO,
    )


def test_the_server_speaks_the_patched_protocol(rpc_server):
    assert protocol_version(rpc_server)[0] == PROTOCOL_MAJOR


# Logits of every position of a token sequence, local or with every layer on the rpc-server.
LOGITS = """
import sys
import numpy as np
from deco_gguf.runtime.rpc import Offload
from deco_gguf.runtime.context import DecoRuntime
path, out, mode, *rpc = sys.argv[1:]
offload = Offload(tuple(rpc))
with DecoRuntime(path, n_ctx=64, n_threads=1, exact=True, all_logits=True, mode=mode, offload=offload) as rt:
    tokens = rt.llm.tokenize(b"In the beginning God created the heaven and the earth.", add_bos=True)
    rt.llm.eval(tokens)
    np.save(out, np.array(rt.llm.scores[: len(tokens)]))
"""


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_logits_through_the_server_equal_local(mode, gguf_path, rpc_server, tmp_path):
    def logits(*rpc: str) -> tuple[np.ndarray, str]:
        out = tmp_path / f"logits-{len(rpc)}.npy"
        run = subprocess.run(
            [sys.executable, "-c", LOGITS, str(gguf_path), str(out), mode, *rpc],
            check=True,
            timeout=300,
            capture_output=True,
            text=True,
            env={**os.environ, "DECO_VERBOSE": "1"},
        )
        return np.load(out), run.stderr

    (local, local_log), (remote, remote_log) = logits(), logits(rpc_server)
    # llama.cpp's load log: every layer's KV cache on the server's device, none locally
    assert f"RPC0[{rpc_server}] KV buffer size" in remote_log and "RPC0" not in local_log
    assert local.shape == remote.shape and local.shape[0] > 8
    np.testing.assert_array_equal(remote, local)


def test_chat_through_the_server_gives_the_local_greedy_reply(gguf_path, rpc_server):
    greedy = ["-p", QUESTION, "--temperature", "0", "-n", "24", "-t", "1"]
    local = cli("chat", str(gguf_path), *greedy)
    remote = cli("chat", str(gguf_path), *greedy, "--rpc", rpc_server)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and len(local.stdout.split()) > 5


def _fake_server(major: int) -> tuple[str, threading.Thread]:
    """A server that answers HELLO as a stock rpc-server of protocol `major`.0.0 would."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.recv(1 + 8 + 24)
            conn.sendall(struct.pack("<Q", 4 + 24) + bytes([major, 0, 0, 0]) + bytes(24))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"127.0.0.1:{listener.getsockname()[1]}", thread


@pytest.mark.parametrize(
    "endpoint,fragment",
    [
        ("stock", "the rpc-server speaks RPC protocol 7.0.0, this runtime 107.x"),
        ("closed", "cannot reach an rpc-server"),
        ("no-port", "expected HOST:PORT"),
    ],
)
def test_unusable_servers_are_one_error_line(endpoint, fragment, gguf_path):
    if endpoint == "stock":
        endpoint, _ = _fake_server(7)
    elif endpoint == "closed":
        endpoint = f"127.0.0.1:{free_port()}"
    else:
        endpoint = "localhost"
    r = cli("chat", str(gguf_path), "-p", "hi", "--rpc", endpoint)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr


def test_layers_without_servers_is_a_usage_error(gguf_path):
    r = cli("chat", str(gguf_path), "-p", "hi", "-ngl", "3")
    assert r.returncode == 1 and "give --rpc HOST:PORT too" in r.stderr
