// gemv_decode_cost.cu — what the 2-bit decode costs the batch-1 GEMV, measured in isolation.
//
// Same shape of work as csrc/cuda/gemv.cu (one block of 8 warps per 16-row tile, 512-byte units
// of 16 rows x 128 inputs, four units in flight per warp, partial sums meeting in shared memory),
// on random codes, with two ways of turning codes into tensor-core work:
//   f16   today's route, the runtime's own decoder (csrc/cuda/decode.cuh): per two weights a
//         shift, a LOP3 (mask | 1024 bias), HSUB2 and HFMA2, then mma.m16n8k16 (f16 activations);
//   int8  codes as bytes ((w >> 2i) & 0x03030303: 4 weights per shift + mask) into
//         mma.m16n8k32.s8 with int8 activations, the group scale applied to each group's int32
//         sum afterwards (the layout where an mma's inputs share one group, docs/CUDA.md "Next").
// Each runs with four and with eight units in flight per warp, and both run once more fed by a
// bulk-copy ring in shared memory (gemv_ring). It prints the time per matrix and its read rate;
// the results feed docs/CUDA.md ("Next").
// Build and run on the GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/gemv_decode_cost.cu -o /tmp/decode_cost && /tmp/decode_cost
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "../csrc/cuda/decode.cuh"
#include "cuda_bench_util.cuh"

constexpr int kWarps = 8;

using pumice::cuda::word_of;

// Unit u of this block's tile: the lane's 16 bytes of codes, and where its scale pairs start
// (two groups of 64 inputs per unit, 8 row pairs each).
__device__ __forceinline__ uint4 unit_codes(const uint4 *codes, int units, int u, int lane) {
    return pumice::cuda::load_stream(codes + (static_cast<size_t>(blockIdx.x) * units + u) * 32 + lane);
}
__device__ __forceinline__ const uint2 *unit_scales(const uint2 *scales, int units, int u, int lane) {
    return scales + (static_cast<size_t>(blockIdx.x) * units + u) * 16 + lane / 4;
}

// Reduces the warps' accumulators of one tile (rows 0..15 of column 0) and writes them.
__device__ void finish_tile(float (*red)[16], const float c[4], float *out) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane % 4 == 0) {
        red[warp][lane / 4] = c[0];
        red[warp][lane / 4 + 8] = c[2];
    }
    __syncthreads();
    if (threadIdx.x < 16) {
        float s = 0.f;
        for (int w = 0; w < kWarps; ++w) s += red[w][threadIdx.x];
        out[blockIdx.x * 16 + threadIdx.x] = s;
    }
}

template <int kUnitsInFlight>
__global__ void __launch_bounds__(kWarps * 32) gemv_f16(const uint4 *codes, const uint2 *scales, const __half *x,
                                                         float *out, int units) {
    __shared__ float red[kWarps][16];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float acc[2][4] = {};
    const __half *xl = x + (lane % 4) * 32;
    for (int u0 = warp; u0 < units; u0 += kUnitsInFlight * kWarps) {
        uint4 q[kUnitsInFlight];
        uint2 sm[kUnitsInFlight];
        uint2 xs[kUnitsInFlight][8];
#pragma unroll
        for (int j = 0; j < kUnitsInFlight; ++j) {
            const int u = u0 + j * kWarps;
            if (u >= units) break;
            q[j] = unit_codes(codes, units, u, lane);
            // The lane's 32 inputs lie in one group of 64: quads 0-1 the first, 2-3 the second.
            sm[j] = unit_scales(scales, units, u, lane)[(lane % 4) / 2 * 8];
#pragma unroll
            for (int i2 = 0; i2 < 4; ++i2) {
                const uint4 v = lane < 4 ? *reinterpret_cast<const uint4 *>(xl + u * 128 + 8 * i2) : make_uint4(0, 0, 0, 0);
                xs[j][2 * i2] = make_uint2(v.x, v.y);
                xs[j][2 * i2 + 1] = make_uint2(v.z, v.w);
            }
        }
#pragma unroll
        for (int j = 0; j < kUnitsInFlight; ++j) {
            if (u0 + j * kWarps >= units) break;
            f16_unit_mma(q[j], sm[j], xs[j], acc);
        }
    }
    float c[4];
    for (int e = 0; e < 4; ++e) c[e] = acc[0][e] + acc[1][e];
    finish_tile(red, c, out);
}

