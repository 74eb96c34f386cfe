// Direct check of GGML_OP_DECO_MOE (CPU) against a naive double-precision reference.
//
//  - every supported weight type, odd shapes, expert counts 1..180, De 32/64/256, 1..33 tokens, and the
//    small batches of speculative verification (2, 3, 5, 8, 16 tokens, and 17: past the small-batch kernels)
//  - all router / activation / bias variants, gated and non-gated experts
//  - all-inactive and all-active tokens
//  - exactness of the sparsity: experts that are inactive for every token get NaN weights; the sparse
//    result must still be finite and correct (so those weights were never read)
//  - dense mode (GGML_DECO_FLAG_DENSE) must give the same result as sparse mode
//  - expert weights in the plain CPU buffer and in the CPU_REPACK buffer (interleaved rows, read by ggml's
//    repacked gemv/gemm and the small-batch kernels) where the type has a repacked layout on this CPU
//  - ggml_mul_mat of 1..17 and 33 vectors with weights in the CPU_REPACK buffer equals the same product with
//    the weights in the plain buffer (ggml's vec_dot), and with Q5_K / Q6_K weights (the output head of a Q4_0
//    model) and Q8_0 / Q5_0 / Q5_1 weights (the presets' short rows) the type's vec_dot called row by row: the
//    dense matmuls of a verification batch
//  - the routed down projections of the K-quant presets: Q5_0 / Q5_1 / Q8_0 rows of 64 under K-quant up rows
//
// The reference emulates the op's activation quantization (x and v are rounded through the weights'
// vec_dot_type), so the tolerances are tight. Usage: test-deco-ffn [-v] [n_threads]

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-deco.h"
#include "deco-cpu-repack.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

bool g_verbose = false;

struct case_params {
    ggml_type type;
    int64_t d, De, E, T;
    ggml_deco_act act;
    bool gated;
    ggml_deco_router_act ract;
    ggml_deco_router_norm rnorm;
    bool scalar_scale;
    ggml_deco_bias_mode bias;
    int logit_mode; // 0 mixed (some experts never active), 1 all inactive, 2 all active
    bool repacked;  // expert weights in the CPU_REPACK buffer
    ggml_type down_type = GGML_TYPE_COUNT; // COUNT: `type` (as the presets give rows too short for it another)

    ggml_type down() const { return down_type == GGML_TYPE_COUNT ? type : down_type; }
};

std::string describe(const case_params & c) {
    char buf[256];
    snprintf(buf, sizeof(buf), "type=%s%s%s%s d=%lld De=%lld E=%lld T=%lld act=%d gated=%d ract=%d rnorm=%d%s bias=%d logits=%s",
             ggml_type_name(c.type), c.repacked ? "(repacked)" : "", c.down() != c.type ? " down=" : "",
             c.down() != c.type ? ggml_type_name(c.down()) : "", (long long) c.d, (long long) c.De, (long long) c.E,
             (long long) c.T, (int) c.act, (int) c.gated, (int) c.ract, (int) c.rnorm, c.scalar_scale ? "(scalar)" : "",
             (int) c.bias, c.logit_mode == 0 ? "mixed" : c.logit_mode == 1 ? "all-inactive" : "all-active");
    return buf;
}

// quantize a float row into t (via the CPU from_float), or back
std::vector<uint8_t> quantize_row(ggml_type type, const float * x, int64_t n) {
    std::vector<uint8_t> q(ggml_row_size(type, n));
    ggml_get_type_traits_cpu(type)->from_float(x, q.data(), n);
    return q;
}

std::vector<float> dequantize_row(ggml_type type, const void * q, int64_t n) {
    std::vector<float> x(n);
    if (type == GGML_TYPE_F32) {
        memcpy(x.data(), q, n * sizeof(float));
    } else if (type == GGML_TYPE_Q8_1) {
        // block_q8_1: ggml_half d, s; int8_t qs[32] (no to_float in the type traits either)
        const char * b = (const char *) q;
        for (int64_t i = 0; i < n; i += 32, b += ggml_type_size(GGML_TYPE_Q8_1)) {
            ggml_fp16_t dh; memcpy(&dh, b, sizeof(dh));
            for (int j = 0; j < 32; ++j) x[i + j] = ggml_fp16_to_fp32(dh) * (float) ((const int8_t *) (b + 4))[j];
        }
    } else if (type == GGML_TYPE_Q8_K) {
        // block_q8_K: float d; int8_t qs[256]; int16_t bsums[16] (no to_float in the type traits)
        const char * b = (const char *) q;
        for (int64_t i = 0; i < n; i += 256, b += ggml_type_size(GGML_TYPE_Q8_K)) {
            float dd; memcpy(&dd, b, sizeof(float));
            for (int j = 0; j < 256; ++j) x[i + j] = dd * (float) ((const int8_t *) (b + 4))[j];
        }
    } else {
        ggml_get_type_traits(type)->to_float(q, x.data(), n);
    }
    return x;
}

