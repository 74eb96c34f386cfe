"""Small random DECO checkpoints in exactly the released Hugging Face layout.

`write_fixture(out_dir, spec)` writes a directory that looks like what the
authors' converter (thunlp/DECO `tools/checkpoint/dist_ckpt_to_hf_minicpm.py`)
produces: the HF tensor names and shapes of docs/deco.md, "Released checkpoints", a config.json that is a MiniCPM template with the Megatron keys
added on top (including the template's stale values, see `hf_config`), and a
real SentencePiece tokenizer trained on `fixture_corpus()`.

Weights are random but reproducible (one `torch.Generator` per tensor, seeded
from the fixture seed and the tensor name, so a tensor does not depend on the
order it is written in or on sharding). They are scaled so activations stay
O(1); router calibration (to the ~20% activation of trained models) is not
done here: pass `state_dict_hook` (in-memory path) or `router_hook` (any path,
per router matrix) to `write_fixture`, or change `router_rows`.

Command line:  deco-gguf fixture base OUT_DIR
               deco-gguf fixture deco-0.5b OUT_DIR --calibrate 0.2
               deco-gguf fixture --list
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import io
import json
import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

__all__ = [
    "FixtureSpec",
    "VARIANTS",
    "PRESETS",
    "SP_VOCAB_SIZE",
    "CHATML_TOKENS",
    "write_fixture",
    "fixture_corpus",
    "resolve_spec",
    "moe_layer_pattern",
    "tensor_plan",
    "make_state_dict",
    "iter_state_dict",
    "router_rows",
    "hf_config",
    "tokenizer_model_bytes",
    "tokenizer_json",
]

# --------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERT_ACTS = ("norm_silu", "norm_silu_nomean", "norm_silu_norms", "silu", "relu")
ROUTER_ACTS = ("relu", "sqrelu")
ROUTER_NORMS = ("simple", "rms", "normal", "null")
WEIGHT_FORMATS = ("safetensors", "sharded", "bin")
TOKENIZER_FORMATS = ("model", "json", "both")


@dataclass(frozen=True)
class FixtureSpec:
    """One checkpoint shape/variant. Field names follow docs/deco.md, not config.json."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dense_ffn: int
    num_experts: int
    expert_ffn: int
    shared_ffn: int  # 0 = no shared expert (config writes null)
    moe_layer_freq: list[int] | int  # as written in config.json
    expert_gated: bool = False
    expert_act: str = "norm_silu"
    router_act: str = "relu"
    router_norm_type: str = "simple"
    router_norm_scalar: bool = False
    router_norm_fixed: bool = False
    router_norm_init_var: float = 1.0
    expert_bias: str | None = None  # None | "base" | "rms"
    use_mup: bool = False
    tied_embeddings: bool = False
    weight_format: str = "safetensors"
    tokenizer_format: str = "model"
    dtype: str = "float32"  # stored dtype of every tensor except router / expert_bias
    vocab_size: int | None = None  # None = SentencePiece vocab; larger = padded rows
    # --- beyond the brief (defaults = released behaviour) ---
    router_dtype: str = "float32"  # releases store the router in fp32
    norm_epsilon: float = 1e-5
    # HF mup keys. Template values (12, 1.4, 256) unless the variant sets them;
    # they are written even when use_mup is false (stale template keys).
    scale_emb: float = 12
    scale_depth: float = 1.4
    dim_model_base: int = 256

    def __post_init__(self) -> None:
        problems = []
        if self.expert_act not in EXPERT_ACTS:
            problems.append(f"expert_act {self.expert_act!r}")
        if self.router_act not in ROUTER_ACTS:
            problems.append(f"router_act {self.router_act!r}")
        if self.router_norm_type not in ROUTER_NORMS:
            problems.append(f"router_norm_type {self.router_norm_type!r}")
        if self.expert_bias not in (None, "base", "rms"):
            problems.append(f"expert_bias {self.expert_bias!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            problems.append(f"weight_format {self.weight_format!r}")
        if self.tokenizer_format not in TOKENIZER_FORMATS:
            problems.append(f"tokenizer_format {self.tokenizer_format!r}")
        if self.dtype not in DTYPES or self.router_dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r}/{self.router_dtype!r}")
        if self.num_heads % self.num_kv_heads:
            problems.append("num_heads not a multiple of num_kv_heads")
        if isinstance(self.moe_layer_freq, list) and len(self.moe_layer_freq) != self.num_layers:
            problems.append("moe_layer_freq list length != num_layers")
        if problems:
            raise ValueError(f"FixtureSpec {self.name!r}: invalid " + ", ".join(problems))

    def __hash__(self) -> int:  # moe_layer_freq may be a list: hash it as a tuple
        return hash(
            tuple(
                tuple(v) if isinstance(v, list) else v
                for v in (getattr(self, f.name) for f in dataclasses.fields(self))
            )
        )

    @property
    def moe_layers(self) -> list[bool]:
        return moe_layer_pattern(self.moe_layer_freq, self.num_layers)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def moe_layer_pattern(freq: list[int] | int, num_layers: int) -> list[bool]:
    """Megatron's reading of moe_layer_freq: a list of 0/1, or an int N (DECO where i % N == 0)."""
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(num_layers)]
    return [bool(x) for x in freq]