// int8: word j of a lane's unit feeds one m16n8k32 mma (16 codes: 4 registers of 4 bytes); the
// two words of a 64-input group are summed in int32, then scaled once.
template <int kUnitsInFlight>
__global__ void __launch_bounds__(kWarps * 32) gemv_int8(const uint4 *codes, const uint2 *scales, const int8_t *xq,
                                                          const float *xscale, float *out, int units) {
    __shared__ float red[kWarps][16];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float acc[4] = {};
    const int8_t *xl = xq + (lane % 4) * 32;
    for (int u0 = warp; u0 < units; u0 += kUnitsInFlight * kWarps) {
        uint4 q[kUnitsInFlight];
        uint2 sm[kUnitsInFlight][2];
        uint4 xs[kUnitsInFlight][2];
        float xsc[kUnitsInFlight];
#pragma unroll
        for (int j = 0; j < kUnitsInFlight; ++j) {
            const int u = u0 + j * kWarps;
            if (u >= units) break;
            q[j] = unit_codes(codes, units, u, lane);
            // Every mma's inputs lie in one group: the lane needs both groups' scales.
            sm[j][0] = unit_scales(scales, units, u, lane)[0];
            sm[j][1] = unit_scales(scales, units, u, lane)[8];
            xs[j][0] = lane < 4 ? *reinterpret_cast<const uint4 *>(xl + u * 128) : make_uint4(0, 0, 0, 0);
            xs[j][1] = lane < 4 ? *reinterpret_cast<const uint4 *>(xl + u * 128 + 16) : make_uint4(0, 0, 0, 0);
            xsc[j] = xscale[u];
        }
#pragma unroll
        for (int j = 0; j < kUnitsInFlight; ++j) {
            if (u0 + j * kWarps >= units) break;
#pragma unroll
            for (int g = 0; g < 2; ++g) {  // two groups of 64 inputs per unit
                int ci[4] = {0, 0, 0, 0};
#pragma unroll
                for (int wj = 2 * g; wj < 2 * g + 2; ++wj) {
                    const uint32_t w = word_of(q[j], wj);
                    const uint32_t a0 = w & 0x03030303u, a1 = (w >> 2) & 0x03030303u;
                    const uint32_t a2 = (w >> 4) & 0x03030303u, a3 = (w >> 6) & 0x03030303u;
                    const uint32_t b0 = word_of(xs[j][wj / 2], (wj % 2) * 2), b1 = word_of(xs[j][wj / 2], (wj % 2) * 2 + 1);
                    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                                 : "+r"(ci[0]), "+r"(ci[1]), "+r"(ci[2]), "+r"(ci[3])
                                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
                }
                const float s_lo = __low2float(*reinterpret_cast<const __half2 *>(&sm[j][g].x)) * xsc[j];
                const float s_hi = __low2float(*reinterpret_cast<const __half2 *>(&sm[j][g].y)) * xsc[j];
                acc[0] += s_lo * static_cast<float>(ci[0]);
                acc[1] += s_lo * static_cast<float>(ci[1]);
                acc[2] += s_hi * static_cast<float>(ci[2]);
                acc[3] += s_hi * static_cast<float>(ci[3]);
            }
        }
    }
    finish_tile(red, acc, out);
}

