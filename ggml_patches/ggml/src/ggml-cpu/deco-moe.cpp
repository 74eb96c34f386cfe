// CPU kernel of GGML_OP_DECO_MOE (the math: ggml/include/ggml-deco.h and docs/deco.md, "DECO FFN").
//
// One op evaluates a whole DECO expert layer for T tokens, reading only the active experts' weights. All
// threads of the node take part; the steps of a path are separated by barriers.
//
// Decode (T == 1), one barrier:
//   routing: every thread routes the token and converts x itself (private scratch, tiny);
//   up: the n_act*De up (gate) rows of the active experts are split evenly over the threads (vec_dot of length d);
//   barrier; activations: every thread computes all of them (NormSiLU ...) * score, converted to the down
//   vec_dot type; down: output rows split over threads: the active experts' De-wide segments of a few W_down rows
//   are gathered into an L1-sized buffer and each row is ONE vec_dot of length n_act*De (not n_act of length De).
//
// Batch (T >= 2), grouped by expert:
//   routing: tokens split over threads; grouping: thread 0 lists the (expert, token) pairs by expert;
//   up: per expert, its tokens' x rows are gathered and U_e = X_e . W_e^T is computed by llamafile_sgemm
//   (ggml's tinyBLAS, as in mul_mat) or vec_dot; activations per pair; down: per expert C_e = V_e . W_down_e^T
//   by llamafile_sgemm, then every thread adds its output columns of C_e into the tokens' rows.
//   Small batches (T <= 16, a speculative verification) whose weights are read as plain rows: the active
//   experts' row groups are split over the threads by their work and the up step waits for no expert.
//
// Expert weights in the CPU_REPACK buffer (types with an interleaved layout on this CPU, e.g. Q4_0 on AVX2 or
// NEON) are read with ggml's repacked gemv/gemm or the small-batch kernels (small-batch.h) through
// ggml_repack_product_traits (repack.h): per active expert, over whole row groups, all its tokens at once,
// instead of the gather + vec_dot.
// All other dot products go through ggml's type traits (vec_dot / from_float of vec_dot_type) or llamafile's
// gemm, so every SIMD path of ggml (AVX2, AVX-512, NEON, ...) is used as is.
//
// The work buffer of each path is described once, by decode_scratch::cut and batch_scratch::cut: the same walk
// gives the size the graph plan reserves and the arrays the kernel uses.

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

using ggml::cpu::repack::product_traits;

constexpr size_t work_align = 64;

// decode gathers W_down segments in blocks of about this many bytes (L1-sized), at least one row at a time
constexpr size_t down_gather_bytes = 32768;

// Cuts the work buffer into typed arrays, each aligned to work_align. Without a base it only adds up their
// sizes: the work size (ggml_cpu_deco_moe_wsize) and the kernel's arrays come from the same walk (the scratch
// structs' cut()), so they cannot disagree.
class work_cutter {
  public:
    explicit work_cutter(char * base = nullptr) : base(base) {}

    template <typename T> T * take(size_t n) {
        T * area = base ? (T *) (base + used) : nullptr;
        used = GGML_PAD(used + n * sizeof(T), work_align);
        return area;
    }

    // one copy per thread of the arrays cut_one(work_cutter &) takes; cut_one runs last on thread ith's copy
    template <typename Cut> void take_per_thread(int nth, int ith, Cut && cut_one) {
        work_cutter sizer;
        cut_one(sizer);
        char * all = take<char>((size_t) nth * sizer.bytes());
        work_cutter own(all ? all + (size_t) ith * sizer.bytes() : nullptr);
        cut_one(own);
    }

    size_t bytes() const { return used; }

  private:
    char * base;
    size_t used = 0;
};

// the sizes of one node, the same when the graph is planned and when it runs
struct deco_shape {
    int64_t   d, De, E, T;
    bool      gated;
    ggml_type x_type;        // vec_dot type of the up (gate) weights: x is converted to it
    ggml_type act_type;      // vec_dot type of the down weights: the activations are converted to it
    size_t    x_row;         // bytes of one token's x in x_type
    size_t    act_row;       // bytes of one (expert, token) pair's De activations in act_type
    size_t    down_segment;  // bytes of one expert's De weights in one row of W_down

    explicit deco_shape(const ggml_tensor * node) {
        const ggml_tensor * up   = node->src[0];
        const ggml_tensor * down = node->src[1];
        d  = up->ne[0];
        De = up->ne[1];
        E  = up->ne[2];
        T  = node->src[3]->ne[1];
        gated        = node->src[2] != nullptr;
        x_type       = ggml_get_type_traits_cpu(up->type)->vec_dot_type;
        act_type     = ggml_get_type_traits_cpu(down->type)->vec_dot_type;
        x_row        = ggml_row_size(x_type, d);
        act_row      = ggml_row_size(act_type, De);
        down_segment = ggml_row_size(down->type, De);
    }
};