def _small(name: str, **kw) -> FixtureSpec:
    base = dict(
        num_layers=3,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        dense_ffn=160,
        num_experts=13,
        expert_ffn=32,
        shared_ffn=48,
        moe_layer_freq=[0, 1, 1],
    )
    base.update(kw)
    return FixtureSpec(name=name, **base)


_VARIANT_LIST = [
    # DECO as released (scaled down): layer 0 dense, the rest DECO, GQA, untied.
    _small("base"),
    _small("de64", num_experts=7, expert_ffn=64),
    _small("dense_middle", moe_layer_freq=[1, 0, 1]),
    _small("freq_int", num_layers=4, moe_layer_freq=2),  # layers 0, 2 DECO
    _small("gated", expert_gated=True),
    _small("act_norm_silu_nomean", expert_act="norm_silu_nomean"),
    _small("act_norm_silu_norms", expert_act="norm_silu_norms"),
    _small("act_silu", expert_act="silu"),
    _small("act_relu", expert_act="relu"),
    _small("router_rms", router_norm_type="rms"),
    _small("router_normal", router_norm_type="normal"),
    _small("router_null", router_norm_type="null"),
    _small("router_scalar", router_norm_scalar=True, router_norm_init_var=0.7),
    _small("router_fixed", router_norm_fixed=True, router_norm_init_var=0.5),
    _small("router_sqrelu", router_act="sqrelu"),
    _small("expert_bias_base", expert_bias="base"),
    _small("expert_bias_rms", expert_bias="rms"),
    _small("mup", use_mup=True, scale_emb=12, scale_depth=1.4, dim_model_base=32),
    _small("tied", tied_embeddings=True),
    _small("sharded", weight_format="sharded"),
    _small("bin", weight_format="bin"),
    _small("bf16", dtype="bfloat16"),
    _small("tokenizer_json", tokenizer_format="json"),
    _small(
        "e180",
        num_layers=2,
        moe_layer_freq=[0, 1],
        num_experts=180,
        expert_ffn=32,
        dense_ffn=128,
    ),
    # --- extras beyond the brief ---
    _small("tokenizer_both", tokenizer_format="both"),
    _small("padded_vocab", vocab_size=1100),  # embedding rows beyond the tokenizer
    _small("router_bf16", dtype="bfloat16", router_dtype="bfloat16"),  # --bf16 Megatron router
    _small("no_shared", shared_ffn=0),
    _small("mha", num_kv_heads=4),
    _small("head_dim_wide", num_heads=4, num_kv_heads=2, head_dim=32),  # heads*head_dim != d
]
VARIANTS: dict[str, FixtureSpec] = {s.name: s for s in _VARIANT_LIST}