// int8 decode fed by a bulk-copy ring: a producer warp copies chunks of 8 units (codes and scales
// of one tile, contiguous) into S shared-memory stages with cp.async.bulk; each of 8 consumer
// warps decodes one unit per chunk. Blocks walk tiles b, b + G, ...; the activation (int8) sits
// in shared memory. Bytes in flight per SM no longer cost registers.
// INT8 false: the same ring feeding today's f16 decode (exact; activations f16 in shared memory).
template <int S, bool INT8>
__global__ void __launch_bounds__(9 * 32) gemv_ring(const uint4 *codes, const uint2 *scales, const int8_t *xq,
                                                  const __half *xh, const float *xscale, float *out, int units,
                                                  int tiles) {
    constexpr int CH = 8, kCodeBytes = CH * 512, kScaleBytes = CH * 128;
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char *ring = smem;                                   // S x (codes, scales)
    int8_t *xs = reinterpret_cast<int8_t *>(smem + S * (kCodeBytes + kScaleBytes));
    __half *xsh = reinterpret_cast<__half *>(xs);  // INT8 false
    float *xsc = reinterpret_cast<float *>(xs + units * 128 * (INT8 ? 1 : 2));
    __shared__ __align__(8) uint64_t full[S], empty[S];
    __shared__ float red[2][kWarps][16];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int chunks = (units + CH - 1) / CH;
    const int my_tiles = tiles > static_cast<int>(blockIdx.x) ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    if (threadIdx.x == 0) {
        for (int i = 0; i < S; ++i) {
            asm volatile("mbarrier.init.shared.b64 [%0], 1;\n" ::"r"(smem_addr(&full[i])));
            asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(smem_addr(&empty[i])), "r"(kWarps));
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n");
    }
    for (int i = threadIdx.x; i < units * 8 * (INT8 ? 1 : 2); i += blockDim.x)
        reinterpret_cast<uint4 *>(xs)[i] = INT8 ? reinterpret_cast<const uint4 *>(xq)[i] : reinterpret_cast<const uint4 *>(xh)[i];
    for (int i = threadIdx.x; i < units; i += blockDim.x) xsc[i] = xscale[i];
    __syncthreads();
    if (warp == kWarps) {  // producer
        if (lane == 0) {
            int it = 0;
            for (int ti = 0; ti < my_tiles; ++ti) {
                const size_t tile = blockIdx.x + static_cast<size_t>(ti) * gridDim.x;
                for (int c = 0; c < chunks; ++c, ++it) {
                    const int st = it % S;
                    if (it >= S) mbar_wait(&empty[st], ((it / S) & 1) ^ 1);
                    const int n = units - c * CH < CH ? units - c * CH : CH;
                    unsigned char *dst = ring + st * (kCodeBytes + kScaleBytes);
                    asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;\n" ::"r"(smem_addr(&full[st])),
                                 "r"(n * 640));
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                                 ::"r"(smem_addr(dst)), "l"(codes + (tile * units + c * CH) * 32), "r"(n * 512),
                                 "r"(smem_addr(&full[st])) : "memory");
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                                 ::"r"(smem_addr(dst + kCodeBytes)), "l"(scales + (tile * units + c * CH) * 16),
                                 "r"(n * 128), "r"(smem_addr(&full[st])) : "memory");
                }
            }
        }
        return;
    }
    float acc[4] = {};
    int it = 0;
    for (int ti = 0; ti < my_tiles; ++ti) {
        const size_t tile = blockIdx.x + static_cast<size_t>(ti) * gridDim.x;
        for (int c = 0; c < chunks; ++c, ++it) {
            const int st = it % S;
            mbar_wait(&full[st], (it / S) & 1);
            const int u = c * CH + warp;
            if (u < units) {
                const unsigned char *base = ring + st * (kCodeBytes + kScaleBytes);
                const uint4 q = reinterpret_cast<const uint4 *>(base)[warp * 32 + lane];
                const uint2 sm0 = reinterpret_cast<const uint2 *>(base + kCodeBytes)[warp * 16 + lane / 4];
                const uint2 sm1 = reinterpret_cast<const uint2 *>(base + kCodeBytes)[warp * 16 + 8 + lane / 4];
                if constexpr (INT8) {
                    const uint4 x0 = lane < 4 ? *reinterpret_cast<const uint4 *>(xs + u * 128 + (lane % 4) * 32) : make_uint4(0, 0, 0, 0);
                    const uint4 x1 = lane < 4 ? *reinterpret_cast<const uint4 *>(xs + u * 128 + (lane % 4) * 32 + 16) : make_uint4(0, 0, 0, 0);
                    const float xscale_u = xsc[u];
                    __syncwarp();
                    if (lane == 0) asm volatile("mbarrier.arrive.shared.b64 _, [%0];\n" ::"r"(smem_addr(&empty[st])));
    #pragma unroll
                    for (int g = 0; g < 2; ++g) {
                        int ci[4] = {0, 0, 0, 0};
    #pragma unroll
                        for (int wj = 2 * g; wj < 2 * g + 2; ++wj) {
                            const uint32_t w = word_of(q, wj);
                            const uint4 &xv = wj < 2 ? x0 : x1;
                            const uint32_t b0 = word_of(xv, (wj % 2) * 2), b1 = word_of(xv, (wj % 2) * 2 + 1);
                            asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                                         : "+r"(ci[0]), "+r"(ci[1]), "+r"(ci[2]), "+r"(ci[3])
                                         : "r"(w & 0x03030303u), "r"((w >> 2) & 0x03030303u), "r"((w >> 4) & 0x03030303u),
                                           "r"((w >> 6) & 0x03030303u), "r"(b0), "r"(b1));
                        }
                        const uint2 &sm = g == 0 ? sm0 : sm1;
                        const float s_lo = __low2float(*reinterpret_cast<const __half2 *>(&sm.x)) * xscale_u;
                        const float s_hi = __low2float(*reinterpret_cast<const __half2 *>(&sm.y)) * xscale_u;
                        acc[0] += s_lo * static_cast<float>(ci[0]);
                        acc[1] += s_lo * static_cast<float>(ci[1]);
                        acc[2] += s_hi * static_cast<float>(ci[2]);
                        acc[3] += s_hi * static_cast<float>(ci[3]);
                    }
                } else {
                    uint2 xv[8];
#pragma unroll
                    for (int i2 = 0; i2 < 4; ++i2) {
                        const uint4 v = lane < 4 ? *reinterpret_cast<const uint4 *>(xsh + u * 128 + (lane % 4) * 32 + 8 * i2)
                                                 : make_uint4(0, 0, 0, 0);
                        xv[2 * i2] = make_uint2(v.x, v.y);
                        xv[2 * i2 + 1] = make_uint2(v.z, v.w);
                    }
                    __syncwarp();
                    if (lane == 0) asm volatile("mbarrier.arrive.shared.b64 _, [%0];\n" ::"r"(smem_addr(&empty[st])));
                    float part[2][4] = {};
                    f16_unit_mma(q, (lane % 4) < 2 ? sm0 : sm1, xv, part);
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[e] += part[0][e] + part[1][e];
                }
            } else {
                __syncwarp();
                if (lane == 0) asm volatile("mbarrier.arrive.shared.b64 _, [%0];\n" ::"r"(smem_addr(&empty[st])));
            }
        }
        // The tile's partial sums meet (consumer warps only: named barrier 1).
        const int buf = ti & 1;
        if (lane % 4 == 0) {
            red[buf][warp][lane / 4] = acc[0];
            red[buf][warp][lane / 4 + 8] = acc[2];
        }
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
        asm volatile("bar.sync 1, %0;\n" ::"n"(kWarps * 32));
        if (threadIdx.x < 16) {
            float v = 0.f;
            for (int w = 0; w < kWarps; ++w) v += red[buf][w][threadIdx.x];
            out[tile * 16 + threadIdx.x] = v;
        }
    }
}

