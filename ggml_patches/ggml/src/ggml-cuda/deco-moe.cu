// CUDA kernels of GGML_OP_DECO_MOE (math: ggml/include/ggml-deco.h; reference: ggml-cpu/deco-moe.cpp).
//
// Five kernels on the backend stream, no host synchronisation: the active set never leaves the device.
//   1. deco_route  warp per token: router scores (activation, expert bias, router norm) -> S[t][e]; the token's
//                  computed experts in ascending order -> LIST[t][0 .. NCOMP[t]); mean_t = w_mean . x_t
//   2. deco_group  warp per expert: its computed tokens in ascending order -> ETOK[e][0 .. ECNT[e])
//   3. deco_up     block per (tile of De rows, expert, tile of TT of the expert's tokens), warp per row; blocks
//                  past ECNT[e] exit at once, so inactive experts' weights are never read. U[t][e][r] = W[e][r] . x_t
//                  (quantized weights: x in q8_1 and ggml's vec_dot_*_q8_1, as mmvq; float weights: F32 x)
//   4. deco_act    warp per (token, computed expert): NormSiLU etc. as the CPU op, times the score; F32 in place
//                  of U for float down types, q8_1 blocks for quantized ones
//   5. deco_down   warp per (output row, token): ONE dot over the De-segments of all of the token's computed
//                  experts (fixed order: deterministic, no atomics); every output element is written
// Work and weight bytes scale with the computed (token, expert) pairs. Scratch (pool): O(T*E*De) floats; a batch
// runs in passes of at most 2^26/(E*De) tokens (deco-moe-supported.h), so it stays under 256 MB per buffer.

#include "deco-moe.cuh"

#if defined(GGML_USE_HIP) || defined(GGML_USE_MUSA)

// The kernels assume 32-wide warps (32-bit ballot masks, shuffles over 32 lanes): HIP and MUSA builds compile none
// of them and refuse the op, so the scheduler runs it on the CPU.
bool ggml_cuda_deco_moe_supported(const ggml_tensor * op, bool (*weight_readable)(ggml_backend_buffer_type_t)) {
    GGML_UNUSED(op);
    GGML_UNUSED(weight_readable);
    return false;
}

void ggml_cuda_op_deco_moe(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    GGML_UNUSED(ctx);
    GGML_ABORT("%s: not supported in this build", ggml_op_desc(dst));
}

#else

#include "deco-moe-supported.h"
#include "convert.cuh"
#include "quantize.cuh"
#include "vecdotq.cuh"

#include "ggml-deco.h"

#include <type_traits>

static constexpr int DECO_NW = 4; // warps per block, every kernel
static constexpr int DECO_TT = 8; // tokens per block in deco_up for batches (weights read once per tile)

static __device__ __forceinline__ double deco_warp_sum(double x) {
#pragma unroll
    for (int offset = WARP_SIZE/2; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffff, x, offset, WARP_SIZE);
    }
    return x;
}

// lanes with pred set write, in lane order, to out[n + their rank]; returns the number of them
static __device__ __forceinline__ int deco_warp_compact(const bool pred, const int value, int * out, const int n) {
    const unsigned mask = __ballot_sync(0xffffffff, pred);
    if (pred) {
        out[n + __popc(mask & ((1u << threadIdx.x) - 1))] = value;
    }
    return __popc(mask);
}

//
// dot product of one weight row segment with an activation vector, cut into units that the lanes of a warp take
// in turn. Quantized weights: activations in q8_1 blocks, a unit is what mmvq gives one thread (vdr ints of one
// weight block). Float weights: F32 activations, a unit is 2 elements.
//

// quantized weights through ggml's vec_dot_*_q8_1 (vecdotq.cuh) with mmvq's split of a block into units
template <ggml_type type>
struct deco_dot_q {
    using act_t = block_q8_1;
    static constexpr int vdr = type == GGML_TYPE_Q4_0 ? VDR_Q4_0_Q8_1_MMVQ :
                               type == GGML_TYPE_Q5_0 ? VDR_Q5_0_Q8_1_MMVQ : VDR_Q8_0_Q8_1_MMVQ;
    static constexpr int qk  = ggml_cuda_type_traits<type>::qk;
    static constexpr int upb = ggml_cuda_type_traits<type>::qi / vdr; // units per weight block
    static constexpr int epu = qk / upb;                              // elements per unit