RELEASED_VOCAB = 73448
PRESETS: dict[str, FixtureSpec] = {
    "deco-0.1b": FixtureSpec(
        name="deco-0.1b",
        num_layers=16,
        hidden_size=768,
        num_heads=6,
        num_kv_heads=6,
        head_dim=128,
        dense_ffn=1920,
        num_experts=42,
        expert_ffn=64,
        shared_ffn=128,
        moe_layer_freq=[0] + [1] * 15,
        router_norm_init_var=0.1,
        weight_format="sharded",
        tokenizer_format="both",
        dtype="bfloat16",
        vocab_size=RELEASED_VOCAB,
    ),
    "deco-0.5b": FixtureSpec(
        name="deco-0.5b",
        num_layers=27,
        hidden_size=1280,
        num_heads=10,
        num_kv_heads=10,
        head_dim=128,
        dense_ffn=3360,
        num_experts=77,
        expert_ffn=64,
        shared_ffn=128,
        moe_layer_freq=[0] + [1] * 26,
        router_norm_init_var=0.1,
        weight_format="sharded",
        tokenizer_format="both",
        dtype="bfloat16",
        vocab_size=RELEASED_VOCAB,
    ),
}


def resolve_spec(spec: FixtureSpec | str) -> FixtureSpec:
    if isinstance(spec, FixtureSpec):
        return spec
    if spec in VARIANTS:
        return VARIANTS[spec]
    if spec in PRESETS:
        return PRESETS[spec]
    raise KeyError(f"unknown fixture {spec!r}; variants: {sorted(VARIANTS)}, presets: {sorted(PRESETS)}")


# --------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------

_CORPUS_MODULES = (
    "builtins", "os", "os.path", "re", "json", "collections", "collections.abc", "itertools",
    "functools", "pathlib", "inspect", "textwrap", "string", "argparse", "logging",
    "logging.handlers", "subprocess", "threading", "asyncio", "asyncio.events", "asyncio.tasks",
    "asyncio.streams", "unittest", "unittest.mock", "typing", "dataclasses", "datetime", "decimal",
    "fractions", "random", "statistics", "math", "cmath", "numbers", "csv", "email.message",
    "email.utils", "http.client", "urllib.parse", "urllib.request", "shutil", "tempfile",
    "zipfile", "tarfile", "io", "codecs", "heapq", "bisect", "enum", "abc", "contextlib",
    "operator", "copy", "pickle", "socket", "selectors", "struct", "array", "calendar", "time",
    "difflib", "pprint", "traceback", "warnings", "weakref", "queue", "sched", "glob", "fnmatch",
    "base64", "hashlib", "hmac", "secrets", "uuid", "zlib", "gzip", "configparser", "shlex",
    "getopt", "locale", "gettext", "types", "sys", "gc", "ast", "dis", "tokenize", "doctest",
    "pdb", "timeit", "concurrent.futures", "multiprocessing", "signal", "mmap", "ssl",
    "smtplib", "ftplib", "imaplib", "xml.etree.ElementTree", "html", "html.parser", "mimetypes",
    "wave", "colorsys", "filecmp", "stat", "platform", "sysconfig", "zipimport", "pkgutil",
    "importlib", "runpy", "graphlib", "reprlib", "ipaddress", "unicodedata", "plistlib",
    "fileinput", "linecache", "tracemalloc", "json.decoder",
)
_CORPUS_MAX_CHARS = 400_000
_PROSE_CHARS = frozenset(" ,.;:'\"-()")


def _docstrings() -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # typing.io & co. warn when touched
        yield from list(_docstrings_unfiltered())


