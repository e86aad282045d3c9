// lut_gemm_cpu.cpp — LUT GEMM kernels for `bcq` weights (see lut_gemm_cpu.h, docs/BCQ.md).
#include "lut_gemm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PUMICE_BCQ_AVX2 1
#endif

namespace pumice {
namespace bcq {

namespace {

// Tokens whose tables are built at once; bounds table memory for long prefills.
constexpr int64_t kTokenBlock = 16;

// 2^e as a float, built by placing e + 127 in the exponent field. For e in
// [kMinExponent, kMaxExponent] the result is a normal number, so multiplying by it is exact.
inline float pow2f(int e) {
    uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// ---- tables -----------------------------------------------------------------------------------
// Activations past K read as zero, so padding bits of the last byte contribute nothing.

inline float x_at(const float *x, int64_t k, int64_t cols) { return k < cols ? x[k] : 0.0f; }

// mu = 4: tab[c][m] = sum_{b<4} (bit b of m ? +1 : -1) * x[4c + b], for c < 2 * col_bytes.
// Each entry is (±x0 ± x1) + (±x2 ± x3): three roundings, whatever m is.
void build_tables4(const float *x, int64_t cols, int64_t col_bytes, float *tab) {
    for (int64_t c = 0; c < 2 * col_bytes; ++c) {
        const float x0 = x_at(x, 4 * c, cols), x1 = x_at(x, 4 * c + 1, cols);
        const float x2 = x_at(x, 4 * c + 2, cols), x3 = x_at(x, 4 * c + 3, cols);
        const float lo[4] = {-x0 - x1, x0 - x1, -x0 + x1, x0 + x1};
        const float hi[4] = {-x2 - x3, x2 - x3, -x2 + x3, x2 + x3};
        float *t = tab + 16 * c;
        for (int m = 0; m < 16; ++m) t[m] = lo[m & 3] + hi[m >> 2];
    }
}

// mu = 8: tab[j][m] for the 8 activations of byte column j: two exact 4-sums and one add.
void build_tables8(const float *x, int64_t cols, int64_t col_bytes, float *tab) {
    float quarter[2][16];
    for (int64_t j = 0; j < col_bytes; ++j) {
        for (int h = 0; h < 2; ++h) {
            const int64_t k = 8 * j + 4 * h;
            const float x0 = x_at(x, k, cols), x1 = x_at(x, k + 1, cols);
            const float x2 = x_at(x, k + 2, cols), x3 = x_at(x, k + 3, cols);
            const float lo[4] = {-x0 - x1, x0 - x1, -x0 + x1, x0 + x1};
            const float hi[4] = {-x2 - x3, x2 - x3, -x2 + x3, x2 + x3};
            for (int m = 0; m < 16; ++m) quarter[h][m] = lo[m & 3] + hi[m >> 2];
        }
        float *t = tab + 256 * j;
        for (int m = 0; m < 256; ++m) t[m] = quarter[0][m & 15] + quarter[1][m >> 4];
    }
}

// int8 tables: the mu = 4 table divided by one scale per group (the largest |entry| of the
// group maps to 127) and rounded. scale[gi] multiplies the integer group sums back.
void build_tables_int8(const float *x, int64_t cols, int64_t col_bytes, int64_t group_size,
                       int8_t *tab, float *scale) {
    const int64_t groups = (cols + group_size - 1) / group_size;
    float exact[32];
    for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t c0 = gi * group_size / 4;
        const int64_t c1 = std::min<int64_t>((gi + 1) * group_size / 4, 2 * col_bytes);
        float peak = 0.0f;
        for (int64_t c = c0; c < c1; ++c) {
            float s = 0.0f;
            for (int b = 0; b < 4; ++b) s += std::fabs(x_at(x, 4 * c + b, cols));
            peak = std::max(peak, s);
        }
        const float inv = peak > 0.0f ? 127.0f / peak : 0.0f;
        scale[gi] = peak > 0.0f ? peak / 127.0f : 0.0f;
        for (int64_t c = c0; c < c1; ++c) {
            build_tables4(x + 4 * c, std::max<int64_t>(0, std::min<int64_t>(4, cols - 4 * c)), 1,
                          exact);  // one chunk of 4 (the second half of "byte" is unused)
            for (int m = 0; m < 16; ++m) {
                const float v = std::nearbyint(exact[m] * inv);
                tab[16 * c + m] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, v)));
            }
        }
    }
}

// ---- scalar kernels (any CPU) -----------------------------------------------------------------
// Each computes the outputs of one tile of 32 rows (only the first `valid` are written).

