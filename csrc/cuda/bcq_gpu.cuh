// bcq_gpu.cuh — the GPU layout of `bcq` tensors (docs/BCQ.md "CUDA") and its index arithmetic,
// shared by the LUT GEMM kernels and the host repack. tests/test_cuda_bcq_layout.py mirrors it
// in numpy and checks it against the file's reconstruction.
//
//   tile    = 16 output rows (the row tiles of RowMap); unit = 128 inputs.
//   planes  : uint4 [tiles][units][q][16]: the 128 sign bits of one (row, plane, unit), input
//             128u + 32m + b at bit b of word m (little-endian words; this is the file's bytes
//             16u .. 16u+15 of that row and plane, in order). Padding rows/inputs are 0.
//   exps    : int8 [tiles][units][q][16][spu]: the exponent of each segment of `seg` inputs
//             (seg = gcd(g, 128), spu = 128 / seg), i.e. the file's group exponent repeated
//             over the segments of its group. A segment never straddles a group.
//   scales  : f32 [tiles * 16]: the row scales, 0 on padding rows.
#pragma once
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "device_linear.cuh"

namespace pumice {
namespace cuda {
namespace bcq_gpu {

constexpr int kTileRows = 16;    // rows per tile
constexpr int kUnit = 128;       // inputs per unit (one 16-byte load per row and plane)
constexpr int kUnitBytes = 16;
constexpr int kFileTileRows = 32;  // the file's row tiles (docs/FORMAT.md `bcq`)

struct Layout {
    int64_t n = 0, k = 0;      // logical shape
    int q = 0;                 // planes
    int64_t g = 0;             // group size of the file
    int64_t tiles = 0;         // ceil(n / 16)
    int64_t units = 0;         // ceil(k / 128)
    int seg = 0;               // inputs per exponent segment = gcd(g, 128)
    int spu = 0;               // segments per unit = 128 / seg

    // Index of the uint4 holding (tile, unit, plane, row); also the index of its first
    // exponent byte divided by spu.
    __host__ __device__ int64_t word(int64_t tile, int64_t unit, int plane, int row) const {
        return ((tile * units + unit) * q + plane) * kTileRows + row;
    }
    int64_t plane_words() const { return tiles * units * q * kTileRows; }
    int64_t exp_bytes() const { return plane_words() * spu; }
};

inline Layout make_layout(int64_t n, int64_t k, int q, int64_t g) {
    Layout l;
    l.n = n;
    l.k = k;
    l.q = q;
    l.g = g;
    l.tiles = (n + kTileRows - 1) / kTileRows;
    l.units = (k + kUnit - 1) / kUnit;
    l.seg = static_cast<int>(std::gcd<int64_t>(g, kUnit));
    l.spu = kUnit / l.seg;
    return l;
}

// The file's parts (already validated: shapes as docs/FORMAT.md, exponents in range) into the
// GPU layout. planes_file: u8 [T32][KB][q][32]; exps_file: i8 [T32][G][q][32]; scales: f32 [n].
inline void repack_host(const Layout &l, const uint8_t *planes_file, const int8_t *exps_file,
                        const float *scales, std::vector<uint8_t> *planes, std::vector<int8_t> *exps,
                        std::vector<float> *row_scales) {
    const int64_t kb = (l.k + 7) / 8, groups = (l.k + l.g - 1) / l.g;
    planes->assign(static_cast<size_t>(l.plane_words() * kUnitBytes), 0);
    exps->assign(static_cast<size_t>(l.exp_bytes()), 0);
    row_scales->assign(static_cast<size_t>(l.tiles * kTileRows), 0.0f);
    for (int64_t row = 0; row < l.n; ++row) {
        const int64_t t = row / kTileRows, r = row % kTileRows;
        const int64_t ft = row / kFileTileRows, fr = row % kFileTileRows;
        (*row_scales)[static_cast<size_t>(row)] = scales[row];
        for (int64_t u = 0; u < l.units; ++u) {
            for (int p = 0; p < l.q; ++p) {
                const int64_t w = l.word(t, u, p, static_cast<int>(r));
                uint8_t *dst = planes->data() + w * kUnitBytes;
                for (int b = 0; b < kUnitBytes; ++b) {
                    const int64_t j = u * kUnitBytes + b;  // the file's byte of 8 inputs
                    if (j < kb) dst[b] = planes_file[((ft * kb + j) * l.q + p) * kFileTileRows + fr];
                }
                int8_t *edst = exps->data() + w * l.spu;
                for (int s = 0; s < l.spu; ++s) {
                    const int64_t k0 = u * kUnit + static_cast<int64_t>(s) * l.seg;
                    if (k0 < l.k) {
                        const int64_t grp = k0 / l.g;  // < groups since k0 < k
                        edst[s] = exps_file[((ft * groups + grp) * l.q + p) * kFileTileRows + fr];
                    }
                }
            }
        }
    }
}

// A bcq (sub-)tensor's GPU form: validates the view exactly as the CPU kind does (FormatError
// with the same messages), then repacks. Composite kinds (caldera's Q) may call this.
std::unique_ptr<DeviceLinear> make_bcq_device_linear_view(const TensorView &view, cudaStream_t stream);

}  // namespace bcq_gpu
}  // namespace cuda
}  // namespace pumice
