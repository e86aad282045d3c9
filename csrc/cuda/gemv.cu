// gemv.cu — the decode workhorse: y = W x for 1..16 columns, dequantizing on the fly into
// tensor-core fragments, with the layer's next step fused into the epilogue.
//
// Grid: one block per group of 1-2 row tiles (16 rows each); its 8 or 4 warps split the input
// dimension, each streaming whole 512-byte units (16 B per lane, up to four units in flight)
// and issuing one m16n8k16 mma per k-tile and per 8 columns. Partial sums meet in shared
// memory, then the epilogue writes the result (f32, f16, residual add, SwiGLU, or RoPE + KV
// cache). Activations are read straight from global memory: they are small and stay in L2.
#include <cuda_fp16.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "async_copy.cuh"
#include "cuda_common.cuh"
#include "decode.cuh"
#include "kernels.cuh"

namespace pumice {
namespace cuda {
namespace {

// Warps per block unless the call says (GemvCall::warps): 8 for single-tile blocks (more loads
// in flight per output), 4 when a block holds several tiles (its registers would otherwise allow
// a single block per SM).
int default_warps(int tiles_per_block) { return tiles_per_block == 1 ? 8 : 4; }


__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Consumer side of the fused RMSNorm: scale[c] = rsqrt(mean of squares) of columns c0 + c,
// one warp per column, in a fixed order (the result does not depend on timing).
__device__ void norm_scales(const Epilogue &e, int c0, int n_cols, float *scale) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
    for (int c = warp; c < n_cols; c += n_warps) {
        float s = 0.f;
        if (e.norm_partials) {
            const float *p = e.norm_partials + (c0 + c) * e.norm_ld;
            for (int j = lane; j < e.n_norm_partials; j += 32) s += p[j];
        }
        s = warp_sum(s);
        if (lane == 0)
            scale[c] = e.norm_partials ? rsqrtf(s / static_cast<float>(e.norm_hidden) + e.norm_eps) / kNormPrescale : 1.f;
    }
}

// The epilogue's global reads, issued by the GEMV long before its epilogue runs, as
// asynchronous copies into shared memory (cp.async, async_copy.cuh: no registers held across
// the main loop, where the GEMV has none to spare). The residual add's rows come from the
// previous kernel, so they are requested right after pdl_wait; the next norm's weights never
// change and go first.

// What thread (i, col) of the epilogue reads for rows i and i+8 of each tile, staged.
template <int R> struct ResidualReads {
    float resid[R][2];
    float gain[R][2];
};

// Rows i and i+8 of each of the block's tiles from src (indexed by logical row) into dst.
template <int R>
__device__ void request_rows(const float *src, int64_t n_rows, int64_t group, int i, float (&dst)[R][2]) {
#pragma unroll
    for (int t = 0; t < R; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t lrow = (group * R + t) * 16 + i + 8 * h;
            if (lrow < n_rows) copy_async_4(&dst[t][h], src + lrow);
        }
}

// Applies the epilogue for pair index i (rows i and i+8 of each tile) of one column.
// value(t, row) is the finished dot product of tile t (of the block's group) and that row;
// pre, when given, holds the residual add's reads (ResidualReads).
template <int R, class Value>
__device__ void epilogue_pair(const Epilogue &e, int64_t group, int i, int col, Value value,
                              const ResidualReads<R> *pre = nullptr) {
    switch (e.mode) {
        case EPI_SWIGLU: {  // tiles 2p and 2p + 1 are gate and up tiles of output tile `pair`
#pragma unroll
            for (int p = 0; p < R / 2; ++p) {
                const int64_t pair = group * (R / 2) + p;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = i + 8 * h;
                    const int64_t out_row = pair * 16 + row;
                    if (out_row >= e.n_rows) continue;
                    float g = value(2 * p, row), u = value(2 * p + 1, row);
                    if (e.bias) { g += e.bias[pair * 32 + row]; u += e.bias[pair * 32 + 16 + row]; }
                    e.out_h[col * e.ldo + out_row] = __float2half(silu(g) * u);
                }
            }
            return;
        }
        case EPI_QKV: {
            const StepColumn c = e.cols[col];
            const int D = e.head_dim;
#pragma unroll
            for (int t = 0; t < R; ++t) {
                const int64_t base = (group * R + t) * 16;
                float lo = value(t, i), hi = value(t, i + 8);
                if (e.bias) { lo += e.bias[base + i]; hi += e.bias[base + i + 8]; }
                if (base < e.q_rows + e.kv_rows) {
                    const bool is_q = base < e.q_rows;
                    const int64_t rel = is_q ? base : base - e.q_rows;
                    const int head = static_cast<int>(rel / D);
                    const int j = static_cast<int>((rel % D) / 16);
                    const int d_lo = 8 * j + i, d_hi = d_lo + D / 2;
                    // The angle in float like the reference; its cosine in double, so large
                    // positions keep their accuracy (fast-math sincosf would not).
                    const float angle = static_cast<float>(c.pos) * e.inv_freq[d_lo];
                    double sn, cs;
                    sincos(static_cast<double>(angle), &sn, &cs);
                    const float cf = static_cast<float>(cs), sf = static_cast<float>(sn);
                    const float out_lo = lo * cf - hi * sf, out_hi = hi * cf + lo * sf;
                    if (is_q) {
                        __half *q = e.out_h + col * e.ldo + static_cast<int64_t>(head) * D;
                        q[d_lo] = __float2half(out_lo);
                        q[d_hi] = __float2half(out_hi);
                    } else {
                        __half *k = c.cache + ((static_cast<int64_t>(e.layer) * 2 * e.n_kv_heads + head) *
                                                   c.n_ctx + c.pos) * D;
                        k[d_lo] = __float2half(out_lo);
                        k[d_hi] = __float2half(out_hi);
                    }
                } else {
                    const int64_t rel = base - e.q_rows - e.kv_rows;
                    const int head = static_cast<int>(rel / D);
                    const int d = static_cast<int>(rel % D) + i;
                    __half *v = c.cache + (((static_cast<int64_t>(e.layer) * 2 + 1) * e.n_kv_heads + head) *
                                               c.n_ctx + c.pos) * D;
                    v[d] = __float2half(lo);
                    v[d + 8] = __float2half(hi);
                }
            }
            return;
        }
        default: {
            float ss = 0.f;  // fused RMSNorm: squares of this thread's new residual rows
#pragma unroll
            for (int t = 0; t < R; ++t) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = i + 8 * h;
                    const int64_t lrow = (group * R + t) * 16 + row;
                    if (lrow >= e.n_rows) continue;
                    float v = value(t, row);
                    if (e.bias) v += e.bias[lrow];
                    if (e.mode == EPI_F32) {
                        e.out_f32[col * e.ldo + source_row(lrow, e.perm_d)] = v;
                    } else if (e.mode == EPI_F32_TILES) {
                        e.out_f32[col * e.ldo + (e.out_tile_base + (group * R + t) * e.out_tile_stride) * 16 + row] = v;
                    } else if (e.mode == EPI_F16) {
                        e.out_h[col * e.ldo + lrow] = __float2half(v);
                    } else {
                        float &r = e.out_f32[col * e.ldo + lrow];
                        const float updated = (pre ? pre->resid[t][h] : r) + v;
                        r = updated;
                        if (e.norm_out) {
                            const float gain = pre ? pre->gain[t][h] : e.norm_weight[lrow];
                            e.norm_out[col * e.norm_ldo + lrow] = __float2half(updated * gain * kNormPrescale);
                            ss += updated * updated;
                        }
                    }
                }
            }
            if (e.norm_partials_out) {
                // The 8 threads of a column are consecutive lanes; one of them writes the block's sum.
                const unsigned mask = 0xFFu << (threadIdx.x % 32 / 8 * 8);
                ss += __shfl_xor_sync(mask, ss, 4);
                ss += __shfl_xor_sync(mask, ss, 2);
                ss += __shfl_xor_sync(mask, ss, 1);
                // One partial per tile whatever the block shape: the block's sum in its first
                // tile's slot, zeros in the others.
                if (i == 0)
#pragma unroll
                    for (int t = 0; t < R; ++t) e.norm_partials_out[col * e.norm_ld + group * R + t] = t == 0 ? ss : 0.f;
            }
            return;
        }
    }
}