    // w: first block of the row segment, a: the matching q8_1 blocks, u: unit index in the segment
    static __device__ __forceinline__ float dot(const void * w, const block_q8_1 * a, const int u) {
        const int kb = u / upb;
        const block_q8_1 * b = a + kb*(qk/QK8_1);
        const int iqs = vdr*(u % upb);
        if constexpr (type == GGML_TYPE_Q4_0) {
            return vec_dot_q4_0_q8_1(w, b, kb, iqs);
        } else if constexpr (type == GGML_TYPE_Q5_0) {
            return vec_dot_q5_0_q8_1(w, b, kb, iqs);
        } else {
            static_assert(type == GGML_TYPE_Q8_0, "unsupported type");
            return vec_dot_q8_0_q8_1(w, b, kb, iqs);
        }
    }
};

static __device__ __forceinline__ float2 deco_float2(const float2 v)       { return v; }
static __device__ __forceinline__ float2 deco_float2(const half2 v)        { return __half22float2(v); }
static __device__ __forceinline__ float2 deco_float2(const nv_bfloat162 v) { return ggml_cuda_cast<float2>(v); }

// float weights: F32 activations
template <typename T2>
struct deco_dot_f {
    using act_t = float;
    static constexpr int epu = 2;

    static __device__ __forceinline__ float dot(const void * w, const float * a, const int u) {
        const float2 wu = deco_float2(((const T2 *) w)[u]);
        return wu.x*a[2*u] + wu.y*a[2*u + 1];
    }
};

template <ggml_type type> struct deco_dot;
template <> struct deco_dot<GGML_TYPE_F32>  : deco_dot_f<float2> {};
template <> struct deco_dot<GGML_TYPE_F16>  : deco_dot_f<half2> {};
template <> struct deco_dot<GGML_TYPE_BF16> : deco_dot_f<nv_bfloat162> {};
template <> struct deco_dot<GGML_TYPE_Q4_0> : deco_dot_q<GGML_TYPE_Q4_0> {};
template <> struct deco_dot<GGML_TYPE_Q5_0> : deco_dot_q<GGML_TYPE_Q5_0> {};
template <> struct deco_dot<GGML_TYPE_Q8_0> : deco_dot_q<GGML_TYPE_Q8_0> {};

// calls f(std::integral_constant<ggml_type, type>) for a type accepted by ggml_cuda_deco_moe_type_supported
template <typename F>
static void deco_type_switch(const ggml_type type, F && f) {
    switch (type) {
        case GGML_TYPE_F32:  f(std::integral_constant<ggml_type, GGML_TYPE_F32>{});  break;
        case GGML_TYPE_F16:  f(std::integral_constant<ggml_type, GGML_TYPE_F16>{});  break;
        case GGML_TYPE_BF16: f(std::integral_constant<ggml_type, GGML_TYPE_BF16>{}); break;
        case GGML_TYPE_Q4_0: f(std::integral_constant<ggml_type, GGML_TYPE_Q4_0>{}); break;
        case GGML_TYPE_Q5_0: f(std::integral_constant<ggml_type, GGML_TYPE_Q5_0>{}); break;
        case GGML_TYPE_Q8_0: f(std::integral_constant<ggml_type, GGML_TYPE_Q8_0>{}); break;
        default: GGML_ABORT("deco_moe: unsupported expert type %s", ggml_type_name(type));
    }
}

//
// kernels
//