// The work buffer of decode (T == 1). Every thread routes the token and computes all activations itself, so
// only the up products are shared and no barrier is needed before the up step.
struct decode_scratch {
    // shared: the active experts' up products, concatenated in the order of `active`
    float * act_in;             // W_act . x, the activation's input (W_act: gate if gated, else up)
    float * up_in;              // W_up . x, the factor of a gated activation (gated only)
    // private to each thread
    char        * x_conv;       // x in x_type
    float       * scores;       // [E] routed scores
    uint8_t     * computed;     // [E] which experts are computed
    int32_t     * active;       // the computed experts, ascending
    float       * act;          // their activations times the score, concatenated
    char        * act_conv;     // the same in act_type (De is a multiple of its block size: one valid row)
    float       * expert_out;   // one expert's output rows (repacked W_down)
    const char ** down_experts; // W_down of each active expert
    char        * down_gather;  // the active experts' segments of a few W_down rows

    static decode_scratch cut(work_cutter & c, const deco_shape & s, int nth, int ith) {
        decode_scratch work;
        work.act_in = c.take<float>(s.E * s.De);
        work.up_in  = s.gated ? c.take<float>(s.E * s.De) : nullptr;
        c.take_per_thread(nth, ith, [&](work_cutter & own) {
            work.x_conv       = own.take<char>(s.x_row);
            work.scores       = own.take<float>(s.E);
            work.computed     = own.take<uint8_t>(s.E);
            work.active       = own.take<int32_t>(s.E);
            work.act          = own.take<float>(s.E * s.De);
            work.act_conv     = own.take<char>(s.E * s.act_row);
            work.expert_out   = own.take<float>(s.d);
            work.down_experts = own.take<const char *>(s.E);
            work.down_gather  = own.take<char>(std::max(down_gather_bytes, s.E * s.down_segment));
        });
        return work;
    }
};

// The work buffer of a batch (T >= 2). The (expert, token) pairs that are computed are grouped by expert:
// expert e's pairs are first_pair[e] .. first_pair[e + 1] - 1, in ascending token order.
struct batch_scratch {
    // per token
    char    * x_conv;           // x in x_type, x_row bytes per token
    float   * scores;           // [T][E] routed scores
    uint8_t * computed;         // [T][E] which experts are computed
    float   * means;            // [T] w_mean . x_t
    // per pair
    int64_t * first_pair;       // [E + 1]
    int32_t * pair_token;       // the token of each pair
    float   * act_in;           // De floats per pair: W_act . x_t (W_act: gate if gated, else up)
    float   * up_in;            // De floats per pair: W_up . x_t, the factor of a gated activation (gated only)
    char    * act_conv;         // act_row bytes per pair: activations times the score, in act_type
    // one expert at a time, two buffers that alternate (one barrier per expert)
    char    * x_gathered[2];    // the expert's tokens' x rows, as the up product reads them
    float   * down_out[2];      // its down product C_e [tokens][d]; repacked W_down: thread ith's columns in [0]
    // private to each thread
    float   * stage;            // 4 rows (x or activations) being converted for a gemm
    int32_t * active;           // small batches: the experts with pairs, ascending
    char    * x_rows;           // small batches: the x rows of one expert's tokens

    int64_t n_pairs(int64_t e) const { return first_pair[e + 1] - first_pair[e]; }

    static batch_scratch cut(work_cutter & c, const deco_shape & s, int nth, int ith) {
        const int64_t pairs = s.E * s.T;
        batch_scratch work;
        work.x_conv     = c.take<char>(s.T * s.x_row);
        work.scores     = c.take<float>(s.T * s.E);
        work.computed   = c.take<uint8_t>(s.T * s.E);
        work.means      = c.take<float>(s.T);
        work.first_pair = c.take<int64_t>(s.E + 1);
        work.pair_token = c.take<int32_t>(pairs);
        work.act_in     = c.take<float>(pairs * s.De);
        work.up_in      = s.gated ? c.take<float>(pairs * s.De) : nullptr;
        work.act_conv   = c.take<char>(pairs * s.act_row);
        for (int i = 0; i < 2; ++i) {
            work.x_gathered[i] = c.take<char>(s.T * s.x_row);
            work.down_out[i]   = c.take<float>(s.T * s.d);
        }
        const bool small = s.T <= GGML_SMALL_BATCH_MAX;
        c.take_per_thread(nth, ith, [&](work_cutter & own) {
            work.stage  = own.take<float>(4 * std::max(s.d, s.De));
            work.active = small ? own.take<int32_t>(s.E) : nullptr;
            work.x_rows = small ? own.take<char>(s.T * s.x_row) : nullptr;
        });
        return work;
    }
};

// bytes of the work buffer: the scratch of the node's path, plus the slack for aligning its start
size_t work_bytes(const ggml_tensor * node, int nth) {
    const deco_shape s(node);
    work_cutter sizer;
    if (s.T == 1) {
        decode_scratch::cut(sizer, s, nth, 0);
    } else {
        batch_scratch::cut(sizer, s, nth, 0);
    }
    return sizer.bytes() + work_align;
}

// this thread's share [first, second) of n rows, cut on multiples of `unit` (n is a multiple of unit)
std::pair<int64_t, int64_t> thread_rows(int64_t n, int64_t unit, int ith, int nth) {
    const int64_t groups = n / unit;
    return { groups * ith / nth * unit, groups * (ith + 1) / nth * unit };
}

