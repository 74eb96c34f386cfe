// CPU kernel of GGML_OP_DECO_MOE (see ggml/include/ggml-deco.h for the math).
//
// One op evaluates a whole DECO expert layer for T tokens, reading only the active experts' weights.
//
// Decode (T == 1), one barrier:
//   every thread routes the token and converts x itself (private scratch, tiny);
//   the n_act*De up (gate) rows of the active experts are split evenly over the threads (vec_dot of length d);
//   barrier; every thread computes all activations (NormSiLU ...) * score, converted to the down vec_dot type;
//   output rows split over threads: the active experts' De-wide segments of a few W_down rows are gathered
//   into an L1-sized buffer and each row is ONE vec_dot of length n_act*De (not n_act dots of length De).
//
// Batch (T >= 2), grouped by expert:
//   routing per token (split over threads); thread 0 groups (expert, token) pairs by expert;
//   per expert, its tokens' x rows are gathered and U_e = X_e . W_e^T is computed by llamafile_sgemm
//   (ggml's tinyBLAS, as in mul_mat) or vec_dot; activations per pair; per expert C_e = V_e . W_down_e^T
//   by llamafile_sgemm, then every thread adds its output columns of C_e into the tokens' rows.
//   Small batches (T <= 16, a speculative verification) whose weights are read as plain rows: the active
//   experts' row groups are split over the threads by their work and no phase waits per expert.
//
// Expert weights in the CPU_REPACK buffer (types with an interleaved layout on this CPU, e.g. Q4_0 on AVX2 or
// NEON) are read with ggml's repacked gemv/gemm or the small-batch kernels (small-batch.h) through
// ggml_repack_product_traits (repack.h): per active expert, over whole row groups, all its tokens at once,
// instead of the gather + vec_dot.
// All other dot products go through ggml's type traits (vec_dot / from_float of vec_dot_type) or llamafile's
// gemm, so every SIMD path of ggml (AVX2, AVX-512, NEON, ...) is used as is.

#include "deco-moe.h"

#include "ggml-deco.h"
#include "ggml-cpu.h"
#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "repack.h"
#include "small-batch.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__ARM_FEATURE_SVE) || defined(__ARM_FEATURE_MATMUL_INT8)
#undef GGML_USE_LLAMAFILE // as in ggml-cpu.c
#endif

#ifdef GGML_USE_LLAMAFILE
#include "llamafile/sgemm.h"
#endif

namespace {

struct deco_layout {
    int64_t d, De, E, T, P;
    ggml_type vdt_up, vdt_down;
    size_t row_x, row_v;
    size_t off_xq, off_s, off_mean, off_flag, off_cnt, off_off, off_ptok, off_u, off_g, off_vq;
    size_t off_xg, off_cb, off_stage, stage, off_priv, priv, seg, gb_size, off_bpriv, bpriv;
    int nth;
    size_t total;
};

inline size_t pad64(size_t x) { return (x + 63) & ~(size_t) 63; }

deco_layout make_layout(const ggml_tensor * node, int nth) {
    const ggml_tensor * up   = node->src[0];
    const ggml_tensor * down = node->src[1];
    const ggml_tensor * gate = node->src[2];
    const ggml_tensor * x    = node->src[3];

    deco_layout L;
    L.nth = std::max(1, nth);
    L.d  = up->ne[0];
    L.De = up->ne[1];
    L.E  = up->ne[2];
    L.T  = x->ne[1];
    L.P  = L.E * L.T;
    L.vdt_up   = ggml_get_type_traits_cpu(up->type)->vec_dot_type;
    L.vdt_down = ggml_get_type_traits_cpu(down->type)->vec_dot_type;
    L.row_x = ggml_row_size(L.vdt_up, L.d);
    L.row_v = ggml_row_size(L.vdt_down, L.De);

    size_t o = 0;
    L.off_xq   = o; o = pad64(o + L.T * L.row_x);
    L.off_s    = o; o = pad64(o + L.T * L.E * sizeof(float));
    L.off_mean = o; o = pad64(o + L.T * sizeof(float));
    L.off_flag = o; o = pad64(o + L.T * L.E);
    L.off_cnt  = o; o = pad64(o + L.E * sizeof(int32_t));
    L.off_off  = o; o = pad64(o + (L.E + 1) * sizeof(int64_t));
    L.off_ptok = o; o = pad64(o + L.P * sizeof(int32_t));
    L.off_u    = o; o = pad64(o + L.P * L.De * sizeof(float));
    L.off_g    = o; o = pad64(o + (gate ? L.P * L.De * sizeof(float) : 0));
    L.off_vq   = o; o = pad64(o + L.P * L.row_v);
    // prefill (T >= 2): two buffers of one expert's gathered x rows, two C buffers for the down gemm
    L.off_xg   = o; o = pad64(o + (L.T >= 2 ? 2 * L.T * L.row_x : 0));
    L.off_cb   = o; o = pad64(o + (L.T >= 2 ? 2 * L.T * L.d * sizeof(float) : 0));
    // prefill: per-thread staging of 4 rows (x or activations) being quantized for a gemm
    L.stage    = pad64(4 * std::max(L.d, L.De) * sizeof(float));
    L.off_stage = o; o = pad64(o + (L.T >= 2 ? L.nth * L.stage : 0));
    // decode (T == 1): per-thread private routing state + gather buffer for the down projection
    L.seg      = ggml_row_size(down->type, L.De);
    L.gb_size  = pad64(std::max<size_t>(32768, L.E * L.seg) + L.E * L.seg);
    L.priv     = pad64(L.row_x) + pad64(L.E * sizeof(float)) * 2 + pad64(L.E) + pad64(L.E * sizeof(int32_t))
               + pad64((L.E + 1) * sizeof(int64_t)) + pad64(L.E * L.row_v) + pad64(L.E * L.De * sizeof(float)) + L.gb_size
               + pad64(L.d * sizeof(float));
    L.off_priv = o; o = pad64(o + (L.T == 1 ? L.nth * L.priv : 0));
    // small batches: per-thread list of the active experts and gather buffer of one expert's x rows
    L.bpriv    = pad64(L.E * sizeof(int32_t)) + pad64(L.T * L.row_x);
    L.off_bpriv = o; o = pad64(o + (L.T >= 2 && L.T <= GGML_SMALL_BATCH_MAX ? L.nth * L.bpriv : 0));
    L.total = o + 64; // slack for aligning wdata
    return L;
}

// this thread's share [first, second) of n rows, cut on multiples of `unit` (n is a multiple of unit)
inline std::pair<int64_t, int64_t> thread_rows(int64_t n, int64_t unit, int ith, int nth) {
    const int64_t groups = n / unit;
    return { groups * ith / nth * unit, groups * (ith + 1) / nth * unit };
}

} // namespace

