// kind_caldera.cpp — the `caldera` (W = T_outᵀ (Q + L R) T_in) and `lplr` (W = T_outᵀ L R T_in)
// storage kinds (docs/FORMAT.md).
//
// Q, L and R are sub-operators of any registered kind, built with make_linear() on views with
// the part prefixes "q.", "l.", "r." (their params objects name their kind), so BCQ or RTN as
// the backbone is configuration. The Hadamard transforms are fused into the product:
//
//     x' = T_in x                 (once per token; Q and R both read x')
//     z  = Q x' + L (R x')        (the sub-operators' own multi-threaded kernels)
//     y  = T_outᵀ z               (once per token)
//
// so the weights are never rotated back; the transforms cost O(n log n + n·m) per token.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "errors.h"
#include "hadamard_cpu.h"
#include "linear.h"

namespace pumice {

namespace {

class CalderaLinear final : public LinearOp {
public:
    CalderaLinear(const TensorView &view, bool with_q) {
        const std::string &kind = with_q ? std::string("caldera") : std::string("lplr");
        out_features = view.shape[0];
        in_features = view.shape[1];
        const int64_t N = out_features, K = in_features;
        if (!view.params || !view.params->is_object())
            throw FormatError("tensor '" + view.name() + "': " + kind + " params must be an object");
        rank_ = view.int_param("rank");
        if (rank_ < (with_q ? 0 : 1) || rank_ > std::min(N, K))
            throw FormatError("tensor '" + view.name() + "': " + kind + " rank " +
                              std::to_string(rank_) + " is outside [" + (with_q ? "0" : "1") +
                              ", min(out, in) = " + std::to_string(std::min(N, K)) + "]");
        const Json *transform = view.params->find("transform");
        if (!transform || !transform->is_string())
            throw FormatError("tensor '" + view.name() + "': " + kind +
                              " needs a string parameter 'transform'");
        if (transform->as_string() == "hadamard") {
            hadamard_ = true;
        } else if (transform->as_string() != "none") {
            throw FormatError("tensor '" + view.name() + "': unknown transform '" +
                              transform->as_string() + "' (expected 'hadamard' or 'none')");
        }
        if (with_q) q_ = sub(view, "q", {N, K});
        if (rank_ > 0) {
            l_ = sub(view, "l", {N, rank_});
            r_ = sub(view, "r", {rank_, K});
        }
        if (hadamard_) {
            const Part &in = view.part("hadamard.in_signs", DType::U8, {(K + 7) / 8});
            const Part &out = view.part("hadamard.out_signs", DType::U8, {(N + 7) / 8});
            t_in_ = HadamardTransform(K, in.data);
            t_out_ = HadamardTransform(N, out.data);
        }
    }

    void apply(const float *x, int64_t batch, float *y, ThreadPool &pool) const override {
        const int64_t N = out_features, K = in_features;
        const float *xr = x;
        std::vector<float> rotated;
        if (hadamard_) {
            rotated.assign(x, x + batch * K);
            transform_rows(rotated.data(), batch, K, t_in_, false, pool);
            xr = rotated.data();
        }
        if (q_) {
            q_->apply(xr, batch, y, pool);
        } else {
            std::fill(y, y + batch * N, 0.0f);
        }
        if (rank_ > 0) {
            std::vector<float> t(size_t(batch * rank_)), lt(size_t(batch * N));
            r_->apply(xr, batch, t.data(), pool);
            l_->apply(t.data(), batch, lt.data(), pool);
            for (int64_t i = 0; i < batch * N; ++i) y[i] += lt[size_t(i)];
        }
        if (hadamard_) transform_rows(y, batch, N, t_out_, true, pool);
    }