// Copies rows [row_begin, row_end) of the n_experts matrices `experts` (rows row_stride bytes apart), segment
// bytes of each, into `out`: per row, the experts' segments side by side. The segment sizes of the common
// types are template arguments, so that each copy is a few plain moves, not a memcpy call.
template <size_t segment>
void gather_fixed(char * GGML_RESTRICT out, const char * const * GGML_RESTRICT experts, int64_t n_experts,
                  size_t row_stride, int64_t row_begin, int64_t row_end) {
    const size_t out_row = n_experts * segment;
    for (int64_t k = 0; k < n_experts; ++k) {
        const char * src = experts[k] + row_begin * row_stride;
        char * dst = out + k * segment;
        for (int64_t i = row_begin; i < row_end; ++i, src += row_stride, dst += out_row) {
            __builtin_memcpy(dst, src, segment);
        }
    }
}

void gather_any(char * GGML_RESTRICT out, const char * const * GGML_RESTRICT experts, int64_t n_experts,
                size_t row_stride, int64_t row_begin, int64_t row_end, size_t segment) {
    const size_t out_row = n_experts * segment;
    for (int64_t k = 0; k < n_experts; ++k) {
        for (int64_t i = row_begin; i < row_end; ++i) {
            memcpy(out + (i - row_begin) * out_row + k * segment, experts[k] + i * row_stride, segment);
        }
    }
}

void gather_segments(char * out, const char * const * experts, int64_t n_experts, size_t row_stride,
                     int64_t row_begin, int64_t row_end, size_t segment) {
    switch (segment) {
        case 18:  gather_fixed<18> (out, experts, n_experts, row_stride, row_begin, row_end); break; // q4_0 x 32
        case 22:  gather_fixed<22> (out, experts, n_experts, row_stride, row_begin, row_end); break; // q5_0 x 32
        case 34:  gather_fixed<34> (out, experts, n_experts, row_stride, row_begin, row_end); break; // q8_0 x 32
        case 36:  gather_fixed<36> (out, experts, n_experts, row_stride, row_begin, row_end); break; // q4_0 x 64
        case 44:  gather_fixed<44> (out, experts, n_experts, row_stride, row_begin, row_end); break; // q5_0 x 64
        case 64:  gather_fixed<64> (out, experts, n_experts, row_stride, row_begin, row_end); break; // f16/bf16 x 32
        case 68:  gather_fixed<68> (out, experts, n_experts, row_stride, row_begin, row_end); break; // q8_0 x 64
        case 128: gather_fixed<128>(out, experts, n_experts, row_stride, row_begin, row_end); break; // f16/bf16 x 64, f32 x 32
        case 256: gather_fixed<256>(out, experts, n_experts, row_stride, row_begin, row_end); break; // f32 x 64
        default:  gather_any(out, experts, n_experts, row_stride, row_begin, row_end, segment); break;
    }
}

// One expert weight tensor [k, rows, E] and how its rows are multiplied: ggml's repacked gemv/gemm or the
// small-batch kernels for weights in the CPU_REPACK buffer (row ranges cover whole row groups); plain rows by the
// type's small-batch kernel where it has one (small-batch.h), else vec_dot.
struct expert_matrix {
    const ggml_tensor       * t           = nullptr;
    const product_traits    * repacked    = nullptr;
    ggml_vec_dot_t            vec_dot     = nullptr;
    ggml_small_batch_rows_t   small_batch = nullptr;
    // the fewest vectors the kernel takes: as in mul_mat (small-batch.h), but 1 for 32-weight blocks (the
    // 64/128-wide down rows are 2-4 blocks, which one vec_dot call per row and vector costs more than)
    int64_t                   small_batch_from = 2;

    expert_matrix() = default;
    explicit expert_matrix(const ggml_tensor * t)
        : t(t), repacked(ggml_repack_product_traits(t)), vec_dot(ggml_get_type_traits_cpu(t->type)->vec_dot),
          small_batch(repacked ? nullptr : ggml_small_batch_rows_kernel(t->type)),
          small_batch_from(ggml_blck_size(t->type) == 32 ? 1 : ggml_small_batch_min_vectors(t->type)) {}

    const char * rows(int64_t e, int64_t r) const { return (const char *) t->data + e * t->nb[2] + r * t->nb[1]; }
    int64_t row_unit() const { return repacked ? repacked->row_group() : 1; } // 1 for an absent (ungated) up

    // the next expert's rows start where the hardware prefetcher has no stream yet: ask for their first lines
    void prefetch(int64_t e, int64_t r) const {
        const char * first = rows(e, r);
        for (int offset = 0; offset < 2048; offset += 64) {
            __builtin_prefetch(first + offset);
        }
    }

