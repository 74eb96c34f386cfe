// Small-batch products of quantized weights (see small-batch.h).

#include "small-batch.h"

#include "repack.h"
#include "simd-mappings.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(GGML_SMALL_BATCH_Q4_0_8X8) || defined(GGML_SMALL_BATCH_Q6_K)
#include <immintrin.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized" // false positives inside GCC 12's own AVX-512 intrinsics
#endif

namespace {

// Per vector and block: its scale, and -4 * the sum of its quants (see below).
struct q8_0_block_terms {
    std::vector<float>   scale;
    std::vector<int32_t> offset;

    void compute(const block_q8_0 * y, int n_vec, int nb) {
        scale.resize((size_t) n_vec * nb);
        offset.resize((size_t) n_vec * nb);
        for (int v = 0; v < n_vec; ++v) {
            for (int b = 0; b < nb; ++b) {
                const block_q8_0 & blk = y[(size_t) v * nb + b];
                // sum of the 32 quants: biased to unsigned (q + 128), summed by psadbw, less 32 * 128
                const __m256i biased = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *) blk.qs), _mm256_set1_epi8((char) 0x80));
                const __m256i sums   = _mm256_sad_epu8(biased, _mm256_setzero_si256());
                const __m128i sum2   = _mm_add_epi64(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
                const int32_t sum    = (int32_t) (_mm_cvtsi128_si64(sum2) + _mm_extract_epi64(sum2, 1)) - 32 * 128;
                scale[(size_t) v * nb + b]  = GGML_CPU_FP16_TO_FP32(blk.d);
                offset[(size_t) v * nb + b] = -4 * sum;
            }
        }
    }
};

inline __m512i broadcast_8_bytes(const int8_t * p) {
    int64_t v;
    memcpy(&v, p, sizeof(v));
    return _mm512_set1_epi64(v);
}

// NT vectors against the rows of vx. A block_q4_0x8 holds one 32-weight block of 8 rows: qs[0, 64) are the
// bytes 0..7 of the rows' q4_0 blocks, row r in bytes [8r, 8r + 8), qs[64, 128) their bytes 8..15; each byte is
// the q4_0 byte xor 0x88. A q4_0 byte j holds weights j (low nibble) and j + 16 (high nibble) as w + 8, w in
// [-8, 8). So after undoing the xor, the 32-bit lanes 2r and 2r+1 of the four nibble vectors hold row r's
// weights 0-7, 16-23, 8-15 and 24-31 (+8), and one dpbusd per nibble vector against the matching 8 bytes of
// the vector, broadcast, sums row r's block into those two lanes. The +8 is removed exactly by starting the
// lanes at -4 * sum(x) each (-8 * sum(x) per row). Block scales are applied in F32 per block.
template <int NT> struct gemm_q4_0_8x8_q8_0_nt {
    static void run(int nb, float * s, size_t bs, const block_q4_0x8 * vx, const block_q8_0 * vy,
                    const float * scale, const int32_t * offset, int nc) {
        const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
        const __m512i undo_xor    = _mm512_set1_epi8((char) 0x88);
        const __m512i row_of_lane = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);

        for (int g = 0; g < nc / 8; ++g) {
            const block_q4_0x8 * w = vx + (size_t) g * nb;
            __m512 acc[NT];
            for (int v = 0; v < NT; ++v) {
                acc[v] = _mm512_setzero_ps();
            }
            for (int b = 0; b < nb; ++b) {
                const __m512i lo_bytes = _mm512_xor_si512(_mm512_loadu_si512(w[b].qs), undo_xor);
                const __m512i hi_bytes = _mm512_xor_si512(_mm512_loadu_si512(w[b].qs + 64), undo_xor);
                const __m512i w0_7   = _mm512_and_si512(lo_bytes, low_nibbles);
                const __m512i w16_23 = _mm512_and_si512(_mm512_srli_epi16(lo_bytes, 4), low_nibbles);
                const __m512i w8_15  = _mm512_and_si512(hi_bytes, low_nibbles);
                const __m512i w24_31 = _mm512_and_si512(_mm512_srli_epi16(hi_bytes, 4), low_nibbles);
                const __m512  row_scale = _mm512_permutexvar_ps(
                    row_of_lane, _mm512_zextps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) w[b].d))));
                for (int v = 0; v < NT; ++v) {
                    const block_q8_0 & x = vy[(size_t) v * nb + b];
                    __m512i dot = _mm512_set1_epi32(offset[(size_t) v * nb + b]);
                    dot = _mm512_dpbusd_epi32(dot, w0_7,   broadcast_8_bytes(x.qs));
                    dot = _mm512_dpbusd_epi32(dot, w8_15,  broadcast_8_bytes(x.qs + 8));
                    dot = _mm512_dpbusd_epi32(dot, w16_23, broadcast_8_bytes(x.qs + 16));
                    dot = _mm512_dpbusd_epi32(dot, w24_31, broadcast_8_bytes(x.qs + 24));
                    const __m512 block_scale = _mm512_mul_ps(row_scale, _mm512_set1_ps(scale[(size_t) v * nb + b]));
                    acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), block_scale, acc[v]);
                }
            }
            for (int v = 0; v < NT; ++v) {
                // lanes 2r and 2r+1 -> row r
                const __m512 pair_sum = _mm512_add_ps(acc[v], _mm512_permute_ps(acc[v], 0xB1));
                _mm256_storeu_ps(s + v * bs + 8 * g, _mm512_castps512_ps256(_mm512_maskz_compress_ps(0x5555, pair_sum)));
            }
        }
    }
};

