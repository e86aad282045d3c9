// bcq_gpu.cu — `bcq` tensors on the GPU: a LUT GEMM (ShiftAddLLM / LUT-GEMM) for decode, sign
// planes through tensor cores for 2-16 columns where exponents cover whole units, and an exact
// dequantizer to f16 for the prefill GEMM. Design, measurements and reasons: docs/BCQ.md "CUDA".
//
// Layout (bcq_gpu.cuh), repacked on the host at load: rows in tiles of 16 (RowMap's tiles),
// inputs in units of 128; planes[tile][unit][plane][row] is one uint4 holding the 128 sign bits
// of that row and plane (so a half-warp's 16 lanes read 256 contiguous bytes), and each such
// uint4 has its exponents, one byte per segment of gcd(g, 128) inputs, at the same index in a
// byte array. Row scales are f32.
//
// Decode kernel, y = W x for 1..16 columns:
//   block = one row tile x NC columns (grid.y covers the batch NC columns at a time), 4 warps.
//   Lane L of warp w owns row L % 16 and slot s = 2w + L / 16. A slab is 8 consecutive units
//   (1024 inputs); slot s takes unit 8·slab + s. Per slab:
//     1. each lane issues its q 16-byte plane loads and their exponent loads (all in flight
//        while the tables are built);
//     2. the block builds, in shared memory, the table of every 4 inputs (μ = 4) and column:
//        T[m] = Σ_b (bit b of m ? +x_b : −x_b), 16 f32 entries, as (±x0 ± x1) + (±x2 ± x3);
//     3. each lane looks up one entry per 4 inputs and plane (the nibble of its sign bits is the
//        index), sums a segment's look-ups in f32, scales the sum by 2^e with an integer add on
//        its exponent field (no multiply), and accumulates.
//   Then the 8 slots of a row are summed in a fixed order (deterministic results), multiplied by
//   the row scale once, and written to out[col * ldo + map(row)].
//   Bank conflicts: a half-warp reads one 16-entry table (16 consecutive words: conflict-free);
//   the two half-warps' slots are 16 words apart modulo 32 banks (the tables of a slot are padded
//   by 16 words), so a warp's look-up is one conflict-free shared-memory wavefront.
//
// No allocation and no synchronisation after load: apply and dequantize_f16 only launch kernels
// on the given stream, so they are captured in the decode CUDA graph.
#include "bcq_gpu.cuh"

#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "cuda_common.cuh"
#include "decode.cuh"
#include "errors.h"
#include "linear.h"
#include "lut_gemm_cpu.h"