extern "C" size_t ggml_cpu_deco_moe_wsize(const ggml_tensor * node, int n_threads) {
    return make_layout(node, n_threads).total;
}

extern "C" bool ggml_cpu_deco_moe_supported(const ggml_tensor * node) {
    const ggml_tensor * up   = node->src[0];
    const ggml_tensor * down = node->src[1];
    for (const ggml_tensor * w : { up, down }) {
        const auto * tr = ggml_get_type_traits_cpu(w->type);
        if (!tr || !tr->vec_dot || tr->vec_dot_type == GGML_TYPE_COUNT) {
            return false;
        }
        const auto * trv = ggml_get_type_traits_cpu(tr->vec_dot_type);
        if (!trv || !trv->from_float) {
            return false;
        }
    }
    const int64_t d  = up->ne[0];
    const int64_t De = up->ne[1];
    const ggml_type vdt_up   = ggml_get_type_traits_cpu(up->type)->vec_dot_type;
    const ggml_type vdt_down = ggml_get_type_traits_cpu(down->type)->vec_dot_type;
    return d % ggml_blck_size(up->type) == 0 && d % ggml_blck_size(vdt_up) == 0 &&
           De % ggml_blck_size(down->type) == 0 && De % ggml_blck_size(vdt_down) == 0 &&
           node->src[3]->type == GGML_TYPE_F32 && node->src[4]->type == GGML_TYPE_F32;
}

// router scores and computed flags for one token
static void deco_route_token(const ggml_deco_moe_params & p, int64_t E, const float * raw,
                                const float * scale, int64_t n_scale, const float * bias,
                                bool dense, float * s, uint8_t * flag) {
    ggml_deco_moe_router_active(&p, E, raw, bias, flag);
    for (int64_t e = 0; e < E; ++e) {
        float r = raw[e] > 0.0f ? raw[e] : 0.0f;
        if (p.router_act == GGML_DECO_ROUTER_SQRELU) r *= r;
        s[e] = flag[e] ? r : 0.0f;
    }
    switch (p.router_norm) {
        case GGML_DECO_RNORM_NONE: break;
        case GGML_DECO_RNORM_SIMPLE:
            for (int64_t e = 0; e < E; ++e) s[e] *= scale[n_scale == 1 ? 0 : e];
            break;
        case GGML_DECO_RNORM_RMS: {
            double ss = 0.0;
            for (int64_t e = 0; e < E; ++e) ss += (double) s[e] * s[e];
            const float inv = (float) (1.0 / sqrt(ss / (double) E + (double) p.eps));
            for (int64_t e = 0; e < E; ++e) s[e] = s[e] * inv * scale[n_scale == 1 ? 0 : e];
        } break;
        default: break;
    }
    for (int64_t e = 0; e < E; ++e) {
        if (!flag[e]) s[e] = 0.0f;                        // inactive experts contribute exactly 0
        flag[e] = dense ? 1 : (flag[e] && s[e] != 0.0f);  // which experts are computed
    }
}


