// Flash decoding on the CPU: GGML_OP_FLASH_ATTN_EXT for a few query rows over the KV cache.
//
// In a chat the model decodes one token (or verifies a few) against thousands of cached positions, so
// attention is a stream over the K and V caches: its speed is the speed at which they are read. The path takes
// short caches too: at 64-256 positions it is 2.5 times as fast as the row-by-row path, whose cost there is its
// per-position work (one dot product call, one exp and one V row added per position and head). Here:
//   - the KV range is split evenly over the threads (all threads busy at any head count); each thread reads
//     its positions once for all heads and query rows, in tiles of TILE positions;
//   - per tile, the scores of every query (row, head) from the K rows (every KV head of a position shared by the
//     heads of its GQA group); one softmax step per query for the whole tile (vectorised exp); the V rows added
//     with their weights into an F32 accumulator;
//   - F16 caches: q and the accumulators in F32 registers, the cache read with F16 -> F32 loads; a query's scores
//     come a register width of positions at a time, one accumulator per position and their lanes summed
//     together (no horizontal sum per position); its V rows are added into an accumulator held in registers
//     across the tile, in two independent chains. Q8_0 caches read V the same way (int8 -> F32 loads, the block
//     scale folded into the weight), their K rows through ggml's Q8_0 dot product with q quantized as
//     upstream's path does; other types go through their own vec_dot and to_float, a V row converted once for
//     all the queries that read it;
//   - while a tile is computed, the next tile's K and V rows are asked for (software prefetch into L2), spread
//     over the loops that read the current ones: alone, the hardware prefetchers leave a single thread reading
//     the cache at about half the memory's speed;
//   - each thread leaves per query a partial softmax state (max M, sum S, accumulator); after one barrier the
//     threads merge the partials of disjoint queries, rescaled to their common max, and normalise.
// The math is upstream's (online softmax, https://arxiv.org/abs/2112.05682): scores = scale * K.q (or
// softcap * tanh(scale * K.q / softcap)) + slope * mask, the sinks taken as one more score without a value.

#include "fa-decode.h"

#define GGML_COMMON_DECL_CPP
#include "ggml-common.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

constexpr int64_t TILE     = 32;  // positions per softmax step: their K and V rows stay in L2
constexpr int64_t MAX_ROWS = 16;  // query rows this path takes: decode, verifications, a few slots
constexpr size_t  ALIGN    = 64;

// a cache line of the next tile, asked for into L2 (not L1, which the current tile's rows fill)
#if defined(__GNUC__)
#define FA_PREFETCH(p) __builtin_prefetch((p), 0, 2)
#else
#define FA_PREFETCH(p) ((void) (p))
#endif

inline void fa_prefetch_bytes(const char * p, size_t n) {
    for (size_t b = 0; b < n; b += 64) {
        FA_PREFETCH(p + b);
    }
    FA_PREFETCH(p + n - 1);
}

// F16 caches (the default) are read with F16 -> F32 loads straight into the dot products and the V accumulation,
// q and the accumulators in F32 registers; Q8_0 V rows with FA_I8_LOAD (GGML_F32_EPR int8 values as F32); other
// types go through their vec_dot and to_float
#if defined(__AVX512F__)
#define FA_F16_LOAD(p) GGML_F32Cx16_LOAD(p)
#define FA_I8_LOAD(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (p))))
inline float fa_hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
// lane j of the result: the sum of the lanes of v[j], for all 16 at once (pairs of neighbours, then of pairs, ...)
inline __m512 fa_hsums(const __m512 * v) {
    __m512 pairs[8], quads[4], halves[2];
    for (int j = 0; j < 8; ++j) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of v[2j] = a, v[2j+1] = b
        pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2*j], v[2*j + 1]), _mm512_unpackhi_ps(v[2*j], v[2*j + 1]));
    }
    for (int j = 0; j < 4; ++j) {  // per 128-bit lane: that lane's sums of v[4j .. 4j+3]
        const __m512d a = _mm512_castps_pd(pairs[2*j]), b = _mm512_castps_pd(pairs[2*j + 1]);
        quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int j = 0; j < 2; ++j) {  // 128-bit lanes: quads[2j]'s lanes 0+1, 2+3, then quads[2j+1]'s
        halves[j] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2*j], quads[2*j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2*j], quads[2*j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    }
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define FA_F16_LOAD(p) GGML_F32Cx8_LOAD(p)
#define FA_I8_LOAD(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (p))))
inline float fa_hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
// lane j of the result: the sum of the lanes of v[j], for all 8 at once
inline __m256 fa_hsums(const __m256 * v) {
    const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // per 128-bit half
    const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
#elif defined(__ARM_NEON) && defined(__ARM_FP16_FORMAT_IEEE) && !defined(__ARM_FEATURE_SVE)
#define FA_F16_LOAD(p) vcvt_f32_f16(vld1_f16((const __fp16 *) (p)))
inline float32x4_t fa_i8_load(const int8_t * p) {
    int32_t four;  // exactly the 4 bytes: the last ones of a row may end the buffer
    memcpy(&four, p, sizeof(four));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four))))));
}
#define FA_I8_LOAD(p) fa_i8_load(p)
inline float fa_hsum(float32x4_t v) { return vaddvq_f32(v); }
// lane j of the result: the sum of the lanes of v[j]
inline float32x4_t fa_hsums(const float32x4_t * v) {
    return vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3]));
}
#endif