namespace pumice {
namespace cuda {
namespace bcq_gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kSlots = 2 * kWarps;       // units per slab: one per half-warp
constexpr int kChunks = kUnit / 4;       // tables (of 4 inputs) per unit and column
constexpr int kMaxPlanes = bcq::kMaxBits;

// Floats between the tables of consecutive slots: 16 entries per chunk and column, plus 16 so
// that the two half-warps of a warp read opposite halves of the 32 banks.
template <int NC> __host__ __device__ constexpr int slot_stride() { return kChunks * NC * 16 + 16; }
template <int NC> constexpr size_t table_bytes() { return sizeof(float) * kSlots * slot_stride<NC>(); }

struct LutArgs {
    const uint4 *planes = nullptr;
    const uint8_t *exps = nullptr;
    const float *scales = nullptr;
    Layout layout;
    const __half *x = nullptr;
    int64_t ldx = 0;
    int n_cols = 0;
    float *out = nullptr;
    int64_t ldo = 0;
    RowMap map;
};

// s * 2^e by adding e to the exponent field: exact, one integer add. Only for a normal s whose
// result stays normal; zero, infinities and NaN (and anything out of range, which valid data
// never reaches: |sum| lies in [2^-24, 2^23] and e in [-64, 63]) take an exact multiply.
__device__ __forceinline__ float times_pow2(float s, int e) {
    const unsigned bits = __float_as_uint(s);
    const int field = static_cast<int>((bits >> 23) & 0xFFu);
    const int moved = field + e;
    if (field != 0 && field != 255 && moved > 0 && moved < 255)
        return __uint_as_float(bits + (static_cast<unsigned>(e) << 23));
    return s * __uint_as_float(static_cast<unsigned>(e + 127) << 23);
}

__device__ __forceinline__ uint32_t word_of(const uint4 &v, int m) {
    return m == 0 ? v.x : m == 1 ? v.y : m == 2 ? v.z : v.w;
}

// The SPU exponent bytes of one (tile, unit, plane, row), as little-endian words.
template <int SPU> struct ExpBytes {
    uint32_t w[(SPU + 3) / 4];
    __device__ __forceinline__ int get(int s) const {
        return static_cast<int>(static_cast<int8_t>(static_cast<uint8_t>(w[s / 4] >> (8 * (s % 4)))));
    }
};

template <int SPU> __device__ __forceinline__ ExpBytes<SPU> load_exps(const uint8_t *p) {
    ExpBytes<SPU> e;
    if constexpr (SPU == 1) {
        e.w[0] = __ldg(p);
    } else if constexpr (SPU == 2) {
        e.w[0] = __ldg(reinterpret_cast<const unsigned short *>(p));
    } else if constexpr (SPU == 4) {
        e.w[0] = __ldg(reinterpret_cast<const unsigned int *>(p));
    } else if constexpr (SPU == 8) {
        const uint2 v = __ldg(reinterpret_cast<const uint2 *>(p));
        e.w[0] = v.x;
        e.w[1] = v.y;
    } else {
        static_assert(SPU == 16, "segments per unit: 1, 2, 4, 8 or 16");
        const uint4 v = __ldg(reinterpret_cast<const uint4 *>(p));
        e.w[0] = v.x;
        e.w[1] = v.y;
        e.w[2] = v.z;
        e.w[3] = v.w;
    }
    return e;
}

// The tile's outputs: each the sum of the block's P partial results in a fixed order (results do
// not depend on timing) times the row scale, at out[col * ldo + map(n)] for columns col0..col0 + C.
template <int P, int C>
__device__ __forceinline__ void write_tile(const LutArgs &a, int64_t tile, int col0, const float (&red)[P][C][kTileRows]) {
    for (int i = threadIdx.x; i < C * kTileRows; i += kThreads) {
        const int c = i / kTileRows, r = i % kTileRows, col = col0 + c;
        const int64_t n = tile * kTileRows + r;
        if (col < a.n_cols && n < a.layout.n) {
            float y = 0.0f;
#pragma unroll
            for (int s = 0; s < P; ++s) y += red[s][c][r];
            a.out[col * a.ldo + a.map(n)] = y * a.scales[n];
        }
    }
}

template <int NC, int SPU>
__global__ void __launch_bounds__(kThreads) lut_gemm_kernel(const LutArgs a) {
    extern __shared__ float4 lut_smem[];
    float *table = reinterpret_cast<float *>(lut_smem);
    __shared__ float red[kSlots][NC][kTileRows];
    constexpr int kStride = slot_stride<NC>();
    constexpr int kChunksPerSeg = kChunks / SPU;

    const Layout &l = a.layout;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int row = lane % kTileRows, slot = 2 * warp + lane / kTileRows;
    const int64_t tile = blockIdx.x;
    const int col0 = static_cast<int>(blockIdx.y) * NC;
    const int64_t n_slabs = (l.units + kSlots - 1) / kSlots;

    float acc[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] = 0.0f;

    for (int64_t slab = 0; slab < n_slabs; ++slab) {
        const int64_t unit = slab * kSlots + slot;
        const bool active = unit < l.units;

        // 1. This lane's sign bits and exponents for the slab, loaded before the table build.
        uint4 bits[kMaxPlanes];
        ExpBytes<SPU> ex[kMaxPlanes];
#pragma unroll
        for (int p = 0; p < kMaxPlanes; ++p) {
            if (active && p < l.q) {
                const int64_t w = l.word(tile, unit, p, row);
                bits[p] = __ldg(a.planes + w);
                ex[p] = load_exps<SPU>(a.exps + w * SPU);
            } else {
                bits[p] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
                for (int i = 0; i < (SPU + 3) / 4; ++i) ex[p].w[i] = 0u;
            }
        }

        // 2. Tables of the slab: slot s, chunk j, column c at table[s * kStride + (j * NC + c) * 16].
        //    Columns past n_cols get zero tables (their results are not written).
        for (int t = tid; t < kSlots * kChunks * NC; t += kThreads) {
            const int c = t % NC, j = (t / NC) % kChunks, s = t / (NC * kChunks);
            const int64_t u = slab * kSlots + s;
            if (u >= l.units) continue;  // never looked up
            const int col = col0 + c;
            float x0 = 0.0f, x1 = 0.0f, x2 = 0.0f, x3 = 0.0f;
            if (col < a.n_cols) {
                const __half *xp = a.x + col * a.ldx + u * kUnit + 4 * j;
                x0 = __half2float(xp[0]);
                x1 = __half2float(xp[1]);
                x2 = __half2float(xp[2]);
                x3 = __half2float(xp[3]);
            }
            // Entry m = 4h + i: pair sum i of (x0, x1) plus pair sum h of (x2, x3).
            const float p01[4] = {-x0 - x1, x0 - x1, x1 - x0, x0 + x1};
            const float p23[4] = {-x2 - x3, x2 - x3, x3 - x2, x2 + x3};
            float4 *dst = reinterpret_cast<float4 *>(table + s * kStride + (j * NC + c) * 16);
#pragma unroll
            for (int h = 0; h < 4; ++h)
                dst[h] = make_float4(p01[0] + p23[h], p01[1] + p23[h], p01[2] + p23[h], p01[3] + p23[h]);
        }
        __syncthreads();

        // 3. Look-ups: one per 4 inputs, plane and column; 2^e per segment by exponent add.
        if (active) {
            const float *tb = table + slot * kStride;
#pragma unroll
            for (int p = 0; p < kMaxPlanes; ++p) {
                if (p >= l.q) continue;
#pragma unroll
                for (int s = 0; s < SPU; ++s) {
                    float sum[NC];
#pragma unroll
                    for (int c = 0; c < NC; ++c) sum[c] = 0.0f;
#pragma unroll
                    for (int jj = 0; jj < kChunksPerSeg; ++jj) {
                        const int j = s * kChunksPerSeg + jj;
                        const uint32_t nib = (word_of(bits[p], j / 8) >> (4 * (j % 8))) & 15u;
#pragma unroll
                        for (int c = 0; c < NC; ++c) sum[c] += tb[(j * NC + c) * 16 + nib];
                    }
                    const int e = ex[p].get(s);
#pragma unroll
                    for (int c = 0; c < NC; ++c) acc[c] += times_pow2(sum[c], e);
                }
            }
        }
        __syncthreads();  // the next slab overwrites the tables
    }

#pragma unroll
    for (int c = 0; c < NC; ++c) red[slot][c][row] = acc[c];
    __syncthreads();
    write_tile(a, tile, col0, red);
}

// Two f16 signs from bits j and j + 16 of a plane word (bit set: +1, clear: -1), the low half
// from bit j: one shift puts both bits at the halves' sign positions.
__device__ __forceinline__ uint32_t plus_minus_one(uint32_t word, int j) {
    return ((word << (15 - j)) & 0x80008000u) ^ 0xBC00BC00u;
}

// Tensor cores for 2-16 columns where an exponent covers whole units (g a multiple of 128): each
// plane is an mma with its +-1 signs as A (exact in f16) over the unit, and its f32 sums are
// scaled by the row's 2^e and accumulated, as the LUT kernel scales its look-ups.
// Block: one row tile x NT * 8 columns, 4 warps splitting the units. Lane (g = lane / 4,
// t = lane % 4) feeds rows g and g + 8 and owns the unit's inputs 32t..32t + 31 (word t of each
// row's plane). In k-tile i its A pairs are inputs (2i, 2i + 16) and (2i + 1, 2i + 17) of that
// run, and its B fragments the same inputs, gathered from the run's activations.
template <int NT>
__global__ void __launch_bounds__(kThreads) bcq_mma_kernel(const LutArgs a) {
    __shared__ float red[kWarps][NT * 8][kTileRows];
    const Layout &l = a.layout;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int64_t tile = blockIdx.x;
    const int col0 = static_cast<int>(blockIdx.y) * NT * 8;
    const uint32_t *plane_words = reinterpret_cast<const uint32_t *>(a.planes);
    const int8_t *exps = reinterpret_cast<const int8_t *>(a.exps);

    const __half *xrow[NT];
    bool xvalid[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int n = col0 + nt * 8 + g;
        xvalid[nt] = n < a.n_cols;
        xrow[nt] = a.x + static_cast<int64_t>(xvalid[nt] ? n : 0) * a.ldx + 32 * t;
    }
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;

    for (int64_t u = warp; u < l.units; u += kWarps) {
        uint32_t signs_g[kMaxPlanes], signs_g8[kMaxPlanes];
        int e_g[kMaxPlanes], e_g8[kMaxPlanes];
#pragma unroll
        for (int p = 0; p < kMaxPlanes; ++p) {
            if (p < l.q) {
                const int64_t w0 = l.word(tile, u, p, g), w8 = l.word(tile, u, p, g + 8);
                signs_g[p] = __ldg(plane_words + w0 * 4 + t);
                signs_g8[p] = __ldg(plane_words + w8 * 4 + t);
                e_g[p] = __ldg(exps + w0);
                e_g8[p] = __ldg(exps + w8);
            }
        }
        uint32_t b[8][NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            uint32_t r[16];
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                const uint4 v = xvalid[nt] ? *reinterpret_cast<const uint4 *>(xrow[nt] + u * kUnit + 8 * m)
                                           : make_uint4(0u, 0u, 0u, 0u);
                r[4 * m] = v.x;
                r[4 * m + 1] = v.y;
                r[4 * m + 2] = v.z;
                r[4 * m + 3] = v.w;
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                b[i][nt][0] = __byte_perm(r[i], r[i + 8], 0x5410);  // inputs 2i, 2i + 16
                b[i][nt][1] = __byte_perm(r[i], r[i + 8], 0x7632);  // inputs 2i + 1, 2i + 17
            }
        }
#pragma unroll
        for (int p = 0; p < kMaxPlanes; ++p) {
            if (p >= l.q) break;
            float c[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) c[nt][e] = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const uint32_t A[4] = {plus_minus_one(signs_g[p], 2 * i), plus_minus_one(signs_g8[p], 2 * i),
                                       plus_minus_one(signs_g[p], 2 * i + 1), plus_minus_one(signs_g8[p], 2 * i + 1)};
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_16816(c[nt], A, b[i][nt]);
            }
            // 2^e as a float: exponents lie in [-64, 63].
            const float s_g = __uint_as_float(static_cast<unsigned>(e_g[p] + 127) << 23);
            const float s_g8 = __uint_as_float(static_cast<unsigned>(e_g8[p] + 127) << 23);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                acc[nt][0] += c[nt][0] * s_g;
                acc[nt][1] += c[nt][1] * s_g;
                acc[nt][2] += c[nt][2] * s_g8;
                acc[nt][3] += c[nt][3] * s_g8;
            }
        }
    }