def _docstrings_unfiltered() -> Iterator[str]:
    seen: set[str] = set()
    for modname in _CORPUS_MODULES:
        try:
            mod = importlib.import_module(modname)
        except Exception:  # pragma: no cover - a stdlib module missing from this build
            continue
        objs: list[object] = [mod]
        for name in sorted(vars(mod)):
            if name.startswith("_"):
                continue
            obj = vars(mod)[name]
            if inspect.isclass(obj) or inspect.isroutine(obj):
                objs.append(obj)
                if inspect.isclass(obj):
                    for mname in sorted(vars(obj)):
                        if mname.startswith("_"):
                            continue
                        member = vars(obj)[mname]
                        if isinstance(member, (classmethod, staticmethod)):
                            member = member.__func__
                        if inspect.isroutine(member) or isinstance(member, property):
                            objs.append(member)
        for obj in objs:
            try:
                doc = inspect.getdoc(obj)
            except Exception:  # pragma: no cover
                doc = None
            if doc and doc not in seen:
                seen.add(doc)
                yield doc


@functools.lru_cache(maxsize=1)
def _corpus_paragraphs() -> tuple[str, ...]:
    out: list[str] = []
    total = 0
    for doc in _docstrings():
        for para in doc.split("\n\n"):
            lines = [ln.strip() for ln in para.splitlines()]
            if any(ln.startswith((">>>", "...", "$", "|", "+-")) for ln in lines):
                continue
            text = " ".join(ln for ln in lines if ln)
            if len(text) < 40:
                continue
            prose = sum(c.isalpha() or c in _PROSE_CHARS for c in text) / len(text)
            if prose < 0.9:
                continue
            out.append(text)
            total += len(text) + 1
            if total >= _CORPUS_MAX_CHARS:
                return tuple(out)
    return tuple(out)


def fixture_corpus() -> str:
    """Ordinary English prose (stdlib docstrings, code examples dropped), one paragraph per line.

    Deterministic for a given Python build (docstrings change between Python
    versions), about 400 KB, no network.
    """
    return "\n".join(_corpus_paragraphs())


SP_VOCAB_SIZE = 1024
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SP_TRAIN_ARGS = dict(
    model_type="bpe",  # Llama-2 style; llama.cpp's SPM tokenizer is exact for BPE scores
    vocab_size=SP_VOCAB_SIZE,
    character_coverage=0.9995,
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    max_sentence_length=16384,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_surface=" \u2047 ",
    user_defined_symbols=list(CHATML_TOKENS),
    num_threads=1,
    minloglevel=2,
)


@functools.lru_cache(maxsize=1)
def tokenizer_model_bytes() -> bytes:
    """The serialized SentencePiece model (trained once per process, ~0.2 s)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_paragraphs()), model_writer=buf, **SP_TRAIN_ARGS
    )
    return buf.getvalue()


def sp_processor(model_bytes: bytes | None = None):
    """The fixtures' SentencePiece model, or the serialized one given."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_bytes or tokenizer_model_bytes())


def _added_token(content: str, special: bool = True) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def tokenizer_json(model_bytes: bytes | None = None) -> dict:
    """An HF `tokenizer.json` (BPE with byte fallback, as for Llama-2) built from the SP model."""
    sp = sp_processor(model_bytes)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = {
        sp.id_to_piece(i): i
        for i in range(n)
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
        and sp.id_to_piece(i) not in CHATML_TOKENS
    }
    # SentencePiece BPE merges the adjacent pair whose concatenation is the
    # best-scored piece; as HF merges: every split of a piece into two pieces,
    # ranked by the merged piece's id (= score order).
    merges: list[tuple[int, int, int, str, str]] = []
    for piece, pid in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((pid, normal[left], normal[right], left, right))
    merges.sort()
    added = [
        {"id": i, **{k: v for k, v in _added_token(sp.id_to_piece(i)).items()}}
        for i in range(n)
        if sp.is_control(i) or sp.is_unknown(i) or sp.id_to_piece(i) in CHATML_TOKENS
    ]
    bos = sp.id_to_piece(sp.bos_id())
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": sp.id_to_piece(sp.unk_id()),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{m[3]} {m[4]}" for m in merges],
        },
    }


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _write_tokenizer(out: Path, fmt: str, model_bytes: bytes | None = None) -> None:
    model_bytes = model_bytes or tokenizer_model_bytes()
    sp = sp_processor(model_bytes)
    if fmt in ("model", "both"):
        (out / "tokenizer.model").write_bytes(model_bytes)
    if fmt in ("json", "both"):
        _dump_json(out / "tokenizer.json", tokenizer_json(model_bytes), indent=2)
    unk, bos, eos = (sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()))
    decoder = {}
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or piece in CHATML_TOKENS:
            decoder[str(i)] = _added_token(piece)
    tok_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(CHATML_TOKENS),
        "bos_token": bos,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizerFast" if fmt == "json" else "LlamaTokenizer",
        "unk_token": unk,
        "use_default_system_prompt": False,
    }
    _dump_json(out / "tokenizer_config.json", tok_config, indent=2)

    def ref(s: str) -> dict:
        d = _added_token(s)
        d.pop("special")
        return d

    special_map = {
        "additional_special_tokens": [ref(t) for t in CHATML_TOKENS],
        "bos_token": ref(bos),
        "eos_token": ref(eos),
        "unk_token": ref(unk),
    }
    _dump_json(out / "special_tokens_map.json", special_map, indent=2)


