// attention.cu — decode attention over f16 KV caches, split over the context (flash-decoding).
//
// Block (split s, kv head, column): the G query heads that share the kv head walk their slice
// of the context in sub-chunks of 64 positions: scores (D/8 lanes per key, 16-byte loads),
// an exact softmax update with a running max, then P·V (D/8 lanes per value row, position
// groups across the rest of the block). The slices' (max, sum, unnormalized output) are merged
// by the last block to finish (an atomic counter per column and kv head, reset after use); a
// slice is at least two sub-chunks, because a merge costs more than a second sub-chunk. Lengths
// come from device memory, so the grid (sized for `splits`) is fixed and the launch can live in
// a CUDA graph.
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>

#include "cuda_common.cuh"
#include "kernels.cuh"

namespace pumice {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kSub = 64;

__device__ __forceinline__ int split_chunk(int len, int splits, int min_slice) {
    const int c = (len + splits - 1) / splits;
    return c < min_slice ? min_slice : c;
}

// Eight dims (dl * 8..) of cache row p, or zeros past the end.
template <int D>
__device__ __forceinline__ uint4 load_row(const __half *base, int p, int end, int dl) {
    return p < end ? *reinterpret_cast<const uint4 *>(base + static_cast<int64_t>(p) * D + dl * 8) : make_uint4(0, 0, 0, 0);
}

// acc[g] += probability of position j (sub-chunk slot) for head g * its value row (8 dims).
template <int G>
__device__ __forceinline__ void accumulate_value(float (&acc)[G][8], const uint4 raw, const float (*sc)[kSub], int j) {
    const __half2 *h2 = reinterpret_cast<const __half2 *>(&raw);
    float v[8];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 f = __half22float2(h2[e]);
        v[2 * e] = f.x;
        v[2 * e + 1] = f.y;
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const float pw = sc[g][j];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] += pw * v[e];
    }
}

