"""`deco-gguf chat` on the bundled model: --prompt, piped stdin, a pseudo-terminal session, HF dirs.

Replies are greedy (--temperature 0) and checked token for token against what llama-cpp-python
produces directly from the same chat template (Jinja2ChatFormatter over tokenizer.chat_template, the
vocabulary's BOS, Llama.generate with a greedy sampler), on one thread so that runs are reproducible.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "deco-tiny"

llama_cpp = pytest.importorskip("llama_cpp")
from deco_gguf.runtime.native import is_patched  # noqa: E402

if not is_patched():
    pytest.skip("llama_cpp is not the patched DECO build (run scripts/build-runtime.sh)", allow_module_level=True)

from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

from deco_gguf.runtime.chat import ChatSession, Sampling  # noqa: E402
from deco_gguf.runtime.context import DecoRuntime  # noqa: E402
from deco_gguf.support.cache import dir_fingerprint, resolve_model  # noqa: E402

N = 24  # reply length: short, and the bundled model rarely ends a reply by itself
QUESTION = "Who is the LORD?"
FOLLOW_UP = "And what did Moses say?"


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    from deco_gguf.converter import convert

    out = tmp_path_factory.mktemp("chat") / "deco-tiny-f16.gguf"
    convert(BUNDLED, out, "f16")
    return out


def cli(
    *args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deco_gguf.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
        cwd=REPO,
    )


class Direct:
    """llama-cpp-python driven by hand: the same template, tokenization and greedy sampling."""

    def __init__(self, path: Path):
        self.rt = DecoRuntime(path, n_ctx=2048, n_threads=1, n_batch=512)
        self.llm = self.rt.llm
        self.fmt = Jinja2ChatFormatter(self.llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def reply(self, messages: list[dict], n: int = N) -> tuple[list[int], str]:
        prompt = self.llm.tokenize(self.fmt(messages=messages).prompt.encode(), add_bos=True, special=True)
        assert prompt[0] == self.llm.token_bos() and prompt[1] != self.llm.token_bos()
        out: list[int] = []
        for tok in self.llm.generate(prompt, top_k=40, top_p=0.95, min_p=0.05, temp=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
                break
            out.append(tok)
            if len(out) == n:
                break
        return out, self.llm.detokenize(out, prev_tokens=prompt).decode()

    def close(self):
        self.rt.close()


@pytest.fixture(scope="module")
def expected(gguf_path):
    """Greedy replies computed directly: a first turn, a second turn on its history, a fresh first turn."""
    d = Direct(gguf_path)
    try:
        t1, r1 = d.reply([{"role": "user", "content": QUESTION}])
        history = [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": r1},
            {"role": "user", "content": FOLLOW_UP},
        ]
        t2, r2 = d.reply(history)
        d.llm.reset()
        t3, r3 = d.reply([{"role": "user", "content": QUESTION}])
    finally:
        d.close()
    assert len(t1) == N and r1.strip(), "the bundled model should give a full-length greedy reply"
    assert (t3, r3) == (t1, r1)
    assert r2 != r1
    return {"first": r1, "second": r2, "first_tokens": t1}


def test_prompt_greedy_is_deterministic_and_matches_llama_cpp_python(gguf_path, expected):
    args = ("chat", str(gguf_path), "--prompt", QUESTION, "--temperature", "0", "-n", str(N), "-t", "1")
    runs = [cli(*args) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout == runs[1].stdout == expected["first"] + "\n"


def test_reply_tokens_equal_direct_generation(gguf_path, expected):
    """In-process: the session's reply is exactly the direct token sequence (not just the same text)."""
    with ChatSession(gguf_path, n_threads=1, sampling=Sampling(temperature=0, max_tokens=N)) as s:
        text = "".join(s.reply(QUESTION))
        prompt = s.format.tokens(s.llm, s.messages([], QUESTION))
        generated = list(s.llm.input_ids[len(prompt) : s.llm.n_tokens])  # every sampled token but the last is evaluated
        assert text == expected["first"]
        assert generated == expected["first_tokens"][:-1]
        assert s.last.generated_tokens == N and s.last.finish_reason == "length"
        assert s.last.decoded_tokens == N - 1 and s.last.decode_tps > 0 and s.last.prompt_tps > 0
        # the first token comes after the prompt's evaluation and before the other N - 1 decodes
        assert s.last.prompt_seconds < s.last.first_token_seconds < s.last.wall_seconds - s.last.decode_seconds * 0.9
        rates = [r.rate for r in s.last.reply_activity]
        assert len(rates) == 3 and all(0 < r < 1 for r in rates)


