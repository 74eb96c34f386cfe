// The CPU backend's CPU_REPACK buffer as the DECO test tools use it (test-deco-ffn, bench-deco-ffn).
#pragma once

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-deco.h"

#include <cstring>

// the CPU_REPACK buffer type, if this build has one
inline ggml_backend_buffer_type_t deco_repack_buffer_type() {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
    for (ggml_backend_buffer_type_t * b = get_extra ? get_extra(dev) : nullptr; b && *b; ++b) {
        if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) return *b;
    }
    return nullptr;
}

// true if GGML_OP_DECO_MOE accepts expert weights of this type and shape in the CPU_REPACK buffer (the model
// loader's rule for placing them there: the backend's supports_op on the op with the weights in that buffer)
inline bool deco_repack_accepts(ggml_type type, int64_t d, int64_t De, int64_t E) {
    ggml_backend_buffer_type_t buft = deco_repack_buffer_type();
    if (!buft) return false;
    ggml_init_params ip = { 8 * ggml_tensor_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * up   = ggml_new_tensor_3d(ctx, type, d, De, E);
    ggml_tensor * down = ggml_new_tensor_3d(ctx, type, De, d, E);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
    ggml_tensor * x      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, d, 1);
    ggml_tensor * logits = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, E, 1);
    ggml_deco_moe_params p = { GGML_DECO_ACT_SILU, GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_NONE, GGML_DECO_BIAS_NONE, 1e-5f, 0, -1 };
    ggml_tensor * node = ggml_deco_moe(ctx, x, logits, up, nullptr, down, nullptr, nullptr, nullptr, nullptr, p);
    const bool ok = ggml_backend_dev_supports_op(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU), node);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return ok;
}