// One-tile blocks are held to two per SM (the early residual reads would otherwise push their
// registers past 128 and leave one), and so are three-tile blocks, whose grid is sized for two
// per SM (3-bit codes would take 130 registers); other shapes keep the compiler's choice (0: no
// minimum — an explicit 1 measured slower, with 6-14 more registers).
template <int BITS, int R, int NT, int W>
__global__ void __launch_bounds__(W * 32, (R == 1 && NT == 1) || R == 3 ? 2 : 0) gemv_kernel(const GemvCall call) {
    constexpr int kWarps = W;
    constexpr int KT = unit_ktiles(BITS);
    constexpr int KU = unit_k(BITS);
    __shared__ float red[kWarps][R][16][NT * 8];
    __shared__ float scale[NT * 8];
    pdl_launch_dependents();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t group = blockIdx.x;
    const WeightView &w = call.w;
    const int c0 = 2 * (lane % 4), bn = lane / 4;
    const int n_cols = call.batch < NT * 8 ? call.batch : NT * 8;

    int64_t stored[R];
#pragma unroll
    for (int t = 0; t < R; ++t) stored[t] = call.tile_base + (group * R + t) * call.tile_stride;

    // The residual add's reads go out early (O and down: one-tile blocks, or at 9-16 columns
    // two-tile blocks of 16 warps), so that their L2
    // round trip overlaps the first pass instead of following the last (O 7.5 -> 7.0 us, down
    // 14.0 -> 12.9 us at Llama-2-7B rtn2 batch 1; docs/CUDA.md).
    constexpr bool kEarlyResidual = R == 1 || W == 16;
    __shared__ ResidualReads<R> staged_resid[kEarlyResidual ? NT * 8 : 1][8];
    const bool early_residual = kEarlyResidual && call.early_reads && call.epi.mode == EPI_ADD &&
                                static_cast<int>(threadIdx.x / 8) < n_cols;
    auto request_residual_rows = [&] {
        if constexpr (kEarlyResidual)
            if (early_residual)
                request_rows<R>(call.epi.out_f32 + (threadIdx.x / 8) * call.epi.ldo, call.epi.n_rows, group,
                                threadIdx.x % 8, staged_resid[threadIdx.x / 8][threadIdx.x % 8].resid);
    };
    if constexpr (kEarlyResidual)
        if (early_residual && call.epi.norm_out)
            request_rows<R>(call.epi.norm_weight, call.epi.n_rows, group, threadIdx.x % 8,
                            staged_resid[threadIdx.x / 8][threadIdx.x % 8].gain);

    // Activation rows this lane feeds into B fragments (column bn of each 8-column tile).
    const __half *xrow[NT];
    bool xvalid[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int n = nt * 8 + bn;
        xvalid[nt] = n < n_cols;
        xrow[nt] = call.x + static_cast<int64_t>(xvalid[nt] ? n : 0) * call.ldx + (lane % 4) * (KU / 4);
    }

    // Several accumulators per output fragment: consecutive mmas do not wait on each other.
    constexpr int NACC = R * NT == 1 ? 4 : R >= 4 ? 1 : 2;
    float acc[NACC][R][NT][4];
#pragma unroll
    for (int c = 0; c < NACC; ++c)
#pragma unroll
        for (int t = 0; t < R; ++t)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[c][t][nt][e] = 0.f;

    const int64_t units = w.units;
    // Units in flight per warp: every load of a pass (codes, scales, activations) is issued
    // before the first is used, so small matrices (a few units per warp) are not latency-bound.
    // Three for 3-bit one-tile blocks: four, with the second code plane, spilled at the
    // two-blocks-per-SM register cap.
    constexpr int U = NT == 1 ? (BITS == 3 && R == 1 ? 3 : 4) : R >= 3 || W == 16 ? 1 : 2;
    bool waited = false;
    for (int64_t u0 = warp; u0 < units; u0 += U * kWarps) {
        uint4 q[U][R];
        uint2 q1[U][R];
        uint2 sm[U][R];
        uint2 xs[U][NT][KT];
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int64_t u = u0 + j * kWarps;
            if (u >= units) break;
#pragma unroll
            for (int t = 0; t < R; ++t) {
                const int64_t slot = (stored[t] * units + u) * 32 + lane;
                q[j][t] = load_stream(w.codes + slot);
                if constexpr (BITS == 3) q1[j][t] = load_stream(w.plane1 + slot);
                else q1[j][t] = make_uint2(0, 0);
            }
            // One quantization group per lane and unit.
            if constexpr (BITS != 16) {
                const int grp = static_cast<int>(u * KU + (lane % 4) * (KU / 4)) / w.group_size;
#pragma unroll
                for (int t = 0; t < R; ++t) sm[j][t] = w.scale_min[(stored[t] * w.groups + grp) * 8 + bn];
            } else {
#pragma unroll
                for (int t = 0; t < R; ++t) sm[j][t] = make_uint2(0, 0);
            }
        }
        // The first pass's weights are on their way before pdl_wait: no kernel writes them.
        // Activations come from the previous kernel.
        if (!waited) {
            pdl_wait();
            request_residual_rows();
            waited = true;
        }
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int64_t u = u0 + j * kWarps;
            if (u >= units) break;
            // The lane's activations for this unit: KU/4 consecutive inputs, 8 bytes per k-tile.
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const __half *xp = xrow[nt] + u * KU;
                if constexpr (KT % 2 == 0) {
#pragma unroll
                    for (int i2 = 0; i2 < KT / 2; ++i2) {
                        const uint4 v = xvalid[nt] ? *reinterpret_cast<const uint4 *>(xp + 8 * i2) : make_uint4(0, 0, 0, 0);
                        xs[j][nt][2 * i2] = make_uint2(v.x, v.y);
                        xs[j][nt][2 * i2 + 1] = make_uint2(v.z, v.w);
                    }
                } else {
                    xs[j][nt][0] = xvalid[nt] ? *reinterpret_cast<const uint2 *>(xp) : make_uint2(0, 0);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < U; ++j) {
            if (u0 + j * kWarps >= units) break;
#pragma unroll
            for (int t = 0; t < R; ++t) {
                const UnitDecoder<BITS> dec(q[j][t], q1[j][t], sm[j][t]);
#pragma unroll
                for (int kt = 0; kt < KT; ++kt) {
                    uint32_t a[4];
                    dec.ktile(kt, a);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const uint32_t b[2] = {xs[j][nt][kt].x, xs[j][nt][kt].y};
                        mma_16816(acc[(j * KT + kt) % NACC][t][nt], a, b);
                    }
                }
            }
        }
    }
    if (!waited) {  // a warp without units still writes through the epilogue
        pdl_wait();
        request_residual_rows();
    }
    if (call.epi.norm_partials) norm_scales(call.epi, 0, n_cols, scale);
