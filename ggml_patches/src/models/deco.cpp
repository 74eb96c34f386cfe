#include "deco.h"

#include "llama-impl.h"
#include "llama-model-saver.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

//
// hyperparameters
//

[[noreturn]] static void deco_fail(const std::string & msg) {
    throw std::runtime_error("deco: " + msg);
}

// the values of the deco.* string keys (docs/gguf-format.md) and the op's enums they select
template <typename E> using deco_names = std::vector<std::pair<const char *, E>>;

static const deco_names<ggml_deco_act> DECO_EXPERT_ACTIVATIONS = {
    {"norm_silu",        GGML_DECO_ACT_NORM_SILU},
    {"norm_silu_nomean", GGML_DECO_ACT_NORM_SILU_NOMEAN},
    {"norm_silu_norms",  GGML_DECO_ACT_NORM_SILU_NORMS},
    {"silu",             GGML_DECO_ACT_SILU},
    {"relu",             GGML_DECO_ACT_RELU},
};
static const deco_names<ggml_deco_router_act> DECO_ROUTER_ACTIVATIONS = {
    {"relu",   GGML_DECO_ROUTER_RELU},
    {"sqrelu", GGML_DECO_ROUTER_SQRELU},
};
static const deco_names<ggml_deco_router_norm> DECO_ROUTER_NORMS = {
    {"none",   GGML_DECO_RNORM_NONE},
    {"simple", GGML_DECO_RNORM_SIMPLE},
    {"rms",    GGML_DECO_RNORM_RMS},
};
static const deco_names<llama_deco_ffn_mode> DECO_FFN_MODES = {
    {"sparse", LLAMA_DECO_FFN_SPARSE},
    {"dense",  LLAMA_DECO_FFN_DENSE},
    {"ops",    LLAMA_DECO_FFN_OPS},
};
static const deco_names<ggml_deco_bias_mode> DECO_EXPERT_BIASES = {
    {"none", GGML_DECO_BIAS_NONE},
    {"base", GGML_DECO_BIAS_BASE},
    {"rms",  GGML_DECO_BIAS_RMS},
};

template <typename E>
static E deco_parse_enum(const std::string & key, const std::string & value, const deco_names<E> & names) {
    std::string valid;
    for (const auto & [name, v] : names) {
        if (value == name) {
            return v;
        }
        valid += valid.empty() ? "" : ", ";
        valid += name;
    }
    deco_fail(format("%s = '%s' is not supported (expected one of: %s)", key.c_str(), value.c_str(), valid.c_str()));
}

template <typename E>
static const char * deco_enum_name(const deco_names<E> & names, E value) {
    for (const auto & [name, v] : names) {
        if (v == value) {
            return name;
        }
    }
    GGML_ABORT("deco: no name for enum value %d", (int) value);
}

static bool deco_finite(float x) {
    return std::isfinite(x);
}

// The released shapes (docs/deco.md, Released checkpoints and their config.json); the class names N, the
// non-embedding parameters (DECO-0.1B has N = 109M).
static llm_type deco_model_type(const llama_hparams & hparams) {
    switch (hparams.n_layer()) {
        case 16: return hparams.n_embd == 768  ? LLM_TYPE_109M : LLM_TYPE_UNKNOWN;
        case 27: return hparams.n_embd == 1280 ? LLM_TYPE_0_5B : LLM_TYPE_UNKNOWN;
        default: return LLM_TYPE_UNKNOWN;
    }
}

void llama_model_deco::load_arch_hparams(llama_model_loader & ml) {
    load_ffn_mode(ml);
    load_width_and_eps(ml);
    check_attention();
    load_expert_widths(ml);
    load_moe_layers(ml);
    load_ffn_variant(ml);
    load_mup_scales(ml);
    load_context_and_vocab(ml);
    type = deco_model_type(hparams);
}