void tile_exact8_scalar(const BcqMatrix &w, int64_t t, const float *tab, float *out, int valid) {
    const int q = w.bits;
    const int64_t kb = w.col_bytes(), groups = w.groups(), gbytes = w.group_size / 8;
    const uint8_t *tp = w.planes + t * kb * q * kTileRows;
    const int8_t *te = w.exponents + t * groups * q * kTileRows;
    for (int r = 0; r < valid; ++r) {
        float acc = 0.0f;
        for (int64_t gi = 0; gi < groups; ++gi) {
            float s[kMaxBits] = {};
            const int64_t j1 = std::min(kb, (gi + 1) * gbytes);
            for (int64_t j = gi * gbytes; j < j1; ++j) {
                const float *tb = tab + 256 * j;
                const uint8_t *wp = tp + j * q * kTileRows + r;
                for (int i = 0; i < q; ++i) s[i] += tb[wp[i * kTileRows]];
            }
            for (int i = 0; i < q; ++i) acc += s[i] * pow2f(te[(gi * q + i) * kTileRows + r]);
        }
        out[r] = acc * w.row_scales[t * kTileRows + r];
    }
}

void tile_exact4_scalar(const BcqMatrix &w, int64_t t, const float *tab, float *out, int valid) {
    const int q = w.bits;
    const int64_t kb = w.col_bytes(), groups = w.groups(), gbytes = w.group_size / 8;
    const uint8_t *tp = w.planes + t * kb * q * kTileRows;
    const int8_t *te = w.exponents + t * groups * q * kTileRows;
    for (int r = 0; r < valid; ++r) {
        float acc = 0.0f;
        for (int64_t gi = 0; gi < groups; ++gi) {
            float s[kMaxBits] = {};
            const int64_t j1 = std::min(kb, (gi + 1) * gbytes);
            for (int64_t j = gi * gbytes; j < j1; ++j) {
                const float *tb = tab + 32 * j;
                const uint8_t *wp = tp + j * q * kTileRows + r;
                for (int i = 0; i < q; ++i) {
                    const uint8_t b = wp[i * kTileRows];
                    s[i] += tb[b & 15] + tb[16 + (b >> 4)];
                }
            }
            for (int i = 0; i < q; ++i) acc += s[i] * pow2f(te[(gi * q + i) * kTileRows + r]);
        }
        out[r] = acc * w.row_scales[t * kTileRows + r];
    }
}

#ifdef PUMICE_BCQ_AVX2

// 2^e for 8 int8 exponents: sign-extend, add the bias, shift into the exponent field.
inline __m256 pow2_8(const int8_t *e) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(e)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(v, _mm256_set1_epi32(127)), 23));
}

// Exact f32 tables, mu = 4, eight rows per vector. A 16-entry table is two registers; vpermps
// picks by the low 3 bits of the index and a blend on bit 3 chooses the half. Bits of one byte
// serve two chunks: the low nibble indexes chunk 2j, the high nibble chunk 2j + 1.
template <int Q>
void tile_exact4_avx2(const BcqMatrix &w, int64_t t, const float *tab, float *out) {
    const int64_t kb = w.col_bytes(), groups = w.groups(), gbytes = w.group_size / 8;
    const uint8_t *tp = w.planes + t * kb * Q * kTileRows;
    const int8_t *te = w.exponents + t * groups * Q * kTileRows;
    for (int s = 0; s < 4; ++s) {
        __m256 total = _mm256_setzero_ps();
        for (int64_t gi = 0; gi < groups; ++gi) {
            __m256 acc[Q];
            for (int i = 0; i < Q; ++i) acc[i] = _mm256_setzero_ps();
            const int64_t j1 = std::min(kb, (gi + 1) * gbytes);
            for (int64_t j = gi * gbytes; j < j1; ++j) {
                const float *tb = tab + 32 * j;
                const __m256 t0l = _mm256_loadu_ps(tb), t0h = _mm256_loadu_ps(tb + 8);
                const __m256 t1l = _mm256_loadu_ps(tb + 16), t1h = _mm256_loadu_ps(tb + 24);
                const uint8_t *wp = tp + j * Q * kTileRows + 8 * s;
                for (int i = 0; i < Q; ++i) {
                    const __m256i v = _mm256_cvtepu8_epi32(
                        _mm_loadl_epi64(reinterpret_cast<const __m128i *>(wp + i * kTileRows)));
                    const __m256 r0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0l, v),
                                                       _mm256_permutevar8x32_ps(t0h, v),
                                                       _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
                    const __m256i v4 = _mm256_srli_epi32(v, 4);
                    const __m256 r1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t1l, v4),
                                                       _mm256_permutevar8x32_ps(t1h, v4),
                                                       _mm256_castsi256_ps(_mm256_slli_epi32(v, 24)));
                    acc[i] = _mm256_add_ps(acc[i], _mm256_add_ps(r0, r1));
                }
            }
            for (int i = 0; i < Q; ++i)
                total = _mm256_fmadd_ps(acc[i], pow2_8(te + (gi * Q + i) * kTileRows + 8 * s), total);
        }
        _mm256_storeu_ps(out + 8 * s,
                         _mm256_mul_ps(total, _mm256_loadu_ps(w.row_scales.data() + t * kTileRows + 8 * s)));
    }
}