#pragma unroll
    for (int c = 1; c < NACC; ++c)
#pragma unroll
        for (int t = 0; t < R; ++t)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[0][t][nt][e] += acc[c][t][nt][e];
#pragma unroll
    for (int t = 0; t < R; ++t)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            red[warp][t][bn][nt * 8 + c0] = acc[0][t][nt][0];
            red[warp][t][bn][nt * 8 + c0 + 1] = acc[0][t][nt][1];
            red[warp][t][bn + 8][nt * 8 + c0] = acc[0][t][nt][2];
            red[warp][t][bn + 8][nt * 8 + c0 + 1] = acc[0][t][nt][3];
        }
    __syncthreads();

    const int i = threadIdx.x % 8, col = threadIdx.x / 8;
    if (col >= n_cols) return;
    const float sc = call.epi.norm_partials ? scale[col] : 1.f;
    auto value = [&](int t, int row) {
        float s = 0.f;
#pragma unroll
        for (int wi = 0; wi < kWarps; ++wi) s += red[wi][t][row][col];
        return s * sc;
    };
    if constexpr (kEarlyResidual) {
        if (early_residual) {
            wait_async_copies();
            epilogue_pair<R>(call.epi, group, i, col, value, &staged_resid[col][i]);
            return;
        }
    }
    epilogue_pair<R>(call.epi, group, i, col, value);
}

