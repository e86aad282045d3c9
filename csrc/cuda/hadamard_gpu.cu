// hadamard_gpu.cu — see hadamard_gpu.cuh.
#include "hadamard_gpu.cuh"

#include <algorithm>
#include <cmath>
#include <vector>

namespace pumice {
namespace cuda {
namespace {

__device__ __forceinline__ float sign_of(const uint8_t *signs, int i) {
    return ((signs[i >> 3] >> (i & 7)) & 1) ? -1.0f : 1.0f;
}

// Element access of vector v (the block's), so one kernel serves every source and destination.
struct LoadF16 {
    const __half *x;
    int64_t ld;
    __device__ float operator()(int64_t v, int64_t i) const { return __half2float(x[v * ld + i]); }
};
struct LoadF32 {
    const float *x;
    int64_t ld;
    __device__ float operator()(int64_t v, int64_t i) const { return x[v * ld + i]; }
};
struct StoreF16Padded {
    __half *out;
    int64_t ld, pad_to;
    __device__ void operator()(int64_t v, int64_t i, float x) const { out[v * ld + i] = __float2half(x); }
    __device__ int64_t pad_end() const { return pad_to; }
};
struct StoreF32 {
    float *out;
    int64_t ld;
    __device__ void operator()(int64_t v, int64_t i, float x) const { out[v * ld + i] = x; }
    __device__ int64_t pad_end() const { return 0; }
};
struct StoreMapped {
    float *out;
    int64_t ld;
    RowMap map;
    __device__ void operator()(int64_t v, int64_t i, float x) const { out[v * ld + map(i)] = x; }
    __device__ int64_t pad_end() const { return 0; }
};

// One block per vector; the vector lives in shared memory (t.n floats) between the load and the
// mix. All global reads happen before the first barrier and all writes after it, so `load` and
// `store` may address the same memory (in-place transforms).
template <bool INVERSE, class Load, class Store>
__global__ void hadamard_kernel(const HadamardView t, const Load load, const Store store) {
    extern __shared__ float s[];
    const int64_t v = blockIdx.x;
    // In-block indices fit in int: a vector is at most the shared memory of one block.
    const int n = static_cast<int>(t.n), m = static_cast<int>(t.m), p = static_cast<int>(t.p);
    const int log2p = __ffs(p) - 1;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float x = load(v, i);
        if (!INVERSE) x *= sign_of(t.signs, i);
        s[i] = x;
    }
    __syncthreads();
    // Walsh–Hadamard butterflies of span h = 2^sh inside every block of P: pair index idx < n/2
    // maps to (a, a + h) with a = (idx / h)·2h + idx % h; 2h divides P, so no pair crosses a block.
    const int pairs = n / 2;
    for (int sh = 0; sh < log2p; ++sh) {
        const int h = 1 << sh;
        for (int idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
            const int a = ((idx >> sh) << (sh + 1)) + (idx & (h - 1));
            const float u = s[a], w = s[a + h];
            s[a] = u + w;
            s[a + h] = u - w;
        }
        __syncthreads();
    }
    // out[j·P + p] = Σ_q C[j, q] x[q·P + p]   (C[q, j] for Tᵀ), scaled by 1/√P.
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float acc;
        if (m == 1) {
            acc = s[i];
        } else {
            const int j = i >> log2p, pp = i & (p - 1);
            acc = 0.0f;
            for (int q = 0; q < m; ++q) {
                const float c = INVERSE ? t.dct[q * m + j] : t.dct[j * m + q];
                acc += c * s[(q << log2p) + pp];
            }
        }
        acc *= t.scale;
        if (INVERSE) acc *= sign_of(t.signs, i);
        store(v, i, acc);
    }
    for (int64_t i = n + threadIdx.x; i < store.pad_end(); i += blockDim.x) store(v, i, 0.0f);
}

// ---- the split transform (decode) ---------------------------------------------------------------
//
// With P = P1 · P2 (P2 = min(P, 256)) the Sylvester order gives H_P = H_P1 ⊗ H_P2, so
//     T = (A ⊗ H_P2) / √P · diag(s),   A = C_m ⊗ H_P1   (R × R, R = m · P1),
// and a vector viewed as X[R][P2] (element i = r · P2 + c, r = q · P1 + p1) transforms row by row:
//     out row o = H_P2 (Σ_r A[o][r] · (s ∘ X)[r]) / √P           (Tᵀ: Aᵀ, and s after).
// A block owns RB output rows of one vector: its 256 threads (G = 256 / P2 groups of P2 columns)
// each sum every G-th input row into RB accumulators, the groups' partials are added in a fixed
// order in shared memory, and a P2-point FWHT per row finishes the block. So a vector spreads over
// ceil(R / RB) blocks instead of one, each reading the whole vector once (n / 256 loads a thread)
// and computing n · RB multiply-adds; A's coefficients are C[j][q] (global, broadcast across the
// warp) times the sign (−1)^popcount(o1 & p1).
constexpr int kSplitThreads = 256;

struct SplitShape {
    int p2 = 1, log2p2 = 0, log2p1 = 0, rows = 1;  // rows = R = m · P1
};

template <bool INVERSE, int RB, class Load, class Store>
__global__ void __launch_bounds__(kSplitThreads)
    hadamard_split_kernel(const HadamardView t, const SplitShape sp, const Load load, const Store store) {
    __shared__ float red[kSplitThreads * RB];  // partials [group][k][column], then rows [k][column]
    pdl_launch_dependents();
    const int64_t v = blockIdx.y;
    const int m = static_cast<int>(t.m), p2 = sp.p2, lp2 = sp.log2p2, lp1 = sp.log2p1, rows = sp.rows;
    const int groups = kSplitThreads >> lp2;
    const int c = threadIdx.x & (p2 - 1), g = threadIdx.x >> lp2;
    const int o0 = static_cast<int>(blockIdx.x) * RB;
    int jo[RB], o1[RB];
#pragma unroll
    for (int k = 0; k < RB; ++k) {
        const int o = min(o0 + k, rows - 1);  // rows past the end compute a copy, never stored
        jo[k] = o >> lp1;
        o1[k] = o & ((1 << lp1) - 1);
    }
    float acc[RB];
#pragma unroll
    for (int k = 0; k < RB; ++k) acc[k] = 0.0f;
    pdl_wait();
    for (int r = g; r < rows; r += groups) {
        const int q = r >> lp1, pr = r & ((1 << lp1) - 1);
        const int i = (r << lp2) + c;
        float x = load(v, i);
        if (!INVERSE) x *= sign_of(t.signs, i);
#pragma unroll
        for (int k = 0; k < RB; ++k) {
            float coef = m == 1 ? 1.0f : INVERSE ? t.dct[q * m + jo[k]] : t.dct[jo[k] * m + q];
            if (__popc(o1[k] & pr) & 1) coef = -coef;
            acc[k] = fmaf(coef, x, acc[k]);
        }
    }
#pragma unroll
    for (int k = 0; k < RB; ++k) red[(g * RB + k) * p2 + c] = acc[k];
    __syncthreads();
    // Group 0's slots [k][c] take the sum over groups, in group order (deterministic).
    for (int e = threadIdx.x; e < RB * p2; e += kSplitThreads) {
        const int k = e >> lp2, cc = e & (p2 - 1);
        float sum = red[e];
        for (int gg = 1; gg < groups; ++gg) sum += red[(gg * RB + k) * p2 + cc];
        red[e] = sum;
    }
    __syncthreads();
    // FWHT of every row of P2 (2h divides P2: no pair crosses a row).
    for (int sh = 0; sh < lp2; ++sh) {
        const int h = 1 << sh;
        for (int idx = threadIdx.x; idx < RB * p2 / 2; idx += kSplitThreads) {
            const int a = ((idx >> sh) << (sh + 1)) + (idx & (h - 1));
            const float u = red[a], w = red[a + h];
            red[a] = u + w;
            red[a + h] = u - w;
        }
        __syncthreads();
    }
    for (int e = threadIdx.x; e < RB * p2; e += kSplitThreads) {
        const int o = o0 + (e >> lp2);
        if (o >= rows) continue;
        const int i = (o << lp2) + (e & (p2 - 1));
        float y = red[e] * t.scale;
        if (INVERSE) y *= sign_of(t.signs, i);
        store(v, i, y);
    }
    if (blockIdx.x == 0)
        for (int64_t i = t.n + threadIdx.x; i < store.pad_end(); i += kSplitThreads) store(v, i, 0.0f);
}

SplitShape split_shape(const HadamardView &t) {
    SplitShape sp;
    sp.p2 = static_cast<int>(std::min<int64_t>(t.p, kSplitThreads));
    while ((1 << sp.log2p2) < sp.p2) ++sp.log2p2;
    const int64_t p1 = t.p / sp.p2;
    while ((int64_t{1} << sp.log2p1) < p1) ++sp.log2p1;
    sp.rows = static_cast<int>(t.m * p1);
    return sp;
}

// Rows per block: the fewest (least repeated reading of the vector) that still give about two
// blocks per SM; at batch 1 that is one row per block for every size that matters.
template <bool INVERSE, class Load, class Store>
void launch_split(const HadamardView &t, const Load &load, const Store &store, int n_vec, int num_sms,
                  cudaStream_t stream) {
    const SplitShape sp = split_shape(t);
    const int64_t target = 2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
    int rb = 1;
    while (rb < 8 && ceil_div(sp.rows, rb) * n_vec > target) rb *= 2;
    dim3 grid(static_cast<unsigned>(ceil_div(sp.rows, rb)), static_cast<unsigned>(n_vec));
    switch (rb) {
        case 1: launch_kernel(hadamard_split_kernel<INVERSE, 1, Load, Store>, grid, dim3(kSplitThreads), 0, stream, t, sp, load, store); break;
        case 2: launch_kernel(hadamard_split_kernel<INVERSE, 2, Load, Store>, grid, dim3(kSplitThreads), 0, stream, t, sp, load, store); break;
        case 4: launch_kernel(hadamard_split_kernel<INVERSE, 4, Load, Store>, grid, dim3(kSplitThreads), 0, stream, t, sp, load, store); break;
        default: launch_kernel(hadamard_split_kernel<INVERSE, 8, Load, Store>, grid, dim3(kSplitThreads), 0, stream, t, sp, load, store); break;
    }
    PUMICE_CUDA_CHECK_LAUNCH("hadamard_split");
}

// The kernel indexes a vector with int and holds it in one block's shared memory.
void check_length(const HadamardView &t) {
    if (t.n <= 0 || t.n > (1 << 20) || t.m * t.p != t.n || (t.p & (t.p - 1)) != 0)
        throw Error(PUMICE_ERR_INTERNAL, "hadamard: bad transform length");
}

int threads_for(int64_t n) {
    const int64_t want = (n / 2 + 31) / 32 * 32;
    return static_cast<int>(want < 64 ? 64 : want > 1024 ? 1024 : want);
}

int optin_smem_bytes() {
    int device = 0, bytes = 48 << 10;
    PUMICE_CUDA_CHECK(cudaGetDevice(&device));
    PUMICE_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return bytes;
}

}  // namespace