std::vector<float> roundtrip(ggml_type type, const float * x, int64_t n) {
    if (type == GGML_TYPE_F32) return std::vector<float>(x, x + n);
    auto q = quantize_row(type, x, n);
    return dequantize_row(type, q.data(), n);
}

// an expert weight: its plain bytes on the host (what the reference reads), uploaded into a backend buffer
// (the CPU_REPACK buffer rewrites them into its interleaved layout)
struct expert_weight {
    ggml_tensor * t = nullptr;
    std::vector<uint8_t> host;
    const char * row(int64_t e, int64_t r) const { return (const char *) host.data() + e * t->nb[2] + r * t->nb[1]; }
    void upload() { ggml_backend_tensor_set(t, host.data(), 0, host.size()); }
};

// random weights as type `type`
void fill_weights(expert_weight & w, std::mt19937 & rng, float amp) {
    std::uniform_real_distribution<float> u(-amp, amp);
    const ggml_tensor * t = w.t;
    const int64_t n_per_row = t->ne[0];
    const int64_t nrows = ggml_nrows(t);
    w.host.resize(ggml_nbytes(t));
    std::vector<float> row(n_per_row);
    for (int64_t r = 0; r < nrows; ++r) {
        for (auto & v : row) v = u(rng);
        char * dst = (char *) w.host.data() + r * t->nb[1];
        if (t->type == GGML_TYPE_F32) {
            memcpy(dst, row.data(), n_per_row * sizeof(float));
        } else {
            ggml_get_type_traits_cpu(t->type)->from_float(row.data(), dst, n_per_row);
        }
    }
    w.upload();
}

// overwrite expert e of a [*, *, E] weight with NaN
void poison_expert(expert_weight & w, int64_t e) {
    const ggml_tensor * t = w.t;
    char * base = (char *) w.host.data() + e * t->nb[2];
    const size_t n = t->nb[2];
    switch (t->type) {
        case GGML_TYPE_F32: { float * p = (float *) base; for (size_t i = 0; i < n / 4; ++i) p[i] = NAN; } break;
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16: { uint16_t * p = (uint16_t *) base; for (size_t i = 0; i < n / 2; ++i) p[i] = 0x7fff; } break;
        default: {
            // quantized: every block starts with an fp16 scale for the types tested here; a NaN scale poisons it
            const size_t bs = ggml_type_size(t->type);
            for (size_t off = 0; off + bs <= n; off += bs) {
                uint16_t nanh = 0x7e00;
                if (t->type == GGML_TYPE_Q4_K || t->type == GGML_TYPE_Q5_K) {
                    memcpy(base + off, &nanh, 2);
                } else if (t->type == GGML_TYPE_Q6_K) {
                    memcpy(base + off + bs - 2, &nanh, 2);
                } else {
                    memcpy(base + off, &nanh, 2);
                }
            }
        } break;
    }
    w.upload();
}

double silu(double x) { return x / (1.0 + exp(-x)); }

