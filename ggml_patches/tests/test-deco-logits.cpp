// Logits of a GGUF for given token ids, for comparisons across builds (the aarch64 cross build under
// qemu against x86) and against the PyTorch reference. Links libllama only.
//
// Usage: test-deco-logits MODEL OUT N_THREADS TOKEN...
// Evaluates the tokens at positions 0..n-1 and writes the logits of every position to OUT (n_tokens x n_vocab
// float32, native byte order): one batch, or with DECO_DECODE_LAST=k the first n-k tokens as one batch and the
// last k one at a time (decode). F32 KV cache and flash attention off, so nothing is rounded to F16 outside the
// weights. The DECO FFN mode follows DECO_FFN=sparse|dense|ops; DECO_N_GPU_LAYERS sets n_gpu_layers (default 0).

#include "llama.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL OUT N_THREADS TOKEN...\n", argv[0]);
        return 2;
    }
    const int n_threads = atoi(argv[3]);
    std::vector<llama_token> tokens;
    for (int i = 4; i < argc; ++i) {
        tokens.push_back(atoi(argv[i]));
    }
    const int n = (int) tokens.size();

    llama_log_set([](ggml_log_level level, const char * text, void *) {
        if (level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
    }, nullptr);
    llama_backend_init();

    const char * env_ngl    = getenv("DECO_N_GPU_LAYERS");
    const char * env_decode = getenv("DECO_DECODE_LAST");
    const int n_decode = env_decode ? atoi(env_decode) : 0;
    if (n_decode < 0 || n_decode >= n) {
        fprintf(stderr, "DECO_DECODE_LAST must be in [0, %d)\n", n);
        return 2;
    }
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = env_ngl ? atoi(env_ngl) : 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "failed to load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n;
    cp.n_threads = cp.n_threads_batch = n_threads;
    cp.type_k = cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "failed to create the context\n");
        return 1;
    }

    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::vector<float> logits((size_t) n * n_vocab);
    llama_batch batch = llama_batch_init(n, 0, 1);
    // positions [i0, i1) as one batch; their logits into `logits`
    const auto eval = [&](const int i0, const int i1) {
        for (int i = i0; i < i1; ++i) {
            batch.token[i - i0]     = tokens[i];
            batch.pos[i - i0]       = i;
            batch.n_seq_id[i - i0]  = 1;
            batch.seq_id[i - i0][0] = 0;
            batch.logits[i - i0]    = true;
        }
        batch.n_tokens = i1 - i0;
        const int rc = llama_decode(ctx, batch);
        if (rc != 0) {
            fprintf(stderr, "llama_decode returned %d\n", rc);
            return false;
        }
        for (int i = i0; i < i1; ++i) {
            std::copy_n(llama_get_logits_ith(ctx, i - i0), n_vocab, logits.begin() + (size_t) i * n_vocab);
        }
        return true;
    };
    bool ok = eval(0, n - n_decode);
    for (int i = n - n_decode; ok && i < n; ++i) {
        ok = eval(i, i + 1);
    }
    if (!ok) {
        return 1;
    }

    FILE * f = fopen(argv[2], "wb");
    ok = f != nullptr && fwrite(logits.data(), sizeof(float), logits.size(), f) == logits.size();
    ok = f != nullptr && fclose(f) == 0 && ok;
    if (!ok) {
        fprintf(stderr, "failed to write %s\n", argv[2]);
    }

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return ok ? 0 : 1;
}
