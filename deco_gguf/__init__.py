"""deco-gguf: GGUF quantized inference for DECO sparse mixture-of-experts models."""

__version__ = "0.1.0"
