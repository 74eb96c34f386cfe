#pragma once

#include "ggml.h"

struct ggml_compute_params;

#ifdef __cplusplus
extern "C" {
#endif

// work buffer bytes needed by a GGML_OP_DECO_MOE node (shared by all threads)
size_t ggml_cpu_deco_moe_wsize(const struct ggml_tensor * node, int n_threads);

// true if the CPU kernel handles this node's types and shapes
bool ggml_cpu_deco_moe_supported(const struct ggml_tensor * node);

void ggml_compute_forward_deco_moe(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#ifdef __cplusplus
}
#endif
