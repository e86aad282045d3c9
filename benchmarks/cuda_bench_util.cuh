// cuda_bench_util.cuh — the pieces the standalone CUDA benchmarks share (read_bandwidth.cu,
// gemv_decode_cost.cu, launch_chain.cu, persistent_gemv.cu): error checks, mbarrier waits, a
// grid barrier, the runtime's f16 decode of one unit into mmas.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "../csrc/cuda/async_copy.cuh"
#include "../csrc/cuda/decode.cuh"

#define CHECK(x)                                                                              \
    do {                                                                                      \
        cudaError_t e_ = (x);                                                                 \
        if (e_ != cudaSuccess) {                                                              \
            std::printf("%s: %s\n", #x, cudaGetErrorString(e_));                              \
            std::exit(1);                                                                     \
        }                                                                                     \
    } while (0)

using pumice::cuda::mbar_wait;
using pumice::cuda::smem_addr;

// Thread 0 of a block arrives at a grid-wide barrier of co-resident blocks and waits: arrivals
// count on one monotonic counter, round r releases at target = (r + 1) * blocks. The caller
// syncs its block before (its writes) and after (so that the others wait too).
__device__ __forceinline__ void grid_arrive_and_wait(unsigned *arrived, unsigned target) {
    __threadfence();
    atomicAdd(arrived, 1u);
    unsigned seen = 0;
    do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(arrived) : "memory");
    } while (seen < target);
    __threadfence();
}

// The runtime's f16 decode of one lane's unit (UnitDecoder: 16 B of 2-bit codes, scale and min
// of its two rows) into eight m16n8k16 mmas, alternating two accumulators.
__device__ __forceinline__ void f16_unit_mma(const uint4 &q, const uint2 &sm, const uint2 xs[8], float acc[2][4]) {
    const pumice::cuda::UnitDecoder<2> dec(q, make_uint2(0, 0), sm);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        uint32_t a[4];
        dec.ktile(t, a);
        const uint32_t b[2] = {xs[t].x, xs[t].y};
        pumice::cuda::mma_16816(acc[t % 2], a, b);
    }
}
