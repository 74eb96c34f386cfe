"""Serving a DECO GGUF over HTTP with the patched llama-server (installed beside the runtime's libraries): the
OpenAI-compatible API, llama.cpp's web chat where the runtime was built with it, and per-model DECO metrics
(docs/serving.md).

`Server` starts llama-server in a process group of its own, so that a Ctrl-C on the terminal reaches
deco-gguf alone and llama-server is asked to stop exactly once (a second signal makes it exit at once, without
finishing its replies); it dies with deco-gguf even when deco-gguf is killed outright (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..support.errors import DecoError
from .native import available_cores, lib_dir
from .rpc import Offload
from .speculative import DEFAULT_DRAFT_MAX, LOOKUP_N
from .tools import LOG_PREFIX, tool

DEFAULT_SLOT_CONTEXT = 4096  # tokens per slot unless the model was trained on fewer
STOP_GRACE_SECONDS = 30  # for llama-server to finish after it was asked to stop; then it is killed
GET_WEB_UI = "install Node.js >= 18 with npm and rerun `pip install .` (or scripts/setup.sh) for the web chat"
PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass
class ServerOptions:
    """What `deco-gguf serve` runs: a model (GGUF), where it listens and how it evaluates."""

    model: Path
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4  # slots: conversations decoded together
    slot_context: int | None = None  # tokens per slot; None: the trained context, at most DEFAULT_SLOT_CONTEXT
    threads: int | None = None
    mode: str = "sparse"
    kv_cache: str = "f16"  # the KV cache's element type (native.KV_CACHE_TYPES), K and V
    draft: Path | None = None  # a draft model's GGUF
    lookup: bool = False  # n-gram lookup (llama.cpp's ngram-simple)
    draft_max: int | None = None  # None: DEFAULT_DRAFT_MAX
    offload: Offload = field(default_factory=Offload)
    extra: list[str] = field(default_factory=list)  # given to llama-server as they are

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def server_args(options: ServerOptions, trained_context: int) -> list[str]:
    """llama-server's command line for `options`. The KV cache is split evenly between the slots (llama.cpp's
    default when the number of slots is given), so the context asked of it is slots × context per slot."""
    slot_context = options.slot_context or min(trained_context, DEFAULT_SLOT_CONTEXT)
    threads = str(options.threads or available_cores())
    args = [str(tool("llama-server")), "--model", str(options.model), "--host", options.host]
    args += ["--port", str(options.port), "--parallel", str(options.parallel)]
    args += ["--ctx-size", str(slot_context * options.parallel), "--threads", threads, "--threads-batch", threads]
    args += ["--cache-type-k", options.kv_cache, "--cache-type-v", options.kv_cache, "--metrics", "--slots"]
    draft_max = str(options.draft_max or DEFAULT_DRAFT_MAX)  # as chat's (llama-server's: 3 drafted, 48 looked up)
    if options.draft is not None:
        args += [
            "--spec-draft-model",
            str(options.draft),
            "--spec-type",
            "draft-simple",
            "--spec-draft-n-max",
            draft_max,
        ]
    if options.lookup:  # n-grams as long as chat's lookup (llama-server's default, 12, rarely matches)
        args += ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(LOOKUP_N)]
        args += ["--spec-ngram-simple-size-m", draft_max]
    if options.offload.rpc:
        args += ["--rpc", ",".join(options.offload.rpc), "--n-gpu-layers", str(options.offload.n_gpu_layers)]
    return args + options.extra


def web_ui_built() -> bool:
    """Whether the runtime's llama-server embeds the web chat (scripts/build-runtime.sh records it)."""
    build_file = lib_dir() / "deco-build.json"
    return build_file.is_file() and bool(json.loads(build_file.read_text()).get("web_ui"))


def check_port_free(host: str, port: int) -> None:
    """DecoError when something listens on host:port already (llama-server would fail to bind after loading)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama-server binds: TIME_WAIT is no user
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DecoError(f"{host}:{port} is in use by another program (--port picks another)") from None
            raise DecoError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when deco-gguf dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Server:
    """A running llama-server; `wait_ready()`, then `wait()`; `stop()` asks it to finish (once)."""

    def __init__(self, args: list[str], url: str, env: dict[str, str]):
        self.url = url
        self.log: deque[str] = deque(maxlen=200)
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={**os.environ, **env},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self._stopping = False

    def _read_log(self) -> None:
        verbose = bool(os.environ.get("DECO_VERBOSE"))
        for line in self.proc.stdout:
            self.log.append(line.rstrip())
            if verbose:
                os.write(2, line.encode())

    def failure(self) -> str:
        """The reason llama-server gave for stopping: its first error line (its log is kept, 200 lines)."""
        self._reader.join(timeout=5)
        lines = [re.sub(r"^error:\s*", "", LOG_PREFIX.sub("", line).strip()) for line in self.log]
        errors = [line for line in lines if "error" in line.lower() or "failed" in line or "couldn't" in line]
        return (errors or lines[-1:] or [f"exit status {self.proc.returncode}"])[0]

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Return once the model is loaded (/health answers 200); DecoError when llama-server exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DecoError(f"llama-server stopped: {self.failure()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                self.stop()
                raise DecoError(f"llama-server did not load the model in {timeout:.0f} s")
            time.sleep(0.1)

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self) -> int:
        """Ask llama-server to finish (SIGTERM, once), kill it if it has not within the grace time; its status."""
        if self.proc.poll() is None and not self._stopping:
            self._stopping = True
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start(options: ServerOptions, trained_context: int) -> Server:
    """Start llama-server for `options` (the runtime and the listening address checked first)."""
    args = server_args(options, trained_context)
    check_port_free(options.host, options.port)
    return Server(args, options.url, {"DECO_FFN": options.mode})


def run(options: ServerOptions, trained_context: int, on_ready: Callable[[], None]) -> tuple[int, str]:
    """Run llama-server for `options` until it stops: `on_ready()` once the model is loaded; (its exit status, the
    reason it gave when that is not 0). Interrupted (Ctrl-C, SIGTERM) or failing, it stops the server first."""
    server = start(options, trained_context)
    try:
        server.wait_ready()
        on_ready()
        status = server.wait()
    except BaseException:
        server.stop()
        raise
    return status, server.failure() if status else ""