// how this model evaluates DECO FFN layers: the deco.ffn_mode override (never in a file), else DECO_FFN
void llama_model_deco::load_ffn_mode(llama_model_loader & ml) {
    const auto kv = LLM_KV(arch);
    std::string mode;
    if (!ml.get_key(LLM_KV_DECO_FFN_MODE, mode, false)) {
        const char * env = getenv("DECO_FFN");
        mode = env != nullptr && *env != '\0' ? env : "sparse";
    }
    ffn_mode = deco_parse_enum(kv(LLM_KV_DECO_FFN_MODE) + " (or DECO_FFN)", mode, DECO_FFN_MODES);
}

void llama_model_deco::load_width_and_eps(llama_model_loader & ml) {
    const auto kv = LLM_KV(arch);
    if (hparams.n_layer_nextn != 0) {
        deco_fail("nextn layers are not supported");
    }
    if (hparams.n_embd == 0 || hparams.n_embd > (1u << 20)) {
        deco_fail(format("invalid embedding_length %u", hparams.n_embd));
    }

    ml.get_key(LLM_KV_ATTENTION_LAYERNORM_RMS_EPS, hparams.f_norm_rms_eps);
    if (!(hparams.f_norm_rms_eps > 0.0f) || !deco_finite(hparams.f_norm_rms_eps) || hparams.f_norm_rms_eps > 1.0f) {
        deco_fail(format("invalid %s = %g", kv(LLM_KV_ATTENTION_LAYERNORM_RMS_EPS).c_str(), hparams.f_norm_rms_eps));
    }
}

// attention geometry: heads, KV groups, head_dim; NeoX rope over the whole head
void llama_model_deco::check_attention() const {
    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        const uint32_t nh = hparams.n_head(il), nkv = hparams.n_head_kv(il);
        if (nh == 0 || nh > 4096 || nkv == 0 || nh % nkv != 0) {
            deco_fail(format("layer %u: invalid head_count %u / head_count_kv %u (head_count must be a positive multiple of head_count_kv)", il, nh, nkv));
        }
    }
    const uint32_t hd = hparams.n_embd_head_k_full;
    if (hd == 0 || hd > 4096 || hd % 2 != 0 || hparams.n_embd_head_v_full != hd) {
        deco_fail(format("invalid head_dim (key_length %u, value_length %u): must be equal, even and positive",
                hparams.n_embd_head_k_full, hparams.n_embd_head_v_full));
    }
    if (hparams.n_rot_full != hd) {
        deco_fail(format("rope.dimension_count %u must equal head_dim %u (rope covers the whole head)", hparams.n_rot_full, hd));
    }
    if (!(hparams.rope_freq_base_train > 0.0f) || !deco_finite(hparams.rope_freq_base_train)) {
        deco_fail(format("invalid rope.freq_base %g", hparams.rope_freq_base_train));
    }
}

// experts: De, and Ds of the shared expert
void llama_model_deco::load_expert_widths(llama_model_loader & ml) {
    ml.get_key(LLM_KV_EXPERT_FEED_FORWARD_LENGTH, n_ff_exp);
    if (n_ff_exp == 0 || n_ff_exp > (1u << 16)) {
        deco_fail(format("invalid expert_feed_forward_length %u", n_ff_exp));
    }
    ml.get_key(LLM_KV_EXPERT_SHARED_FEED_FORWARD_LENGTH, n_ff_shexp, false);
    if (n_ff_shexp > (1u << 20)) {
        deco_fail(format("invalid expert_shared_feed_forward_length %u", n_ff_shexp));
    }
    hparams.n_ff_shexp = n_ff_shexp;
    std::fill(hparams.n_ff_exp_arr.begin(), hparams.n_ff_exp_arr.end(), n_ff_exp);
}