namespace {

// Gather, for output rows [ic, ie), the np active experts' row segments (seg bytes = De elements, whole
// blocks) of W_down into gb (row-major, rowcat = np*seg bytes per row). Fixed segment sizes of the common
// types are templates so that each copy is a few plain moves, not a memcpy call.
template <size_t N>
void gather_fixed(char * GGML_RESTRICT gb, const char * const * GGML_RESTRICT src, int64_t np, size_t nb1,
                  int64_t ic, int64_t ie) {
    const size_t rowcat = np * N;
    for (int64_t k = 0; k < np; ++k) {
        const char * s = src[k] + ic * nb1;
        char * d = gb + k * N;
        for (int64_t i = ic; i < ie; ++i, s += nb1, d += rowcat) {
            __builtin_memcpy(d, s, N);
        }
    }
}

void gather_any(char * GGML_RESTRICT gb, const char * const * GGML_RESTRICT src, int64_t np, size_t nb1,
                int64_t ic, int64_t ie, size_t seg) {
    const size_t rowcat = np * seg;
    for (int64_t k = 0; k < np; ++k) {
        for (int64_t i = ic; i < ie; ++i) {
            memcpy(gb + (i - ic) * rowcat + k * seg, src[k] + i * nb1, seg);
        }
    }
}

void gather_segments(char * gb, const char * const * src, int64_t np, size_t nb1, int64_t ic, int64_t ie, size_t seg) {
    switch (seg) {
        case 18:  gather_fixed<18> (gb, src, np, nb1, ic, ie); break;  // q4_0 x 32
        case 22:  gather_fixed<22> (gb, src, np, nb1, ic, ie); break;  // q5_0 x 32
        case 34:  gather_fixed<34> (gb, src, np, nb1, ic, ie); break;  // q8_0 x 32
        case 36:  gather_fixed<36> (gb, src, np, nb1, ic, ie); break;  // q4_0 x 64
        case 44:  gather_fixed<44> (gb, src, np, nb1, ic, ie); break;  // q5_0 x 64
        case 64:  gather_fixed<64> (gb, src, np, nb1, ic, ie); break;  // f16/bf16 x 32
        case 68:  gather_fixed<68> (gb, src, np, nb1, ic, ie); break;  // q8_0 x 64
        case 128: gather_fixed<128>(gb, src, np, nb1, ic, ie); break;  // f16/bf16 x 64, f32 x 32
        case 256: gather_fixed<256>(gb, src, np, nb1, ic, ie); break;  // f32 x 64
        default:  gather_any(gb, src, np, nb1, ic, ie, seg); break;
    }
}

// activation of one (expert, token) pair: a = up (or gate) rows, g = up rows if gated; result * se -> v
// (SiLU through ggml's vectorized ggml_vec_silu_f32)
inline void deco_activate(const ggml_deco_moe_params & p, int64_t De, const float * a, const float * g,
                          float m, const float * nw, float se, float * v) {
    switch (p.act) {
        case GGML_DECO_ACT_NORM_SILU:
        case GGML_DECO_ACT_NORM_SILU_NOMEAN: {
            const float mm = ggml_deco_act_uses_mean(p.act) ? m : 0.0f;
            double ss = 0.0;
            for (int64_t i = 0; i < De; ++i) { const float z = a[i] - mm; v[i] = z; ss += (double) z * z; }
            const float inv = (float) (1.0 / sqrt(ss / (double) De + (double) p.eps));
            for (int64_t i = 0; i < De; ++i) v[i] = v[i] * inv * nw[i];
            ggml_vec_silu_f32((int) De, v, v);
        } break;
        case GGML_DECO_ACT_NORM_SILU_NORMS:
            for (int64_t i = 0; i < De; ++i) v[i] = a[i] - m;
            ggml_vec_silu_f32((int) De, v, v);
            break;
        case GGML_DECO_ACT_SILU:
            ggml_vec_silu_f32((int) De, v, a);
            break;
        case GGML_DECO_ACT_RELU:
        default:
            for (int64_t i = 0; i < De; ++i) v[i] = a[i] > 0.0f ? a[i] : 0.0f;
            break;
    }
    if (g) {
        for (int64_t i = 0; i < De; ++i) v[i] *= g[i] * se;
    } else {
        for (int64_t i = 0; i < De; ++i) v[i] *= se;
    }
}

struct deco_state {
    char    * xq;
    float   * S;
    float   * MEAN;
    uint8_t * FLAG;
    int32_t * CNT;
    int64_t * OFF;
    int32_t * PTOK;
};

// group the (expert, token) pairs by expert
void deco_group(int64_t E, int64_t T, const uint8_t * FLAG, int32_t * CNT, int64_t * OFF, int32_t * PTOK) {
    int64_t pos = 0;
    for (int64_t e = 0; e < E; ++e) {
        OFF[e] = pos;
        for (int64_t t = 0; t < T; ++t) {
            if (FLAG[t * E + e]) {
                PTOK[pos++] = (int32_t) t;
            }
        }
        CNT[e] = (int32_t) (pos - OFF[e]);
    }
    OFF[E] = pos;
}

} // namespace

