// DECO sparse expert evaluation, backend-independent part: graph op constructor, validation and the router's
// decision for one token. The CPU kernel is in ggml-cpu/deco-moe.cpp.

#include "ggml-deco.h"
#include "ggml-backend.h"
#include "ggml-impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static bool deco_is_f32_vec(const struct ggml_tensor * t, int64_t n) {
    return t->type == GGML_TYPE_F32 && ggml_is_contiguous(t) && ggml_nelements(t) == n && t->ne[0] == n;
}

const char * ggml_deco_moe_check(
        const struct ggml_tensor * x,
        const struct ggml_tensor * logits,
        const struct ggml_tensor * up,
        const struct ggml_tensor * gate,
        const struct ggml_tensor * down,
        const struct ggml_tensor * mean,
        const struct ggml_tensor * norm,
        const struct ggml_tensor * scale,
        const struct ggml_tensor * bias,
        struct ggml_deco_moe_params p) {
    if (!x || !logits || !up || !down) {
        return "x, logits, up and down are required";
    }
    if ((int) p.act < 0 || p.act >= GGML_DECO_ACT_COUNT)                 return "invalid expert activation";
    if ((int) p.router_act < 0 || p.router_act >= GGML_DECO_ROUTER_COUNT) return "invalid router activation";
    if ((int) p.router_norm < 0 || p.router_norm >= GGML_DECO_RNORM_COUNT) return "invalid router norm";
    if ((int) p.bias_mode < 0 || p.bias_mode >= GGML_DECO_BIAS_COUNT)    return "invalid expert bias mode";
    if (!(p.eps >= 0.0f) || p.eps > 1.0f)                                 return "invalid eps";

    const int64_t d  = up->ne[0];
    const int64_t De = up->ne[1];
    const int64_t E  = up->ne[2];
    if (d <= 0 || De <= 0 || E <= 0 || up->ne[3] != 1)                    return "up must be [d, De, E]";
    if (down->ne[0] != De || down->ne[1] != d || down->ne[2] != E || down->ne[3] != 1) return "down must be [De, d, E]";
    if (gate && (gate->ne[0] != d || gate->ne[1] != De || gate->ne[2] != E || gate->ne[3] != 1)) return "gate must be [d, De, E]";
    if (gate && gate->type != up->type)                                   return "gate and up must have the same type";
    if (up->nb[0] != ggml_type_size(up->type) || down->nb[0] != ggml_type_size(down->type)) return "expert matrices must have contiguous rows";
    if (gate && gate->nb[0] != ggml_type_size(gate->type))                return "expert matrices must have contiguous rows";
    if (d  % ggml_blck_size(up->type)   != 0)                             return "d is not a multiple of the up/gate block size";
    if (De % ggml_blck_size(down->type) != 0)                             return "De is not a multiple of the down block size";
    if (x->type != GGML_TYPE_F32 || x->ne[0] != d || x->nb[0] != sizeof(float) || x->ne[2] != 1 || x->ne[3] != 1) return "x must be F32 [d, T]";
    if (logits->type != GGML_TYPE_F32 || logits->ne[0] != E || logits->ne[1] != x->ne[1] || logits->nb[0] != sizeof(float) ||
        logits->ne[2] != 1 || logits->ne[3] != 1)                         return "logits must be F32 [E, T]";

    const bool need_mean = ggml_deco_act_uses_mean(p.act);
    const bool need_norm = ggml_deco_act_uses_norm(p.act);
    if (need_mean != (mean != NULL))                                      return need_mean ? "activation needs the mean row" : "unexpected mean row";
    if (mean && !deco_is_f32_vec(mean, d))                                return "mean must be F32 [d]";
    if (need_norm != (norm != NULL))                                      return need_norm ? "activation needs the block norm weight" : "unexpected block norm weight";
    if (norm && !deco_is_f32_vec(norm, De))                               return "norm must be F32 [De]";
    const bool need_scale = p.router_norm != GGML_DECO_RNORM_NONE;
    if (need_scale != (scale != NULL))                                    return need_scale ? "router norm needs a scale" : "unexpected router scale";
    if (scale && !(deco_is_f32_vec(scale, E) || deco_is_f32_vec(scale, 1))) return "router scale must be F32 [E] or [1]";
    const bool need_bias = p.bias_mode != GGML_DECO_BIAS_NONE;
    if (need_bias != (bias != NULL))                                      return need_bias ? "bias mode needs an expert bias" : "unexpected expert bias";
    if (bias && !deco_is_f32_vec(bias, E))                                return "expert bias must be F32 [E]";
    return NULL;
}