static __global__ void deco_route(
        const float * logits, const int64_t s_logits, const float * x, const int64_t s_x, const float * mean,
        const float * scale, const int n_scale, const float * bias, const ggml_deco_moe_params p,
        const int d, const int E, const int T,
        float * S, int * LIST, int * NCOMP, float * MEAN) {
    const int t    = blockIdx.x*DECO_NW + threadIdx.y;
    const int lane = threadIdx.x;
    if (t >= T) {
        return;
    }
    const float * raw = logits + t*s_logits;
    float       * s   = S + (int64_t) t*E;

    // activity: decided by the ReLU (shifted by the expert bias), never by the learned scale
    float k = 1.0f;
    if (p.bias_mode == GGML_DECO_BIAS_RMS) {
        double ss = 0.0;
        for (int e = lane; e < E; e += WARP_SIZE) {
            ss += (double) raw[e]*raw[e];
        }
        k = (float) sqrt(deco_warp_sum(ss) / E);
    }
    const auto active = [&](const int e) {
        return p.bias_mode == GGML_DECO_BIAS_NONE ? raw[e] > 0.0f : raw[e] + bias[e]*k > 0.0f;
    };

    // every lane keeps to the experts e = lane (mod 32) in all loops below, so s[] needs no synchronisation
    for (int e = lane; e < E; e += WARP_SIZE) {
        float r = raw[e] > 0.0f ? raw[e] : 0.0f;
        if (p.router_act == GGML_DECO_ROUTER_SQRELU) {
            r *= r;
        }
        s[e] = active(e) ? r : 0.0f;
    }

    if (p.router_norm == GGML_DECO_RNORM_SIMPLE) {
        for (int e = lane; e < E; e += WARP_SIZE) {
            s[e] *= scale[n_scale == 1 ? 0 : e];
        }
    } else if (p.router_norm == GGML_DECO_RNORM_RMS) {
        // the mean square of the masked scores in double, as on the CPU
        double ss = 0.0;
        for (int e = lane; e < E; e += WARP_SIZE) {
            ss += (double) s[e]*s[e];
        }
        const float inv = (float) (1.0 / sqrt(deco_warp_sum(ss) / E + (double) p.eps));
        for (int e = lane; e < E; e += WARP_SIZE) {
            s[e] = s[e] * inv * scale[n_scale == 1 ? 0 : e];
        }
    }

    // inactive experts contribute exactly 0; computed: non-zero score (every expert with the DENSE flag)
    const bool dense = (p.flags & GGML_DECO_FLAG_DENSE) != 0;
    int n_comp = 0;
    for (int e0 = 0; e0 < E; e0 += WARP_SIZE) {
        const int e = e0 + lane;
        bool comp = false;
        if (e < E) {
            if (!active(e)) {
                s[e] = 0.0f;
            }
            comp = dense || s[e] != 0.0f;
        }
        n_comp += deco_warp_compact(comp, e, LIST + (int64_t) t*E, n_comp);
    }

    float m = 0.0f;
    if (mean) {
        const float * xt = x + t*s_x;
        for (int i = lane; i < d; i += WARP_SIZE) {
            m += mean[i]*xt[i];
        }
        m = warp_reduce_sum(m);
    }

    if (lane == 0) {
        NCOMP[t] = n_comp;
        MEAN[t]  = m;
    }
}

static __global__ void deco_group(const float * S, const bool dense, const int E, const int T, int * ECNT, int * ETOK) {
    const int e    = blockIdx.x*DECO_NW + threadIdx.y;
    const int lane = threadIdx.x;
    if (e >= E) {
        return;
    }
    int n = 0;
    for (int t0 = 0; t0 < T; t0 += WARP_SIZE) {
        const int t = t0 + lane;
        // the same predicate as deco_route's LIST
        const bool comp = t < T && (dense || S[(int64_t) t*E + e] != 0.0f);
        n += deco_warp_compact(comp, t, ETOK + (int64_t) e*T, n);
    }
    if (lane == 0) {
        ECNT[e] = n;
    }
}