    // rows [r0, r1) of expert e times n converted vectors q (q_stride bytes apart; the layout `repacked` reads):
    // out[v * out_stride + r - r0]. Each row is read once for all vectors.
    void mul_rows(int64_t e, int64_t r0, int64_t r1, const char * q, int64_t n, size_t q_stride, float * out,
                  size_t out_stride) const {
        if (r1 <= r0) {
            return;
        }
        const int64_t k = t->ne[0];
        if (repacked) {
            repacked->mul(k, rows(e, r0), r1 - r0, q, n, out, out_stride);
            return;
        }
        if (small_batch && n >= small_batch_from) {
            // at most GGML_SMALL_BATCH_MAX vectors a pass: a token's result does not depend on how many tokens the
            // expert has, so dense and sparse evaluation agree exactly
            for (int64_t v0 = 0; v0 < n; v0 += GGML_SMALL_BATCH_MAX) {
                small_batch((int) k, out + v0 * out_stride, out_stride, rows(e, r0), t->nb[1], q + v0 * q_stride,
                            q_stride, (int) std::min<int64_t>(GGML_SMALL_BATCH_MAX, n - v0), (int) (r1 - r0));
            }
            return;
        }
        for (int64_t r = r0; r < r1; ++r) {
            for (int64_t v = 0; v < n; ++v) {
                vec_dot((int) k, out + v * out_stride + (r - r0), 0, rows(e, r), 0, q + v * q_stride, 0, 1);
            }
        }
    }
};

// One thread's evaluation of one GGML_OP_DECO_MOE node: the tensors, types and weight layouts every path needs,
// set up once; decode() for one token, batch() for several.
struct deco_op {
    const ggml_compute_params * params;
    ggml_tensor * dst;
    const ggml_tensor * x, * logits, * mean;
    expert_matrix w_act;     // the matrix the activation reads: gate if gated, else up
    expert_matrix w_up;      // gated only: up, the factor of the activation
    expert_matrix w_down;
    deco_shape s;
    int64_t d, De, E, T;
    ggml_deco_moe_params p;
    bool dense;
    int ith, nth;
    char * work_base;        // the work buffer, aligned
    ggml_from_float_t x_from_float, act_from_float;
    const float * scale, * bias, * norm_weight;
    int64_t n_scale;
    int64_t up_row_unit, down_row_unit;  // row ranges of a thread are cut on multiples of these

    deco_op(const ggml_compute_params * params, ggml_tensor * dst)
        : params(params), dst(dst), s(dst), d(s.d), De(s.De), E(s.E), T(s.T) {
        const ggml_tensor * up   = dst->src[0];
        const ggml_tensor * gate = dst->src[2];
        x      = dst->src[3];
        logits = dst->src[4];
        mean   = dst->src[5];
        w_act  = expert_matrix(gate ? gate : up);
        w_up   = gate ? expert_matrix(up) : expert_matrix();
        w_down = expert_matrix(dst->src[1]);
        GGML_ASSERT(!gate || (w_act.repacked == nullptr) == (w_up.repacked == nullptr)); // one x layout for both
        up_row_unit   = std::max(w_act.row_unit(), w_up.row_unit());
        down_row_unit = w_down.row_unit();

        p     = ggml_deco_moe_get_params(dst);
        dense = (p.flags & GGML_DECO_FLAG_DENSE) != 0;
        ith   = params->ith;
        nth   = params->nth;
        work_base = (char *) GGML_PAD((uintptr_t) params->wdata, work_align);

        x_from_float   = ggml_get_type_traits_cpu(s.x_type)->from_float;
        act_from_float = ggml_get_type_traits_cpu(s.act_type)->from_float;
        const ggml_tensor * norm_t  = dst->src[6];
        const ggml_tensor * scale_t = dst->src[7];
        const ggml_tensor * bias_t  = dst->src[8];
        scale       = scale_t ? (const float *) scale_t->data : nullptr;
        n_scale     = scale_t ? ggml_nelements(scale_t) : 0;
        bias        = bias_t  ? (const float *) bias_t->data  : nullptr;
        norm_weight = norm_t  ? (const float *) norm_t->data  : nullptr;
    }

    // the work buffer cut for this thread, checked against the size the graph plan reserved
    template <typename Scratch> Scratch cut_work() const {
        work_cutter cutter(work_base);
        const Scratch scratch = Scratch::cut(cutter, s, nth, ith);
        GGML_ASSERT(work_base + cutter.bytes() <= (char *) params->wdata + params->wsize);
        return scratch;
    }

    // token t's vector of x or logits, and of the result
    const float * token_vec(const ggml_tensor * m, int64_t t) const {
        return (const float *) ((const char *) m->data + t * m->nb[1]);
    }
    float * token_out(int64_t t) const { return (float *) ((char *) dst->data + t * dst->nb[1]); }

    // the routed scores of one token and which experts are computed (docs/deco.md, "DECO FFN")
    void score_token(const float * raw, float * scores, uint8_t * computed) const {
        ggml_deco_moe_router_active(&p, E, raw, bias, computed); // computed[] = active, for now
        for (int64_t e = 0; e < E; ++e) {
            float r = raw[e] > 0.0f ? raw[e] : 0.0f;
            if (p.router_act == GGML_DECO_ROUTER_SQRELU) r *= r;
            scores[e] = computed[e] ? r : 0.0f;
        }
        switch (p.router_norm) {
            case GGML_DECO_RNORM_NONE: break;
            case GGML_DECO_RNORM_SIMPLE:
                for (int64_t e = 0; e < E; ++e) scores[e] *= scale[n_scale == 1 ? 0 : e];
                break;
            case GGML_DECO_RNORM_RMS: {
                double ss = 0.0;
                for (int64_t e = 0; e < E; ++e) ss += (double) scores[e] * scores[e];
                const float inv = (float) (1.0 / sqrt(ss / (double) E + (double) p.eps));
                for (int64_t e = 0; e < E; ++e) scores[e] = scores[e] * inv * scale[n_scale == 1 ? 0 : e];
            } break;
            default: break;
        }
        for (int64_t e = 0; e < E; ++e) {
            if (!computed[e]) scores[e] = 0.0f;   // inactive experts contribute exactly 0
            computed[e] = dense ? 1 : (computed[e] && scores[e] != 0.0f);
        }
    }