// which layers are DECO FFN layers; the dense ones need a width
void llama_model_deco::load_moe_layers(llama_model_loader & ml) {
    const auto kv = LLM_KV(arch);
    const uint32_t n_layer = hparams.n_layer();
    std::vector<int32_t> mask;
    ml.get_arr(LLM_KV_DECO_MOE_LAYER_MASK, mask, true);
    if (mask.size() != n_layer) {
        deco_fail(format("%s has %zu entries, expected block_count = %u", kv(LLM_KV_DECO_MOE_LAYER_MASK).c_str(), mask.size(), n_layer));
    }
    for (uint32_t il = 0; il < n_layer; ++il) {
        if (mask[il] != 0 && mask[il] != 1) {
            deco_fail(format("%s[%u] = %d, expected 0 or 1", kv(LLM_KV_DECO_MOE_LAYER_MASK).c_str(), il, mask[il]));
        }
        moe_layer[il] = mask[il];
    }
    for (uint32_t il = 0; il < n_layer; ++il) {
        const uint32_t ff = hparams.n_ff(il);
        if (moe_layer[il] == 0 && (ff == 0 || ff > (1u << 20))) {
            deco_fail(format("layer %u is dense but feed_forward_length is %u", il, ff));
        }
    }
}

// the variant of the DECO FFN (docs/deco.md, DECO FFN): gated experts, expert activation, router activation and
// norm, expert bias
void llama_model_deco::load_ffn_variant(llama_model_loader & ml) {
    const auto kv = LLM_KV(arch);
    ml.get_key(LLM_KV_DECO_EXPERT_GATED, expert_gated);

    std::string s;
    ml.get_key(LLM_KV_DECO_EXPERT_ACTIVATION, s);
    expert_act = deco_parse_enum(kv(LLM_KV_DECO_EXPERT_ACTIVATION), s, DECO_EXPERT_ACTIVATIONS);
    ml.get_key(LLM_KV_DECO_ROUTER_ACTIVATION, s);
    router_act = deco_parse_enum(kv(LLM_KV_DECO_ROUTER_ACTIVATION), s, DECO_ROUTER_ACTIVATIONS);
    ml.get_key(LLM_KV_DECO_ROUTER_NORM, s);
    if (s == "normal") {
        // mean-subtracting router norm gives inactive experts non-zero scores (docs/deco.md, DECO FFN): such a
        // model is not sparse, and the converter refuses it too
        deco_fail(format("%s = 'normal' is not supported: it gives inactive experts non-zero scores, the model is not sparse",
                kv(LLM_KV_DECO_ROUTER_NORM).c_str()));
    }
    router_norm = deco_parse_enum(kv(LLM_KV_DECO_ROUTER_NORM), s, DECO_ROUTER_NORMS);
    ml.get_key(LLM_KV_DECO_EXPERT_BIAS, s);
    bias_mode = deco_parse_enum(kv(LLM_KV_DECO_EXPERT_BIAS), s, DECO_EXPERT_BIASES);
}

// mup scales (1 unless use_mup)
void llama_model_deco::load_mup_scales(llama_model_loader & ml) {
    hparams.f_embedding_scale = 1.0f;
    hparams.f_residual_scale  = 1.0f;
    hparams.f_logit_scale     = 1.0f;
    ml.get_key(LLM_KV_EMBEDDING_SCALE, hparams.f_embedding_scale, false);
    ml.get_key(LLM_KV_RESIDUAL_SCALE,  hparams.f_residual_scale,  false);
    ml.get_key(LLM_KV_LOGIT_SCALE,     hparams.f_logit_scale,     false);
    if (!deco_finite(hparams.f_embedding_scale) || !deco_finite(hparams.f_residual_scale) ||
        !deco_finite(hparams.f_logit_scale) || hparams.f_logit_scale == 0.0f) {
        deco_fail(format("invalid mup scales (embedding %g, residual %g, logit %g)",
                hparams.f_embedding_scale, hparams.f_residual_scale, hparams.f_logit_scale));
    }
}

void llama_model_deco::load_context_and_vocab(llama_model_loader & ml) {
    if (hparams.n_ctx_train == 0) {
        deco_fail("context_length is 0");
    }
    n_vocab_kv = 0;
    if (ml.get_key(LLM_KV_VOCAB_SIZE, n_vocab_kv, false) && n_vocab_kv == 0) {
        deco_fail("vocab_size is 0");
    }
}

//
// tensors
//

static void deco_require_f32(const ggml_tensor * t, const char * what) {
    if (t && t->type != GGML_TYPE_F32) {
        deco_fail(format("tensor '%s' (%s) must be F32, got %s", t->name, what, ggml_type_name(t->type)));
    }
}