// int8 tables, mu = 4, 32 rows per vector: one pshufb looks up 32 rows' nibbles in a 16-byte
// table. The two look-ups of a byte (chunks 2j and 2j + 1) are interleaved and summed pairwise
// into int16 by pmaddubsw, which also widens them; a group (<= 1024 columns) cannot overflow.
template <int Q>
void tile_int8_avx2(const BcqMatrix &w, int64_t t, const int8_t *tab, const float *gscale,
                    float *out) {
    const int64_t kb = w.col_bytes(), groups = w.groups(), gbytes = w.group_size / 8;
    const uint8_t *tp = w.planes + t * kb * Q * kTileRows;
    const int8_t *te = w.exponents + t * groups * Q * kTileRows;
    const __m256i low_nibble = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi8(1);
    __m256 total[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
    for (int64_t gi = 0; gi < groups; ++gi) {
        __m256i acc_lo[Q], acc_hi[Q];  // rows 0-7 | 16-23 and rows 8-15 | 24-31
        for (int i = 0; i < Q; ++i) acc_lo[i] = acc_hi[i] = _mm256_setzero_si256();
        const int64_t j1 = std::min(kb, (gi + 1) * gbytes);
        for (int64_t j = gi * gbytes; j < j1; ++j) {
            const __m256i t0 = _mm256_broadcastsi128_si256(
                _mm_loadu_si128(reinterpret_cast<const __m128i *>(tab + 32 * j)));
            const __m256i t1 = _mm256_broadcastsi128_si256(
                _mm_loadu_si128(reinterpret_cast<const __m128i *>(tab + 32 * j + 16)));
            const uint8_t *wp = tp + j * Q * kTileRows;
            for (int i = 0; i < Q; ++i) {
                const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(wp + i * kTileRows));
                const __m256i lo = _mm256_and_si256(wv, low_nibble);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low_nibble);
                const __m256i r0 = _mm256_shuffle_epi8(t0, lo);
                const __m256i r1 = _mm256_shuffle_epi8(t1, hi);
                acc_lo[i] = _mm256_add_epi16(acc_lo[i], _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(r0, r1)));
                acc_hi[i] = _mm256_add_epi16(acc_hi[i], _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(r0, r1)));
            }
        }
        const __m256 gs = _mm256_set1_ps(gscale[gi]);
        for (int i = 0; i < Q; ++i) {
            const int8_t *ep = te + (gi * Q + i) * kTileRows;
            const __m256i parts[4] = {
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc_lo[i])),       // rows 0-7
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc_hi[i])),       // rows 8-15
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc_lo[i], 1)),  // rows 16-23
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc_hi[i], 1)),  // rows 24-31
            };
            for (int s = 0; s < 4; ++s)
                total[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(parts[s]),
                                           _mm256_mul_ps(pow2_8(ep + 8 * s), gs), total[s]);
        }
    }
    for (int s = 0; s < 4; ++s)
        _mm256_storeu_ps(out + 8 * s, _mm256_mul_ps(total[s],
                         _mm256_loadu_ps(w.row_scales.data() + t * kTileRows + 8 * s)));
}

