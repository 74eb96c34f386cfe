// Small-batch products of quantized weights (see small-batch.h).

#include "small-batch.h"

#include "repack.h"
#include "simd-mappings.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(GGML_SMALL_BATCH_Q4_0_8X8)
#include <immintrin.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized" // false positives inside GCC 12's own AVX-512 intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"       // (their _mm512_undefined_* operands)
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

// The scales, mins and super-block scales of one block_q4_Kx8 (8 rows, 256 weights each), in the lane layouts of
// gemm_q4_K_8x8_q8_K_nt below. A row's 6-bit scale and min of sub-block g come from the 12 bytes
// scales[12g, 12g + 12), packed for the 8 rows as a block_q4_K packs its 8 sub-blocks.
struct q4_K_x8_block_scales {
    __m512i scales[4];   // sub-blocks 2j, 2j+1 (int16 pairs, one per madd of packs(dot 2j, dot 2j+1))
    __m512i mins[2];     // int16 pairs against the vector's sub-block sums: sub-blocks 0,1 | 4,5 and 2,3 | 6,7
    __m512  d, dmin;     // per lane: the super-block scales of its row

    explicit q4_K_x8_block_scales(const block_q4_Kx8 & w) {
        alignas(64) uint8_t sc[8][8], mn[8][8]; // [sub-block][row]
        for (int g = 0; g < 8; ++g) {
            uint32_t u[3];
            memcpy(u, w.scales + 12 * g, 12);
            const uint32_t sc_lo = u[0] & 0x3f3f3f3f, mn_lo = u[1] & 0x3f3f3f3f;
            const uint32_t sc_hi = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
            const uint32_t mn_hi = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
            memcpy(sc[g], &sc_lo, 4);
            memcpy(sc[g] + 4, &sc_hi, 4);
            memcpy(mn[g], &mn_lo, 4);
            memcpy(mn[g] + 4, &mn_hi, 4);
        }
        // in 128-bit lane L (rows 2L, 2L+1): int16 index of sub-block g, row r in the 16 values of sub-blocks
        // 2j, 2j+1 (scales) or in the 64 of all sub-blocks (mins)
        const __m512i scale_index = _mm512_set_epi16(
            15, 15, 14, 14, 7, 7, 6, 6, 13, 13, 12, 12, 5, 5, 4, 4, 11, 11, 10, 10, 3, 3, 2, 2, 9, 9, 8, 8, 1, 1, 0, 0);
        for (int j = 0; j < 4; ++j) {
            const __m256i both = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i *) sc[2 * j]));
            scales[j] = _mm512_permutexvar_epi16(scale_index, _mm512_castsi256_si512(both));
        }
        const __m512i all_mins = _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i *) mn[0]));
        const __m512i all_mins_hi = _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i *) mn[4]));
        // lane 4L + {0, 1}: rows 2L, 2L+1 with sub-blocks (a, a+1); lane 4L + {2, 3}: the same with (a+4, a+5)
        const auto min_index = [](int a) {
            alignas(64) int16_t idx[32];
            for (int L = 0; L < 4; ++L) {
                for (int h = 0; h < 2; ++h) {
                    const int g = a + 4 * h, base = g < 4 ? 8 * g : 32 + 8 * (g - 4);
                    for (int r = 0; r < 2; ++r) {
                        idx[8 * L + 4 * h + 2 * r]     = (int16_t) (base + 2 * L + r);
                        idx[8 * L + 4 * h + 2 * r + 1] = (int16_t) (base + 8 + 2 * L + r);
                    }
                }
            }
            return _mm512_load_si512(idx);
        };
        static const __m512i min_index_01 = min_index(0), min_index_23 = min_index(2);
        mins[0] = _mm512_permutex2var_epi16(all_mins, min_index_01, all_mins_hi);
        mins[1] = _mm512_permutex2var_epi16(all_mins, min_index_23, all_mins_hi);
        // lanes 4L + {0, 2}: row 2L, 4L + {1, 3}: row 2L + 1
        const __m512i row_of_lane = _mm512_set_epi32(7, 6, 7, 6, 5, 4, 5, 4, 3, 2, 3, 2, 1, 0, 1, 0);
        d    = _mm512_permutexvar_ps(row_of_lane, _mm512_zextps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) w.d))));
        dmin = _mm512_permutexvar_ps(row_of_lane, _mm512_zextps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) w.dmin))));
    }
};

