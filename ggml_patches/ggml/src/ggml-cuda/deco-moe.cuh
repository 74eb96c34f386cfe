#pragma once

#include "common.cuh"

// GGML_OP_DECO_MOE (see ggml/include/ggml-deco.h): one DECO expert layer, active experts only

// true if the CUDA kernels handle this node's types and shapes and read its expert weights where they are
// (weight_readable, see deco-moe-supported.h); else the scheduler runs it on the CPU. Always false in HIP/MUSA builds.
bool ggml_cuda_deco_moe_supported(const ggml_tensor * op, bool (*weight_readable)(ggml_backend_buffer_type_t));

void ggml_cuda_op_deco_moe(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
