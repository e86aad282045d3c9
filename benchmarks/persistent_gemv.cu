// persistent_gemv.cu — can one persistent kernel run a decode step's GEMVs near copy bandwidth?
//
// The runtime runs a batch-1 step as ~160 dependent launches; docs/CUDA.md ("Next") argues that
// what bounds it is the chain, and that a persistent kernel whose weights keep streaming through
// its dependency waits is the way past it. This measures that design on the GEMVs of a whole
// Llama-2-7B-shaped step (32 x {QKV, O, gate/up, down} + head, 2-bit codes with g64 scales in the
// runtime's tiled layout, csrc/cuda/tiled_weight.cuh; 2.1 GB, far more than L2), before anything
// is built into the runtime:
//
//   one block per SM: a producer thread streams the SM's work items of every matrix, in order,
//   into a ring of shared-memory stages with cp.async.bulk (codes, then scales), never waiting
//   for anything but a free stage (weights are never written); C consumer warps decode and
//   multiply. A work item is up to 32 units (16 rows x 128 inputs, 512 bytes each) of one row
//   tile, one stage; items are taken statically (SM s: items s, s + G, ...) or from a counter
//   per matrix. Rows of a tile split into several items are added atomically into a zeroed
//   output (only down's, K = 11008: three addends, so their order can change the last bit).
//   A first version gave every SM one contiguous range of units per matrix instead: slower
//   (docs/CUDA.md has both).
//
// Consumers, per unit:
//   f16   the runtime's decoder (decode.cuh: shift, LOP3, HSUB2, HFMA2 per two weights) and
//         mma.m16n8k16 with the activation in column 0;
//   cols  the column route (docs/CUDA.md): column 2q of the mma carries lane quad q's b0
//         inputs and column 2q + 1 its b1 inputs, so every accumulator sums one quad's 32
//         inputs, which lie in one quantization group; A takes the codes straight out of the
//         mask as half(1024 + c) (shift + LOP3 per two weights) and the scale and min come
//         after: s * sum((1024 + c) x) + (m - 1024 s) * X, with X = the quad's input sum,
//         computed once per matrix when the activation is staged. Exact activations.
//   int8  codes as bytes into mma.m16n8k32.s8 (column route) with a prepared int8 activation
//         image and {d, X, Q} per 32-input run (unit_dot_int8);
//   none  consumers only hand stages back: the ring's own rate.
// Consumers form G groups that take the ring's stages in turn (G = 1: every warp works on every
// stage); the per-item chain of a warp (wait, loads, mmas, reduction) is long, and G groups give
// it G items' time.
//
// Variants leave parts out to see what they cost (enum Skip, Decode: kMmaOnly, kDecodeOnly).
// Modes:
//   independent  no barrier: every matrix stages its input as below without waiting for it (the
//                values are meaningless): the stream's and the consumers' own rate;
//   chained      a grid barrier after every matrix, and its output (f32) becomes the next
//                matrix's input (O reads QKV's first 4096 rows, down reads silu(gate) * up):
//                the dependencies of a real step, without attention and norms;
//   dataflow     (dataflow_gemv) no barrier: a counter of finished tiles per 128 outputs, and
//                a consumer warp waits only for the inputs of its own units; every matrix
//                writes its output as f16 with 16-row sums (down reads the first 11008 rows of
//                gate/up's output, not silu(gate) * up).
//
// Results are checked against a plain reference GEMV (decode.cuh weight_at, f32 sums) on a
// chain of one layer and the head. Build and run on the GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/persistent_gemv.cu -o /tmp/pg && /tmp/pg
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../csrc/cuda/decode.cuh"
#include "cuda_bench_util.cuh"

using pumice::cuda::code_pair;
using pumice::cuda::kHalf1024x2;
using pumice::cuda::mma_16816;
using pumice::cuda::u32_as_half2;

constexpr int kChunkUnits = 32;  // units per ring stage (work item), unless a kernel says fewer
__host__ __device__ constexpr int stage_bytes(int chunk) { return chunk * (512 + 128); }  // codes, then scales
constexpr int kMaxK = 11008;
constexpr int kMaxItemsPerSm = 48;

// kMmaOnly / kDecodeOnly split the cols consumer's cost (wrong results): the raw code words go
// into the mmas undecoded, or the decoded words are folded with XOR and no mma runs.
// kInt8 (kGlobalX only): the codes as bytes into mma.m16n8k32.s8 with an int8 activation
// (see unit_dot_int8).
enum Decode { kNone = 0, kF16 = 1, kCols = 2, kMmaOnly = 3, kDecodeOnly = 4, kInt8 = 5 };
enum Input { kFixed = 0, kPrevious = 1, kSwiGlu = 2 };
// Parts left out to see what they cost (the results are then wrong): the scales' copies, the
// staging of the next activation.
enum Skip { kSkipScales = 1, kSkipStaging = 2, kGlobalX = 4, kNoFence = 8, kNoWait = 16, kSharedImage = 32, kRestageImage = 64 };
// kNoFence: the dataflow kernel publishes without fences (wrong ordering: timing only);
// kNoWait: its consumers do not wait for their inputs.
// kGlobalX: consumers read a fixed f16 activation and its run sums straight from global memory
// (L1/L2) instead of staging them: what an epilogue writing f16 and run sums would allow.
// kSharedImage (kInt8): the int8 image and its runs copied into shared memory once, read there;
// kRestageImage: copied again after every matrix (as a producer-written image would be).

struct Matrix {
    const uint4 *codes;   // [tile][unit][lane]
    const uint2 *scales;  // [tile][group][row pair], two groups per unit
    int tiles, units;
    float *out;           // [tiles * 16]
    const float *prev;    // the previous matrix's out (chained)
    int input;            // Input
    // dataflow_gemv: the input as f16 with its 16-row sums, written by the previous matrix, and
    // that matrix's counters of finished tiles per 128 rows (null: nothing to wait for) ...
    const __half *xin;
    const float *xin_sum;
    const unsigned *in_ready;
    // ... and the same of this matrix's output, with a counter of finished items per tile.
    __half *xout;
    float *tsum;
    unsigned *ready, *tile_done;
};

__device__ __forceinline__ void unit_range(const Matrix &m, int64_t &begin, int64_t &end) {
    const int64_t n = static_cast<int64_t>(m.tiles) * m.units;
    begin = n * blockIdx.x / gridDim.x;
    end = n * (blockIdx.x + 1) / gridDim.x;
}

template <int C> __device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;\n" ::"n"(C * 32) : "memory");
}