    // routes token t and converts x_t to x_type; returns w_mean . x_t (0 without a mean row)
    float route_token(int64_t t, float * scores, uint8_t * computed, char * x_conv) const {
        score_token(token_vec(logits, t), scores, computed);
        const float * xt = token_vec(x, t);
        x_from_float(xt, x_conv, d);
        float m = 0.0f;
        if (mean) {
            ggml_vec_dot_f32((int) d, &m, 0, (const float *) mean->data, 0, xt, 0, 1);
        }
        return m;
    }

    // the activation of one (expert, token) pair times its score -> out[De]; m: the token's w_mean . x
    // (docs/deco.md, "DECO FFN"; SiLU through ggml's vectorized ggml_vec_silu_f32)
    void activate(const float * act_in, const float * up_in, float m, float score, float * out) const {
        switch (p.act) {
            case GGML_DECO_ACT_NORM_SILU:
            case GGML_DECO_ACT_NORM_SILU_NOMEAN: {
                const float shift = ggml_deco_act_uses_mean(p.act) ? m : 0.0f;
                double ss = 0.0;
                for (int64_t i = 0; i < De; ++i) { const float z = act_in[i] - shift; out[i] = z; ss += (double) z * z; }
                const float inv = (float) (1.0 / sqrt(ss / (double) De + (double) p.eps));
                for (int64_t i = 0; i < De; ++i) out[i] = out[i] * inv * norm_weight[i];
                ggml_vec_silu_f32((int) De, out, out);
            } break;
            case GGML_DECO_ACT_NORM_SILU_NORMS:
                for (int64_t i = 0; i < De; ++i) out[i] = act_in[i] - m;
                ggml_vec_silu_f32((int) De, out, out);
                break;
            case GGML_DECO_ACT_SILU:
                ggml_vec_silu_f32((int) De, out, act_in);
                break;
            case GGML_DECO_ACT_RELU:
            default:
                for (int64_t i = 0; i < De; ++i) out[i] = act_in[i] > 0.0f ? act_in[i] : 0.0f;
                break;
        }
        if (up_in) {
            for (int64_t i = 0; i < De; ++i) out[i] *= up_in[i] * score;
        } else {
            for (int64_t i = 0; i < De; ++i) out[i] *= score;
        }
    }

    // C[n x m] = B . A^T by llamafile's gemm, all threads together: A m rows of k elements of a's type (a->nb[1]
    // bytes apart), B n rows of b_type (b_row bytes apart), C rows ldc floats apart. False where it has no kernel
    // for the types (then nothing is written).
    bool sgemm(int64_t m, int64_t n, int64_t k, const ggml_tensor * a, const char * A, const char * B, size_t b_row,
               ggml_type b_type, float * C, int64_t ldc) const {
#ifdef GGML_USE_LLAMAFILE
        return llamafile_sgemm(params, m, n, k / ggml_blck_size(a->type), A, a->nb[1] / ggml_type_size(a->type),
                               B, b_row / ggml_type_size(b_type), C, ldc, a->type, b_type, GGML_TYPE_F32);
#else
        GGML_UNUSED_VARS(m, n, k, a, A, B, b_row, b_type, C, ldc);
        return false;
#endif
    }

    //
    // decode (T == 1)
    //

    // one token: routing, up, barrier, activations, down
    void decode() const {
        const decode_scratch work = cut_work<decode_scratch>();
        const float m = route_token(0, work.scores, work.computed, work.x_conv);
        int64_t n_active = 0;
        for (int64_t e = 0; e < E; ++e) {
            if (work.computed[e]) work.active[n_active++] = (int32_t) e;
        }
        decode_up(work, n_active);
        ggml_barrier(params->threadpool);
        decode_activations(work, n_active, m);

        const auto [i0, i1] = thread_rows(d, down_row_unit, ith, nth);
        if (n_active == 0) {
            memset((float *) dst->data + i0, 0, (i1 - i0) * sizeof(float));
        } else if (w_down.repacked) {
            decode_down_repacked(work, n_active, i0, i1);
        } else {
            decode_down_gathered(work, n_active, i0, i1);
        }
    }