// F<n>::run(args...), for 1 <= n <= sizeof...(NT)
template <template <int> class F, int... NT, typename... Args>
void dispatch(int n, std::integer_sequence<int, NT...>, Args... args) {
    ((n == NT + 1 ? F<NT + 1>::run(args...) : void()), ...);
}

// Per vector and block of 256: -32 * the sums of its quants in groups of 4, as four vectors of 16 lanes (see below).
struct q8_K_block_offsets {
    std::vector<int32_t> lanes;

    void compute(const char * vy, size_t by, int n_vec, int nb) {
        lanes.resize((size_t) n_vec * nb * QK_K / 4);
        const __m512i ones = _mm512_set1_epi8(1);
        for (int v = 0; v < n_vec; ++v) {
            const block_q8_K * y = (const block_q8_K *) (vy + v * by);
            for (int b = 0; b < nb; ++b) {
                for (int c = 0; c < QK_K / 64; ++c) {
                    const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(y[b].qs + 64 * c));
                    _mm512_storeu_si512(lanes.data() + (((size_t) v * nb + b) * 4 + c) * 16, _mm512_mullo_epi32(sums, _mm512_set1_epi32(-32)));
                }
            }
        }
    }
};

// NT vectors against nr rows of Q6_K. In each half (128 weights) of a block, the weights 0-63 are the low nibbles
// of ql[0, 64) with bits 4-5 from qh[0, 32) >> 0 (bytes 0-31) and >> 2 (bytes 32-63); the weights 64-127 the high
// nibbles with qh >> 4 and >> 6. Unpacked as unsigned 0..63 into two registers, each is dotted with the matching
// 64 quants of the vector by one dpbusd: lane l holds the sum over weights 4l..4l+3, whose group of 16 (one int8
// scale) is l / 4. The -32 offset is removed exactly by starting the lanes at -32 * the sums of the vector's
// quants over the same 4 weights; the scales (times the block's d) multiply the lanes in F32.
template <int NT> struct gemm_q6_K_q8_K_nt {
    static void run(int nb, float * s, size_t bs, const char * vx, size_t bx, const char * vy, size_t by,
                    const int32_t * offsets, int nr) {
        const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
        const __m512i bits_4_5    = _mm512_set1_epi8(0x30);
        // qh bits to bits 4-5 of each byte: << 4 (bytes 0-31) and << 2 (32-63) for weights 0-63, >> 0 and >> 2 for 64-127
        const __m512i to_4_5_lo = _mm512_mask_blend_epi16(0xFFFF0000, _mm512_set1_epi16(4), _mm512_set1_epi16(2));
        const __m512i to_4_5_hi = _mm512_mask_blend_epi16(0xFFFF0000, _mm512_setzero_si512(), _mm512_set1_epi16(2));
        const __m512i group_of_lane = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);

        for (int r = 0; r < nr; ++r) {
            const block_q6_K * w = (const block_q6_K *) (vx + r * bx);
            // the rows stream from memory (an output head is tens of MB): ask early for the one 4 rows on
            for (size_t line = 0; line < bx; line += 64) {
                _mm_prefetch(vx + (r + 4) * bx + line, _MM_HINT_T0);
            }
            __m512 acc[NT];
            for (int v = 0; v < NT; ++v) {
                acc[v] = _mm512_setzero_ps();
            }
            for (int b = 0; b < nb; ++b) {
                const __m512 scales = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) w[b].scales))),
                                                    _mm512_set1_ps(GGML_CPU_FP16_TO_FP32(w[b].d)));
                __m512i q[4];      // weights 0-63 and 64-127 of each half
                __m512  scale[4];  // their lanes' scales
                for (int h = 0; h < 2; ++h) {
                    const __m512i ql = _mm512_loadu_si512(w[b].ql + 64 * h);
                    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (w[b].qh + 32 * h)));
                    // (a & b) | c as one ternary-logic op: 0xEA
                    q[2 * h]     = _mm512_ternarylogic_epi32(ql, low_nibbles, _mm512_and_si512(_mm512_sllv_epi16(qh, to_4_5_lo), bits_4_5), 0xEA);
                    q[2 * h + 1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), low_nibbles,
                                                             _mm512_and_si512(_mm512_srlv_epi16(qh, to_4_5_hi), bits_4_5), 0xEA);
                    scale[2 * h]     = _mm512_permutexvar_ps(_mm512_add_epi32(group_of_lane, _mm512_set1_epi32(8 * h)), scales);
                    scale[2 * h + 1] = _mm512_permutexvar_ps(_mm512_add_epi32(group_of_lane, _mm512_set1_epi32(8 * h + 4)), scales);
                }
                #pragma GCC unroll 8 // the accumulators stay in registers
                for (int v = 0; v < NT; ++v) {
                    const block_q8_K & x = ((const block_q8_K *) (vy + v * by))[b];
                    const int32_t * off = offsets + ((size_t) v * nb + b) * 4 * 16;
                    __m512 sum = _mm512_setzero_ps();
                    for (int c = 0; c < 4; ++c) {
                        const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(off + 16 * c), q[c], _mm512_loadu_si512(x.qs + 64 * c));
                        sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale[c], sum);
                    }
                    acc[v] = _mm512_fmadd_ps(sum, _mm512_set1_ps(x.d), acc[v]);
                }
            }
            for (int v = 0; v < NT; ++v) {
                s[v * bs + r] = _mm512_reduce_add_ps(acc[v]);
            }
        }
    }
};

} // namespace