bool run_case(const case_params & c, int n_threads) {
    std::mt19937 rng(1234 + (unsigned) c.E * 7 + (unsigned) c.T * 13 + (unsigned) c.type);

    const bool need_mean = ggml_deco_act_uses_mean(c.act);
    const bool need_norm = ggml_deco_act_uses_norm(c.act);

    size_t mem = 0;
    mem += 3 * ggml_row_size(c.type, c.d) * c.De * c.E + 1024;
    mem += (c.d * c.T + c.E * c.T + c.d + c.De + c.E * 2 + c.d * c.T * 2) * sizeof(float);
    mem += 64 * ggml_tensor_overhead() + ggml_graph_overhead() + (1 << 20);
    // work buffers of the two op runs (allocated in ctx by ggml_graph_compute_with_ctx), generously
    mem += 2 * ((size_t) c.E * c.T * (c.d * 4 + c.De * 12 + 256) + 2 * (size_t) c.T * c.d * 4 +
                (size_t) (n_threads + 1) * (c.E * (c.De * 12 + 512) + 65536 + c.d * 4 + 4096));
    ggml_init_params ip = { mem, nullptr, false };
    ggml_context * ctx = ggml_init(ip);

    // expert weights in a backend buffer of their own
    ggml_init_params ipw = { 4 * ggml_tensor_overhead(), nullptr, true };
    ggml_context * ctx_w = ggml_init(ipw);
    expert_weight w_up, w_gate, w_down;
    w_up.t   = ggml_new_tensor_3d(ctx_w, c.type, c.d, c.De, c.E);
    w_gate.t = c.gated ? ggml_new_tensor_3d(ctx_w, c.type, c.d, c.De, c.E) : nullptr;
    w_down.t = ggml_new_tensor_3d(ctx_w, c.down(), c.De, c.d, c.E);
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(
        ctx_w, c.repacked ? deco_repack_buffer_type() : ggml_backend_cpu_buffer_type());
    ggml_tensor * up   = w_up.t;
    ggml_tensor * gate = w_gate.t;
    ggml_tensor * down = w_down.t;
    ggml_tensor * x      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.d, c.T);
    ggml_tensor * logits = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.E, c.T);
    ggml_tensor * mean   = need_mean ? ggml_new_tensor_1d(ctx, GGML_TYPE_F32, c.d) : nullptr;
    ggml_tensor * norm   = need_norm ? ggml_new_tensor_1d(ctx, GGML_TYPE_F32, c.De) : nullptr;
    ggml_tensor * scale  = c.rnorm != GGML_DECO_RNORM_NONE ? ggml_new_tensor_1d(ctx, GGML_TYPE_F32, c.scalar_scale ? 1 : c.E) : nullptr;
    ggml_tensor * bias   = c.bias != GGML_DECO_BIAS_NONE ? ggml_new_tensor_1d(ctx, GGML_TYPE_F32, c.E) : nullptr;

    const float wamp = 1.0f / sqrtf((float) c.d);
    fill_weights(w_up, rng, wamp);
    if (gate) fill_weights(w_gate, rng, wamp);
    fill_weights(w_down, rng, 1.0f / sqrtf((float) c.De));

    std::uniform_real_distribution<float> U(-1.0f, 1.0f);
    for (int64_t i = 0; i < c.d * c.T; ++i) ((float *) x->data)[i] = U(rng);
    if (mean)  for (int64_t i = 0; i < c.d;  ++i) ((float *) mean->data)[i] = 0.3f * wamp * U(rng);
    if (norm)  for (int64_t i = 0; i < c.De; ++i) ((float *) norm->data)[i] = 1.0f + 0.5f * U(rng);
    if (scale) for (int64_t i = 0; i < ggml_nelements(scale); ++i) ((float *) scale->data)[i] = 1.5f * U(rng);
    if (bias)  for (int64_t i = 0; i < c.E; ++i) ((float *) bias->data)[i] = 0.3f * U(rng);

    // logits: in mixed mode experts e % 3 == 0 are never active (negative for every token, even after the bias)
    std::vector<bool> never_active(c.E, false);
    for (int64_t t = 0; t < c.T; ++t) {
        for (int64_t e = 0; e < c.E; ++e) {
            float v = U(rng);
            if (c.logit_mode == 1) v = -fabsf(v) - 2.0f;
            if (c.logit_mode == 2) v =  fabsf(v) + 2.0f;
            if (c.logit_mode == 0 && e % 3 == 0) v = -fabsf(v) - 2.0f;
            ((float *) logits->data)[t * c.E + e] = v;
        }
    }
    for (int64_t e = 0; e < c.E; ++e) never_active[e] = c.logit_mode == 1 || (c.logit_mode == 0 && e % 3 == 0);
    // a bias of 0.3*rms can shift activity by at most ~0.3*|raw|max: negative logits are <= -2 so stay inactive

    // ---- reference (double), emulating the op's rounding of x and v
    const ggml_type vdt_up   = ggml_get_type_traits_cpu(c.type)->vec_dot_type;
    const ggml_type vdt_down = ggml_get_type_traits_cpu(c.down())->vec_dot_type;
    std::vector<double> yref(c.d * c.T, 0.0);
    {
        std::vector<std::vector<float>> Wa(c.E * c.De), Wu(c.gated ? c.E * c.De : 0), Wd(c.E * c.d);
        const expert_weight & wa = gate ? w_gate : w_up;
        for (int64_t e = 0; e < c.E; ++e) {
            for (int64_t r = 0; r < c.De; ++r) {
                Wa[e * c.De + r] = dequantize_row(c.type, wa.row(e, r), c.d);
                if (gate) Wu[e * c.De + r] = dequantize_row(c.type, w_up.row(e, r), c.d);
            }
            for (int64_t i = 0; i < c.d; ++i) {
                Wd[e * c.d + i] = dequantize_row(c.down(), w_down.row(e, i), c.De);
            }
        }
        for (int64_t t = 0; t < c.T; ++t) {
            const float * raw = (const float *) logits->data + t * c.E;
            const float * xt  = (const float *) x->data + t * c.d;
            std::vector<float> xq = roundtrip(vdt_up, xt, c.d);

            // routing
            double k = 1.0;
            if (c.bias == GGML_DECO_BIAS_RMS) {
                double ss = 0; for (int64_t e = 0; e < c.E; ++e) ss += (double) raw[e] * raw[e];
                k = sqrt(ss / c.E);
            }
            std::vector<double> s(c.E);
            std::vector<bool> act(c.E);
            for (int64_t e = 0; e < c.E; ++e) {
                act[e] = c.bias == GGML_DECO_BIAS_NONE ? raw[e] > 0 : raw[e] + ((float *) bias->data)[e] * k > 0;
                double r = raw[e] > 0 ? raw[e] : 0.0;
                if (c.ract == GGML_DECO_ROUTER_SQRELU) r *= r;
                s[e] = act[e] ? r : 0.0;
            }
            auto sc = [&](int64_t e) { return (double) ((float *) scale->data)[c.scalar_scale ? 0 : e]; };
            if (c.rnorm == GGML_DECO_RNORM_SIMPLE) {
                for (int64_t e = 0; e < c.E; ++e) s[e] *= sc(e);
            } else if (c.rnorm == GGML_DECO_RNORM_RMS) {
                double ss = 0; for (double v : s) ss += v * v;
                const double inv = 1.0 / sqrt(ss / c.E + 1e-5);
                for (int64_t e = 0; e < c.E; ++e) s[e] *= inv * sc(e);
            }
            double m = 0;
            if (mean) for (int64_t i = 0; i < c.d; ++i) m += (double) ((float *) mean->data)[i] * xt[i];

            for (int64_t e = 0; e < c.E; ++e) {
                if (!act[e] || (float) s[e] == 0.0f) continue;
                std::vector<float> v(c.De);
                std::vector<double> a(c.De), g(c.De, 1.0);
                for (int64_t r = 0; r < c.De; ++r) {
                    double acc = 0, accu = 0;
                    for (int64_t i = 0; i < c.d; ++i) acc += (double) Wa[e * c.De + r][i] * xq[i];
                    a[r] = acc;
                    if (gate) { for (int64_t i = 0; i < c.d; ++i) accu += (double) Wu[e * c.De + r][i] * xq[i]; g[r] = accu; }
                }
                if (c.act == GGML_DECO_ACT_NORM_SILU || c.act == GGML_DECO_ACT_NORM_SILU_NOMEAN) {
                    const double mm = c.act == GGML_DECO_ACT_NORM_SILU ? m : 0.0;
                    double ss = 0; for (auto & z : a) { z -= mm; ss += z * z; }
                    const double inv = 1.0 / sqrt(ss / c.De + 1e-5);
                    for (int64_t r = 0; r < c.De; ++r) a[r] = silu(a[r] * inv * ((float *) norm->data)[r]);
                } else if (c.act == GGML_DECO_ACT_NORM_SILU_NORMS) {
                    for (auto & z : a) z = silu(z - m);
                } else if (c.act == GGML_DECO_ACT_SILU) {
                    for (auto & z : a) z = silu(z);
                } else {
                    for (auto & z : a) z = z > 0 ? z : 0;
                }
                for (int64_t r = 0; r < c.De; ++r) v[r] = (float) (a[r] * g[r] * s[e]);
                std::vector<float> vq = roundtrip(vdt_down, v.data(), c.De);
                for (int64_t i = 0; i < c.d; ++i) {
                    double acc = 0;
                    for (int64_t r = 0; r < c.De; ++r) acc += (double) Wd[e * c.d + i][r] * vq[r];
                    yref[t * c.d + i] += acc;
                }
            }
        }
    }

    // ---- op, sparse (with the never-active experts poisoned) and dense
    ggml_deco_moe_params p = { c.act, c.ract, c.rnorm, c.bias, 1e-5f, 0, -1 };
    const char * err = ggml_deco_moe_check(x, logits, up, gate, down, mean, norm, scale, bias, p);
    auto release = [&]() { ggml_backend_buffer_free(wbuf); ggml_free(ctx_w); ggml_free(ctx); };
    if (err) { printf("  FAIL %s: check: %s\n", describe(c).c_str(), err); release(); return false; }

    auto run = [&](int flags) {
        ggml_deco_moe_params pp = p; pp.flags = flags;
        ggml_tensor * out = ggml_deco_moe(ctx, x, logits, up, gate, down, mean, norm, scale, bias, pp);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, out);
        ggml_graph_compute_with_ctx(ctx, gf, n_threads);
        return std::vector<float>((float *) out->data, (float *) out->data + c.d * c.T);
    };
    std::vector<float> ydense = run(GGML_DECO_FLAG_DENSE);
    for (int64_t e = 0; e < c.E; ++e) {
        if (never_active[e]) { poison_expert(w_up, e); if (gate) poison_expert(w_gate, e); poison_expert(w_down, e); }
    }
    std::vector<float> ysparse = run(0);

    double ymax = 1e-30, dmax = 0, dd = 0;
    bool finite = true;
    for (int64_t i = 0; i < c.d * c.T; ++i) {
        ymax = std::max(ymax, fabs(yref[i]));
        finite = finite && std::isfinite(ysparse[i]);
        dmax = std::max(dmax, fabs(ysparse[i] - yref[i]));
        dd   = std::max(dd, (double) fabsf(ysparse[i] - ydense[i]));
    }
    const bool all_zero_ref = ymax <= 1e-30;
    const double nerr = all_zero_ref ? dmax : dmax / ymax;
    const double nerr_dense = all_zero_ref ? dd : dd / ymax;
    // F16 where ggml-cpu has ARM FP16 vector arithmetic: F16 rows are dotted with F16 accumulators (~1e-3).
    // Q8 activations: one that lies within float rounding of a step boundary can round one step apart in
    // the op and the reference, a 1/127 step of one activation (up to 4.5e-4 seen on aarch64, 1.9e-4 on x86).
    const double tol = c.type == GGML_TYPE_F32                            ? 1e-5
                     : c.type == GGML_TYPE_F16 && ggml_cpu_has_fp16_va()  ? 5e-3
                     : ggml_is_quantized(vdt_down)                        ? 1e-3
                     :                                                      2e-4;
    // dense and sparse evaluation give an expert different numbers of tokens; with F16 accumulators the gemm's
    // tiling (which depends on that number) changes the rounding; elsewhere they agree to float rounding
    const double tol_dense = c.type == GGML_TYPE_F16 && ggml_cpu_has_fp16_va() ? 2e-3 : 1e-6;
    const bool ok = finite && nerr <= tol && nerr_dense <= tol_dense;
    if (!ok || g_verbose) {
        printf("  %s %s: nerr=%.3g (tol %.1g) dense-vs-sparse=%.3g finite=%d\n", ok ? "ok  " : "FAIL",
               describe(c).c_str(), nerr, tol, nerr_dense, (int) finite);
    }
    release();
    return ok;
}