struct ggml_tensor * ggml_deco_moe(
        struct ggml_context * ctx,
        struct ggml_tensor  * x,
        struct ggml_tensor  * logits,
        struct ggml_tensor  * up,
        struct ggml_tensor  * gate,
        struct ggml_tensor  * down,
        struct ggml_tensor  * mean,
        struct ggml_tensor  * norm,
        struct ggml_tensor  * scale,
        struct ggml_tensor  * bias,
        struct ggml_deco_moe_params p) {
    const char * err = ggml_deco_moe_check(x, logits, up, gate, down, mean, norm, scale, bias, p);
    if (err) {
        GGML_ABORT("ggml_deco_moe: %s", err);
    }

    struct ggml_tensor * result = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, up->ne[0], x->ne[1]);

    int32_t params[7];
    params[0] = (int32_t) p.act;
    params[1] = (int32_t) p.router_act;
    params[2] = (int32_t) p.router_norm;
    params[3] = (int32_t) p.bias_mode;
    memcpy(&params[4], &p.eps, sizeof(float));
    params[5] = p.flags;
    params[6] = p.layer;
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_DECO_MOE;
    result->src[0] = up;
    result->src[1] = down;
    result->src[2] = gate;
    result->src[3] = x;
    result->src[4] = logits;
    result->src[5] = mean;
    result->src[6] = norm;
    result->src[7] = scale;
    result->src[8] = bias;

    return result;
}

int64_t ggml_deco_moe_router_active(const struct ggml_deco_moe_params * p, int64_t n_expert, const float * raw,
                                    const float * bias, uint8_t * active) {
    // decided by the ReLU, optionally shifted by the expert bias; never by the learned scale
    float k = 1.0f;
    if (p->bias_mode == GGML_DECO_BIAS_RMS) {
        double ss = 0.0;
        for (int64_t e = 0; e < n_expert; ++e) ss += (double) raw[e] * raw[e];
        k = (float) sqrt(ss / (double) n_expert);
    }
    int64_t n_active = 0;
    for (int64_t e = 0; e < n_expert; ++e) {
        active[e] = p->bias_mode == GGML_DECO_BIAS_NONE ? raw[e] > 0.0f : raw[e] + bias[e] * k > 0.0f;
        n_active += active[e] && raw[e] > 0.0f; // a non-zero routed score (docs/deco.md, "DECO FFN")
    }
    return n_active;
}

struct ggml_deco_moe_params ggml_deco_moe_get_params(const struct ggml_tensor * op) {
    struct ggml_deco_moe_params p;
    const int32_t * params = (const int32_t *) op->op_params;
    p.act         = (enum ggml_deco_act)         params[0];
    p.router_act  = (enum ggml_deco_router_act)  params[1];
    p.router_norm = (enum ggml_deco_router_norm) params[2];
    p.bias_mode   = (enum ggml_deco_bias_mode)   params[3];
    memcpy(&p.eps, &params[4], sizeof(float));
    p.flags       = params[5];
    p.layer       = params[6];
    return p;
}

//
// expert activity collector (an eval callback)
//

static struct ggml_deco_layer_activity * deco_activity_layer(const struct ggml_deco_activity * activity,
                                                              const struct ggml_tensor * t) {
    if (activity == NULL || t->op != GGML_OP_DECO_MOE) {
        return NULL;
    }
    const int32_t layer = ggml_deco_moe_get_params(t).layer;
    return layer >= 0 && layer < activity->n_layers ? &activity->layers[layer] : NULL;
}

bool ggml_deco_activity_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    struct ggml_deco_layer_activity * counts = deco_activity_layer(user_data, t);
    if (ask) {
        return counts != NULL; // the nodes to look at: the DECO ops of counted layers
    }
    if (counts == NULL) {
        return true; // go on evaluating
    }
    const struct ggml_tensor * logits = t->src[4];
    const struct ggml_tensor * bias   = t->src[8];
    const struct ggml_deco_moe_params p = ggml_deco_moe_get_params(t);
    const int64_t n_expert = logits->ne[0];
    const int64_t n_tokens = logits->ne[1];

    // the logits and the bias may live on a device: copied to the host like llama-imatrix copies its inputs
    float   * raw    = malloc(ggml_nbytes(logits));
    float   * b      = bias ? malloc(ggml_nbytes(bias)) : NULL;
    uint8_t * active = malloc(n_expert);
    GGML_ASSERT(raw && (b || !bias) && active);
    ggml_backend_tensor_get(logits, raw, 0, ggml_nbytes(logits));
    if (bias) {
        ggml_backend_tensor_get(bias, b, 0, ggml_nbytes(bias));
    }
    for (int64_t i = 0; i < n_tokens; ++i) {
        const int64_t n = ggml_deco_moe_router_active(&p, n_expert, raw + i*(logits->nb[1]/sizeof(float)), b, active);
        counts->n_tokens  += 1;
        counts->n_active  += n;
        counts->min_active = counts->min_active < 0 || n < counts->min_active ? n : counts->min_active;
        counts->max_active = n > counts->max_active ? n : counts->max_active;
    }
    free(active);
    free(b);
    free(raw);
    return true;
}