// The activation of matrix m as f16 in shared memory, and (cols) each 32-input run's sum: every
// consumer thread converts 8 inputs per pass, four neighbours make a run.
template <int C>
__device__ void stage_input(const Matrix &m, const __half *fixed, __half *x, float *xsum) {
    const int k = m.units * 128, pieces = k / 8;
    for (int p0 = 0; p0 < pieces; p0 += C * 32) {
        const int p = p0 + static_cast<int>(threadIdx.x);
        float s = 0.f;
        if (p < pieces) {
            float v[8];
            if (m.input == kFixed) {
                const uint4 h = reinterpret_cast<const uint4 *>(fixed)[p];
                const __half2 *h2 = reinterpret_cast<const __half2 *>(&h);
                for (int i = 0; i < 4; ++i) {
                    v[2 * i] = __low2float(h2[i]);
                    v[2 * i + 1] = __high2float(h2[i]);
                }
            } else {
                const float4 a = __ldcg(reinterpret_cast<const float4 *>(m.prev) + 2 * p);
                const float4 b = __ldcg(reinterpret_cast<const float4 *>(m.prev) + 2 * p + 1);
                v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
                v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
                if (m.input == kSwiGlu) {
                    const float4 c = __ldcg(reinterpret_cast<const float4 *>(m.prev + k) + 2 * p);
                    const float4 d = __ldcg(reinterpret_cast<const float4 *>(m.prev + k) + 2 * p + 1);
                    const float u[8] = {c.x, c.y, c.z, c.w, d.x, d.y, d.z, d.w};
                    for (int i = 0; i < 8; ++i) v[i] = v[i] / (1.f + __expf(-v[i])) * u[i];
                }
            }
            uint4 out;
            __half2 *o2 = reinterpret_cast<__half2 *>(&out);
            for (int i = 0; i < 4; ++i) {
                o2[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
                s += __low2float(o2[i]) + __high2float(o2[i]);
            }
            reinterpret_cast<uint4 *>(x)[p] = out;
        }
        s += __shfl_xor_sync(~0u, s, 1);
        s += __shfl_xor_sync(~0u, s, 2);
        if (p < pieces && p % 4 == 0) xsum[p / 4] = s;
    }
}

// A work item is up to CH units of one row tile (a whole tile when K = 4096), and one
// ring stage. The producer takes items statically (item blockIdx.x + j * gridDim.x) or from the
// matrix's counter (atomicAdd: SMs whose stream runs faster take more), and tells the consumers
// which through the stage's header; -1 ends this SM's share of the matrix.
template <int CH> __device__ __forceinline__ int items_per_tile(const Matrix &m) { return (m.units + CH - 1) / CH; }
template <int CH> __device__ __forceinline__ int item_units(const Matrix &m, int c) {
    return m.units - c * CH < CH ? m.units - c * CH : CH;
}

// The ring's two sides. Producer: one thread, every matrix's items in order.
// Consumer groups take the stages in turn (group g: stages it with it % G == g), so the
// producer ends a matrix with G end markers, one per group.
template <int S, int CH>
__device__ void produce_items(const Matrix *mats, int n_mats, bool dynamic, unsigned *work, int skip, int groups,
                              unsigned char *ring, uint64_t *full, uint64_t *empty, int *header) {
    int it = 0;
    for (int mi = 0; mi < n_mats; ++mi) {
        const Matrix &m = mats[mi];
        const int per_tile = items_per_tile<CH>(m), n_items = m.tiles * per_tile;
        int markers = 0;
        for (int j = 0; markers < groups; ++j, ++it) {
            int item = -1;
            if (j < kMaxItemsPerSm && markers == 0) {
                item = dynamic ? static_cast<int>(atomicAdd(work + mi, 1u)) : static_cast<int>(blockIdx.x) + j * gridDim.x;
                if (item >= n_items) item = -1;
            }
            const int st = it % S;
            if (it >= S) mbar_wait(&empty[st], ((it / S) & 1) ^ 1);
            header[st] = item;
            if (item < 0) {  // an end marker: no bytes, a plain arrival
                asm volatile("mbarrier.arrive.shared.b64 _, [%0];\n" ::"r"(smem_addr(&full[st])) : "memory");
                ++markers;
                continue;
            }
            const int tile = item / per_tile, c = item % per_tile, n = item_units<CH>(m, c);
            const int64_t u0 = static_cast<int64_t>(tile) * m.units + c * CH;
            unsigned char *dst = ring + st * stage_bytes(CH);
            asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;\n" ::"r"(smem_addr(&full[st])),
                         "r"(skip & kSkipScales ? n * 512 : n * 640) : "memory");
            asm volatile(
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                    smem_addr(dst)),
                "l"(m.codes + u0 * 32), "r"(n * 512), "r"(smem_addr(&full[st]))
                : "memory");
            if (!(skip & kSkipScales))
                asm volatile(
                    "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                        smem_addr(dst + CH * 512)),
                    "l"(m.scales + u0 * 16), "r"(n * 128), "r"(smem_addr(&full[st]))
                    : "memory");
        }
    }
}

// Consumer warp `warp` of a group of C: waits for stage `it`, takes its units (warp, warp + C,
// ...) into registers and hands the stage back. Returns the stage's item (-1: the end of this
// SM's share of a matrix).
template <int C, int S, int UPW, int CH>
__device__ __forceinline__ int take_stage(int it, int warp, const unsigned char *ring, uint64_t *full, uint64_t *empty,
                                          const int *header, uint4 (&q)[UPW], uint2 (&sm)[UPW]) {
    const int lane = threadIdx.x % 32;
    const int st = it % S;
    mbar_wait(&full[st], (it / S) & 1);
    const int item = header[st];
    const unsigned char *base = ring + st * stage_bytes(CH);
#pragma unroll
    for (int w = 0; w < UPW; ++w) {
        const int idx = (warp + w * C) % CH;
        q[w] = reinterpret_cast<const uint4 *>(base)[idx * 32 + lane];
        // The lane's 32 inputs lie in one group of 64: quads 0-1 the first, 2-3 the second.
        sm[w] = reinterpret_cast<const uint2 *>(base + CH * 512)[idx * 16 + (lane % 4) / 2 * 8 + lane / 4];
    }
    __syncwarp();
    if (lane == 0) asm volatile("mbarrier.arrive.shared.b64 _, [%0];\n" ::"r"(smem_addr(&empty[st])));
    return item;
}

// What a consumer lane feeds the mma. cols: lane 4n + q feeds column n; it holds quad q's b0
// inputs when n = 2q, its b1 inputs when n = 2q + 1, and nothing otherwise.
template <int D> struct LaneRole {
    uint32_t keep_b0, keep_b1;
    bool loads_x;
    __device__ LaneRole() {
        const int lane = threadIdx.x % 32, quad = lane % 4, col = lane / 4;
        keep_b0 = col == 2 * quad ? ~0u : 0u;
        keep_b1 = col == 2 * quad + 1 ? ~0u : 0u;
        loads_x = D >= kCols ? (keep_b0 | keep_b1) != 0u : lane < 4;
    }
};

