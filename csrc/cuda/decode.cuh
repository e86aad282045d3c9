// decode.cuh — turning a lane's stored unit into f16 tensor-core A fragments (device code).
#pragma once
#include <cuda_fp16.h>
#include <cstdint>

#include "tiled_weight.cuh"

namespace pumice {
namespace cuda {

__device__ __forceinline__ uint32_t word_of(const uint4 &q, int i) {
    return i == 0 ? q.x : i == 1 ? q.y : i == 2 ? q.z : q.w;
}
__device__ __forceinline__ __half2 u32_as_half2(uint32_t v) { return *reinterpret_cast<__half2 *>(&v); }
__device__ __forceinline__ uint32_t half2_as_u32(__half2 v) { return *reinterpret_cast<uint32_t *>(&v); }

// (v & MASK) | bias in one LOP3: with the bias in a register, the mask is the one immediate
// (with both as immediates the compiler emits two).
template <uint32_t MASK> __device__ __forceinline__ uint32_t mask_or(uint32_t v, uint32_t bias) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(v), "n"(MASK), "r"(bias));
    return d;
}

constexpr uint32_t kHalf1024x2 = 0x64006400u;  // half2(1024, 1024)

// The two codes of register r of k-tile t of a unit, at bits 0 and 16, or'ed with `bias` in the
// same instruction (kHalf1024x2 makes them half2(1024 + c_lo, 1024 + c_hi)). t and r are
// compile-time constants after unrolling, so every shift and mask is an immediate.
template <int BITS>
__device__ __forceinline__ uint32_t code_pair(const uint4 &q, const uint2 &q1, int t, int r, uint32_t bias = 0) {
    if constexpr (BITS == 2) {
        return mask_or<0x00030003u>(word_of(q, r) >> code2_bit(t), bias);
    } else if constexpr (BITS == 3) {
        const uint32_t low = (word_of(q, r) >> code2_bit(t)) & 0x00030003u;
        const uint32_t w1 = (t / 4) == 0 ? q1.x : q1.y;
        return low | (((w1 >> ((t % 4) * 4 + r)) & 0x00010001u) << 2) | bias;
    } else if constexpr (BITS == 4) {
        return mask_or<0x000F000Fu>(word_of(q, t) >> (4 * r), bias);
    } else {
        return mask_or<0x00FF00FFu>(word_of(q, 2 * t + r / 2) >> (8 * (r % 2)), bias);
    }
}

// half2(c_lo, c_hi) from codes or'ed into the exponent bias: (1024 + c) - 1024, exact.
__device__ __forceinline__ __half2 biased_to_half2(uint32_t biased) {
    return __hsub2(u32_as_half2(biased), u32_as_half2(kHalf1024x2));
}

// 2-bit codes without a shift: in the 2-bit order (tiled_weight.cuh) k-tile t's codes sit at bit
// 2j (j = t / 2) of a word's low byte of each half (after >> 8 for odd t), and half2(B_j) has
// the mantissa's bit 2j worth 1 (B_j = 1024, 256, 64, 16), so (w & (3 << 2j)) | B_j is
// half2(B_j + c) exactly: one LOP3 and the bias's subtraction per two codes.
__host__ __device__ constexpr uint32_t level_bias(int j) {
    return j == 0 ? 0x64006400u : j == 1 ? 0x5C005C00u : j == 2 ? 0x54005400u : 0x4C004C00u;
}
__device__ __forceinline__ __half2 level_codes(uint32_t w, int j) {
    uint32_t biased;
    switch (j) {  // folded after unrolling: the mask stays an immediate
        case 0: biased = mask_or<0x00030003u>(w, level_bias(0)); break;
        case 1: biased = mask_or<0x000C000Cu>(w, level_bias(1)); break;
        case 2: biased = mask_or<0x00300030u>(w, level_bias(2)); break;
        default: biased = mask_or<0x00C000C0u>(w, level_bias(3)); break;
    }
    return __hsub2(u32_as_half2(biased), u32_as_half2(level_bias(j)));
}

