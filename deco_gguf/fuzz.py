"""Mutated DECO GGUF files, and a loader that tells clean errors from crashes.

`mutants(valid_gguf, n, seed)` yields files with 1-3 random mutations of the
metadata (values, types, missing keys, wrong array lengths) or of the tensor
table (shapes, types, names, missing tensors, truncation). `load_in_child`
opens each in a forked child with the patched llama-cpp-python and evaluates
two tokens when it loads; the parent classifies the child's end: a clean load,
a clean error, or a crash (a signal, such as the SIGABRT of a failed
GGML_ASSERT) or hang.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFValueType as V

# Values that break assumptions: zero, one, negative as unsigned, the largest ints, non-finite floats.
EVIL_INTS = [0, 1, 2, 3, 7, 63, 64, 65, 2**16, 2**31 - 1, 2**32 - 1]
EVIL_FLOATS = [0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf")]
EVIL_STRINGS = ["", "gelu", "normal", "norm_silu ", "x" * 300, "relu\x00"]


@dataclass
class Field:
    value: object
    type: V
    sub_type: V | None = None


@dataclass
class Tensor:
    shape: list[int]  # numpy order
    qtype: gguf.GGMLQuantizationType
    data: bytes


@dataclass
class Model:
    fields: dict[str, Field]
    tensors: dict[str, Tensor]
    truncate_at: float | None = None  # cut the written file to this fraction

    @classmethod
    def read(cls, path: Path) -> "Model":
        reader = gguf.GGUFReader(path)
        fields = {}
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            vtype = f.types[0]
            sub = f.types[1] if vtype == V.ARRAY else None
            fields[key] = Field(f.contents(), vtype, sub)
        tensors = {
            t.name: Tensor([int(n) for n in reversed(t.shape)], t.tensor_type, bytes(t.data.tobytes()))
            for t in reader.tensors
        }
        return cls(fields, tensors)

    def write(self, path: Path, arch: str = "deco") -> None:
        writer = gguf.GGUFWriter(path, arch)
        for key, f in self.fields.items():
            writer.add_key_value(key, f.value, f.type, sub_type=f.sub_type)
        for name, t in self.tensors.items():
            writer.add_tensor_info(name, t.shape, np.dtype(np.float32), len(t.data), raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in self.tensors.values():
            writer.write_tensor_data(np.frombuffer(t.data, dtype=np.uint8))
        writer.close()
        if self.truncate_at is not None:
            size = path.stat().st_size
            with open(path, "r+b") as f:
                f.truncate(int(size * self.truncate_at))


# -- mutations: each changes the model in place and returns a description ---------------------


def _scalar_keys(m: Model, types: tuple[V, ...]) -> list[str]:
    return [k for k, f in m.fields.items() if f.type in types]


def mutate_int(m: Model, rng: random.Random) -> str:
    key = rng.choice(_scalar_keys(m, (V.UINT32, V.INT32, V.UINT64)))
    old = m.fields[key].value
    new = rng.choice(EVIL_INTS + [old + 1, max(old - 1, 0), old * 2])
    new = min(new, 2**31 - 1 if m.fields[key].type == V.INT32 else 2**32 - 1)
    m.fields[key].value = new
    return f"{key}: {old} -> {new}"


def mutate_float(m: Model, rng: random.Random) -> str:
    key = rng.choice(_scalar_keys(m, (V.FLOAT32,)))
    new = rng.choice(EVIL_FLOATS)
    m.fields[key].value = new
    return f"{key} -> {new}"


def mutate_string(m: Model, rng: random.Random) -> str:
    key = rng.choice([k for k in _scalar_keys(m, (V.STRING,)) if k.startswith("deco.")] or _scalar_keys(m, (V.STRING,)))
    new = rng.choice(EVIL_STRINGS)
    m.fields[key].value = new
    return f"{key} -> {new!r}"


def mutate_type(m: Model, rng: random.Random) -> str:
    key = rng.choice([k for k in m.fields if k.startswith(("deco.", "tokenizer.ggml."))])
    f = m.fields[key]
    replacement = rng.choice([Field("12", V.STRING), Field(1.5, V.FLOAT32), Field(3, V.UINT32), Field(True, V.BOOL), Field([1, 2], V.ARRAY, V.INT32)])
    m.fields[key] = replacement
    return f"{key}: type {f.type.name} -> {replacement.type.name}"


def drop_key(m: Model, rng: random.Random) -> str:
    key = rng.choice([k for k in m.fields if k.startswith(("deco.", "tokenizer.ggml."))])
    del m.fields[key]
    return f"drop {key}"


def mutate_array(m: Model, rng: random.Random) -> str:
    key = rng.choice([k for k, f in m.fields.items() if f.type == V.ARRAY])
    f = m.fields[key]
    values = list(f.value)
    choice = rng.randrange(4)
    if choice == 0:
        values = values[: rng.randrange(1, max(len(values), 2))]
    elif choice == 1:
        values = values + values[:3]
    elif choice == 2 and f.sub_type in (V.INT32, V.UINT32) and values:
        values[rng.randrange(len(values))] = rng.choice([-1, 2, 2**31 - 1])
    else:
        values = values[-1:]
    f.value = values
    return f"{key}: array of {len(values)}"


def drop_tensor(m: Model, rng: random.Random) -> str:
    name = rng.choice(list(m.tensors))
    del m.tensors[name]
    return f"drop tensor {name}"


def mutate_shape(m: Model, rng: random.Random) -> str:
    name = rng.choice(list(m.tensors))
    t = m.tensors[name]
    old = list(t.shape)
    block = gguf.GGML_QUANT_SIZES[t.qtype][0]
    choice = rng.randrange(5)
    if choice == 0 and len(t.shape) > 1:
        t.shape = list(reversed(t.shape))
    elif choice == 1:
        axis = rng.randrange(len(t.shape))
        t.shape[axis] = max(1, t.shape[axis] + rng.choice([-1, 1, t.shape[axis]]))
    elif choice == 2:
        t.shape = t.shape + [1] if rng.random() < 0.5 else [1] + t.shape
    elif choice == 3 and len(t.shape) > 1:
        t.shape = [t.shape[0] * t.shape[1]] + t.shape[2:]
    else:
        t.shape[-1] = max(block, t.shape[-1] - block)
    if t.shape[-1] % block:  # the writer cannot express a row that is not whole blocks
        t.shape = old
        t.shape[0] += 1
    return f"{name}: shape {old} -> {t.shape}"


def mutate_tensor_type(m: Model, rng: random.Random) -> str:
    name = rng.choice(list(m.tensors))
    t = m.tensors[name]
    old = t.qtype
    options = [q for q in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0) if t.shape[-1] % gguf.GGML_QUANT_SIZES[q][0] == 0 and q != old]
    t.qtype = rng.choice(options)
    return f"{name}: type {old.name} -> {t.qtype.name}"


def rename_tensor(m: Model, rng: random.Random) -> str:
    name = rng.choice(list(m.tensors))
    new = rng.choice([name.replace("blk.1.", "blk.99.", 1), name + ".x", name.replace("exps", "exp")])
    if new == name or new in m.tensors:
        new = "blk.0.unexpected.weight"
    m.tensors[new] = m.tensors.pop(name)
    return f"rename {name} -> {new}"


def truncate(m: Model, rng: random.Random) -> str:
    m.truncate_at = rng.choice([0.01, 0.1, 0.5, 0.9, 0.999])
    return f"truncate to {m.truncate_at:.1%}"


MUTATIONS = [mutate_int, mutate_float, mutate_string, mutate_type, drop_key, mutate_array, drop_tensor,
             mutate_shape, mutate_tensor_type, rename_tensor, truncate]


def mutants(valid: Path, out_dir: Path, n: int, seed: int = 0) -> Iterator[tuple[Path, list[str]]]:
    """n mutated copies of `valid` in out_dir, each with the mutations applied."""
    rng = random.Random(seed)
    template = Model.read(valid)
    for i in range(n):
        m = copy.deepcopy(template)
        applied = [rng.choice(MUTATIONS)(m, rng) for _ in range(rng.choice([1, 1, 2, 3]))]
        path = out_dir / f"mutant-{i:05d}.gguf"
        m.write(path)
        yield path, applied


# -- loading in a child process -------------------------------------------------------------

LOADED, CLEAN_ERROR = 0, 3


def _child(path: str) -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # llama.cpp logs to stderr
    from llama_cpp import Llama

    try:
        llm = Llama(model_path=path, n_ctx=32, n_threads=1, verbose=False)
    except (ValueError, RuntimeError):
        os._exit(CLEAN_ERROR)
    llm.eval([1, 2])
    os._exit(LOADED)


@dataclass
class Outcome:
    path: Path
    mutations: list[str]
    result: str  # "loaded", "error", "crash (signal N)" or "hang"

    @property
    def crashed(self) -> bool:
        return self.result not in ("loaded", "error")


def load_in_child(path: Path, mutations: list[str], timeout: float = 120.0) -> Outcome:
    import llama_cpp  # noqa: F401  (imported once in the parent, so each fork starts fast)

    proc = multiprocessing.get_context("fork").Process(target=_child, args=(str(path),))
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        return Outcome(path, mutations, "hang")
    code = proc.exitcode
    result = {LOADED: "loaded", CLEAN_ERROR: "error"}.get(code, f"crash (signal {-code})" if code < 0 else f"crash (exit {code})")
    return Outcome(path, mutations, result)
