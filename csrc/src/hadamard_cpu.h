// hadamard_cpu.h — the randomized Hadamard transforms of the `caldera` and `lplr` kinds
// (docs/FORMAT.md): for n = m · P (P the largest power of two dividing n, m odd),
//
//     T x = (C_m ⊗ H_P / √P) (s ∘ x)
//
// with s the stored ±1 signs, H_P the Sylvester Hadamard matrix and C_m the orthonormal DCT-II
// matrix (C_1 = [1]). Index i = q·P + p: a fast Walsh–Hadamard transform of every contiguous
// block of P, then C_m mixing the m blocks. T is orthogonal; inverse() applies Tᵀ.
#pragma once
#include <cstdint>
#include <vector>

namespace pumice {

class HadamardTransform {
public:
    HadamardTransform() = default;
    // signs: bit i of byte i / 8 set means s_i = −1 (ceil(n / 8) bytes).
    HadamardTransform(int64_t n, const uint8_t *packed_signs);

    int64_t size() const { return n_; }
    // In place on one vector of n floats; `scratch` holds at least n floats when m > 1.
    void forward(float *x, float *scratch) const;
    void inverse(float *x, float *scratch) const;

private:
    void mix(float *x, float *scratch, bool transpose) const;
    int64_t n_ = 0, m_ = 1, p_ = 1;
    float scale_ = 1.0f;          // 1 / √P
    std::vector<float> signs_;    // ±1
    std::vector<float> dct_;      // C_m, row-major [m, m]
};

// In-place unnormalized Walsh–Hadamard transform of x[0..p), p a power of two.
void fwht_inplace(float *x, int64_t p);

}  // namespace pumice