# --------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------

# The MiniCPM4 base template the converter copies (examples/minicpm4/base_files,
# not in the public repository). Everything here except hidden_size,
# num_attention_heads and use_mup survives into the released config.json,
# whatever the model really is: these are the "stale" keys.
TEMPLATE_NUM_HIDDEN_LAYERS = 32
TEMPLATE_NUM_KV_HEADS = 2
TEMPLATE_INTERMEDIATE_SIZE = 16384
TEMPLATE_RMS_NORM_EPS = 1e-6
TEMPLATE_HEAD_DIM = 128
TEMPLATE_VOCAB_SIZE = 73448
TEMPLATE_MAX_POSITION = 32768
TEMPLATE_EOS_IDS = [2, 73440]
TEMPLATE_BOS_ID = 1
TRAIN_SEQ_LENGTH = 4096  # --seq-length of the training scripts: recorded nowhere in config.json


def _template_rope_scaling() -> dict:
    half = TEMPLATE_HEAD_DIM // 2
    long_factor = [round(1.0 + 30.0 * (1.0 - math.exp(-i / 12.0)), 6) for i in range(half)]
    short_factor = [round(1.0 + 0.05 * i / half, 6) for i in range(half)]
    return {
        "rope_type": "longrope",
        "long_factor": long_factor,
        "short_factor": short_factor,
        "original_max_position_embeddings": TEMPLATE_MAX_POSITION,
    }