#ifdef FA_F16_LOAD
constexpr int64_t F16_BLOCK = 4*GGML_F32_EPR;  // F32 values in the 4 registers of one step

// q . k for an F32 q and an F16 row, n a multiple of F16_BLOCK
inline float fa_dot_f16(const float * q, const ggml_fp16_t * k, int64_t n) {
    GGML_F32_VEC s0 = GGML_F32_VEC_ZERO, s1 = GGML_F32_VEC_ZERO, s2 = GGML_F32_VEC_ZERO, s3 = GGML_F32_VEC_ZERO;
    for (int64_t i = 0; i < n; i += F16_BLOCK) {
        s0 = GGML_F32_VEC_FMA(s0, FA_F16_LOAD(k + i + 0*GGML_F32_EPR), GGML_F32_VEC_LOAD(q + i + 0*GGML_F32_EPR));
        s1 = GGML_F32_VEC_FMA(s1, FA_F16_LOAD(k + i + 1*GGML_F32_EPR), GGML_F32_VEC_LOAD(q + i + 1*GGML_F32_EPR));
        s2 = GGML_F32_VEC_FMA(s2, FA_F16_LOAD(k + i + 2*GGML_F32_EPR), GGML_F32_VEC_LOAD(q + i + 2*GGML_F32_EPR));
        s3 = GGML_F32_VEC_FMA(s3, FA_F16_LOAD(k + i + 3*GGML_F32_EPR), GGML_F32_VEC_LOAD(q + i + 3*GGML_F32_EPR));
    }
    return fa_hsum(GGML_F32_VEC_ADD(GGML_F32_VEC_ADD(s0, s1), GGML_F32_VEC_ADD(s2, s3)));
}

// lane j of the result: q . k_j for the GGML_F32_EPR F16 rows k_j `stride` bytes apart, n a multiple of
// GGML_F32_EPR: one accumulator per row, their lanes summed together at the end; the rows `ahead` bytes further
// asked for (none: 0)
inline GGML_F32_VEC fa_dots_f16(const float * q, const char * k, size_t stride, int64_t n, size_t ahead) {
    GGML_F32_VEC acc[GGML_F32_EPR];
    for (int j = 0; j < GGML_F32_EPR; ++j) {
        acc[j] = GGML_F32_VEC_ZERO;
    }
    for (int64_t i = 0; i < n; i += GGML_F32_EPR) {
        const GGML_F32_VEC qi = GGML_F32_VEC_LOAD(q + i);
        if (ahead && (i*sizeof(ggml_fp16_t)) % 64 == 0) {
            for (int j = 0; j < GGML_F32_EPR; ++j) {
                FA_PREFETCH(k + j*stride + ahead + i*sizeof(ggml_fp16_t));
            }
        }
        for (int j = 0; j < GGML_F32_EPR; ++j) {
            acc[j] = GGML_F32_VEC_FMA(acc[j], FA_F16_LOAD((const ggml_fp16_t *) (k + j*stride) + i), qi);
        }
    }
    return fa_hsums(acc);
}

