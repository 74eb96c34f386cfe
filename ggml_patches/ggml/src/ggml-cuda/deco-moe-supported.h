#pragma once

// Which GGML_OP_DECO_MOE nodes the CUDA kernels (deco-moe.cu) compute. Plain C++ without CUDA, so that where the
// model loader puts expert weights for a CUDA device can be checked on machines without a GPU
// (tests/test-deco-placement.cpp).

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <climits>
#include <cstdint>

// The op runs a batch in passes of at most this many tokens: the up (and gate) scratch of a pass holds
// tokens*E*De floats (256 MB at most) and a pass's token count is a grid dimension (y, at most 65535).
static constexpr int64_t ggml_cuda_deco_moe_max_scratch = (int64_t) 1 << 26; // floats

static inline int64_t ggml_cuda_deco_moe_pass_tokens(const int64_t T, const int64_t E, const int64_t De) {
    constexpr int64_t max_grid_y = 65535;
    return std::max<int64_t>(1, std::min({ T, max_grid_y, ggml_cuda_deco_moe_max_scratch / (E*De) }));
}

static inline bool ggml_cuda_deco_moe_type_supported(const ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q5_0: case GGML_TYPE_Q8_0:
            return true;
        default:
            return false;
    }
}

// weight_readable(buft): whether the device computes with a weight held in a buffer of that type, in place or after
// the scheduler copied it (for CUDA: its own buffers and host memory; not e.g. the CPU's repacked layouts, which
// have no get_tensor and only the CPU reads). Limits are the kernels' own and do not depend on the token count.
static inline bool ggml_cuda_deco_moe_supports(const ggml_tensor * op, bool (*weight_readable)(ggml_backend_buffer_type_t)) {
    const ggml_tensor * up     = op->src[0];
    const ggml_tensor * down   = op->src[1];
    const ggml_tensor * gate   = op->src[2];
    const ggml_tensor * x      = op->src[3];
    const ggml_tensor * logits = op->src[4];

    if (!ggml_cuda_deco_moe_type_supported(up->type) || !ggml_cuda_deco_moe_type_supported(down->type) ||
        (gate && !ggml_cuda_deco_moe_type_supported(gate->type))) {
        return false;
    }
    for (const ggml_tensor * w : { up, gate, down }) {
        if (w && (!ggml_is_contiguous(w) || (w->buffer && !weight_readable(ggml_backend_buffer_get_type(w->buffer))))) {
            return false;
        }
    }
    // rows are cut into whole units: whole weight blocks and q8_1 activation blocks, or element pairs
    const auto units_ok = [](const ggml_type type, const int64_t n) {
        return ggml_is_quantized(type) ? n % ggml_blck_size(type) == 0 && n % ggml_blck_size(GGML_TYPE_Q8_1) == 0
                                       : n % 2 == 0;
    };
    const int64_t d  = up->ne[0];
    const int64_t De = up->ne[1];
    const int64_t E  = up->ne[2];
    return units_ok(up->type, d) && (!gate || units_ok(gate->type, d)) && units_ok(down->type, De) &&
           x->type == GGML_TYPE_F32 && logits->type == GGML_TYPE_F32 && op->type == GGML_TYPE_F32 &&
           E <= 65535 && d <= INT_MAX/2 && De <= INT_MAX/2 && // grid y, int indices
           E*De <= ggml_cuda_deco_moe_max_scratch; // one token's scratch fits in a pass
}
