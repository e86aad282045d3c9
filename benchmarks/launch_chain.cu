// launch_chain.cu — what one dependent kernel of the decode step costs before any decode work.
//
// A decode step is a chain of ~160 kernels, each needing its predecessor's output. This times a
// CUDA graph of 128 such kernels (each waits with griddepcontrol.wait, like the runtime's, and is
// launched with programmatic dependent launch or without), per kernel:
//   empty    one block, thread 0 reads the previous kernel's value and writes value + 1;
//   act      the GEMV's grid (2 blocks of 256 threads per SM): every block reads an 8 KB
//            activation vector the previous kernel wrote, then writes 16 floats;
//   read MB  the same plus MB of weights streamed by every warp in 512-byte pieces, the first
//            four pieces per warp requested before griddepcontrol.wait (as the GEMV does): a
//            GEMV with free decoding. MB = 5.2 / 14.1 / 28.2 are Llama-2-7B's O, down and gate/up
//            at 2.5 bits per weight;
//   rounds   `act` as rounds of one persistent kernel separated by a grid-wide barrier (atomic
//            arrivals, acquire loads): what a persistent step kernel pays per dependency.
// Build and run on the GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/launch_chain.cu -o /tmp/chain && /tmp/chain
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "../csrc/cuda/decode.cuh"
#include "../csrc/cuda/launch_config.cuh"
#include "cuda_bench_util.cuh"

constexpr int kChain = 128;
constexpr int kThreads = 256;
constexpr int kAct = 4096;  // f16 activations: 8 KB

__device__ __forceinline__ void wait_for_previous() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void let_next_start() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

__global__ void empty_kernel(int *cell) {
    let_next_start();
    wait_for_previous();
    if (threadIdx.x == 0) cell[0] = cell[0] + 1;
}

// out[k] for the next kernel; in: the previous kernel's; weights: `pieces` 512-byte pieces.
__global__ void __launch_bounds__(kThreads) act_kernel(const float *in, float *out, const uint4 *weights,
                                                       int64_t pieces, unsigned *sink) {
    let_next_start();
    const int lane = threadIdx.x % 32;
    const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
    constexpr int U = 4;
    uint4 v[U];
    unsigned acc = 0;
    int64_t p0 = warp;
#pragma unroll
    for (int j = 0; j < U; ++j) {
        const int64_t p = p0 + j * warps;
        v[j] = p < pieces ? pumice::cuda::load_stream(weights + p * 32 + lane) : make_uint4(0, 0, 0, 0);
    }
    wait_for_previous();
    float x = 0.f;
    for (int k = threadIdx.x; k < kAct / 2; k += blockDim.x) x += in[k];
    for (;;) {
#pragma unroll
        for (int j = 0; j < U; ++j) acc += v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
        p0 += U * warps;
        if (p0 >= pieces) break;
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int64_t p = p0 + j * warps;
            v[j] = p < pieces ? pumice::cuda::load_stream(weights + p * 32 + lane) : make_uint4(0, 0, 0, 0);
        }
    }
    if (acc == 0x12345678u) *sink = acc;
    if (threadIdx.x < 16) out[blockIdx.x * 16 + threadIdx.x] = x + static_cast<float>(threadIdx.x);
}

// The alternative: one persistent kernel whose rounds are separated by a grid-wide barrier
// (every block co-resident: a cooperative launch). A round does what `act` does.
__global__ void __launch_bounds__(kThreads) persistent_kernel(float *act0, float *act1, int rounds,
                                                              unsigned *arrived) {
    for (int r = 0; r < rounds; ++r) {
        const float *in = r % 2 ? act1 : act0;
        float *out = r % 2 ? act0 : act1;
        float x = 0.f;
        for (int k = threadIdx.x; k < kAct / 2; k += blockDim.x) x += in[k];
        if (threadIdx.x < 16) out[blockIdx.x * 16 + threadIdx.x] = x + static_cast<float>(threadIdx.x);
        __syncthreads();
        if (threadIdx.x == 0) grid_arrive_and_wait(arrived, (r + 1) * gridDim.x);
        __syncthreads();
    }
}

template <class... Params, class... Args>
void launch(bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t s, Args... args) {
    const pumice::cuda::LaunchConfig config(grid, block, 0, s, pdl);
    CHECK(cudaLaunchKernelEx(&config.cfg, kernel, args...));
}

