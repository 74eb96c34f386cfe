// deco-speculative: speculative decoding as one call, for callers that are not C++ (deco-gguf's Python
// layer loads it with ctypes). A draft proposes up to n_draft tokens (as many as pay for themselves, given the
// acceptance and the times seen so far: draft-length.h), the target evaluates them in one batch after the last
// accepted token, and its sampler keeps the drafted tokens while its own sample equals them
// (common_sampler_sample_and_accept_n): greedy output is the autoregressive output, and with sampling the
// target's distribution is preserved.
// The drafts are llama.cpp's own (common/speculative.h): a draft model, or n-gram lookup over the prompt
// and the text generated so far.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

enum deco_spec_draft {
    DECO_SPEC_DRAFT_NONE   = 0, // no draft: one token per target evaluation (the autoregressive baseline)
    DECO_SPEC_DRAFT_MODEL  = 1, // a smaller model with the target's vocabulary (draft-simple)
    DECO_SPEC_DRAFT_LOOKUP = 2, // n-grams of the prompt and of the generated text (ngram-simple)
    DECO_SPEC_DRAFT_SCRIPT = 3, // a given continuation, each token replaced by a wrong one at a set rate
                                // (measures the engine independently of how good a draft is)
};

struct deco_spec_params {
    int32_t draft;   // enum deco_spec_draft
    int32_t n_draft; // most tokens proposed per target evaluation (the length of the first draft)

    // DECO_SPEC_DRAFT_LOOKUP: length of the n-gram looked up in the prompt and the generated text
    int32_t lookup_n;

    // DECO_SPEC_DRAFT_SCRIPT: script[i] is proposed as the i-th generated token, kept with probability
    // script_hit_rate and otherwise replaced by another token
    const llama_token * script;
    int32_t             n_script;
    float               script_hit_rate;
    uint32_t            script_seed;
};

// the target's sampler (llama.cpp's chain: penalties, top-k, top-p, min-p, temperature); temp <= 0 is greedy
struct deco_spec_sampling {
    float    temp;
    int32_t  top_k;
    float    top_p;
    float    min_p;
    float    repeat_penalty;
    uint32_t seed;
};

struct deco_spec_stats {
    int64_t n_prompt;    // prompt tokens evaluated (the rest was already in the KV cache)
    int64_t n_generated; // tokens generated, an end-of-generation token included
    int64_t n_verify;    // target evaluations while generating; each yields at least one token
    int64_t n_drafted;   // draft tokens proposed
    int64_t n_accepted;  // draft tokens accepted
    int64_t t_prompt_us; // prompt evaluation
    int64_t t_first_us;  // from the call to the first generated token
    int64_t t_draft_us;  // drafting (the draft model's evaluations included)
    int64_t t_verify_us; // target evaluations while generating
    int64_t t_total_us;
};

// called with each run of accepted tokens; returning false stops the generation
typedef bool (*deco_spec_tokens_callback)(const llama_token * tokens, int32_t n_tokens, void * user_data);

struct deco_spec;

// ctx_dft: the draft model's context for DECO_SPEC_DRAFT_MODEL, else NULL. NULL on error, the reason in err.
struct deco_spec * deco_spec_init(
        struct llama_context * ctx_tgt, struct llama_context * ctx_dft,
        const struct deco_spec_params * params, char * err, size_t err_size);

// Generate up to n_predict tokens after the prompt; the part of the prompt already in the KV cache
// (from the previous call) is not evaluated again. Returns 0, or -1 with the reason in err.
int32_t deco_spec_generate(
        struct deco_spec * spec, const llama_token * prompt, int32_t n_prompt, int32_t n_predict,
        const struct deco_spec_sampling * sampling, deco_spec_tokens_callback on_tokens, void * user_data,
        struct deco_spec_stats * stats, char * err, size_t err_size);

// Forget what the KV caches hold, because something else may have evaluated on the contexts since the last call
// (another deco_spec on the same target): the next call evaluates its whole prompt.
void deco_spec_forget_cache(struct deco_spec * spec);

// DECO_SPEC_DRAFT_SCRIPT: the continuation the next calls propose from, in place of the one given at init
void deco_spec_set_script(struct deco_spec * spec, const llama_token * script, int32_t n_script);

void deco_spec_free(struct deco_spec * spec);

#ifdef __cplusplus
}
#endif