// Dequant-then-FMA for one row (the baseline LUT GEMM is compared against): each byte of a
// plane becomes eight ±α lanes (compare the broadcast byte with the bit masks, blend), the q
// planes are summed to eight weights, and one FMA per eight weights takes the product.
float row_dequant_dot_avx2(const BcqMatrix &w, int64_t row, const float *x) {
    const int q = w.bits;
    const int64_t kb = w.col_bytes(), groups = w.groups(), gbytes = w.group_size / 8;
    const int64_t t = row / kTileRows, r = row % kTileRows;
    const uint8_t *tp = w.planes + t * kb * q * kTileRows + r;
    const int8_t *te = w.exponents + t * groups * q * kTileRows + r;
    const __m256i bit_masks = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const float rs = w.row_scales[row];
    __m256 acc = _mm256_setzero_ps();
    float tail = 0.0f;
    for (int64_t gi = 0; gi < groups; ++gi) {
        __m256 pos[kMaxBits], neg[kMaxBits];
        for (int i = 0; i < q; ++i) {
            pos[i] = _mm256_set1_ps(rs * pow2f(te[(gi * q + i) * kTileRows]));
            neg[i] = _mm256_sub_ps(_mm256_setzero_ps(), pos[i]);
        }
        const int64_t j1 = std::min(kb, (gi + 1) * gbytes);
        for (int64_t j = gi * gbytes; j < j1; ++j) {
            __m256 w8 = _mm256_setzero_ps();
            for (int i = 0; i < q; ++i) {
                const __m256i b = _mm256_set1_epi32(tp[(j * q + i) * kTileRows]);
                const __m256 on = _mm256_castsi256_ps(
                    _mm256_cmpeq_epi32(_mm256_and_si256(b, bit_masks), bit_masks));
                w8 = _mm256_add_ps(w8, _mm256_blendv_ps(neg[i], pos[i], on));
            }
            if (8 * j + 8 <= w.cols) {
                acc = _mm256_fmadd_ps(w8, _mm256_loadu_ps(x + 8 * j), acc);
            } else {
                alignas(32) float lanes[8];
                _mm256_store_ps(lanes, w8);
                for (int64_t k = 8 * j; k < w.cols; ++k) tail += lanes[k - 8 * j] * x[k];
            }
        }
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    return _mm_cvtss_f32(h) + tail;
}

inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
    }
    __m256 s = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float total = _mm_cvtss_f32(h);
    for (; k < n; ++k) total += a[k] * b[k];
    return total;
}

#else

inline float dot_f32(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
    return s;
}

#endif  // PUMICE_BCQ_AVX2

template <template <int> class Kernel, typename... Args>
void dispatch_bits(int bits, Args &&...args) {
    switch (bits) {
        case 1: Kernel<1>::run(args...); break;
        case 2: Kernel<2>::run(args...); break;
        case 3: Kernel<3>::run(args...); break;
        case 4: Kernel<4>::run(args...); break;
        case 5: Kernel<5>::run(args...); break;
        case 6: Kernel<6>::run(args...); break;
        case 7: Kernel<7>::run(args...); break;
        default: Kernel<8>::run(args...); break;
    }
}

#ifdef PUMICE_BCQ_AVX2
template <int Q> struct Exact4Avx2 {
    static void run(const BcqMatrix &w, int64_t t, const float *tab, float *out) {
        tile_exact4_avx2<Q>(w, t, tab, out);
    }
};
template <int Q> struct Int8Avx2 {
    static void run(const BcqMatrix &w, int64_t t, const int8_t *tab, const float *gs, float *out) {
        tile_int8_avx2<Q>(w, t, tab, gs, out);
    }
};
#endif

}  // namespace

LutMode lut_mode_from_env() {
    const char *env = std::getenv("PUMICE_BCQ_LUT");
    const std::string v = env ? env : "";
    if (v == "exact8") return LutMode::Exact8;
    if (v == "int8") return LutMode::Int8;
    if (v == "dequant") return LutMode::Dequant;
    if (v == "exact4" || v == "exact") return LutMode::Exact4;
    if (v == "scalar4") return LutMode::Exact4Scalar;
    return LutMode::Int8;  // the default: see docs/BCQ.md for the accuracy/speed measurements
}

const char *lut_mode_name(LutMode mode) {
    switch (mode) {
        case LutMode::Exact4: return "exact4";
        case LutMode::Exact8: return "exact8";
        case LutMode::Exact4Scalar: return "scalar4";
        case LutMode::Int8: return "int8";
        case LutMode::Dequant: return "dequant";
    }
    return "?";
}

void dequantize_row(const BcqMatrix &w, int64_t row, float *out) {
    const int q = w.bits;
    const int64_t kb = w.col_bytes(), groups = w.groups(), gbytes = w.group_size / 8;
    const int64_t t = row / kTileRows, r = row % kTileRows;
    const uint8_t *tp = w.planes + t * kb * q * kTileRows + r;
    const int8_t *te = w.exponents + t * groups * q * kTileRows + r;
    const float rs = w.row_scales[row];
    std::fill(out, out + w.cols, 0.0f);
    for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t j1 = std::min(kb, (gi + 1) * gbytes);
        for (int i = 0; i < q; ++i) {
            const float a = rs * pow2f(te[(gi * q + i) * kTileRows]);
            for (int64_t j = gi * gbytes; j < j1; ++j) {
                const unsigned b = tp[(j * q + i) * kTileRows];
                const int64_t n = std::min<int64_t>(8, w.cols - 8 * j);
                for (int64_t bit = 0; bit < n; ++bit) out[8 * j + bit] += ((b >> bit) & 1u) ? a : -a;
            }
        }
    }
}