// Microseconds per kernel of a captured chain of kChain launches, replayed.
template <class F>
float chain_us(cudaStream_t s, F add_kernel) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < kChain; ++i) add_kernel(i);
    CHECK(cudaStreamEndCapture(s, &graph));
    CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 3; ++i) CHECK(cudaGraphLaunch(exec, s));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    constexpr int reps = 20;
    CHECK(cudaEventRecord(a, s));
    for (int i = 0; i < reps; ++i) CHECK(cudaGraphLaunch(exec, s));
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    CHECK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphDestroy(graph));
    return ms * 1e3f / (reps * kChain);
}

int main() {
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    int *cell;
    float *act[2];
    unsigned *sink;
    const double max_mb = 28.2;
    const int64_t max_pieces = static_cast<int64_t>(max_mb * 1e6 / 512) + 1;
    CHECK(cudaMalloc(&cell, 4));
    CHECK(cudaMalloc(&sink, 4));
    CHECK(cudaMalloc(&act[0], 1 << 20));
    CHECK(cudaMalloc(&act[1], 1 << 20));
    CHECK(cudaMemset(act[0], 0, 1 << 20));
    CHECK(cudaMemset(act[1], 0, 1 << 20));
    uint4 *wbuf[2];  // alternate kernels read different buffers (together 56 MB, more than L2)
    CHECK(cudaMalloc(&wbuf[0], max_pieces * 512));
    CHECK(cudaMalloc(&wbuf[1], max_pieces * 512));
    CHECK(cudaMemset(wbuf[0], 1, max_pieces * 512));
    CHECK(cudaMemset(wbuf[1], 2, max_pieces * 512));
    const dim3 grid(2 * sms);
    std::printf("| kernel | us per kernel, PDL | without PDL | GB/s with PDL |\n|---|---|---|---|\n");
    auto row = [&](const char *name, double mb, auto add) {
        const float with = chain_us(s, [&](int i) { add(true, i); });
        const float without = chain_us(s, [&](int i) { add(false, i); });
        if (mb > 0) std::printf("| %s | %.2f | %.2f | %.0f |\n", name, with, without, mb * 1e6 / (with * 1e-6) / 1e9);
        else std::printf("| %s | %.2f | %.2f | |\n", name, with, without);
    };
    row("empty, 1 block", 0, [&](bool pdl, int) { launch(pdl, empty_kernel, dim3(1), dim3(32), s, cell); });
    row("act, 2 blocks/SM", 0, [&](bool pdl, int i) {
        launch(pdl, act_kernel, grid, dim3(kThreads), s, (const float *)act[i % 2], act[(i + 1) % 2],
               (const uint4 *)wbuf[i % 2], (int64_t)0, sink);
    });
    for (double mb : {5.2, 14.1, 28.2}) {
        char name[64];
        std::snprintf(name, sizeof name, "act + read %.1f MB", mb);
        const int64_t pieces = static_cast<int64_t>(mb * 1e6 / 512);
        row(name, mb, [&](bool pdl, int i) {
            launch(pdl, act_kernel, grid, dim3(kThreads), s, (const float *)act[i % 2], act[(i + 1) % 2],
                   (const uint4 *)wbuf[i % 2], pieces, sink);
        });
    }
    // Rounds of a persistent kernel instead of launches.
    unsigned *arrived;
    CHECK(cudaMalloc(&arrived, 4));
    int rounds = kChain * 20;
    void *args[] = {&act[0], &act[1], &rounds, &arrived};
    for (int rep = 0; rep < 2; ++rep) {  // the first run warms up
        CHECK(cudaMemset(arrived, 0, 4));
        cudaEvent_t a, b;
        CHECK(cudaEventCreate(&a));
        CHECK(cudaEventCreate(&b));
        CHECK(cudaEventRecord(a, s));
        CHECK(cudaLaunchCooperativeKernel((void *)persistent_kernel, grid, dim3(kThreads), args, 0, s));
        CHECK(cudaEventRecord(b, s));
        CHECK(cudaEventSynchronize(b));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        if (rep == 1) std::printf("| act, rounds of one persistent kernel (grid barrier) | %.2f | | |\n", ms * 1e3f / rounds);
    }
    return 0;
}