template <int R>
__global__ void epilogue_kernel(const Epilogue epi, const float *in, int64_t ld_in, int n_cols) {
    __shared__ float scale[16];
    pdl_launch_dependents();
    pdl_wait();
    const int64_t group = blockIdx.x;
    const int i = threadIdx.x % 8;
    const int c0 = blockIdx.y * 16;
    if (epi.norm_partials) {
        norm_scales(epi, c0, n_cols - c0 < 16 ? n_cols - c0 : 16, scale);
        __syncthreads();
    }
    const int col = c0 + threadIdx.x / 8;
    if (col >= n_cols) return;
    const float sc = epi.norm_partials ? scale[col - c0] : 1.f;
    const float *row_in = in + col * ld_in + group * R * 16;
    auto value = [&](int t, int row) { return row_in[t * 16 + row] * sc; };
    epilogue_pair<R>(epi, group, i, col, value);
}

template <int BITS>
__global__ void dequantize_f16_kernel(const WeightView w, __half *out, int64_t ldo, int64_t tile_base,
                                      int64_t tile_stride) {
    constexpr int KT = unit_ktiles(BITS);
    constexpr int KU = unit_k(BITS);
    const int lane = threadIdx.x % 32;
    const int64_t u = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    const int64_t tile = blockIdx.y;
    if (u >= w.units) return;
    const int64_t slot = (tile * w.units + u) * 32 + lane;
    const uint4 q = w.codes[slot];
    const uint2 q1 = BITS == 3 ? w.plane1[slot] : make_uint2(0, 0);
    uint2 sm = make_uint2(0, 0);
    if constexpr (BITS != 16)
        sm = w.scale_min[(tile * w.groups + static_cast<int>(u * KU + (lane % 4) * (KU / 4)) / w.group_size) * 8 + lane / 4];
    const UnitDecoder<BITS> dec(q, q1, sm);
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
        uint32_t a[4];
        dec.ktile(kt, a);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int64_t row = (tile_base + tile * tile_stride) * 16 + frag_row(lane, r);
            const int64_t k = u * KU + unit_offset(BITS, lane, kt, r, 0);
            *reinterpret_cast<uint32_t *>(out + row * ldo + k) = a[r];
        }
    }
}

