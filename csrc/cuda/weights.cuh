// weights.cuh — loading a file's linear tensors onto the GPU in the tiled layout.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "model_file.h"
#include "tiled_weight.cuh"

namespace pumice {
namespace cuda {

// One repacked matrix on the device; may hold several source tensors (fused QKV, gate+up).
struct TiledWeight {
    WeightView view;
    int64_t n_tiles = 0;
    int64_t k = 0;
    DeviceBuffer codes, plane1, scale_min;
    int64_t bytes() const { return codes.size() + plane1.size() + scale_min.size(); }
};

// A tensor's place in a TiledWeight.
struct LinearSlot {
    const TiledWeight *weight = nullptr;
    int64_t tile_base = 0, tile_stride = 1, n_tiles = 0;
    int64_t n_rows = 0;  // out_features
    int64_t k = 0;       // in_features
    int perm_d = 0;      // RoPE row permutation within heads of perm_d rows
};

// A source tensor and where its row tiles go.
struct FusePart {
    const TensorEntry *entry = nullptr;
    int perm_d = 0;
    int64_t tile_base = 0, tile_stride = 1;
};

// Builds one TiledWeight from tensors of equal in_features. Tensors of kind dense or rtn that
// agree on the stored format keep it (rtn: bits and group size; dense: f16 on the device);
// otherwise — other kinds, or a mix — every part is dequantized on the host through its
// LinearOp and stored as f16, which is always correct and costs memory and speed.
// `n_tiles_total` is the number of stored row tiles. Each part's slot is returned in `slots`.
std::unique_ptr<TiledWeight> load_fused(const std::vector<FusePart> &parts, int64_t n_tiles_total,
                                        cudaStream_t stream, std::vector<LinearSlot> *slots);

// A 1-D dense tensor (norm weight, bias) as float32 on the host.
std::vector<float> dense_vector_f32(const TensorEntry &entry);

// Why a tensor is not stored natively ("" if it is): reported by the loader when verbose.
std::string native_format_note(const TensorEntry &entry);

}  // namespace cuda
}  // namespace pumice