namespace {

using ggml::cpu::repack::product_traits;

// the next expert's rows start where the hardware prefetcher has no stream yet: ask for their first lines
void prefetch_rows(const ggml_tensor * w, int64_t e, int64_t r0) {
    const char * p0 = (const char *) w->data + e * w->nb[2] + r0 * w->nb[1];
    for (int off = 0; off < 2048; off += 64) {
        __builtin_prefetch(p0 + off);
    }
}

// rows [r0, r1) of expert e of w times n quantized vectors q (row_q bytes apart; the layout pt->mul reads):
// out[v * ldo + r - r0]. Each row is read once for all vectors.
void rows_mul(const ggml_tensor * w, const product_traits * pt, ggml_vec_dot_t vec_dot, int64_t k, int64_t e,
              int64_t r0, int64_t r1, const char * q, int64_t n, size_t row_q, float * out, size_t ldo) {
    const char * w0 = (const char *) w->data + e * w->nb[2] + r0 * w->nb[1];
    if (pt) {
        pt->mul(k, w0, r1 - r0, q, n, out, ldo);
        return;
    }
    for (int64_t r = r0; r < r1; ++r) {
        for (int64_t v = 0; v < n; ++v) {
            vec_dot((int) k, out + v * ldo + (r - r0), 0, w0 + (r - r0) * w->nb[1], 0, q + v * row_q, 0, 1);
        }
    }
}

// One thread's evaluation of one GGML_OP_DECO_MOE node: the tensors, types, work-buffer layout and weight
// layouts every path needs, set up once; decode() for one token, batch() for several.
struct deco_op {
    const ggml_compute_params * params;
    ggml_tensor * dst;
    const ggml_tensor * up, * down, * gate, * x, * logits, * mean;
    const ggml_tensor * wa;  // the matrix the activation reads: gate if gated, else up
    ggml_deco_moe_params p;
    bool dense;
    int ith, nth;
    deco_layout L;
    int64_t d, De, E, T;
    char  * wbase;
    float * U, * G;
    char  * VQ;
    ggml_from_float_t from_float_x, from_float_v;
    ggml_vec_dot_t vec_dot_up, vec_dot_down;
    const float * scale_d, * bias_d, * nw;
    int64_t n_scale;
    // expert weights in the CPU_REPACK buffer are read with ggml's repacked gemv/gemm or the small-batch kernels
    // (row ranges must cover whole row groups); the others with vec_dot / llamafile_sgemm
    const product_traits * pt_a, * pt_up, * pt_down;
    int64_t unit_up, unit_down;

    deco_op(const ggml_compute_params * params, ggml_tensor * dst) : params(params), dst(dst) {
        up     = dst->src[0];
        down   = dst->src[1];
        gate   = dst->src[2];
        x      = dst->src[3];
        logits = dst->src[4];
        mean   = dst->src[5];
        wa     = gate ? gate : up;
        const ggml_tensor * norm  = dst->src[6];
        const ggml_tensor * scale = dst->src[7];
        const ggml_tensor * bias  = dst->src[8];

        p     = ggml_deco_moe_get_params(dst);
        dense = (p.flags & GGML_DECO_FLAG_DENSE) != 0;
        ith   = params->ith;
        nth   = params->nth;
        L     = make_layout(dst, nth);
        d = L.d, De = L.De, E = L.E, T = L.T;

        GGML_ASSERT(params->wsize >= L.total);
        wbase = (char *) (((uintptr_t) params->wdata + 63) & ~(uintptr_t) 63);
        U  = (float *) (wbase + L.off_u);
        G  = (float *) (wbase + L.off_g);
        VQ = wbase + L.off_vq;

        from_float_x = ggml_get_type_traits_cpu(L.vdt_up)->from_float;
        from_float_v = ggml_get_type_traits_cpu(L.vdt_down)->from_float;
        vec_dot_up   = ggml_get_type_traits_cpu(up->type)->vec_dot;
        vec_dot_down = ggml_get_type_traits_cpu(down->type)->vec_dot;
        scale_d = scale ? (const float *) scale->data : nullptr;
        bias_d  = bias  ? (const float *) bias->data  : nullptr;
        n_scale = scale ? ggml_nelements(scale) : 0;
        nw      = norm  ? (const float *) norm->data  : nullptr;

        pt_a    = ggml_repack_product_traits(wa);
        pt_up   = gate ? ggml_repack_product_traits(up) : nullptr;
        pt_down = ggml_repack_product_traits(down);
        GGML_ASSERT(!gate || (pt_a == nullptr) == (pt_up == nullptr)); // gate and up share one x layout
        auto row_unit = [](const product_traits * pt) { return pt ? pt->row_group() : (int64_t) 1; };
        unit_up   = std::max(row_unit(pt_a), row_unit(pt_up));
        unit_down = row_unit(pt_down);
    }