// a context for one ggml_mul_mat of n vectors of length k against `rows` rows (plus `extra` bytes of weights),
// with room for the work buffer, which grows with the threads
ggml_context * mul_mat_context(int64_t k, int64_t rows, int64_t n, int n_threads, size_t extra = 0) {
    const size_t mem = (size_t) (k * n * 8 + rows * n * 8) * sizeof(float) + extra + 16 * ggml_tensor_overhead() +
                       ggml_graph_overhead() + ((size_t) (n_threads + 1) << 20);
    ggml_init_params ip = { mem, nullptr, false };
    return ggml_init(ip);
}

// w . x through a one-node graph on the CPU backend: the path a model's matmuls take
std::vector<float> mul_mat_on_cpu(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, int n_threads) {
    ggml_tensor * out = ggml_mul_mat(ctx, w, x);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_graph_compute_with_ctx(ctx, gf, n_threads);
    return std::vector<float>((float *) out->data, (float *) out->data + ggml_nelements(out));
}

// got equals want to 1e-5 of max |want| (a NaN fails); prints `what` when it fails, or always with -v
bool check_product(const std::string & what, const std::vector<float> & got, const std::vector<float> & want) {
    double ymax = 1e-30, dmax = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        ymax = std::max(ymax, (double) fabsf(want[i]));
        dmax = std::isfinite(got[i]) ? std::max(dmax, (double) fabsf(got[i] - want[i])) : INFINITY;
    }
    const bool ok = dmax / ymax <= 1e-5;
    if (!ok || g_verbose) {
        printf("  %s %s: nerr=%.3g (tol 1e-05)\n", ok ? "ok  " : "FAIL", what.c_str(), dmax / ymax);
    }
    return ok;
}