#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        red[warp][nt * 8 + 2 * t][g] = acc[nt][0];
        red[warp][nt * 8 + 2 * t + 1][g] = acc[nt][1];
        red[warp][nt * 8 + 2 * t][g + 8] = acc[nt][2];
        red[warp][nt * 8 + 2 * t + 1][g + 8] = acc[nt][3];
    }
    __syncthreads();
    write_tile(a, tile, col0, red);
}

// The tensor-core path where it applies: 2-16 columns (PUMICE_CUDA_BCQ_MMA=0: never, =all: 1-16,
// for comparisons), one exponent per unit, activations 16-byte aligned.
bool launch_mma(const LutArgs &a, cudaStream_t stream) {
    const int min_cols = env_is("PUMICE_CUDA_BCQ_MMA", "0") ? 17 : env_is("PUMICE_CUDA_BCQ_MMA", "all") ? 1 : 2;
    if (a.n_cols < min_cols || a.layout.spu != 1) return false;
    if (a.ldx % 8 != 0 || reinterpret_cast<uintptr_t>(a.x) % 16 != 0) return false;
    const int nt = a.n_cols > 8 ? 2 : 1;
    const dim3 grid(static_cast<unsigned>(a.layout.tiles), static_cast<unsigned>((a.n_cols + 8 * nt - 1) / (8 * nt)));
    if (nt == 2) bcq_mma_kernel<2><<<grid, kThreads, 0, stream>>>(a);
    else bcq_mma_kernel<1><<<grid, kThreads, 0, stream>>>(a);
    return true;
}