    void route_and_quantize(const deco_state & st, int64_t t) const {
        const float * raw = (const float *) ((const char *) logits->data + t * logits->nb[1]);
        deco_route_token(p, E, raw, scale_d, n_scale, bias_d, dense, st.S + t * E, st.FLAG + t * E);
        const float * xt = (const float *) ((const char *) x->data + t * x->nb[1]);
        from_float_x(xt, st.xq + t * L.row_x, d);
        float m = 0.0f;
        if (mean) {
            ggml_vec_dot_f32((int) d, &m, 0, (const float *) mean->data, 0, xt, 0, 1);
        }
        st.MEAN[t] = m;
    }

    // T == 1, one barrier: up (gate) rows of the active experts split over the threads, then every thread computes
    // the activations and its share of the output rows
    void decode() const {
        // routing and x quantization are tiny: every thread does them into its private area
        char * pr = wbase + L.off_priv + (size_t) ith * L.priv;
        auto take = [&](size_t n) { char * r = pr; pr += pad64(n); return r; };
        deco_state st;
        st.xq   = take(L.row_x);
        st.S    = (float   *) take(E * sizeof(float));
        float   * MEAN1 = (float *) take(E * sizeof(float)); // only [0] used
        st.MEAN = MEAN1;
        st.FLAG = (uint8_t *) take(E);
        st.CNT  = (int32_t *) take(E * sizeof(int32_t));
        st.OFF  = (int64_t *) take((E + 1) * sizeof(int64_t));
        char  * vq1 = take(E * L.row_v);
        float * v1  = (float *) take(E * De * sizeof(float));
        float * y1  = (float *) take(d * sizeof(float));       // one expert's output rows (repacked W_down)
        char  * gb  = pr;                                      // gather buffer, L.gb_size bytes
        st.PTOK = nullptr;

        route_and_quantize(st, 0);
        // active experts in order: EXP[k] (reuse CNT as the list), pair k <-> expert EXP[k]
        int32_t * EXP = st.CNT;
        int64_t np = 0;
        for (int64_t e = 0; e < E; ++e) {
            if (st.FLAG[e]) EXP[np++] = (int32_t) e;
        }

        // phase 3: the np*De up (gate) rows, split evenly over threads in whole row groups
        {
            const auto [g0, g1] = thread_rows(np * De, unit_up, ith, nth);
            for (int64_t gr = g0; gr < g1;) {
                const int64_t k = gr / De, r0 = gr % De, r1 = std::min(De, r0 + (g1 - gr));
                if (k + 1 < np && (k + 1) * De < g1) {
                    prefetch_rows(wa, EXP[k + 1], 0);
                }
                rows_mul(wa, pt_a, vec_dot_up, d, EXP[k], r0, r1, st.xq, 1, L.row_x, U + gr, 0);
                if (gate) {
                    rows_mul(up, pt_up, vec_dot_up, d, EXP[k], r0, r1, st.xq, 1, L.row_x, G + gr, 0);
                }
                gr += r1 - r0;
            }
        }
        ggml_barrier(params->threadpool);

        // phase 4 (redundant per thread, tiny): activations of all active experts, concatenated
        for (int64_t k = 0; k < np; ++k) {
            const int64_t e = EXP[k];
            deco_activate(p, De, U + k * De, gate ? G + k * De : nullptr, st.MEAN[0], nw, st.S[e], v1 + k * De);
        }
        if (np > 0) {
            from_float_v(v1, vq1, np * De);  // De is a multiple of the block size: same as per-expert rows
        }

        // phase 5: y[i] = dot(concat_k W_down[EXP[k]][i], concat_k v_k): gather the active segments of a
        // few rows into a small buffer, then one long vec_dot per row (instead of np short ones)
        {
            const auto [i0, i1] = thread_rows(d, unit_down, ith, nth);
            float * y = (float *) dst->data;
            if (np == 0) {
                memset(y + i0, 0, (i1 - i0) * sizeof(float));
                return;
            }
            if (pt_down) {
                // repacked W_down: one gemv per active expert over the owned rows, accumulated
                for (int64_t k = 0; k < np; ++k) {
                    if (k + 1 < np) {
                        prefetch_rows(down, EXP[k + 1], i0);
                    }
                    rows_mul(down, pt_down, vec_dot_down, De, EXP[k], i0, i1, vq1 + k * L.row_v, 1, L.row_v,
                             k == 0 ? y + i0 : y1, 0);
                    if (k > 0) {
                        ggml_vec_acc_f32((int) (i1 - i0), y + i0, y1);
                    }
                }
                return;
            }
            const size_t seg = L.seg;
            const size_t rowcat = np * seg;
            // expert base pointers of W_down (reuses the private v1 area, no longer needed: vq1 holds v)
            const char ** src = (const char **) v1;
            for (int64_t k = 0; k < np; ++k) {
                src[k] = (const char *) down->data + EXP[k] * down->nb[2];
            }
            const int64_t RB = std::max<int64_t>(1, (int64_t) (32768 / rowcat));
            for (int64_t ic = i0; ic < i1; ic += RB) {
                const int64_t ie = std::min(i1, ic + RB);
                gather_segments(gb, src, np, down->nb[1], ic, ie, seg);
                for (int64_t i = ic; i < ie; ++i) {
                    vec_dot_down((int) (np * De), y + i, 0, gb + (i - ic) * rowcat, 0, vq1, 0, 1);
                }
            }
        }
    }