std::string describe_mul_mat(const char * type, int64_t k, int64_t rows, int64_t n) {
    char buf[128];
    snprintf(buf, sizeof(buf), "mul_mat type=%s k=%lld rows=%lld n=%lld", type, (long long) k, (long long) rows, (long long) n);
    return buf;
}

// ggml_mul_mat of n vectors with weights in the CPU_REPACK buffer against the same weights in the plain buffer
bool run_mul_mat_case(ggml_type type, int64_t k, int64_t rows, int64_t n, int n_threads) {
    std::mt19937 rng(99 + (unsigned) n);
    ggml_init_params ipw = { 2 * ggml_tensor_overhead(), nullptr, true };
    ggml_context * ctx_w = ggml_init(ipw);
    expert_weight w_plain, w_repacked;
    w_plain.t = ggml_new_tensor_2d(ctx_w, type, k, rows);
    ggml_backend_buffer_t buf_plain = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, ggml_backend_cpu_buffer_type());
    ggml_context * ctx_r = ggml_init(ipw);
    w_repacked.t = ggml_new_tensor_2d(ctx_r, type, k, rows);
    ggml_backend_buffer_t buf_repacked = ggml_backend_alloc_ctx_tensors_from_buft(ctx_r, deco_repack_buffer_type());
    fill_weights(w_plain, rng, 1.0f / sqrtf((float) k));
    w_repacked.host = w_plain.host;
    w_repacked.upload();

    ggml_context * ctx = mul_mat_context(k, rows, n, n_threads);
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n);
    std::uniform_real_distribution<float> U(-1.0f, 1.0f);
    for (int64_t i = 0; i < k * n; ++i) ((float *) x->data)[i] = U(rng);
    const std::vector<float> want = mul_mat_on_cpu(ctx, w_plain.t, x, n_threads);
    const std::vector<float> got  = mul_mat_on_cpu(ctx, w_repacked.t, x, n_threads);
    const bool ok = check_product(describe_mul_mat((std::string(ggml_type_name(type)) + "(repacked)").c_str(), k, rows, n), got, want);
    ggml_backend_buffer_free(buf_plain);
    ggml_backend_buffer_free(buf_repacked);
    ggml_free(ctx_w);
    ggml_free(ctx_r);
    ggml_free(ctx);
    return ok;
}

