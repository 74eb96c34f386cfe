#pragma once

// DECO sparse expert evaluation (ReLU-routed MoE with a variable number of active experts).
//
// ggml_deco_moe() computes, for every token t (column of x):
//
//   raw    = logits[:, t]                                   (router output, F32, [E])
//   r      = relu(raw)            (or relu(raw)^2 for GGML_DECO_ROUTER_SQRELU)
//   active = raw > 0              (or raw + b*k > 0 with an expert bias, k = 1 | sqrt(mean(raw^2)))
//   s      = norm(r) masked by active   (norm: none | simple (r*w) | rms, see below)
//   for e with active_e and s_e != 0:
//       a_e = W_a[e] . x_t                   (W_a = gate if gated, else up; De rows)
//       z_e = act(a_e)                       (norm_silu: silu(rmsnorm(a_e - mean_t) * nw), ...)
//       v_e = z_e (* (W_up[e] . x_t) if gated)
//   y_t    = sum_e s_e * W_down[e] . v_e
//
// Only the active experts are read and computed (exact: inactive experts contribute 0).
// mean_t = w_mean . x_t, with w_mean the precomputed mean of all E*De rows of W_a.
//
// Shapes (ggml ne order):
//   up, gate : [d, De, E]   (any type with CPU vec_dot; d % block size == 0)
//   down     : [De, d, E]   (De % block size == 0)
//   x        : [d, T]       F32
//   logits   : [E, T]       F32
//   mean     : [d]          F32 (required for the mean-subtracting activations)
//   norm     : [De]         F32 (required for norm_silu, norm_silu_nomean)
//   scale    : [E] or [1]   F32 (required for the simple and rms router norms)
//   bias     : [E]          F32 (required when bias mode != none)
//   result   : [d, T]       F32

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

enum ggml_deco_act {
    GGML_DECO_ACT_NORM_SILU        = 0, // mean-subtract, block RMSNorm * weight, SiLU
    GGML_DECO_ACT_NORM_SILU_NOMEAN = 1, // block RMSNorm * weight, SiLU
    GGML_DECO_ACT_NORM_SILU_NORMS  = 2, // mean-subtract, SiLU
    GGML_DECO_ACT_SILU             = 3,
    GGML_DECO_ACT_RELU             = 4,
    GGML_DECO_ACT_COUNT,
};

// whether the activation subtracts the mean w_mean . x (the op then needs the `mean` row)
static inline bool ggml_deco_act_uses_mean(enum ggml_deco_act act) {
    return act == GGML_DECO_ACT_NORM_SILU || act == GGML_DECO_ACT_NORM_SILU_NORMS;
}

// whether the activation has a block RMSNorm (the op then needs the `norm` weight)
static inline bool ggml_deco_act_uses_norm(enum ggml_deco_act act) {
    return act == GGML_DECO_ACT_NORM_SILU || act == GGML_DECO_ACT_NORM_SILU_NOMEAN;
}

enum ggml_deco_router_act {
    GGML_DECO_ROUTER_RELU   = 0,
    GGML_DECO_ROUTER_SQRELU = 1,
    GGML_DECO_ROUTER_COUNT,
};

enum ggml_deco_router_norm {
    GGML_DECO_RNORM_NONE   = 0, // s = r
    GGML_DECO_RNORM_SIMPLE = 1, // s = r * w          (w: [E] or [1])
    GGML_DECO_RNORM_RMS    = 2, // s = r / sqrt(mean_E(r^2) + eps) * w
    // (DECO's `normal` norm subtracts mean_E(r) first, which gives inactive experts non-zero scores: not sparse)
    GGML_DECO_RNORM_COUNT,
};

enum ggml_deco_bias_mode {
    GGML_DECO_BIAS_NONE = 0,
    GGML_DECO_BIAS_BASE = 1,    // active <=> raw + b > 0
    GGML_DECO_BIAS_RMS  = 2,    // active <=> raw + b * sqrt(mean_E(raw^2)) > 0
    GGML_DECO_BIAS_COUNT,
};

