"""Reading a released DECO checkpoint (Hugging Face layout) lazily.

`HFCheckpoint(path)` opens the weight files without loading them (safetensors
are memory-mapped, `pytorch_model.bin` is loaded with `weights_only` and
`mmap`), resolves the `DecoConfig` and checks every tensor's shape, so a bad
checkpoint fails before anything is computed or written.

Resolution (resolve.py) follows docs/deco.md, "Released checkpoints": shapes
come from the tensors, the rest from the Megatron keys; the HF-style keys are
template values and are only compared, with a warning naming both values when
they disagree.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..support.errors import DecoError
from .config import DecoConfig
from .layout import hf_name, hf_shapes
from .resolve import resolve_config

# Weight files in the order they are looked for.
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Tokenizer files the converter (and gguf's SentencePiece reader) may read.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
)


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise DecoError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DecoError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise DecoError(f"{path}: expected a JSON object")
    return value


class _SafetensorsFile:
    def __init__(self, path: Path):
        self._path = path
        try:
            self._file = safe_open(str(path), framework="pt")
        except FileNotFoundError:
            raise DecoError(f"{path}: weight file not found") from None
        except (SafetensorError, OSError) as e:
            raise DecoError(f"{path}: corrupt or truncated safetensors file ({e})") from None

    def names(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._file.get_slice(name).get_dtype()  # F32, BF16, I64, ...

    def tensor(self, name: str) -> torch.Tensor:
        # A mapping of its own, dropped after the copy: pages read stay out of our resident set.
        with safe_open(str(self._path), framework="pt") as f:
            return f.get_tensor(name)


class _TorchBinFile:
    def __init__(self, path: Path):
        if not path.is_file():
            raise DecoError(f"{path}: weight file not found")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            first_line = str(e).strip().splitlines()[0]
            raise DecoError(f"{path}: not a plain weights file, refusing to unpickle it ({first_line})") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DecoError(f"{path}: corrupt or truncated PyTorch file ({first_line})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DecoError(f"{path}: expected a state dict of tensors")
        self._state = state

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> str:
        return str(self._state[name].dtype).removeprefix("torch.")  # float32, bfloat16, int64, ...

    def tensor(self, name: str) -> torch.Tensor:
        return self._state[name]


class HFCheckpoint:
    """A DECO checkpoint directory: config, tensor index and lazy tensor access.

    `overrides` replace config.json keys (values the released config.json gets wrong, such as the
    µP scales of a checkpoint trained with other values than its template's)."""

    def __init__(self, path: str | Path, overrides: dict | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DecoError(f"{self.path}: not a checkpoint directory")
        self.overrides = dict(overrides or {})
        self.raw_config = read_json(self.path / "config.json") | self.overrides
        self._files: dict[str, _SafetensorsFile | _TorchBinFile] = {}
        self._location: dict[str, str] = {}  # tensor name -> weight file name
        self._index_weight_files()
        self.config = resolve_config(self.raw_config, self)
        check_tensor_shapes(self.config, self)

    # -- weight files -------------------------------------------------------

    def _open(self, file_name: str):
        if file_name not in self._files:
            path = self.path / file_name
            reader = _TorchBinFile if file_name.endswith(".bin") else _SafetensorsFile
            self._files[file_name] = reader(path)
        return self._files[file_name]

    def _index_weight_files(self) -> None:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            if (self.path / index_name).is_file():
                weight_map = read_json(self.path / index_name).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise DecoError(f"{self.path / index_name}: no weight_map")
                for file_name in sorted(set(weight_map.values())):
                    present = set(self._open(file_name).names())
                    for name, where in weight_map.items():
                        if where == file_name and name not in present:
                            raise DecoError(f"{self.path / file_name}: tensor {name} listed in the index is missing")
                self._location = dict(weight_map)
                return
        for file_name in (SAFETENSORS_SINGLE, BIN_SINGLE):
            if (self.path / file_name).is_file():
                self._location = {name: file_name for name in self._open(file_name).names()}
                return
        expected = f"{SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {BIN_SINGLE}"
        raise DecoError(f"{self.path}: no weights found (expected {expected})")

    # -- tensor access ------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._location)

    def has(self, name: str) -> bool:
        return name in self._location

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._location:
            raise DecoError(f"{self.path}: missing tensor {name}")
        return self._open(self._location[name]).shape(name)

    def dtype(self, name: str) -> str:
        return self._open(self._location[name]).dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as stored (dtype included); safetensors are read lazily."""
        if name not in self._location:
            raise DecoError(f"{self.path}: missing tensor {name}")
        try:
            return self._open(self._location[name]).tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise DecoError(f"{self.path / self._location[name]}: cannot read tensor {name} ({e})") from None

    def weight_files(self) -> list[Path]:
        return [self.path / f for f in sorted(set(self._location.values()))]

    def input_files(self) -> list[Path]:
        """Every file a conversion reads: config, weight index, weights, tokenizer."""
        names = ["config.json", SAFETENSORS_INDEX, BIN_INDEX, *TOKENIZER_FILES]
        return [p for p in (self.path / n for n in names) if p.is_file()] + self.weight_files()


# -- tensor shapes ----------------------------------------------------------


def check_tensor_shapes(config: DecoConfig, ckpt: HFCheckpoint) -> None:
    """Every expected tensor present with its shape and a floating-point type; anything else is
    reported and skipped."""
    expected = hf_shapes(config)
    router_scales = {hf_name("ffn_router_scale", i) for i in range(config.num_layers)}
    for name, shape in expected.items():
        if not ckpt.has(name):
            raise DecoError(f"{ckpt.path}: missing tensor {name}")
        actual = ckpt.shape(name)
        # A scalar router scale may be stored as [] or [1].
        if actual != shape and not (name in router_scales and math.prod(actual) == math.prod(shape)):
            raise DecoError(f"{ckpt.path}: tensor {name} has shape {list(actual)}, expected {list(shape)}")
        dtype = ckpt.dtype(name)
        if not dtype.lower().startswith(("f", "bf")):  # F32/BF16 (safetensors), float32/bfloat16 (torch)
            raise DecoError(f"{ckpt.path}: tensor {name} is stored as {dtype}, expected floating point weights")
    # router_norm.weight of a `null` router norm is expected to be there and unused.
    unexpected = [n for n in sorted(set(ckpt.names) - set(expected)) if n not in router_scales]
    if unexpected:
        more = " ..." if len(unexpected) > 3 else ""
        config.warnings.append(f"ignoring {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:3])}{more}")