// The four A-fragment registers of k-tile t of a unit. sm = {half2(s,m) row L/4, row L/4+8}.
template <int BITS>
__device__ __forceinline__ void decode_ktile(const uint4 &q, const uint2 &q1, int t, uint2 sm,
                                             uint32_t a[4]) {
    if constexpr (BITS == 16) {
        a[0] = q.x; a[1] = q.y; a[2] = q.z; a[3] = q.w;
    } else {
        const __half2 sm_lo = u32_as_half2(sm.x), sm_hi = u32_as_half2(sm.y);
        const __half2 s_lo = __low2half2(sm_lo), m_lo = __high2half2(sm_lo);
        const __half2 s_hi = __low2half2(sm_hi), m_hi = __high2half2(sm_hi);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const __half2 c = BITS == 2 ? level_codes(word_of(q, r) >> (8 * (t % 2)), t / 2)
                                        : biased_to_half2(code_pair<BITS>(q, q1, t, r, kHalf1024x2));
            const __half2 w = (r % 2 == 0) ? __hfma2(c, s_lo, m_lo) : __hfma2(c, s_hi, m_hi);
            a[r] = half2_as_u32(w);
        }
    }
}

// Decodes the k-tiles of one lane's unit (codes, third plane, scale pair of its rows). A
// faster 2-bit route (codes masked into the mantissa of 1.0, one HFMA2 with (4s, m - 4s)) cost
// 10x the rounding error for 5% of GEMV time; docs/CUDA.md has the numbers.
template <int BITS> struct UnitDecoder {
    uint4 q;
    uint2 q1, sm;
    __device__ __forceinline__ UnitDecoder(const uint4 &q_, const uint2 &q1_, const uint2 &sm_)
        : q(q_), q1(q1_), sm(sm_) {}
    __device__ __forceinline__ void ktile(int t, uint32_t a[4]) const { decode_ktile<BITS>(q, q1, t, sm, a); }
};

__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Streaming 16-byte load that skips L1 (weights are read once per pass).
__device__ __forceinline__ uint4 load_stream(const uint4 *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ uint2 load_stream(const uint2 *p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// One weight, for the slow paths (embedding rows): stored row `row`, input k.
__device__ inline float weight_at(const WeightView &w, int64_t row, int64_t k) {
    const int64_t tile = row / 16;
    const int rho = static_cast<int>(row % 16);
    const int ku = unit_k(w.bits);
    const int64_t unit = k / ku;
    const int off = static_cast<int>(k % ku);
    const int q = off / (ku / 4), rest = off % (ku / 4);
    const int t = rest / 4, e = rest % 4;
    const int lane = (rho % 8) * 4 + q;
    const int r = rho / 8 + 2 * (e / 2), h = e % 2;
    const int64_t slot = (tile * w.units + unit) * 32 + lane;
    const uint4 qv = w.codes[slot];
    if (w.bits == 16) {
        const __half2 v = u32_as_half2(word_of(qv, r));
        return __half2float(h ? __high2half(v) : __low2half(v));
    }
    uint32_t pair;
    const uint2 q1 = w.bits == 3 ? w.plane1[slot] : make_uint2(0, 0);
    switch (w.bits) {
        case 2: pair = code_pair<2>(qv, q1, t, r); break;
        case 3: pair = code_pair<3>(qv, q1, t, r); break;
        case 4: pair = code_pair<4>(qv, q1, t, r); break;
        default: pair = code_pair<8>(qv, q1, t, r); break;
    }
    const float c = static_cast<float>(h ? (pair >> 16) : (pair & 0xFFFF));
    const int64_t g = k / w.group_size;
    const uint2 sm = w.scale_min[(tile * w.groups + g) * 8 + (rho % 8)];
    const __half2 p = u32_as_half2(rho < 8 ? sm.x : sm.y);
    // Same rounding as the fragment path: c * s + m in half precision.
    return __half2float(__hfma(__float2half(c), __low2half(p), __high2half(p)));
}

}  // namespace cuda
}  // namespace pumice
