// sampling.cu — the device sampler: one block per row, the host sampler's rules
// (sampling_core.h holds the arithmetic both share, so the two pick the same token).
//
// Per row: (1) max and argmax (greedy stops here); (2) with top-k or top-p, the candidates
// (scaled log-weight >= the 2^-40 cut) are gathered into shared memory by rank key and sorted
// (bitonic; keys are unique, so the order — and the result — does not depend on the gathering
// order); top-k keeps a prefix, top-p scans integer masses to the shortest prefix reaching
// ceil(top_p * total); (3) the draw: each thread sums the kept mass of a contiguous id range,
// one exclusive scan over threads finds the range holding the random offset, and its thread
// walks it. Masses are integers, so every sum is exact and the kernel deterministic.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "sampling.cuh"
#include "sampling_core.h"

namespace pumice {
namespace cuda {
namespace {

using namespace ::pumice::sampling;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// (value, id): larger value wins, then the lower id.
__device__ __forceinline__ void take_better(float &v, int &id, float v2, int id2) {
    if (v2 > v || (v2 == v && id2 < id)) {
        v = v2;
        id = id2;
    }
}

__device__ void block_argmax(float &v, int &id, float *sv, int *si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) take_better(v, id, __shfl_xor_sync(kFull, v, o), __shfl_xor_sync(kFull, id, o));
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = id;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < kWarps ? sv[lane] : bits_float(0xff800000u);
        id = lane < kWarps ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) take_better(v, id, __shfl_xor_sync(kFull, v, o), __shfl_xor_sync(kFull, id, o));
        if (lane == 0) {
            sv[0] = v;
            si[0] = id;
        }
    }
    __syncthreads();
    v = sv[0];
    id = si[0];
    __syncthreads();  // the scratch may be reused at once
}

// Exclusive prefix sum of one value per thread over the block; *total gets the block's sum.
__device__ uint64_t block_exclusive_scan(uint64_t v, uint64_t *scratch, uint64_t *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint64_t inclusive = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint64_t up = __shfl_up_sync(kFull, inclusive, o);
        if (lane >= o) inclusive += up;
    }
    if (lane == 31) scratch[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        uint64_t s = lane < kWarps ? scratch[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const uint64_t up = __shfl_up_sync(kFull, s, o);
            if (lane >= o) s += up;
        }
        scratch[lane] = s;  // inclusive prefix over warps
    }
    __syncthreads();
    const uint64_t warp_prefix = warp > 0 ? scratch[warp - 1] : 0;
    *total = scratch[kWarps - 1];
    __syncthreads();  // the scratch may be reused at once
    return warp_prefix + inclusive - v;
}

// Mass of a token as the draw counts it (0 when outside the kept set), and of a rank key.
__device__ __forceinline__ uint64_t kept_mass(float x, int id, float max_logit, float inv_t, uint64_t min_key,
                                              float min_p) {
    float w;
    const uint64_t q = token_mass(log_weight(x, max_logit, inv_t), &w);
    if (q == 0 || rank_key(x, id) < min_key || !(w >= min_p)) return 0;
    return q;
}
__device__ __forceinline__ uint64_t key_mass(uint64_t key, float max_logit, float inv_t) {
    float w;
    return token_mass(log_weight(rank_key_logit(key), max_logit, inv_t), &w);
}