DeviceHadamard::DeviceHadamard(int64_t n, const uint8_t *packed_signs, cudaStream_t stream) {
    if (n <= 0) throw Error(PUMICE_ERR_INTERNAL, "hadamard transform of an empty dimension");
    view_.n = n;
    view_.p = n & -n;
    view_.m = n / view_.p;
    view_.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(view_.p)));
    const size_t sign_bytes = static_cast<size_t>((n + 7) / 8);
    signs_.allocate(sign_bytes, "hadamard signs");
    PUMICE_CUDA_CHECK(cudaMemcpyAsync(signs_.get(), packed_signs, sign_bytes, cudaMemcpyHostToDevice, stream));
    view_.signs = signs_.as<uint8_t>();
    if (view_.m > 1) {
        // Exactly the CPU backend's C_m (hadamard_cpu.cpp): double, then rounded to float.
        const int64_t m = view_.m;
        std::vector<float> dct(static_cast<size_t>(m * m));
        const double pi = 3.14159265358979323846;
        for (int64_t j = 0; j < m; ++j)
            for (int64_t i = 0; i < m; ++i)
                dct[static_cast<size_t>(j * m + i)] =
                    j == 0 ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(m)))
                           : static_cast<float>(std::sqrt(2.0 / static_cast<double>(m)) *
                                                std::cos(pi * static_cast<double>(2 * i + 1) * static_cast<double>(j) /
                                                         static_cast<double>(2 * m)));
        dct_.allocate(dct.size() * sizeof(float), "hadamard DCT matrix");
        PUMICE_CUDA_CHECK(cudaMemcpyAsync(dct_.get(), dct.data(), dct.size() * sizeof(float), cudaMemcpyHostToDevice,
                                          stream));
        view_.dct = dct_.as<float>();
        PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream));  // `dct` dies at scope end
    }
}