// Per vector and block: its sub-block sums (from block_q8_K's bsums) as the int16 pairs mins[] is dotted with,
// two per block: sub-blocks (0, 1, 0, 1, 4, 5, 4, 5) and (2, 3, 2, 3, 6, 7, 6, 7).
struct q8_K_block_terms {
    struct alignas(16) pairs { int16_t v[8]; };
    std::vector<pairs> sums;

    void compute(const block_q8_K * y, int n_vec, int nb) {
        sums.resize((size_t) 2 * n_vec * nb);
        for (size_t i = 0; i < (size_t) n_vec * nb; ++i) {
            int16_t sb[8];
            for (int g = 0; g < 8; ++g) {
                sb[g] = (int16_t) (y[i].bsums[2 * g] + y[i].bsums[2 * g + 1]);
            }
            for (int h = 0; h < 2; ++h) {
                const int a = 2 * h;
                sums[2 * i + h] = { { sb[a], sb[a + 1], sb[a], sb[a + 1], sb[a + 4], sb[a + 5], sb[a + 4], sb[a + 5] } };
            }
        }
    }
};

// NT vectors against 8 rows of a block_q4_Kx8 column. The qs of 8 interleaved rows are 16 chunks of 64 bytes; chunk
// 4j + c holds bytes 32j + 8c .. +7 of each row (row r in bytes [8r, 8r + 8)), whose low nibbles are the weights
// 64j + 8c .. +7 (sub-block 2j) and high nibbles the weights 64j + 32 + 8c .. +7 (sub-block 2j + 1), unsigned 0..15.
// So, as for Q4_0 above, one dpbusd per nibble vector against 8 bytes of the vector, broadcast, sums 4 weights of
// row r into each of lanes 2r and 2r + 1; the 4 chunks of j give a sub-block's sums (|sum| <= 16 * 15 * 128, an
// int16). packs(dot 2j, dot 2j+1) and one madd with the scales give, in 128-bit lane L, rows 2L and 2L+1 times
// their scales for sub-blocks 2j and 2j+1 (lanes 4L .. 4L+3), so a block stays in int32 until one conversion. The
// mins (w = d * scale * q - dmin * min) are the vector's sub-block sums times the mins, two dpwssd into the same
// lanes; the two halves of each row are added at the end.
template <int NT> struct gemm_q4_K_8x8_q8_K_nt {
    static void run(int nb, float * s, size_t bs, const block_q4_Kx8 * w, const block_q8_K * vy,
                    const q8_K_block_terms::pairs * sums) {
        const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
        __m512 acc[NT];
        for (int v = 0; v < NT; ++v) {
            acc[v] = _mm512_setzero_ps();
        }
        for (int b = 0; b < nb; ++b) {
            const q4_K_x8_block_scales blk(w[b]);
            __m512i isum[NT];
            for (int v = 0; v < NT; ++v) {
                isum[v] = _mm512_setzero_si512();
            }
            for (int j = 0; j < 4; ++j) {
                __m512i lo[4], hi[4];
                for (int c = 0; c < 4; ++c) {
                    const __m512i bytes = _mm512_loadu_si512(w[b].qs + 64 * (4 * j + c));
                    lo[c] = _mm512_and_si512(bytes, low_nibbles);
                    hi[c] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles);
                }
                #pragma GCC unroll 8
                for (int v = 0; v < NT; ++v) {
                    const int8_t * x = vy[(size_t) v * nb + b].qs + 64 * j;
                    __m512i dot_lo = _mm512_setzero_si512(), dot_hi = _mm512_setzero_si512();
                    for (int c = 0; c < 4; ++c) {
                        dot_lo = _mm512_dpbusd_epi32(dot_lo, lo[c], broadcast_8_bytes(x + 8 * c));
                        dot_hi = _mm512_dpbusd_epi32(dot_hi, hi[c], broadcast_8_bytes(x + 32 + 8 * c));
                    }
                    isum[v] = _mm512_add_epi32(isum[v], _mm512_madd_epi16(_mm512_packs_epi32(dot_lo, dot_hi), blk.scales[j]));
                }
            }
            #pragma GCC unroll 8
            for (int v = 0; v < NT; ++v) {
                const size_t i = (size_t) v * nb + b;
                __m512i imin = _mm512_dpwssd_epi32(_mm512_setzero_si512(), blk.mins[0], _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *) sums[2 * i].v)));
                imin = _mm512_dpwssd_epi32(imin, blk.mins[1], _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *) sums[2 * i + 1].v)));
                const __m512 dx = _mm512_set1_ps(vy[i].d);
                acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[v]), _mm512_mul_ps(blk.d, dx), acc[v]);
                acc[v] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(imin), _mm512_mul_ps(blk.dmin, dx), acc[v]);
            }
        }
        for (int v = 0; v < NT; ++v) {
            // lanes 4L + 2, 4L + 3 onto 4L, 4L + 1: rows 2L, 2L + 1
            const __m512 rows = _mm512_add_ps(acc[v], _mm512_permute_ps(acc[v], 0x4E));
            _mm256_storeu_ps(s + v * bs, _mm512_castps512_ps256(_mm512_maskz_compress_ps(0x3333, rows)));
        }
    }
};

