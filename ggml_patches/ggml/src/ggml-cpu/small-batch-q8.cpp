// Small-batch products of plain rows of the 32-weight block types whose vectors are Q8_0 / Q8_1 (see small-batch.h):
// Q8_0 and Q5_0 (Q8_0 vectors), Q5_1 (Q8_1 vectors). These are the types K-quant presets fall back to for rows too
// short for a 256-weight super-block (DECO's 64-wide routed and 128-wide shared down projections), and the Q8_0
// preset's every matrix.

#include "small-batch.h"

#define GGML_COMMON_DECL_CPP
#include "ggml-common.h"
#include "simd-mappings.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(GGML_SMALL_BATCH_Q8_0)
#include <immintrin.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized" // false positives inside GCC 12's own AVX-512 intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"       // (their _mm512_undefined_* operands)
#endif

namespace {

// sum of the 32 quants of a Q8 block: biased to unsigned (q + 128), summed by psadbw, less 32 * 128
int32_t sum_of_quants(const int8_t * qs) {
    const __m256i biased = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *) qs), _mm256_set1_epi8((char) 0x80));
    const __m256i sums   = _mm256_sad_epu8(biased, _mm256_setzero_si256());
    const __m128i sum2   = _mm_add_epi64(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    return (int32_t) (_mm_cvtsi128_si64(sum2) + _mm_extract_epi64(sum2, 1)) - 32 * 128;
}

// The weight types. Each unpacks a block to 32 unsigned bytes u = w + bias (its weights are d * w, or d * u + m with
// a min), so that one dpbusd dots them with a vector block's signed quants; the bias comes off exactly as
// -bias * sum(vector quants) per block.
struct q8_0_rows {
    using block = block_q8_0;
    using vec_block = block_q8_0;
    static constexpr int  bias    = 128;
    static constexpr bool has_min = false;
    static __m256i unpack(const block & b) {
        return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *) b.qs), _mm256_set1_epi8((char) 0x80));
    }
    static ggml_fp16_t d(const block & b) { return b.d; }
    static ggml_fp16_t m(const block &) { return 0; }
};

// qs byte j holds the low 4 bits of weights j (low nibble) and j + 16 (high nibble), qh bit i the 5th bit of weight i
inline __m256i unpack_5_bits(const uint8_t * qs, const uint8_t * qh) {
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *) qs));
    const __m256i nibbles = _mm256_and_si256(_mm256_blend_epi32(bytes, _mm256_srli_epi16(bytes, 4), 0xF0),
                                             _mm256_set1_epi8(0x0F));
    uint32_t fifth_bits;
    memcpy(&fifth_bits, qh, sizeof(fifth_bits));
    return _mm256_mask_add_epi8(nibbles, fifth_bits, nibbles, _mm256_set1_epi8(0x10));
}

struct q5_0_rows {
    using block = block_q5_0;
    using vec_block = block_q8_0;
    static constexpr int  bias    = 16;
    static constexpr bool has_min = false;
    static __m256i unpack(const block & b) { return unpack_5_bits(b.qs, b.qh); }
    static ggml_fp16_t d(const block & b) { return b.d; }
    static ggml_fp16_t m(const block &) { return 0; }
};

struct q5_1_rows {
    using block = block_q5_1;
    using vec_block = block_q8_1;
    static constexpr int  bias    = 0;
    static constexpr bool has_min = true;
    static __m256i unpack(const block & b) { return unpack_5_bits(b.qs, b.qh); }
    static ggml_fp16_t d(const block & b) { return b.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.d; }
    static ggml_fp16_t m(const block & b) { return b.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.m; }
};

inline ggml_fp16_t vec_scale(const block_q8_0 & b) { return b.d; }
inline ggml_fp16_t vec_scale(const block_q8_1 & b) { return b.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.d; }
inline ggml_fp16_t vec_sum(const block_q8_0 &) { return 0; }
inline ggml_fp16_t vec_sum(const block_q8_1 & b) { return b.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.s; }