// One unit: codes q, scale pairs sm, the lane's 32 activations at xr (f16), xq = their sum
// (cols). f16: acc[2][4] are two alternating mma accumulators; cols: acc[0][0..1] rows g, g + 8.
template <int D>
__device__ __forceinline__ void unit_dot(const uint4 &q, const uint2 &sm, const __half *xr, float xq,
                                         const LaneRole<D> &role, float (&acc)[2][4]) {
    uint2 xs[8];
#pragma unroll
    for (int i2 = 0; i2 < 4; ++i2) {
        const uint4 v = role.loads_x ? reinterpret_cast<const uint4 *>(xr)[i2] : make_uint4(0, 0, 0, 0);
        xs[2 * i2] = make_uint2(v.x, v.y);
        xs[2 * i2 + 1] = make_uint2(v.z, v.w);
    }
    if constexpr (D == kF16) {
        f16_unit_mma(q, sm, xs, acc);
    } else if constexpr (D != kNone) {
        float part[2][4] = {};
        uint32_t folded = 0;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            uint32_t a[4];
#pragma unroll
            for (int r = 0; r < 4; ++r)
                a[r] = D == kMmaOnly ? pumice::cuda::word_of(q, (t + r) % 4)
                                     : code_pair<2>(q, make_uint2(0, 0), t, r, kHalf1024x2);
            const uint32_t b[2] = {xs[t].x & role.keep_b0, xs[t].y & role.keep_b1};
            if constexpr (D == kDecodeOnly) folded ^= a[0] ^ a[1] ^ a[2] ^ a[3] ^ b[0] ^ b[1];
            else mma_16816(part[t % 2], a, b);
        }
        if constexpr (D == kDecodeOnly) part[0][0] = __uint_as_float(folded & 0x3FFFFFFFu);
        const float2 lo = __half22float2(u32_as_half2(sm.x));  // {s, m} of row g
        const float2 hi = __half22float2(u32_as_half2(sm.y));  // row g + 8
        acc[0][0] += lo.x * (part[0][0] + part[0][1] + part[1][0] + part[1][1]) + fmaf(-1024.f, lo.x, lo.y) * xq;
        acc[0][1] += hi.x * (part[0][2] + part[0][3] + part[1][2] + part[1][3]) + fmaf(-1024.f, hi.x, hi.y) * xq;
    }
}

// int8: register s of the shifted word j, (w >> 2s) & 0x03030303, holds the codes of row
// g + 8(s % 2) at the quad's inputs 8j + {0, 4, 1, 5} (s < 2) or 8j + {2, 6, 3, 7} (s >= 2), one
// byte each: exactly the A fragment of an m16n8k32 mma whose k slots 4q..4q+3 are the first set
// and 16+4q.. the second. With the column route (column 2q carries quad q's first-set inputs,
// 2q + 1 its second set) every accumulator sums one quad's 32 inputs over the four words: one
// quantization group, scaled after. The activation comes as its B image (per 32-input run: the
// eight words of the b0 and b1 registers, int8 q = round(x / d)) and {d, X, Q} per run, as a
// producing epilogue would write them; centred codes: s (d sum(c q) + 1.5 (X - d Q)) + m X.
__device__ __forceinline__ void unit_dot_int8(const uint4 &q, const uint2 &sm, const uint4 *image, const float4 *runs,
                                              int run, const LaneRole<kInt8> &role, float (&acc)[2][4]) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    const uint4 first = role.keep_b0 ? image[2 * run] : zero, second = role.keep_b1 ? image[2 * run + 1] : zero;
    int c[4] = {0, 0, 0, 0};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t w = pumice::cuda::word_of(q, j);
        asm volatile(
            "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
            : "r"(w & 0x03030303u), "r"((w >> 2) & 0x03030303u), "r"((w >> 4) & 0x03030303u),
              "r"((w >> 6) & 0x03030303u), "r"(pumice::cuda::word_of(first, j)), "r"(pumice::cuda::word_of(second, j)));
    }
    const float4 info = runs[run];  // {d, X, Q, -}
    const float centre = 1.5f * (info.y - info.x * info.z);
    const float2 lo = __half22float2(u32_as_half2(sm.x)), hi = __half22float2(u32_as_half2(sm.y));
    acc[0][0] += lo.x * fmaf(info.x, static_cast<float>(c[0] + c[1]), centre) + lo.y * info.y;
    acc[0][1] += hi.x * fmaf(info.x, static_cast<float>(c[2] + c[3]), centre) + hi.y * info.y;
}

// The warp's sums for rows g (lo) and g + 8 (hi), valid in lanes 4g.
template <int D> __device__ __forceinline__ void row_sums(const float (&acc)[2][4], float &lo, float &hi) {
    if constexpr (D >= kCols) {  // the quad's lanes hold the same rows over different inputs
        lo = acc[0][0];
        hi = acc[0][1];
        lo += __shfl_xor_sync(~0u, lo, 1);
        lo += __shfl_xor_sync(~0u, lo, 2);
        hi += __shfl_xor_sync(~0u, hi, 1);
        hi += __shfl_xor_sync(~0u, hi, 2);
    } else {  // column 0
        lo = acc[0][0] + acc[1][0];
        hi = acc[0][2] + acc[1][2];
    }
}

// The block's set-up, shared by both kernels: the ring's mbarriers (a stage is handed back by
// the consumer_warps / groups warps of the group that takes it), then the last warp's lane 0
// becomes the producer.
// Returns true in the consumer threads. The caller clears its shared state before calling.
template <int S, int CH>
__device__ bool start_ring(int consumer_warps, int groups, const Matrix *mats, int n_mats, bool dynamic,
                           unsigned *work, int skip, unsigned char *ring, uint64_t *full, uint64_t *empty,
                           int *header) {
    if (threadIdx.x == 0) {
        for (int i = 0; i < S; ++i) {
            asm volatile("mbarrier.init.shared.b64 [%0], 1;\n" ::"r"(smem_addr(&full[i])));
            asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(smem_addr(&empty[i])), "r"(consumer_warps / groups));
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n");
    }
    __syncthreads();
    if (static_cast<int>(threadIdx.x) / 32 < consumer_warps) return true;
    if (threadIdx.x % 32 == 0) produce_items<S, CH>(mats, n_mats, dynamic, work, skip, groups, ring, full, empty, header);
    return false;
}