__global__ void dequantize_rows_f32_kernel(const WeightView w, int64_t row0, int64_t k_count, float *out) {
    const int64_t row = row0 + blockIdx.y;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < k_count;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x)
        out[blockIdx.y * k_count + k] = weight_at(w, row, k);
}

// R tiles of W warps per block; kNarrow: also the 1-8 column kernel (wide shapes have none).
template <int BITS, int R, int W, bool kNarrow = true>
void launch_gemv_shape(const GemvCall &c, cudaStream_t stream) {
    const int64_t groups = c.n_tiles / R;
    if (groups <= 0) return;
    const dim3 grid(static_cast<unsigned>(groups));
    if constexpr (kNarrow) {
        if (c.batch <= 8) {
            launch_kernel(gemv_kernel<BITS, R, 1, W>, grid, W * 32, 0, stream, c);
            PUMICE_CUDA_CHECK_LAUNCH("gemv");
            return;
        }
    }
    launch_kernel(gemv_kernel<BITS, R, 2, W>, grid, W * 32, 0, stream, c);
    PUMICE_CUDA_CHECK_LAUNCH("gemv");
}

template <int BITS>
void launch_gemv_bits(const GemvCall &c, cudaStream_t stream) {
    const int r = c.tiles_per_block, w = c.warps ? c.warps : default_warps(r);
    if (r == 1 && w == 8) launch_gemv_shape<BITS, 1, 8>(c, stream);
    else if (r == 2 && w == 4) launch_gemv_shape<BITS, 2, 4>(c, stream);
    else if (c.batch > 8 && r == 3 && w == 8) launch_gemv_shape<BITS, 3, 8, false>(c, stream);
    else if (c.batch > 8 && r == 4 && w == 4) launch_gemv_shape<BITS, 4, 4, false>(c, stream);
    else if (c.batch > 8 && r == 2 && w == 16) launch_gemv_shape<BITS, 2, 16, false>(c, stream);
    else throw Error(PUMICE_ERR_INTERNAL, "gemv: unsupported block shape");
}

}  // namespace

