// Time one DECO FFN layer on the CPU backend, sparse against dense, beside its weight-bytes bound.
//
// The layer is what a DECO model evaluates per FFN layer: the router mat-vec (F32), GGML_OP_DECO_MOE
// (NormSiLU experts) and the shared SwiGLU expert, added. The op routes on a logits input with exactly
// round(rate * E) active experts per token (random sets), so the activation rate is controlled; the router
// mat-vec is still computed in the same graph (its cost does not depend on its values). Weights go where the
// model loader puts them: into the CPU_REPACK buffer when the type has a repacked layout on this CPU.
// Sparse and dense (GGML_DECO_FLAG_DENSE) runs alternate, for every batch size in --tokens too (e.g. 1,2,4,8,16:
// the verification batches of speculative decoding); each reports the median of its runs.
//
// The graph stacks --layers such layers, each with its own weights (RMS norm between them), as a model does:
// the weights are streamed from memory rather than cache-resident, and thread wake-ups are amortised. The
// reported times are per layer.
//
// Beside each time: the bounds of the sparse/dense ratio, by weight bytes (the experts that at least one token of
// the batch activates, "union", and every other weight once) and by multiply-adds (each token's active experts),
// and with several batch sizes "steps": the sparse time of the batch over that of one token (the cost of a
// k-token verification in decode steps).
//
// Usage: bench-deco-ffn [--d 1280] [--De 64] [--E 77] [--Ds 128] [--type q4_0] [--rate 0.2] [--tokens 1[,2,...]]
//                       [--layers 16] [--threads 2] [--reps 20] [--no-repack]
// Prints one JSON object per batch size.

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-deco.h"
#include "deco-cpu-repack.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

struct options {
    int64_t d = 1280, De = 64, E = 77, Ds = 128;
    std::vector<int64_t> tokens = { 1 };
    ggml_type type = GGML_TYPE_Q4_0;
    double rate = 0.2;
    int threads = 2, reps = 20, layers = 16;
    bool repack = true;
};

ggml_type type_by_name(const char * name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * n = ggml_type_name((ggml_type) t);
        if (n && strcmp(n, name) == 0) return (ggml_type) t;
    }
    fprintf(stderr, "unknown type %s\n", name);
    exit(2);
}

options parse(int argc, char ** argv) {
    options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() { if (i + 1 >= argc) { fprintf(stderr, "%s needs a value\n", a.c_str()); exit(2); } return argv[++i]; };
        if      (a == "--d")         o.d = atoll(next());
        else if (a == "--De")        o.De = atoll(next());
        else if (a == "--E")         o.E = atoll(next());
        else if (a == "--Ds")        o.Ds = atoll(next());
        else if (a == "--tokens") {
            o.tokens.clear();
            for (char * t = strtok(next(), ","); t; t = strtok(nullptr, ",")) o.tokens.push_back(std::max(1LL, atoll(t)));
        }
        else if (a == "--type")      o.type = type_by_name(next());
        else if (a == "--rate")      o.rate = atof(next());
        else if (a == "--threads")   o.threads = atoi(next());
        else if (a == "--reps")      o.reps = atoi(next());
        else if (a == "--layers")    o.layers = std::max(1, atoi(next()));
        else if (a == "--no-repack") o.repack = false;
        else { fprintf(stderr, "unknown argument %s (see the header of bench-deco-ffn.cpp)\n", a.c_str()); exit(2); }
    }
    return o;
}

// random values written in the tensor's type
void fill(ggml_tensor * t, std::mt19937 & rng, float amp) {
    std::uniform_real_distribution<float> u(-amp, amp);
    std::vector<float> f(ggml_nelements(t));
    for (auto & v : f) v = u(rng);
    std::vector<uint8_t> q(ggml_nbytes(t));
    if (t->type == GGML_TYPE_F32) {
        memcpy(q.data(), f.data(), q.size());
    } else {
        ggml_quantize_chunk(t->type, f.data(), q.data(), 0, ggml_nrows(t), t->ne[0], nullptr);
    }
    ggml_backend_tensor_set(t, q.data(), 0, q.size());
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

} // namespace