// Grid barriers between matrices (chained) or none (independent). The C consumer warps form G
// groups that take the stages in turn: a warp's chain of waits, loads, mmas and reduction per
// item is long, and with G groups each has G items' time for it.
template <int C, int S, int D, int G = 1, int CH = kChunkUnits>
__global__ void __launch_bounds__((C + 1) * 32, 1)
    persistent_gemv(const Matrix *mats, int n_mats, const __half *fixed, bool chained, bool dynamic,
                    unsigned *arrived, unsigned *work, int skip, const float *fixed_sum,
                    const uint4 *fixed_image, const float4 *fixed_runs) {
    constexpr int CG = C / G;                          // warps per group
    constexpr int UPW = (CH + CG - 1) / CG;  // units per consumer warp per stage
    static_assert(C % G == 0, "groups of equal size");
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char *ring = smem;
    __half *x = reinterpret_cast<__half *>(smem + S * stage_bytes(CH));
    float *xsum = reinterpret_cast<float *>(x + kMaxK);
    float *red = xsum + kMaxK / 32;  // [kMaxItemsPerSm][16]
    __shared__ __align__(8) uint64_t full[S], empty[S];
    __shared__ int header[S], taken[kMaxItemsPerSm], end_at[G];
    for (int i = threadIdx.x; i < kMaxItemsPerSm * 16; i += blockDim.x) red[i] = 0.f;
    if (!start_ring<S, CH>(C, G, mats, n_mats, dynamic, work, skip, ring, full, empty, header)) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = warp / CG, gwarp = warp % CG;
    const LaneRole<D> role;
    const int quad = lane % 4, col = lane / 4;
    int start = 0;  // ring position of this matrix's first item: the SM's item j is at start + j
    stage_input<C>(mats[0], fixed, x, xsum);
    const uint4 *image = fixed_image;
    const float4 *runs = fixed_runs;
    // The x area holds up to 11 KB of image, then 5.5 KB of runs.
    uint4 *image_copy = reinterpret_cast<uint4 *>(x);
    float4 *runs_copy = reinterpret_cast<float4 *>(image_copy + kMaxK / 32 * 2);
    auto copy_image = [&](int k) {
        for (int i = threadIdx.x; i < k / 32 * 2; i += C * 32) image_copy[i] = __ldcg(fixed_image + i);
        for (int i = threadIdx.x; i < k / 32; i += C * 32) runs_copy[i] = __ldcg(fixed_runs + i);
    };
    if (D == kInt8 && (skip & kSharedImage)) {
        copy_image(kMaxK);
        image = image_copy;
        runs = runs_copy;
    }
    consumers_sync<C>();
    for (int mi = 0; mi < n_mats; ++mi) {
        const Matrix &m = mats[mi];
        const int per_tile = items_per_tile<CH>(m);
        for (int it = start + group;; it += G) {
            uint4 q[UPW];
            uint2 sm[UPW];
            const int item = take_stage<CG, S, UPW, CH>(it, gwarp, ring, full, empty, header, q, sm);
            if (item < 0) {
                if (gwarp == 0 && lane == 0) end_at[group] = it;
                break;
            }
            const int j = it - start;
            if (gwarp == 0 && lane == 0) taken[j] = item;
            if constexpr (D != kNone) {
                const int c = item % per_tile, n = item_units<CH>(m, c);
                float acc[2][4] = {};
#pragma unroll
                for (int w = 0; w < UPW; ++w) {
                    const int idx = gwarp + w * CG;
                    if (idx >= n) break;
                    const int u = c * CH + idx;
                    const __half *xr = (skip & kGlobalX ? fixed : x) + u * 128 + quad * 32;
                    const float xq = D >= kCols ? (skip & kGlobalX ? fixed_sum : xsum)[u * 4 + quad] : 0.f;
                    if constexpr (D == kInt8) unit_dot_int8(q[w], sm[w], image, runs, u * 4 + quad, role, acc);
                    else unit_dot<D>(q[w], sm[w], xr, xq, role, acc);
                }
                float lo, hi;
                row_sums<D>(acc, lo, hi);
                if (quad == 0) {
                    atomicAdd(red + j * 16 + col, lo);
                    atomicAdd(red + j * 16 + col + 8, hi);
                }
            }
        }
        consumers_sync<C>();
        // The G end markers took G consecutive positions; the first of them counts the items.
        int first_end = end_at[0];
#pragma unroll
        for (int g = 1; g < G; ++g) first_end = min(first_end, end_at[g]);
        const int n_taken = first_end - start;
        start = first_end + G;
        // This SM's rows: whole tiles stored, parts of tiles added into the zeroed output.
        for (int i = threadIdx.x; i < n_taken * 16; i += C * 32) {
            const int item = taken[i / 16];
            float *o = m.out + static_cast<int64_t>(item / per_tile) * 16 + i % 16;
            if (per_tile == 1) *o = red[i];
            else atomicAdd(o, red[i]);
            red[i] = 0.f;
        }
        if (mi + 1 == n_mats) break;
        if (chained) {
            consumers_sync<C>();
            if (threadIdx.x == 0) grid_arrive_and_wait(arrived, (mi + 1) * gridDim.x);
        }
        consumers_sync<C>();
        if (!(skip & kSkipStaging)) stage_input<C>(mats[mi + 1], fixed, x, xsum);
        if (D == kInt8 && (skip & kRestageImage)) copy_image(mats[mi + 1].units * 128);
        consumers_sync<C>();
    }
}

// Dataflow instead of barriers: a consumer warp waits only for the 128-input chunks its own
// units read (a counter of finished tiles per chunk of the previous matrix's output: 8 = ready),
// so an SM starts the next matrix's work as soon as its inputs exist, while others still finish.
// The warp that completes an item's reduction writes its rows; the item that completes a tile
// writes the tile as f16 with its sum (the next matrix's input) and counts it into its chunk.
constexpr int kSlots = 16;  // in-SM reductions in flight: more than the S stages a warp can run ahead

__device__ __forceinline__ void wait_count(const unsigned *p, unsigned target) {
    if (threadIdx.x % 32 == 0) {
        unsigned v = 0;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
        } while (v < target);
    }
    __syncwarp();
}

// The fence between publishing and counting: fence.sc (__threadfence) or fence.acq_rel.
template <bool SC> __device__ __forceinline__ void gpu_fence(int skip) {
    if (skip & kNoFence) return;
    if constexpr (SC) __threadfence();
    else asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
}

