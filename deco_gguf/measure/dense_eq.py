"""dense_eq: the dense Llama of equal N that `deco-gguf speed --vs-dense` compares a DECO GGUF with.

A Llama GGUF with random weights, the same d, layers, heads, KV groups, head size and vocabulary, and a
dense SwiGLU width chosen so that its non-embedding parameter count N (as `deco-gguf info` counts it)
equals the DECO model's, written with the DECO model's tensor types (attention as its
attention, FFN as its routed experts, embeddings and head as its own: F32/F16/BF16/Q8_0/Q5_x/Q4_x by the
gguf package's quantizers, K-quants by libggml's); built once into the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..support.errors import DecoError
from ..support.files import atomic_output

DENSE_EQ_VERSION = 2

# Types written with the gguf package's numpy quantizers; any other type (K-quants, ...) is written by
# libggml's own quantizer (ggml_quantize_chunk) unless it needs an importance matrix, and a type that
# cannot be written (or whose blocks do not fit the rows) is replaced by the legacy type of about the
# same bits per weight, and reported.
GGUF_WRITES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
SUBSTITUTE = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q4_0", "Q5_K": "Q5_0", "Q6_K": "Q8_0"} | {
    t: "Q4_0" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS")
}


def _ggml_can_write(type_name: str) -> bool:
    import gguf

    if type_name not in gguf.GGMLQuantizationType.__members__:
        return False
    from ..runtime.native import ggml_base

    return not ggml_base().ggml_quantize_requires_imatrix(gguf.GGMLQuantizationType[type_name].value)


def _quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """`x` (F32, rows last) in `type_name`, as the bytes GGUF stores."""
    import ctypes

    import gguf

    qt = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return x
    if type_name == "F16":
        return x.astype(np.float16)
    if type_name in GGUF_WRITES:
        return gguf.quants.quantize(x, qt)
    block, size = gguf.GGML_QUANT_SIZES[qt]
    rows, n = int(np.prod(x.shape[:-1])), x.shape[-1]
    out = np.empty((rows, n // block * size), dtype=np.uint8)
    src = np.ascontiguousarray(x, dtype=np.float32)
    from ..runtime.native import ggml_base

    written = ggml_base().ggml_quantize_chunk(
        qt.value, src.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), 0, rows, n, None
    )
    if written != out.nbytes:
        raise DecoError(f"internal: ggml_quantize_chunk wrote {written} bytes of {type_name}, expected {out.nbytes}")
    return out.reshape(*x.shape[:-1], n // block * size)


@dataclass
class DenseEq:
    path: Path
    ffn_width: int
    params: int  # its N (non-embedding)
    deco_params: int  # the DECO model's N
    types: dict[str, str]  # role -> type written
    substituted: dict[str, str]  # role -> the DECO type that could not be written
    built: bool  # False when taken from the cache

    def as_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


def _writable(type_name: str, row: int) -> str:
    """`type_name` if it can be written for rows of length `row`, else its stand-in."""
    import gguf

    def fits(t: str) -> bool:
        return row % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] == 0

    if (type_name in GGUF_WRITES or _ggml_can_write(type_name)) and fits(type_name):
        return type_name
    stand_in = SUBSTITUTE.get(type_name, "Q8_0")
    return stand_in if fits(stand_in) else "F16"


def dense_eq_plan(info) -> tuple[int, int, int, dict[str, str], dict[str, str]]:
    """(ffn width, its N, the DECO N, types by role, substitutions) for the DECO ModelInfo `info`."""
    import gguf

    from ..model.accounting import account

    c = info.config
    d, layers = c.hidden_size, c.num_layers
    shapes = {t.name: t.shape for t in info.tensors}
    deco_n = account(shapes, d, layers, c.context_length, 0.2, "assumed").non_embedding_params
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attn = d * q + 2 * d * kv + q * d
    fixed = layers * (attn + 2 * d) + d  # attention, two norms per layer, output norm
    by_name = {t.name: t.type for t in info.tensors}
    first = lambda suffix: next(t.type for t in info.tensors if t.name.endswith(suffix))  # noqa: E731
    wanted = {
        "token_embd": by_name["token_embd.weight"],
        "output": by_name.get("output.weight", by_name["token_embd.weight"]),
        "attn_q": first("attn_q.weight"),
        "attn_k": first("attn_k.weight"),
        "attn_v": first("attn_v.weight"),
        "attn_output": first("attn_output.weight"),
        "ffn": first("ffn_up_exps.weight"),
    }
    row = {"attn_output": q}  # the others read rows of length d; ffn_down's rows (ff) are chosen to fit
    types = {role: _writable(t, row.get(role, d)) for role, t in wanted.items()}
    substituted = {role: wanted[role] for role in wanted if types[role] != wanted[role]}
    step = max(32, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[types["ffn"]]][0])
    ff = max(step, round((deco_n - fixed) / (3 * d * layers) / step) * step)
    return ff, fixed + 3 * d * ff * layers, deco_n, types, substituted


def cached_dense_eq(deco_path: Path, info, on_status: Callable[[str], None] | None = None) -> DenseEq:
    """build_dense_eq into the user's cache (~/.cache/deco-gguf/dense-eq), where `speed --vs-dense` and the
    benchmarks keep it."""
    from ..support.cache import cache_root

    return build_dense_eq(deco_path, info, cache_root() / "dense-eq", on_status)


def build_dense_eq(deco_path: Path, info, cache_dir: Path, on_status: Callable[[str], None] | None = None) -> DenseEq:
    """The dense_eq GGUF for the DECO GGUF `deco_path` (cached by its shapes and types)."""
    c = info.config
    ff, n, deco_n, types, substituted = dense_eq_plan(info)
    tied = "output.weight" not in {t.name for t in info.tensors}
    key = json.dumps(
        [
            DENSE_EQ_VERSION,
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size,
            ff,
            types,
            c.norm_eps,
            c.rope_theta,
            c.context_length,
            not tied,
            deco_path.stat().st_size,
        ]
    )
    out = cache_dir / f"dense-eq-{hashlib.sha256(key.encode()).hexdigest()[:20]}.gguf"
    result = DenseEq(out, ff, n, deco_n, types, substituted, built=False)
    if out.is_file():
        return result
    if on_status:
        on_status(f"building dense_eq (d {c.hidden_size}, {c.num_layers} layers, FFN {ff}, random weights) into {out}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_dense_eq(out, deco_path, c, ff, _tensor_plan(c, ff, types, tied))
    result.built = True
    return result


def _tensor_plan(c, ff: int, types: dict[str, str], tied: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, type) of every tensor of the dense Llama: DECO's attention, a SwiGLU of width ff."""
    d, hd = c.hidden_size, c.head_dim
    plan: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (c.vocab_size, d), types["token_embd"])]
    for i in range(c.num_layers):
        plan += [
            (f"blk.{i}.attn_norm.weight", (d,), "F32"),
            (f"blk.{i}.attn_q.weight", (c.num_heads * hd, d), types["attn_q"]),
            (f"blk.{i}.attn_k.weight", (c.num_kv_heads * hd, d), types["attn_k"]),
            (f"blk.{i}.attn_v.weight", (c.num_kv_heads * hd, d), types["attn_v"]),
            (f"blk.{i}.attn_output.weight", (d, c.num_heads * hd), types["attn_output"]),
            (f"blk.{i}.ffn_norm.weight", (d,), "F32"),
            (f"blk.{i}.ffn_gate.weight", (ff, d), types["ffn"]),
            (f"blk.{i}.ffn_up.weight", (ff, d), types["ffn"]),
            (f"blk.{i}.ffn_down.weight", (d, ff), types["ffn"]),
        ]
    plan.append(("output_norm.weight", (d,), "F32"))
    if not tied:
        plan.append(("output.weight", (c.vocab_size, d), types["output"]))
    return plan