def hf_config(spec: FixtureSpec) -> dict:
    """config.json as the authors' converter writes it: template, then the Megatron keys.

    The converter (dist_ckpt_to_hf_minicpm.py) loads the template and sets
    exactly these `update_keys` from the Megatron args, in this order:
    num_layers, hidden_size, ffn_hidden_size, num_attention_heads,
    num_query_groups, norm_epsilon, router_norm_fixed, router_norm_scalar,
    router_norm_init_var, moe_expert_bias_apply_method, use_blockffn,
    num_experts, moe_ffn_hidden_size, moe_shared_expert_intermediate_size,
    moe_layer_freq, router_act_func, router_norm_type, expert_act_func,
    router_type, expert_act_norm_type, moe_router_enable_expert_bias,
    expert_not_gated, moe_router_pre_softmax, moe_router_topk,
    moe_router_topp, moe_router_score_function,
    moe_router_topk_scaling_factor, use_mup.
    Not written: kv_channels, seq_length, vocab size, tie flag, scale_emb /
    scale_depth / dim_model_base (the mup scales live in the template).
    """
    cfg: dict = {
        "architectures": ["BlockFFNForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_blockffn.BlockFFNConfig",
            "AutoModel": "modeling_blockffn.BlockFFNModel",
            "AutoModelForCausalLM": "modeling_blockffn.BlockFFNForCausalLM",
        },
        "bos_token_id": TEMPLATE_BOS_ID,
        "eos_token_id": list(TEMPLATE_EOS_IDS),
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.1,
        "intermediate_size": TEMPLATE_INTERMEDIATE_SIZE,
        "max_position_embeddings": TEMPLATE_MAX_POSITION,
        "model_type": "blockffn",
        "num_attention_heads": 32,
        "num_hidden_layers": TEMPLATE_NUM_HIDDEN_LAYERS,
        "num_key_value_heads": TEMPLATE_NUM_KV_HEADS,
        "head_dim": TEMPLATE_HEAD_DIM,
        "rms_norm_eps": TEMPLATE_RMS_NORM_EPS,
        "rope_scaling": _template_rope_scaling(),
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "tie_word_embeddings": False,
        "vocab_size": TEMPLATE_VOCAB_SIZE,
        "scale_emb": spec.scale_emb,
        "dim_model_base": spec.dim_model_base,
        "scale_depth": spec.scale_depth,
        "use_mup": False,
    }
    megatron = {
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "ffn_hidden_size": spec.dense_ffn,
        "num_attention_heads": spec.num_heads,
        "num_query_groups": spec.num_kv_heads,
        "norm_epsilon": spec.norm_epsilon,
        "router_norm_fixed": spec.router_norm_fixed,
        "router_norm_scalar": spec.router_norm_scalar,
        "router_norm_init_var": spec.router_norm_init_var,
        # The released training scripts pass --moe-expert-bias-apply-method rms
        # even though the expert bias is disabled: only the flag below counts.
        "moe_expert_bias_apply_method": spec.expert_bias or "rms",
        "use_blockffn": True,
        "num_experts": spec.num_experts,
        "moe_ffn_hidden_size": spec.expert_ffn,
        "moe_shared_expert_intermediate_size": spec.shared_ffn or None,
        "moe_layer_freq": list(spec.moe_layer_freq)
        if isinstance(spec.moe_layer_freq, list)
        else spec.moe_layer_freq,
        "router_act_func": spec.router_act,
        "router_norm_type": spec.router_norm_type,
        "expert_act_func": spec.expert_act,
        # The scripts never pass --router-type: the Megatron default "topk" is
        # recorded although BlockFFN (use_blockffn) routing is used.
        "router_type": "topk",
        "expert_act_norm_type": "normal",
        "moe_router_enable_expert_bias": spec.expert_bias is not None,
        "expert_not_gated": not spec.expert_gated,
        "moe_router_pre_softmax": False,
        "moe_router_topk": 2,
        "moe_router_topp": 0.5,
        "moe_router_score_function": "softmax",
        "moe_router_topk_scaling_factor": None,
        "use_mup": spec.use_mup,
    }
    cfg.update(megatron)
    return cfg


# --------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------

TensorPlan = list[tuple[str, tuple[int, ...], torch.dtype]]