// Run by the whole warp that brought the item's reduction to C warps.
template <bool SC>
__device__ void finish_item(const Matrix &m, int tile, int per_tile, float *red_slot, unsigned *done_slot, int skip) {
    const int lane = threadIdx.x % 32;
    __threadfence_block();
    float v = lane < 16 ? red_slot[lane] : 0.f;
    __syncwarp();
    if (lane < 16) red_slot[lane] = 0.f;
    if (lane == 0) *done_slot = 0;
    const int64_t row = static_cast<int64_t>(tile) * 16 + lane;
    if (per_tile > 1) {  // parts of a tile meet in the zeroed f32 output; the last one goes on
        if (lane < 16) atomicAdd(m.out + row, v);
        gpu_fence<SC>(skip);
        __syncwarp();
        unsigned before = 0;
        if (lane == 0) before = atomicAdd(m.tile_done + tile, 1u);
        if (__shfl_sync(~0u, before, 0) != static_cast<unsigned>(per_tile - 1)) return;
        gpu_fence<SC>(skip);
        v = lane < 16 ? __ldcg(m.out + row) : 0.f;
    } else if (lane < 16) {
        m.out[row] = v;
    }
    const __half h = __float2half(v);
    if (lane < 16) m.xout[row] = h;
    float s = lane < 16 ? __half2float(h) : 0.f;
#pragma unroll
    for (int o = 8; o; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
    if (lane == 0) m.tsum[tile] = s;
    gpu_fence<SC>(skip);
    __syncwarp();
    if (lane == 0) atomicAdd(m.ready + tile / 8, 1u);
}

template <int C, int S, int D, bool SC>
__global__ void __launch_bounds__((C + 1) * 32, 1)
    dataflow_gemv(const Matrix *mats, int n_mats, bool dynamic, unsigned *work, int skip) {
    constexpr int UPW = (kChunkUnits + C - 1) / C;
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char *ring = smem;
    __shared__ __align__(8) uint64_t full[S], empty[S];
    __shared__ int header[S];
    __shared__ float red[kSlots][16];
    __shared__ unsigned done[kSlots];
    for (int i = threadIdx.x; i < kSlots * 16; i += blockDim.x) red[i / 16][i % 16] = 0.f;
    if (threadIdx.x < kSlots) done[threadIdx.x] = 0;
    if (!start_ring<S, kChunkUnits>(C, 1, mats, n_mats, dynamic, work, skip, ring, full, empty, header)) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const LaneRole<D> role;
    const int quad = lane % 4, col = lane / 4;
    int it = 0;
    for (int mi = 0; mi < n_mats; ++mi) {
        const Matrix &m = mats[mi];
        const int per_tile = items_per_tile<kChunkUnits>(m);
        uint64_t seen_lo = 0, seen_hi = 0;  // input chunks this warp knows are complete
        for (;; ++it) {
            uint4 q[UPW];
            uint2 sm[UPW];
            const int item = take_stage<C, S, UPW, kChunkUnits>(it, warp, ring, full, empty, header, q, sm);
            if (item < 0) {
                ++it;
                break;
            }
            const int slot = it % kSlots;
            const int tile = item / per_tile, c = item % per_tile, n = item_units<kChunkUnits>(m, c);
            float acc[2][4] = {};
#pragma unroll
            for (int w = 0; w < UPW; ++w) {
                const int idx = warp + w * C;
                if (idx >= n) break;
                const int u = c * kChunkUnits + idx;
                if (m.in_ready && !(skip & kNoWait)) {
                    const uint64_t bit = 1ull << (u % 64);
                    if (!((u < 64 ? seen_lo : seen_hi) & bit)) {
                        wait_count(m.in_ready + u, 8);
                        if (u < 64) seen_lo |= bit;
                        else seen_hi |= bit;
                    }
                }
                const float xq = D >= kCols ? m.xin_sum[2 * (u * 4 + quad)] + m.xin_sum[2 * (u * 4 + quad) + 1] : 0.f;
                unit_dot<D>(q[w], sm[w], m.xin + u * 128 + quad * 32, xq, role, acc);
            }
            float lo, hi;
            row_sums<D>(acc, lo, hi);
            if (D != kNone && quad == 0) {
                atomicAdd(&red[slot][col], lo);
                atomicAdd(&red[slot][col + 8], hi);
            }
            __syncwarp();
            unsigned before = 0;
            if (lane == 0) {
                __threadfence_block();
                before = atomicAdd(&done[slot], 1u);
            }
            if (__shfl_sync(~0u, before, 0) == C - 1) finish_item<SC>(m, tile, per_tile, red[slot], &done[slot], skip);
        }
    }
}

// Reference: one thread per row, f32 sums of the runtime's per-weight dequantization.
__global__ void reference_gemv(Matrix m, const __half *xin) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (row >= static_cast<int64_t>(m.tiles) * 16) return;
    pumice::cuda::WeightView w;
    w.codes = m.codes;
    w.scale_min = m.scales;
    w.bits = 2;
    w.group_size = 64;
    w.units = m.units;
    w.groups = 2 * m.units;
    w.kp = m.units * 128;
    float s = 0.f;
    for (int64_t k = 0; k < w.kp; ++k) s += pumice::cuda::weight_at(w, row, k) * __half2float(xin[k]);
    m.out[row] = s;
}

// The reference's staging: the same f16 input stage_input builds.
__global__ void reference_input(Matrix m, const __half *fixed, __half *x) {
    const int k = m.units * 128;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < k; e += gridDim.x * blockDim.x) {
        if (m.input == kFixed) x[e] = fixed[e];
        else if (m.input == kPrevious) x[e] = __float2half(m.prev[e]);
        else {
            const float g = m.prev[e], u = m.prev[e + k];
            x[e] = __float2half(g / (1.f + __expf(-g)) * u);
        }
    }
}

__global__ void fill_random(uint32_t *p, int64_t n, uint32_t seed) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        h *= 3266489917u;
        p[i] = h ^ (h >> 16);
    }
}

// half2(s, m) with s = 0.9 / sqrt(K) times 0.75..1.25 and m = -1.5 s: centred codes keep the
// chained activations at a steady size.
__global__ void fill_scales(uint2 *p, int64_t n, int k) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const float base = 0.9f / sqrtf(static_cast<float>(k));
        const float s0 = base * (0.75f + 0.5f * ((i * 37 % 101) / 100.f));
        const float s1 = base * (0.75f + 0.5f * ((i * 53 % 97) / 96.f));
        const __half2 a = __floats2half2_rn(s0, -1.5f * s0), b = __floats2half2_rn(s1, -1.5f * s1);
        p[i] = make_uint2(*reinterpret_cast<const uint32_t *>(&a), *reinterpret_cast<const uint32_t *>(&b));
    }
}

struct Variant {
    const char *name;
    int consumers, decode, stages, skip;
    void (*kernel)(const Matrix *, int, const __half *, bool, bool, unsigned *, unsigned *, int, const float *,
                   const uint4 *, const float4 *);
    int chunk = kChunkUnits;  // units per work item
    size_t smem() const { return stages * stage_bytes(chunk) + kMaxK * 2 + kMaxK / 32 * 4 + kMaxItemsPerSm * 16 * 4; }
};

struct FlowVariant {
    const char *name;
    int consumers, decode, stages, skip;
    void (*kernel)(const Matrix *, int, bool, unsigned *, int);
};

// Median of 10 timed runs after 2 warm-up runs, in ms.
template <class F> double median_ms(F launch) {
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    std::vector<float> ts;
    for (int r = 0; r < 12; ++r) {
        CHECK(cudaEventRecord(e0));
        launch();
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (r >= 2) ts.push_back(ms);
    }
    CHECK(cudaEventDestroy(e0));
    CHECK(cudaEventDestroy(e1));
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
}

// Device-to-device copy bandwidth (bytes read + written), as bench_cuda.py measures it.
double copy_bandwidth() {
    const size_t n = size_t(1) << 30;
    void *a, *b;
    CHECK(cudaMalloc(&a, n));
    CHECK(cudaMalloc(&b, n));
    CHECK(cudaMemset(a, 1, n));
    const double ms = median_ms([&] { CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice)); });
    CHECK(cudaFree(a));
    CHECK(cudaFree(b));
    return 2.0 * n / (ms * 1e-3);
}

