"""Running DECO GGUF files with the patched llama.cpp: the libraries (native), a loaded model (context) and
the expert activity it counts (activity), llama.cpp's tools (tools: quantize, imatrix), layers on other
machines (rpc), sampling, speculative decoding, the chat session, and what `--version` reports."""
