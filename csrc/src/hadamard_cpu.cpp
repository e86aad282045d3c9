// hadamard_cpu.cpp — see hadamard_cpu.h.
#include "hadamard_cpu.h"

#include <cmath>
#include <cstring>

namespace pumice {

void fwht_inplace(float *x, int64_t p) {
    // Butterflies of span h; for h >= 8 the inner loop is contiguous and vectorizes.
    for (int64_t h = 1; h < p; h *= 2) {
        for (int64_t i = 0; i < p; i += 2 * h) {
            float *a = x + i, *b = x + i + h;
            for (int64_t j = 0; j < h; ++j) {
                const float u = a[j], v = b[j];
                a[j] = u + v;
                b[j] = u - v;
            }
        }
    }
}

HadamardTransform::HadamardTransform(int64_t n, const uint8_t *packed_signs) : n_(n) {
    p_ = n & -n;
    m_ = n / p_;
    scale_ = float(1.0 / std::sqrt(double(p_)));
    signs_.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) signs_[size_t(i)] = ((packed_signs[i / 8] >> (i % 8)) & 1) ? -1.0f : 1.0f;
    if (m_ > 1) {
        dct_.resize(size_t(m_ * m_));
        const double pi = 3.14159265358979323846;
        for (int64_t j = 0; j < m_; ++j)
            for (int64_t i = 0; i < m_; ++i)
                dct_[size_t(j * m_ + i)] =
                    j == 0 ? float(1.0 / std::sqrt(double(m_)))
                           : float(std::sqrt(2.0 / double(m_)) *
                                   std::cos(pi * double(2 * i + 1) * double(j) / double(2 * m_)));
    }
}

void HadamardTransform::mix(float *x, float *scratch, bool transpose) const {
    for (int64_t q = 0; q < m_; ++q) {
        float *block = x + q * p_;
        fwht_inplace(block, p_);
        for (int64_t i = 0; i < p_; ++i) block[i] *= scale_;
    }
    if (m_ == 1) return;
    // out[j·P + p] = Σ_q C[j, q] x[q·P + p]   (C[q, j] for the transpose)
    for (int64_t j = 0; j < m_; ++j) {
        float *out = scratch + j * p_;
        for (int64_t i = 0; i < p_; ++i) out[i] = 0.0f;
        for (int64_t q = 0; q < m_; ++q) {
            const float c = transpose ? dct_[size_t(q * m_ + j)] : dct_[size_t(j * m_ + q)];
            const float *in = x + q * p_;
            for (int64_t i = 0; i < p_; ++i) out[i] += c * in[i];
        }
    }
    std::memcpy(x, scratch, sizeof(float) * size_t(n_));
}

void HadamardTransform::forward(float *x, float *scratch) const {
    for (int64_t i = 0; i < n_; ++i) x[i] *= signs_[size_t(i)];
    mix(x, scratch, false);
}

void HadamardTransform::inverse(float *x, float *scratch) const {
    mix(x, scratch, true);
    for (int64_t i = 0; i < n_; ++i) x[i] *= signs_[size_t(i)];
}

}  // namespace pumice