def test_sampling_seed_reproducible(gguf_path):
    args = [
        "chat",
        str(gguf_path),
        "-p",
        QUESTION,
        "--temperature",
        "0.9",
        "--top-k",
        "0",
        "--min-p",
        "0",
        "--repeat-penalty",
        "1.1",
        "-n",
        "16",
        "-t",
        "1",
    ]
    a, b = cli(*args, "--seed", "7"), cli(*args, "--seed", "7")
    assert a.returncode == b.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_piped_stdin_multi_turn_reset_stats_exit(gguf_path, expected):
    stdin = f"{QUESTION}\n{FOLLOW_UP}\n\n/reset\n{QUESTION}\n/stats\n/exit\nnever answered\n"
    r = cli("chat", str(gguf_path), "--temperature", "0", "-n", str(N), "-t", "1", stdin=stdin)
    assert r.returncode == 0, r.stderr
    first, second, third, rest = r.stdout.split("\n", 3)
    assert first == expected["first"]  # a user turn per line
    assert second == expected["second"]  # ... with the history of the first
    assert third == expected["first"]  # /reset: the same as a fresh session
    assert "tokens/s" in rest and "activation (reply)" in rest and f"{N} tokens (length)" in rest
    assert "time to first token" in rest and " ms" in rest
    assert "history cleared" in r.stderr
    assert rest.rstrip().endswith("┘")  # the /stats table is the last output: nothing after /exit


def test_history_trimmed_oldest_first_system_kept(gguf_path):
    with ChatSession(
        gguf_path, system="You are Moses.", n_ctx=128, n_threads=1, sampling=Sampling(temperature=0, max_tokens=24)
    ) as s:
        for i in range(6):
            "".join(s.reply(f"Question number {i}: who led the children of Israel?"))
            assert s.last.context_used <= s.n_ctx
        assert s.last.trimmed_turns >= 1
        assert 0 < len(s.turns) < 6
        assert s.turns[-1][0].startswith("Question number 5")
        assert s.messages(s.turns)[0] == {"role": "system", "content": "You are Moses."}
        kept = [int(u.split()[2][:-1]) for u, _ in s.turns]
        assert kept == list(range(6 - len(kept), 6))  # the oldest went first
        with pytest.raises(Exception, match="context holds 128"):
            "".join(s.reply("word " * 200))


class Terminal:
    """`deco-gguf chat` on a pseudo-terminal that is its controlling terminal (so ^C is SIGINT)."""

    def __init__(self, *args: str):
        master, slave = pty.openpty()

        def setup():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a runner started in the background ignores it

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deco_gguf.cli.main", "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "NO_COLOR": "1", "TERM": "dumb"},
            cwd=REPO,
            close_fds=True,
            preexec_fn=setup,
        )
        os.close(slave)
        self.fd, self.buf = master, b""

    def until(self, marker: bytes, timeout: float = 60) -> str:
        end = time.time() + timeout
        while marker not in self.buf:
            if time.time() > end:
                raise AssertionError(f"no {marker!r} in {self.buf[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.buf += os.read(self.fd, 65536)
                except OSError:
                    break
        before, _, self.buf = self.buf.partition(marker)
        return before.decode(errors="replace").replace("\r\n", "\n")

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def turn(self, line: str) -> str:
        """Send a line, return what came back before the next prompt (the echo removed)."""
        self.send(line.encode() + b"\n")
        out = self.until(b"> ")
        echo = line + "\n"
        assert out.startswith(echo), out
        return out[len(echo) :]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.fd)


def test_terminal_session(gguf_path, expected):
    term = Terminal(str(gguf_path), "--temperature", "0", "-n", str(N), "-t", "1")
    try:
        banner = term.until(b"> ")
        assert "deco-tiny" in banner and "/help" in banner
        assert "no reply yet" in term.turn("/stats")
        assert term.turn(QUESTION).strip() == expected["first"]
        stats = term.turn("/stats")
        assert "tokens/s" in stats and f"{N} tokens (length)" in stats and "activation (reply)" in stats
        assert term.turn(FOLLOW_UP).strip() == expected["second"]
        assert "history cleared" in term.turn("/reset")
        assert term.turn(QUESTION).strip() == expected["first"]  # a fresh session's reply
        assert "unknown command" in term.turn("/nonsense")
        term.send(b"/exit\n")
        assert term.proc.wait(30) == 0
    finally:
        term.close()


def test_terminal_ctrl_c_stops_the_reply_not_the_program(gguf_path, expected):
    # no reply limit and a large context: the greedy reply runs on for seconds unless stopped
    term = Terminal(str(gguf_path), "--temperature", "0", "-n", "0", "-c", "8192", "-t", "1")
    try:
        term.until(b"> ")
        term.send(b"In the beginning\n")
        term.until(b"the earth")  # streaming has started
        term.send(b"\x03")
        assert "reply stopped" in term.until(b"> ")
        assert "(interrupted)" in term.turn("/stats")
        assert "history cleared" in term.turn("/reset")
        assert term.proc.poll() is None
        term.send(b"\x04")  # Ctrl-D quits
        assert term.proc.wait(30) == 0
    finally:
        term.close()