    // the n_active*De up (gate) rows, split evenly over the threads in whole row groups
    void decode_up(const decode_scratch & work, int64_t n_active) const {
        const auto [begin, end] = thread_rows(n_active * De, up_row_unit, ith, nth);
        for (int64_t row = begin; row < end;) {
            const int64_t k = row / De, r0 = row % De, r1 = std::min(De, r0 + (end - row));
            if (k + 1 < n_active && (k + 1) * De < end) {
                w_act.prefetch(work.active[k + 1], 0);
            }
            w_act.mul_rows(work.active[k], r0, r1, work.x_conv, 1, s.x_row, work.act_in + row, 0);
            if (s.gated) {
                w_up.mul_rows(work.active[k], r0, r1, work.x_conv, 1, s.x_row, work.up_in + row, 0);
            }
            row += r1 - r0;
        }
    }

    // every thread: the activations of all active experts, concatenated, converted to act_type as one row
    void decode_activations(const decode_scratch & work, int64_t n_active, float m) const {
        for (int64_t k = 0; k < n_active; ++k) {
            activate(work.act_in + k * De, s.gated ? work.up_in + k * De : nullptr, m, work.scores[work.active[k]],
                     work.act + k * De);
        }
        if (n_active > 0) {
            act_from_float(work.act, work.act_conv, n_active * De);
        }
    }

    // repacked W_down: one gemv per active expert over the thread's output rows [i0, i1), accumulated
    void decode_down_repacked(const decode_scratch & work, int64_t n_active, int64_t i0, int64_t i1) const {
        float * y = (float *) dst->data + i0;
        for (int64_t k = 0; k < n_active; ++k) {
            if (k + 1 < n_active) {
                w_down.prefetch(work.active[k + 1], i0);
            }
            w_down.mul_rows(work.active[k], i0, i1, work.act_conv + k * s.act_row, 1, s.act_row,
                            k == 0 ? y : work.expert_out, 0);
            if (k > 0) {
                ggml_vec_acc_f32((int) (i1 - i0), y, work.expert_out);
            }
        }
    }

    // y[i] = dot(the active experts' segments of W_down row i, side by side, the activations concatenated): the
    // segments of a few rows are gathered into an L1-sized buffer, then one long vec_dot per row
    void decode_down_gathered(const decode_scratch & work, int64_t n_active, int64_t i0, int64_t i1) const {
        const size_t gathered_row = n_active * s.down_segment;
        for (int64_t k = 0; k < n_active; ++k) {
            work.down_experts[k] = w_down.rows(work.active[k], 0);
        }
        float * y = (float *) dst->data;
        const int64_t rows_per_gather = std::max<int64_t>(1, (int64_t) (down_gather_bytes / gathered_row));
        for (int64_t begin = i0; begin < i1; begin += rows_per_gather) {
            const int64_t end = std::min(i1, begin + rows_per_gather);
            gather_segments(work.down_gather, work.down_experts, n_active, w_down.t->nb[1], begin, end, s.down_segment);
            for (int64_t i = begin; i < end; ++i) {
                w_down.vec_dot((int) (n_active * De), y + i, 0, work.down_gather + (i - begin) * gathered_row, 0,
                               work.act_conv, 0, 1);
            }
        }
    }

    //
    // batch (T >= 2)
    //

    // several tokens: routing, grouping, up, activations, down, with a barrier between the steps
    void batch() const {
        const batch_scratch work = cut_work<batch_scratch>();
        for (int64_t t = T * ith / nth; t < T * (ith + 1) / nth; ++t) {
            work.means[t] = route_token(t, work.scores + t * E, work.computed + t * E, work.x_conv + t * s.x_row);
        }
        ggml_barrier(params->threadpool);
        if (ith == 0) {
            group_pairs(work);
        }
        ggml_barrier(params->threadpool);
        if (small_batch()) {
            up_small_batch(work);
        } else {
            up_per_expert(work);
        }
        ggml_barrier(params->threadpool);
        batch_activations(work);
        ggml_barrier(params->threadpool);
        batch_down(work);
    }

    // the computed (expert, token) pairs, grouped by expert
    void group_pairs(const batch_scratch & work) const {
        int64_t pair = 0;
        for (int64_t e = 0; e < E; ++e) {
            work.first_pair[e] = pair;
            for (int64_t t = 0; t < T; ++t) {
                if (work.computed[t * E + e]) {
                    work.pair_token[pair++] = (int32_t) t;
                }
            }
        }
        work.first_pair[E] = pair;
    }

    // Small batches (a verification batch, a short prompt): each expert's tokens are few enough to be read as
    // plain rows, so the tokens' x rows converted while routing serve every expert as they are.
    bool small_batch() const {
        const auto plain = [&](const expert_matrix & m) { return !m.repacked || m.repacked->plain_rows(T); };
        return T <= GGML_SMALL_BATCH_MAX && plain(w_act) && plain(w_up);
    }