bool hadamard_fits_device(int64_t n) {
    return n > 0 && hadamard_smem_bytes(n) <= static_cast<size_t>(optin_smem_bytes());
}

void prepare_hadamard_kernels() {
    const int bytes = optin_smem_bytes();
    PUMICE_CUDA_CHECK(cudaFuncSetAttribute(hadamard_kernel<false, LoadF16, StoreF16Padded>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    PUMICE_CUDA_CHECK(cudaFuncSetAttribute(hadamard_kernel<true, LoadF32, StoreMapped>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    PUMICE_CUDA_CHECK(cudaFuncSetAttribute(hadamard_kernel<true, LoadF32, StoreF32>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

void launch_hadamard_forward_f16(const HadamardView &t, const __half *x, int64_t ldx, __half *out, int64_t ldo,
                                 int64_t pad_to, int n_vec, int num_sms, cudaStream_t stream) {
    if (n_vec <= 0) return;
    check_length(t);
    if (pad_to > ldo || t.n > pad_to) throw Error(PUMICE_ERR_INTERNAL, "hadamard: output rows too short");
    if (n_vec > 65535) throw Error(PUMICE_ERR_INTERNAL, "hadamard: too many vectors for one launch");
    launch_split<false>(t, LoadF16{x, ldx}, StoreF16Padded{out, ldo, pad_to}, n_vec, num_sms, stream);
}

void launch_hadamard_inverse_mapped(const HadamardView &t, const float *y, int64_t ldy, float *out, int64_t ldo,
                                    const RowMap &map, int n_vec, int num_sms, cudaStream_t stream) {
    if (n_vec <= 0) return;
    check_length(t);
    if (n_vec > 65535) throw Error(PUMICE_ERR_INTERNAL, "hadamard: too many vectors for one launch");
    launch_split<true>(t, LoadF32{y, ldy}, StoreMapped{out, ldo, map}, n_vec, num_sms, stream);
}

void launch_hadamard_inverse_rows(const HadamardView &t, float *rows, int64_t ld, int64_t n_vec, cudaStream_t stream) {
    if (n_vec <= 0) return;
    check_length(t);
    if (n_vec > 0x7fffffff) throw Error(PUMICE_ERR_INTERNAL, "hadamard: too many vectors for one launch");
    hadamard_kernel<true, LoadF32, StoreF32><<<static_cast<unsigned>(n_vec), threads_for(t.n), hadamard_smem_bytes(t.n), stream>>>(
        t, LoadF32{rows, ld}, StoreF32{rows, ld});
    PUMICE_CUDA_CHECK_LAUNCH("hadamard_inverse_rows");
}

}  // namespace cuda
}  // namespace pumice