    void dequantize(float *out) const override {
        const int64_t N = out_features, K = in_features;
        if (q_) {
            q_->dequantize(out);
        } else {
            std::fill(out, out + N * K, 0.0f);
        }
        if (rank_ > 0) {
            std::vector<float> l(size_t(N * rank_)), r(size_t(rank_ * K));
            l_->dequantize(l.data());
            r_->dequantize(r.data());
            for (int64_t n = 0; n < N; ++n) {
                float *row = out + n * K;
                for (int64_t j = 0; j < rank_; ++j) {
                    const float a = l[size_t(n * rank_ + j)];
                    const float *rr = r.data() + j * K;
                    for (int64_t k = 0; k < K; ++k) row[k] += a * rr[k];
                }
            }
        }
        if (!hadamard_) return;
        // Ŵ = T_outᵀ M T_in: each row m ↦ T_inᵀ m (that is M T_in), then each column ↦ T_outᵀ c.
        std::vector<float> scratch(static_cast<size_t>(std::max(N, K)));
        for (int64_t n = 0; n < N; ++n) t_in_.inverse(out + n * K, scratch.data());
        std::vector<float> column(static_cast<size_t>(N));
        for (int64_t k = 0; k < K; ++k) {
            for (int64_t n = 0; n < N; ++n) column[size_t(n)] = out[n * K + k];
            t_out_.inverse(column.data(), scratch.data());
            for (int64_t n = 0; n < N; ++n) out[n * K + k] = column[size_t(n)];
        }
    }

    // Rows of a rotated matrix are not stored: reconstruct the whole matrix (only embeddings
    // need rows, and they are not stored as caldera by our converter).
    void dequantize_row(int64_t row, float *out) const override {
        std::vector<float> all(size_t(out_features * in_features));
        dequantize(all.data());
        std::memcpy(out, all.data() + row * in_features, sizeof(float) * size_t(in_features));
    }

    int64_t stored_bytes() const override {
        int64_t total = 0;
        if (q_) total += q_->stored_bytes();
        if (l_) total += l_->stored_bytes() + r_->stored_bytes();
        if (hadamard_) total += (in_features + 7) / 8 + (out_features + 7) / 8;
        return total;
    }

private:
    static std::unique_ptr<LinearOp> sub(const TensorView &view, const std::string &key,
                                         std::vector<int64_t> shape) {
        const Json *params = view.params->find(key);
        if (!params || !params->is_object())
            throw FormatError("tensor '" + view.name() + "': parameter '" + view.prefix + key +
                              "' must be an object");
        const Json *kind = params->find("kind");
        if (!kind || !kind->is_string())
            throw FormatError("tensor '" + view.name() + "': parameter '" + view.prefix + key +
                              "' needs a string 'kind'");
        if (kind->as_string() == "caldera" || kind->as_string() == "lplr")
            throw FormatError("tensor '" + view.name() + "': sub-tensor '" + key +
                              "' cannot itself be " + kind->as_string());
        TensorView sub_view{view.entry, view.prefix + key + ".", params, std::move(shape)};
        return make_linear(sub_view, kind->as_string());
    }

    static void transform_rows(float *rows, int64_t batch, int64_t n, const HadamardTransform &t,
                               bool inverse, ThreadPool &pool) {
        auto run = [&](int64_t b0, int64_t b1) {
            std::vector<float> scratch(static_cast<size_t>(n));
            for (int64_t b = b0; b < b1; ++b) {
                if (inverse)
                    t.inverse(rows + b * n, scratch.data());
                else
                    t.forward(rows + b * n, scratch.data());
            }
        };
        if (batch == 1)
            run(0, 1);
        else
            pool.parallel_for(batch, 1, run);
    }

    int64_t rank_ = 0;
    bool hadamard_ = false;
    std::unique_ptr<LinearOp> q_, l_, r_;
    HadamardTransform t_in_, t_out_;
};

const bool registered_caldera = register_linear_kind(
    "caldera", [](const TensorView &view) -> std::unique_ptr<LinearOp> {
        return std::make_unique<CalderaLinear>(view, true);
    });
const bool registered_lplr = register_linear_kind(
    "lplr", [](const TensorView &view) -> std::unique_ptr<LinearOp> {
        return std::make_unique<CalderaLinear>(view, false);
    });

}  // namespace

}  // namespace pumice
