#pragma once

// Flash decoding on the CPU: GGML_OP_FLASH_ATTN_EXT for a few query rows (decode, a speculative verification,
// a few chat slots) over the KV cache, at the speed the cache can be read (fa-decode.cpp).

#include "ggml-cpu-impl.h"

#ifdef __cplusplus
extern "C" {
#endif

// the work buffer this path needs for `op` on n_threads threads; 0 when the path does not take `op`
size_t ggml_cpu_fa_decode_work_size(const struct ggml_tensor * op, int n_threads);

// computes `dst` with every thread of the node and returns true, or returns false at once (same answer on every
// thread) when the path does not take it: then the caller computes it
bool ggml_cpu_fa_decode(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#ifdef __cplusplus
}
#endif