// ggml_mul_mat of n vectors with weights of a plain type (Q5_K, Q6_K, Q8_0, Q5_0, Q5_1: small-batch kernels from 2
// vectors) against the type's vec_dot called for every row and vector
bool run_plain_mul_mat_case(ggml_type type, int64_t k, int64_t rows, int64_t n, int n_threads) {
    std::mt19937 rng(7 + (unsigned) n);
    ggml_context * ctx = mul_mat_context(k, rows, n, n_threads, ggml_row_size(type, k) * rows);
    ggml_tensor * w = ggml_new_tensor_2d(ctx, type, k, rows);
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n);
    std::uniform_real_distribution<float> U(-1.0f, 1.0f);
    std::vector<float> row(k);
    for (int64_t r = 0; r < rows; ++r) {
        for (auto & v : row) v = U(rng) / sqrtf((float) k);
        ggml_quantize_chunk(type, row.data(), (char *) w->data + r * w->nb[1], 0, 1, k, nullptr);
    }
    for (int64_t i = 0; i < k * n; ++i) ((float *) x->data)[i] = U(rng);

    const auto * tr = ggml_get_type_traits_cpu(type);
    std::vector<float> want(rows * n);
    for (int64_t v = 0; v < n; ++v) {
        const std::vector<uint8_t> q = quantize_row(tr->vec_dot_type, (const float *) x->data + v * k, k);
        for (int64_t r = 0; r < rows; ++r) {
            tr->vec_dot((int) k, &want[v * rows + r], 0, (const char *) w->data + r * w->nb[1], 0, q.data(), 0, 1);
        }
    }
    const bool ok = check_product(describe_mul_mat(ggml_type_name(type), k, rows, n), mul_mat_on_cpu(ctx, w, x, n_threads), want);
    ggml_free(ctx);
    return ok;
}

} // namespace