// acc[0, n) += sum_j weights[j] * rows[j][0, n): F16 rows `stride` bytes apart, the accumulator in registers
// F16_BLOCK values at a time, twice (even and odd rows: two independent chains of multiply-adds); a row of weight 0
// (a masked position) is not read; the rows `ahead` bytes further asked for (none: 0)
inline void fa_mad_f16_rows(float * acc, const char * rows, size_t stride, const float * weights, int64_t n_rows,
                            int64_t n, size_t ahead) {
    for (int64_t i = 0; i < n; i += F16_BLOCK) {
        GGML_F32_VEC a[2][4];
        for (int k = 0; k < 4; ++k) {
            a[0][k] = GGML_F32_VEC_LOAD(acc + i + k*GGML_F32_EPR);
            a[1][k] = GGML_F32_VEC_ZERO;
        }
        const auto add_row = [&](GGML_F32_VEC * chain, int64_t j) {
            if (weights[j] == 0.0f) {
                return;
            }
            const GGML_F32_VEC w = GGML_F32_VEC_SET1(weights[j]);
            const ggml_fp16_t * v = (const ggml_fp16_t *) (rows + j*stride) + i;
            if (ahead) {
                fa_prefetch_bytes((const char *) v + ahead, F16_BLOCK*sizeof(ggml_fp16_t));
            }
            for (int k = 0; k < 4; ++k) {
                chain[k] = GGML_F32_VEC_FMA(chain[k], FA_F16_LOAD(v + k*GGML_F32_EPR), w);
            }
        };
        int64_t j = 0;
        for (; j + 1 < n_rows; j += 2) {
            add_row(a[0], j);
            add_row(a[1], j + 1);
        }
        if (j < n_rows) {
            add_row(a[0], j);
        }
        for (int k = 0; k < 4; ++k) {
            GGML_F32_VEC_STORE(acc + i + k*GGML_F32_EPR, GGML_F32_VEC_ADD(a[0][k], a[1][k]));
        }
    }
}

// the same for Q8_0 rows: int8 -> F32 loads, each block's scale folded into the row's weight
inline void fa_mad_q8_0_rows(float * acc, const char * rows, size_t stride, const float * weights, int64_t n_rows,
                             int64_t n, size_t ahead) {
    for (int64_t i = 0; i < n; i += F16_BLOCK) {
        GGML_F32_VEC a[4];
        for (int k = 0; k < 4; ++k) {
            a[k] = GGML_F32_VEC_LOAD(acc + i + k*GGML_F32_EPR);
        }
        for (int64_t j = 0; j < n_rows; ++j) {
            if (weights[j] == 0.0f) {
                continue;
            }
            if (ahead) {
                const block_q8_0 * blocks = (const block_q8_0 *) (rows + j*stride) + i / QK8_0;
                fa_prefetch_bytes((const char *) blocks + ahead, F16_BLOCK / QK8_0 * sizeof(block_q8_0));
            }
            for (int k = 0; k < 4; ++k) {
                const int64_t at = i + k*GGML_F32_EPR;
                const block_q8_0 * block = (const block_q8_0 *) (rows + j*stride) + at / QK8_0;
                const GGML_F32_VEC scale = GGML_F32_VEC_SET1(weights[j] * GGML_CPU_FP16_TO_FP32(block->d));
                a[k] = GGML_F32_VEC_FMA(a[k], FA_I8_LOAD(block->qs + at % QK8_0), scale);
            }
        }
        for (int k = 0; k < 4; ++k) {
            GGML_F32_VEC_STORE(acc + i + k*GGML_F32_EPR, a[k]);
        }
    }
}
#endif

struct fa_args {
    const ggml_tensor * q;
    const ggml_tensor * k;
    const ggml_tensor * v;
    const ggml_tensor * mask;   // F16 [n_kv, rows, ...] or NULL
    const ggml_tensor * sinks;  // F32 [n_head] or NULL
    int64_t DK, DV, n_kv, n_rows, n_head, n_head_kv;
    float scale, max_bias, softcap;
    ggml_vec_dot_t    k_dot;       // K row . q in K's vec_dot type
    ggml_from_float_t q_to_k_dot;  // q into that type
    size_t            q_row_size;  // bytes of one converted q row
    ggml_to_float_t   v_to_float;  // NULL for F32 V
    bool              f16;         // F16 K and V read by fa_dot_f16 / fa_mad_f16_rows (q kept in F32)
    bool              q8_0;        // Q8_0 K and V: V rows read by fa_mad_q8_0_rows
};

