"""`deco-gguf serve`: the patched llama-server with the bundled model, through the official `openai` client, its
orderly shutdown, its one-line errors and the per-model DECO metrics (the web chat: test_web_chat.py).

The bundled model and its draft are converted to F32, so that the router decisions of llama.cpp and of the
PyTorch reference agree and the metrics can be checked against the reference's active-expert masks.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from llama_server import Served, free_port, is_running, post  # tests/llama_server.py

from deco_gguf.runtime.native import is_patched

if not is_patched():
    pytest.skip("llama_cpp is not the patched DECO build (run scripts/build-runtime.sh)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Who is the LORD?"
N = 24  # reply tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    from deco_gguf.converter import convert

    out = tmp_path_factory.mktemp("serve")
    target, draft = out / "deco-tiny-f32.gguf", out / "deco-tiny-draft-f32.gguf"
    convert(REPO / "models" / "deco-tiny", target, "f32")
    convert(REPO / "models" / "deco-tiny-draft", draft, "f32")
    return target, draft


def chat_reply(model: Path, question: str, *options: str) -> str:
    """`deco-gguf chat`'s greedy reply: the same chat template, another implementation of the conversation."""
    r = subprocess.run(
        [sys.executable, "-m", "deco_gguf.cli", "chat", model, "-p", question, "--temp", "0", "-n", str(N), "-t", "1"]
        + list(options),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.removesuffix("\n")


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_openai_client_streams_the_greedy_reply(models, cache_type):
    """The served reply, whole and streamed, is `chat`'s with the same KV cache type."""
    openai = pytest.importorskip("openai")
    target, _ = models
    expected = chat_reply(target, QUESTION, "--cache-type", cache_type)
    with Served(str(target), "--threads", "1", "--parallel", "2", "--cache-type", cache_type) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none")
        request = dict(model="deco-tiny", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=N)
        whole = client.chat.completions.create(**request)
        stream = client.chat.completions.create(**request, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert [m.id for m in client.models.list().data]  # /v1/models names the model
    assert whole.choices[0].message.content == streamed == expected
    assert whole.usage.completion_tokens == N


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_stopping_leaves_no_server_behind(models, sig, status):
    """Ctrl-C and SIGTERM stop llama-server and exit with the CLI's codes; even `kill -9` of deco-gguf takes
    llama-server down with it (it would keep the port otherwise)."""
    target, _ = models
    served = Served(str(target), "--threads", "1")
    server_pid = served.llama_server_pid()
    assert served.stop(sig) == status
    deadline = time.time() + 30
    while is_running(server_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not is_running(server_pid)
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", served.port))


def serve_error(*args: str) -> tuple[int, list[str]]:
    r = subprocess.run(
        [sys.executable, "-m", "deco_gguf.cli", "serve", *args], capture_output=True, text=True, timeout=120
    )
    return r.returncode, r.stderr.splitlines()


def test_busy_port_and_bad_models_are_one_error_line(models, tmp_path):
    target, _ = models
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, lines = serve_error(str(target), "--port", str(port))
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error:") and f":{port} is in use" in lines[0]

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(target.read_bytes()[:4096])
    for bad in (not_gguf, cut, tmp_path / "missing.gguf"):
        status, lines = serve_error(str(bad))
        assert status == 1 and len(lines) == 1 and lines[0].startswith(f"error: {bad}"), lines
    # what only llama-server can refuse comes back as its reason, on one line
    status, lines = serve_error(str(target), "--port", str(free_port()), "--", "--no-such-option")
    assert status == 1 and lines == ["error: llama-server stopped: invalid argument: --no-such-option"]


def deco_props(url: str) -> dict:
    with urllib.request.urlopen(url + "/props", timeout=30) as r:
        return json.load(r)["deco"]


def prometheus(url: str) -> dict[tuple[str, str, str], float]:
    """The llamacpp:deco_* series of /metrics: (name, model, layer or "") -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    series = re.findall(r'^llamacpp:(deco_\w+)\{model="(\w+)"(?:,layer="(\d+)")?\} (\S+)$', text, re.M)
    return {(name, model, layer): float(value) for name, model, layer, value in series}


def reference_counts(hf_dir: Path, ids: list[int]) -> dict[int, tuple[int, int]]:
    """Per DECO layer of the PyTorch reference: (tokens, active experts) for a prompt evaluated with the last
    position's logits only (llama.cpp skips the other positions in the last layer)."""
    from deco_gguf.model.reference import DecoModel

    masks = DecoModel.from_pretrained(hf_dir)(ids).activation
    last = len(masks) - 1
    return {
        layer: (1, int(mask[0, -1].sum())) if layer == last else (len(ids), int(mask[0].sum()))
        for layer, mask in enumerate(masks)
        if mask is not None
    }


def test_metrics_count_each_model_apart(models):
    """A target and its DECO draft in one server: after a prompt, each model's per-layer counts are the
    reference's for that model alone; speculative replies then add to both, and /metrics says what /props
    says. The bytes per token follow `speed`'s weight-bytes bound (deco_gguf.measure.speed_report)."""
    from deco_gguf.measure.speed_report import file_weight_bytes

    target, draft = models
    ids = [1, 400, 53, 17, 902, 11, 6, 210, 1500, 33, 8, 77]  # BOS and arbitrary vocabulary ids
    with Served(str(target), "--draft", str(draft), "--threads", "1", "--parallel", "1") as served:
        idle = deco_props(served.url)
        assert all(layer["tokens"] == 0 for model in idle.values() for layer in model["layers"])

        post(served.url + "/completion", {"prompt": ids, "n_predict": 1, "temperature": 0, "cache_prompt": False})
        after_prompt = deco_props(served.url)
        for name, hf_dir in (("target", "deco-tiny"), ("draft", "deco-tiny-draft")):
            counted = {layer["layer"]: (layer["tokens"], layer["active"]) for layer in after_prompt[name]["layers"]}
            assert counted == reference_counts(REPO / "models" / hf_dir, ids), name

        reply = post(served.url + "/completion", {"prompt": ids, "n_predict": 32, "temperature": 0})
        assert reply["timings"]["draft_n"] > 0  # the draft drafted
        after_reply = deco_props(served.url)
        series = prometheus(served.url)

    for name, path in (("target", target), ("draft", draft)):
        before = {layer["layer"]: layer for layer in after_prompt[name]["layers"]}
        for layer in after_reply[name]["layers"]:
            assert layer["tokens"] > before[layer["layer"]]["tokens"]
            assert series[("deco_layer_tokens_total", name, str(layer["layer"]))] == layer["tokens"]
            assert series[("deco_layer_active_experts_total", name, str(layer["layer"]))] == layer["active"]
            assert layer["rate"] == pytest.approx(layer["active"] / (layer["tokens"] * layer["experts"]))
        rates = {layer["layer"]: layer["rate"] for layer in after_reply[name]["layers"]}
        weights = file_weight_bytes(path)
        assert after_reply[name]["weight_bytes_per_token"] == pytest.approx(weights.sparse(rates))
        assert after_reply[name]["dense_weight_bytes_per_token"] == weights.dense
        assert series[("deco_weight_bytes_per_token", name, "")] == pytest.approx(weights.sparse(rates), rel=1e-5)


def test_lookup_drafts_and_keeps_the_greedy_tokens(models):
    """--lookup speculates with n-grams of the text (as long as chat's): drafts are made and accepted, and the
    tokens are the reference's greedy ones."""
    from deco_gguf.model.reference import DecoModel

    target, _ = models
    text = "And God said, Let there be light: and there was light. And God said, Let there be"
    with Served(str(target), "--lookup", "--draft-max", "6", "--threads", "1", "--parallel", "1") as served:
        ids = post(served.url + "/tokenize", {"content": text, "add_special": True})["tokens"]
        out = post(
            served.url + "/completion",
            {"prompt": ids, "n_predict": 16, "temperature": 0, "return_tokens": True, "cache_prompt": False},
        )
    assert out["timings"]["draft_n_accepted"] > 0
    assert out["tokens"] == DecoModel.from_pretrained(REPO / "models" / "deco-tiny").generate_greedy(ids, 16)