void ggml_gemm_q4_0_8x8_q8_0_small(int n, float * s, size_t bs, const void * vx, const void * vy, int n_vec, int nc) {
    GGML_ASSERT(n % QK8_0 == 0 && nc % 8 == 0 && n_vec >= 1 && n_vec <= GGML_SMALL_BATCH_MAX);
    const int nb = n / QK8_0;
    static thread_local q8_0_block_terms terms;
    terms.compute((const block_q8_0 *) vy, n_vec, nb);
    dispatch<gemm_q4_0_8x8_q8_0_nt>(n_vec, std::make_integer_sequence<int, GGML_SMALL_BATCH_MAX>{}, nb, s, bs,
                                    (const block_q4_0x8 *) vx, (const block_q8_0 *) vy, terms.scale.data(),
                                    terms.offset.data(), nc);
}

void ggml_gemm_q6_K_q8_K_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr) {
    GGML_ASSERT(n % QK_K == 0 && n_vec >= 1 && n_vec <= GGML_SMALL_BATCH_MAX);
    const int nb = n / QK_K;
    static thread_local q8_K_block_offsets offsets;
    offsets.compute((const char *) vy, by, n_vec, nb);
    // at most 8 vectors per pass (their accumulators stay in registers); more in a second pass over the same 16
    // rows, which are then in cache
    for (int r0 = 0; r0 < nr; r0 += 16) {
        for (int v0 = 0; v0 < n_vec; v0 += 8) {
            dispatch<gemm_q6_K_q8_K_nt>(std::min(8, n_vec - v0), std::make_integer_sequence<int, 8>{}, nb, s + v0 * bs + r0,
                                        bs, (const char *) vx + r0 * bx, bx, (const char *) vy + v0 * by, by,
                                        offsets.lanes.data() + (size_t) v0 * nb * 4 * 16, std::min(16, nr - r0));
        }
    }
}

#endif