// Plain rows stream from memory (an output head is tens of MB): while row r is computed, row r + 8 is asked for
// into L2. (Into L1 4 rows on, one vector against a 77 MB Q6_K head ran at 18-19 GB/s, about ggml's vec_dot; into
// L2 8 rows on, 24-25, on a machine that reads 25-28 GB/s.)
inline void prefetch_row_ahead(const char * vx, size_t bx, int r) {
    for (size_t line = 0; line < bx; line += 64) {
        _mm_prefetch(vx + (r + 8) * bx + line, _MM_HINT_T1);
    }
}

// s[v * bs + r] = the sum of the lanes of acc[v], for the NT vectors
template <int NT> inline void store_row(float * s, size_t bs, int r, const __m512 * acc) {
    for (int v = 0; v < NT; ++v) {
        s[v * bs + r] = _mm512_reduce_add_ps(acc[v]);
    }
}

// NT vectors against nr rows of Q5_K. A block's qs byte 32j + i holds the low 4 bits of weights 64j + i (low nibble)
// and 64j + 32 + i (high nibble), qh byte i their 5th bits (bits 2j and 2j + 1). Unpacked as unsigned 0..31 into
// four registers q[j] (weights 64j .. 64j + 63: sub-blocks 2j, 2j + 1), each is dotted with the matching 64 quants
// of the vector by one dpbusd (lane l: weights 64j + 4l .. +3, |sum| <= 4 * 31 * 128, an int16); two such registers
// packed to int16 (packs works per 128-bit lane: lane L holds lanes 4L..4L+3 of the first, then of the second) are
// multiplied by their sub-blocks' scales and summed in pairs by one madd, so a block's sum stays in int32 until one
// conversion. The mins (w = d * scale * q - dmin * min) are the vector's sums over groups of 16 (bsums) times the mins.
template <int NT> struct gemm_q5_K_q8_K_nt {
    static void run(int nb, float * s, size_t bs, const char * vx, size_t bx, const char * vy, size_t by, int nr) {
        const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
        const __m512i fifth_bit   = _mm512_set1_epi8(0x10);
        // the sub-block (scale index) of each int16 of packs(q[0] dot, q[1] dot): in 128-bit lane L, 4 x sub-block
        // L / 2 then 4 x 2 + L / 2 (packs(q[2] dot, q[3] dot): 4 more)
        const __m512i groups_01 = _mm512_set_epi16(3, 3, 3, 3, 1, 1, 1, 1, 3, 3, 3, 3, 1, 1, 1, 1,
                                                   2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0);
        const __m512i groups_23 = _mm512_add_epi16(groups_01, _mm512_set1_epi16(4));
        // the mins of each bsum (16 weights): min b / 2, taken from the upper 8 of the 16 unpacked bytes
        const __m256i min_of_bsum = _mm256_set_epi16(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);

        for (int r = 0; r < nr; ++r) {
            const block_q5_K * w = (const block_q5_K *) (vx + r * bx);
            prefetch_row_ahead(vx, bx, r);
            __m512 acc[NT];
            for (int v = 0; v < NT; ++v) {
                acc[v] = _mm512_setzero_ps();
            }
            for (int b = 0; b < nb; ++b) {
                // the 8 scales then the 8 mins, unpacked from 12 bytes as ggml's Q4_K/Q5_K dot products do
                uint32_t u[4];
                memcpy(u, w[b].scales, 12);
                u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
                const uint32_t mins_lo = u[1] & 0x3f3f3f3f;
                u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
                u[2] = mins_lo;
                u[0] &= 0x3f3f3f3f;
                const __m256i scales_mins = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *) u));
                const __m512i scales_01 = _mm512_permutexvar_epi16(groups_01, _mm512_castsi256_si512(scales_mins));
                const __m512i scales_23 = _mm512_permutexvar_epi16(groups_23, _mm512_castsi256_si512(scales_mins));
                const __m256i mins      = _mm256_permutexvar_epi16(min_of_bsum, scales_mins);
                const float d    = GGML_CPU_FP16_TO_FP32(w[b].GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.d);
                const float dmin = GGML_CPU_FP16_TO_FP32(w[b].GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.dmin);

                const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) w[b].qh));
                __m512i q[4];
                for (int j = 0; j < 4; ++j) {
                    const __m256i bytes = _mm256_loadu_si256((const __m256i *) (w[b].qs + 32 * j));
                    const __m512i nibbles = _mm512_and_si512(
                        _mm512_inserti64x4(_mm512_castsi256_si512(bytes), _mm256_srli_epi16(bytes, 4), 1), low_nibbles);
                    // the 5th bit: qh bit 2j for the low half (weights 64j .. +31), 2j + 1 for the high half
                    const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char) (1 << (2 * j))),
                                                           _mm256_set1_epi8((char) (1 << (2 * j + 1))), 1);
                    q[j] = _mm512_mask_add_epi8(nibbles, _mm512_test_epi8_mask(qh, bit), nibbles, fifth_bit);
                }
                #pragma GCC unroll 8 // the accumulators stay in registers
                for (int v = 0; v < NT; ++v) {
                    const block_q8_K & x = ((const block_q8_K *) (vy + v * by))[b];
                    __m512i dot[4];
                    for (int j = 0; j < 4; ++j) {
                        dot[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[j], _mm512_loadu_si512(x.qs + 64 * j));
                    }
                    const __m512i sum = _mm512_add_epi32(_mm512_madd_epi16(_mm512_packs_epi32(dot[0], dot[1]), scales_01),
                                                         _mm512_madd_epi16(_mm512_packs_epi32(dot[2], dot[3]), scales_23));
                    const __m256i min_sum = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *) x.bsums));
                    acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d * x.d), acc[v]);
                    acc[v] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(_mm512_zextsi256_si512(min_sum)), _mm512_set1_ps(dmin * x.d),
                                              acc[v]);
                }
            }
            store_row<NT>(s, bs, r, acc);
        }
    }
};

