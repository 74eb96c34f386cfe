"""The tokenizer of a DECO checkpoint, as GGUF wants it (SentencePiece, `llama` model).

Read from `tokenizer.model` through gguf's SentencePieceVocab, or from a
`tokenizer.json` (Unigram, or Llama-style BPE with byte fallback). Special
tokens declared in `tokenizer_config.json` (`added_tokens_decoder`) get the
CONTROL type so `<|im_start|>`/`<|im_end|>` stay single tokens in chat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from sentencepiece import SentencePieceProcessor

from ..model.checkpoint import read_json
from ..support.errors import DecoError

IM_END = "<|im_end|>"
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def eot_id(self) -> int | None:
        """`<|im_end|>`: the second end-of-generation token of ChatML models."""
        return self.tokens.index(IM_END) if IM_END in self.tokens else None

    def pad_to(self, n: int) -> None:
        """Pad with `[PADi]` tokens up to the embedding rows, as released models need."""
        if len(self.tokens) > n:
            raise DecoError(f"the tokenizer has {len(self.tokens)} tokens but the embeddings only {n} rows")
        if len(self.tokens) < n:
            self.warnings.append(
                f"tokenizer has {len(self.tokens)} tokens, padded with [PAD] tokens to the {n} embedding rows"
            )
        self._pad(n)

    def _pad(self, n: int) -> None:
        for i in range(len(self.tokens), n):
            self.add(f"[PAD{i}]", -1000.0, gguf.TokenType.UNUSED)

    def add(self, text: str, score: float, token_type: int) -> None:
        self.tokens.append(text)
        self.scores.append(score)
        self.types.append(token_type)

    def declare_added(self, i: int, content: str, special: bool) -> None:
        """Token `i` as tokenizer_config.json's added_tokens_decoder declares it: CONTROL when
        marked special (ChatML's <|im_start|>, <|im_end|>), else USER_DEFINED, as llama.cpp's own
        converter does; ids past the SentencePiece model are appended."""
        if i >= len(self.tokens):
            self._pad(i)
            self.add(content, 0.0, gguf.TokenType.NORMAL)
        kinds = (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL)
        if self.tokens[i] == content and self.types[i] in kinds:
            self.types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        for add, value in (
            (writer.add_bos_token_id, self.bos_id),
            (writer.add_eos_token_id, self.eos_id),
            (writer.add_unk_token_id, self.unk_id),
            (writer.add_pad_token_id, self.pad_id),
            (writer.add_eot_token_id, self.eot_id),
        ):
            if value is not None:
                add(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _from_sentencepiece(path: Path) -> Vocab:
    try:
        spm = gguf.vocab.SentencePieceVocab(path)
    except (OSError, RuntimeError, ValueError) as e:
        raise DecoError(f"{path / 'tokenizer.model'}: cannot load the SentencePiece model ({e})") from None
    tokens, scores, types = [], [], []
    for text, score, toktype in spm.all_tokens():
        tokens.append(text.decode("utf-8"))
        scores.append(score)
        types.append(toktype)
    sp: SentencePieceProcessor = spm.sentencepiece_tokenizer
    ids = [i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())]
    return Vocab(tokens, scores, types, *ids)


def _from_tokenizer_json(path: Path) -> Vocab:
    data = read_json(path / "tokenizer.json")
    model = data.get("model") or {}
    kind = model.get("type")
    if kind == "Unigram":
        pairs = [(piece, float(score)) for piece, score in model["vocab"]]
        unk_id = model.get("unk_id")
    elif kind == "BPE" and model.get("byte_fallback"):
        by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise DecoError(f"{path / 'tokenizer.json'}: BPE vocabulary ids are not contiguous")
        # SentencePiece BPE merges higher scores first; the vocabulary is ordered by merge rank.
        pairs = [(piece, -float(i)) for piece, i in by_id]
        unk_id = next((i for piece, i in by_id if piece == model.get("unk_token")), None)
    else:
        raise DecoError(
            f"{path / 'tokenizer.json'}: unsupported tokenizer model {kind!r} "
            "(need a SentencePiece Unigram or BPE with byte fallback)"
        )
    tokens = [piece for piece, _ in pairs]
    types = [gguf.TokenType.BYTE if BYTE_PIECE.fullmatch(piece) else gguf.TokenType.NORMAL for piece in tokens]
    if unk_id is not None:
        types[unk_id] = gguf.TokenType.UNKNOWN
    for added in data.get("added_tokens", []):
        i = added["id"]
        if i >= len(tokens):
            raise DecoError(
                f"{path / 'tokenizer.json'}: added token {added['content']!r} has id {i} beyond the vocabulary"
            )
        tokens[i] = added["content"]
        if i != unk_id:
            types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    lookup = {piece: i for i, piece in enumerate(tokens)}
    return Vocab(tokens, [s for _, s in pairs], types, lookup.get("<s>"), lookup.get("</s>"), unk_id)


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_vocab(path: Path, raw_config: dict) -> Vocab:
    """The checkpoint's tokenizer, special tokens and chat template."""
    if (path / "tokenizer.model").is_file():
        vocab = _from_sentencepiece(path)
    elif (path / "tokenizer.json").is_file():
        vocab = _from_tokenizer_json(path)
    else:
        raise DecoError(f"{path}: no tokenizer (expected tokenizer.model or tokenizer.json)")

    tok_config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    decoder = tok_config.get("added_tokens_decoder") or {}
    declared = [
        (int(key), added)
        for key, added in decoder.items()
        if key.isdigit() and isinstance(added, dict) and isinstance(added.get("content"), str)
    ]
    limit = len(vocab.tokens) + len(declared)  # added tokens extend the model, they leave no wide gaps
    for i, added in sorted(declared, key=lambda item: item[0]):
        if i >= limit:
            raise DecoError(
                f"{path / 'tokenizer_config.json'}: added token {added['content']!r} has id {i}, "
                f"past the {limit} tokens of the tokenizer and its added tokens"
            )
        vocab.declare_added(i, added["content"], bool(added.get("special")))
    lookup = {piece: i for i, piece in enumerate(vocab.tokens)}
    for attr in ("bos", "eos", "unk", "pad"):
        content = _token_content(tok_config.get(f"{attr}_token"))
        if content is not None and content in lookup:
            setattr(vocab, f"{attr}_id", lookup[content])
    vocab.add_bos = bool(tok_config.get("add_bos_token", True))
    vocab.add_eos = bool(tok_config.get("add_eos_token", False))
    template = tok_config.get("chat_template")
    vocab.chat_template = template if isinstance(template, str) else None

    # config.json's ids are template values: compare, never trust (docs/deco.md, Released checkpoints).
    end_ids = {vocab.eos_id, vocab.eot_id} - {None}
    declared_eos = raw_config.get("eos_token_id")
    declared_eos = set(declared_eos) if isinstance(declared_eos, list) else {declared_eos} - {None}
    if declared_eos and not declared_eos <= end_ids:
        vocab.warnings.append(
            f"config.json eos_token_id={raw_config['eos_token_id']!r} disagrees with the tokenizer "
            f"({sorted(end_ids)}); using the tokenizer"
        )
    if raw_config.get("bos_token_id") not in (None, vocab.bos_id):
        vocab.warnings.append(
            f"config.json bos_token_id={raw_config['bos_token_id']!r} disagrees with the tokenizer "
            f"({vocab.bos_id}); using the tokenizer"
        )
    return vocab