// Per vector and block: its scale, its d * sum (Q8_1: times the weights' mins), and the bias term split over the
// 8 dpbusd lanes a block's sum is gathered from: -bias * sum(quants) / 8
template <class W> struct vec_block_terms {
    std::vector<float>   scale, sum;
    std::vector<int32_t> lane_offset;

    void compute(const char * vy, size_t by, int n_vec, int nb) {
        scale.resize((size_t) n_vec * nb);
        sum.resize((size_t) n_vec * nb);
        lane_offset.resize((size_t) n_vec * nb);
        for (int v = 0; v < n_vec; ++v) {
            const auto * y = (const typename W::vec_block *) (vy + v * by);
            for (int b = 0; b < nb; ++b) {
                const size_t i = (size_t) v * nb + b;
                scale[i]       = GGML_CPU_FP16_TO_FP32(vec_scale(y[b]));
                sum[i]         = GGML_CPU_FP16_TO_FP32(vec_sum(y[b]));
                lane_offset[i] = W::bias == 0 ? 0 : -(W::bias / 8) * sum_of_quants(y[b].qs);
            }
        }
    }
};

// blocks b and b + 1 (b + 1 < nb) side by side, or block b and zeros
template <class B, class F> inline __m512i block_pair(const B * blocks, int b, int nb, F bytes_of) {
    const __m512i first = _mm512_castsi256_si512(bytes_of(blocks[b]));
    return b + 1 < nb ? _mm512_inserti64x4(first, bytes_of(blocks[b + 1]), 1) : _mm512_zextsi256_si512(bytes_of(blocks[b]));
}

// two int32 lanes of per 32-bit lane sums of 4 rows: lanes [x0 + x2, y0 + y2, x1 + x3, y1 + y3] of each 128-bit lane
inline __m512i add_interleaved_32(__m512i x, __m512i y) {
    return _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
}
inline __m512i add_interleaved_64(__m512i x, __m512i y) {
    return _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
}

// The 16 block sums of 8 rows (dot[r]: 16 int32 lanes, block b in lanes 0-7, block b + 1 in 8-15), in the lanes
// [block b rows 0-3, block b + 1 rows 0-3, block b rows 4-7, block b + 1 rows 4-7]: each 128-bit lane summed
// across by two rounds of unpack + add (4 rows per register), then the two halves of each block by one shuffle.
inline __m512i block_sums_of_8_rows(const __m512i dot[8]) {
    const __m512i rows_0_3 = add_interleaved_64(add_interleaved_32(dot[0], dot[1]), add_interleaved_32(dot[2], dot[3]));
    const __m512i rows_4_7 = add_interleaved_64(add_interleaved_32(dot[4], dot[5]), add_interleaved_32(dot[6], dot[7]));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(rows_0_3, rows_4_7, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(rows_0_3, rows_4_7, _MM_SHUFFLE(3, 1, 3, 1)));
}

// the lane of block_sums_of_8_rows that holds row r's sum of block b + half
constexpr int sum_lane(int r, int half) { return (r < 4 ? r : 4 + r) + 4 * half; }