int main(int argc, char ** argv) {
    int n_threads = 2;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "-v") == 0) g_verbose = true;
        else n_threads = atoi(argv[i]);
    }
    ggml_cpu_init();
    // keep warnings and errors, drop the per-tensor debug lines of the repack buffer
    ggml_log_set([](ggml_log_level level, const char * text, void *) {
        if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
    }, nullptr);

    std::vector<case_params> cases;
    const ggml_type types[] = { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q5_0, GGML_TYPE_Q4_0 };
    struct shape { int64_t d, De, E, T; };
    const shape shapes[] = { {64, 32, 13, 1}, {96, 64, 42, 5}, {128, 64, 77, 1}, {64, 32, 180, 3}, {256, 64, 1, 2}, {160, 32, 33, 33} };

    // types x shapes with the DECO defaults (norm_silu, relu router, simple scale)
    for (ggml_type t : types) {
        for (const shape & s : shapes) {
            for (int lm : {0, 1, 2}) {
                cases.push_back({t, s.d, s.De, s.E, s.T, GGML_DECO_ACT_NORM_SILU, false, GGML_DECO_ROUTER_RELU,
                                 GGML_DECO_RNORM_SIMPLE, false, GGML_DECO_BIAS_NONE, lm});
            }
        }
    }
    // K-quants need De % 256 == 0
    cases.push_back({GGML_TYPE_Q4_K, 256, 256, 9, 3, GGML_DECO_ACT_NORM_SILU, false, GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_SIMPLE, false, GGML_DECO_BIAS_NONE, 0});
    cases.push_back({GGML_TYPE_Q6_K, 256, 256, 9, 2, GGML_DECO_ACT_NORM_SILU, true,  GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_RMS,    false, GGML_DECO_BIAS_NONE, 0});
    // variants
    for (ggml_type t : { GGML_TYPE_F32, GGML_TYPE_Q8_0 }) {
        for (int act = 0; act < GGML_DECO_ACT_COUNT; ++act) {
            for (bool gated : {false, true}) {
                cases.push_back({t, 96, 32, 21, 4, (ggml_deco_act) act, gated, GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_SIMPLE, false, GGML_DECO_BIAS_NONE, 0});
            }
        }
        for (int rn = 0; rn < GGML_DECO_RNORM_COUNT; ++rn) {
            for (int ra = 0; ra < GGML_DECO_ROUTER_COUNT; ++ra) {
                for (bool scalar : {false, true}) {
                    if (rn == GGML_DECO_RNORM_NONE && scalar) continue;
                    cases.push_back({t, 64, 32, 17, 3, GGML_DECO_ACT_NORM_SILU, false, (ggml_deco_router_act) ra, (ggml_deco_router_norm) rn, scalar, GGML_DECO_BIAS_NONE, 0});
                }
            }
        }
        for (int b = 1; b < GGML_DECO_BIAS_COUNT; ++b) {
            cases.push_back({t, 64, 32, 17, 3, GGML_DECO_ACT_NORM_SILU, false, GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_SIMPLE, false, (ggml_deco_bias_mode) b, 0});
            cases.push_back({t, 64, 32, 17, 3, GGML_DECO_ACT_NORM_SILU, false, GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_RMS, false, (ggml_deco_bias_mode) b, 2});
        }
    }

    // weights in the CPU_REPACK buffer, for the types this CPU repacks
    std::string repacked_types;
    for (ggml_type t : { GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_IQ4_NL, GGML_TYPE_Q4_K }) {
        const bool k_quant = t == GGML_TYPE_Q4_K;
        if (!deco_repack_accepts(t, 256, k_quant ? 256 : 64, 4)) continue;
        repacked_types += std::string(" ") + ggml_type_name(t);
        if (k_quant) {
            cases.push_back({t, 256, 256, 9, 5, GGML_DECO_ACT_NORM_SILU, true, GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_SIMPLE, false, GGML_DECO_BIAS_NONE, 0, true});
            continue;
        }
        for (const shape & s : shapes) {
            for (int lm : {0, 1, 2}) {
                cases.push_back({t, s.d, s.De, s.E, s.T, GGML_DECO_ACT_NORM_SILU, false, GGML_DECO_ROUTER_RELU,
                                 GGML_DECO_RNORM_SIMPLE, false, GGML_DECO_BIAS_NONE, lm, true});
            }
        }
        cases.push_back({t, 96, 32, 21, 9, GGML_DECO_ACT_NORM_SILU, true, GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_RMS, false, GGML_DECO_BIAS_NONE, 0, true});
    }

    // small batches (a speculative verification batch, a short prompt), around the small-batch kernels' limit
    for (int64_t T : {2, 3, 5, 8, 16, 17}) {
        for (ggml_type t : { GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_F16 }) {
            for (bool repacked : {false, true}) {
                if (repacked && !deco_repack_accepts(t, 128, 64, 40)) continue;
                for (int lm : {0, 2}) {
                    cases.push_back({t, 128, 64, 40, T, GGML_DECO_ACT_NORM_SILU, T == 5, GGML_DECO_ROUTER_RELU,
                                     GGML_DECO_RNORM_SIMPLE, false, GGML_DECO_BIAS_NONE, lm, repacked});
                }
            }
        }
    }

    // the K-quant presets' expert layers at the DECO-0.5B width: up rows of 1280 in a K-quant, down rows of 64 in
    // the type the preset falls back to (Q4_K_M: Q5_0 or Q8_0, Q5_K_M: Q5_1 or Q8_0, Q6_K: Q8_0), 1 to 17 tokens
    for (const auto & [up, down] : { std::pair{ GGML_TYPE_Q5_K, GGML_TYPE_Q5_0 }, std::pair{ GGML_TYPE_Q5_K, GGML_TYPE_Q5_1 },
                                     std::pair{ GGML_TYPE_Q6_K, GGML_TYPE_Q8_0 } }) {
        for (int64_t T : {1, 2, 3, 5, 8, 16, 17}) {
            for (int lm : {0, 2}) {
                case_params c = {up, 1280, 64, 12, T, GGML_DECO_ACT_NORM_SILU, T == 3, GGML_DECO_ROUTER_RELU,
                                 GGML_DECO_RNORM_SIMPLE, false, GGML_DECO_BIAS_NONE, lm, false};
                c.down_type = down;
                cases.push_back(c);
            }
        }
    }

    // K-quant experts (up rows of 1280: 5 super-blocks) in batches of 1 to 17 tokens: repacked Q4_K, plain Q5_K
    // and Q6_K (the small-batch kernels from 2 tokens on)
    for (ggml_type t : { GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K }) {
        const bool repacked = t == GGML_TYPE_Q4_K;
        if (repacked && !deco_repack_accepts(t, 1280, 256, 12)) continue;
        for (int64_t T : {1, 2, 3, 5, 8, 16, 17}) {
            cases.push_back({t, 1280, 256, 12, T, GGML_DECO_ACT_NORM_SILU, T == 3, GGML_DECO_ROUTER_RELU,
                             GGML_DECO_RNORM_SIMPLE, false, GGML_DECO_BIAS_NONE, 0, repacked});
        }
    }

    int n_ok = 0, n_fail = 0;
    for (const auto & c : cases) {
        (run_case(c, n_threads) ? n_ok : n_fail)++;
    }
    // also with one thread and with more threads than work
    for (int nt : {1, 7}) {
        for (bool repacked : {false, true}) {
            if (repacked && !deco_repack_accepts(GGML_TYPE_Q4_0, 64, 32, 4)) continue;
            case_params c = {GGML_TYPE_Q4_0, 64, 32, 13, 2, GGML_DECO_ACT_NORM_SILU, false, GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_SIMPLE, false, GGML_DECO_BIAS_NONE, 0, repacked};
            (run_case(c, nt) ? n_ok : n_fail)++;
            c.T = 1;
            (run_case(c, nt) ? n_ok : n_fail)++;
        }
    }
    for (ggml_type t : { GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_IQ4_NL, GGML_TYPE_Q4_K }) {
        const int64_t k = t == GGML_TYPE_Q4_K ? 1280 : 256; // K-quants: the DECO-0.5B width, 5 super-blocks
        if (!deco_repack_accepts(t, k, t == GGML_TYPE_Q4_K ? 256 : 64, 1)) continue;
        for (int64_t n = 1; n <= 17; ++n) {
            (run_mul_mat_case(t, k, 96, n, n_threads) ? n_ok : n_fail)++;
        }
        (run_mul_mat_case(t, k, 96, 33, n_threads) ? n_ok : n_fail)++;
    }
    for (ggml_type t : { GGML_TYPE_Q6_K, GGML_TYPE_Q5_K }) {
        for (int64_t n = 1; n <= 17; ++n) {
            (run_plain_mul_mat_case(t, t == GGML_TYPE_Q5_K ? 1280 : 512, 80, n, n_threads) ? n_ok : n_fail)++;
        }
        (run_plain_mul_mat_case(t, 512, 80, 33, n_threads) ? n_ok : n_fail)++;
    }
    // rows of 32-weight blocks: the presets' 64- and 128-wide down projections, an odd block count, the
    // DECO-0.5B width; 83 rows (not a multiple of the kernel's 8)
    for (ggml_type t : { GGML_TYPE_Q8_0, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1 }) {
        for (int64_t k : { 64, 96, 128, 1280 }) {
            for (int64_t n = 1; n <= 17; ++n) {
                (run_plain_mul_mat_case(t, k, 83, n, n_threads) ? n_ok : n_fail)++;
            }
        }
        (run_plain_mul_mat_case(t, 128, 83, 33, n_threads) ? n_ok : n_fail)++;
    }
    printf("test-deco-ffn: %d passed, %d failed (repacked weights:%s)\n", n_ok, n_fail,
           repacked_types.empty() ? " none on this CPU" : repacked_types.c_str());
    return n_fail == 0 ? 0 : 1;
}