static bool deco_type_ok_for_experts(ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q2_K:
        case GGML_TYPE_Q3_K:
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K:
        case GGML_TYPE_Q6_K:
        case GGML_TYPE_IQ4_NL:
        case GGML_TYPE_IQ4_XS:
            return true;
        default:
            return false;
    }
}

void llama_model_deco::load_arch_tensors(llama_model_loader & ml_) {
    LLAMA_LOAD_LOCALS;

    const int64_t n_ff_exp_  = n_ff_exp;
    const int64_t n_ff_shexp_ = n_ff_shexp;

    if (n_vocab_kv != 0 && (int64_t) n_vocab_kv != n_vocab) {
        deco_fail(format("vocab_size %u does not match the tokenizer's %lld tokens", n_vocab_kv, (long long) n_vocab));
    }
    tok_embd = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, 0);

    output_norm = create_tensor(tn(LLM_TENSOR_OUTPUT_NORM, "weight"), {n_embd}, 0);
    output      = create_tensor(tn(LLM_TENSOR_OUTPUT,      "weight"), {n_embd, n_vocab}, TENSOR_NOT_REQUIRED);
    if (output == nullptr) {
        // tied embeddings
        output = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, TENSOR_DUPLICATED);
    }
    deco_require_f32(output_norm, "output norm");

    for (int il = 0; il < n_layer; ++il) {
        auto & layer = layers[il];
        auto & dl    = deco_layers[il];

        const int64_t n_head_l    = hparams.n_head(il);
        const int64_t n_embd_q_l  = n_embd_head_k * n_head_l;
        const int64_t n_embd_kv_l = n_embd_head_k * hparams.n_head_kv(il);

        layer.attn_norm = create_tensor(tn(LLM_TENSOR_ATTN_NORM, "weight", il), {n_embd}, 0);
        layer.wq = create_tensor(tn(LLM_TENSOR_ATTN_Q,   "weight", il), {n_embd, n_embd_q_l},  0);
        layer.wk = create_tensor(tn(LLM_TENSOR_ATTN_K,   "weight", il), {n_embd, n_embd_kv_l}, 0);
        layer.wv = create_tensor(tn(LLM_TENSOR_ATTN_V,   "weight", il), {n_embd, n_embd_kv_l}, 0);
        layer.wo = create_tensor(tn(LLM_TENSOR_ATTN_OUT, "weight", il), {n_embd_q_l, n_embd}, 0);
        layer.ffn_norm = create_tensor(tn(LLM_TENSOR_FFN_NORM, "weight", il), {n_embd}, 0);
        deco_require_f32(layer.attn_norm, "attention norm");
        deco_require_f32(layer.ffn_norm,  "ffn norm");

        if (!moe_layer[il]) {
            const int64_t ff = hparams.n_ff(il);
            layer.ffn_gate = create_tensor(tn(LLM_TENSOR_FFN_GATE, "weight", il), {n_embd, ff}, 0);
            layer.ffn_up   = create_tensor(tn(LLM_TENSOR_FFN_UP,   "weight", il), {n_embd, ff}, 0);
            layer.ffn_down = create_tensor(tn(LLM_TENSOR_FFN_DOWN, "weight", il), {ff, n_embd}, 0);
            continue;
        }

        layer.ffn_gate_inp = create_tensor(tn(LLM_TENSOR_FFN_GATE_INP, "weight", il), {n_embd, n_expert}, 0);
        deco_require_f32(layer.ffn_gate_inp, "router");

        {
            // expert-wise [E] or scalar [1] router scale; with router_norm 'none' a scale tensor may still be
            // present in the file: it is skipped
            const std::string sname = tn(LLM_TENSOR_DECO_ROUTER_SCALE, "weight", il).str();
            const ggml_tensor * meta = ml_.get_tensor_meta(sname.c_str());
            const int64_t n_scale = meta && ggml_nelements(meta) == 1 ? 1 : n_expert;
            if (router_norm != GGML_DECO_RNORM_NONE) {
                dl.router_scale = create_tensor(tn(LLM_TENSOR_DECO_ROUTER_SCALE, "weight", il), {n_scale}, 0);
                deco_require_f32(dl.router_scale, "router scale");
            } else if (meta) {
                create_tensor(tn(LLM_TENSOR_DECO_ROUTER_SCALE, "weight", il), {n_scale}, TENSOR_SKIP);
            }
        }
        if (bias_mode != GGML_DECO_BIAS_NONE) {
            layer.ffn_exp_probs_b = create_tensor(tn(LLM_TENSOR_FFN_EXP_PROBS_B, "bias", il), {n_expert}, 0);
            deco_require_f32(layer.ffn_exp_probs_b, "expert bias");
        }

        layer.ffn_up_exps   = create_tensor(tn(LLM_TENSOR_DECO_UP_EXPS,   "weight", il), {n_embd, n_ff_exp_, n_expert}, 0);
        if (expert_gated) {
            layer.ffn_gate_exps = create_tensor(tn(LLM_TENSOR_DECO_GATE_EXPS, "weight", il), {n_embd, n_ff_exp_, n_expert}, 0);
        }
        layer.ffn_down_exps = create_tensor(tn(LLM_TENSOR_DECO_DOWN_EXPS, "weight", il), {n_ff_exp_, n_embd, n_expert}, 0);

        if (ggml_deco_act_uses_mean(expert_act)) {
            dl.exps_mean = create_tensor(tn(LLM_TENSOR_DECO_EXPS_MEAN, "weight", il), {n_embd}, 0);
            deco_require_f32(dl.exps_mean, "expert mean row");
        }
        if (ggml_deco_act_uses_norm(expert_act)) {
            dl.exps_norm = create_tensor(tn(LLM_TENSOR_DECO_EXPS_NORM, "weight", il), {n_ff_exp_}, 0);
            deco_require_f32(dl.exps_norm, "expert block norm");
        }

        for (const ggml_tensor * w : { layer.ffn_up_exps, layer.ffn_gate_exps, layer.ffn_down_exps }) {
            if (w && !deco_type_ok_for_experts(w->type)) {
                deco_fail(format("tensor '%s' has unsupported expert type %s", w->name, ggml_type_name(w->type)));
            }
        }
        if (layer.ffn_gate_exps && layer.ffn_gate_exps->type != layer.ffn_up_exps->type) {
            deco_fail(format("layer %d: ffn_gate_exps (%s) and ffn_up_exps (%s) must have the same type", il,
                    ggml_type_name(layer.ffn_gate_exps->type), ggml_type_name(layer.ffn_up_exps->type)));
        }
        if (n_embd % ggml_blck_size(layer.ffn_up_exps->type) != 0) {
            deco_fail(format("layer %d: embedding_length %lld is not a multiple of the %s block size", il,
                    (long long) n_embd, ggml_type_name(layer.ffn_up_exps->type)));
        }
        if (n_ff_exp_ % ggml_blck_size(layer.ffn_down_exps->type) != 0) {
            deco_fail(format("layer %d: expert_feed_forward_length %lld is not a multiple of the %s block size of ffn_down_exps", il,
                    (long long) n_ff_exp_, ggml_type_name(layer.ffn_down_exps->type)));
        }

        if (n_ff_shexp_ > 0) {
            layer.ffn_gate_shexp = create_tensor(tn(LLM_TENSOR_FFN_GATE_SHEXP, "weight", il), {n_embd, n_ff_shexp_}, 0);
            layer.ffn_up_shexp   = create_tensor(tn(LLM_TENSOR_FFN_UP_SHEXP,   "weight", il), {n_embd, n_ff_shexp_}, 0);
            layer.ffn_down_shexp = create_tensor(tn(LLM_TENSOR_FFN_DOWN_SHEXP, "weight", il), {n_ff_shexp_, n_embd}, 0);
        }
    }
}