template <int D, int G>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(const AttentionCall a) {
    constexpr int LPP = D / 8;                 // lanes per key row
    constexpr int NPG = kThreads / LPP;        // keys per pass / position groups in P·V
    __shared__ float sc[G][kSub];
    __shared__ float alpha_s[G], m_s[G], l_s[G];
    __shared__ float red[NPG][G][D];

    pdl_launch_dependents();
    // Up to pdl_wait the block reads only what earlier steps wrote: the column (uploaded before
    // the step) and the cache rows before the step's first position.
    const int split = blockIdx.x, kvh = blockIdx.y, col = blockIdx.z;
    const StepColumn c = a.cols[col];
    const int len = c.pos + 1;
    const int chunk = split_chunk(len, a.splits, a.min_slice);
    const int start = split * chunk;
    if (start >= len) {
        pdl_wait();
        return;
    }
    const int end = min(len, start + chunk);

    const int tid = threadIdx.x;
    const int dl = tid % LPP;   // which 8 dims
    const int kp = tid / LPP;   // key slot in a pass / position group

    const __half *kbase = c.cache + ((static_cast<int64_t>(a.layer) * 2 * a.n_kv_heads + kvh) * c.n_ctx) * D;
    const __half *vbase = c.cache + (((static_cast<int64_t>(a.layer) * 2 + 1) * a.n_kv_heads + kvh) * c.n_ctx) * D;

    // A thread's key and value rows of a sub-chunk are all requested before the first is used:
    // the compiler does not move a global load above the shared-memory stores of the pass
    // before, and one row at a time cost 7% of a 16-session step at 1024 positions (8B: 12%;
    // docs/CUDA.md). The first sub-chunk's older rows go out before pdl_wait, so that their
    // round trip overlaps the end of the QKV GEMV; the rows this step wrote follow it.
    constexpr int kRows = kSub / NPG;
    uint4 kraw[kRows], vraw[kRows];
    const int older_end = min(end, c.step_start);
    auto request_rows = [&](int sub, int row_end) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            kraw[r] = load_row<D>(kbase, sub + r * NPG + kp, row_end, dl);
            vraw[r] = load_row<D>(vbase, sub + r * NPG + kp, row_end, dl);
        }
    };
    request_rows(start, older_end);
    pdl_wait();
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int p = start + r * NPG + kp;
        if (p >= older_end && p < end) {
            kraw[r] = load_row<D>(kbase, p, end, dl);
            vraw[r] = load_row<D>(vbase, p, end, dl);
        }
    }

    // Queries, pre-scaled so that scores are in log2 units.
    const float qscale = rsqrtf(static_cast<float>(D)) * 1.4426950408889634f;
    float q[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const __half *qp = a.q + col * a.ldq + static_cast<int64_t>(kvh * G + g) * D + dl * 8;
        const uint4 raw = *reinterpret_cast<const uint4 *>(qp);
        const __half2 *h2 = reinterpret_cast<const __half2 *>(&raw);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(h2[e]);
            q[g][2 * e] = f.x * qscale;
            q[g][2 * e + 1] = f.y * qscale;
        }
    }
    if (tid < G) { m_s[tid] = -FLT_MAX; l_s[tid] = 0.f; }

    float acc[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;

    const int warp = tid / 32, lane = tid % 32;
    for (int sub = start; sub < end; sub += kSub) {
        // Scores of this sub-chunk: LPP lanes per key, 16-byte loads.
        if (sub != start) request_rows(sub, end);
#pragma unroll
        for (int p0 = 0; p0 < kSub; p0 += NPG) {
            const int p = sub + p0 + kp;
            float dot[G];
#pragma unroll
            for (int g = 0; g < G; ++g) dot[g] = 0.f;
            const uint4 raw = kraw[p0 / NPG];  // zeros past end
            const __half2 *h2 = reinterpret_cast<const __half2 *>(&raw);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 f = __half22float2(h2[e]);
#pragma unroll
                for (int g = 0; g < G; ++g) dot[g] += q[g][2 * e] * f.x + q[g][2 * e + 1] * f.y;
            }
#pragma unroll
            for (int g = 0; g < G; ++g) {
#pragma unroll
                for (int o = LPP / 2; o > 0; o >>= 1) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
            }
            if (dl == 0) {
#pragma unroll
                for (int g = 0; g < G; ++g) sc[g][p0 + kp] = p < end ? dot[g] : -FLT_MAX;
            }
        }
        __syncthreads();
        // Exact softmax update, one warp per head; probabilities replace the scores.
        for (int g = warp; g < G; g += kThreads / 32) {
            const float s0 = sc[g][lane], s1 = sc[g][lane + 32];
            float mx = fmaxf(s0, s1);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_old = m_s[g];
            const float m_new = fmaxf(m_old, mx);
            const float p0v = s0 == -FLT_MAX ? 0.f : exp2f(s0 - m_new);
            const float p1v = s1 == -FLT_MAX ? 0.f : exp2f(s1 - m_new);
            sc[g][lane] = p0v;
            sc[g][lane + 32] = p1v;
            float sum = p0v + p1v;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) {
                const float al = m_old == -FLT_MAX ? 0.f : exp2f(m_old - m_new);
                alpha_s[g] = al;
                m_s[g] = m_new;
                l_s[g] = l_s[g] * al + sum;
            }
        }
        __syncthreads();
        // P·V: LPP lanes per value row, NPG position groups.
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float al = alpha_s[g];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] *= al;
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) accumulate_value<G>(acc, vraw[r], sc, r * NPG + kp);  // zeros past end
        __syncthreads();
    }

    // Merge the position groups, write this split's partial result.
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) red[kp][g][dl * 8 + e] = acc[g][e];
    __syncthreads();
    const int n_heads = a.n_heads;
    const int used = (len + chunk - 1) / chunk;
    if (used == 1) {
        // The whole context fits one slice (short contexts): normalize and write directly.
        for (int idx = tid; idx < G * D; idx += kThreads) {
            const int g = idx / D, d = idx % D;
            float sacc = 0.f;
#pragma unroll
            for (int pg = 0; pg < NPG; ++pg) sacc += red[pg][g][d];
            a.out[col * a.ldo + static_cast<int64_t>(kvh * G + g) * D + d] = __float2half(sacc / l_s[g]);
        }
        return;
    }
    for (int idx = tid; idx < G * D; idx += kThreads) {
        const int g = idx / D, d = idx % D;
        float s = 0.f;
#pragma unroll
        for (int pg = 0; pg < NPG; ++pg) s += red[pg][g][d];
        const int head = kvh * G + g;
        a.partial_o[((static_cast<int64_t>(col) * n_heads + head) * a.splits + split) * D + d] = s;
    }
    if (tid < G) {
        const int head = kvh * G + tid;
        a.partial_ml[(static_cast<int64_t>(col) * n_heads + head) * a.splits + split] = make_float2(m_s[tid], l_s[tid]);
    }

    // The last block of this (column, kv head) to finish merges the slices (no second launch).
    __shared__ bool is_last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const int prev = atomicAdd(a.counters + col * a.n_kv_heads + kvh, 1);
        is_last = prev == used - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int idx = tid; idx < G * D; idx += kThreads) {
        const int g = idx / D, d = idx % D;
        const int head = kvh * G + g;
        const float2 *ml = a.partial_ml + (static_cast<int64_t>(col) * n_heads + head) * a.splits;
        const float *po = a.partial_o + (static_cast<int64_t>(col) * n_heads + head) * a.splits * D;
        float m = -FLT_MAX;
        for (int sp = 0; sp < used; ++sp) m = fmaxf(m, __ldcg(&ml[sp]).x);
        float num = 0.f, den = 0.f;
        for (int sp = 0; sp < used; ++sp) {
            const float2 v = __ldcg(&ml[sp]);
            const float wgt = exp2f(v.x - m);
            num += wgt * __ldcg(&po[sp * D + d]);
            den += wgt * v.y;
        }
        a.out[col * a.ldo + static_cast<int64_t>(head) * D + d] = __float2half(num / den);
    }
    if (tid == 0) a.counters[col * a.n_kv_heads + kvh] = 0;  // ready for the next launch (graphs)
}

