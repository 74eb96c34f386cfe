"""HF DECO checkpoints -> GGUF."""

from .convert import EXPERT_TYPES, OUT_TYPES, DecoConverter, convert

__all__ = ["convert", "DecoConverter", "OUT_TYPES", "EXPERT_TYPES"]
