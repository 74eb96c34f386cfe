#include "deco-speculative.h"
#include "draft-length.h"

#include "common.h"
#include "sampling.h"
#include "speculative.h"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

static const llama_seq_id SEQ = 0;

static int64_t now_us() {
    return ggml_time_us();
}

struct deco_spec {
    llama_context * tgt;
    llama_context * dft; // DECO_SPEC_DRAFT_MODEL only
    deco_spec_params params;
    std::vector<llama_token> script;
    std::mt19937 rng;

    // what the target's (and the draft model's) KV cache holds for SEQ: every accepted token but the last
    std::vector<llama_token> cached;

    common_batch batch;

    // how long each draft is; what it learns of the acceptance and the costs carries over to the next call
    // (the next reply of a chat)
    draft_length length;

    deco_spec(llama_context * tgt, llama_context * dft, const deco_spec_params & params)
        : tgt(tgt), dft(dft), params(params), rng(params.script_seed), batch(tgt), length(params.n_draft) {
        if (params.draft == DECO_SPEC_DRAFT_SCRIPT) {
            script.assign(params.script, params.script + params.n_script);
        }
    }

    int32_t n_vocab() const {
        return llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(tgt)));
    }

    // llama.cpp's speculative implementation for the draft kind, fresh for each generation (it reads the
    // prompt as it drafts); nullptr for the kinds drafted here
    common_speculative_ptr make_speculative() const {
        common_params_speculative sp;
        if (params.draft == DECO_SPEC_DRAFT_MODEL) {
            sp.types = { COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE };
        } else if (params.draft == DECO_SPEC_DRAFT_LOOKUP) {
            // the latest earlier occurrence of the last lookup_n tokens proposes the tokens that followed it
            sp.types = { COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE };
            sp.ngram_simple.size_n = (uint16_t) params.lookup_n;
            sp.ngram_simple.size_m = (uint16_t) params.n_draft;
        } else {
            return nullptr;
        }
        sp.draft.n_max   = params.n_draft;
        sp.draft.n_min   = 0;
        sp.draft.ctx_tgt = tgt;
        sp.draft.ctx_dft = dft;
        return common_speculative_ptr(common_speculative_init(sp, 1));
    }

    // the script's continuation from the n_done-th generated token, each token wrong at the set rate
    llama_tokens script_draft(size_t n_done, int32_t n_max) {
        llama_tokens draft;
        std::uniform_real_distribution<float> hit(0.0f, 1.0f);
        std::uniform_int_distribution<int32_t> offset(1, n_vocab() - 1);
        for (size_t i = n_done; i < script.size() && (int32_t) draft.size() < n_max; ++i) {
            const bool right = hit(rng) < params.script_hit_rate;
            draft.push_back(right ? script[i] : (script[i] + offset(rng)) % n_vocab());
        }
        return draft;
    }

    // drop everything after the first n tokens of SEQ, in the target and the draft model
    bool keep_first(size_t n) {
        cached.resize(std::min(cached.size(), n));
        bool ok = llama_memory_seq_rm(llama_get_memory(tgt), SEQ, (llama_pos) n, -1);
        if (dft) {
            ok = llama_memory_seq_rm(llama_get_memory(dft), SEQ, (llama_pos) n, -1) && ok;
        }
        return ok;
    }

    // evaluate tokens (no logits) after what the caches hold, in batches of n_batch
    void evaluate(const llama_token * tokens, size_t n, common_speculative * spec) {
        const size_t n_batch = llama_n_batch(tgt);
        for (size_t start = 0; start < n; start += n_batch) {
            batch.clear();
            for (size_t i = start; i < std::min(n, start + n_batch); ++i) {
                batch.add(tokens[i], (llama_pos) cached.size(), SEQ, false);
                cached.push_back(tokens[i]);
            }
            if (llama_process(tgt, LLAMA_PROCESS_TYPE_DECODE, batch.get()) != 0) {
                throw std::runtime_error("the target model failed to evaluate the prompt");
            }
            if (!common_speculative_process(spec, batch)) {
                throw std::runtime_error("the draft model failed to evaluate the prompt");
            }
        }
    }

    void generate(const llama_token * prompt, int32_t n_prompt, int32_t n_predict,
                  const deco_spec_sampling & sampling, deco_spec_tokens_callback on_tokens, void * user_data,
                  deco_spec_stats & stats) {
        const int64_t t_start = now_us();
        const int32_t n_ctx = (int32_t) llama_n_ctx(tgt);
        if (n_prompt < 1 || n_predict < 1) {
            throw std::invalid_argument("the prompt and the generation need at least one token each");
        }
        if (n_prompt >= n_ctx) {
            throw std::invalid_argument("the prompt does not fit the context");
        }
        const llama_vocab * vocab = llama_model_get_vocab(llama_get_model(tgt));

        // keep the cached prefix the prompt shares; the last prompt token is evaluated with the first draft
        size_t reuse = 0;
        while (reuse < cached.size() && reuse + 1 < (size_t) n_prompt && cached[reuse] == prompt[reuse]) {
            ++reuse;
        }
        if (!keep_first(reuse)) {
            throw std::runtime_error("the model's memory cannot drop tokens, which speculative decoding needs");
        }
        common_speculative_ptr spec = make_speculative();
        evaluate(prompt + reuse, n_prompt - 1 - reuse, spec.get());
        stats.n_prompt = n_prompt - 1 - (int64_t) reuse;
        stats.t_prompt_us = now_us() - t_start;

        common_params_sampling sp;
        sp.temp           = sampling.temp;
        sp.top_k          = sampling.top_k;
        sp.top_p          = sampling.top_p;
        sp.min_p          = sampling.min_p;
        sp.penalty_repeat = sampling.repeat_penalty;
        sp.seed           = sampling.seed;
        common_sampler_ptr smpl(common_sampler_init(llama_get_model(tgt), sp));
        for (int32_t i = 0; i + 1 < n_prompt; ++i) {
            common_sampler_accept(smpl.get(), prompt[i], false); // the repeat penalty sees the prompt
        }

        common_speculative_begin(spec.get(), SEQ, cached);
        llama_token id_last = prompt[n_prompt - 1];
        llama_tokens draft;
        bool done = false;
        while (!done) {
            // room for id_last, the draft and the token after it, in the context and the budget
            const int32_t room = std::min<int32_t>(n_ctx - (int32_t) cached.size() - 2, n_predict - (int32_t) stats.n_generated - 1);
            const int32_t n_max = room > 0 ? length.next(room) : 0;
            const int64_t t_draft = now_us();
            draft.clear();
            if (n_max > 0 && params.draft == DECO_SPEC_DRAFT_SCRIPT) {
                draft = script_draft(stats.n_generated, n_max);
            } else if (n_max > 0 && spec) {
                common_speculative_get_draft_params(spec.get(), SEQ) = {
                    /* .drafting = */ true,
                    /* .n_max    = */ n_max,
                    /* .pos0     = */ (llama_pos) cached.size(),
                    /* .id_last  = */ id_last,
                    /* .prompt   = */ &cached,
                    /* .result   = */ &draft,
                };
                common_speculative_draft(spec.get());
                keep_first(cached.size()); // the draft model's own guesses leave its cache
            }
            stats.t_draft_us += now_us() - t_draft;

            // the target evaluates id_last and the draft in one batch, logits for every row
            const int64_t t_verify = now_us();
            batch.clear();
            batch.add(id_last, (llama_pos) cached.size(), SEQ, true);
            for (size_t i = 0; i < draft.size(); ++i) {
                batch.add(draft[i], (llama_pos) (cached.size() + 1 + i), SEQ, true);
            }
            if (llama_process(tgt, LLAMA_PROCESS_TYPE_DECODE, batch.get()) != 0) {
                throw std::runtime_error("the target model failed to evaluate a batch");
            }
            // accepted draft tokens, then the target's own next token
            llama_tokens accepted = common_sampler_sample_and_accept_n(smpl.get(), tgt, draft);
            stats.t_verify_us += now_us() - t_verify;

            const int64_t t_process = now_us();
            if (!common_speculative_process(spec.get(), batch)) { // the draft model follows the target
                throw std::runtime_error("the draft model failed to evaluate a batch");
            }
            if (spec) {
                common_speculative_accept(spec.get(), SEQ, (uint16_t) (accepted.size() - 1));
            }
            stats.t_draft_us += now_us() - t_process;
            length.observe((int32_t) draft.size(), (int32_t) accepted.size() - 1, 1e-6 * (now_us() - t_draft));
            stats.n_verify   += 1;
            stats.n_drafted  += (int64_t) draft.size();
            stats.n_accepted += (int64_t) accepted.size() - 1;
            cached.push_back(id_last);
            cached.insert(cached.end(), accepted.begin(), accepted.end() - 1);
            id_last = accepted.back();
            keep_first(cached.size()); // rejected draft tokens leave the caches

            for (size_t i = 0; i < accepted.size(); ++i) {
                if (llama_vocab_is_eog(vocab, accepted[i]) || stats.n_generated + (int64_t) i + 1 >= n_predict) {
                    accepted.resize(i + 1);
                    done = true;
                    break;
                }
            }
            if (stats.n_generated == 0) {
                stats.t_first_us = now_us() - t_start;
            }
            stats.n_generated += (int64_t) accepted.size();
            if (!on_tokens(accepted.data(), (int32_t) accepted.size(), user_data)) {
                done = true;
            }
        }
        stats.t_total_us = now_us() - t_start;
    }
};