def _write_dense_eq(out: Path, deco_path: Path, c, ff: int, plan: list[tuple[str, tuple[int, ...], str]]) -> None:
    """The Llama GGUF: DECO's hyperparameters and tokenizer, random weights (norms 1)."""
    import gguf

    reader = gguf.GGUFReader(deco_path)
    with atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        _add_metadata(writer, reader, deco_path, c, ff)
        for name, shape, type_name in plan:
            qt = gguf.GGMLQuantizationType[type_name]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            nbytes = int(np.prod(shape)) // block * size
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rng = np.random.default_rng(0)
        for _, shape, type_name in plan:
            if len(shape) == 1:
                data = np.ones(shape, np.float32)  # norms
            else:
                data = _quantize(rng.standard_normal(shape, dtype=np.float32) * 0.02, type_name)
            writer.write_tensor_data(data)
        writer.close()


def _add_metadata(writer, reader, deco_path: Path, c, ff: int) -> None:
    name = reader.fields["general.name"].contents() if "general.name" in reader.fields else deco_path.stem
    writer.add_name(f"dense_eq of {name}")
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = fld.types[1] if len(fld.types) > 1 else None
            writer.add_key_value(key, fld.contents(), fld.types[0], sub)


if __name__ == "__main__":  # python -m deco_gguf.measure.dense_eq MODEL: the path of its cached dense_eq
    import sys

    from ..model.gguf_file import read_gguf

    deco = Path(sys.argv[1])
    print(cached_dense_eq(deco, read_gguf(deco), lambda s: print(s, file=sys.stderr)).path)