// NT vectors against nr rows of Q6_K. In each half (128 weights) of a block, the weights 0-63 are the low nibbles
// of ql[0, 64) with bits 4-5 from qh[0, 32) >> 0 (bytes 0-31) and >> 2 (bytes 32-63); the weights 64-127 the high
// nibbles with qh >> 4 and >> 6. Unpacked as unsigned 0..63 into four registers q[c] (weights 64c..64c+63), each is
// multiplied with the matching 64 quants of the vector by one maddubs (int16 l: weights 64c + 2l, +1; |sum| <=
// 2 * 63 * 127), whose group of 16 (one int8 scale) is 4c + l / 8; one dpwssd multiplies those by their groups'
// scales and adds them in pairs into int32 lanes, two chains per vector, so a block's sum stays in int32 until one
// conversion. The -32 offset is removed exactly with the vector's sums over the groups (block_q8_K's bsums) times
// -32 * the scales: one madd, where a chain starts. Two instructions per 64 weights and vector: on one vector the
// kernel reads a head from memory about as fast as the memory allows, where ggml's vec_dot is compute-bound.
template <int NT> struct gemm_q6_K_q8_K_nt {
    static void run(int nb, float * s, size_t bs, const char * vx, size_t bx, const char * vy, size_t by, int nr) {
        const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
        const __m512i qh_bits     = _mm512_set1_epi8(0x33);  // after the shift below: bits 0-1 and 4-5 of qh
        // qh >> 0 in bytes 0-31 (weights 0-31 and 64-95 of the half), qh >> 2 in bytes 32-63
        const __m512i shift_upper = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
        // the group of each int16 of maddubs(q[c], quants): 8 x group 4c, then 4c + 1, 4c + 2, 4c + 3
        const __m512i lane_by_8 = _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19,
                                                    18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3);
        __m512i groups[4];
        for (int c = 0; c < 4; ++c) {
            groups[c] = _mm512_add_epi16(lane_by_8, _mm512_set1_epi16((short) (4 * c)));
        }

        for (int r = 0; r < nr; ++r) {
            const block_q6_K * w = (const block_q6_K *) (vx + r * bx);
            prefetch_row_ahead(vx, bx, r);
            __m512 acc[NT];
            for (int v = 0; v < NT; ++v) {
                acc[v] = _mm512_setzero_ps();
            }
            for (int b = 0; b < nb; ++b) {
                const __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *) w[b].scales));
                __m512i group_scales[4];
                for (int c = 0; c < 4; ++c) {
                    group_scales[c] = _mm512_permutexvar_epi16(groups[c], _mm512_castsi256_si512(scales));
                }
                const __m256i offset_mul = _mm256_mullo_epi16(scales, _mm256_set1_epi16(-32));
                const float   d = GGML_CPU_FP16_TO_FP32(w[b].d);
                __m512i q[4];
                for (int h = 0; h < 2; ++h) {
                    const __m512i ql = _mm512_loadu_si512(w[b].ql + 64 * h);
                    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (w[b].qh + 32 * h)));
                    const __m512i hb = _mm512_and_si512(_mm512_srlv_epi16(qh, shift_upper), qh_bits);
                    // the nibbles where low_nibbles is set, else bits 4-5 from hb: one ternary-logic op (0xCA: a ? b : c)
                    q[2 * h]     = _mm512_ternarylogic_epi32(low_nibbles, ql, _mm512_slli_epi16(hb, 4), 0xCA);
                    q[2 * h + 1] = _mm512_ternarylogic_epi32(low_nibbles, _mm512_srli_epi16(ql, 4), hb, 0xCA);
                }
                #pragma GCC unroll 8 // the accumulators stay in registers
                for (int v = 0; v < NT; ++v) {
                    const block_q8_K & x = ((const block_q8_K *) (vy + v * by))[b];
                    const __m256i offset = _mm256_madd_epi16(offset_mul, _mm256_loadu_si256((const __m256i *) x.bsums));
                    __m512i sum[2] = { _mm512_zextsi256_si512(offset), _mm512_setzero_si512() };
                    for (int c = 0; c < 4; ++c) {
                        const __m512i pairs = _mm512_maddubs_epi16(q[c], _mm512_loadu_si512(x.qs + 64 * c));
                        sum[c % 2] = _mm512_dpwssd_epi32(sum[c % 2], pairs, group_scales[c]);
                    }
                    acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(sum[0], sum[1])),
                                             _mm512_set1_ps(d * x.d), acc[v]);
                }
            }
            store_row<NT>(s, bs, r, acc);
        }
    }
};

} // namespace