    // The up (gate) row groups of all active experts are split over the threads by their work: a row group of an
    // expert with n tokens costs about 2 + 3n (the weights unpacked once, then one pass per token: the small-batch
    // kernel's cost measured at n = 1, 2, 4). A thread gathers the x rows of each expert it works on into its own
    // buffer and computes all of that expert's tokens in one pass over its rows. No barrier per expert.
    void up_small_batch(const batch_scratch & work) const {
        int64_t n_active = 0;
        for (int64_t e = 0; e < E; ++e) {
            if (work.n_pairs(e) > 0) work.active[n_active++] = (int32_t) e;
        }
        const int64_t groups = De / up_row_unit;
        const auto group_cost = [&](int64_t e) { return 2 + 3 * work.n_pairs(e); };
        int64_t total_cost = 0;
        for (int64_t k = 0; k < n_active; ++k) {
            total_cost += groups * group_cost(work.active[k]);
        }
        const int64_t cost_begin = total_cost * ith / nth, cost_end = total_cost * (ith + 1) / nth;
        int64_t cost_before = 0; // cost of the experts before active[k]
        for (int64_t k = 0; k < n_active; ++k) {
            const int64_t e = work.active[k], n = work.n_pairs(e), cost = group_cost(e);
            // how many of this expert's row groups start before cost `at`
            const auto groups_before = [&](int64_t at) {
                return at <= cost_before ? 0 : std::min(groups, (at - cost_before + cost - 1) / cost);
            };
            const int64_t r0 = groups_before(cost_begin) * up_row_unit, r1 = groups_before(cost_end) * up_row_unit;
            cost_before += groups * cost;
            if (r0 == r1) continue;
            if (r1 == De && k + 1 < n_active && cost_before < cost_end) {
                w_act.prefetch(work.active[k + 1], 0); // this thread goes on with the next expert
            }
            const int64_t first = work.first_pair[e];
            for (int64_t j = 0; j < n; ++j) {
                memcpy(work.x_rows + j * s.x_row, work.x_conv + work.pair_token[first + j] * s.x_row, s.x_row);
            }
            w_act.mul_rows(e, r0, r1, work.x_rows, n, s.x_row, work.act_in + first * De + r0, De);
            if (s.gated) {
                w_up.mul_rows(e, r0, r1, work.x_rows, n, s.x_row, work.up_in + first * De + r0, De);
            }
        }
    }

    // Otherwise, per expert: U_e[n x De] = X_e[n x d] . W_e^T, with ggml's gemm (repacked gemm, or llamafile sgemm)
    // where it applies, else vec_dot with the De rows split over threads. X_e (the expert's tokens' x rows) is
    // gathered into one of two buffers that alternate, so one barrier per expert suffices.
    void up_per_expert(const batch_scratch & work) const {
        int buf = 0;
        for (int64_t e = 0; e < E; ++e) {
            if (work.n_pairs(e) == 0) continue;
            char * x_expert = work.x_gathered[buf];
            gather_expert_x(work, e, x_expert);
            ggml_barrier(params->threadpool);
            up_expert(w_act, work, e, x_expert, work.act_in);
            if (s.gated) {
                up_expert(w_up, work, e, x_expert, work.up_in);
            }
            buf ^= 1;
        }
    }

    // expert e's tokens' x rows in the layout its up product reads, split over the threads
    void gather_expert_x(const batch_scratch & work, int64_t e, char * x_expert) const {
        const int64_t n = work.n_pairs(e);
        const int32_t * tokens = work.pair_token + work.first_pair[e];
        if (w_act.repacked && !w_act.repacked->plain_rows(n)) {
            // the repacked gemm reads groups of 4 rows interleaved: quantize x rows 4 at a time
            for (int64_t g = ith; 4 * g < n; g += nth) {
                const int64_t rows = std::min<int64_t>(4, n - 4 * g);
                for (int64_t j = 0; j < rows; ++j) {
                    memcpy(work.stage + j * d, token_vec(x, tokens[4 * g + j]), d * sizeof(float));
                }
                w_act.repacked->quantize(work.stage, rows, d, x_expert + 4 * g * s.x_row);
            }
        } else {
            for (int64_t j = n * ith / nth; j < n * (ith + 1) / nth; ++j) {
                memcpy(x_expert + j * s.x_row, work.x_conv + tokens[j] * s.x_row, s.x_row);
            }
        }
    }

    // expert e's rows of m times its tokens' x rows -> out (De floats per pair), all threads together
    void up_expert(const expert_matrix & m, const batch_scratch & work, int64_t e, const char * x_expert,
                   float * out) const {
        const int64_t n = work.n_pairs(e);
        float * out_e = out + work.first_pair[e] * De;
        if (!m.repacked && sgemm(De, n, d, m.t, m.rows(e, 0), x_expert, s.x_row, s.x_type, out_e, De)) {
            return;
        }
        const auto [r0, r1] = thread_rows(De, up_row_unit, ith, nth);
        m.mul_rows(e, r0, r1, x_expert, n, s.x_row, out_e + r0, De);
    }

    // every pair's activations times its score, converted to act_type, in groups of up to 4 pairs of one expert
    // (the repacked gemm's row groups); the groups are dealt to the threads in turn
    void batch_activations(const batch_scratch & work) const {
        int64_t group = 0;
        for (int64_t e = 0; e < E; ++e) {
            const int64_t n = work.n_pairs(e);
            for (int64_t j0 = 0; j0 < n; j0 += 4, ++group) {
                if (group % nth != ith) continue;
                const int64_t rows = std::min<int64_t>(4, n - j0);
                const int64_t first = work.first_pair[e] + j0;
                for (int64_t j = 0; j < rows; ++j) {
                    const int64_t pair = first + j, t = work.pair_token[pair];
                    activate(work.act_in + pair * De, s.gated ? work.up_in + pair * De : nullptr, work.means[t],
                             work.scores[t * E + e], work.stage + j * De);
                }
                char * conv = work.act_conv + first * s.act_row;
                if (w_down.repacked && !w_down.repacked->plain_rows(n)) {
                    w_down.repacked->quantize(work.stage, rows, De, conv);
                } else {
                    for (int64_t j = 0; j < rows; ++j) {
                        act_from_float(work.stage + j * De, conv + j * s.act_row, De);
                    }
                }
            }
        }
    }

