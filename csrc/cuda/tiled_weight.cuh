// tiled_weight.cuh — the GPU layout of a linear weight, shared by the GEMV, the dequantizers
// and the repacking kernels.
//
// Weights are repacked at load time so that one 16-byte load per lane brings exactly the codes
// of that lane's tensor-core A fragments (mma.sync m16n8k16): no shuffles, no shared memory.
//
//   row tile  = 16 output rows; k-tile = 16 inputs; one k-tile of one row tile is one mma A.
//   lane L, register r (0..3), half h (0 = low, 1 = high) of a k-tile holds the weight at
//       row  = L/4 + 8*(r%2)                                       (PTX's A fragment order)
//   unit      = KU consecutive inputs of a row tile, 16 bytes per lane (512 bytes per warp).
//       The dot product does not care which input sits at which mma k position, so each lane
//       quad q = L%4 owns the KU/4 consecutive inputs [q*KU/4, (q+1)*KU/4) of the unit, and in
//       k-tile t its four entries (r/2, h) are inputs 4t + 2*(r/2) + h of that range. A lane's
//       activations for a whole unit are then one contiguous run (16-byte loads, no shuffles),
//       and lie in one quantization group (one scale load per unit).
//       bits 2  : KU = 128 (8 k-tiles). Word r holds register r of every k-tile: the code of
//                 (t, h) at bit code2_bit(t) + 16h = 2(t/2) + 8(t%2) + 16h. Read as bytes, the
//                 mask 0x03030303 << 2j over the four words is k-tiles 2j, 2j+1 of all four
//                 registers: one int8 mma A fragment (times 4^j) with no shift at all
//                 (persistent_step.cu); the f16 decoders take k-tile t's codes at bit 2(t/2)
//                 of each half, after one >> 8 per word for odd t (decode.cuh, level_codes).
//       bits 3  : as bits 2 for the low two bits of each code, plus an 8-byte plane per lane
//                 with the third bit: word j holds k-tiles 4j..4j+3, slot i = (t%4)*4 + r,
//                 bit i (low half) and 16+i (high half).
//       bits 4  : KU = 64 (4 k-tiles). Word t, low code at 4r, high at 16+4r.
//       bits 8  : KU = 32 (2 k-tiles). Word 2t + r/2, low code at 8(r%2), high at 16+8(r%2).
//       bits 16 : KU = 16 (1 k-tile).  Word r is the half2 itself (dense weights, as f16).
//   codes[tile][unit][lane] : uint4;  plane1[tile][unit][lane] : uint2 (bits 3 only)
//   scale_min[tile][group][L/4] : uint2 = {half2(s, m) of row L/4, half2(s, m) of row L/4+8}
//
// A code c becomes half(c) exactly through the exponent trick (c | 0x6400) - 1024, then
// w = c * s + m in one HFMA2, so dequantization is four instructions per two weights (shift,
// LOP3, HSUB2, HFMA2; decode.cuh).
//
// Row order: the rows of q_proj and k_proj are stored permuted within each head so that the
// two halves of a RoPE rotation pair (d, d + D/2) land in rows r and r+8 of one tile, i.e. in
// the same lane's accumulators; the QKV epilogue rotates in registers.
#pragma once
#include <cuda_fp16.h>
#include <cstdint>

namespace pumice {
namespace cuda {

__host__ __device__ constexpr int unit_k(int bits) {
    return bits == 2 || bits == 3 ? 128 : bits == 4 ? 64 : bits == 8 ? 32 : 16;
}
__host__ __device__ constexpr int unit_ktiles(int bits) { return unit_k(bits) / 16; }
// Bit of k-tile t's low code in word r of a 2-bit unit (bits 2, and the low plane of bits 3).
__host__ __device__ constexpr int code2_bit(int t) { return 2 * (t / 2) + 8 * (t % 2); }

// Where a lane's (register, half) of a k-tile sits inside the tile.
__host__ __device__ inline int frag_row(int lane, int r) { return lane / 4 + 8 * (r % 2); }
// Input (within its unit) of a lane's (k-tile, register, half).
__host__ __device__ inline int unit_offset(int bits, int lane, int t, int r, int h) {
    return (lane % 4) * (unit_k(bits) / 4) + 4 * t + 2 * (r / 2) + h;
}

// Source row of a row stored at `row` of a tensor whose rows are RoPE-permuted in heads of D
// (perm_d == 0: no permutation). Rows 0..7 of the j-th tile of a head are dims 8j..8j+7,
// rows 8..15 are dims D/2 + 8j ... .
__host__ __device__ inline int64_t source_row(int64_t row, int perm_d) {
    if (perm_d == 0) return row;
    const int64_t head = row / perm_d;
    const int rel = static_cast<int>(row % perm_d);
    const int j = rel / 16, i = rel % 16;
    const int d = i < 8 ? 8 * j + i : perm_d / 2 + 8 * j + (i - 8);
    return head * perm_d + d;
}

// Inverse of source_row: where source row `src` is stored (perm_d == 0: unchanged).
__host__ __device__ inline int64_t stored_row(int64_t src, int perm_d) {
    if (perm_d == 0) return src;
    const int64_t head = src / perm_d;
    const int d = static_cast<int>(src % perm_d), half = perm_d / 2;
    const int dd = d < half ? d : d - half;
    return head * perm_d + 16 * (dd / 8) + (d < half ? 0 : 8) + dd % 8;
}

// Everything a kernel needs to read one stored weight (plain pointers, passed by value).
struct WeightView {
    const uint4 *codes = nullptr;
    const uint2 *plane1 = nullptr;     // bits 3
    const uint2 *scale_min = nullptr;  // quantized kinds
    int bits = 16;
    int group_size = 0;
    int64_t units = 0;                 // units per row tile
    int64_t groups = 0;                // groups per row (padded)
    int64_t kp = 0;                    // padded in_features = units * unit_k(bits)
};

}  // namespace cuda
}  // namespace pumice