//
// saving (llama_model_save_to_file): the deco.* keys and tensors beside the common ones
//

void llama_model_deco::save_arch_kv(llama_model_saver & ms) const {
    ms.add_kv(LLM_KV_DECO_MOE_LAYER_MASK, std::vector<uint32_t>(moe_layer.begin(), moe_layer.begin() + hparams.n_layer()));
    ms.add_kv(LLM_KV_DECO_EXPERT_GATED, expert_gated);
    ms.add_kv(LLM_KV_DECO_EXPERT_ACTIVATION, deco_enum_name(DECO_EXPERT_ACTIVATIONS, expert_act));
    ms.add_kv(LLM_KV_DECO_ROUTER_ACTIVATION, deco_enum_name(DECO_ROUTER_ACTIVATIONS, router_act));
    ms.add_kv(LLM_KV_DECO_ROUTER_NORM, deco_enum_name(DECO_ROUTER_NORMS, router_norm));
    ms.add_kv(LLM_KV_DECO_EXPERT_BIAS, deco_enum_name(DECO_EXPERT_BIASES, bias_mode));
}

void llama_model_deco::save_arch_tensors(llama_model_saver & ms) const {
    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        ms.add_tensor(deco_layers[il].router_scale);
        ms.add_tensor(deco_layers[il].exps_mean);
        ms.add_tensor(deco_layers[il].exps_norm);
    }
}