__global__ void __launch_bounds__(kThreads) sample_kernel(const float *__restrict__ logits, int64_t ld, int vocab,
                                                           const SampleRow *__restrict__ rows,
                                                           int32_t *__restrict__ out) {
    __shared__ uint64_t keys[kSampleMaxCandidates];
    __shared__ uint64_t scan_scratch[32];
    __shared__ float arg_v[32];
    __shared__ int arg_i[32];
    __shared__ int n_cand_s;
    __shared__ int last_s;

    const int r = blockIdx.x;
    const int tid = threadIdx.x;
    const float *l = logits + static_cast<int64_t>(r) * ld;
    const SampleRow p = rows[r];

    // (1) max, argmax
    float best = bits_float(0xff800000u);
    int best_id = 0x7fffffff;
    for (int i = tid; i < vocab; i += kThreads) take_better(best, best_id, sanitize(l[i]), i);
    block_argmax(best, best_id, arg_v, arg_i);
    const float inv_t = p.temperature > 0.0f ? __frcp_rn(p.temperature) : 0.0f;
    if (p.temperature == 0.0f || !isfinite(best) || !isfinite(inv_t)) {
        if (tid == 0) out[r] = best_id;
        return;
    }

    // (2) top-k / top-p: the lowest rank key kept (0: all)
    uint64_t min_key = 0;
    const bool use_top_k = p.top_k > 0 && p.top_k < vocab;
    if (use_top_k || p.top_p < 1.0f) {
        if (tid == 0) n_cand_s = 0;
        __syncthreads();
        for (int i = tid; i < vocab; i += kThreads) {
            const float x = sanitize(l[i]);
            if (log_weight(x, best, inv_t) >= kLogWeightCut) {
                const int slot = atomicAdd(&n_cand_s, 1);
                if (slot < kSampleMaxCandidates) keys[slot] = rank_key(x, i);
            }
        }
        __syncthreads();
        const int n_cand = n_cand_s;
        if (n_cand > kSampleMaxCandidates) {
            if (tid == 0) out[r] = -1;  // the host takes this row
            return;
        }
        int padded = 1;
        while (padded < n_cand) padded <<= 1;
        for (int i = n_cand + tid; i < padded; i += kThreads) keys[i] = 0;  // 0 sorts last
        __syncthreads();
        // Bitonic sort, descending.
        for (int k = 2; k <= padded; k <<= 1)
            for (int j = k >> 1; j > 0; j >>= 1) {
                for (int i = tid; i < padded; i += kThreads) {
                    const int partner = i ^ j;
                    if (partner > i) {
                        const uint64_t a = keys[i], b = keys[partner];
                        const bool descending = (i & k) == 0;
                        if (descending ? (a < b) : (a > b)) {
                            keys[i] = b;
                            keys[partner] = a;
                        }
                    }
                }
                __syncthreads();
            }
        const int n_k = (use_top_k && p.top_k < n_cand) ? p.top_k : n_cand;
        int last = n_k - 1;
        if (p.top_p < 1.0f) {
            // Thread t holds sorted positions [t * seg, (t + 1) * seg) of the n_k survivors.
            const int seg = (n_k + kThreads - 1) / kThreads;
            const int lo = min(n_k, tid * seg), hi = min(n_k, lo + seg);
            uint64_t mine = 0;
            for (int j = lo; j < hi; ++j) mine += key_mass(keys[j], best, inv_t);
            uint64_t total = 0;
            const uint64_t before = block_exclusive_scan(mine, scan_scratch, &total);
            const uint64_t need = top_p_need(p.top_p, total);
            if (before < need && need <= before + mine) {  // exactly one thread
                uint64_t cumulative = before;
                for (int j = lo; j < hi; ++j) {
                    cumulative += key_mass(keys[j], best, inv_t);
                    if (cumulative >= need) {
                        last_s = j;
                        break;
                    }
                }
            }
            __syncthreads();
            last = last_s;
        }
        if ((use_top_k && p.top_k < n_cand) || p.top_p < 1.0f) min_key = keys[last];
    }

    // (3) the draw, by inverse CDF over the kept tokens in id order.
    const int chunk = (vocab + kThreads - 1) / kThreads;
    const int lo = min(vocab, tid * chunk), hi = min(vocab, lo + chunk);
    uint64_t mine = 0;
    for (int i = lo; i < hi; ++i) mine += kept_mass(sanitize(l[i]), i, best, inv_t, min_key, p.min_p);
    uint64_t total = 0;
    const uint64_t before = block_exclusive_scan(mine, scan_scratch, &total);
    const uint64_t offset = draw_offset(draw_bits(p.seed, p.position), total);
    if (before <= offset && offset < before + mine) {  // exactly one thread
        uint64_t rest = offset - before;
        for (int i = lo; i < hi; ++i) {
            const uint64_t q = kept_mass(sanitize(l[i]), i, best, inv_t, min_key, p.min_p);
            if (rest < q) {
                out[r] = i;
                return;
            }
            rest -= q;
        }
    }
}

}  // namespace

void launch_sample(const float *logits, int64_t ld, int vocab, const SampleRow *rows, int n_rows, int32_t *out,
                   cudaStream_t stream) {
    if (n_rows <= 0) return;
    sample_kernel<<<n_rows, kThreads, 0, stream>>>(logits, ld, vocab, rows, out);
    PUMICE_CUDA_CHECK_LAUNCH("sample_kernel");
}

}  // namespace cuda
}  // namespace pumice
