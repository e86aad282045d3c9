// linear.h — the interface every weight storage kind implements on the CPU backend.
//
// A kind ("dense", "rtn", "caldera", "bcq", ...) registers a factory that builds a LinearOp
// from a TensorView. Composite kinds build their sub-operators through make_linear() on a
// prefixed view, so "BCQ as CALDERA's Q" is a parameter, not new code.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "model_file.h"
#include "threadpool.h"

namespace pumice {

class LinearOp {
public:
    virtual ~LinearOp() = default;
    int64_t out_features = 0;  // N
    int64_t in_features = 0;   // K
    // y[b*N + n] = sum_k W[n, k] * x[b*K + k] for b < batch. y is overwritten.
    virtual void apply(const float *x, int64_t batch, float *y, ThreadPool &pool) const = 0;
    // W as float32, row-major [N, K].
    virtual void dequantize(float *out) const = 0;
    // Row `row` of W as float32 (K floats): the embedding lookup of a (possibly quantized)
    // embedding table, which is also the tied output head.
    virtual void dequantize_row(int64_t row, float *out) const = 0;
    // Bytes of stored weight data this operator reads per full pass.
    virtual int64_t stored_bytes() const = 0;
};

using LinearFactory = std::function<std::unique_ptr<LinearOp>(const TensorView &)>;

// Registers a kind; called from a static initializer in the kind's own .cpp file.
bool register_linear_kind(const std::string &kind, LinearFactory factory);
// Builds the operator for a view (its kind is view.params' "kind" for sub-tensors, else the
// entry's kind). Throws UnsupportedError for an unknown kind, FormatError for bad parts.
std::unique_ptr<LinearOp> make_linear(const TensorView &view, const std::string &kind);
std::unique_ptr<LinearOp> make_linear(const TensorEntry &entry);

}  // namespace pumice
