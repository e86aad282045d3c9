// cpu_ops.h — the small vector operations of the Llama forward pass on the CPU (norms, RoPE,
// activations, attention dot products). Weights go through LinearOp; everything here touches
// activations only, so it is float32 throughout, as Hugging Face computes it.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_simd.h"
#include "model_file.h"

namespace pumice {
namespace cpu {

inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if PUMICE_HAVE_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    s = simd::hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// y += a * x
inline void axpy(float a, const float *x, float *y, int64_t n) {
    int64_t i = 0;
#if PUMICE_HAVE_AVX2
    const __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; ++i) y[i] += a * x[i];
}

inline void add_inplace(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

// out = x * rsqrt(mean(x^2) + eps) * w; the mean is accumulated in double so that wide models
// do not lose the low bits that float32 torch keeps through its pairwise summation.
inline void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * double(x[i]);
    const float variance = static_cast<float>(ss / double(n));
    const float r = 1.0f / std::sqrt(variance + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// gate = silu(gate) * up
inline void silu_mul(float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

// Rotates one head in place with Hugging Face's rotate_half convention: element j pairs with
// element j + half, and cos/sin hold half values (the frequencies are repeated for both halves).
inline void rope_head(float *x, const float *cos, const float *sin, int64_t half) {
    for (int64_t j = 0; j < half; ++j) {
        const float x1 = x[j], x2 = x[j + half];
        x[j] = x1 * cos[j] - x2 * sin[j];
        x[j + half] = x2 * cos[j] + x1 * sin[j];
    }
}

// A dense 1-D tensor (norm weight, bias) of `n` values as float32; FormatError naming the
// tensor if it is not dense or has another shape.
std::vector<float> load_dense_vector(const TensorEntry &entry, int64_t n);
// Any dense tensor as float32 (numel values) into out.
void dense_to_f32(const TensorEntry &entry, float *out);

}  // namespace cpu
}  // namespace pumice