template <int D, int G>
void launch_split(const AttentionCall &a, cudaStream_t stream) {
    dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.n_kv_heads), static_cast<unsigned>(a.n_cols));
    launch_kernel(attention_split_kernel<D, G>, grid, kThreads, 0, stream, a);
}

template <int D>
void launch_for_dim(const AttentionCall &a, cudaStream_t stream) {
    switch (a.n_heads / a.n_kv_heads) {
        case 1: launch_split<D, 1>(a, stream); break;
        case 2: launch_split<D, 2>(a, stream); break;
        case 3: launch_split<D, 3>(a, stream); break;
        case 4: launch_split<D, 4>(a, stream); break;
        case 5: launch_split<D, 5>(a, stream); break;
        case 6: launch_split<D, 6>(a, stream); break;
        case 7: launch_split<D, 7>(a, stream); break;
        case 8: launch_split<D, 8>(a, stream); break;
        default: throw UnsupportedError("CUDA attention supports 1 to 8 query heads per kv head");
    }
    PUMICE_CUDA_CHECK_LAUNCH("attention_split");
}

}  // namespace

// A split shorter than a sub-chunk takes as long as a whole one, and a merge costs more than a
// second sub-chunk (docs/CUDA.md, "Decode step").
int attention_min_slice() { return std::max(1, env_int("PUMICE_CUDA_ATTENTION_MIN_SLICE", 2 * kSub)); }

void launch_attention_decode(const AttentionCall &call, cudaStream_t stream) {
    if (call.n_cols <= 0) return;
    AttentionCall a = call;
    a.min_slice = attention_min_slice();
    switch (a.head_dim) {
        case 64: launch_for_dim<64>(a, stream); break;
        case 128: launch_for_dim<128>(a, stream); break;
        default: throw UnsupportedError("CUDA attention supports head_dim 64 and 128");
    }
}

}  // namespace cuda
}  // namespace pumice
