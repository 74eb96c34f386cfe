#pragma once

// DECO (BlockFFN-v2): Llama-style attention + ReLU-routed sparse expert FFN layers (the math: docs/deco.md of
// deco-gguf). GGUF layout: docs/gguf-format.md. The expert layers are evaluated by GGML_OP_DECO_MOE.

#include "models.h"

#include "ggml-deco.h"

#include <array>

// how the DECO FFN layers are evaluated (llama_model_deco::ffn_mode, read when a model is loaded)
enum llama_deco_ffn_mode {
    LLAMA_DECO_FFN_SPARSE = 0, // GGML_OP_DECO_MOE, active experts only (default)
    LLAMA_DECO_FFN_DENSE  = 1, // GGML_OP_DECO_MOE evaluating every expert (same result, dense cost)
    LLAMA_DECO_FFN_OPS    = 2, // plain ggml ops (mul_mat over all experts): independent dense reference
};

struct llama_model_deco : public llama_model_base {
    llama_model_deco(const struct llama_model_params & params) : llama_model_base(params) {}
    void load_arch_hparams(llama_model_loader & ml) override;
    void load_arch_tensors(llama_model_loader & ml) override;

    // what llama_model_saver writes for DECO beside the common keys and the llama_layer tensors
    void save_arch_kv(struct llama_model_saver & ms) const;
    void save_arch_tensors(struct llama_model_saver & ms) const;

    // DECO hyperparameters (validated at load)
    std::array<int32_t, LLAMA_MAX_LAYERS> moe_layer = {}; // 1 = DECO FFN layer, 0 = dense SwiGLU
    uint32_t n_ff_exp    = 0;   // De
    uint32_t n_ff_shexp  = 0;   // Ds (0 = no shared expert)
    uint32_t n_vocab_kv  = 0;   // deco.vocab_size (0 = absent); must equal the tokenizer's token count
    bool     expert_gated = false;
    ggml_deco_act         expert_act  = GGML_DECO_ACT_NORM_SILU;
    ggml_deco_router_act  router_act  = GGML_DECO_ROUTER_RELU;
    ggml_deco_router_norm router_norm = GGML_DECO_RNORM_SIMPLE;
    ggml_deco_bias_mode   bias_mode   = GGML_DECO_BIAS_NONE;

    // how the graphs of this model evaluate DECO FFN layers, read at load from the deco.ffn_mode override
    // (llama_model_params.kv_overrides; --override-kv deco.ffn_mode=str:dense) or else the DECO_FFN environment
    // variable: models loaded in different modes live side by side in one process
    llama_deco_ffn_mode ffn_mode = LLAMA_DECO_FFN_SPARSE;

    // DECO-only per-layer tensors (the others live in llama_layer)
    struct deco_layer {
        ggml_tensor * router_scale = nullptr; // [E] or [1]
        ggml_tensor * exps_mean    = nullptr; // [d]
        ggml_tensor * exps_norm    = nullptr; // [De]
    };
    std::array<deco_layer, LLAMA_MAX_LAYERS> deco_layers = {};

    struct graph : public llm_graph_context {
        graph(const llama_model & model, const llm_graph_params & params);

        ggml_tensor * build_deco_ffn(const llama_model_deco & model, ggml_tensor * cur, int il, llama_deco_ffn_mode mode);
        ggml_tensor * build_deco_ffn_ops(const llama_model_deco & model, ggml_tensor * cur, ggml_tensor * logits, int il);
    };

    std::unique_ptr<llm_graph_context> build_arch_graph(const llm_graph_params & params) const override;

  private:
    // the parts of load_arch_hparams, in the order it runs them
    void load_ffn_mode(llama_model_loader & ml);
    void load_width_and_eps(llama_model_loader & ml);
    void check_attention() const;
    void load_expert_widths(llama_model_loader & ml);
    void load_moe_layers(llama_model_loader & ml);
    void load_ffn_variant(llama_model_loader & ml);
    void load_mup_scales(llama_model_loader & ml);
    void load_context_and_vocab(llama_model_loader & ml);
};