    // Each thread owns the output columns [i0, i1) of every token. Per expert: repacked W_down, or in a small batch
    // plain rows of a type with a small-batch kernel, the thread's columns of C_e by that product (no barrier; the
    // whole batch, since its buffer is the gemm's); otherwise C_e[n x d] = V_e . W_down_e^T by gemm (all threads),
    // a barrier, then each thread adds its columns (C alternates between two buffers, so one barrier per expert);
    // without a gemm, vec_dot on the owned columns.
    void batch_down(const batch_scratch & work) const {
        const auto [i0, i1] = thread_rows(d, down_row_unit, ith, nth);
        for (int64_t t = 0; t < T; ++t) {
            memset(token_out(t) + i0, 0, (i1 - i0) * sizeof(float));
        }
        int buf = 0;
        for (int64_t e = 0; e < E; ++e) {
            const int64_t n = work.n_pairs(e);
            if (n == 0) continue;
            const char * acts = work.act_conv + work.first_pair[e] * s.act_row;
            if (w_down.repacked || (w_down.small_batch && T <= GGML_SMALL_BATCH_MAX)) {
                float * own = work.down_out[0] + T * i0; // this thread's columns: n x (i1 - i0)
                w_down.mul_rows(e, i0, i1, acts, n, s.act_row, own, i1 - i0);
                add_to_outputs(work, e, own, i1 - i0, i0, i1);
            } else if (sgemm(d, n, De, w_down.t, w_down.rows(e, 0), acts, s.act_row, s.act_type, work.down_out[buf],
                             d)) {
                ggml_barrier(params->threadpool);
                add_to_outputs(work, e, work.down_out[buf] + i0, d, i0, i1);
                buf ^= 1;
            } else {
                down_expert_vec_dot(work, e, i0, i1);
            }
        }
    }

    // adds c (expert e's tokens' columns [i0, i1), rows c_stride floats apart) into those tokens' outputs
    void add_to_outputs(const batch_scratch & work, int64_t e, const float * c, int64_t c_stride, int64_t i0,
                        int64_t i1) const {
        for (int64_t pair = work.first_pair[e]; pair < work.first_pair[e + 1]; ++pair, c += c_stride) {
            ggml_vec_acc_f32((int) (i1 - i0), token_out(work.pair_token[pair]) + i0, c);
        }
    }

    void down_expert_vec_dot(const batch_scratch & work, int64_t e, int64_t i0, int64_t i1) const {
        for (int64_t i = i0; i < i1; ++i) {
            const char * row = w_down.rows(e, i);
            for (int64_t pair = work.first_pair[e]; pair < work.first_pair[e + 1]; ++pair) {
                float sum;
                w_down.vec_dot((int) De, &sum, 0, row, 0, work.act_conv + pair * s.act_row, 0, 1);
                token_out(work.pair_token[pair])[i] += sum;
            }
        }
    }
};

} // namespace

extern "C" size_t ggml_cpu_deco_moe_wsize(const ggml_tensor * node, int n_threads) {
    return work_bytes(node, std::max(1, n_threads));
}

extern "C" bool ggml_cpu_deco_moe_supported(const ggml_tensor * node) {
    const ggml_tensor * up   = node->src[0];
    const ggml_tensor * down = node->src[1];
    for (const ggml_tensor * w : { up, down }) {
        const auto * traits = ggml_get_type_traits_cpu(w->type);
        if (!traits || !traits->vec_dot || traits->vec_dot_type == GGML_TYPE_COUNT) {
            return false;
        }
        const auto * vec_traits = ggml_get_type_traits_cpu(traits->vec_dot_type);
        if (!vec_traits || !vec_traits->from_float) {
            return false;
        }
    }
    const int64_t d  = up->ne[0];
    const int64_t De = up->ne[1];
    const ggml_type x_type   = ggml_get_type_traits_cpu(up->type)->vec_dot_type;
    const ggml_type act_type = ggml_get_type_traits_cpu(down->type)->vec_dot_type;
    return d % ggml_blck_size(up->type) == 0 && d % ggml_blck_size(x_type) == 0 &&
           De % ggml_blck_size(down->type) == 0 && De % ggml_blck_size(act_type) == 0 &&
           node->src[3]->type == GGML_TYPE_F32 && node->src[4]->type == GGML_TYPE_F32;
}

extern "C" void ggml_compute_forward_deco_moe(const ggml_compute_params * params, ggml_tensor * dst) {
    const deco_op op(params, dst);
    if (op.T == 1) {
        op.decode();
    } else {
        op.batch();
    }
}