bool wide_tiles_enabled() { return !env_is("PUMICE_CUDA_WIDE_TILES", "0"); }

bool early_epilogue_reads_enabled() { return !env_is("PUMICE_CUDA_EARLY_READS", "0"); }

bool three_tiles_enabled() { return !env_is("PUMICE_CUDA_THREE_TILES", "0"); }

int residual_pairs_mode() {
    return env_is("PUMICE_CUDA_RESIDUAL_PAIRS", "0") ? 0 : env_is("PUMICE_CUDA_RESIDUAL_PAIRS", "always") ? 2 : 1;
}

void launch_gemv(const GemvCall &call, int num_sms, cudaStream_t stream) {
    if (call.batch < 1 || call.batch > 16) throw Error(PUMICE_ERR_INTERNAL, "gemv batch out of range");
    GemvCall c = call;
    c.early_reads = early_epilogue_reads_enabled();
    // Two tiles per block share the activation loads; worth it only when the grid stays full.
    // A norm producer writes one partial sum per tile.
    if (c.epi.mode != EPI_SWIGLU)
        c.tiles_per_block =
            (c.n_tiles % 2 == 0 && c.n_tiles / 2 >= 2 * num_sms && !c.epi.norm_partials_out) ? 2 : 1;
    // At 9-16 columns each unit's activations are 16x its weight bytes through L1/L2, so blocks
    // take several tiles that share them, in shapes that keep the grid at least 90% of the SMs
    // (PUMICE_CUDA_WIDE_TILES=0: the choice above; docs/CUDA.md, "Decode step"):
    // - residual adds (O, down): two tiles, 16 warps, one block per SM; the 16 warps split the
    //   input so that O takes two passes per warp, as one-tile blocks of 8 warps did (Llama-2-7B
    //   step 2.37 against 2.58 ms; PUMICE_CUDA_RESIDUAL_PAIRS=0: one tile, =always: pairs
    //   on grids of any size, for tests on small models);
    // - others: four tiles (two gate/up pairs for SwiGLU), or three tiles of 8 warps, two blocks
    //   per SM, where that leaves fewer tiles on the busiest SM (Llama-2-7B's QKV, 768 tiles:
    //   192 four-tile blocks put 8 tiles on 60 SMs and 4 on the rest, 256 three-tile blocks 6
    //   on 124; Llama-3-8B's, 384 tiles: 128 blocks; PUMICE_CUDA_THREE_TILES=0: four).
    if (c.batch > 8 && wide_tiles_enabled()) {
        const auto fills = [&](int r) { return c.n_tiles % r == 0 && c.n_tiles / r * 10 >= num_sms * 9; };
        const auto busiest_sm_tiles = [&](int r) { return r * ceil_div(c.n_tiles / r, num_sms); };
        if (c.epi.mode == EPI_ADD) {
            const int pairs = residual_pairs_mode();
            if (c.n_tiles % 2 == 0 && (pairs == 2 || (pairs == 1 && fills(2)))) {
                c.tiles_per_block = 2;
                c.warps = 16;
            }
        } else if (!c.epi.norm_partials_out) {
            const bool four = fills(4);
            const bool three = c.epi.mode != EPI_SWIGLU && fills(3) && three_tiles_enabled();
            if (three && (!four || busiest_sm_tiles(3) < busiest_sm_tiles(4))) {
                c.tiles_per_block = 3;
                c.warps = 8;
            } else if (four) {
                c.tiles_per_block = 4;
            }
        }
    }
    switch (c.w.bits) {
        case 2: launch_gemv_bits<2>(c, stream); break;
        case 3: launch_gemv_bits<3>(c, stream); break;
        case 4: launch_gemv_bits<4>(c, stream); break;
        case 8: launch_gemv_bits<8>(c, stream); break;
        case 16: launch_gemv_bits<16>(c, stream); break;
        default: throw Error(PUMICE_ERR_INTERNAL, "gemv: unsupported bit width");
    }
}

