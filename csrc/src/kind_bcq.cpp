// kind_bcq.cpp — storage kind `bcq` (docs/FORMAT.md): binary-coded weights with power-of-two
// group scales, applied by LUT GEMM (lut_gemm_cpu.h). Reads its parts only through the
// TensorView, so it works as a top-level tensor and as a prefixed sub-tensor (CALDERA's Q).
#include <cmath>
#include <cstring>
#include <string>

#include "errors.h"
#include "linear.h"
#include "lut_gemm_cpu.h"

namespace pumice {

namespace {

float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0);
            bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3FFu) << 13);
        }
    } else if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

class BcqLinear : public LinearOp {
public:
    explicit BcqLinear(const TensorView &view) {
        const std::string where = "tensor '" + view.name() + "'" +
                                  (view.prefix.empty() ? "" : " (sub-tensor '" + view.prefix + "')");
        const int64_t bits = view.int_param("bits");
        const int64_t group_size = view.int_param("group_size");
        if (bits < 1 || bits > bcq::kMaxBits)
            throw FormatError(where + ": bcq parameter 'bits' = " + std::to_string(bits) +
                              " is outside 1.." + std::to_string(bcq::kMaxBits));
        if (group_size < 8 || group_size > bcq::kMaxGroupSize || group_size % 8 != 0)
            throw FormatError(where + ": bcq parameter 'group_size' = " + std::to_string(group_size) +
                              " must be a multiple of 8 in 8.." + std::to_string(bcq::kMaxGroupSize));
        out_features = view.shape[0];
        in_features = view.shape[1];
        w_.rows = out_features;
        w_.cols = in_features;
        w_.bits = static_cast<int>(bits);
        w_.group_size = group_size;
        const int64_t tiles = w_.tiles(), q = bits;
        const Part &planes = view.part("planes", DType::U8, {tiles, w_.col_bytes(), q, bcq::kTileRows});
        const Part &exps = view.part("exponents", DType::I8, {tiles, w_.groups(), q, bcq::kTileRows});
        const Part &scales = view.part("row_scales", DType::F16, {out_features});
        w_.planes = planes.data;
        w_.exponents = reinterpret_cast<const int8_t *>(exps.data);
        stored_bytes_ = static_cast<int64_t>(planes.length + exps.length + scales.length);

        const int8_t *e = w_.exponents;
        for (int64_t i = 0; i < exps.numel(); ++i) {
            if (e[i] < bcq::kMinExponent || e[i] > bcq::kMaxExponent) {
                const int64_t r = i % bcq::kTileRows, rest = i / bcq::kTileRows;
                throw FormatError(where + ": bcq exponent " + std::to_string(e[i]) + " (row " +
                                  std::to_string((rest / q / w_.groups()) * bcq::kTileRows + r) +
                                  ", group " + std::to_string((rest / q) % w_.groups()) + ", plane " +
                                  std::to_string(rest % q) + ") is outside [" +
                                  std::to_string(bcq::kMinExponent) + ", " +
                                  std::to_string(bcq::kMaxExponent) + "]");
            }
        }
        w_.row_scales.assign(static_cast<size_t>(tiles * bcq::kTileRows), 0.0f);
        uint16_t h;
        for (int64_t n = 0; n < out_features; ++n) {
            std::memcpy(&h, scales.data + 2 * n, 2);
            const float s = half_to_float(h);
            if (!std::isfinite(s))
                throw FormatError(where + ": bcq row scale of row " + std::to_string(n) +
                                  " is not finite");
            w_.row_scales[n] = s;
        }
        mode_ = bcq::lut_mode_from_env();
    }

    void apply(const float *x, int64_t batch, float *y, ThreadPool &pool) const override {
        bcq::lut_gemm(w_, mode_, x, batch, y, pool);
    }
    void dequantize(float *out) const override {
        for (int64_t n = 0; n < out_features; ++n) bcq::dequantize_row(w_, n, out + n * in_features);
    }
    void dequantize_row(int64_t row, float *out) const override { bcq::dequantize_row(w_, row, out); }
    int64_t stored_bytes() const override { return stored_bytes_; }

private:
    bcq::BcqMatrix w_;
    bcq::LutMode mode_ = bcq::LutMode::Int8;
    int64_t stored_bytes_ = 0;
};

[[maybe_unused]] const bool registered = register_linear_kind(
    "bcq", [](const TensorView &view) -> std::unique_ptr<LinearOp> {
        return std::make_unique<BcqLinear>(view);
    });

}  // namespace

}  // namespace pumice