// NT vectors against 8 rows (the last nr - 1 .. 7 repeated where nr < 8, their results not stored), two blocks at a
// time: each row's pair of blocks is unpacked into one register and dotted with each vector's pair by one dpbusd
// (started at the bias terms), the 8 rows' sums gathered into one register per vector, converted once and scaled
// per (row, block) lane; a min's term (Q5_1) is one more fmadd per pair.
template <class W> struct gemm_8_rows {
    template <int NT> struct nt {
        static void run(int nb, float * s, size_t bs, const char * vx, size_t bx, const char * vy, size_t by,
                        const vec_block_terms<W> * terms, int v0, int nr) {
            const typename W::block * rows[8];
            for (int r = 0; r < 8; ++r) {
                rows[r] = (const typename W::block *) (vx + std::min(r, nr - 1) * bx);
            }
            __m512 acc[NT];
            for (int v = 0; v < NT; ++v) {
                acc[v] = _mm512_setzero_ps();
            }
            for (int b = 0; b < nb; b += 2) {
                __m512i w[8];
                alignas(32) ggml_fp16_t d[16] = {}, m[16] = {};
                for (int r = 0; r < 8; ++r) {
                    w[r] = block_pair(rows[r], b, nb, W::unpack);
                    for (int half = 0; half < 2 && b + half < nb; ++half) {
                        d[sum_lane(r, half)] = W::d(rows[r][b + half]);
                        m[sum_lane(r, half)] = W::m(rows[r][b + half]);
                    }
                }
                const __m512 row_d = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *) d));
                const __m512 row_m = W::has_min ? _mm512_cvtph_ps(_mm256_load_si256((const __m256i *) m)) : row_d;
                const bool two = b + 1 < nb;
                #pragma GCC unroll 8
                for (int v = 0; v < NT; ++v) {
                    const size_t i = (size_t) (v0 + v) * nb + b, i2 = two ? i + 1 : i;
                    const auto * y = (const typename W::vec_block *) (vy + v * by);
                    const __m512i x = block_pair(y, b, nb, [](const typename W::vec_block & blk) {
                        return _mm256_loadu_si256((const __m256i *) blk.qs);
                    });
                    const __m512i start = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(terms->lane_offset[i]),
                                                                  _mm512_set1_epi32(terms->lane_offset[i2]));
                    __m512i dot[8];
                    for (int r = 0; r < 8; ++r) {
                        dot[r] = _mm512_dpbusd_epi32(start, w[r], x);
                    }
                    // per lane: block b (lanes of half 0) or b + 1 (half 1); row_d is 0 in the lanes of an absent b + 1
                    const __m512 vec_d = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(terms->scale[i]),
                                                              _mm512_set1_ps(terms->scale[i2]));
                    acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_sums_of_8_rows(dot)), _mm512_mul_ps(row_d, vec_d), acc[v]);
                    if (W::has_min) {
                        const __m512 vec_sum = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(terms->sum[i]),
                                                                    _mm512_set1_ps(terms->sum[i2]));
                        acc[v] = _mm512_fmadd_ps(row_m, vec_sum, acc[v]);
                    }
                }
            }
            for (int v = 0; v < NT; ++v) {
                // lanes of block b + 1 onto those of block b: rows 0-3 in lanes 0-3, rows 4-7 in lanes 8-11
                const __m512 rows = _mm512_add_ps(acc[v], _mm512_shuffle_f32x4(acc[v], acc[v], _MM_SHUFFLE(2, 3, 0, 1)));
                _mm256_mask_storeu_ps(s + v * bs, (__mmask8) ((1u << nr) - 1),
                                      _mm512_castps512_ps256(_mm512_maskz_compress_ps(0x0F0F, rows)));
            }
        }
    };
};

// n_vec vectors against nr rows, 8 rows at a time, at most 8 vectors per pass (their accumulators and the 8 rows'
// unpacked blocks stay in registers); more in a second pass over the same rows, then in cache
template <class W>
void gemm_rows(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int n_vec, int nr) {
    GGML_ASSERT(n % 32 == 0 && n_vec >= 1 && n_vec <= GGML_SMALL_BATCH_MAX);
    const int nb = n / 32;
    static thread_local vec_block_terms<W> terms;
    terms.compute((const char *) vy, by, n_vec, nb);
    for (int r0 = 0; r0 < nr; r0 += 8) {
        for (int v0 = 0; v0 < n_vec; v0 += 8) {
            ggml_small_batch_dispatch<gemm_8_rows<W>::template nt>(
                std::min(8, n_vec - v0), std::make_integer_sequence<int, 8>{}, nb, s + v0 * bs + r0, bs,
                (const char *) vx + r0 * bx, bx, (const char *) vy + v0 * by, by, &terms, v0, std::min(8, nr - r0));
        }
    }
}

} // namespace

void ggml_gemm_q8_0_q8_0_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr) {
    gemm_rows<q8_0_rows>(n, s, bs, vx, bx, vy, by, n_vec, nr);
}

void ggml_gemm_q5_0_q8_0_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr) {
    gemm_rows<q5_0_rows>(n, s, bs, vx, bx, vy, by, n_vec, nr);
}

void ggml_gemm_q5_1_q8_1_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr) {
    gemm_rows<q5_1_rows>(n, s, bs, vx, bx, vy, by, n_vec, nr);
}
#endif