std::unique_ptr<llm_graph_context> llama_model_deco::build_arch_graph(const llm_graph_params & params) const {
    return std::make_unique<graph>(*this, params);
}

//
// graph
//

llama_model_deco::graph::graph(const llama_model & model_base, const llm_graph_params & params) : llm_graph_context(params) {
    const auto & model = static_cast<const llama_model_deco &>(model_base);
    const int64_t n_embd_head = hparams.n_embd_head_v();

    GGML_ASSERT(n_embd_head == hparams.n_embd_head_k());
    GGML_ASSERT(n_embd_head == n_rot);

    const llama_deco_ffn_mode mode = model.ffn_mode;

    ggml_tensor * cur;
    // build_inp_embd applies hparams.f_embedding_scale (mup)
    ggml_tensor * inpL = build_inp_embd(model.tok_embd);

    ggml_tensor * inp_pos = build_inp_pos();
    auto * inp_attn = build_attn_inp_kv();
    ggml_tensor * inp_out_ids = build_inp_out_ids();

    const float kq_scale = 1.0f/sqrtf(float(n_embd_head));

    for (int il = 0; il < n_layer; ++il) {
        const auto & layer = model.layers[il];
        ggml_tensor * inpSA = inpL;

        cur = build_norm(inpL, layer.attn_norm, NULL, LLM_NORM_RMS, il);
        cb(cur, "attn_norm", il);

        {
            auto [Qcur, Kcur, Vcur] = build_qkv(layer, cur, n_embd_head, hparams.n_head(il), hparams.n_head_kv(il), il);

            Qcur = ggml_rope_ext(ctx0, Qcur, inp_pos, nullptr,
                    n_rot, rope_type, n_ctx_orig, freq_base, freq_scale,
                    ext_factor, attn_factor, beta_fast, beta_slow);
            Kcur = ggml_rope_ext(ctx0, Kcur, inp_pos, nullptr,
                    n_rot, rope_type, n_ctx_orig, freq_base, freq_scale,
                    ext_factor, attn_factor, beta_fast, beta_slow);
            cb(Qcur, "Qcur", il);
            cb(Kcur, "Kcur", il);
            cb(Vcur, "Vcur", il);

            cur = build_attn(inp_attn, layer.wo, nullptr, nullptr,
                    Qcur, Kcur, Vcur, nullptr, nullptr, nullptr, kq_scale, il);
        }

        if (il == n_layer - 1 && inp_out_ids) {
            cur   = ggml_get_rows(ctx0,   cur, inp_out_ids);
            inpSA = ggml_get_rows(ctx0, inpSA, inp_out_ids);
        }

        if (hparams.f_residual_scale != 1.0f) {
            cur = ggml_scale(ctx0, cur, hparams.f_residual_scale);
        }
        ggml_tensor * ffn_inp = ggml_add(ctx0, cur, inpSA);
        cb(ffn_inp, "ffn_inp", il);

        cur = build_norm(ffn_inp, layer.ffn_norm, NULL, LLM_NORM_RMS, il);
        cb(cur, "ffn_norm", il);

        if (!model.moe_layer[il]) {
            cur = build_ffn(cur,
                    layer.ffn_up,   NULL, NULL,
                    layer.ffn_gate, NULL, NULL,
                    layer.ffn_down, NULL, NULL,
                    NULL,
                    LLM_FFN_SILU, LLM_FFN_PAR, il);
            cb(cur, "ffn_out", il);
        } else {
            cur = build_deco_ffn(model, cur, il, mode);
        }

        if (hparams.f_residual_scale != 1.0f) {
            cur = ggml_scale(ctx0, cur, hparams.f_residual_scale);
        }
        cur = ggml_add(ctx0, cur, ffn_inp);

        cur = build_cvec(cur, il);
        cb(cur, "l_out", il);

        inpL = cur;
    }
    cur = inpL;

    cur = build_norm(cur, model.output_norm, NULL, LLM_NORM_RMS, -1);
    cb(cur, "result_norm", -1);
    res->t_embd = cur;

    cur = build_lora_mm(model.output, cur);
    if (hparams.f_logit_scale != 1.0f) {
        cur = ggml_scale(ctx0, cur, 1.0f / hparams.f_logit_scale);
    }
    cb(cur, "result_output", -1);
    res->t_logits = cur;

    ggml_build_forward_expand(gf, cur);
}