// whether this path takes `dst`, and its arguments when it does
bool fa_make_args(const ggml_tensor * dst, fa_args & a) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    const bool rows_contiguous = q->nb[0] == sizeof(float) && k->nb[0] == ggml_type_size(k->type) &&
                                 v->nb[0] == ggml_type_size(v->type);
    if (!rows_contiguous || q->type != GGML_TYPE_F32 || q->ne[1] > MAX_ROWS || q->ne[3] != 1 || k->ne[3] != 1 || v->ne[3] != 1 ||
        k->ne[2] != v->ne[2] || q->ne[2] % k->ne[2] != 0 ||
        (dst->src[3] && dst->src[3]->type != GGML_TYPE_F16)) {
        return false;
    }
    const ggml_type k_dot_type = ggml_get_type_traits_cpu(k->type)->vec_dot_type;
    a.k_dot      = ggml_get_type_traits_cpu(k->type)->vec_dot;
    a.q_to_k_dot = ggml_get_type_traits_cpu(k_dot_type)->from_float;
    a.v_to_float = v->type == GGML_TYPE_F32 ? nullptr : ggml_get_type_traits(v->type)->to_float;
    if (!a.k_dot || !a.q_to_k_dot || (v->type != GGML_TYPE_F32 && !a.v_to_float)) {
        return false;
    }
    a.q = q; a.k = k; a.v = v; a.mask = dst->src[3]; a.sinks = dst->src[4];
    a.DK = k->ne[0]; a.DV = v->ne[0]; a.n_kv = k->ne[1];
    a.n_rows = q->ne[1]; a.n_head = q->ne[2]; a.n_head_kv = k->ne[2];
#ifdef FA_F16_LOAD
    const bool same_type = k->type == v->type && a.DK % F16_BLOCK == 0 && a.DV % F16_BLOCK == 0;
    a.f16 = same_type && k->type == GGML_TYPE_F16;
    a.q8_0 = same_type && k->type == GGML_TYPE_Q8_0;
#else
    a.f16 = a.q8_0 = false;
#endif
    a.q_row_size = a.f16 ? a.DK*sizeof(float) : ggml_row_size(k_dot_type, a.DK);
    memcpy(&a.scale,    (const float *) dst->op_params + 0, sizeof(float));
    memcpy(&a.max_bias, (const float *) dst->op_params + 1, sizeof(float));
    memcpy(&a.softcap,  (const float *) dst->op_params + 2, sizeof(float));
    return true;
}

size_t align_up(size_t n) {
    return (n + ALIGN - 1) / ALIGN * ALIGN;
}

// the work buffer: per thread its partials [query][M, S, acc[DV]] (query = row * n_head + head), then its scratch
struct fa_thread_work {
    float * partials;  // n_rows * n_head * (2 + DV)
    char  * q;         // every query converted to K's vec_dot type
    float * scores;    // [query][TILE]: the tile's scores, then their softmax weights
    float * v_row;     // DV: one V row in F32; the accumulator of the merge
};

// lays out thread `ith`'s part of the work buffer at `base` (nullptr: only sizes it); returns the size of one part
size_t fa_thread_layout(const fa_args & a, char * base, int ith, fa_thread_work * out) {
    const int64_t n_queries = a.n_rows * a.n_head;
    const size_t partials = align_up(sizeof(float) * n_queries * (2 + a.DV));
    const size_t q        = align_up(a.q_row_size * n_queries);
    const size_t scores   = align_up(sizeof(float) * n_queries * TILE);
    const size_t v_row    = align_up(sizeof(float) * a.DV);
    const size_t size     = partials + q + scores + v_row;
    if (base) {
        char * p = base + ith * size;
        out->partials = (float *) p;
        out->q        = p + partials;
        out->scores   = (float *) (p + partials + q);
        out->v_row    = (float *) (p + partials + q + scores);
    }
    return size;
}

// ALiBi slope of a head (1 without max_bias), as upstream computes it
float fa_slope(const fa_args & a, int64_t head) {
    if (a.max_bias <= 0.0f) {
        return 1.0f;
    }
    const uint32_t n_head_log2 = 1u << (uint32_t) floorf(log2f((float) a.n_head));
    const float m0 = powf(2.0f, -(a.max_bias       ) / n_head_log2);
    const float m1 = powf(2.0f, -(a.max_bias / 2.0f) / n_head_log2);
    return head < n_head_log2 ? powf(m0, head + 1) : powf(m1, 2*(head - n_head_log2) + 1);
}

