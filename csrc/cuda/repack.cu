// repack.cu — load-time conversion of a file's tensor (dense or rtn, as stored) into the tiled
// GPU layout of tiled_weight.cuh. One thread builds one lane's unit of one row tile.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_common.cuh"
#include "decode.cuh"
#include "kernels.cuh"

namespace pumice {
namespace cuda {
namespace {

__device__ inline uint32_t rtn_code(const RepackSource &s, int bits, int64_t row, int64_t k) {
    if (row >= s.n || k >= s.k) return 0;
    const uint8_t *p = s.codes + row * s.code_row_bytes;
    const int64_t bit = k * bits;
    // A 3-bit code may straddle two bytes; read 16 bits (the row is padded to 32 codes).
    uint32_t v = p[bit / 8];
    if ((bit % 8) + bits > 8) v |= static_cast<uint32_t>(p[bit / 8 + 1]) << 8;
    return (v >> (bit % 8)) & ((1u << bits) - 1u);
}

__device__ inline __half dense_value(const RepackSource &s, int64_t row, int64_t k) {
    if (row >= s.n || k >= s.k) return __float2half(0.f);
    const int64_t idx = row * s.k + k;
    switch (s.dense_dtype) {
        case 0: return __float2half(static_cast<const float *>(s.weight)[idx]);
        case 2: return __float2half(__bfloat162float(static_cast<const __nv_bfloat16 *>(s.weight)[idx]));
        default: return static_cast<const __half *>(s.weight)[idx];
    }
}

template <int BITS>
__global__ void repack_codes_kernel(const RepackSource s, uint4 *codes, uint2 *plane1, const WeightView layout) {
    constexpr int KT = unit_ktiles(BITS);
    constexpr int KU = unit_k(BITS);
    const int lane = threadIdx.x % 32;
    const int64_t u = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    const int64_t ltile = blockIdx.y;
    if (u >= layout.units) return;
    const int64_t stored_tile = s.tile_base + ltile * s.tile_stride;
    uint32_t word[4] = {0, 0, 0, 0};
    uint32_t word1[2] = {0, 0};
    for (int t = 0; t < KT; ++t) {
        for (int r = 0; r < 4; ++r) {
            const int64_t lrow = ltile * 16 + frag_row(lane, r);
            const int64_t row = lrow < s.n ? source_row(lrow, s.perm_d) : lrow;
            for (int h = 0; h < 2; ++h) {
                const int64_t k = u * KU + unit_offset(BITS, lane, t, r, h);
                if constexpr (BITS == 16) {
                    const __half v = dense_value(s, row, k);
                    const uint32_t bitsv = __half_as_ushort(v);
                    word[r] |= bitsv << (16 * h);
                } else {
                    const uint32_t c = rtn_code(s, BITS, row, k);
                    if constexpr (BITS == 2 || BITS == 3) {
                        word[r] |= (c & 3u) << (code2_bit(t) + 16 * h);
                        if constexpr (BITS == 3) {
                            const int j = (t % 4) * 4 + r;
                            word1[t / 4] |= ((c >> 2) & 1u) << (j + 16 * h);
                        }
                    } else if constexpr (BITS == 4) {
                        word[t] |= c << (4 * r + 16 * h);
                    } else {
                        word[2 * t + r / 2] |= c << (8 * (r % 2) + 16 * h);
                    }
                }
            }
        }
    }
    const int64_t slot = (stored_tile * layout.units + u) * 32 + lane;
    codes[slot] = make_uint4(word[0], word[1], word[2], word[3]);
    if constexpr (BITS == 3) plane1[slot] = make_uint2(word1[0], word1[1]);
}

__global__ void repack_scales_kernel(const RepackSource s, uint2 *scale_min, const WeightView layout) {
    const int64_t ltile = blockIdx.y;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // group*8 + rho
    if (idx >= layout.groups * 8) return;
    const int64_t g = idx / 8;
    const int rho = static_cast<int>(idx % 8);
    const int64_t stored_tile = s.tile_base + ltile * s.tile_stride;
    uint32_t out[2];
    for (int h = 0; h < 2; ++h) {
        const int64_t lrow = ltile * 16 + rho + 8 * h;
        __half sc = __float2half(0.f), mn = __float2half(0.f);
        if (lrow < s.n && g < s.src_groups) {
            const int64_t row = source_row(lrow, s.perm_d);
            sc = s.scales[row * s.src_groups + g];
            mn = s.mins[row * s.src_groups + g];
        }
        out[h] = static_cast<uint32_t>(__half_as_ushort(sc)) | (static_cast<uint32_t>(__half_as_ushort(mn)) << 16);
    }
    scale_min[(stored_tile * layout.groups + g) * 8 + rho] = make_uint2(out[0], out[1]);
}

}  // namespace

void launch_repack(const RepackSource &src, uint4 *codes, uint2 *plane1, uint2 *scale_min,
                   const WeightView &layout, cudaStream_t stream) {
    const int64_t ltiles = ceil_div(src.n, 16);
    if (ltiles > 65535) throw UnsupportedError("tensor has too many rows for the CUDA backend");
    dim3 grid(static_cast<unsigned>(ceil_div(layout.units, 8)), static_cast<unsigned>(ltiles));
    switch (layout.bits) {
        case 2: repack_codes_kernel<2><<<grid, 256, 0, stream>>>(src, codes, plane1, layout); break;
        case 3: repack_codes_kernel<3><<<grid, 256, 0, stream>>>(src, codes, plane1, layout); break;
        case 4: repack_codes_kernel<4><<<grid, 256, 0, stream>>>(src, codes, plane1, layout); break;
        case 8: repack_codes_kernel<8><<<grid, 256, 0, stream>>>(src, codes, plane1, layout); break;
        case 16: repack_codes_kernel<16><<<grid, 256, 0, stream>>>(src, codes, plane1, layout); break;
        default: throw Error(PUMICE_ERR_INTERNAL, "repack: unsupported bit width");
    }
    PUMICE_CUDA_CHECK_LAUNCH("repack_codes");
    if (layout.bits != 16) {
        dim3 sgrid(static_cast<unsigned>(ceil_div(layout.groups * 8, 256)), static_cast<unsigned>(ltiles));
        repack_scales_kernel<<<sgrid, 256, 0, stream>>>(src, scale_min, layout);
        PUMICE_CUDA_CHECK_LAUNCH("repack_scales");
    }
}

}  // namespace cuda
}  // namespace pumice