template <int NC, int SPU> void launch_lut(const LutArgs &a, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(a.layout.tiles), static_cast<unsigned>((a.n_cols + NC - 1) / NC));
    lut_gemm_kernel<NC, SPU><<<grid, kThreads, table_bytes<NC>(), stream>>>(a);
}

template <int SPU> void launch_lut_spu(const LutArgs &a, cudaStream_t stream) {
    // One column alone: half the table memory and no idle column; otherwise pairs of columns
    // share each nibble's extraction (and each weight load).
    if (a.n_cols == 1) launch_lut<1, SPU>(a, stream);
    else launch_lut<2, SPU>(a, stream);
}

// W to f16, 8 inputs per thread: out[map(n) * ldo + k], zero for k >= in_features. Computes each
// weight exactly as the CPU kind does (rs · 2^e summed over planes in order, in f32).
__global__ void dequantize_f16_kernel(const uint8_t *planes, const int8_t *exps, const float *scales,
                                      const Layout l, __half *out, int64_t ldo, const RowMap map, bool vec) {
    const int64_t bytes_per_row = (ldo + 7) / 8;
    const int64_t total = l.n * bytes_per_row;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t n = i / bytes_per_row, jb = i % bytes_per_row;
        float v[8];
#pragma unroll
        for (int b = 0; b < 8; ++b) v[b] = 0.0f;
        if (8 * jb < l.k) {
            const int64_t tile = n / kTileRows, unit = jb / kUnitBytes;
            const int row = static_cast<int>(n % kTileRows), byte = static_cast<int>(jb % kUnitBytes);
            const int seg = byte * 8 / l.seg;
            const float rs = scales[n];
            for (int p = 0; p < l.q; ++p) {
                const int64_t w = l.word(tile, unit, p, row);
                const unsigned signs = planes[w * kUnitBytes + byte];
                const int e = exps[w * l.spu + seg];
                const float alpha = rs * __uint_as_float(static_cast<unsigned>(e + 127) << 23);
#pragma unroll
                for (int b = 0; b < 8; ++b) v[b] += ((signs >> b) & 1u) ? alpha : -alpha;
            }
#pragma unroll
            for (int b = 0; b < 8; ++b)
                if (8 * jb + b >= l.k) v[b] = 0.0f;
        }
        __half *dst = out + map(n) * ldo + 8 * jb;
        if (vec) {
            uint4 packed;
            const __half2 h0 = __floats2half2_rn(v[0], v[1]), h1 = __floats2half2_rn(v[2], v[3]);
            const __half2 h2 = __floats2half2_rn(v[4], v[5]), h3 = __floats2half2_rn(v[6], v[7]);
            memcpy(&packed.x, &h0, 4);
            memcpy(&packed.y, &h1, 4);
            memcpy(&packed.z, &h2, 4);
            memcpy(&packed.w, &h3, 4);
            *reinterpret_cast<uint4 *>(dst) = packed;
        } else {
#pragma unroll
            for (int b = 0; b < 8; ++b)
                if (8 * jb + b < ldo) dst[b] = __float2half_rn(v[b]);
        }
    }
}

