"""The DECO model and its formats: the resolved hyperparameters (config), released HF checkpoints
(checkpoint), the tensor layout both share (layout), DECO GGUF files (gguf_file), the resource accounting
(accounting) and the PyTorch reference forward pass (reference)."""
