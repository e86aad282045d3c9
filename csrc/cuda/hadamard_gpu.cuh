// hadamard_gpu.cuh — the randomized Hadamard ⊗ DCT transforms of the `caldera` and `lplr` kinds
// on the GPU (the same T as csrc/src/hadamard_cpu.h and docs/FORMAT.md):
//
//     T x  = (C_m ⊗ H_P / √P) (s ∘ x)          n = m · P, P the largest power of two dividing n
//     Tᵀ y = s ∘ ((C_mᵀ ⊗ H_P / √P) y)
//
// One thread block transforms one vector held in shared memory (n floats): the signs on load
// (forward), log2(P) butterfly stages over the m contiguous blocks of P, then the C_m mix, whose
// output goes straight to global memory — so the mix needs no second buffer, and a vector can be
// transformed in place. Vectors are independent: a launch takes any number of them.
// That kernel serves prefill (many vectors); decode (1..16 vectors) uses a split kernel that
// spreads each vector over many blocks through T = (C_m ⊗ H_P1 ⊗ H_P2) (hadamard_gpu.cu).
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "device_linear.cuh"

namespace pumice {
namespace cuda {

// What a kernel needs to apply T_n or T_nᵀ (plain pointers, passed by value).
struct HadamardView {
    int64_t n = 0;
    int64_t m = 1, p = 1;          // n = m · p, p a power of two, m odd
    float scale = 1.0f;            // 1 / √p
    const uint8_t *signs = nullptr;  // packed, bit i % 8 of byte i / 8 set: s_i = −1
    const float *dct = nullptr;      // C_m row-major [m][m]; nullptr when m == 1
};

// T_n of one dimension on the device: its packed signs and (m > 1) the DCT matrix, which is
// computed on the host exactly as the CPU backend computes it.
class DeviceHadamard {
public:
    DeviceHadamard() = default;
    DeviceHadamard(int64_t n, const uint8_t *packed_signs, cudaStream_t stream);
    const HadamardView &view() const { return view_; }
    int64_t bytes() const { return static_cast<int64_t>(signs_.size() + dct_.size()); }

private:
    HadamardView view_;
    DeviceBuffer signs_, dct_;
};

// Shared memory a transform of length n needs, and whether this device can give it.
inline size_t hadamard_smem_bytes(int64_t n) { return static_cast<size_t>(n) * sizeof(float); }
bool hadamard_fits_device(int64_t n);
// Lets the transform kernels use all of the device's opt-in shared memory (once per device
// before their first launch; not allowed inside graph capture, so call it at load time).
void prepare_hadamard_kernels();

// x'[v][i] = (T x_v)[i] for v < n_vec, i < n, and x'[v][i] = 0 for n <= i < pad_to (the GEMV
// reads up to its padded width). f16 in and out, f32 inside.
void launch_hadamard_forward_f16(const HadamardView &t, const __half *x, int64_t ldx, __half *out, int64_t ldo,
                                 int64_t pad_to, int n_vec, int num_sms, cudaStream_t stream);
// out[v * ldo + map(r)] = (Tᵀ y_v)[r] for r < n (the decode output of a DeviceLinear).
void launch_hadamard_inverse_mapped(const HadamardView &t, const float *y, int64_t ldy, float *out, int64_t ldo,
                                    const RowMap &map, int n_vec, int num_sms, cudaStream_t stream);
// rows[v][0..n) = Tᵀ rows[v][0..n), in place, rows ld floats apart (prefill: one axis of W).
void launch_hadamard_inverse_rows(const HadamardView &t, float *rows, int64_t ld, int64_t n_vec, cudaStream_t stream);

}  // namespace cuda
}  // namespace pumice
