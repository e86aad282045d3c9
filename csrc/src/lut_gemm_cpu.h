// lut_gemm_cpu.h — LUT GEMM on the CPU for binary-coded (BCQ) weights (docs/BCQ.md).
//
// W[n, k] = row_scale[n] * sum_i 2^E[n, k/g, i] * (+1 if bit(n, i, k) else -1)
//
// The product y = W x never multiplies a weight: for every run of mu = 4 (or 8) activations a
// table of all 2^mu signed sums is built once per token, and each plane's mu bits of a row are one
// table look-up. The per-group power-of-two scales are applied once per (row, group, plane) by an
// exact multiply with 2^e, whose float bits are built by an integer shift of e into the exponent
// field (see docs/BCQ.md for why this beats an integer add on the partial sum's exponent).
//
// Weight layout (docs/FORMAT.md, kind `bcq`): rows in tiles of 32; planes[t][j][i][r] is the
// byte holding bits 8j..8j+7 (bit b = column 8j + b) of plane i for row 32t + r.
#pragma once
#include <cstdint>
#include <vector>

#include "threadpool.h"

namespace pumice {
namespace bcq {

constexpr int kTileRows = 32;
constexpr int kMaxBits = 8;
constexpr int kMinExponent = -64;
constexpr int kMaxExponent = 63;
constexpr int kMaxGroupSize = 1024;  // int16 group accumulators of the int8 path cannot overflow

// How the product is computed. The exact kinds equal the dense product of the reconstructed
// matrix up to f32 summation order; Int8 quantizes each table to int8 (one scale per group and
// token), as T-MAC does, trading ~0.4% relative error per group for 3-4x fewer instructions.
enum class LutMode {
    Exact4,      // mu = 4, f32 tables; AVX2 look-ups by vpermps (scalar without AVX2)
    Exact8,      // mu = 8, f32 tables of 256 entries, scalar look-ups
    Int8,        // mu = 4, int8 tables, pshufb look-ups, int16 accumulation (AVX2; else Exact4)
    Exact4Scalar,  // Exact4 without SIMD (what a CPU without AVX2 runs; kept testable)
    Dequant,     // no tables: dequantize each row to f32, then FMA (the baseline we compare to)
};

// Parses PUMICE_BCQ_LUT ("exact4", "exact8", "int8", "scalar4", "dequant", "exact" = exact4;
// unset or empty: the default, int8).
LutMode lut_mode_from_env();
const char *lut_mode_name(LutMode mode);

struct BcqMatrix {
    int64_t rows = 0;        // N
    int64_t cols = 0;        // K
    int bits = 0;            // q, planes per weight
    int64_t group_size = 0;  // g, a multiple of 8
    const uint8_t *planes = nullptr;    // [tiles][col_bytes][bits][32]
    const int8_t *exponents = nullptr;  // [tiles][groups][bits][32]
    std::vector<float> row_scales;      // [tiles * 32], zero past N

    int64_t tiles() const { return (rows + kTileRows - 1) / kTileRows; }
    int64_t col_bytes() const { return (cols + 7) / 8; }
    int64_t groups() const { return (cols + group_size - 1) / group_size; }
};

// y[b*N + n] = (W x_b)[n] for b < batch.
void lut_gemm(const BcqMatrix &w, LutMode mode, const float *x, int64_t batch, float *y,
              ThreadPool &pool);
// Row `row` of W as f32 (K values): the definition, used by dequantize and the Dequant mode.
void dequantize_row(const BcqMatrix &w, int64_t row, float *out);

}  // namespace bcq
}  // namespace pumice
