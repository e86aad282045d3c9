// kernels.cuh — launchers of the CUDA backend's kernels (host side) and their argument structs.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "tiled_weight.cuh"

namespace pumice {
namespace cuda {

// One column of a step: a token of some session at some position. The step kernels read these
// from device memory, so a captured CUDA graph serves any sessions and positions.
struct StepColumn {
    int32_t token;
    int32_t pos;
    int32_t n_ctx;
    int32_t step_start;  // the first position this step writes into the cache: rows before it are older
    __half *cache;  // the session's KV cache: [layer][k|v][kv_head][n_ctx][head_dim]
};

enum EpilogueMode : int {
    EPI_F32 = 0,     // out_f32[col][row] = v (rows un-permuted when perm_d != 0)
    EPI_F16 = 1,     // out_h[col][row] = half(v)
    EPI_ADD = 2,     // out_f32[col][row] += v          (residual stream)
    EPI_SWIGLU = 3,  // out_h[col][row] = silu(gate) * up   (tile pairs: gate, up)
    EPI_QKV = 4,     // RoPE on q and k, q -> out_h, k and v -> each column's KV cache
    EPI_F32_TILES = 5,  // out_f32[col][(out_tile_base + l * out_tile_stride) * 16 + i] = v for
                        // row i of logical tile l (a tensor run on its own inside its group)
};

// Fused RMSNorm: the producer stores half(resid * g / 16), unnormalised. The residual stream
// of large models holds "massive activations" in the thousands; times a norm weight that could
// pass half's 65504, and 1/16 (exact) moves that limit to 10^6. Values below 10^-3 become
// subnormal, harmless for the dot product unless the whole vector is that small (layer 0's
// input, the one norm that is not fused). The consumer's scale undoes the 1/16.
constexpr float kNormPrescale = 0.0625f;

struct Epilogue {
    int mode = EPI_F32;
    int64_t n_rows = 0;          // valid logical rows (SWIGLU: outputs)
    float *out_f32 = nullptr;
    __half *out_h = nullptr;
    int64_t ldo = 0;             // row stride of the output (per column)
    const float *bias = nullptr; // by logical row, or nullptr
    int perm_d = 0;              // EPI_F32: rows stored RoPE-permuted in heads of perm_d
    int64_t out_tile_base = 0, out_tile_stride = 1;  // EPI_F32_TILES
    // EPI_QKV
    int q_rows = 0, kv_rows = 0, head_dim = 0, n_kv_heads = 0, layer = 0;
    const float *inv_freq = nullptr;
    const StepColumn *cols = nullptr;