void ggml_gemm_q4_0_8x8_q8_0_small(int n, float * s, size_t bs, const void * vx, const void * vy, int n_vec, int nc) {
    GGML_ASSERT(n % QK8_0 == 0 && nc % 8 == 0 && n_vec >= 1 && n_vec <= GGML_SMALL_BATCH_MAX);
    const int nb = n / QK8_0;
    static thread_local q8_0_block_terms terms;
    terms.compute((const block_q8_0 *) vy, n_vec, nb);
    ggml_small_batch_dispatch<gemm_q4_0_8x8_q8_0_nt>(n_vec, std::make_integer_sequence<int, GGML_SMALL_BATCH_MAX>{}, nb, s, bs,
                                    (const block_q4_0x8 *) vx, (const block_q8_0 *) vy, terms.scale.data(),
                                    terms.offset.data(), nc);
}

void ggml_gemm_q4_K_8x8_q8_K_small(int n, float * s, size_t bs, const void * vx, const void * vy, int n_vec, int nc) {
    GGML_ASSERT(n % QK_K == 0 && nc % 8 == 0 && n_vec >= 1 && n_vec <= GGML_SMALL_BATCH_MAX);
    const int nb = n / QK_K;
    static thread_local q8_K_block_terms terms;
    terms.compute((const block_q8_K *) vy, n_vec, nb);
    // at most 8 vectors per pass (their accumulators stay in registers); the rest in a second pass over the same
    // 8 rows, then in cache
    for (int g = 0; g < nc / 8; ++g) {
        for (int v0 = 0; v0 < n_vec; v0 += 8) {
            ggml_small_batch_dispatch<gemm_q4_K_8x8_q8_K_nt>(std::min(8, n_vec - v0), std::make_integer_sequence<int, 8>{}, nb,
                                            s + v0 * bs + 8 * g, bs, (const block_q4_Kx8 *) vx + (size_t) g * nb,
                                            (const block_q8_K *) vy + (size_t) v0 * nb, terms.sums.data() + 2 * v0 * nb);
        }
    }
}