void lut_gemm(const BcqMatrix &w, LutMode mode, const float *x, int64_t batch, float *y,
              ThreadPool &pool) {
#ifndef PUMICE_BCQ_AVX2
    if (mode == LutMode::Int8) mode = LutMode::Exact4;
#endif
    const int64_t N = w.rows, K = w.cols, kb = w.col_bytes(), tiles = w.tiles();

    if (mode == LutMode::Dequant) {
#ifdef PUMICE_BCQ_AVX2
        pool.parallel_for(tiles, 1, [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; ++t)
                for (int64_t n = t * kTileRows; n < std::min(N, (t + 1) * kTileRows); ++n)
                    for (int64_t b = 0; b < batch; ++b)
                        y[b * N + n] = row_dequant_dot_avx2(w, n, x + b * K);
        });
        return;
#endif
        pool.parallel_for(tiles, 1, [&](int64_t t0, int64_t t1) {
            std::vector<float> row(static_cast<size_t>(K));
            for (int64_t t = t0; t < t1; ++t) {
                for (int64_t n = t * kTileRows; n < std::min(N, (t + 1) * kTileRows); ++n) {
                    dequantize_row(w, n, row.data());
                    for (int64_t b = 0; b < batch; ++b) y[b * N + n] = dot_f32(row.data(), x + b * K, K);
                }
            }
        });
        return;
    }

    // Table sizes per token, in bytes.
    const int64_t tab_floats = mode == LutMode::Exact8 ? 256 * kb : 32 * kb;
    const int64_t groups = w.groups();
    std::vector<float> ftab;
    std::vector<int8_t> itab;
    std::vector<float> gscale;
    for (int64_t b0 = 0; b0 < batch; b0 += kTokenBlock) {
        const int64_t nb = std::min(kTokenBlock, batch - b0);
        if (mode == LutMode::Int8) {
            itab.resize(static_cast<size_t>(nb * 32 * kb));
            gscale.resize(static_cast<size_t>(nb * groups));
        } else {
            ftab.resize(static_cast<size_t>(nb * tab_floats));
        }
        auto build = [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                const float *xb = x + (b0 + i) * K;
                if (mode == LutMode::Int8)
                    build_tables_int8(xb, K, kb, w.group_size, itab.data() + i * 32 * kb,
                                      gscale.data() + i * groups);
                else if (mode == LutMode::Exact8)
                    build_tables8(xb, K, kb, ftab.data() + i * tab_floats);
                else
                    build_tables4(xb, K, kb, ftab.data() + i * tab_floats);
            }
        };
        if (nb > 1) pool.parallel_for(nb, 1, build); else build(0, 1);

        pool.parallel_for(tiles, 1, [&](int64_t t0, int64_t t1) {
            alignas(32) float out[kTileRows];
            for (int64_t t = t0; t < t1; ++t) {
                const int valid = static_cast<int>(std::min<int64_t>(kTileRows, N - t * kTileRows));
                for (int64_t i = 0; i < nb; ++i) {
                    switch (mode) {
                        case LutMode::Exact8:
                            tile_exact8_scalar(w, t, ftab.data() + i * tab_floats, out, valid);
                            break;
                        case LutMode::Exact4Scalar:
                            tile_exact4_scalar(w, t, ftab.data() + i * tab_floats, out, valid);
                            break;
                        case LutMode::Int8:
#ifdef PUMICE_BCQ_AVX2
                            dispatch_bits<Int8Avx2>(w.bits, w, t, itab.data() + i * 32 * kb,
                                                    gscale.data() + i * groups, out);
#endif
                            break;
                        default:
#ifdef PUMICE_BCQ_AVX2
                            dispatch_bits<Exact4Avx2>(w.bits, w, t, ftab.data() + i * tab_floats, out);
#else
                            tile_exact4_scalar(w, t, ftab.data() + i * tab_floats, out, valid);
#endif
                            break;
                    }
                    std::memcpy(y + (b0 + i) * N + t * kTileRows, out, sizeof(float) * valid);
                }
            }
        });
    }
}

}  // namespace bcq
}  // namespace pumice
