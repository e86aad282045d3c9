// cpu_gemm.h — the shared batched (prefill / decode_batch) matrix product of the CPU kinds.
//
// Every storage kind can present its weight matrix as float32 row segments ("dequantize rows
// k0..k1 of row n into a scratch buffer", or point straight at stored f32 data). gemm_rows()
// does the blocking around that: each thread takes a range of output rows, walks K in chunks
// so that the activations of all tokens for one chunk stay in L2, loads a tile of a few rows
// (dequantizing it once) and reuses it for every token of the batch with a register-tiled
// micro-kernel. Kinds that store their rows in a permuted k-order may use it as long as they
// permute x the same way (a dot product does not depend on the order of its terms).
#pragma once
#include <cstdint>

#include "threadpool.h"

namespace pumice {

// Returns floats [k0, k1) of weight row `row`: either a pointer into stored f32 data or
// `scratch` (k1 - k0 floats) after writing them there. k0 is a multiple of kGemmKChunk.
using GemmRowLoader = const float *(*)(const void *ctx, int64_t row, int64_t k0, int64_t k1,
                                       float *scratch);

// Size of the K chunks handed to the row loader (a multiple of 32, so quantized kinds can
// dequantize whole 32-code blocks).
constexpr int64_t kGemmKChunk = 512;

// y[b*N + n] = sum_{k<K} W[n, k] * x[b*ldx + k] for b < batch, n < N. y is overwritten.
void gemm_rows(const void *ctx, GemmRowLoader load, int64_t N, int64_t K, const float *x,
               int64_t ldx, int64_t batch, float *y, ThreadPool &pool);

// Rows per parallel_for grain so that one chunk of work is large enough to amortise dispatch.
int64_t rows_grain(int64_t K, int64_t multiple);

}  // namespace pumice
