"""Bad input: one clear error line, exit code 1, no traceback, and no output file left behind."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from deco_gguf.cli.main import app
from deco_gguf.fixtures import VARIANTS, write_fixture


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    return {name: write_fixture(root / name, name) for name in ("base", "sharded", "bin")}


def edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (d / "config.json").write_text(json.dumps(config))


def edit_tensors(d: Path, change) -> None:
    state = load_file(d / "model.safetensors")
    change(state)
    save_file(state, d / "model.safetensors")


class Evil:
    """Not a tensor: a pickle holding it is not plain weights."""


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# (name, fixture to start from, mutation of the copied checkpoint dir, fragment of the expected error)
CASES = [
    ("missing_dir", "base", lambda d: shutil.rmtree(d), "not a checkpoint directory"),
    ("no_config", "base", lambda d: (d / "config.json").unlink(), "config.json: file not found"),
    ("config_not_json", "base", lambda d: (d / "config.json").write_text("{ not json"), "not valid JSON"),
    ("no_weights", "base", lambda d: (d / "model.safetensors").unlink(), "no weights found"),
    (
        "truncated_safetensors",
        "base",
        lambda d: _truncate(d / "model.safetensors", 0.5),
        "corrupt or truncated safetensors",
    ),
    (
        "garbage_safetensors",
        "base",
        lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
        "corrupt or truncated safetensors",
    ),
    ("missing_shard", "sharded", lambda d: next(d.glob("model-00002-*.safetensors")).unlink(), "weight file not found"),
    (
        "index_lists_absent_tensor",
        "sharded",
        lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "weight_map": json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
                    | {"model.layers.9.mlp.ghost": next(d.glob("model-00001-*")).name}
                }
            )
        ),
        "listed in the index is missing",
    ),
    (
        "missing_tensor",
        "base",
        lambda d: edit_tensors(d, lambda s: s.pop("model.layers.1.mlp.expert_down_proj.weight")),
        "missing tensor model.layers.1.mlp.expert_down_proj.weight",
    ),
    (
        "wrong_shape",
        "base",
        lambda d: edit_tensors(
            d, lambda s: s.update({"model.layers.2.mlp.expert_down_proj.weight": torch.zeros(64, 13 * 32 - 1)})
        ),
        "model.layers.2.mlp.expert_down_proj.weight has shape [64, 415], expected [64, 416]",
    ),
    (
        "experts_not_divisible",
        "base",
        lambda d: edit_tensors(
            d, lambda s: s.update({"model.layers.1.mlp.expert_up_proj.weight": torch.zeros(13 * 32 + 1, 64)})
        ),
        "not a multiple of 13 experts",
    ),
    (
        "unknown_expert_act",
        "base",
        lambda d: edit_config(d, expert_act_func="swish_norm"),
        "unknown expert activation 'swish_norm'",
    ),
    (
        "dense_router_act",
        "base",
        lambda d: edit_config(d, router_act_func="gelu"),
        "router activation 'gelu' is not sparse",
    ),
    (
        "unknown_router_norm",
        "base",
        lambda d: edit_config(d, router_norm_type="layernorm"),
        "unknown router norm type 'layernorm'",
    ),
    ("no_heads", "base", lambda d: edit_config(d, num_attention_heads=None), "num_attention_heads is missing"),
    (
        "heads_not_dividing",
        "base",
        lambda d: edit_config(d, num_attention_heads=3),
        "not divisible by num_attention_heads=3",
    ),
    (
        "mup_without_scales",
        "base",
        lambda d: edit_config(d, use_mup=True, scale_depth=None),
        "use_mup is true but scale_depth is missing",
    ),
    (
        "router_norm_normal",
        "base",
        lambda d: edit_config(d, router_norm_type="normal"),
        "router_norm_type 'normal' gives inactive experts non-zero scores",
    ),
    ("not_blockffn", "base", lambda d: edit_config(d, use_blockffn=False), "not a DECO (BlockFFN) checkpoint"),
    (
        "pickle_not_weights",
        "bin",
        lambda d: torch.save({"model.embed_tokens.weight": Evil()}, d / "pytorch_model.bin"),
        "not a plain weights file",
    ),
    ("truncated_bin", "bin", lambda d: _truncate(d / "pytorch_model.bin", 0.6), "corrupt or truncated PyTorch file"),
    ("no_tokenizer", "base", lambda d: (d / "tokenizer.model").unlink(), "no tokenizer"),
    (
        "corrupt_tokenizer",
        "base",
        lambda d: (d / "tokenizer.model").write_bytes(b"junk" * 10),
        "cannot load the SentencePiece model",
    ),
]


def run_convert(args: list[str]):
    return CliRunner().invoke(app, ["convert", *args], catch_exceptions=False)


@pytest.mark.parametrize("name,start,mutate,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint(name, start, mutate, fragment, pristine, tmp_path):
    hf_dir = tmp_path / "ckpt"
    shutil.copytree(pristine[start], hf_dir)
    mutate(hf_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_convert([str(hf_dir), "-o", str(out_dir / "model.gguf"), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []  # no output, no temporary file


def test_failed_conversion_keeps_existing_output(pristine, tmp_path):
    hf_dir = tmp_path / "ckpt"
    shutil.copytree(pristine["base"], hf_dir)
    edit_config(hf_dir, router_act_func="sigmoid")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous contents")
    result = run_convert([str(hf_dir), "-o", str(out), "--quiet"])
    assert result.exit_code == 1
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "model.gguf"]


@pytest.mark.parametrize(
    "output,fragment",
    [("is_a_dir", "is a directory"), ("missing_dir/model.gguf", "output directory does not exist")],
)
def test_bad_output_path(output, fragment, pristine, tmp_path):
    (tmp_path / "is_a_dir").mkdir()
    result = run_convert([str(pristine["base"]), "-o", str(tmp_path / output), "--quiet"])
    assert result.exit_code == 1 and fragment in result.output


def test_unknown_type_is_a_usage_error(pristine, tmp_path):
    result = run_convert([str(pristine["base"]), "-o", str(tmp_path / "m.gguf"), "--expert-type", "q3_k"])
    assert result.exit_code == 2 and "q3_k" in result.output
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("option", ["model.safetensors", "config.json", "tokenizer.model"])
def test_output_that_is_an_input_is_refused(option, pristine, tmp_path):
    hf_dir = tmp_path / "ckpt"
    shutil.copytree(pristine["base"], hf_dir)
    before = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    result = run_convert([str(hf_dir), "-o", str(hf_dir / option), "--quiet"])
    assert result.exit_code == 1 and "is the input" in result.output, result.output
    assert {p.name: p.read_bytes() for p in hf_dir.iterdir()} == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_linked_to_an_input_is_refused(link, pristine, tmp_path):
    hf_dir = tmp_path / "ckpt"
    shutil.copytree(pristine["base"], hf_dir)
    weights = hf_dir / "model.safetensors"
    before = weights.read_bytes()
    out = tmp_path / "out.gguf"
    out.symlink_to(weights) if link == "symlink" else os.link(weights, out)
    result = run_convert([str(hf_dir), "-o", str(out), "--quiet"])
    assert result.exit_code == 1 and "is the input" in result.output, result.output
    assert weights.read_bytes() == before


def test_quantize_onto_its_source_is_refused(pristine, tmp_path):
    gguf_path = tmp_path / "m.gguf"
    assert run_convert([str(pristine["base"]), "-o", str(gguf_path), "--quiet"]).exit_code == 0
    before = gguf_path.read_bytes()
    result = CliRunner().invoke(app, ["quantize", str(gguf_path), str(gguf_path), "Q4_0"], catch_exceptions=False)
    assert result.exit_code == 1 and "is the input" in result.output, result.output
    assert gguf_path.read_bytes() == before


def test_integer_weights_are_refused(pristine, tmp_path):
    hf_dir = tmp_path / "ckpt"
    shutil.copytree(pristine["base"], hf_dir)
    edit_tensors(hf_dir, lambda s: s.update({"model.norm.weight": s["model.norm.weight"].to(torch.int64)}))
    result = run_convert([str(hf_dir), "-o", str(tmp_path / "m.gguf"), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "model.norm.weight is stored as I64, expected floating point" in result.output, result.output
    assert not (tmp_path / "m.gguf").exists()


# -- interrupts and write failures of a real process ---------------------------------------------

CLI = Path(sys.executable).with_name("deco-gguf")


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> Path:
    """Big enough that its conversion takes seconds."""
    spec = dataclasses.replace(
        VARIANTS["base"],
        name="mid",
        num_layers=8,
        hidden_size=512,
        num_experts=64,
        expert_ffn=64,
        moe_layer_freq=[0] + [1] * 7,
    )
    return write_fixture(tmp_path_factory.mktemp("mid") / "mid", spec)


def _start_convert(hf_dir: Path, out: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [str(CLI), "convert", str(hf_dir), "-o", str(out), "--outtype", "q8_0", "--expert-type", "q4_0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _wait_until_writing(proc: subprocess.Popen, out_dir: Path) -> None:
    """Until the process holds a temporary file in `out_dir` with data in it (it has no name there)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
            try:
                if os.readlink(fd).startswith(f"{out_dir}/") and fd.stat().st_size > 0:
                    return
            except OSError:  # closed meanwhile
                continue
        time.sleep(0.005)
    raise AssertionError(f"the conversion never started writing: {proc.communicate()[0]}")


