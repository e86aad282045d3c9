// read_bandwidth.cu — how fast can a kernel shaped like the decode GEMV read its weights?
//
// Streams a buffer the size of a Llama-2-7B 2.5-bit lm_head (or any size) with:
//   plain<U>  every warp reads 512-byte pieces (16 B per lane, L1 no-allocate), U in flight,
//             optionally followed by `work` dependent-free integer ops per 16 B (decode stand-in);
//   bulk<S>   one block per SM, a producer thread copying 16 KB pieces into an S-stage shared
//             memory ring with cp.async.bulk (the Hopper copy engine), consumers reading them.
// Build and run on the GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/read_bandwidth.cu -o /tmp/read_bw && /tmp/read_bw [MiB]
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "../csrc/cuda/decode.cuh"
#include "cuda_bench_util.cuh"

template <int U>
__global__ void __launch_bounds__(256) plain_kernel(const uint4 *buf, int64_t pieces, int work, unsigned *sink) {
    const int lane = threadIdx.x % 32;
    const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
    unsigned acc = 0;
    for (int64_t p0 = warp; p0 < pieces; p0 += U * warps) {
        uint4 v[U];
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int64_t p = p0 + j * warps;
            v[j] = p < pieces ? pumice::cuda::load_stream(buf + p * 32 + lane) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < U; ++j) {
            unsigned x = v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
            for (int i = 0; i < work; ++i) x = (x >> 3) * 0x9E3779B9u + i;
            acc += x;
        }
    }
    if (acc == 0x12345678u) *sink = acc;
}

template <int S>
__global__ void __launch_bounds__(288) bulk_kernel(const char *buf, int64_t pieces, unsigned *sink) {
    constexpr int kPiece = 16384;
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ __align__(8) uint64_t full[S], empty[S];
    const int consumer_warps = blockDim.x / 32 - 1;
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; ++s) {
            asm volatile("mbarrier.init.shared.b64 [%0], 1;\n" ::"r"(smem_addr(&full[s])));
            asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(smem_addr(&empty[s])), "r"(consumer_warps));
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n");
    }
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (warp == consumer_warps) {  // producer
        if (lane == 0) {
            int it = 0;
            for (int64_t p = blockIdx.x; p < pieces; p += gridDim.x, ++it) {
                const int s = it % S;
                const uint32_t phase = (it / S) & 1;
                if (it >= S) mbar_wait(&empty[s], phase ^ 1);  // the consumers released this stage
                asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;\n" ::"r"(smem_addr(&full[s])), "r"(kPiece));
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                             ::"r"(smem_addr(ring + s * kPiece)), "l"(buf + p * kPiece), "r"(kPiece),
                             "r"(smem_addr(&full[s]))
                             : "memory");
            }
        }
        return;
    }
    unsigned acc = 0;
    int it = 0;
    for (int64_t p = blockIdx.x; p < pieces; p += gridDim.x, ++it) {
        const int s = it % S;
        const uint32_t phase = (it / S) & 1;
        mbar_wait(&full[s], phase);
        const uint4 *piece = reinterpret_cast<const uint4 *>(ring + s * kPiece);
        for (int i = warp * 32 + lane; i < kPiece / 16; i += consumer_warps * 32) {
            const uint4 v = piece[i];
            acc += v.x ^ v.y ^ v.z ^ v.w;
        }
        __syncwarp();
        if (lane == 0) asm volatile("mbarrier.arrive.shared.b64 _, [%0];\n" ::"r"(smem_addr(&empty[s])));
    }
    if (acc == 0x12345678u) *sink = acc;
}

template <class F>
float time_ms(F launch) {
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    launch();
    CHECK(cudaEventRecord(a));
    const int reps = 20;
    for (int i = 0; i < reps; ++i) launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    CHECK(cudaGetLastError());
    return ms / reps;
}

int main(int argc, char **argv) {
    const int64_t mib = argc > 1 ? std::atoll(argv[1]) : 40;
    const int64_t bytes = mib << 20;
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    // Several buffers in turn so that L2 (50 MB) never holds the one being read.
    const int nbuf = 4;
    char *bufs[nbuf];
    for (auto &b : bufs) {
        CHECK(cudaMalloc(&b, bytes));
        CHECK(cudaMemset(b, 1, bytes));
    }
    unsigned *sink;
    CHECK(cudaMalloc(&sink, 4));
    int turn = 0;
    auto report = [&](const char *name, float ms) {
        std::printf("| %-28s | %8.1f us | %6.0f GB/s |\n", name, ms * 1e3, bytes / (ms * 1e-3) / 1e9);
    };
    std::printf("%lld MiB per read, %d SMs\n| variant | time | read rate |\n|---|---|---|\n",
                static_cast<long long>(mib), sms);
    const int64_t pieces512 = bytes / 512;
    for (int blocks_per_sm : {2, 4, 8}) {
        for (int work : {0, 32, 128}) {
            char name[64];
#define PLAIN(U)                                                                                       \
    std::snprintf(name, sizeof name, "plain U=%d %d blk/SM work %d", U, blocks_per_sm, work);          \
    report(name, time_ms([&] {                                                                         \
               plain_kernel<U><<<blocks_per_sm * sms, 256>>>(                                         \
                   reinterpret_cast<const uint4 *>(bufs[turn++ % nbuf]), pieces512, work, sink);      \
           }));
            PLAIN(1) PLAIN(2) PLAIN(4) PLAIN(8)
        }
    }
    const int64_t pieces16k = bytes / 16384;
#define BULK(S)                                                                                        \
    {                                                                                                  \
        CHECK(cudaFuncSetAttribute(bulk_kernel<S>, cudaFuncAttributeMaxDynamicSharedMemorySize, S * 16384)); \
        for (int per_sm : {1, 2}) {                                                                    \
            char name[64];                                                                             \
            std::snprintf(name, sizeof name, "bulk S=%d %d blk/SM", S, per_sm);                        \
            report(name, time_ms([&] {                                                                 \
                       bulk_kernel<S><<<per_sm * sms, 288, S * 16384>>>(bufs[turn++ % nbuf], pieces16k, sink); \
                   }));                                                                                \
        }                                                                                              \
    }
    BULK(2) BULK(4) BULK(6)
    return 0;
}