    // T >= 2, grouped by expert: routing (tokens split over threads), grouping, up (gate) rows, activations,
    // down projection, with a barrier between phases
    void batch() const {
        deco_state st;
        st.xq   = wbase + L.off_xq;
        st.S    = (float   *) (wbase + L.off_s);
        st.MEAN = (float   *) (wbase + L.off_mean);
        st.FLAG = (uint8_t *) (wbase + L.off_flag);
        st.CNT  = (int32_t *) (wbase + L.off_cnt);
        st.OFF  = (int64_t *) (wbase + L.off_off);
        st.PTOK = (int32_t *) (wbase + L.off_ptok);

        // phase 1: routing + x quantization, tokens split over threads
        {
            const int64_t t0 = T * ith / nth, t1 = T * (ith + 1) / nth;
            for (int64_t t = t0; t < t1; ++t) {
                route_and_quantize(st, t);
            }
        }
        ggml_barrier(params->threadpool);

        // phase 2: group the (expert, token) pairs by expert
        if (ith == 0) {
            deco_group(E, T, st.FLAG, st.CNT, st.OFF, st.PTOK);
        }
        ggml_barrier(params->threadpool);

        if (small_batch()) {
            up_small(st);
        } else {
            up_per_expert(st);
        }
        ggml_barrier(params->threadpool);
        activations(st);
        ggml_barrier(params->threadpool);
        down_batch(st);
    }

    // phase 3, small batches (a verification batch, a short prompt): each expert's tokens are few enough to be
    // read as plain rows, so the tokens' x rows converted in phase 1 serve every expert as they are. The up (gate)
    // row groups of all active experts are split over the threads by their work: a row group of an expert with
    // n tokens costs about 2 + 3n (the weights unpacked once, then one pass per token: the small-batch kernel's
    // cost measured at n = 1, 2, 4). A thread gathers the x rows of each expert it works on into its own buffer
    // and computes all of that expert's tokens in one pass over its rows. No barrier per expert.
    bool small_batch() const {
        return T <= GGML_SMALL_BATCH_MAX && (!pt_a || pt_a->plain_rows(T)) && (!pt_up || pt_up->plain_rows(T));
    }

    void up_small(const deco_state & st) const {
        const int32_t * CNT = st.CNT;
        const int64_t * OFF = st.OFF;
        const int32_t * PTOK = st.PTOK;
        char * pr = wbase + L.off_bpriv + (size_t) ith * L.bpriv;
        int32_t * EXP = (int32_t *) pr;                   // the active experts, in order
        char    * X   = pr + pad64(E * sizeof(int32_t));  // their x rows, one expert at a time
        int64_t np = 0;
        for (int64_t e = 0; e < E; ++e) {
            if (CNT[e]) EXP[np++] = (int32_t) e;
        }
        auto group_cost = [&](int64_t k) { return 2 + 3 * (int64_t) CNT[EXP[k]]; };
        const int64_t groups = De / unit_up;
        int64_t total = 0;
        for (int64_t k = 0; k < np; ++k) {
            total += groups * group_cost(k);
        }
        const int64_t w0 = total * ith / nth, w1 = total * (ith + 1) / nth;
        int64_t done = 0; // work of the experts before EXP[k]
        for (int64_t k = 0; k < np; ++k) {
            const int64_t e = EXP[k], cnt = CNT[e], cost = group_cost(k);
            // how many of this expert's row groups start before work w
            auto starting_before = [&](int64_t w) { return w <= done ? 0 : std::min(groups, (w - done + cost - 1) / cost); };
            const int64_t r0 = starting_before(w0) * unit_up, r1 = starting_before(w1) * unit_up;
            done += groups * cost;
            if (r0 == r1) continue;
            if (r1 == De && k + 1 < np && done < w1) {
                prefetch_rows(wa, EXP[k + 1], 0); // this thread goes on with the next expert
            }
            for (int64_t j = 0; j < cnt; ++j) {
                memcpy(X + j * L.row_x, st.xq + PTOK[OFF[e] + j] * L.row_x, L.row_x);
            }
            rows_mul(wa, pt_a, vec_dot_up, d, e, r0, r1, X, cnt, L.row_x, U + OFF[e] * De + r0, De);
            if (gate) {
                rows_mul(up, pt_up, vec_dot_up, d, e, r0, r1, X, cnt, L.row_x, G + OFF[e] * De + r0, De);
            }
        }
    }

