#pragma once

// Products of quantized weights with a few vectors at once (1..16 tokens: a decode step, a speculative
// verification batch, a short prompt, the tokens of one expert). ggml's repacked Q4_0 gemm handles vectors in
// groups of 4 (the rest one by one, each reading the weights again) and, like its gemv and the Q6_K vec_dot,
// is compute-bound on AVX-512 CPUs; these kernels unpack each block of weights once, keep it in registers
// while every vector is dotted with it, and use VNNI (vpdpbusd) for the integer dot products.
//
// The vectors are plain rows of the vec_dot type (ggml's from_float). Each vector's result depends only on that
// vector: a token gets the same value whatever batch it is evaluated in.

#include "ggml.h"

#include <stddef.h>

#define GGML_SMALL_BATCH_MAX 16

#ifdef __cplusplus
extern "C" {
#endif

// A small-batch kernel of plain rows (not repacked): s[v * bs + r] = row r of vx (rows bx bytes apart) . row v of vy
// (rows of the type's vec_dot type, by bytes apart), for r < nr, v < n_vec <= GGML_SMALL_BATCH_MAX.
typedef void (*ggml_small_batch_rows_t)(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy,
                                        size_t by, int n_vec, int nr);

// the kernel of this weight type on this CPU (Q5_K, Q6_K, Q8_0, Q5_0, Q5_1 with AVX-512 VNNI), NULL where there is none
ggml_small_batch_rows_t ggml_small_batch_rows_kernel(enum ggml_type type);

// the fewest vectors for which that kernel beats the type's vec_dot and llamafile's gemm: 1 for Q5_K and Q6_K (one
// vector against a Q6_K output head: ggml's vec_dot is compute-bound), else 2
int ggml_small_batch_min_vectors(enum ggml_type type);

#ifdef __cplusplus
}

#include <utility>

// F<n>::run(args...), for 1 <= n <= sizeof...(NT): a kernel with its vector count as a compile-time constant
template <template <int> class F, int... NT, typename... Args>
void ggml_small_batch_dispatch(int n, std::integer_sequence<int, NT...>, Args... args) {
    ((n == NT + 1 ? F<NT + 1>::run(args...) : void()), ...);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GGML_SMALL_BATCH_Q4_0_8X8 1
#define GGML_SMALL_BATCH_Q6_K     1
#define GGML_SMALL_BATCH_Q4_K_8X8 1
#define GGML_SMALL_BATCH_Q5_K     1
#if defined(__AVX512VL__)
#define GGML_SMALL_BATCH_Q8_0     1 // and Q5_0, Q5_1 (small-batch-q8.cpp)
#endif

#ifdef __cplusplus
extern "C" {
#endif

// s[v * bs + r] = row r of vx (block_q4_0x8, interleave 8) . row v of vy (block_q8_0), for r < nc, v < n_vec;
// n: row length (a multiple of 32), nc: a multiple of 8, n_vec <= GGML_SMALL_BATCH_MAX
void ggml_gemm_q4_0_8x8_q8_0_small(int n, float * s, size_t bs, const void * vx, const void * vy, int n_vec, int nc);

// s[v * bs + r] = row r of vx (block_q4_Kx8, interleave 8) . row v of vy (block_q8_K), for r < nc, v < n_vec;
// n: row length (a multiple of 256), nc: a multiple of 8, n_vec <= GGML_SMALL_BATCH_MAX
void ggml_gemm_q4_K_8x8_q8_K_small(int n, float * s, size_t bs, const void * vx, const void * vy, int n_vec, int nc);

// s[v * bs + r] = row r of vx (block_q6_K, rows bx bytes apart) . row v of vy (block_q8_K, rows by bytes apart),
// for r < nr, v < n_vec; n: row length (a multiple of 256), n_vec <= GGML_SMALL_BATCH_MAX
void ggml_gemm_q6_K_q8_K_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr);

// s[v * bs + r] = row r of vx (block_q5_K, rows bx bytes apart) . row v of vy (block_q8_K, rows by bytes apart),
// for r < nr, v < n_vec; n: row length (a multiple of 256), n_vec <= GGML_SMALL_BATCH_MAX
void ggml_gemm_q5_K_q8_K_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr);

// the same for rows of 32-weight blocks (n a multiple of 32, any number of blocks): Q8_0 and Q5_0 rows against
// block_q8_0 vectors, Q5_1 rows against block_q8_1 vectors (small-batch-q8.cpp)
void ggml_gemm_q8_0_q8_0_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr);
void ggml_gemm_q5_0_q8_0_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr);
void ggml_gemm_q5_1_q8_1_small(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                               int n_vec, int nr);

#ifdef __cplusplus
}
#endif

#endif
