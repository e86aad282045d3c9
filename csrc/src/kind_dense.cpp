// kind_dense.cpp — the `dense` storage kind (docs/FORMAT.md §3.1) as a LinearOp: an f32, f16
// or bf16 matrix used in place from the mapping.
//
// Batch 1 is a GEMV that converts and multiplies in registers (memory bound: it streams the
// weights once). Larger batches go through gemm_rows(), which converts a tile of rows to f32
// once and reuses it for every token.
#include <algorithm>
#include <cstring>

#include "cpu_gemm.h"
#include "cpu_simd.h"
#include "errors.h"
#include "linear.h"

namespace pumice {

namespace {

enum class DenseType { F32, F16, BF16 };

inline float load1(DenseType t, const uint8_t *row, int64_t k) {
    switch (t) {
        case DenseType::F32: {
            float f;
            std::memcpy(&f, row + 4 * k, 4);
            return f;
        }
        case DenseType::F16: return simd::f16_to_f32(simd::load_u16(row + 2 * k));
        default: return simd::bf16_to_f32(simd::load_u16(row + 2 * k));
    }
}

#if PUMICE_HAVE_AVX2
template <DenseType T>
inline __m256 load8(const uint8_t *row, int64_t k) {
    if constexpr (T == DenseType::F32)
        return _mm256_loadu_ps(reinterpret_cast<const float *>(row) + k);
    else if constexpr (T == DenseType::F16)
        return simd::load8_f16(reinterpret_cast<const uint16_t *>(row) + k);
    else
        return simd::load8_bf16(reinterpret_cast<const uint16_t *>(row) + k);
}
#endif

// y[n] = W[n, :] · x for n in [n0, n1); four rows at a time share each load of x.
template <DenseType T>
void gemv_rows(const uint8_t *w, int64_t row_bytes, int64_t K, const float *x, float *y,
               int64_t n0, int64_t n1) {
    int64_t n = n0;
#if PUMICE_HAVE_AVX2
    for (; n + 4 <= n1; n += 4) {
        const uint8_t *r0 = w + n * row_bytes, *r1 = r0 + row_bytes, *r2 = r1 + row_bytes,
                      *r3 = r2 + row_bytes;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            const __m256 xv = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(load8<T>(r0, k), xv, a0);
            a1 = _mm256_fmadd_ps(load8<T>(r1, k), xv, a1);
            a2 = _mm256_fmadd_ps(load8<T>(r2, k), xv, a2);
            a3 = _mm256_fmadd_ps(load8<T>(r3, k), xv, a3);
        }
        float s0 = simd::hsum(a0), s1 = simd::hsum(a1), s2 = simd::hsum(a2), s3 = simd::hsum(a3);
        for (; k < K; ++k) {
            s0 += load1(T, r0, k) * x[k];
            s1 += load1(T, r1, k) * x[k];
            s2 += load1(T, r2, k) * x[k];
            s3 += load1(T, r3, k) * x[k];
        }
        y[n] = s0;
        y[n + 1] = s1;
        y[n + 2] = s2;
        y[n + 3] = s3;
    }
#endif
    for (; n < n1; ++n) {
        const uint8_t *r = w + n * row_bytes;
        int64_t k = 0;
        float s = 0.0f;
#if PUMICE_HAVE_AVX2
        __m256 a = _mm256_setzero_ps();
        for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(load8<T>(r, k), _mm256_loadu_ps(x + k), a);
        s = simd::hsum(a);
#endif
        for (; k < K; ++k) s += load1(T, r, k) * x[k];
        y[n] = s;
    }
}

class DenseLinear final : public LinearOp {
public:
    DenseLinear(const TensorView &view) {
        out_features = view.shape[0];
        in_features = view.shape[1];
        const std::vector<int64_t> shape{out_features, in_features};
        const std::string part_name = "weight";
        // The dtype is whichever of the three the file holds; part() then checks the shape
        // (and reports a missing part).
        DType dtype = DType::F32;
        if (view.has_part(part_name)) {
            dtype = view.entry->parts.at(view.prefix + part_name).dtype;
            if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
                throw FormatError("tensor '" + view.name() + "': dense part '" + view.prefix +
                                  "weight' must be f32, f16 or bf16, not " + dtype_name(dtype));
        }
        const Part &part = view.part(part_name, dtype, shape);  // throws if missing / bad shape
        data_ = part.data;
        type_ = dtype == DType::F32 ? DenseType::F32
                : dtype == DType::F16 ? DenseType::F16
                                      : DenseType::BF16;
        row_bytes_ = in_features * int64_t(dtype_size(dtype));
    }

    void apply(const float *x, int64_t batch, float *y, ThreadPool &pool) const override {
        const int64_t N = out_features, K = in_features;
        if (batch == 1) {
            pool.parallel_for(N, rows_grain(K, 4), [&](int64_t n0, int64_t n1) {
                switch (type_) {
                    case DenseType::F32: gemv_rows<DenseType::F32>(data_, row_bytes_, K, x, y, n0, n1); break;
                    case DenseType::F16: gemv_rows<DenseType::F16>(data_, row_bytes_, K, x, y, n0, n1); break;
                    case DenseType::BF16: gemv_rows<DenseType::BF16>(data_, row_bytes_, K, x, y, n0, n1); break;
                }
            });
            return;
        }
        gemm_rows(this, &DenseLinear::load_rows, N, K, x, K, batch, y, pool);
    }

    void dequantize(float *out) const override {
        for (int64_t n = 0; n < out_features; ++n) dequantize_row(n, out + n * in_features);
    }

    void dequantize_row(int64_t row, float *out) const override {
        convert(data_ + row * row_bytes_, 0, in_features, out);
    }

    int64_t stored_bytes() const override { return out_features * row_bytes_; }

private:
    void convert(const uint8_t *row, int64_t k0, int64_t k1, float *out) const {
        switch (type_) {
            case DenseType::F32:
                std::memcpy(out, row + 4 * k0, size_t(k1 - k0) * 4);
                break;
            case DenseType::F16:
                simd::f16_to_f32_row(reinterpret_cast<const uint16_t *>(row) + k0, out, k1 - k0);
                break;
            case DenseType::BF16:
                simd::bf16_to_f32_row(reinterpret_cast<const uint16_t *>(row) + k0, out, k1 - k0);
                break;
        }
    }

    static const float *load_rows(const void *ctx, int64_t row, int64_t k0, int64_t k1,
                                  float *scratch) {
        const auto *self = static_cast<const DenseLinear *>(ctx);
        const uint8_t *r = self->data_ + row * self->row_bytes_;
        // f32 rows are used in place when suitably aligned for plain float loads.
        if (self->type_ == DenseType::F32 && reinterpret_cast<uintptr_t>(r) % alignof(float) == 0)
            return reinterpret_cast<const float *>(r) + k0;
        self->convert(r, k0, k1, scratch);
        return scratch;
    }

    const uint8_t *data_ = nullptr;
    DenseType type_ = DenseType::F32;
    int64_t row_bytes_ = 0;
};

const bool registered = register_linear_kind(
    "dense", [](const TensorView &view) -> std::unique_ptr<LinearOp> {
        return std::make_unique<DenseLinear>(view);
    });

}  // namespace

}  // namespace pumice