template <class F>
float time_us(F launch, int reps) {
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    launch(0);
    CHECK(cudaEventRecord(a));
    for (int i = 1; i <= reps; ++i) launch(i);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    CHECK(cudaGetLastError());
    return ms * 1e3f / reps;
}

int main() {
    // Matrices of the Llama-2-7B shape (rows x 4096 or 11008 inputs), 2-bit codes, g64 scales.
    struct Shape { const char *name; int rows, k; };
    const Shape shapes[] = {{"o_proj 4096x4096", 4096, 4096}, {"qkv 12288x4096", 12288, 4096},
                            {"gate_up 22016x4096", 22016, 4096}, {"down 4096x11008", 4096, 11008},
                            {"head 32000x4096", 32000, 4096}};
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    std::printf("| matrix | MB | f16, 4 units in flight | f16, 8 | int8, 4 | int8, 8 | int8, ring | f16, ring |\n"
                "|---|---|---|---|---|---|---|---|\n");
    for (const Shape &s : shapes) {
        const int tiles = s.rows / 16, units = (s.k + 127) / 128;
        const size_t n_slots = static_cast<size_t>(tiles) * units * 32;
        const size_t code_bytes = n_slots * 16, scale_bytes = static_cast<size_t>(tiles) * units * 2 * 8 * 8;
        // Enough copies that the L2 (50 MB) never holds the one being read.
        const int copies = static_cast<int>(std::max<size_t>(2, (160u << 20) / (code_bytes + scale_bytes) + 1));
        std::vector<uint4 *> codes(copies);
        std::vector<uint2 *> scales(copies);
        for (int c = 0; c < copies; ++c) {
            CHECK(cudaMalloc(&codes[c], code_bytes));
            CHECK(cudaMalloc(&scales[c], scale_bytes));
            CHECK(cudaMemset(codes[c], 0x5A, code_bytes));
            CHECK(cudaMemset(scales[c], 0x11, scale_bytes));
        }
        __half *x;
        int8_t *xq;
        float *xs, *out;
        CHECK(cudaMalloc(&x, units * 128 * sizeof(__half)));
        CHECK(cudaMemset(x, 0, units * 128 * sizeof(__half)));
        CHECK(cudaMalloc(&xq, units * 128));
        CHECK(cudaMemset(xq, 1, units * 128));
        CHECK(cudaMalloc(&xs, units * sizeof(float)));
        CHECK(cudaMemset(xs, 0, units * sizeof(float)));
        CHECK(cudaMalloc(&out, s.rows * sizeof(float)));
        const int reps = 50;
        const double mb = (code_bytes + scale_bytes) / 1e6;
        std::printf("| %s | %.1f |", s.name, mb);
        auto report = [&](float us) { std::printf(" %.1f us, %.0f GB/s |", us, mb * 1e3 / us); };
        report(time_us([&](int i) {
            gemv_f16<4><<<tiles, kWarps * 32>>>(codes[i % copies], scales[i % copies], x, out, units);
        }, reps));
        report(time_us([&](int i) {
            gemv_f16<8><<<tiles, kWarps * 32>>>(codes[i % copies], scales[i % copies], x, out, units);
        }, reps));
        report(time_us([&](int i) {
            gemv_int8<4><<<tiles, kWarps * 32>>>(codes[i % copies], scales[i % copies], xq, xs, out, units);
        }, reps));
        report(time_us([&](int i) {
            gemv_int8<8><<<tiles, kWarps * 32>>>(codes[i % copies], scales[i % copies], xq, xs, out, units);
        }, reps));
        auto ring_smem = [&](int stages, bool int8) { return stages * 8 * 640 + units * 128 * (int8 ? 1 : 2) + units * 4; };
        CHECK(cudaFuncSetAttribute(gemv_ring<8, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, ring_smem(8, true)));
        CHECK(cudaFuncSetAttribute(gemv_ring<8, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, ring_smem(8, false)));
        report(time_us([&](int i) {
            gemv_ring<8, true><<<std::min(tiles, 2 * sms), 9 * 32, ring_smem(8, true)>>>(
                codes[i % copies], scales[i % copies], xq, x, xs, out, units, tiles);
        }, reps));
        report(time_us([&](int i) {
            gemv_ring<8, false><<<std::min(tiles, 2 * sms), 9 * 32, ring_smem(8, false)>>>(
                codes[i % copies], scales[i % copies], xq, x, xs, out, units, tiles);
        }, reps));
        std::printf("\n");
        for (int c = 0; c < copies; ++c) {
            CHECK(cudaFree(codes[c]));
            CHECK(cudaFree(scales[c]));
        }
        CHECK(cudaFree(x));
        CHECK(cudaFree(xq));
        CHECK(cudaFree(xs));
        CHECK(cudaFree(out));
    }
    return 0;
}