int main(int argc, char ** argv) {
    const options o = parse(argc, argv);
    ggml_log_set([](ggml_log_level level, const char * text, void *) {
        if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
    }, nullptr);
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    ggml_backend_cpu_set_n_threads(backend, o.threads);
    std::mt19937 rng(42);

    // per layer: expert and shared matrices (repacked where the loader would), F32 router, norms
    struct layer_weights {
        ggml_tensor * up, * down, * sh_gate, * sh_up, * sh_down, * router, * mean, * norm, * scale;
    };
    // per batch size: the input, per layer logits with exactly n_act positive entries per token (random sets), the
    // sparse and dense graphs, their times per layer, and the mean fraction of experts active for some token
    struct batch {
        int64_t T = 1;
        ggml_tensor * x = nullptr;
        std::vector<ggml_tensor *> logits;
        ggml_cgraph * graphs[2] = {};
        ggml_gallocr_t galloc[2] = {};
        std::vector<double> us[2];
        double union_rate = 0;
    };
    std::vector<batch> batches(o.tokens.size());
    for (size_t i = 0; i < batches.size(); ++i) batches[i].T = o.tokens[i];
    const size_t n_tensors = 16 * o.layers + 4 + batches.size() * (o.layers + 1);
    ggml_init_params ipw = { n_tensors * ggml_tensor_overhead(), nullptr, true };
    ggml_context * ctx_q = ggml_init(ipw);
    ggml_context * ctx_f = ggml_init(ipw);
    std::vector<layer_weights> layers(o.layers);
    for (auto & w : layers) {
        w.up      = ggml_new_tensor_3d(ctx_q, o.type, o.d, o.De, o.E);
        w.down    = ggml_new_tensor_3d(ctx_q, o.type, o.De, o.d, o.E);
        w.sh_gate = ggml_new_tensor_2d(ctx_q, o.type, o.d, o.Ds);
        w.sh_up   = ggml_new_tensor_2d(ctx_q, o.type, o.d, o.Ds);
        w.sh_down = ggml_new_tensor_2d(ctx_q, o.type, o.Ds, o.d);
        w.router  = ggml_new_tensor_2d(ctx_f, GGML_TYPE_F32, o.d, o.E);
        w.mean    = ggml_new_tensor_1d(ctx_f, GGML_TYPE_F32, o.d);
        w.norm    = ggml_new_tensor_1d(ctx_f, GGML_TYPE_F32, o.De);
        w.scale   = ggml_new_tensor_1d(ctx_f, GGML_TYPE_F32, o.E);
    }
    for (auto & b : batches) {
        b.x = ggml_new_tensor_2d(ctx_f, GGML_TYPE_F32, o.d, b.T);
        for (int l = 0; l < o.layers; ++l) b.logits.push_back(ggml_new_tensor_2d(ctx_f, GGML_TYPE_F32, o.E, b.T));
    }
    ggml_backend_buffer_type_t repack = o.repack && deco_repack_accepts(o.type, o.d, o.De, o.E) ? deco_repack_buffer_type() : nullptr;
    const bool repacked = repack != nullptr;
    ggml_backend_buffer_t buf_q = ggml_backend_alloc_ctx_tensors_from_buft(ctx_q, repacked ? repack : ggml_backend_cpu_buffer_type());
    ggml_backend_buffer_t buf_f = ggml_backend_alloc_ctx_tensors(ctx_f, backend);

    const int64_t n_act = std::max<int64_t>(0, std::min<int64_t>(o.E, llround(o.rate * o.E)));
    for (auto & w : layers) {
        for (ggml_tensor * t : { w.up, w.sh_gate, w.sh_up, w.router }) fill(t, rng, 1.0f / sqrtf((float) o.d));
        fill(w.down, rng, 1.0f / sqrtf((float) o.De));
        fill(w.sh_down, rng, 1.0f / sqrtf((float) o.Ds));
        fill(w.mean, rng, 0.01f);
        fill(w.norm, rng, 1.0f);
        fill(w.scale, rng, 1.0f);
    }
    for (auto & b : batches) {
        fill(b.x, rng, 1.0f);
        for (ggml_tensor * logits : b.logits) {
            std::vector<float> lg(o.E * b.T);
            std::vector<int> perm(o.E);
            std::vector<bool> used(o.E, false);
            std::uniform_real_distribution<float> u(0.1f, 1.0f);
            for (int64_t t = 0; t < b.T; ++t) {
                std::iota(perm.begin(), perm.end(), 0);
                std::shuffle(perm.begin(), perm.end(), rng);
                for (int64_t k = 0; k < o.E; ++k) {
                    lg[t * o.E + perm[k]] = k < n_act ? u(rng) : -u(rng);
                    if (k < n_act) used[perm[k]] = true;
                }
            }
            ggml_backend_tensor_set(logits, lg.data(), 0, lg.size() * sizeof(float));
            b.union_rate += (double) std::count(used.begin(), used.end(), true) / o.E / o.layers;
        }
    }

    // the graphs, sparse and dense: per layer router + DECO op + shared SwiGLU, added and RMS-normed into the next
    // layer's input (one graph, as in a model: thread wake-ups amortised, weights streamed from memory)
    ggml_init_params ipg = { batches.size() * ((32 * o.layers + 16) * ggml_tensor_overhead() + 2 * ggml_graph_overhead()), nullptr, true };
    ggml_context * ctx_g = ggml_init(ipg);
    ggml_deco_moe_params p = { GGML_DECO_ACT_NORM_SILU, GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_SIMPLE, GGML_DECO_BIAS_NONE, 1e-5f, 0, -1 };
    for (auto & b : batches) {
        for (int dense = 0; dense < 2; ++dense) {
            ggml_deco_moe_params pp = p;
            pp.flags = dense ? GGML_DECO_FLAG_DENSE : 0;
            ggml_cgraph * g = b.graphs[dense] = ggml_new_graph(ctx_g);
            ggml_tensor * cur = b.x;
            for (int l = 0; l < o.layers; ++l) {
                const layer_weights & w = layers[l];
                ggml_build_forward_expand(g, ggml_mul_mat(ctx_g, w.router, cur));
                ggml_tensor * moe = ggml_deco_moe(ctx_g, cur, b.logits[l], w.up, nullptr, w.down, w.mean, w.norm, w.scale, nullptr, pp);
                ggml_tensor * sh  = ggml_mul_mat(ctx_g, w.sh_down, ggml_swiglu_split(ctx_g, ggml_mul_mat(ctx_g, w.sh_gate, cur),
                                                                                     ggml_mul_mat(ctx_g, w.sh_up, cur)));
                cur = ggml_rms_norm(ctx_g, ggml_add(ctx_g, moe, sh), 1e-5f);
            }
            ggml_build_forward_expand(g, cur);
            b.galloc[dense] = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
            ggml_gallocr_alloc_graph(b.galloc[dense], g);
        }
    }

    for (int r = 0; r < o.reps + 3; ++r) {
        for (auto & b : batches) {
            for (int dense = 0; dense < 2; ++dense) {
                const auto t0 = std::chrono::steady_clock::now();
                ggml_backend_graph_compute(backend, b.graphs[dense]);
                const auto t1 = std::chrono::steady_clock::now();
                if (r >= 3) b.us[dense].push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / o.layers); // 3 warm-up runs
            }
        }
    }

    // bounds of the sparse/dense ratio: weight bytes (router and shared expert always read, experts all or only
    // those some token activates) and multiply-adds (each token's active experts); "bound" is the bytes bound for
    // one token and the multiply-add bound for a batch, as before
    const double rate = (double) n_act / o.E;
    const layer_weights & w = layers[0];
    const double fixed_bytes  = (double) (ggml_nbytes(w.router) + ggml_nbytes(w.sh_gate) + ggml_nbytes(w.sh_up) + ggml_nbytes(w.sh_down));
    const double expert_bytes = (double) (ggml_nbytes(w.up) + ggml_nbytes(w.down));
    const double fixed_macs   = (double) (o.E + 3 * o.Ds) * o.d;
    const double expert_macs  = 2.0 * o.E * o.De * o.d;
    const double bound_macs   = (fixed_macs + expert_macs) / (fixed_macs + rate * expert_macs);
    const double one_token_us = batches[0].T == 1 ? median(batches[0].us[0]) : NAN;
    for (const auto & b : batches) {
        const double bound_bytes = (fixed_bytes + expert_bytes) / (fixed_bytes + b.union_rate * expert_bytes);
        const double bound = b.T == 1 ? bound_bytes : bound_macs;
        const double sparse_us = median(b.us[0]), dense_us = median(b.us[1]);
        printf("{\"d\": %lld, \"De\": %lld, \"E\": %lld, \"Ds\": %lld, \"type\": \"%s\", \"repacked\": %s, \"tokens\": %lld, "
               "\"threads\": %d, \"layers\": %d, \"rate\": %.4f, \"union\": %.4f, \"reps\": %d, \"sparse_us\": %.2f, "
               "\"dense_us\": %.2f, \"ratio\": %.3f, \"bound_bytes\": %.3f, \"bound_macs\": %.3f, \"bound\": %.3f, "
               "\"bound_kind\": \"%s\", \"of_bound\": %.3f, \"steps\": ",
               (long long) o.d, (long long) o.De, (long long) o.E, (long long) o.Ds, ggml_type_name(o.type),
               repacked ? "true" : "false", (long long) b.T, o.threads, o.layers, rate, b.union_rate, o.reps, sparse_us,
               dense_us, dense_us / sparse_us, bound_bytes, bound_macs, bound, b.T == 1 ? "bytes" : "flops",
               dense_us / sparse_us / bound);
        if (std::isnan(one_token_us)) printf("null}\n"); else printf("%.3f}\n", sparse_us / one_token_us);
    }

    for (auto & b : batches) for (auto * g : b.galloc) ggml_gallocr_free(g);
    ggml_free(ctx_g);
    ggml_backend_buffer_free(buf_q);
    ggml_backend_buffer_free(buf_f);
    ggml_free(ctx_q);
    ggml_free(ctx_f);
    ggml_backend_free(backend);
    return 0;
}