ggml_tensor * llama_model_deco::graph::build_deco_ffn(const llama_model_deco & model, ggml_tensor * cur, int il, llama_deco_ffn_mode mode) {
    const auto & layer = model.layers[il];
    const auto & dl    = model.deco_layers[il];

    // router logits in F32 (the router weight is F32)
    ggml_tensor * logits = ggml_mul_mat(ctx0, layer.ffn_gate_inp, cur);
    cb(logits, "ffn_moe_logits", il);

    ggml_tensor * moe_out;
    if (mode == LLAMA_DECO_FFN_OPS) {
        moe_out = build_deco_ffn_ops(model, cur, logits, il);
    } else {
        ggml_deco_moe_params p;
        p.act         = model.expert_act;
        p.router_act  = model.router_act;
        p.router_norm = model.router_norm;
        p.bias_mode   = model.bias_mode;
        p.eps         = hparams.f_norm_rms_eps;
        p.flags       = mode == LLAMA_DECO_FFN_DENSE ? GGML_DECO_FLAG_DENSE : 0;
        p.layer       = il;
        moe_out = ggml_deco_moe(ctx0, cur, logits,
                layer.ffn_up_exps, layer.ffn_gate_exps, layer.ffn_down_exps,
                dl.exps_mean, dl.exps_norm, dl.router_scale, layer.ffn_exp_probs_b, p);
    }
    cb(moe_out, "ffn_moe_out", il);

    if (layer.ffn_up_shexp) {
        ggml_tensor * sh = build_ffn(cur,
                layer.ffn_up_shexp,   NULL, NULL,
                layer.ffn_gate_shexp, NULL, NULL,
                layer.ffn_down_shexp, NULL, NULL,
                NULL,
                LLM_FFN_SILU, LLM_FFN_PAR, il);
        cb(sh, "ffn_shexp", il);
        moe_out = ggml_add(ctx0, moe_out, sh);
    }
    cb(moe_out, "ffn_out", il);
    return moe_out;
}