def test_hf_dir_converted_once_and_cached(tmp_path, expected):
    env = {"DECO_GGUF_CACHE": str(tmp_path / "cache")}
    args = ["chat", str(BUNDLED), "-p", QUESTION, "--temperature", "0", "-n", str(N), "-t", "1"]
    first = cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stderr
    assert first.stdout == expected["first"] + "\n"  # the same F16 conversion as the GGUF fixture
    cached = list((tmp_path / "cache" / "converted").glob("*.gguf"))
    assert len(cached) == 1
    again = cli(*args, env=env)
    assert again.returncode == 0 and "using the cached conversion" in again.stderr
    assert again.stdout == first.stdout
    assert list((tmp_path / "cache" / "converted").glob("*")) == cached  # no temporary files left


def test_fingerprint_follows_the_files(tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(BUNDLED, d)
    a = dir_fingerprint(d)
    assert dir_fingerprint(d) == a
    cfg = d / "config.json"
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    assert dir_fingerprint(d) != a


def test_errors_are_one_line(tmp_path, gguf_path):
    r = cli("chat", str(tmp_path / "missing.gguf"), "-p", "hi")
    assert r.returncode == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1
    r = cli("chat", str(gguf_path), "-p", " ")
    assert r.returncode == 1 and "empty" in r.stderr
    with pytest.raises(Exception, match="no such file"):
        resolve_model(tmp_path / "nothing")


@pytest.fixture(scope="module")
def broken_template_gguf(tmp_path_factory) -> Path:
    """The bundled model with a chat template that does not compile (an unclosed expression)."""
    import json
    import shutil

    from deco_gguf.converter import convert

    root = tmp_path_factory.mktemp("broken-template")
    hf_dir = root / "deco-tiny"
    shutil.copytree(BUNDLED, hf_dir)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for message in messages %}{{ message['content'] }"
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    out = root / "broken.gguf"
    convert(hf_dir, out, "f16")
    return out


def test_template_that_does_not_compile_falls_back_to_chatml(broken_template_gguf, expected, tmp_path):
    """The bundled template is ChatML: the fallback must give the same greedy reply."""
    r = cli("chat", str(broken_template_gguf), "-p", QUESTION, "--temperature", "0", "-n", str(N), "-t", "1")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "warning: the model's chat template does not compile" in r.stderr and "using ChatML" in r.stderr
    assert r.stdout == expected["first"] + "\n"
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 20)
    for args in (
        ["perplexity", str(broken_template_gguf), str(text), "-c", "32", "-t", "1"],
        ["speed", str(broken_template_gguf), "--pp", "8", "--tg", "4", "-r", "1", "--warmup", "0", "-t", "1"],
    ):
        r = cli(*args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)


def _cli_bytes(*args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deco_gguf.cli.main", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=REPO,
    )


def test_invalid_utf8_is_read_with_replacement_characters(gguf_path):
    """Bytes that are not UTF-8, on stdin or in --prompt, are read as U+FFFD: the reply is the one
    to the same text with U+FFFD typed in, and the session goes on."""
    greedy = ["--temperature", "0", "-n", "8", "-t", "1"]
    truth = cli("chat", str(gguf_path), "-p", "caf\ufffd", *greedy)
    assert truth.returncode == 0 and truth.stdout.strip(), truth.stderr
    from_argv = _cli_bytes("chat", str(gguf_path), "-p", b"caf\xe9", *greedy)
    assert from_argv.returncode == 0 and b"Traceback" not in from_argv.stderr, from_argv.stderr
    assert from_argv.stdout.decode() == truth.stdout
    piped = _cli_bytes("chat", str(gguf_path), *greedy, stdin=b"caf\xe9\ncaf\xe9\n")
    assert piped.returncode == 0 and b"Traceback" not in piped.stderr, piped.stderr
    assert piped.stdout.decode().split("\n")[0] == truth.stdout.rstrip("\n")
    assert piped.stdout.decode().count("\n") == 2  # both lines answered


def test_piped_line_longer_than_the_context_is_reported_and_skipped(gguf_path, expected):
    """As in a terminal: one error line, an empty reply line, the next lines answered with the
    history of the answered ones; exit code 1 at the end."""
    long_line = "And it came to pass " * 600
    stdin = f"{QUESTION}\n{long_line}\n{FOLLOW_UP}\n"
    r = cli("chat", str(gguf_path), "--temperature", "0", "-n", str(N), "-t", "1", stdin=stdin)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "context holds" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.split("\n") == [expected["first"], "", expected["second"], ""]