def tensor_plan(spec: FixtureSpec, vocab_size: int | None = None) -> TensorPlan:
    """(name, shape, dtype) of every tensor, in the authors' converter's order."""
    V = vocab_size or spec.vocab_size or SP_VOCAB_SIZE
    d, wd, fp32 = spec.hidden_size, spec.torch_dtype, torch.float32
    rd = DTYPES[spec.router_dtype]
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    E, De, Ds = spec.num_experts, spec.expert_ffn, spec.shared_ffn
    plan: TensorPlan = [("model.embed_tokens.weight", (V, d), wd), ("model.norm.weight", (d,), wd)]
    if not spec.tied_embeddings:
        plan.append(("lm_head.weight", (V, d), wd))
    for i, moe in enumerate(spec.moe_layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (d,), wd),
            (p + "self_attn.q_proj.weight", (q, d), wd),
            (p + "self_attn.k_proj.weight", (kv, d), wd),
            (p + "self_attn.v_proj.weight", (kv, d), wd),
            (p + "self_attn.o_proj.weight", (d, q), wd),
            (p + "post_attention_layernorm.weight", (d,), wd),
        ]
        if not moe:
            plan += [
                (p + "mlp.gate_proj.weight", (spec.dense_ffn, d), wd),
                (p + "mlp.up_proj.weight", (spec.dense_ffn, d), wd),
                (p + "mlp.down_proj.weight", (d, spec.dense_ffn), wd),
            ]
            continue
        plan.append((p + "mlp.moe_router.weight", (E, d), rd))
        if not spec.router_norm_fixed:
            plan.append((p + "mlp.router_norm.weight", (1 if spec.router_norm_scalar else E,), wd))
        if spec.expert_gated:
            plan.append((p + "mlp.expert_gate_proj.weight", (E * De, d), wd))
        plan.append((p + "mlp.expert_up_proj.weight", (E * De, d), wd))
        plan.append((p + "mlp.expert_down_proj.weight", (d, E * De), wd))
        if spec.expert_act in ("norm_silu", "norm_silu_nomean"):
            plan.append((p + "mlp.expert_act.rms_norm.weight", (De,), wd))
        if Ds:
            plan += [
                (p + "mlp.shared_experts.gate_proj.weight", (Ds, d), wd),
                (p + "mlp.shared_experts.up_proj.weight", (Ds, d), wd),
                (p + "mlp.shared_experts.down_proj.weight", (d, Ds), wd),
            ]
        if spec.expert_bias:
            plan.append((p + "mlp.expert_bias", (E,), fp32))
    return plan


def _generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def router_rows(spec: FixtureSpec, layer: int, gen: torch.Generator) -> torch.Tensor:
    """The router matrix W_router [E, d] (fp32) of one DECO layer.

    Rows ~ N(0, 1/d), so on RMS-normalised inputs the logits are ~N(0, 1) and
    about half the experts fire. Calibration to ~20% activation replaces this
    (or uses write_fixture's router_hook / state_dict_hook).
    """
    d = spec.hidden_size
    return torch.randn(spec.num_experts, d, generator=gen) / math.sqrt(d)


def _router_scale(spec: FixtureSpec, layer: int, n: int, gen: torch.Generator) -> torch.Tensor:
    v = spec.router_norm_init_var
    scale = v * (1.0 + 0.25 * torch.randn(n, generator=gen))
    if n >= 3:
        # Activity is decided before scaling: one exactly-zero and one negative
        # scale per DECO layer exercise "test relu(router) > 0, never s > 0".
        zero, neg = layer % n, (layer + 1) % n
        scale[zero] = 0.0
        scale[neg] = -abs(float(scale[neg])) - 0.1 * abs(v)
    else:
        scale = scale.abs()
    return scale


def _make_tensor(spec: FixtureSpec, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = _generator(seed, name)
    if name.endswith("norm.weight") and "router_norm" not in name:
        # model.norm, input/post_attention_layernorm, expert_act.rms_norm
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("mlp.router_norm.weight"):
        layer = int(name.split(".")[2])
        return _router_scale(spec, layer, shape[0], g)
    if name.endswith("mlp.moe_router.weight"):
        layer = int(name.split(".")[2])
        return router_rows(spec, layer, g)
    if name.endswith("mlp.expert_bias"):
        return 0.5 * torch.randn(shape, generator=g)
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=g)
    fan_in = shape[1]
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


RouterHook = Callable[[int, torch.Tensor], torch.Tensor]
StateDictHook = Callable[[FixtureSpec, dict], "dict | None"]