// Dense reference with stock ggml ops: stock MoE evaluation (mul_mat_id) with every expert selected, inactive
// ones weighted by 0. The selection order is the router's ranking (argsort), which sums the same terms.
ggml_tensor * llama_model_deco::graph::build_deco_ffn_ops(const llama_model_deco & model, ggml_tensor * cur, ggml_tensor * logits, int il) {
    const auto & layer = model.layers[il];
    const auto & dl    = model.deco_layers[il];

    const int64_t d  = cur->ne[0];
    const int64_t T  = cur->ne[1];
    const int64_t E  = layer.ffn_up_exps->ne[2];
    const float eps  = hparams.f_norm_rms_eps;

    // ---- routing: s = norm(relu(raw) masked by activity), masked again
    ggml_tensor * mask;
    switch (model.bias_mode) {
        case GGML_DECO_BIAS_NONE:
            mask = ggml_step(ctx0, logits);
            break;
        case GGML_DECO_BIAS_BASE:
            mask = ggml_step(ctx0, ggml_add(ctx0, logits, layer.ffn_exp_probs_b));
            break;
        case GGML_DECO_BIAS_RMS:
        default: {
            ggml_tensor * k = ggml_sqrt(ctx0, ggml_mean(ctx0, ggml_sqr(ctx0, logits)));        // [1, T]
            ggml_tensor * bk = ggml_mul(ctx0, ggml_repeat(ctx0, layer.ffn_exp_probs_b, logits), k);
            mask = ggml_step(ctx0, ggml_add(ctx0, logits, bk));
        } break;
    }
    ggml_tensor * r = ggml_relu(ctx0, logits);
    if (model.router_act == GGML_DECO_ROUTER_SQRELU) {
        r = ggml_sqr(ctx0, r);
    }
    r = ggml_mul(ctx0, r, mask);
    switch (model.router_norm) {
        case GGML_DECO_RNORM_NONE: break;
        case GGML_DECO_RNORM_SIMPLE: r = ggml_mul(ctx0, r, dl.router_scale); break;
        case GGML_DECO_RNORM_RMS:    r = ggml_mul(ctx0, ggml_rms_norm(ctx0, r, eps), dl.router_scale); break;
        default: break;
    }
    ggml_tensor * s = ggml_mul(ctx0, r, mask); // [E, T]
    cb(s, "ffn_moe_weights", il);

    // ---- all experts' up (and gate) rows, in slot order
    ggml_tensor * ids = ggml_argsort(ctx0, logits, GGML_SORT_ORDER_DESC);          // [E, T]: all experts
    ggml_tensor * x3  = ggml_reshape_3d(ctx0, cur, d, 1, T);
    ggml_tensor * up_all = ggml_mul_mat_id(ctx0, layer.ffn_up_exps, x3, ids);       // [De, E, T]
    ggml_tensor * a = up_all;
    if (layer.ffn_gate_exps) {
        a = ggml_mul_mat_id(ctx0, layer.ffn_gate_exps, x3, ids);
    }
    if (dl.exps_mean) {
        ggml_tensor * m = ggml_mul_mat(ctx0, dl.exps_mean, cur); // [1, T]
        a = ggml_sub(ctx0, a, ggml_reshape_3d(ctx0, m, 1, 1, T));
    }
    switch (model.expert_act) {
        case GGML_DECO_ACT_NORM_SILU:
        case GGML_DECO_ACT_NORM_SILU_NOMEAN:
            a = ggml_silu(ctx0, ggml_mul(ctx0, ggml_rms_norm(ctx0, a, eps), dl.exps_norm));
            break;
        case GGML_DECO_ACT_NORM_SILU_NORMS:
        case GGML_DECO_ACT_SILU:
            a = ggml_silu(ctx0, a);
            break;
        case GGML_DECO_ACT_RELU:
        default:
            a = ggml_relu(ctx0, a);
            break;
    }
    if (layer.ffn_gate_exps) {
        a = ggml_mul(ctx0, a, up_all);
    }
    a = ggml_mul(ctx0, a, ggml_get_rows(ctx0, ggml_reshape_3d(ctx0, s, 1, E, T), ids)); // [De, E, T]

    // ---- down: per slot [d, De] x [De], then sum over the slots
    ggml_tensor * y = ggml_mul_mat_id(ctx0, layer.ffn_down_exps, a, ids);          // [d, E, T]
    y = ggml_cont(ctx0, ggml_permute(ctx0, y, 1, 0, 2, 3));                        // [E, d, T]
    y = ggml_sum_rows(ctx0, y);                                                    // [1, d, T]
    return ggml_reshape_2d(ctx0, y, d, T);
}
