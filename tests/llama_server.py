"""A llama-server of the patched build on loopback, for the tests that talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BUILD_BIN = Path(__file__).resolve().parents[1] / ".deps" / "build" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(*args: str) -> Iterator[str]:
    """Start `llama-server ARGS` and yield its URL once /health answers; stopped on exit."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(BUILD_BIN / "llama-server"), "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, LD_LIBRARY_PATH=str(BUILD_BIN)),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log = proc.stderr.read().decode()[-2000:]
                    raise RuntimeError(f"llama-server did not become healthy: {log}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)
