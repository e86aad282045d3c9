// cpu_simd.h — scalar conversions and AVX2/FMA/F16C helpers for the CPU kernels.
//
// Everything here has a portable scalar version; the vector versions are compiled only when the
// compiler targets the instruction set (__AVX2__, __FMA__, __F16C__), so the library builds
// both with and without -march=native.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PUMICE_HAVE_AVX2 1
#include <immintrin.h>
#else
#define PUMICE_HAVE_AVX2 0
#endif

namespace pumice {
namespace simd {

// IEEE binary16 → binary32, exact for every input (subnormals, inf, NaN included).
inline float f16_to_f32_scalar(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {
        // Subnormal: normalise the mantissa.
        int e = -1;
        do {
            ++e;
            mantissa <<= 1;
        } while ((mantissa & 0x400u) == 0);
        bits = sign | (uint32_t(112 - e) << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline float f16_to_f32(uint16_t h) {
#if PUMICE_HAVE_AVX2
    return _cvtsh_ss(h);
#else
    return f16_to_f32_scalar(h);
#endif
}

inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Unaligned loads of little-endian 16-bit values from raw bytes.
inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline void f16_to_f32_row(const uint16_t *in, float *out, int64_t n) {
    int64_t i = 0;
#if PUMICE_HAVE_AVX2
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i,
                         _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(in + i))));
#endif
    for (; i < n; ++i) out[i] = f16_to_f32(in[i]);
}

inline void bf16_to_f32_row(const uint16_t *in, float *out, int64_t n) {
    int64_t i = 0;
#if PUMICE_HAVE_AVX2
    for (; i + 8 <= n; i += 8) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(in + i)));
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
#endif
    for (; i < n; ++i) out[i] = bf16_to_f32(in[i]);
}

#if PUMICE_HAVE_AVX2
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Eight f16 / bf16 values → eight floats.
inline __m256 load8_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
}
inline __m256 load8_bf16(const uint16_t *p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#endif

}  // namespace simd
}  // namespace pumice
