// elementwise.cu — embedding lookup, RMSNorm, and the prefill softmax.
#include <cuda_fp16.h>

#include <cfloat>

#include "cuda_common.cuh"
#include "decode.cuh"
#include "kernels.cuh"

namespace pumice {
namespace cuda {
namespace {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Reduction over a block of up to 1024 threads; `scratch` holds 32 floats.
template <bool kMax>
__device__ float block_reduce(float v, float *scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = kMax ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int n_warps = (blockDim.x + 31) / 32;
    v = lane < n_warps ? scratch[lane] : (kMax ? -FLT_MAX : 0.f);
    return kMax ? warp_max(v) : warp_sum(v);
}

__global__ void embed_kernel(const WeightView w, const StepColumn *cols, int64_t hidden, float *resid, int64_t ld) {
    pdl_launch_dependents();
    pdl_wait();
    const int col = blockIdx.y;
    const int64_t row = cols[col].token;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < hidden;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x)
        resid[col * ld + k] = weight_at(w, row, k);
}

// One block per column; each thread keeps its inputs in registers between the two passes
// (the norm is on the critical path of every layer: it must be short, not just cheap).
template <int PER_THREAD>
__global__ void __launch_bounds__(1024) rmsnorm_kernel(const float *x, int64_t ldx, const float *weight,
                                                       int64_t hidden, float eps, __half *out, int64_t ldo) {
    __shared__ float scratch[32];
    pdl_launch_dependents();
    pdl_wait();
    const int col = blockIdx.x;
    const float *xr = x + col * ldx;
    float v[PER_THREAD];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        const int64_t k = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
        v[i] = k < hidden ? xr[k] : 0.f;
        ss += v[i] * v[i];
    }
    ss = block_reduce<false>(ss, scratch);
    const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        const int64_t k = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
        if (k < hidden) out[col * ldo + k] = __float2half(v[i] * inv * weight[k]);
    }
}

__global__ void rmsnorm_large_kernel(const float *x, int64_t ldx, const float *weight, int64_t hidden, float eps,
                                     __half *out, int64_t ldo) {
    __shared__ float scratch[32];
    pdl_launch_dependents();
    pdl_wait();
    const int col = blockIdx.x;
    const float *xr = x + col * ldx;
    float ss = 0.f;
    for (int64_t k = threadIdx.x; k < hidden; k += blockDim.x) ss += xr[k] * xr[k];
    ss = block_reduce<false>(ss, scratch);
    const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);
    for (int64_t k = threadIdx.x; k < hidden; k += blockDim.x)
        out[col * ldo + k] = __float2half(xr[k] * inv * weight[k]);
}

__global__ void causal_softmax_kernel(const float *scores, __half *probs, int n, int64_t ld, int n_keys, int n_past) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;  // head * n + i
    const int i = static_cast<int>(row % n);
    const int visible = n_past + i + 1;
    const float *s = scores + row * ld;
    __half *p = probs + row * ld;
    float mx = -FLT_MAX;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) mx = fmaxf(mx, s[j]);
    mx = block_reduce<true>(mx, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) sum += __expf(s[j] - mx);
    sum = block_reduce<false>(sum, scratch);
    const float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x)
        p[j] = __float2half(j < visible ? __expf(s[j] - mx) * inv : 0.f);
}

}  // namespace

void launch_embed(const WeightView &w, const StepColumn *cols, int n_cols, int64_t hidden, float *resid,
                  int64_t ld, cudaStream_t stream) {
    if (n_cols <= 0) return;
    dim3 grid(static_cast<unsigned>(ceil_div(hidden, 256) < 16 ? ceil_div(hidden, 256) : 16), static_cast<unsigned>(n_cols));
    launch_kernel(embed_kernel, grid, 256, 0, stream, w, cols, hidden, resid, ld);
    PUMICE_CUDA_CHECK_LAUNCH("embed");
}

void launch_rmsnorm(const float *x, int64_t ldx, const float *weight, int64_t hidden, float eps, __half *out,
                    int64_t ldo, int n_cols, cudaStream_t stream) {
    if (n_cols <= 0) return;
    const dim3 grid(static_cast<unsigned>(n_cols));
    if (hidden <= 1024 * 4) launch_kernel(rmsnorm_kernel<4>, grid, 1024, 0, stream, x, ldx, weight, hidden, eps, out, ldo);
    else if (hidden <= 1024 * 8) launch_kernel(rmsnorm_kernel<8>, grid, 1024, 0, stream, x, ldx, weight, hidden, eps, out, ldo);
    else launch_kernel(rmsnorm_large_kernel, grid, 1024, 0, stream, x, ldx, weight, hidden, eps, out, ldo);
    PUMICE_CUDA_CHECK_LAUNCH("rmsnorm");
}

void launch_causal_softmax(const float *scores, __half *probs, int n_heads, int n, int64_t ld, int n_keys,
                           int n_past, cudaStream_t stream) {
    causal_softmax_kernel<<<static_cast<unsigned>(n_heads) * n, 256, 0, stream>>>(scores, probs, n, ld, n_keys, n_past);
    PUMICE_CUDA_CHECK_LAUNCH("causal_softmax");
}

}  // namespace cuda
}  // namespace pumice