// n_vec vectors against nr plain rows, 16 rows at a time, at most 8 vectors per pass (their accumulators stay in
// registers); more in a second pass over the same 16 rows, which are then in cache
template <template <int> class F>
void gemm_plain_rows(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int n_vec,
                     int nr) {
    GGML_ASSERT(n % QK_K == 0 && n_vec >= 1 && n_vec <= GGML_SMALL_BATCH_MAX);
    const int nb = n / QK_K;
    for (int r0 = 0; r0 < nr; r0 += 16) {
        for (int v0 = 0; v0 < n_vec; v0 += 8) {
            ggml_small_batch_dispatch<F>(std::min(8, n_vec - v0), std::make_integer_sequence<int, 8>{}, nb, s + v0 * bs + r0, bs,
                        (const char *) vx + r0 * bx, bx, (const char *) vy + v0 * by, by, std::min(16, nr - r0));
        }
    }
}

void ggml_gemm_q5_K_q8_K_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr) {
    gemm_plain_rows<gemm_q5_K_q8_K_nt>(n, s, bs, vx, bx, vy, by, n_vec, nr);
}

void ggml_gemm_q6_K_q8_K_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr) {
    gemm_plain_rows<gemm_q6_K_q8_K_nt>(n, s, bs, vx, bx, vy, by, n_vec, nr);
}
#endif

ggml_small_batch_rows_t ggml_small_batch_rows_kernel(enum ggml_type type) {
    switch (type) {
#if defined(GGML_SMALL_BATCH_Q5_K)
        case GGML_TYPE_Q5_K: return ggml_gemm_q5_K_q8_K_small;
#endif
#if defined(GGML_SMALL_BATCH_Q6_K)
        case GGML_TYPE_Q6_K: return ggml_gemm_q6_K_q8_K_small;
#endif
#if defined(GGML_SMALL_BATCH_Q8_0)
        case GGML_TYPE_Q8_0: return ggml_gemm_q8_0_q8_0_small;
        case GGML_TYPE_Q5_0: return ggml_gemm_q5_0_q8_0_small;
        case GGML_TYPE_Q5_1: return ggml_gemm_q5_1_q8_1_small;
#endif
        default:             return nullptr;
    }
}

int ggml_small_batch_min_vectors(enum ggml_type type) {
    return type == GGML_TYPE_Q6_K || type == GGML_TYPE_Q5_K ? 1 : 2;
}