    // phase 3, otherwise: per expert U_e[cnt x De] = X_e[cnt x d] . W_e^T, with ggml's gemm (repacked gemm, or
    // llamafile sgemm) where it applies, else vec_dot with the De rows split over threads. X_e (the expert's
    // tokens' x rows, converted) is gathered into one of two buffers that alternate, so one barrier per expert
    // suffices.
    void up_per_expert(const deco_state & st) const {
        const int32_t * CNT = st.CNT;
        const int64_t * OFF = st.OFF;
        const int32_t * PTOK = st.PTOK;
        char  * XG = wbase + L.off_xg;
        float * stage = (float *) (wbase + L.off_stage + (size_t) ith * L.stage);
        int buf = 0;
        for (int64_t e = 0; e < E; ++e) {
            const int64_t cnt = CNT[e];
            if (cnt == 0) continue;
            char * X = XG + (size_t) buf * T * L.row_x;
            if (pt_a && !pt_a->plain_rows(cnt)) {
                // the repacked gemm reads groups of 4 rows interleaved: quantize x rows 4 at a time
                for (int64_t g = ith; 4 * g < cnt; g += nth) {
                    const int64_t n = std::min<int64_t>(4, cnt - 4 * g);
                    for (int64_t j = 0; j < n; ++j) {
                        memcpy(stage + j * d, (const char *) x->data + PTOK[OFF[e] + 4 * g + j] * x->nb[1], d * sizeof(float));
                    }
                    pt_a->quantize(stage, n, d, X + 4 * g * L.row_x);
                }
            } else {
                for (int64_t k = cnt * ith / nth; k < cnt * (ith + 1) / nth; ++k) {
                    memcpy(X + k * L.row_x, st.xq + PTOK[OFF[e] + k] * L.row_x, L.row_x);
                }
            }
            ggml_barrier(params->threadpool);
            for (int pass = 0; pass < (gate ? 2 : 1); ++pass) {
                const ggml_tensor * w = pass == 0 ? wa : up;
                const product_traits * pt = pass == 0 ? pt_a : pt_up;
                float * C = (pass == 0 ? U : G) + OFF[e] * De;
                const char * A = (const char *) w->data + e * w->nb[2];
                if (pt) {
                    const auto [r0, r1] = thread_rows(De, unit_up, ith, nth);
                    if (r1 > r0) {
                        pt->mul(d, A + r0 * w->nb[1], r1 - r0, X, cnt, C + r0, De);
                    }
                    continue;
                }
                bool done = false;
    #ifdef GGML_USE_LLAMAFILE
                done = llamafile_sgemm(params, De, cnt, d / ggml_blck_size(w->type),
                                       A, w->nb[1] / ggml_type_size(w->type),
                                       X, L.row_x / ggml_type_size(L.vdt_up),
                                       C, De, w->type, L.vdt_up, GGML_TYPE_F32);
    #endif
                if (!done) {
                    const int64_t r0 = De * ith / nth, r1 = De * (ith + 1) / nth;
                    for (int64_t r = r0; r < r1; ++r) {
                        const char * row = A + r * w->nb[1];
                        for (int64_t k = 0; k < cnt; ++k) {
                            vec_dot_up((int) d, C + k * De + r, 0, row, 0, X + k * L.row_x, 0, 1);
                        }
                    }
                }
            }
            buf ^= 1;
        }
    }

