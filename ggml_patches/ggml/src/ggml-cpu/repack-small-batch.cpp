// Small-batch products of repacked weights (see repack-small-batch.h).

#include "repack-small-batch.h"

#include "repack.h"
#include "simd-mappings.h"

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(GGML_REPACK_SMALL_BATCH_Q4_0_8X8)
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
// the q4_0 byte xor 0x88. A q4_0 byte j holds weights j (low nibble) and j + 16 (high nibble) as u + 8, u in
// [0, 16). So after undoing the xor, the 32-bit lanes 2r and 2r+1 of the four nibble vectors hold row r's
// weights 0-7, 16-23, 8-15 and 24-31 (+8), and one dpbusd per nibble vector against the matching 8 bytes of
// the vector, broadcast, sums row r's block into those two lanes. The +8 is removed exactly by starting the
// lanes at -4 * sum(x) each (-8 * sum(x) per row). Block scales are applied in F32 per block.
template <int NT>
void gemm_q4_0_8x8_q8_0_nt(int nb, float * s, size_t bs, const block_q4_0x8 * vx, const block_q8_0 * vy,
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

using gemm_nt_t = void (*)(int, float *, size_t, const block_q4_0x8 *, const block_q8_0 *, const float *,
                           const int32_t *, int);

template <int... NT> constexpr gemm_nt_t pick(int n, std::integer_sequence<int, NT...>) {
    gemm_nt_t fn = nullptr;
    ((fn = n == NT + 1 ? gemm_q4_0_8x8_q8_0_nt<NT + 1> : fn), ...);
    return fn;
}

} // namespace

void ggml_gemm_q4_0_8x8_q8_0_small(int n, float * s, size_t bs, const void * vx, const void * vy, int n_vec, int nc) {
    GGML_ASSERT(n % QK8_0 == 0 && nc % 8 == 0 && n_vec >= 1 && n_vec <= GGML_REPACK_SMALL_BATCH_MAX);
    const int nb = n / QK8_0;
    static thread_local q8_0_block_terms terms;
    terms.compute((const block_q8_0 *) vy, n_vec, nb);
    const gemm_nt_t fn = pick(n_vec, std::make_integer_sequence<int, GGML_REPACK_SMALL_BATCH_MAX>{});
    fn(nb, s, bs, (const block_q4_0x8 *) vx, (const block_q8_0 *) vy, terms.scale.data(), terms.offset.data(), nc);
}

#endif