    // RMSNorm fused into its neighbours (decode step). Producer side, EPI_ADD with one tile per
    // block: besides the residual, write half(resid * norm_weight / 16) to norm_out[col][row] and the
    // block's sum of squares of its residual rows to norm_partials[col * norm_ld + block].
    const float *norm_weight = nullptr;
    __half *norm_out = nullptr;
    float *norm_partials_out = nullptr;
    // Consumer side: the input was half(resid * weight / 16); every dot product is multiplied by
    // 16 * rsqrt(sum(norm_partials[col * norm_ld + 0 .. n_norm_partials)) / norm_hidden + norm_eps).
    const float *norm_partials = nullptr;
    int n_norm_partials = 0;
    int64_t norm_ld = 0;         // row stride of the partials (both sides)
    int64_t norm_ldo = 0;        // row stride of norm_out
    int64_t norm_hidden = 0;
    float norm_eps = 0.f;
};

struct GemvCall {
    WeightView w;
    int64_t tile_base = 0, tile_stride = 1, n_tiles = 0;  // logical tile l -> stored base + l*stride
    const __half *x = nullptr;   // [batch][ldx] f16, zero beyond in_features
    int64_t ldx = 0;
    int batch = 1;               // 1..16
    int tiles_per_block = 1;     // 1, 2 (SWIGLU: 2); at 9-16 columns also 3, 4 (launch_gemv picks)
    bool early_reads = true;     // the epilogue's global reads overlap the first pass (launch_gemv)
    int warps = 0;               // warps per block; 0: 8 for one tile, else 4 (launch_gemv picks)
    Epilogue epi;
};

// y = W x for up to 16 columns with dequantization on the fly (tensor cores, fp32 accumulate).
void launch_gemv(const GemvCall &call, int num_sms, cudaStream_t stream);
// PUMICE_CUDA_EARLY_READS=0 leaves the epilogue's reads at its end (comparisons; a captured step
// keys on it).
bool early_epilogue_reads_enabled();
// PUMICE_CUDA_WIDE_TILES=0: none of the multi-tile shapes of 9-16 columns (comparisons; keyed like
// the above).
bool wide_tiles_enabled();
// PUMICE_CUDA_THREE_TILES=0: no three-tile blocks at 9-16 columns (comparisons; keyed likewise).
bool three_tiles_enabled();
// Two-tile blocks for the residual adds at 9-16 columns: 1 where the grid fills the GPU (default),
// 0 never, 2 always (PUMICE_CUDA_RESIDUAL_PAIRS=0 / =always: comparisons, tests).
int residual_pairs_mode();

// Prefill: the epilogue of GemvCall applied to a [n_cols][ld_in] f32 result of a GEMM over all
// stored tiles (logical == stored order).
void launch_epilogue(const Epilogue &epi, int64_t n_tiles, int tiles_per_block, const float *in,
                     int64_t ld_in, int n_cols, cudaStream_t stream);

// Dequantize all stored rows to f16 (prefill GEMM operand): row i of tile l goes to row
// (tile_base + l * tile_stride) * 16 + i of out, whose rows are ldo >= kp halves apart.
void launch_dequantize_f16(const WeightView &w, int64_t n_tiles, __half *out, int64_t ldo, int64_t tile_base,
                           int64_t tile_stride, cudaStream_t stream);
// Dequantize stored rows [row0, row0 + n_rows) to f32 [n_rows][k] (tests, fallbacks).
void launch_dequantize_rows_f32(const WeightView &w, int64_t row0, int64_t n_rows, int64_t k,
                                float *out, cudaStream_t stream);

// Repacking, run once at load time. Source parts are already on the device.
struct RepackSource {
    int64_t n = 0, k = 0;        // logical shape of the source tensor
    int perm_d = 0;              // RoPE row permutation (q_proj, k_proj)
    int64_t tile_base = 0, tile_stride = 1;  // where its row tiles go
    // dense: weight (dtype 0 = f32, 1 = f16, 2 = bf16); rtn: codes (u8 bit rows), scales, mins
    int dense_dtype = 1;
    const void *weight = nullptr;
    const uint8_t *codes = nullptr;
    const __half *scales = nullptr, *mins = nullptr;
    int64_t code_row_bytes = 0;  // Kp32 * bits / 8
    int64_t src_groups = 0;      // ceil(k / group_size)
};
void launch_repack(const RepackSource &src, uint4 *codes, uint2 *plane1, uint2 *scale_min,
                   const WeightView &layout, cudaStream_t stream);

// Row lookup: resid[col][0..hidden) = embedding row of cols[col].token, as f32.
void launch_embed(const WeightView &w, const StepColumn *cols, int n_cols, int64_t hidden,
                  float *resid, int64_t ld, cudaStream_t stream);
// out_h[col][k] = half(x[col][k] * rsqrt(mean(x^2) + eps) * weight[k]) for k < hidden.
void launch_rmsnorm(const float *x, int64_t ldx, const float *weight, int64_t hidden, float eps,
                    __half *out, int64_t ldo, int n_cols, cudaStream_t stream);

// Decode attention over each column's KV cache (split over the context, then combined).
struct AttentionCall {
    const __half *q = nullptr;    // [col][ldq] rotated queries
    int64_t ldq = 0;
    const StepColumn *cols = nullptr;
    int n_cols = 0, layer = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, splits = 1;
    int min_slice = 0;            // positions per split at least (launch_attention_decode sets it)
    float *partial_o = nullptr;   // [col][head][splits][head_dim]
    float2 *partial_ml = nullptr; // [col][head][splits] (running max in log2 units, sum)
    __half *out = nullptr;        // [col][ldo]
    int64_t ldo = 0;
    int *counters = nullptr;      // [16][n_kv_heads], zero between launches
};
void launch_attention_decode(const AttentionCall &call, cudaStream_t stream);
// Positions per attention split at least: 128 (two sub-chunks), or PUMICE_CUDA_ATTENTION_MIN_SLICE
// (comparisons; a captured step keys on it).
int attention_min_slice();

// Prefill softmax: scores [head][n][ld] (already scaled) -> probabilities (f16), causal: row i
// sees keys 0..n_past+i.
void launch_causal_softmax(const float *scores, __half *probs, int n_heads, int n, int64_t ld,
                           int n_keys, int n_past, cudaStream_t stream);

}  // namespace cuda
}  // namespace pumice
