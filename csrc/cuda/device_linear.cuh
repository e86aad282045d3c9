// device_linear.cuh — linear layers whose GPU form is not the tiled layout of tiled_weight.cuh
// (bcq's LUT GEMM, caldera's Hadamard + Q + L·R), and tiled ones run on their own.
//
// The decode step fuses q/k/v and gate/up into one tiled GEMV with the epilogue in registers.
// When a group holds a tensor of another GPU form, each of its tensors runs separately as a
// DeviceLinear, writing f32 outputs at their *stored* positions of the group (RowMap); then the
// group's epilogue kernel (launch_epilogue) does what the fused GEMV epilogue would have done.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "model_file.h"
#include "tiled_weight.cuh"

namespace pumice {
namespace cuda {

// Where row r (source order) of a tensor lives among its group's stored rows: RoPE permutation
// within heads of perm_d rows, then row tile l of the tensor at stored tile base + l * stride.
struct RowMap {
    int64_t tile_base = 0, tile_stride = 1;
    int perm_d = 0;
    __host__ __device__ int64_t operator()(int64_t r) const {
        const int64_t s = stored_row(r, perm_d);
        return (tile_base + (s / 16) * tile_stride) * 16 + s % 16;
    }
};

class DeviceLinear {
public:
    virtual ~DeviceLinear() = default;
    virtual int64_t out_features() const = 0;
    virtual int64_t in_features() const = 0;
    virtual int64_t bytes() const = 0;  // device memory held

    // out[col * ldo + map(r)] = (W x_col)[r] for r < out_features, col < n_cols (1..16).
    // x: [n_cols][ldx] f16, zero from in_features up to round_up(in_features, 128).
    // Runs on `stream` only: no allocation, no synchronisation (it is captured in CUDA graphs).
    virtual void apply(const __half *x, int64_t ldx, int n_cols, float *out, int64_t ldo, const RowMap &map,
                       cudaStream_t stream) const = 0;

    // The weight as f16 for the prefill GEMM: out[map(r) * ldo + k] = W[r][k] for k < in_features,
    // and 0 for in_features <= k < ldo. May use `scratch` (scratch_bytes() bytes) as workspace.
    virtual void dequantize_f16(__half *out, int64_t ldo, const RowMap &map, void *scratch,
                                cudaStream_t stream) const = 0;
    virtual size_t scratch_bytes() const { return 0; }
};

// The tensor's own GPU form, or nullptr when its kind has none (it is then stored tiled).
std::unique_ptr<DeviceLinear> make_native_device_linear(const TensorEntry &entry, cudaStream_t stream);
// Every 2-D linear tensor: its native form (which honours any RowMap), else a tiled weight (rtn
// and dense natively, other kinds dequantized on the host to f16) stored with the given RoPE row
// permutation, which its RowMaps must then use.
std::unique_ptr<DeviceLinear> make_device_linear(const TensorEntry &entry, int perm_d, cudaStream_t stream);

// Per-kind factories (each kind's file); nullptr when the tensor cannot take that form.
std::unique_ptr<DeviceLinear> make_bcq_device_linear(const TensorEntry &entry, cudaStream_t stream);
std::unique_ptr<DeviceLinear> make_caldera_device_linear(const TensorEntry &entry, cudaStream_t stream);

}  // namespace cuda
}  // namespace pumice