// folds a softmax state (M2, S2, acc2 or none) into (M, S, acc): both rescaled to the larger max
void fa_merge(int64_t DV, float & M, float & S, float * acc, float M2, float S2, const float * acc2) {
    if (S2 == 0.0f) {
        return;
    }
    const float M_new = std::max(M, M2);
    const float f1 = expf(M - M_new);   // 0 while (M, S) is empty: M = -inf
    const float f2 = expf(M2 - M_new);
    ggml_vec_scale_f32(DV, acc, f1);
    if (acc2) {
        ggml_vec_mad_f32(DV, acc, acc2, f2);
    }
    S = S*f1 + S2*f2;
    M = M_new;
}

const ggml_fp16_t * fa_mask_row(const fa_args & a, int64_t row, int64_t head) {
    if (!a.mask) {
        return nullptr;
    }
    return (const ggml_fp16_t *) ((const char *) a.mask->data + row*a.mask->nb[1] + (head % a.mask->ne[2])*a.mask->nb[2]);
}

// a score from K.q and its bias (slope * mask); -inf for a masked position, whatever its K row holds
inline float fa_score(const fa_args & a, float dot, float bias) {
    if (bias == -INFINITY) {
        return -INFINITY;
    }
    return (a.softcap != 0.0f ? a.softcap * tanhf(dot * a.scale / a.softcap) : dot * a.scale) + bias;
}

// the scores of every query against positions [t0, t0 + n), K read in memory order (all KV heads of a position);
// a masked position gets -inf without reading its K row (the cache is padded well past the used positions); the
// K rows `ahead` positions further asked for (none: 0)
void fa_tile_scores(const fa_args & a, const fa_thread_work & w, int64_t t0, int64_t n, int64_t ahead) {
    const int64_t group = a.n_head / a.n_head_kv;
    const size_t k_row_bytes = ggml_row_size(a.k->type, a.DK);
    for (int64_t j = 0; j < n; ++j) {
        const char * k_pos = (const char *) a.k->data + (t0 + j)*a.k->nb[1];
        for (int64_t hk = 0; ahead && hk < a.n_head_kv; ++hk) {
            fa_prefetch_bytes(k_pos + ahead*a.k->nb[1] + hk*a.k->nb[2], k_row_bytes);
        }
        for (int64_t head = 0; head < a.n_head; ++head) {
            const char * k_row = k_pos + (head / group)*a.k->nb[2];
            const float slope = fa_slope(a, head);
            for (int64_t row = 0; row < a.n_rows; ++row) {
                const int64_t query = row * a.n_head + head;
                const ggml_fp16_t * mask = fa_mask_row(a, row, head);
                const float bias = mask ? slope * GGML_CPU_FP16_TO_FP32(mask[t0 + j]) : 0.0f;
                float dot = 0.0f;
                if (bias != -INFINITY) {
                    a.k_dot(a.DK, &dot, 0, k_row, 0, w.q + query*a.q_row_size, 0, 1);
                }
                w.scores[query*TILE + j] = fa_score(a, dot, bias);
            }
        }
    }
}

#ifdef FA_F16_LOAD
// F16 K: per query, the scores of GGML_F32_EPR positions at a time (fa_dots_f16), all-masked groups not read;
// the K rows `ahead` positions further asked for (none: 0), by the first query of each KV head
void fa_tile_scores_f16(const fa_args & a, const fa_thread_work & w, int64_t t0, int64_t n, int64_t ahead) {
    const int64_t group = a.n_head / a.n_head_kv;
    const size_t stride = a.k->nb[1];
    float bias[TILE];
    for (int64_t head = 0; head < a.n_head; ++head) {
        const char * k_rows = (const char *) a.k->data + t0*stride + (head / group)*a.k->nb[2];
        const float slope = fa_slope(a, head);
        for (int64_t row = 0; row < a.n_rows; ++row) {
            const int64_t query = row * a.n_head + head;
            const size_t ahead_bytes = row == 0 && head % group == 0 ? ahead*stride : 0;
            const float * q = (const float *) (w.q + query*a.q_row_size);
            float * scores = w.scores + query*TILE;
            const ggml_fp16_t * mask = fa_mask_row(a, row, head);
            if (mask) {
                ggml_cpu_fp16_to_fp32(mask + t0, bias, n);
            } else {
                std::fill(bias, bias + n, 0.0f);
            }
            int64_t j = 0;
            for (; j + GGML_F32_EPR <= n; j += GGML_F32_EPR) {
                if (!std::all_of(bias + j, bias + j + GGML_F32_EPR, [](float b) { return b == -INFINITY; })) {
                    GGML_F32_VEC_STORE(scores + j, fa_dots_f16(q, k_rows + j*stride, stride, a.DK, ahead_bytes));
                }
            }
            for (; j < n; ++j) {
                if (bias[j] != -INFINITY) {
                    scores[j] = fa_dot_f16(q, (const ggml_fp16_t *) (k_rows + j*stride), a.DK);
                }
            }
            for (j = 0; j < n; ++j) {
                scores[j] = fa_score(a, scores[j], slope * bias[j]);
            }
        }
    }
}
#endif

