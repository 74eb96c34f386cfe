"""A llama-server of the patched build on loopback, started directly or by `deco-gguf serve`, for the tests that
talk to it."""

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(*args: str) -> Iterator[str]:
    """Start `llama-server ARGS` and yield its URL once /health answers; stopped on exit."""
    port = free_port()
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


class Served:
    """`deco-gguf serve ARGS` on a free loopback port (`command`: the deco-gguf to run, default this checkout's):
    `url` once it printed it."""

    def __init__(self, *args: str, command: str | None = None, port: int | None = None, timeout: float = 120):
        import select
        import sys

        self.port = port or free_port()
        deco_gguf = [command] if command else [sys.executable, "-m", "deco_gguf.cli"]
        self.proc = subprocess.Popen(
            [*deco_gguf, "serve", "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        )
        self.url = None
        deadline = time.time() + timeout
        while self.url is None and time.time() < deadline:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline()
                if not line:
                    break  # it exited
                if line.startswith("serving "):
                    self.url = line.split(" at ")[-1].strip()
        if self.url is None:
            self.proc.kill()
            log = self.proc.communicate()[1]
            raise RuntimeError(f"deco-gguf serve did not come up: {log[-2000:]}")

    def llama_server_pid(self) -> int:
        """The llama-server that deco-gguf started (its only child)."""
        [child] = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(child)

    def stop(self, sig: int = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()


def is_running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (one that exited, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