template <class T> DeviceBuffer upload(const std::vector<T> &v, const char *what, cudaStream_t stream) {
    DeviceBuffer buf(v.size() * sizeof(T), what);
    PUMICE_CUDA_CHECK(cudaMemcpyAsync(buf.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, stream));
    PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream));  // the host vectors die on return
    return buf;
}

float half_bits_to_float(uint16_t h) {
    __half_raw raw;
    raw.x = h;
    return __half2float(__half(raw));
}

class BcqDeviceLinear final : public DeviceLinear {
public:
    BcqDeviceLinear(const TensorView &view, cudaStream_t stream) {
        const std::string where = "tensor '" + view.name() + "'" +
                                  (view.prefix.empty() ? "" : " (sub-tensor '" + view.prefix + "')");
        if (view.shape.size() != 2)
            throw FormatError(where + ": a bcq tensor must be 2-D, it has " + std::to_string(view.shape.size()) +
                              " dimensions");
        if (view.shape[0] <= 0 || view.shape[1] <= 0)
            throw FormatError(where + ": bcq tensor of empty shape [" + std::to_string(view.shape[0]) + ", " +
                              std::to_string(view.shape[1]) + "]");
        // The CPU kind's checks, with its messages: parameters, parts (dtype and shape),
        // exponents in [-64, 63], finite row scales.
        make_linear(view, "bcq");

        const int64_t n = view.shape[0], k = view.shape[1];
        const int q = static_cast<int>(view.int_param("bits"));
        const int64_t g = view.int_param("group_size");
        l_ = make_layout(n, k, q, g);
        const int64_t file_tiles = ceil_div(n, kFileTileRows), kb = ceil_div(k, 8), groups = ceil_div(k, g);
        const Part &planes = view.part("planes", DType::U8, {file_tiles, kb, q, kFileTileRows});
        const Part &exps = view.part("exponents", DType::I8, {file_tiles, groups, q, kFileTileRows});
        const Part &scales = view.part("row_scales", DType::F16, {n});

        std::vector<float> rs(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) {
            uint16_t h;
            std::memcpy(&h, scales.data + 2 * i, 2);
            rs[static_cast<size_t>(i)] = half_bits_to_float(h);
        }
        std::vector<uint8_t> dev_planes;
        std::vector<int8_t> dev_exps;
        std::vector<float> dev_scales;
        repack_host(l_, planes.data, reinterpret_cast<const int8_t *>(exps.data), rs.data(), &dev_planes, &dev_exps,
                    &dev_scales);
        planes_ = upload(dev_planes, "bcq planes", stream);
        exps_ = upload(dev_exps, "bcq exponents", stream);
        scales_ = upload(dev_scales, "bcq row scales", stream);
    }