enum ggml_deco_flags {
    GGML_DECO_FLAG_DENSE = 1,   // evaluate every expert (inactive ones with weight 0): same result, dense cost
};

struct ggml_deco_moe_params {
    enum ggml_deco_act         act;
    enum ggml_deco_router_act  router_act;
    enum ggml_deco_router_norm router_norm;
    enum ggml_deco_bias_mode   bias_mode;
    float                      eps;     // block RMSNorm eps and rms router-norm eps
    int32_t                    flags;   // enum ggml_deco_flags
    int32_t                    layer;   // model layer, -1: none (the op ignores it; the eval callback counting activity reads it)
};

// op params layout (int32 slots): 0 act, 1 router_act, 2 router_norm, 3 bias_mode, 4 eps (f32), 5 flags, 6 layer
// src layout: 0 up, 1 down, 2 gate, 3 x, 4 logits, 5 mean, 6 norm, 7 scale, 8 bias
GGML_API struct ggml_tensor * ggml_deco_moe(
        struct ggml_context * ctx,
        struct ggml_tensor  * x,
        struct ggml_tensor  * logits,
        struct ggml_tensor  * up,
        struct ggml_tensor  * gate,     // NULL unless gated
        struct ggml_tensor  * down,
        struct ggml_tensor  * mean,     // NULL unless the activation subtracts the mean
        struct ggml_tensor  * norm,     // NULL unless the activation has a block RMSNorm
        struct ggml_tensor  * scale,    // NULL for GGML_DECO_RNORM_NONE
        struct ggml_tensor  * bias,     // NULL for GGML_DECO_BIAS_NONE
        struct ggml_deco_moe_params params);

// returns NULL if the arguments are valid for ggml_deco_moe, else a static description of the problem
GGML_API const char * ggml_deco_moe_check(
        const struct ggml_tensor * x,
        const struct ggml_tensor * logits,
        const struct ggml_tensor * up,
        const struct ggml_tensor * gate,
        const struct ggml_tensor * down,
        const struct ggml_tensor * mean,
        const struct ggml_tensor * norm,
        const struct ggml_tensor * scale,
        const struct ggml_tensor * bias,
        struct ggml_deco_moe_params params);

GGML_API struct ggml_deco_moe_params ggml_deco_moe_get_params(const struct ggml_tensor * op);

// the router's decision for one token (raw: its [E] logits; bias: [E], only read with an expert bias):
// active[e] = raw[e] > 0, or raw[e] + b[e]*k > 0 with an expert bias; returns how many active experts also
// have raw[e] > 0, i.e. a non-zero routed score: the experts the op computes for the token. Shared by the CPU
// op and tools that follow the routing (llama-imatrix).
GGML_API int64_t ggml_deco_moe_router_active(const struct ggml_deco_moe_params * p, int64_t n_expert, const float * raw,
                                             const float * bias, uint8_t * active);

//
// expert activity, counted outside the op by whoever asks for it: a context that wants its own per-layer counts
// passes ggml_deco_activity_eval as its scheduler's eval callback (llama_context_params.cb_eval) with a
// ggml_deco_activity it owns as the user data. After each evaluated GGML_OP_DECO_MOE node of a layer in range
// the callback recounts the router's decision from the node's logits (ggml_deco_moe_router_active, so dense
// evaluation counts the same) and adds it to that layer. Nothing is shared between contexts or kept by ggml.
//
struct ggml_deco_layer_activity {
    int64_t n_tokens;   // tokens routed through the layer
    int64_t n_active;   // experts with a non-zero routed score, summed over those tokens
    int64_t min_active; // fewest of one token, -1 before the first token
    int64_t max_active; // most of one token
};

struct ggml_deco_activity {
    int32_t                           n_layers; // length of layers
    struct ggml_deco_layer_activity * layers;   // indexed by the op's layer param
};

// a ggml_backend_sched_eval_callback; user_data: struct ggml_deco_activity *
GGML_API bool ggml_deco_activity_eval(struct ggml_tensor * t, bool ask, void * user_data);

#ifdef __cplusplus
}
#endif