// one softmax step per query: its partial state rescaled to the tile's max, the scores turned into weights
void fa_tile_weights(const fa_args & a, const fa_thread_work & w, int64_t n) {
    for (int64_t query = 0; query < a.n_rows * a.n_head; ++query) {
        float * scores = w.scores + query*TILE;
        float * partial = w.partials + query*(2 + a.DV);
        float & M = partial[0];
        float & S = partial[1];
        float tile_max = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
            tile_max = std::max(tile_max, scores[j]);
        }
        if (tile_max == -INFINITY) {  // every position masked: no weight
            memset(scores, 0, n * sizeof(float));
            continue;
        }
        if (tile_max > M) {
            const float f = expf(M - tile_max);  // 0 for the first tile (M = -inf)
            ggml_vec_scale_f32(a.DV, partial + 2, f);
            S *= f;
            M = tile_max;
        }
        S += (float) ggml_vec_soft_max_f32((int) n, scores, scores, M);  // masked positions weigh exactly 0
    }
}

// V rows of positions [t0, t0 + n) in memory order, each converted to F32 once and added into every query's
// accumulator with its weight; the V rows `ahead` positions further asked for (none: 0)
void fa_tile_values(const fa_args & a, const fa_thread_work & w, int64_t t0, int64_t n, int64_t ahead) {
    const int64_t group = a.n_head / a.n_head_kv;
    const size_t v_row_bytes = ggml_row_size(a.v->type, a.DV);
    for (int64_t j = 0; j < n; ++j) {
        const char * v_pos = (const char *) a.v->data + (t0 + j)*a.v->nb[1];
        for (int64_t hk = 0; hk < a.n_head_kv; ++hk) {
            const char * v_row = v_pos + hk*a.v->nb[2];
            if (ahead) {
                fa_prefetch_bytes(v_row + ahead*a.v->nb[1], v_row_bytes);
            }
            const float * v = (const float *) v_row;
            if (a.v->type == GGML_TYPE_F16) {
                ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) v_row, w.v_row, a.DV);
                v = w.v_row;
            } else if (a.v_to_float) {
                a.v_to_float(v_row, w.v_row, a.DV);
                v = w.v_row;
            }
            for (int64_t head = hk*group; head < (hk + 1)*group; ++head) {
                for (int64_t row = 0; row < a.n_rows; ++row) {
                    const int64_t query = row * a.n_head + head;
                    const float weight = w.scores[query*TILE + j];
                    if (weight != 0.0f) {
                        ggml_vec_mad_f32(a.DV, w.partials + query*(2 + a.DV) + 2, v, weight);
                    }
                }
            }
        }
    }
}

#ifdef FA_F16_LOAD
// F16 or Q8_0 V rows of positions [t0, t0 + n) (`mad_rows` adds rows of that type): per query, the tile's rows of
// its KV head added into its accumulator in registers; the V rows `ahead` positions further asked for (none: 0), by
// the first query of each KV head
template <void (*mad_rows)(float *, const char *, size_t, const float *, int64_t, int64_t, size_t)>
void fa_tile_values_in_registers(const fa_args & a, const fa_thread_work & w, int64_t t0, int64_t n, int64_t ahead) {
    const int64_t group = a.n_head / a.n_head_kv;
    const size_t stride = a.v->nb[1];
    for (int64_t head = 0; head < a.n_head; ++head) {
        const char * rows = (const char *) a.v->data + t0*stride + (head / group)*a.v->nb[2];
        for (int64_t row = 0; row < a.n_rows; ++row) {
            const int64_t query = row * a.n_head + head;
            const size_t ahead_bytes = row == 0 && head % group == 0 ? ahead*stride : 0;
            mad_rows(w.partials + query*(2 + a.DV) + 2, rows, stride, w.scores + query*TILE, n, a.DV, ahead_bytes);
        }
    }
}
#endif