    void activations(const deco_state & st) const {
        const int32_t * CNT = st.CNT;
        const int64_t * OFF = st.OFF;
        const int32_t * PTOK = st.PTOK;
        float * stage = (float *) (wbase + L.off_stage + (size_t) ith * L.stage);
        // phase 4: activation per pair, scaled by s_e, converted to the down vec_dot type; in groups of up to 4
        // pairs of one expert (the row groups of the repacked gemm), groups split over threads
        {
            int64_t group = 0;
            for (int64_t e = 0; e < E; ++e) {
                for (int64_t k0 = 0; k0 < CNT[e]; k0 += 4, ++group) {
                    if (group % nth != ith) continue;
                    const int64_t n = std::min<int64_t>(4, CNT[e] - k0);
                    for (int64_t j = 0; j < n; ++j) {
                        const int64_t pi = OFF[e] + k0 + j;
                        const int64_t t  = PTOK[pi];
                        deco_activate(p, De, U + pi * De, gate ? G + pi * De : nullptr, st.MEAN[t], nw, st.S[t * E + e], stage + j * De);
                    }
                    char * vq = VQ + (OFF[e] + k0) * L.row_v;
                    if (pt_down && !pt_down->plain_rows(CNT[e])) {
                        pt_down->quantize(stage, n, De, vq);
                    } else {
                        for (int64_t j = 0; j < n; ++j) {
                            from_float_v(stage + j * De, vq + j * L.row_v, De);
                        }
                    }
                }
            }
        }
    }

    void down_batch(const deco_state & st) const {
        const int32_t * CNT = st.CNT;
        const int64_t * OFF = st.OFF;
        const int32_t * PTOK = st.PTOK;
        float * CB = (float *) (wbase + L.off_cb);
        // phase 5: down projection. Each thread owns the output columns [i0, i1) of every token.
        // Repacked W_down: per expert, the thread's C_e columns by the repacked gemm, added to the tokens' outputs.
        // Otherwise per expert: C_e[cnt x d] = V_e . W_down_e^T by gemm (all threads), barrier, then each thread adds
        // its columns of C_e (C alternates between two buffers, so one barrier per expert); without gemm, vec_dot on
        // the owned columns directly.
        {
            const auto [i0, i1] = thread_rows(d, unit_down, ith, nth);
            for (int64_t t = 0; t < T; ++t) {
                float * y = (float *) ((char *) dst->data + t * dst->nb[1]);
                memset(y + i0, 0, (i1 - i0) * sizeof(float));
            }
            int buf = 0;
            for (int64_t e = 0; e < E; ++e) {
                const int64_t cnt = CNT[e];
                if (cnt == 0) continue;
                const char * A = (const char *) down->data + e * down->nb[2];
                if (pt_down) {
                    if (i1 == i0) continue;
                    float * C = CB + T * i0; // this thread's part of the C buffers: cnt x (i1 - i0)
                    pt_down->mul(De, A + i0 * down->nb[1], i1 - i0, VQ + OFF[e] * L.row_v, cnt, C, i1 - i0);
                    for (int64_t k = 0; k < cnt; ++k) {
                        float * y = (float *) ((char *) dst->data + PTOK[OFF[e] + k] * dst->nb[1]);
                        ggml_vec_acc_f32((int) (i1 - i0), y + i0, C + k * (i1 - i0));
                    }
                    continue;
                }
                bool done = false;
    #ifdef GGML_USE_LLAMAFILE
                float * C = CB + (size_t) buf * T * d;
                done = llamafile_sgemm(params, d, cnt, De / ggml_blck_size(down->type),
                                       A, down->nb[1] / ggml_type_size(down->type),
                                       VQ + OFF[e] * L.row_v, L.row_v / ggml_type_size(L.vdt_down),
                                       C, d, down->type, L.vdt_down, GGML_TYPE_F32);
                if (done) {
                    ggml_barrier(params->threadpool);
                    for (int64_t k = 0; k < cnt; ++k) {
                        float * y = (float *) ((char *) dst->data + PTOK[OFF[e] + k] * dst->nb[1]);
                        ggml_vec_acc_f32((int) (i1 - i0), y + i0, C + k * d + i0);
                    }
                    buf ^= 1;
                }
    #endif
                if (!done) {
                    for (int64_t i = i0; i < i1; ++i) {
                        const char * drow = A + i * down->nb[1];
                        for (int64_t k = 0; k < cnt; ++k) {
                            const int64_t pi = OFF[e] + k;
                            float sum;
                            vec_dot_down((int) De, &sum, 0, drow, 0, VQ + pi * L.row_v, 0, 1);
                            float * y = (float *) ((char *) dst->data + PTOK[pi] * dst->nb[1]);
                            y[i] += sum;
                        }
                    }
                }
            }
        }
    }
};

} // namespace

extern "C" void ggml_compute_forward_deco_moe(const ggml_compute_params * params, ggml_tensor * dst) {
    const deco_op op(params, dst);
    if (op.T == 1) {
        op.decode();
    } else {
        op.batch();
    }
}