static void set_error(char * err, size_t err_size, const char * message) {
    if (err && err_size > 0) {
        snprintf(err, err_size, "%s", message);
    }
}

struct deco_spec * deco_spec_init(
        llama_context * ctx_tgt, llama_context * ctx_dft, const deco_spec_params * params, char * err, size_t err_size) {
    if (params->draft < DECO_SPEC_DRAFT_NONE || params->draft > DECO_SPEC_DRAFT_SCRIPT || params->n_draft < 0 ||
        params->n_draft > UINT16_MAX || (params->draft == DECO_SPEC_DRAFT_LOOKUP && params->lookup_n < 1)) {
        set_error(err, err_size, "unknown draft kind, n_draft out of range or lookup_n < 1");
        return nullptr;
    }
    if ((params->draft == DECO_SPEC_DRAFT_MODEL) != (ctx_dft != nullptr)) {
        set_error(err, err_size, "a draft model context is needed for, and only for, DECO_SPEC_DRAFT_MODEL");
        return nullptr;
    }
    try {
        auto spec = std::make_unique<deco_spec>(ctx_tgt, ctx_dft, *params);
        spec->make_speculative(); // refuses a draft model whose vocabulary does not match
        spec->keep_first(0);      // the caches start empty: what they held is not known here
        return spec.release();
    } catch (const std::exception & e) {
        set_error(err, err_size, e.what());
        return nullptr;
    }
}

int32_t deco_spec_generate(
        deco_spec * spec, const llama_token * prompt, int32_t n_prompt, int32_t n_predict,
        const deco_spec_sampling * sampling, deco_spec_tokens_callback on_tokens, void * user_data,
        deco_spec_stats * stats, char * err, size_t err_size) {
    *stats = {};
    try {
        spec->generate(prompt, n_prompt, n_predict, *sampling, on_tokens, user_data, *stats);
        return 0;
    } catch (const std::exception & e) {
        spec->keep_first(0); // a failed generation leaves nothing trustworthy in the caches
        set_error(err, err_size, e.what());
        return -1;
    }
}

void deco_spec_forget_cache(deco_spec * spec) {
    spec->keep_first(0);
}

void deco_spec_set_script(deco_spec * spec, const llama_token * script, int32_t n_script) {
    spec->script.assign(script, script + n_script);
}

void deco_spec_free(deco_spec * spec) {
    delete spec;
}