// one thread: positions [c0, c1) for every query, into its partials
void fa_partials(const fa_args & a, const fa_thread_work & w, int64_t c0, int64_t c1) {
    for (int64_t row = 0; row < a.n_rows; ++row) {
        for (int64_t head = 0; head < a.n_head; ++head) {
            const int64_t query = row * a.n_head + head;
            float * partial = w.partials + query*(2 + a.DV);
            partial[0] = -INFINITY;
            partial[1] = 0.0f;
            memset(partial + 2, 0, a.DV * sizeof(float));
            const float * q = (const float *) ((const char *) a.q->data + row*a.q->nb[1] + head*a.q->nb[2]);
            if (a.f16) {
                memcpy(w.q + query*a.q_row_size, q, a.q_row_size);
            } else {
                a.q_to_k_dot(q, w.q + query*a.q_row_size, a.DK);
            }
        }
    }
    for (int64_t t0 = c0; t0 < c1; t0 += TILE) {
        const int64_t n = std::min(TILE, c1 - t0);
        const int64_t ahead = c1 - t0 - n >= TILE ? TILE : 0;  // the next tile's rows are asked for when it is whole
#ifdef FA_F16_LOAD
        if (a.f16) {
            fa_tile_scores_f16(a, w, t0, n, ahead);
            fa_tile_weights(a, w, n);
            fa_tile_values_in_registers<fa_mad_f16_rows>(a, w, t0, n, ahead);
            continue;
        }
#endif
        fa_tile_scores(a, w, t0, n, ahead);
        fa_tile_weights(a, w, n);
#ifdef FA_F16_LOAD
        if (a.q8_0) {
            fa_tile_values_in_registers<fa_mad_q8_0_rows>(a, w, t0, n, ahead);
            continue;
        }
#endif
        fa_tile_values(a, w, t0, n, ahead);
    }
}

// (row, head) pairs split over the threads: every thread's partial merged, the sink added, normalised, stored
void fa_reduce(const fa_args & a, ggml_tensor * dst, char * wdata, int ith, int nth) {
    fa_thread_work own;
    fa_thread_layout(a, wdata, ith, &own);
    float * acc = own.v_row;
    for (int64_t pair = ith; pair < a.n_rows * a.n_head; pair += nth) {
        const int64_t row = pair / a.n_head;
        const int64_t head = pair % a.n_head;
        float M = -INFINITY;
        float S = 0.0f;
        memset(acc, 0, a.DV * sizeof(float));
        for (int t = 0; t < nth; ++t) {
            fa_thread_work w;
            fa_thread_layout(a, wdata, t, &w);
            const float * partial = w.partials + pair*(2 + a.DV);
            fa_merge(a.DV, M, S, acc, partial[0], partial[1], partial + 2);
        }
        if (a.sinks) {
            fa_merge(a.DV, M, S, acc, ((const float *) a.sinks->data)[head], 1.0f, nullptr);
        }
        ggml_vec_scale_f32(a.DV, acc, S == 0.0f ? 0.0f : 1.0f/S);
        memcpy((char *) dst->data + (head + row*dst->ne[1])*dst->nb[1], acc, a.DV * sizeof(float));
    }
}

} // namespace

size_t ggml_cpu_fa_decode_work_size(const ggml_tensor * op, int n_threads) {
    fa_args a;
    return fa_make_args(op, a) ? n_threads * fa_thread_layout(a, nullptr, 0, nullptr) : 0;
}

bool ggml_cpu_fa_decode(const ggml_compute_params * params, ggml_tensor * dst) {
    fa_args a;
    if (params->use_ref || !fa_make_args(dst, a)) {
        return false;
    }
    const int ith = params->ith;
    const int nth = params->nth;
    GGML_ASSERT(params->wsize >= (size_t) nth * fa_thread_layout(a, nullptr, 0, nullptr));

    fa_thread_work w;
    fa_thread_layout(a, (char *) params->wdata, ith, &w);
    const int64_t chunk = (a.n_kv + nth - 1) / nth;
    fa_partials(a, w, std::min(a.n_kv, ith*chunk), std::min(a.n_kv, (ith + 1)*chunk));

    ggml_barrier(params->threadpool);
    fa_reduce(a, dst, (char *) params->wdata, ith, nth);
    return true;
}