    int64_t out_features() const override { return l_.n; }
    int64_t in_features() const override { return l_.k; }
    int64_t bytes() const override {
        return static_cast<int64_t>(planes_.size() + exps_.size() + scales_.size());
    }

    void apply(const __half *x, int64_t ldx, int n_cols, float *out, int64_t ldo, const RowMap &map,
               cudaStream_t stream) const override {
        if (n_cols <= 0) return;
        if (ldx < l_.units * kUnit)
            throw Error(PUMICE_ERR_INTERNAL, "bcq linear: input rows of " + std::to_string(ldx) +
                                                 " halves are shorter than the padded in_features " +
                                                 std::to_string(l_.units * kUnit));
        LutArgs a;
        a.planes = planes_.as<uint4>();
        a.exps = exps_.as<uint8_t>();
        a.scales = scales_.as<float>();
        a.layout = l_;
        a.x = x;
        a.ldx = ldx;
        a.n_cols = n_cols;
        a.out = out;
        a.ldo = ldo;
        a.map = map;
        if (launch_mma(a, stream)) {
            PUMICE_CUDA_CHECK_LAUNCH("bcq mma gemm");
            return;
        }
        switch (l_.spu) {
            case 1: launch_lut_spu<1>(a, stream); break;
            case 2: launch_lut_spu<2>(a, stream); break;
            case 4: launch_lut_spu<4>(a, stream); break;
            case 8: launch_lut_spu<8>(a, stream); break;
            case 16: launch_lut_spu<16>(a, stream); break;
            default: throw Error(PUMICE_ERR_INTERNAL, "bcq linear: bad segment count");
        }
        PUMICE_CUDA_CHECK_LAUNCH("bcq lut gemm");
    }

    void dequantize_f16(__half *out, int64_t ldo, const RowMap &map, void *, cudaStream_t stream) const override {
        if (ldo < l_.k)
            throw Error(PUMICE_ERR_INTERNAL, "bcq linear: dequantize_f16 output rows shorter than in_features");
        const bool vec = ldo % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
        const int64_t total = l_.n * ceil_div(ldo, 8);
        const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, 256), 1 << 16));
        dequantize_f16_kernel<<<blocks, 256, 0, stream>>>(planes_.as<uint8_t>(), exps_.as<int8_t>(),
                                                          scales_.as<float>(), l_, out, ldo, map, vec);
        PUMICE_CUDA_CHECK_LAUNCH("bcq dequantize_f16");
    }

private:
    Layout l_;
    DeviceBuffer planes_, exps_, scales_;
};

}  // namespace

std::unique_ptr<DeviceLinear> make_bcq_device_linear_view(const TensorView &view, cudaStream_t stream) {
    return std::make_unique<BcqDeviceLinear>(view, stream);
}

}  // namespace bcq_gpu

std::unique_ptr<DeviceLinear> make_bcq_device_linear(const TensorEntry &entry, cudaStream_t stream) {
    const TensorView view{&entry, "", &entry.params, entry.shape};
    return bcq_gpu::make_bcq_device_linear_view(view, stream);
}

}  // namespace cuda
}  // namespace pumice