@pytest.mark.parametrize(
    "signum,exit_code,word",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"), (signal.SIGKILL, -signal.SIGKILL, None)],
    ids=["sigint", "sigterm", "sigkill"],
)
def test_killed_conversion_leaves_nothing(signum, exit_code, word, mid_checkpoint, tmp_path):
    """A real signal while the output is being written: nothing appears in the output directory, an
    existing output is kept, and the next run writes the output."""
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous contents")
    proc = _start_convert(mid_checkpoint, out, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_until_writing(proc, tmp_path)
    os.kill(proc.pid, signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == exit_code, output
    if word:
        assert word in output and "Traceback" not in output, output
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and out.read_bytes() == b"previous contents"
    rerun = _start_convert(mid_checkpoint, out)
    assert rerun.wait(timeout=300) == 0 and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# A driver that sends the process a real SIGINT at one chosen moment, then runs the CLI.
SIGNAL_AT = """
import os, signal, sys
from deco_gguf.cli import run
{hook}
sys.argv = ["deco-gguf", *sys.argv[1:]]
run()
"""
HOOKS = {
    # inside the first tensor read (where an exception from a handler used to become a ValueError)
    "tensor_read": """
from deco_gguf.model import checkpoint
read = checkpoint._SafetensorsFile.tensor
def interrupted_read(self, name):
    os.kill(os.getpid(), signal.SIGINT)
    return read(self, name)
checkpoint._SafetensorsFile.tensor = interrupted_read
""",
    # while the command line's modules are being imported
    "imports": """
import builtins
real_import = builtins.__import__
def interrupted_import(name, *args, **kwargs):
    if name == "typer":
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupted_import
""",
}


@pytest.mark.parametrize("moment", HOOKS)
def test_ctrl_c_at_a_chosen_moment(moment, pristine, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_AT.format(hook=HOOKS[moment]))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, str(driver), "convert", str(pristine["base"]), "-o", str(out_dir / "m.gguf"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert list(out_dir.iterdir()) == []


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_write_failure_is_one_error_line(pristine, tmp_path):
    """The disk refuses more data (a file size limit, as a full disk would): one error line, the
    existing output kept, no temporary file."""
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous contents")
    proc = subprocess.run(
        [str(CLI), "convert", str(pristine["base"]), "-o", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(64 * 1024),
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "cannot write it: File too large" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and out.read_bytes() == b"previous contents"


def test_added_token_far_past_the_vocabulary_is_refused(pristine, tmp_path):
    hf_dir = tmp_path / "ckpt"
    shutil.copytree(pristine["base"], hf_dir)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["99999999"] = {"content": "<|far|>", "special": True}
    config["added_tokens_decoder"]["not-a-number"] = {"content": "<|odd|>", "special": True}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_convert([str(hf_dir), "-o", str(tmp_path / "m.gguf"), "--quiet"])
    assert result.exit_code == 1 and "'<|far|>' has id 99999999" in result.output, result.output
