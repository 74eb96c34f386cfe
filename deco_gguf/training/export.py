"""Writing a trained model in the released Hugging Face layout."""

from __future__ import annotations

import json
from pathlib import Path

from .. import fixtures
from .model import Shape, TrainableDeco


def export(model: TrainableDeco, shape: Shape, tokenizer: bytes, out: Path, dtype: str = "bfloat16") -> Path:
    """Write model.safetensors, config.json (Megatron + template keys), tokenizer files: the released layout."""
    spec = shape.fixture_spec(dtype)
    sd = model.state_dict_hf(fixtures.DTYPES[dtype])
    fixtures.write_fixture(out, spec, state_dict_hook=lambda _spec, _sd: sd, tokenizer_model=tokenizer)
    make_hf_keys_consistent(out, shape, dtype)
    return out


def make_hf_keys_consistent(out: Path, shape: Shape, dtype: str) -> None:
    """Give config.json's HF-style keys this model's values.

    fixtures.hf_config reproduces the released files, whose HF-style keys are
    stale MiniCPM template values (docs/deco.md, "Released checkpoints"); the converter
    then warns about each one. The bundled model keeps both key families but
    makes them agree, so converting it prints no warnings. eos ids: </s> and
    <|im_end|>, as the released [2, 73440] are.
    """
    sp = fixtures.sp_processor((out / "tokenizer.model").read_bytes())
    eos = [sp.eos_id(), sp.piece_to_id(fixtures.CHATML_TOKENS[1])]
    path = out / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.update(
        num_hidden_layers=shape.num_layers,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.dense_ffn,
        vocab_size=sp.get_piece_size(),
        rms_norm_eps=cfg["norm_epsilon"],
        rope_scaling=None,
        max_position_embeddings=4096,
        eos_token_id=eos,
        torch_dtype=dtype,
    )
    fixtures.dump_json(path, cfg, indent=4)
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8"))
    gen["eos_token_id"] = eos
    fixtures.dump_json(gen_path, gen, indent=2)