// U[t][e][r] = W[e][r] . A[t] for the computed pairs; A: x as q8_1 rows (quantized W) or F32 rows with stride s_a
template <ggml_type type, int TT>
static __global__ void deco_up(
        const char * W, const int64_t s_w_row, const int64_t s_w_exp,
        const typename deco_dot<type>::act_t * A, const int64_t s_a,
        const int * ECNT, const int * ETOK, const int d, const int De, const int E, const int T, float * U) {
    using dot_t = deco_dot<type>;
    const int e    = blockIdx.y;
    const int j0   = blockIdx.z*TT;
    const int r    = blockIdx.x*DECO_NW + threadIdx.y;
    const int lane = threadIdx.x;
    const int cnt  = ECNT[e];
    if (j0 >= cnt || r >= De) {
        return;
    }
    const int nt = min(TT, cnt - j0);

    int tok[TT];
#pragma unroll
    for (int j = 0; j < TT; ++j) {
        tok[j] = ETOK[(int64_t) e*T + j0 + (j < nt ? j : 0)];
    }

    const char * w = W + e*s_w_exp + r*s_w_row;
    float sum[TT] = { 0.0f };
    for (int u = lane; u < d/dot_t::epu; u += WARP_SIZE) {
#pragma unroll
        for (int j = 0; j < TT; ++j) {
            if (j < nt) {
                sum[j] += dot_t::dot(w, A + tok[j]*s_a, u);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < TT; ++j) {
        const float v = warp_reduce_sum(sum[j]);
        if (lane == 0 && j < nt) {
            U[((int64_t) tok[j]*E + e)*De + r] = v;
        }
    }
}

// activation of the computed pairs, times the score: F32 in place of U, or q8_1 blocks VQ[t][e][De/32] if q8;
// uses_mean / uses_norm: ggml_deco_act_uses_mean / _uses_norm of p.act (host functions)
template <bool q8>
static __global__ void deco_act(
        float * U, const float * G, const float * S, const int * LIST, const int * NCOMP, const float * MEAN,
        const float * nw, const ggml_deco_moe_params p, const bool uses_mean, const bool uses_norm,
        const int E, const int De, block_q8_1 * VQ) {
    const int kk   = blockIdx.x*DECO_NW + threadIdx.y;
    const int t    = blockIdx.y;
    const int lane = threadIdx.x;
    if (kk >= NCOMP[t]) {
        return;
    }
    const int64_t pair = (int64_t) t*E + LIST[(int64_t) t*E + kk];
    float       * a  = U + pair*De;
    const float * g  = G ? G + pair*De : nullptr;
    const float   se = S[pair];

    const float mm = uses_mean ? MEAN[t] : 0.0f;

    float inv = 1.0f;
    if (uses_norm) {
        double ss = 0.0;
        for (int i = lane; i < De; i += WARP_SIZE) {
            const float z = a[i] - mm;
            ss += (double) z*z;
        }
        inv = (float) (1.0 / sqrt(deco_warp_sum(ss) / De + (double) p.eps));
    }

    // element i belongs to lane i % 32 in both loops, so the in-place write needs no synchronisation
    for (int i0 = 0; i0 < De; i0 += WARP_SIZE) {
        const int i = i0 + lane;
        float v = 0.0f;
        if (i < De) {
            float z = a[i] - mm;
            if (uses_norm) {
                z = z*inv*nw[i];
            }
            v = p.act == GGML_DECO_ACT_RELU ? (z > 0.0f ? z : 0.0f) : z / (1.0f + expf(-z));
            v *= g ? g[i]*se : se;
        }
        if constexpr (q8) {
            // De % 32 == 0 here: one q8_1 block per iteration, rounded as ggml's quantize_q8_1
            const float amax = warp_reduce_max(fabsf(v));
            const float sum  = warp_reduce_sum(v);
            const float dq   = amax / 127.0f;
            block_q8_1 & b = VQ[pair*(De/QK8_1) + i0/QK8_1];
            b.qs[lane] = amax == 0.0f ? 0 : roundf(v / dq);
            if (lane == 0) {
                b.ds = make_half2(dq, sum);
            }
        } else if (i < De) {
            a[i] = v;
        }
    }
}

// dst[t][i] = sum over the token's computed experts e of W_down[e][i] . V[t][e]  (V: s_v act_t per pair)
template <ggml_type type>
static __global__ void deco_down(
        const char * W, const int64_t s_w_row, const int64_t s_w_exp,
        const typename deco_dot<type>::act_t * V, const int64_t s_v,
        const int * LIST, const int * NCOMP, const int d, const int De, const int E, float * dst, const int64_t s_dst) {
    using dot_t = deco_dot<type>;
    const int i    = blockIdx.x*DECO_NW + threadIdx.y;
    const int t    = blockIdx.y;
    const int lane = threadIdx.x;
    if (i >= d) {
        return;
    }
    const int * list = LIST + (int64_t) t*E;
    const int upe     = De/dot_t::epu; // units per expert segment
    const int n_units = NCOMP[t]*upe;

    float sum = 0.0f;
    for (int u = lane; u < n_units; u += WARP_SIZE) {
        const int kk = u / upe;
        const int e  = list[kk];
        sum += dot_t::dot(W + e*s_w_exp + i*s_w_row, V + ((int64_t) t*E + e)*s_v, u - kk*upe);
    }
    sum = warp_reduce_sum(sum);
    if (lane == 0) {
        dst[t*s_dst + i] = sum;
    }
}

//
// op
//

bool ggml_cuda_deco_moe_supported(const ggml_tensor * op, bool (*weight_readable)(ggml_backend_buffer_type_t)) {
    return ggml_cuda_deco_moe_supports(op, weight_readable);
}

void ggml_cuda_op_deco_moe(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * up     = dst->src[0];
    const ggml_tensor * down   = dst->src[1];
    const ggml_tensor * gate   = dst->src[2];
    const ggml_tensor * x      = dst->src[3];
    const ggml_tensor * logits = dst->src[4];
    const ggml_tensor * mean   = dst->src[5];
    const ggml_tensor * norm   = dst->src[6];
    const ggml_tensor * scale  = dst->src[7];
    const ggml_tensor * bias   = dst->src[8];

    const ggml_deco_moe_params p = ggml_deco_moe_get_params(dst);
    const bool dense = (p.flags & GGML_DECO_FLAG_DENSE) != 0;

    const int d  = (int) up->ne[0];
    const int De = (int) up->ne[1];
    const int E  = (int) up->ne[2];
    const int64_t n_tokens = x->ne[1];
    if (n_tokens == 0) {
        return;
    }
    // a batch runs in passes of at most n_pass tokens (deco-moe-supported.h), so the scratch is bounded
    const int n_pass = (int) ggml_cuda_deco_moe_pass_tokens(n_tokens, E, De);

    const int64_t s_x      = x->nb[1] / sizeof(float);
    const int64_t s_logits = logits->nb[1] / sizeof(float);
    const int64_t s_dst    = dst->nb[1] / sizeof(float);
    const bool    up_q  = ggml_is_quantized(up->type);
    const bool    down_q = ggml_is_quantized(down->type);

    cudaStream_t     stream = ctx.stream();
    ggml_cuda_pool & pool   = ctx.pool();

    // pool buffers, allocated in declaration order (freed in reverse)
    ggml_cuda_pool_alloc<float> S    (pool, (size_t) n_pass*E);
    ggml_cuda_pool_alloc<float> MEAN (pool, n_pass);
    ggml_cuda_pool_alloc<int>   LIST (pool, (size_t) n_pass*E);
    ggml_cuda_pool_alloc<int>   NCOMP(pool, n_pass);
    ggml_cuda_pool_alloc<int>   ECNT (pool, E);
    ggml_cuda_pool_alloc<int>   ETOK (pool, (size_t) E*n_pass);
    ggml_cuda_pool_alloc<float> U    (pool, (size_t) n_pass*E*De);
    ggml_cuda_pool_alloc<float> G    (pool);
    ggml_cuda_pool_alloc<char>  XQ   (pool);
    ggml_cuda_pool_alloc<block_q8_1> VQ(pool);
    if (gate) {
        G.alloc((size_t) n_pass*E*De);
    }
    if (up_q) {
        XQ.alloc((size_t) n_pass*(d/QK8_1)*sizeof(block_q8_1));
    }
    if (down_q) {
        VQ.alloc((size_t) n_pass*E*(De/QK8_1));
    }

    const dim3 block(WARP_SIZE, DECO_NW);
    for (int64_t t0 = 0; t0 < n_tokens; t0 += n_pass) {
        const int     T        = (int) std::min<int64_t>(n_pass, n_tokens - t0);
        const float * x_d      = (const float *) x->data + t0*s_x;
        const float * logits_d = (const float *) logits->data + t0*s_logits;
        float       * out_d    = (float *) dst->data + t0*s_dst;

        // 1-2: routing, per-token and per-expert lists of the computed pairs
        deco_route<<<(T + DECO_NW - 1)/DECO_NW, block, 0, stream>>>(
            logits_d, s_logits, x_d, s_x,
            mean ? (const float *) mean->data : nullptr,
            scale ? (const float *) scale->data : nullptr, scale ? (int) ggml_nelements(scale) : 0,
            bias ? (const float *) bias->data : nullptr, p, d, E, T,
            S.get(), LIST.get(), NCOMP.get(), MEAN.get());
        CUDA_CHECK(cudaGetLastError());
        deco_group<<<(E + DECO_NW - 1)/DECO_NW, block, 0, stream>>>(S.get(), dense, E, T, ECNT.get(), ETOK.get());
        CUDA_CHECK(cudaGetLastError());

        // 3: up (and gate) rows of the computed pairs; U <- the rows the activation reads (gate if gated), G <- up
        if (up_q) {
            quantize_row_q8_1_cuda(x_d, nullptr, XQ.get(), up->type, d, s_x, x->nb[2] / sizeof(float), x->nb[3] / sizeof(float),
                                   d, T, 1, 1, stream);
        }
        const int64_t s_a = up_q ? d/QK8_1 : s_x;
        const void  * A   = up_q ? (const void *) XQ.get() : (const void *) x_d;
        const auto up_rows = [&](const ggml_tensor * w, float * out) {
            deco_type_switch(w->type, [&](auto tc) {
                constexpr ggml_type type = decltype(tc)::value;
                using act_t = typename deco_dot<type>::act_t;
                const dim3 grid_rows((De + DECO_NW - 1)/DECO_NW, E, 1);
                if (T == 1) {
                    deco_up<type, 1><<<grid_rows, block, 0, stream>>>(
                        (const char *) w->data, w->nb[1], w->nb[2], (const act_t *) A, s_a, ECNT.get(), ETOK.get(), d, De, E, T, out);
                } else {
                    const dim3 grid(grid_rows.x, E, (T + DECO_TT - 1)/DECO_TT);
                    deco_up<type, DECO_TT><<<grid, block, 0, stream>>>(
                        (const char *) w->data, w->nb[1], w->nb[2], (const act_t *) A, s_a, ECNT.get(), ETOK.get(), d, De, E, T, out);
                }
                CUDA_CHECK(cudaGetLastError());
            });
        };
        up_rows(gate ? gate : up, U.get());
        if (gate) {
            up_rows(up, G.get());
        }

        // 4: activations
        const dim3 grid_pairs((E + DECO_NW - 1)/DECO_NW, T);
        const float * nw = norm ? (const float *) norm->data : nullptr;
        const bool uses_mean = ggml_deco_act_uses_mean(p.act);
        const bool uses_norm = ggml_deco_act_uses_norm(p.act);
        if (down_q) {
            deco_act<true><<<grid_pairs, block, 0, stream>>>(
                U.get(), G.get(), S.get(), LIST.get(), NCOMP.get(), MEAN.get(), nw, p, uses_mean, uses_norm, E, De, VQ.get());
        } else {
            deco_act<false><<<grid_pairs, block, 0, stream>>>(
                U.get(), G.get(), S.get(), LIST.get(), NCOMP.get(), MEAN.get(), nw, p, uses_mean, uses_norm, E, De, nullptr);
        }
        CUDA_CHECK(cudaGetLastError());

        // 5: weighted down projection, summed per token
        const int64_t s_v = down_q ? De/QK8_1 : De;
        const void  * V   = down_q ? (const void *) VQ.get() : (const void *) U.get();
        deco_type_switch(down->type, [&](auto tc) {
            constexpr ggml_type type = decltype(tc)::value;
            using act_t = typename deco_dot<type>::act_t;
            const dim3 grid((d + DECO_NW - 1)/DECO_NW, T);
            deco_down<type><<<grid, block, 0, stream>>>(
                (const char *) down->data, down->nb[1], down->nb[2], (const act_t *) V, s_v, LIST.get(), NCOMP.get(),
                d, De, E, out_d, s_dst);
            CUDA_CHECK(cudaGetLastError());
        });
    }
}

#endif // GGML_USE_HIP || GGML_USE_MUSA
