// async_copy.cuh — asynchronous copies into shared memory: cp.async (sm_80, gemv.cu and
// persistent_step.cu), and mbarrier waits with bulk copies (sm_90: persistent_step.cu and the
// standalone benchmarks).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace pumice {
namespace cuda {

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four bytes from global src to shared dst; wait_async_copies() waits for all of this thread's.
__device__ __forceinline__ void copy_async_4(float *dst, const float *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
// Sixteen bytes (both 16-byte aligned), bypassing L1.
__device__ __forceinline__ void copy_async_16(void *dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void wait_async_copies() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// Spins until the mbarrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity) {
    uint32_t ok = 0;
    while (!ok)
        asm volatile("{ .reg .pred q; mbarrier.try_wait.parity.shared.b64 q, [%1], %2; selp.u32 %0, 1, 0, q; }\n"
                     : "=r"(ok) : "r"(smem_addr(bar)), "r"(parity) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t *bar) {
    asm volatile("mbarrier.arrive.shared.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// bytes from global src to shared dst, completing on the mbarrier (which expects them).
__device__ __forceinline__ void bulk_copy(void *dst, const void *src, uint32_t bytes, uint64_t *bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

}  // namespace cuda
}  // namespace pumice
