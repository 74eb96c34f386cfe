"""Reading a released DECO checkpoint (Hugging Face layout) lazily.

`HFCheckpoint(path)` opens the weight files without loading them (safetensors
are memory-mapped, `pytorch_model.bin` is loaded with `weights_only` and
`mmap`), resolves the `DecoConfig` and checks every tensor's shape, so a bad
checkpoint fails before anything is computed or written.

Resolution follows docs/deco.md, "Released checkpoints": shapes come from the
tensors, the rest from the Megatron keys; the HF-style keys are template
values and are only compared, with a warning naming both values when they
disagree.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import DecoConfig
from ..support.errors import DecoError

# Weight files in the order they are looked for.
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Tokenizer files the converter (and gguf's SentencePiece reader) may read.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")

DEFAULT_CONTEXT = 4096  # DECO's training context
MUP_KEYS = ("scale_emb", "scale_depth", "dim_model_base")
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


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
        raise DecoError(f"{self.path}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {BIN_SINGLE})")

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


# -- config resolution ------------------------------------------------------


def _layer_indices(names: list[str]) -> list[int]:
    layers = sorted({int(m.group(1)) for n in names if (m := LAYER_RE.match(n))})
    if layers != list(range(len(layers))):
        raise DecoError(f"layer indices are not contiguous from 0: {layers}")
    return layers


def _moe_layer_freq(value, num_layers: int) -> list[bool] | None:
    """moe_layer_freq as written: a list of 0/1 per layer, or an int N (layer i is DECO if i % N == 0)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise DecoError(f"config.json moe_layer_freq must be an int or a list, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise DecoError(f"config.json moe_layer_freq must be >= 1, got {value}")
        return [i % value == 0 for i in range(num_layers)]
    return [bool(v) for v in value]


def resolve_config(raw: dict, ckpt: HFCheckpoint) -> DecoConfig:
    warnings: list[str] = []

    def compare(key: str, truth, what: str):
        """Warn when a config.json key disagrees with the value taken from the tensors."""
        value = raw.get(key)
        if value is not None and value != truth:
            warnings.append(f"config.json {key}={value!r} disagrees with the {what} ({truth!r}); using {truth!r}")

    if raw.get("use_blockffn") is False:
        raise DecoError("config.json use_blockffn is false: this is not a DECO (BlockFFN) checkpoint")
    for key in ("embed_tokens", "norm"):
        if not ckpt.has(f"model.{key}.weight"):
            raise DecoError(f"{ckpt.path}: missing tensor model.{key}.weight")
    vocab_size, d = ckpt.shape("model.embed_tokens.weight")
    layers = _layer_indices(ckpt.names)
    if not layers:
        raise DecoError(f"{ckpt.path}: no model.layers.* tensors")
    num_layers = len(layers)

    # Layer kinds from the tensors; moe_layer_freq is only compared.
    moe_layers = []
    for i in layers:
        is_moe = ckpt.has(f"model.layers.{i}.mlp.moe_router.weight")
        if not is_moe and not ckpt.has(f"model.layers.{i}.mlp.gate_proj.weight"):
            raise DecoError(f"layer {i} has neither a router (DECO FFN) nor a dense gate_proj")
        moe_layers.append(is_moe)
    declared = _moe_layer_freq(raw.get("moe_layer_freq"), num_layers)
    if declared is not None and declared != moe_layers:
        warnings.append(
            f"config.json moe_layer_freq={raw['moe_layer_freq']!r} disagrees with the tensors "
            f"(DECO layers {[i for i, m in enumerate(moe_layers) if m]}); using the tensors"
        )
    compare("num_layers", num_layers, "tensors' layer count")
    compare("num_hidden_layers", num_layers, "tensors' layer count")
    compare("hidden_size", d, "embedding width")
    compare("vocab_size", vocab_size, "embedding rows")

    # Attention: head count is the one thing the tensors cannot tell.
    num_heads = raw.get("num_attention_heads")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise DecoError("config.json num_attention_heads is missing or invalid")
    q_rows = ckpt.shape("model.layers.0.self_attn.q_proj.weight")[0]
    k_rows = ckpt.shape("model.layers.0.self_attn.k_proj.weight")[0]
    if q_rows % num_heads:
        raise DecoError(f"q_proj has {q_rows} rows, not divisible by num_attention_heads={num_heads}")
    head_dim = q_rows // num_heads
    if k_rows % head_dim:
        raise DecoError(f"k_proj has {k_rows} rows, not a multiple of head_dim {head_dim}")
    num_kv_heads = k_rows // head_dim
    compare("kv_channels", head_dim, "head_dim from q_proj")
    compare("head_dim", head_dim, "head_dim from q_proj")
    compare("num_query_groups", num_kv_heads, "KV groups from k_proj")
    compare("num_key_value_heads", num_kv_heads, "KV groups from k_proj")

    dense = [i for i in layers if not moe_layers[i]]
    dense_ffn = ckpt.shape(f"model.layers.{dense[0]}.mlp.gate_proj.weight")[0] if dense else 0
    if dense:
        compare("ffn_hidden_size", dense_ffn, "dense gate_proj rows")
        compare("intermediate_size", dense_ffn, "dense gate_proj rows")

    num_experts = expert_ffn = shared_ffn = 0
    gated = False
    moe = [i for i in layers if moe_layers[i]]
    if moe:
        prefix = f"model.layers.{moe[0]}.mlp"
        num_experts = ckpt.shape(f"{prefix}.moe_router.weight")[0]
        up_rows = ckpt.shape(f"{prefix}.expert_up_proj.weight")[0]
        if num_experts < 1 or up_rows % num_experts:
            raise DecoError(f"expert_up_proj has {up_rows} rows, not a multiple of {num_experts} experts")
        expert_ffn = up_rows // num_experts
        shared_name = f"{prefix}.shared_experts.gate_proj.weight"
        shared_ffn = ckpt.shape(shared_name)[0] if ckpt.has(shared_name) else 0
        gated_layers = {ckpt.has(f"model.layers.{i}.mlp.expert_gate_proj.weight") for i in moe}
        if len(gated_layers) > 1:
            raise DecoError("some DECO layers have expert_gate_proj and others do not")
        gated = gated_layers.pop()
        compare("num_experts", num_experts, "router rows")
        compare("moe_ffn_hidden_size", expert_ffn, "expert width from expert_up_proj")
        compare("moe_shared_expert_intermediate_size", shared_ffn, "shared expert width")
        compare("expert_not_gated", not gated, "presence of expert_gate_proj (gated experts)")

    expert_act = raw.get("expert_act_func", "norm_silu")
    router_act = raw.get("router_act_func", "relu")
    router_norm = raw.get("router_norm_type", "simple")
    router_norm = "none" if router_norm in ("null", None) else router_norm

    # Router scale: a tensor of E or 1 entries, or a fixed constant.
    scale_size, scale_constant = 0, None
    if moe and router_norm != "none":
        scale_name = f"model.layers.{moe[0]}.mlp.router_norm.weight"
        if raw.get("router_norm_fixed"):
            scale_size, scale_constant = 1, float(raw.get("router_norm_init_var", 0.1))
        elif ckpt.has(scale_name):
            scale_size = math.prod(ckpt.shape(scale_name))
            compare("router_norm_scalar", scale_size == 1, "router_norm.weight size")
        else:
            raise DecoError(f"router_norm_type {router_norm!r} needs {scale_name} (or router_norm_fixed)")

    expert_bias = "none"
    if raw.get("moe_router_enable_expert_bias"):
        expert_bias = raw.get("moe_expert_bias_apply_method") or "base"

    norm_eps = raw.get("norm_epsilon")
    if norm_eps is None:
        norm_eps = 1e-5
        warnings.append("config.json has no norm_epsilon; using 1e-5 (rms_norm_eps is a template value and is not trusted)")
    elif raw.get("rms_norm_eps") not in (None, norm_eps):
        warnings.append(f"config.json rms_norm_eps={raw['rms_norm_eps']!r} ignored; using norm_epsilon={norm_eps!r}")
    if rope_scaling := raw.get("rope_scaling"):
        kind = rope_scaling.get("rope_type", rope_scaling.get("type")) if isinstance(rope_scaling, dict) else rope_scaling
        warnings.append(f"config.json rope_scaling ({kind}) ignored: DECO was trained without rope scaling")

    # The authors' converter never writes seq_length; max_position_embeddings is the template's.
    context_length = int(raw.get("seq_length") or DEFAULT_CONTEXT)
    if "seq_length" not in raw and raw.get("max_position_embeddings") not in (None, DEFAULT_CONTEXT):
        warnings.append(
            f"config.json max_position_embeddings={raw['max_position_embeddings']!r} is a template value; "
            f"using the training context {DEFAULT_CONTEXT}"
        )

    embedding_scale = residual_scale = logit_scale = 1.0
    if raw.get("use_mup"):
        missing = [k for k in MUP_KEYS if raw.get(k) is None]
        if missing:
            raise DecoError(f"config.json use_mup is true but {', '.join(missing)} is missing")
        try:
            embedding_scale = float(raw["scale_emb"])
            residual_scale = float(raw["scale_depth"]) / math.sqrt(num_layers)
            logit_scale = d / float(raw["dim_model_base"])
        except (TypeError, ValueError, ZeroDivisionError):
            raise DecoError(f"use_mup scales must be non-zero numbers: {', '.join(f'{k}={raw[k]!r}' for k in MUP_KEYS)}") from None
        # The authors' converter copies these from a template, never from the training run
        # (docs/deco.md, Released checkpoints): values that differ from training give wrong logits without any error.
        from_file = [k for k in MUP_KEYS if k not in ckpt.overrides]
        if from_file:
            values = ", ".join(f"{k}={raw[k]!r}" for k in MUP_KEYS)
            warnings.append(
                f"use_mup is true: using {values}; {', '.join(from_file)} from config.json may be template values, "
                "not the training run's; if they differ, give the true ones with --override KEY=VALUE"
            )

    config = DecoConfig(
        vocab_size=vocab_size,
        hidden_size=d,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dense_ffn_size=dense_ffn,
        moe_layers=moe_layers,
        num_experts=num_experts,
        expert_ffn_size=expert_ffn,
        shared_ffn_size=shared_ffn,
        expert_gated=gated,
        expert_act=expert_act,
        router_act=router_act,
        router_norm=router_norm,
        router_scale_size=scale_size,
        router_scale_constant=scale_constant,
        expert_bias=expert_bias,
        norm_eps=float(norm_eps),
        rope_theta=float(raw.get("rotary_base") or raw.get("rope_theta") or 10000.0),
        context_length=context_length,
        tied_embeddings=not ckpt.has("lm_head.weight"),
        embedding_scale=embedding_scale,
        residual_scale=residual_scale,
        logit_scale=logit_scale,
        warnings=warnings,
    )
    config.validate()
    return config


# -- tensor shapes ----------------------------------------------------------


def expected_shapes(config: DecoConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint with this config must have, HF names, torch shapes."""
    c = config
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not c.tied_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    for i, is_moe in enumerate(c.moe_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (q, d),
            f"{p}.self_attn.k_proj.weight": (kv, d),
            f"{p}.self_attn.v_proj.weight": (kv, d),
            f"{p}.self_attn.o_proj.weight": (d, q),
        }
        if not is_moe:
            f = c.dense_ffn_size
            shapes |= {f"{p}.mlp.gate_proj.weight": (f, d), f"{p}.mlp.up_proj.weight": (f, d), f"{p}.mlp.down_proj.weight": (d, f)}
            continue
        rows = c.num_experts * c.expert_ffn_size
        shapes |= {
            f"{p}.mlp.moe_router.weight": (c.num_experts, d),
            f"{p}.mlp.expert_up_proj.weight": (rows, d),
            f"{p}.mlp.expert_down_proj.weight": (d, rows),
        }
        if c.expert_gated:
            shapes[f"{p}.mlp.expert_gate_proj.weight"] = (rows, d)
        if c.has_block_norm:
            shapes[f"{p}.mlp.expert_act.rms_norm.weight"] = (c.expert_ffn_size,)
        if c.router_scale_size and c.router_scale_constant is None:
            shapes[f"{p}.mlp.router_norm.weight"] = (c.router_scale_size,)
        if c.expert_bias != "none":
            shapes[f"{p}.mlp.expert_bias"] = (c.num_experts,)
        if c.shared_ffn_size:
            s = c.shared_ffn_size
            shapes |= {
                f"{p}.mlp.shared_experts.gate_proj.weight": (s, d),
                f"{p}.mlp.shared_experts.up_proj.weight": (s, d),
                f"{p}.mlp.shared_experts.down_proj.weight": (d, s),
            }
    return shapes


def check_tensor_shapes(config: DecoConfig, ckpt: HFCheckpoint) -> None:
    """Every expected tensor present with its shape and a floating-point type; anything else is
    reported and skipped."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if not ckpt.has(name):
            raise DecoError(f"{ckpt.path}: missing tensor {name}")
        actual = ckpt.shape(name)
        # A scalar router scale may be stored as [] or [1].
        if actual != shape and not (name.endswith("router_norm.weight") and math.prod(actual) == math.prod(shape)):
            raise DecoError(f"{ckpt.path}: tensor {name} has shape {list(actual)}, expected {list(shape)}")
        dtype = ckpt.dtype(name)
        if not dtype.lower().startswith(("f", "bf")):  # F32/BF16 (safetensors), float32/bfloat16 (torch)
            raise DecoError(f"{ckpt.path}: tensor {name} is stored as {dtype}, expected floating point weights")
    ignored = sorted(set(ckpt.names) - set(expected))
    # router_norm.weight of a `null` router norm is expected to be there and unused.
    unexpected = [n for n in ignored if not n.endswith("mlp.router_norm.weight")]
    if unexpected:
        config.warnings.append(f"ignoring {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