void launch_epilogue(const Epilogue &epi, int64_t n_tiles, int tiles_per_block, const float *in,
                     int64_t ld_in, int n_cols, cudaStream_t stream) {
    const int64_t groups = n_tiles / tiles_per_block;
    if (groups <= 0 || n_cols <= 0) return;
    dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(ceil_div(n_cols, 16)));
    if (epi.norm_partials_out && tiles_per_block != 1)
        throw Error(PUMICE_ERR_INTERNAL, "epilogue: a norm producer needs one tile per block");
    if (tiles_per_block == 2) launch_kernel(epilogue_kernel<2>, grid, 128, 0, stream, epi, in, ld_in, n_cols);
    else launch_kernel(epilogue_kernel<1>, grid, 128, 0, stream, epi, in, ld_in, n_cols);
    PUMICE_CUDA_CHECK_LAUNCH("epilogue");
}

void launch_dequantize_f16(const WeightView &w, int64_t n_tiles, __half *out, int64_t ldo, int64_t tile_base,
                           int64_t tile_stride, cudaStream_t stream) {
    if (ldo < w.kp) throw Error(PUMICE_ERR_INTERNAL, "dequantize_f16: output rows too short");
    dim3 grid(static_cast<unsigned>(ceil_div(w.units, 8)), static_cast<unsigned>(n_tiles));
    switch (w.bits) {
        case 2: dequantize_f16_kernel<2><<<grid, 256, 0, stream>>>(w, out, ldo, tile_base, tile_stride); break;
        case 3: dequantize_f16_kernel<3><<<grid, 256, 0, stream>>>(w, out, ldo, tile_base, tile_stride); break;
        case 4: dequantize_f16_kernel<4><<<grid, 256, 0, stream>>>(w, out, ldo, tile_base, tile_stride); break;
        case 8: dequantize_f16_kernel<8><<<grid, 256, 0, stream>>>(w, out, ldo, tile_base, tile_stride); break;
        default: dequantize_f16_kernel<16><<<grid, 256, 0, stream>>>(w, out, ldo, tile_base, tile_stride); break;
    }
    PUMICE_CUDA_CHECK_LAUNCH("dequantize_f16");
}

void launch_dequantize_rows_f32(const WeightView &w, int64_t row0, int64_t n_rows, int64_t k,
                                float *out, cudaStream_t stream) {
    if (n_rows <= 0) return;
    dim3 grid(static_cast<unsigned>(ceil_div(k, 256) < 64 ? ceil_div(k, 256) : 64), static_cast<unsigned>(n_rows));
    dequantize_rows_f32_kernel<<<grid, 256, 0, stream>>>(w, row0, k, out);
    PUMICE_CUDA_CHECK_LAUNCH("dequantize_rows");
}

}  // namespace cuda
}  // namespace pumice
