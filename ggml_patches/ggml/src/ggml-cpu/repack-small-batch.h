#pragma once

// Products of repacked weights with a few vectors at once (2..16 tokens: a speculative verification batch, a
// short prompt, the tokens of one expert). ggml's repacked gemm handles vectors in groups of 4 (the rest one
// by one, each reading the weights again) and is compute-bound from 4 vectors on; these kernels read each
// group of interleaved rows once for all vectors and keep them in registers while every vector is dotted.
//
// The vectors are plain rows of the vec_dot type (ggml's from_float), not the 4-interleaved layout of the
// repacked gemm. Each vector's result depends only on that vector: a token gets the same value whatever batch
// it is evaluated in.

#include "ggml.h"

#include <cstddef>

#define GGML_REPACK_SMALL_BATCH_MAX 16

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GGML_REPACK_SMALL_BATCH_Q4_0_8X8 1
// s[v * bs + r] = row r of vx (block_q4_0x8, interleave 8) . row v of vy (block_q8_0), for r < nc, v < n_vec;
// n: row length (a multiple of 32), nc: a multiple of 8, n_vec <= GGML_REPACK_SMALL_BATCH_MAX
void ggml_gemm_q4_0_8x8_q8_0_small(int n, float * s, size_t bs, const void * vx, const void * vy, int n_vec, int nc);
#endif
