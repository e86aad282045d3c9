// kind_rtn.h — the `rtn` storage kind (docs/FORMAT.md §3.1): per-group asymmetric
// round-to-nearest codes of 2, 3, 4 or 8 bits, dequantized on the fly.
//
// Exported so that composite kinds can reuse it; the usual way is still
// make_linear(prefixed_view, "rtn"), which lands here.
//
// Kernel order. Inside every block of 32 codes the AVX2 unpacker produces the codes in a fixed
// permuted order (whatever is cheapest for that bit width: a broadcast, one variable shift and a
// mask). Rather than undo it, the kernels permute the activations once per call into the same
// order (rtn_block_order()); dequantize()/dequantize_row() return the natural order.
#pragma once
#include <cstdint>
#include <vector>

#include "linear.h"

namespace pumice {

// Which activations the batch-1 GEMV multiplies the codes with.
enum class RtnActivations {
    F32,   // exact: codes → float, f32 FMA (error: f32 accumulation only)
    INT8,  // x quantized per 32-block to int8 (absmax / 127), integer dot products
};

// For lane L of an unpacked 32-code block, the index (0..31) of that code within the block.
const uint8_t *rtn_block_order(int bits);

// Batches up to this size run the batch-1 kernel once per token; larger ones the tiled GEMM.
int64_t rtn_per_token_batch_limit(int bits, RtnActivations mode);

class RtnLinear final : public LinearOp {
public:
    // Validates params (bits, group_size) and parts (codes u8 [N, Kp*b/8], scales/mins f16
    // [N, G]); throws FormatError naming the tensor.
    explicit RtnLinear(const TensorView &view);

    void apply(const float *x, int64_t batch, float *y, ThreadPool &pool) const override;
    void dequantize(float *out) const override;
    void dequantize_row(int64_t row, float *out) const override;
    int64_t stored_bytes() const override;

    // Batch-1 product with an explicit activation mode (apply() uses activations()).
    void gemv(const float *x, float *y, ThreadPool &pool, RtnActivations mode) const;
    // Batch > 1: dequantized row tiles shared by all tokens (exact f32 accumulation).
    void gemm(const float *x, int64_t batch, float *y, ThreadPool &pool) const;
    RtnActivations activations() const { return activations_; }

    int bits() const { return bits_; }
    int64_t group_size() const { return group_size_; }

private:
    // Codes of one 32-block of `row` → 32 floats W in kernel order.
    void dequantize_blocks(int64_t row, int64_t block_begin, int64_t block_end, float *out) const;
    static const float *load_rows(const void *ctx, int64_t row, int64_t k0, int64_t k1,
                                  float *scratch);

    int bits_ = 4;
    int64_t group_size_ = 32;
    int64_t n_groups_ = 0;     // G
    int64_t padded_k_ = 0;     // Kp
    int64_t row_bytes_ = 0;    // Kp * bits / 8
    const uint8_t *codes_ = nullptr;
    const uint16_t *scales_ = nullptr;  // f16 [N, G]
    const uint16_t *mins_ = nullptr;    // f16 [N, G]
    RtnActivations activations_ = RtnActivations::INT8;
};

}  // namespace pumice