def iter_state_dict(
    spec: FixtureSpec | str,
    seed: int = 0,
    *,
    router_hook: RouterHook | None = None,
    plan: TensorPlan | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Generate the tensors one at a time (streaming; nothing else is kept)."""
    spec = resolve_spec(spec)
    for name, shape, dtype in plan if plan is not None else tensor_plan(spec, _vocab_rows(spec)):
        t = _make_tensor(spec, name, shape, seed)
        if router_hook is not None and name.endswith("mlp.moe_router.weight"):
            t = router_hook(int(name.split(".")[2]), t)
            if tuple(t.shape) != shape:
                raise ValueError(f"router_hook changed the shape of {name}: {tuple(t.shape)} != {shape}")
        yield name, t.to(dtype).contiguous()


def make_state_dict(
    spec: FixtureSpec | str, seed: int = 0, *, router_hook: RouterHook | None = None
) -> dict[str, torch.Tensor]:
    """The whole state dict in memory (small variants; presets should stream)."""
    return dict(iter_state_dict(spec, seed, router_hook=router_hook))


def _vocab_rows(spec: FixtureSpec) -> int:
    return spec.vocab_size or sp_processor().get_piece_size()


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _dump_json(path: Path, obj, indent: int = 4) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _shard(plan: TensorPlan, max_bytes: int) -> list[TensorPlan]:
    shards: list[TensorPlan] = [[]]
    size = 0
    for entry in plan:
        nb = _nbytes(entry[1], entry[2])
        if shards[-1] and size + nb > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nb
    return shards


_MANAGED_GLOBS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tokenizer.model",
    "tokenizer.json",
)


def write_fixture(
    out_dir: Path | str,
    spec: FixtureSpec | str,
    seed: int = 0,
    *,
    router_hook: RouterHook | None = None,
    state_dict_hook: StateDictHook | None = None,
    max_shard_bytes: int | None = None,
    tokenizer_model: bytes | None = None,
) -> Path:
    """Write an HF checkpoint directory for `spec` (a FixtureSpec or a VARIANTS/PRESETS name).

    router_hook(layer, W_router[E, d] fp32) -> new W_router, applied as each
    router is generated (works while streaming). state_dict_hook(spec, sd)
    may edit (or return a replacement of) the complete state dict before it is
    written; it forces the in-memory path. Sharded checkpoints use shards of at
    most max_shard_bytes (default: a third of the total, at most 1 GiB, so
    there are always >= 2 shards), generated and written one shard at a time.
    """
    spec = resolve_spec(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _MANAGED_GLOBS:
        for stale in out.glob(pattern):
            stale.unlink()

    plan = tensor_plan(spec, _vocab_rows(spec))
    if state_dict_hook is not None:
        sd = dict(iter_state_dict(spec, seed, router_hook=router_hook, plan=plan))
        new = state_dict_hook(spec, sd)
        sd = sd if new is None else new
        plan = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
        source: Callable[[TensorPlan], Iterator[tuple[str, torch.Tensor]]] = lambda p: (
            (k, sd[k].contiguous()) for k, _, _ in p
        )
    else:
        source = lambda p: iter_state_dict(spec, seed, router_hook=router_hook, plan=p)  # noqa: E731

    if spec.weight_format == "bin":
        torch.save(dict(source(plan)), out / "pytorch_model.bin")
    elif spec.weight_format == "safetensors":
        from safetensors.torch import save_file

        save_file(dict(source(plan)), str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        from safetensors.torch import save_file

        total = sum(_nbytes(s, dt) for _, s, dt in plan)
        limit = max_shard_bytes or max(1, min(1 << 30, -(-total // 3)))
        shards = _shard(plan, limit)
        if len(shards) < 2 and len(plan) >= 2:  # a sharded fixture must have >= 2 shards
            shards = _shard(plan, max(1, -(-total // 2)))
        weight_map: dict[str, str] = {}
        n = len(shards)
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            tensors = dict(source(shard))
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            for name in tensors:
                weight_map[name] = fname
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _dump_json(out / "model.safetensors.index.json", index, indent=2)

    _dump_json(out / "config.json", hf_config(spec), indent=4)
    _dump_json(
        out / "generation_config.json",
        {
            "bos_token_id": TEMPLATE_BOS_ID,
            "eos_token_id": list(TEMPLATE_EOS_IDS),
            "transformers_version": "4.46.3",
        },
        indent=2,
    )
    _write_tokenizer(out, spec.tokenizer_format, tokenizer_model)
    return out