int main() {
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    // The step's matrices: 32 layers of QKV, O, gate/up, down, then the head.
    struct Shape { int rows, k, input; };
    const Shape layer[4] = {{12288, 4096, kPrevious}, {4096, 4096, kPrevious}, {22016, 4096, kPrevious},
                            {4096, 11008, kSwiGlu}};
    std::vector<Shape> shapes;
    for (int l = 0; l < 32; ++l) shapes.insert(shapes.end(), layer, layer + 4);
    shapes.push_back({32000, 4096, kPrevious});
    shapes[0].input = kFixed;
    std::vector<Matrix> mats(shapes.size());
    size_t weight_bytes = 0;
    float *outs;
    size_t out_floats = 0;
    for (const Shape &s : shapes) out_floats += s.rows;
    CHECK(cudaMalloc(&outs, out_floats * 4));
    size_t out_off = 0;
    for (size_t i = 0; i < shapes.size(); ++i) {
        Matrix &m = mats[i];
        m.tiles = shapes[i].rows / 16;
        m.units = shapes[i].k / 128;
        const size_t units = static_cast<size_t>(m.tiles) * m.units;
        uint4 *codes;
        uint2 *scales;
        CHECK(cudaMalloc(&codes, units * 512));
        CHECK(cudaMalloc(&scales, units * 128));
        fill_random<<<1024, 256>>>(reinterpret_cast<uint32_t *>(codes), units * 128, 7919u * (i + 1));
        fill_scales<<<1024, 256>>>(scales, units * 16, shapes[i].k);
        CHECK(cudaGetLastError());
        m.codes = codes;
        m.scales = scales;
        m.out = outs + out_off;
        m.prev = i > 0 ? mats[i - 1].out : nullptr;
        m.input = shapes[i].input;
        out_off += shapes[i].rows;
        weight_bytes += units * 640;
        if ((m.tiles * ((m.units + 15) / 16) + sms - 1) / sms + 1 > kMaxItemsPerSm) {  // items of 16 units
            std::printf("too many work items per SM\n");
            return 1;
        }
    }
    __half *fixed, *ref_x;
    unsigned *arrived, *work;
    float *fixed_sum, *fixed_tsum;
    uint4 *fixed_image;
    float4 *fixed_runs;
    CHECK(cudaMalloc(&fixed_sum, kMaxK / 32 * 4));
    CHECK(cudaMalloc(&fixed_tsum, kMaxK / 16 * 4));
    CHECK(cudaMalloc(&work, shapes.size() * 4));
    CHECK(cudaMalloc(&fixed, kMaxK * 2));
    CHECK(cudaMalloc(&ref_x, kMaxK * 2));
    CHECK(cudaMalloc(&arrived, 4));
    {
        std::vector<__half> h(kMaxK);
        std::vector<float> run_sums(kMaxK / 32, 0.f), tile_sums(kMaxK / 16, 0.f);
        for (int i = 0; i < kMaxK; ++i) {
            h[i] = __float2half(std::sin(0.37 * i) + 0.25 * std::cos(1.3 * i));
            run_sums[i / 32] += __half2float(h[i]);
            tile_sums[i / 16] += __half2float(h[i]);
        }
        CHECK(cudaMemcpy(fixed, h.data(), kMaxK * 2, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(fixed_sum, run_sums.data(), run_sums.size() * 4, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(fixed_tsum, tile_sums.data(), tile_sums.size() * 4, cudaMemcpyHostToDevice));
        // The int8 form (unit_dot_int8): per 32-input run d = max|x| / 127, q = round(x / d), the
        // B image of the b0 words (inputs 8j + {0, 4, 1, 5}) then the b1 words (8j + {2, 6, 3, 7}).
        std::vector<uint32_t> image(kMaxK / 32 * 8);
        std::vector<float4> runs(kMaxK / 32);
        for (int r = 0; r < kMaxK / 32; ++r) {
            float x[32], amax = 0.f;
            for (int i = 0; i < 32; ++i) {
                x[i] = __half2float(h[r * 32 + i]);
                amax = std::max(amax, std::fabs(x[i]));
            }
            const float d = amax / 127.f;
            int qv[32], q_sum = 0;
            float x_sum = 0.f;
            for (int i = 0; i < 32; ++i) {
                qv[i] = d > 0.f ? static_cast<int>(std::lround(x[i] / d)) : 0;
                q_sum += qv[i];
                x_sum += x[i];
            }
            auto word = [&](int a, int b, int c, int e) {
                return (qv[a] & 0xFF) | (qv[b] & 0xFF) << 8 | (qv[c] & 0xFF) << 16 | static_cast<uint32_t>(qv[e] & 0xFF) << 24;
            };
            for (int j = 0; j < 4; ++j) {
                image[r * 8 + j] = word(8 * j, 8 * j + 4, 8 * j + 1, 8 * j + 5);
                image[r * 8 + 4 + j] = word(8 * j + 2, 8 * j + 6, 8 * j + 3, 8 * j + 7);
            }
            runs[r] = make_float4(d, x_sum, static_cast<float>(q_sum), 0.f);
        }
        CHECK(cudaMalloc(&fixed_image, image.size() * 4));
        CHECK(cudaMalloc(&fixed_runs, runs.size() * sizeof(float4)));
        CHECK(cudaMemcpy(fixed_image, image.data(), image.size() * 4, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(fixed_runs, runs.data(), runs.size() * sizeof(float4), cudaMemcpyHostToDevice));
    }
    // The dataflow kernel's buffers: f16 outputs, 16-row sums, counters (ready per 128 rows, then
    // items finished per tile). Every row count here is a multiple of 128.
    const size_t all_tiles = out_floats / 16, all_chunks = out_floats / 128;
    __half *xouts;
    float *tsums;
    unsigned *counts;
    CHECK(cudaMalloc(&xouts, out_floats * 2));
    CHECK(cudaMalloc(&tsums, all_tiles * 4));
    CHECK(cudaMalloc(&counts, (all_chunks + all_tiles) * 4));
    for (size_t i = 0, off = 0; i < mats.size(); off += mats[i].tiles * 16, ++i) {
        Matrix &m = mats[i];
        m.xout = xouts + off;
        m.tsum = tsums + off / 16;
        m.ready = counts + off / 128;
        m.tile_done = counts + all_chunks + off / 16;
        m.xin = i > 0 ? mats[i - 1].xout : fixed;
        m.xin_sum = i > 0 ? mats[i - 1].tsum : fixed_tsum;
        m.in_ready = i > 0 ? mats[i - 1].ready : nullptr;
    }
    Matrix *d_mats;
    CHECK(cudaMalloc(&d_mats, mats.size() * sizeof(Matrix)));
    CHECK(cudaMemcpy(d_mats, mats.data(), mats.size() * sizeof(Matrix), cudaMemcpyHostToDevice));

    const Variant variants[] = {
        {"ring only, 8 stages", 8, kNone, 8, 0, persistent_gemv<8, 8, kNone>},
        {"ring only, 10 stages", 8, kNone, 10, 0, persistent_gemv<8, 10, kNone>},
        {"ring only, 8 stages, no scales", 8, kNone, 8, kSkipScales, persistent_gemv<8, 8, kNone>},
        {"ring only, 8 stages, no staging", 8, kNone, 8, kSkipStaging, persistent_gemv<8, 8, kNone>},
        {"f16 decode, 16 warps, 8 stages", 16, kF16, 8, 0, persistent_gemv<16, 8, kF16>},
        {"cols decode, 16 warps, 8 stages", 16, kCols, 8, 0, persistent_gemv<16, 8, kCols>},
        {"f16, 16 warps, x from global", 16, kF16, 8, kSkipStaging | kGlobalX, persistent_gemv<16, 8, kF16>},
        {"cols, 16 warps, x from global", 16, kCols, 8, kSkipStaging | kGlobalX, persistent_gemv<16, 8, kCols>},
        {"cols, 24 warps, x from global", 24, kCols, 8, kSkipStaging | kGlobalX, persistent_gemv<24, 8, kCols>},
        {"cols, 31 warps, x from global", 31, kCols, 8, kSkipStaging | kGlobalX, persistent_gemv<31, 8, kCols>},
        {"cols, 16 warps, x global, no scales", 16, kCols, 8, kSkipStaging | kGlobalX | kSkipScales,
         persistent_gemv<16, 8, kCols>},
        {"cols mma only, 16 warps, x global", 16, kMmaOnly, 8, kSkipStaging | kGlobalX, persistent_gemv<16, 8, kMmaOnly>},
        {"cols decode only, 16 warps, x global", 16, kDecodeOnly, 8, kSkipStaging | kGlobalX,
         persistent_gemv<16, 8, kDecodeOnly>},
        {"int8, 16 warps, x from global", 16, kInt8, 8, kSkipStaging | kGlobalX, persistent_gemv<16, 8, kInt8>},
        {"int8, 8 warps, x from global", 8, kInt8, 8, kSkipStaging | kGlobalX, persistent_gemv<8, 8, kInt8>},
        {"cols decode, 2 groups of 8 warps, 8 stages", 16, kCols, 8, 0, persistent_gemv<16, 8, kCols, 2>},
        {"f16, 2 groups of 8 warps, x from global", 16, kF16, 8, kSkipStaging | kGlobalX, persistent_gemv<16, 8, kF16, 2>},
        {"cols, 2 groups of 8 warps, x from global", 16, kCols, 8, kSkipStaging | kGlobalX,
         persistent_gemv<16, 8, kCols, 2>},
        {"cols, 4 groups of 4 warps, x from global", 16, kCols, 8, kSkipStaging | kGlobalX,
         persistent_gemv<16, 8, kCols, 4>},
        {"cols mma only, 2 groups of 8 warps, x global", 16, kMmaOnly, 8, kSkipStaging | kGlobalX,
         persistent_gemv<16, 8, kMmaOnly, 2>},
        {"int8, 2 groups of 8 warps, x from global", 16, kInt8, 8, kSkipStaging | kGlobalX, persistent_gemv<16, 8, kInt8, 2>},
        {"int8, 4 groups of 4 warps, x from global", 16, kInt8, 8, kSkipStaging | kGlobalX, persistent_gemv<16, 8, kInt8, 4>},
        {"int8, 2 groups of 4 warps, x from global", 8, kInt8, 8, kSkipStaging | kGlobalX, persistent_gemv<8, 8, kInt8, 2>},
        {"int8, 3 groups of 8 warps, x from global", 24, kInt8, 8, kSkipStaging | kGlobalX, persistent_gemv<24, 8, kInt8, 3>},
        {"int8, 2 groups of 8 warps, 10 stages", 16, kInt8, 10, kSkipStaging | kGlobalX, persistent_gemv<16, 10, kInt8, 2>},
        {"int8, 16 warps, image in shared", 16, kInt8, 8, kSkipStaging | kGlobalX | kSharedImage,
         persistent_gemv<16, 8, kInt8>},
        {"int8, 2 groups of 8 warps, image in shared", 16, kInt8, 8, kSkipStaging | kGlobalX | kSharedImage,
         persistent_gemv<16, 8, kInt8, 2>},
        {"int8, 3 groups of 8 warps, image in shared", 24, kInt8, 8, kSkipStaging | kGlobalX | kSharedImage,
         persistent_gemv<24, 8, kInt8, 3>},
        {"int8, 4 groups of 4 warps, image in shared", 16, kInt8, 8, kSkipStaging | kGlobalX | kSharedImage,
         persistent_gemv<16, 8, kInt8, 4>},
        {"int8, 4 groups of 6 warps, image in shared", 24, kInt8, 8, kSkipStaging | kGlobalX | kSharedImage,
         persistent_gemv<24, 8, kInt8, 4>},
        {"int8, 2 groups of 8 warps, image restaged", 16, kInt8, 8,
         kSkipStaging | kGlobalX | kSharedImage | kRestageImage, persistent_gemv<16, 8, kInt8, 2>},
        {"int8, 2 groups of 8 warps, image in shared, 10 stages", 16, kInt8, 10, kSkipStaging | kGlobalX | kSharedImage,
         persistent_gemv<16, 10, kInt8, 2>},
        {"int8, 2 groups of 12 warps, image in shared", 24, kInt8, 8, kSkipStaging | kGlobalX | kSharedImage,
         persistent_gemv<24, 8, kInt8, 2>},
        {"int8, 2 groups of 8, image in shared, 16-unit items, 16 stages", 16, kInt8, 16,
         kSkipStaging | kGlobalX | kSharedImage, persistent_gemv<16, 16, kInt8, 2, 16>, 16},
        {"int8, 4 groups of 4, image in shared, 16-unit items, 16 stages", 16, kInt8, 16,
         kSkipStaging | kGlobalX | kSharedImage, persistent_gemv<16, 16, kInt8, 4, 16>, 16},
        {"int8, 2 groups of 8, image restaged, 16-unit items, 16 stages", 16, kInt8, 16,
         kSkipStaging | kGlobalX | kSharedImage | kRestageImage, persistent_gemv<16, 16, kInt8, 2, 16>, 16},
        {"int8, 4 groups of 4, image restaged, 16-unit items, 16 stages", 16, kInt8, 16,
         kSkipStaging | kGlobalX | kSharedImage | kRestageImage, persistent_gemv<16, 16, kInt8, 4, 16>, 16},
        {"ring only, 16-unit items, 16 stages, no staging", 8, kNone, 16, kSkipStaging, persistent_gemv<8, 16, kNone, 1, 16>, 16},
    };
    const FlowVariant flows[] = {
        {"ring only, fence.sc", 8, kNone, 8, 0, dataflow_gemv<8, 8, kNone, true>},
        {"ring only, fence.acq_rel", 8, kNone, 8, 0, dataflow_gemv<8, 8, kNone, false>},
        {"f16 decode, 16 warps, fence.sc", 16, kF16, 8, 0, dataflow_gemv<16, 8, kF16, true>},
        {"cols decode, 16 warps, fence.sc", 16, kCols, 8, 0, dataflow_gemv<16, 8, kCols, true>},
        {"cols decode, 16 warps, fence.acq_rel", 16, kCols, 8, 0, dataflow_gemv<16, 8, kCols, false>},
        {"cols mma only, 16 warps, fence.acq_rel", 16, kMmaOnly, 8, 0, dataflow_gemv<16, 8, kMmaOnly, false>},
        {"ring only, no fences", 8, kNone, 8, kNoFence, dataflow_gemv<8, 8, kNone, true>},
        {"ring only, no fences, no waits", 8, kNone, 8, kNoFence | kNoWait, dataflow_gemv<8, 8, kNone, true>},
        {"cols decode, 16 warps, no fences", 16, kCols, 8, kNoFence, dataflow_gemv<16, 8, kCols, true>},
    };
    for (const Variant &v : variants)
        CHECK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(v.smem())));
    for (const FlowVariant &v : flows)
        CHECK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, v.stages * stage_bytes(kChunkUnits)));
    auto run = [&](const Variant &v, const Matrix *ms, int n_mats, bool chained, bool dynamic) {
        CHECK(cudaMemsetAsync(outs, 0, out_floats * 4));
        CHECK(cudaMemsetAsync(arrived, 0, 4));
        CHECK(cudaMemsetAsync(work, 0, shapes.size() * 4));
        v.kernel<<<sms, (v.consumers + 1) * 32, v.smem()>>>(ms, n_mats, fixed, chained, dynamic, arrived, work, v.skip,
                                                            fixed_sum, fixed_image, fixed_runs);
        CHECK(cudaGetLastError());
    };
    auto run_flow = [&](const FlowVariant &v, const Matrix *ms, int n_mats, bool dynamic) {
        CHECK(cudaMemsetAsync(outs, 0, out_floats * 4));
        CHECK(cudaMemsetAsync(counts, 0, (all_chunks + all_tiles) * 4));
        CHECK(cudaMemsetAsync(work, 0, shapes.size() * 4));
        v.kernel<<<sms, (v.consumers + 1) * 32, v.stages * stage_bytes(kChunkUnits)>>>(ms, n_mats, dynamic, work, v.skip);
        CHECK(cudaGetLastError());
    };

    // Correctness: a chain of one layer and the head, against the reference. The barrier kernel
    // feeds down silu(gate) * up; the dataflow kernel feeds it the f16 of the first 11008 rows.
    std::vector<Matrix> chain;
    for (int i : {0, 1, 2, 3, static_cast<int>(shapes.size()) - 1}) chain.push_back(mats[i]);
    chain[4].prev = chain[3].out;  // the head follows this layer's down
    chain[4].xin = chain[3].xout;
    chain[4].xin_sum = chain[3].tsum;
    chain[4].in_ready = chain[3].ready;
    Matrix *d_chain;
    CHECK(cudaMalloc(&d_chain, chain.size() * sizeof(Matrix)));
    CHECK(cudaMemcpy(d_chain, chain.data(), chain.size() * sizeof(Matrix), cudaMemcpyHostToDevice));
    auto reference = [&](std::vector<Matrix> rm) {
        std::vector<std::vector<float>> refs;
        float *ref_out;
        CHECK(cudaMalloc(&ref_out, out_floats * 4));
        for (size_t i = 0, off = 0; i < rm.size(); off += rm[i].tiles * 16, ++i) {
            rm[i].out = ref_out + off;
            if (i > 0) rm[i].prev = rm[i - 1].out;
        }
        for (const Matrix &m : rm) {
            reference_input<<<64, 256>>>(m, fixed, ref_x);
            reference_gemv<<<(m.tiles * 16 + 127) / 128, 128>>>(m, ref_x);
            CHECK(cudaGetLastError());
            std::vector<float> h(m.tiles * 16);
            CHECK(cudaMemcpy(h.data(), m.out, h.size() * 4, cudaMemcpyDeviceToHost));
            refs.push_back(h);
        }
        CHECK(cudaFree(ref_out));
        return refs;
    };
    auto relative_error = [&](const Matrix &m, const std::vector<float> &ref) {
        std::vector<float> h(m.tiles * 16);
        CHECK(cudaMemcpy(h.data(), m.out, h.size() * 4, cudaMemcpyDeviceToHost));
        double num = 0, den = 0;
        for (size_t r = 0; r < h.size(); ++r) {
            num += (h[r] - ref[r]) * static_cast<double>(h[r] - ref[r]);
            den += ref[r] * static_cast<double>(ref[r]);
        }
        return std::sqrt(num / std::max(den, 1e-30));
    };
    auto print_errors = [&](const std::vector<std::vector<float>> &refs) {
        for (size_t i = 0; i < chain.size(); ++i) std::printf(" %.2e", relative_error(chain[i], refs[i]));
        std::printf("\n");
    };
    const auto refs = reference(chain);
    std::vector<Matrix> flow_chain = chain;
    flow_chain[3].input = kPrevious;
    const auto flow_refs = reference(flow_chain);
    std::printf("relative error against the reference (chain QKV, O, gate/up, down, head):\n");
    for (const Variant &v : variants)
        for (bool dynamic : {false, true}) {
            if (v.decode == kNone || v.decode > kCols || v.skip) continue;
            run(v, d_chain, 5, true, dynamic);
            CHECK(cudaDeviceSynchronize());
            std::printf("  barriers, %-32s %-8s", v.name, dynamic ? "dynamic" : "static");
            print_errors(refs);
        }
    for (const Variant &v : variants)  // int8 reads the fixed activation: the first matrix alone
        for (bool dynamic : {false, true}) {
            if (v.decode != kInt8) continue;
            run(v, d_mats, 1, false, dynamic);
            CHECK(cudaDeviceSynchronize());
            std::printf("  barriers, %-32s %-8s QKV alone, int8 activation:", v.name, dynamic ? "dynamic" : "static");
            std::printf(" %.2e\n", relative_error(chain[0], refs[0]));
        }
    for (const FlowVariant &v : flows)
        for (bool dynamic : {false, true}) {
            if (v.decode == kNone || v.decode > kCols || v.skip) continue;
            run_flow(v, d_chain, 5, dynamic);
            CHECK(cudaDeviceSynchronize());
            std::printf("  dataflow, %-32s %-8s", v.name, dynamic ? "dynamic" : "static");
            print_errors(flow_refs);
        }

    const double copy_bps = copy_bandwidth();
    std::printf("\n%d SMs, %zu matrices, %.2f GB of weights (codes + scales), copy bandwidth %.0f GB/s\n\n", sms,
                shapes.size(), weight_bytes / 1e9, copy_bps / 1e9);
    auto cell = [&](double ms) {
        const double bps = weight_bytes / (ms * 1e-3);
        std::printf(" %.3f | %.0f | %.0f%% |", ms, bps / 1e9, 100 * bps / copy_bps);
    };
    std::printf("Grid barriers:\n\n| consumers | work | independent ms | GB/s | %% of copy | chained ms | GB/s | %% of copy |\n"
                "|---|---|---|---|---|---|---|---|\n");
    for (const Variant &v : variants)
        for (bool dynamic : {false, true}) {
            std::printf("| %s | %s |", v.name, dynamic ? "dynamic" : "static");
            for (bool chained : {false, true})
                cell(median_ms([&] { run(v, d_mats, static_cast<int>(shapes.size()), chained, dynamic); }));
            std::printf("\n");
        }
    std::printf("\nDataflow (a counter per 128 inputs instead of barriers):\n\n| consumers | work | ms | GB/s | %% of copy |\n"
                "|---|---|---|---|---|\n");
    for (const FlowVariant &v : flows)
        for (bool dynamic : {false, true}) {
            std::printf("| %s | %s |", v.name, dynamic ? "dynamic" : "static");
            cell(median_ms([&] { run_flow(v, d_mats, static_cast<int>(shapes.size()), dynamic); }));
            std::printf("\n");
        }
    return 0;
}
