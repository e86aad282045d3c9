// persistent_step.cu — the batch-1 decode step as one persistent kernel (persistent_step.cuh).
//
// Block = 16 consumer warps in two groups of 8 + one producer warp; one block per SM, grid
// barriers between phases. The embedding row, then per layer: QKV (RoPE, KV-cache write) |
// attention | O (+ residual) | gate/up (SwiGLU) | down (+ residual); then the head (f32 logits),
// unless the caller launches it. Each SM owns the same row blocks of every matrix in every
// layer (block b: row blocks b, b + grid, ...), so the residual rows it adds to are its own; a
// row block's items (32-unit chunks) all run on that SM and meet in shared memory in a fixed
// order (results do not depend on timing). docs/CUDA.md has the design and its measurements.
//
// The int8 mma (m16n8k32, A unsigned) takes the lane's four words of 2-bit codes, each masked
// with 0x03030303 << 2j, as its A fragment (mma j; no shifts: tiled_weight.cuh orders the codes
// for it): register r holds the codes of row g + 8 (r % 2), times 4^j, at the quad's inputs
// 8j + {0, 4, 1, 5} (r < 2) or 8j + {2, 6, 3, 7} (r >= 2). Mmas 0 and 1 cover the first 16
// inputs of the quad's 32-input run, mmas 2 and 3 the last 16. Column 2q of the mma carries
// quad q's first half of the activation (fed by lane 9q for mmas 0-1, zero otherwise) and column
// 2q + 1 its second half (lane 9q + 4, mmas 2-3), so mmas 0 and 2 share one accumulator, 1 and 3
// another (columns apart), and each column sums 16 inputs of one image half; 4 ca + cb leaves
// one power of 4 per half, which its scale takes back. B's bytes for mma j are the inputs in
// A's order, so an image half stores input o at byte 8 (o / 8) + 2 (o % 4) + (o % 8) / 4.
// With codes c (0..3), w = s c + m and x ~ d q: sum(w x) ~ s (d sum(c q) + 1.5 (X - d Q)) + m X,
// the 1.5 (X - d Q) term carrying the quantization error of x's mean (codes average 1.5).
#include "persistent_step.cuh"

#include <cfloat>
#include <string>

#include "async_copy.cuh"
#include "cuda_common.cuh"
#include "decode.cuh"

namespace pumice {
namespace cuda {
namespace {

constexpr int kConsumerWarps = 16;
// Two consumer groups take the ring's stages in turn (four groups of four warps measured faster
// without barriers but slower chained: an item's latency, and with it the drain before every
// barrier, doubles).
constexpr int kGroups = 2;
constexpr int kGroupWarps = kConsumerWarps / kGroups;
constexpr int kConsumerThreads = kConsumerWarps * 32;
constexpr int kThreads = kConsumerThreads + 32;
constexpr int kRedFloats = kPersistentItemsPerMatrix * kGroupWarps * 32;

// What every phase reads besides the ring and the image, kept in shared memory for the whole
// kernel: after each grid barrier L1 is cold, and an L2 round trip on a phase's critical path
// costs about as much as streaming a unit.
struct SmState {
    StepColumn col;                                // the step's column
    float rope_cos[64], rope_sin[64];              // RoPE at the column's position
    float resid[kPersistentOwnedTiles * 16];       // this SM's residual rows (O and down tiles)
    float gain[kPersistentOwnedTiles * 16];        // the next norm's weights of those rows
    float scale;                                   // RMSNorm scale of the current input
    // Layer l's matrix descriptions in layer_bytes[l % 2], copied during layer l - 1: each grid
    // barrier's acquire empties L1, and reading them from global memory put an L2 round trip
    // between every barrier and the image copy behind it.
    // (Raw bytes: PersistentLayer's member initializers would make this a dynamic initialization.)
    alignas(16) unsigned char layer_bytes[2][sizeof(PersistentLayer)];
    __device__ const PersistentLayer &layer(int l) const {
        return *reinterpret_cast<const PersistentLayer *>(layer_bytes[l & 1]);
    }
    __device__ PersistentLayer *layer_slot(int l) { return reinterpret_cast<PersistentLayer *>(layer_bytes[l & 1]); }
};

// The mbarrier and bulk-copy PTX exists from sm_90 on: older targets compile only an empty
// kernel (the host never launches it there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PUMICE_PERSISTENT_ARCH 1
#endif
#if !defined(__CUDA_ARCH__) || defined(PUMICE_PERSISTENT_ARCH)

constexpr int kChunk = kPersistentChunkUnits;
constexpr int kUnitsPerWarp = kChunk / kGroupWarps;
constexpr int kMaxStages = 8;

__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
}

__device__ __forceinline__ unsigned poll_counter(const unsigned *counter) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(counter) : "memory");
    return v;
}

// Busy-waits about `cycles` clock cycles without touching memory.
__device__ __forceinline__ void spin_cycles(int cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}

constexpr int kPollSpacingCycles = 100;

// Consumer threads only: every SM's writes so far are visible to every SM afterwards. One
// monotonic counter, zeroed before the launch; `target` counts this block's arrivals.
__device__ void grid_barrier(const PersistentStep &p, unsigned &target) {
    consumers_sync();
    if (p.skip & kPersistentSkipBarriers) return;
    unsigned *counter = p.barrier;
    target += gridDim.x;
    if (threadIdx.x == 0) {
        // Release (cumulative: the block's writes, ordered before by the bar.sync) and acquire;
        // every read of another SM's data goes through L2 (ld.global.cg), never a stale L1.
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(counter) : "memory");
        // Polls spaced out: every SM's polls land on the counter's L2 slice, and polling
        // back to back measured slower than a pause between polls.
        while (poll_counter(counter) < target) spin_cycles(kPollSpacingCycles);
    }
    consumers_sync();
}

// Starts copying layer l's descriptions into dst (threads 0-8; they wait with
// wait_async_copies()).
constexpr int kLayerCopyThreads = static_cast<int>(sizeof(PersistentLayer) / 16);
static_assert(sizeof(PersistentLayer) % 16 == 0, "PersistentLayer is copied in 16-byte pieces");
__device__ __forceinline__ void fetch_layer(const PersistentStep &p, int l, PersistentLayer *dst) {
    if (static_cast<int>(threadIdx.x) < kLayerCopyThreads)
        copy_async_16(reinterpret_cast<uint4 *>(dst) + threadIdx.x,
                      reinterpret_cast<const uint4 *>(p.layers + l) + threadIdx.x);
}

// Row blocks of m owned by this SM, and the 32-unit items each splits into.
__device__ __forceinline__ int owned_row_blocks(const PersistentMatrix &m) {
    const int b = static_cast<int>(blockIdx.x), g = static_cast<int>(gridDim.x);
    return b < m.row_blocks ? (m.row_blocks - b + g - 1) / g : 0;
}
__device__ __forceinline__ int chunks_per_block(const PersistentMatrix &m) {
    return (m.tiles_per_block * m.units + kChunk - 1) / kChunk;
}

// A position in the ring, with its stage and the parity of that stage's round, advanced without
// divisions (the stage count is a launch parameter, and a division per item sat on the
// consumers' critical path).
struct RingCursor {
    int pos = 0, stage = 0;
    unsigned parity = 0;
    __device__ __forceinline__ void advance(int stages) {
        ++pos;
        if (++stage == stages) {
            stage = 0;
            parity ^= 1u;
        }
    }
};

// The producer: every matrix's items of this SM in order, into the ring. Each matrix's
// description is copied into registers first: read through its reference, every field came
// back from global memory after each asm statement's memory clobber.
__device__ void produce(const PersistentStep &p, unsigned char *ring, uint64_t *full, uint64_t *empty) {
    RingCursor cur;
    const int stages = p.stages;
    const bool stream = !(p.skip & kPersistentSkipStream);
    for (int l = 0; l < p.n_layers; ++l) {
        const PersistentLayer &L = p.layers[l];
        const int n_mats = 4 + (l + 1 == p.n_layers ? p.n_head_parts : 0);
        for (int mi = 0; mi < n_mats; ++mi) {
            const PersistentMatrix m = mi == 0   ? L.qkv
                                       : mi == 1 ? L.o
                                       : mi == 2 ? L.gate_up
                                       : mi == 3 ? L.down
                                                 : p.head[mi - 4];
            const int per_block = m.tiles_per_block * m.units, n_chunks = chunks_per_block(m);
            const int n_items = owned_row_blocks(m) * n_chunks;
            int rb = static_cast<int>(blockIdx.x), c = 0;
            for (int j = 0; j < n_items; ++j) {
                if (cur.pos >= stages) mbar_wait(&empty[cur.stage], cur.parity ^ 1u);
                const int n = min(kChunk, per_block - c * kChunk);
                const int64_t u0 = static_cast<int64_t>(rb) * per_block + c * kChunk;
                uint64_t *bar = &full[cur.stage];
                if (stream) {
                    unsigned char *dst = ring + static_cast<size_t>(cur.stage) * p.stage_bytes;
                    asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
                                 "r"(n * (512 + m.scale_bytes_per_unit))
                                 : "memory");
                    bulk_copy(dst, m.codes + u0 * 32, n * 512, bar);
                    bulk_copy(dst + kChunk * 512, m.scales + u0 * m.scale_bytes_per_unit, n * m.scale_bytes_per_unit,
                              bar);
                } else {
                    mbar_arrive(bar);
                }
                if (++c == n_chunks) {
                    c = 0;
                    rb += static_cast<int>(gridDim.x);
                }
                cur.advance(stages);
            }
        }
    }
}

// One unit of a lane: codes q, the {scale, min} pair of its rows g and g + 8 for its quad's
// group, the image halves h0 and h0 + 1 of its quad (even h0) and their pair record (see
// stage_image). Adds to the rows' sums (per lane, summed over the quad later).
template <int J>
__device__ __forceinline__ void mma_level(int (&c)[4], const uint4 &q, uint32_t b0, uint32_t b1) {
    constexpr uint32_t kMask = 0x03030303u << (2 * J);
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(q.x & kMask), "r"(q.y & kMask), "r"(q.z & kMask), "r"(q.w & kMask), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void unit_dot(const uint4 &q, const uint2 &sm, const uint4 *img, const float4 *pairs, int h0,
                                         bool first, bool second, float &lo, float &hi) {
    // Lanes 9q feed mmas 0-1 (the first half), lanes 9q + 4 mmas 2-3; every other lane zeros.
    const uint4 zero = make_uint4(0, 0, 0, 0);
    const uint4 b_first = first ? img[h0] : zero, b_second = second ? img[h0 + 1] : zero;
    // Codes times 1 (column 2q) and 16 (2q + 1) in ca, times 4 and 64 in cb.
    int ca[4] = {0, 0, 0, 0}, cb[4] = {0, 0, 0, 0};
    mma_level<0>(ca, q, b_first.x, b_first.y);
    mma_level<1>(cb, q, b_first.z, b_first.w);
    mma_level<2>(ca, q, b_second.x, b_second.y);
    mma_level<3>(cb, q, b_second.z, b_second.w);
    // 4 ca + cb is the first half's sum times 4 (column 2q) or the second's times 64 (2q + 1).
    const float4 r = pairs[h0 / 2];
    const float2 slo = __half22float2(u32_as_half2(sm.x)), shi = __half22float2(u32_as_half2(sm.y));
    const float lo0 = static_cast<float>(4 * ca[0] + cb[0]), lo1 = static_cast<float>(4 * ca[1] + cb[1]);
    const float hi0 = static_cast<float>(4 * ca[2] + cb[2]), hi1 = static_cast<float>(4 * ca[3] + cb[3]);
    lo = fmaf(slo.x, fmaf(r.w, lo1, fmaf(r.z, lo0, r.y)), fmaf(slo.y, r.x, lo));
    hi = fmaf(shi.x, fmaf(r.w, hi1, fmaf(r.z, hi0, r.y)), fmaf(shi.y, r.x, hi));
}

// Writes image half `half` from E values per lane, held by 16 / E consecutive lanes (sub =
// the lane's place among them). All 32 lanes call it; lanes with write == false contribute
// nothing to their group and write nothing (their group must be all such lanes).
// `extra` (one value per lane) is summed over the same lanes alongside and returned.
template <int E>
__device__ float write_image(const float (&x)[E], bool write, int half, int sub, unsigned char *img, float4 *runs,
                             float extra = 0.f) {
    constexpr int L = 16 / E;
    // The sum of x reduced beside the maximum (it does not need the scale): the epilogue is on
    // the path to every grid barrier, and each shuffle's latency counts.
    float amax = 0.f, xs = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        amax = fmaxf(amax, fabsf(x[e]));
        xs += x[e];
    }
#pragma unroll
    for (int o = L / 2; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(~0u, amax, o));
        xs += __shfl_xor_sync(~0u, xs, o);
        extra += __shfl_xor_sync(~0u, extra, o);
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    float qs = 0.f;
    int qv[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        qv[e] = max(-127, min(127, __float2int_rn(x[e] * inv)));
        qs += static_cast<float>(qv[e]);
    }
#pragma unroll
    for (int o = L / 2; o > 0; o >>= 1) qs += __shfl_xor_sync(~0u, qs, o);
    if (!write) return extra;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int o = sub * E + e;
        img[half * 16 + 8 * (o / 8) + 2 * (o % 4) + (o % 8) / 4] = static_cast<unsigned char>(static_cast<signed char>(qv[e]));
    }
    if (sub == 0) {
        const float d = amax / 127.f;
        runs[half] = make_float4(d, 1.5f * (xs - d * qs), xs, 0.f);
    }
    return extra;
}

// The shared-memory copy of an image (halves = inputs / 16, even), read from L2. A unit's quad
// takes halves 2i and 2i + 1 together, so their records become one per pair, with what
// unit_dot adds up front: pairs_s[i] = {X0 + X1, e0 + e1, d0 / 4, d1 / 64} (e = 1.5 (X - d Q);
// the powers of 4 are those mma_level leaves in each half's sum).
__device__ void stage_image(const PersistentStep &p, const uint4 *img, const float4 *runs, int halves, uint4 *img_s,
                            float4 *pairs_s) {
    if (p.skip & kPersistentSkipStaging) return;
    // One loop, all four loads of a pair issued together: this copy sits between a grid barrier
    // and the first item of the next matrix (two loops, halves then pairs, measured slower).
    for (int i = threadIdx.x; i < halves / 2; i += kConsumerThreads) {
        const uint4 x0 = __ldcg(img + 2 * i), x1 = __ldcg(img + 2 * i + 1);
        const float4 a = __ldcg(runs + 2 * i), b = __ldcg(runs + 2 * i + 1);
        img_s[2 * i] = x0;
        img_s[2 * i + 1] = x1;
        pairs_s[i] = make_float4(a.z + b.z, a.y + b.y, a.x * 0.25f, b.x * (1.f / 64.f));
    }
}

// RMSNorm's scale from the residual tiles' sums of squares, in a fixed order; run by the last
// consumer warp while the others stage the image (its K / 16 halves rarely reach that warp).
__device__ void norm_scale(const PersistentStep &p, SmState &st) {
    if (threadIdx.x / 32 != kConsumerWarps - 1 || (p.skip & kPersistentSkipStaging)) return;
    const int lane = threadIdx.x % 32, tiles = (p.hidden + 15) / 16;
    float s = 0.f;
    for (int i = lane; i < tiles; i += 32) s += __ldcg(p.sumsq + i);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
    if (lane == 0) st.scale = rsqrtf(s / static_cast<float>(p.hidden) + p.eps);
}

// After a barrier: m's input image into shared memory and, for a normed input (QKV, gate/up,
// the head), the RMSNorm scale its dot products take (1 otherwise).
__device__ float stage_input(const PersistentStep &p, SmState &st, const uint4 *img, const float4 *runs,
                             const PersistentMatrix &m, bool normed, uint4 *img_s, float4 *pairs_s) {
    stage_image(p, img, runs, m.units * 8, img_s, pairs_s);
    if (normed) norm_scale(p, st);
    consumers_sync();
    return normed ? st.scale : 1.f;
}

// A residual tile's epilogue (O and down, and the prologue with v = 0), for the SM's own tile
// `owned` (its index among them): resid += v, the next norm's input image (st.gain holds that
// norm's weights of the SM's rows), the tile's sum of squares; for the last layer also the
// head's input.
__device__ void residual_tile(const PersistentStep &p, SmState &st, int owned, float v, bool for_head) {
    const int lane = threadIdx.x % 32;
    const int tile = static_cast<int>(blockIdx.x) + owned * static_cast<int>(gridDim.x);
    const int row = tile * 16 + lane;
    const bool valid = lane < 16 && row < p.hidden;
    float r = 0.f, gain = 0.f;
    if (valid) {
        r = st.resid[owned * 16 + lane] + v;
        st.resid[owned * 16 + lane] = r;
        gain = st.gain[owned * 16 + lane];
    }
    const float x[1] = {r * gain};
    // The tile's sum of squares (over lanes 0-15, as the image's sums) alongside.
    const float ss =
        write_image<1>(x, lane < 16, tile, lane, reinterpret_cast<unsigned char *>(p.img_x), p.runs_x, r * r);
    if (lane == 0) p.sumsq[tile] = ss;
    if (for_head) {
        if (valid) p.xn[row] = __float2half(r * gain * kNormPrescale);
        if (lane == 0) p.norm_partials[tile] = ss;
    }
}

// Sum over a lane quad (the four 32-input runs of a unit).
__device__ __forceinline__ void quad_sum(float &v) {
    v += __shfl_xor_sync(~0u, v, 1);
    v += __shfl_xor_sync(~0u, v, 2);
}

// One matrix: this SM's items through the ring (group g takes ring positions = g mod 2), the
// partial sums of each item's warps into red[item][warp][row], then per row block (one warp
// each) their fixed-order sum into epi(row_block, owned index, v) with lane l holding row l of
// the block. gain (O and down): the next norm's weights, copied for the epilogue while the
// items run. (Splitting each SM's last item over both groups, to shorten the drain before the
// barrier, measured slower.)
template <class Epilogue>
__device__ void run_matrix(const PersistentStep &p, const PersistentMatrix &m_ref, RingCursor &cur, unsigned char *ring,
                           uint64_t *full, uint64_t *empty, const uint4 *img_s, const float4 *pairs_s, float *red,
                           SmState &st, const float *gain, Epilogue epi) {
    const PersistentMatrix m = m_ref;  // in registers (see produce)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (gain && warp < owned_row_blocks(m) && lane < 16) {
        const int row = (static_cast<int>(blockIdx.x) + warp * static_cast<int>(gridDim.x)) * 16 + lane;
        if (row < p.hidden) copy_async_4(&st.gain[warp * 16 + lane], gain + row);
    }
    const int group = warp / kGroupWarps, gwarp = warp % kGroupWarps;
    const int quad = lane % 4, col = lane / 4;
    const bool first = col == 2 * quad, second = col == 2 * quad + 1;
    const int per_block = m.tiles_per_block * m.units, n_chunks = chunks_per_block(m);
    const int n_items = owned_row_blocks(m) * n_chunks;
    const int scale_slot = (quad * m.scale_bytes_per_unit / 256) * 8 + col;
    const int stages = p.stages;
    // Where chunks end at tile ends, an item's units all belong to one tile (the common case).
    const bool item_in_one_tile = m.tiles_per_block == 1 || m.units % kChunk == 0;
    // Item j is chunk c of its row block.
    for (int j = 0, c = 0; j < n_items; ++j, c = c + 1 == n_chunks ? 0 : c + 1, cur.advance(stages)) {
        if (cur.pos % kGroups != group) continue;
        mbar_wait(&full[cur.stage], cur.parity);
        const unsigned char *base = ring + static_cast<size_t>(cur.stage) * p.stage_bytes;
        const int n = min(kChunk, per_block - c * kChunk);
        // The warp's units into registers, the stage handed back, then the multiplications
        // (reading the units in place instead, holding the stage longer, measured 15% slower).
        uint4 q[kUnitsPerWarp];
        uint2 sm[kUnitsPerWarp];
#pragma unroll
        for (int w = 0; w < kUnitsPerWarp; ++w) {
            const int idx = gwarp + w * kGroupWarps;
            if (idx < n) {
                q[w] = reinterpret_cast<const uint4 *>(base)[idx * 32 + lane];
                sm[w] = reinterpret_cast<const uint2 *>(base + kChunk * 512 + idx * m.scale_bytes_per_unit)[scale_slot];
            } else {
                q[w] = make_uint4(0, 0, 0, 0);  // a zero scale and min: adds exactly nothing
                sm[w] = make_uint2(0, 0);
            }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[cur.stage]);
        // Every unit slot computes, a missing one on zeros: without a branch per unit the
        // compiler overlaps the units' loads and mmas.
        float lo[2] = {0.f, 0.f}, hi[2] = {0.f, 0.f};
        if (!(p.skip & kPersistentSkipMath)) {
            if (item_in_one_tile) {
                const int t = c * kChunk >= m.units ? 1 : 0;
                float a = 0.f, b = 0.f;
#pragma unroll
                for (int w = 0; w < kUnitsPerWarp; ++w) {
                    const int u = c * kChunk + min(gwarp + w * kGroupWarps, n - 1) - t * m.units;
                    unit_dot(q[w], sm[w], img_s, pairs_s, u * 8 + 2 * quad, first, second, a, b);
                }
                quad_sum(a);
                quad_sum(b);
                lo[0] = t ? 0.f : a;  // selects: an index here would put lo and hi in local memory
                lo[1] = t ? a : 0.f;
                hi[0] = t ? 0.f : b;
                hi[1] = t ? b : 0.f;
            } else {
#pragma unroll
                for (int w = 0; w < kUnitsPerWarp; ++w) {
                    // A row block holds one or two tiles (no division on this path).
                    const int pu = c * kChunk + min(gwarp + w * kGroupWarps, n - 1), t = pu >= m.units ? 1 : 0;
                    const int u = pu - t * m.units;
                    float a = 0.f, b = 0.f;
                    unit_dot(q[w], sm[w], img_s, pairs_s, u * 8 + 2 * quad, first, second, a, b);
                    if (t == 0) { lo[0] += a; hi[0] += b; }
                    else { lo[1] += a; hi[1] += b; }
                }
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    quad_sum(lo[t]);
                    quad_sum(hi[t]);
                }
            }
        }
        if (quad == 0) {
            float *r = red + (j * kGroupWarps + gwarp) * 32;
            r[col] = lo[0];
            r[col + 8] = hi[0];
            r[16 + col] = lo[1];
            r[24 + col] = hi[1];
        }
    }
    if (gain) wait_async_copies();
    consumers_sync();
    const int owned = owned_row_blocks(m);
    if (p.skip & kPersistentSkipEpilogue) return;
    for (int b = warp; b < owned; b += kConsumerWarps) {
        float v = 0.f;
        for (int c = 0; c < n_chunks; ++c)
#pragma unroll
            for (int w = 0; w < kGroupWarps; ++w) v += red[((b * n_chunks + c) * kGroupWarps + w) * 32 + lane];
        epi(static_cast<int>(blockIdx.x) + b * static_cast<int>(gridDim.x), b, v);
    }
}

// Attention of one layer. A head's context is split over `blocks` blocks (one when it is short,
// so that most heads need no global merge) and each block's range over its 16 warps; a warp
// runs an online softmax over its keys in batches of 4 (their K and V rows in flight together),
// the warps meet in shared memory in a fixed order, and with several blocks the last one to
// finish merges their partials. The result goes straight into O's input image.
template <int HD>
__device__ void attention_phase(const PersistentStep &p, const SmState &st, int layer, float *scratch) {
    constexpr int E = HD / 32;  // dims per lane
    constexpr int kKeys = 4;    // keys in flight per warp (the 96 registers of 17 warps allow 4)
    constexpr int kKeysPerBlock = kConsumerWarps * 16;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const StepColumn &c = st.col;
    const int len = c.pos + 1;
    const int blocks = max(1, min(static_cast<int>(gridDim.x) / p.n_heads, (len + kKeysPerBlock - 1) / kKeysPerBlock));
    const int chunk = (len + blocks - 1) / blocks, used = (len + chunk - 1) / chunk;
    if (static_cast<int>(blockIdx.x) >= p.n_heads * used) return;
    const int h = static_cast<int>(blockIdx.x) / used, part = static_cast<int>(blockIdx.x) % used;
    const int kvh = h / (p.n_heads / p.n_kv_heads);
    const int b0 = part * chunk, b1 = min(len, b0 + chunk);
    const int per_warp = (b1 - b0 + kConsumerWarps - 1) / kConsumerWarps;
    const int p0 = b0 + warp * per_warp, p1 = min(b1, p0 + per_warp);
    const __half *kbase = c.cache + ((static_cast<int64_t>(layer) * 2 * p.n_kv_heads + kvh) * c.n_ctx) * HD + lane * E;
    const __half *vbase = c.cache + (((static_cast<int64_t>(layer) * 2 + 1) * p.n_kv_heads + kvh) * c.n_ctx) * HD + lane * E;

    const float qscale = rsqrtf(static_cast<float>(HD)) * 1.4426950408889634f;  // scores in log2 units
    float qf[E];
    {
        const __half2 *qp = reinterpret_cast<const __half2 *>(p.q + static_cast<int64_t>(h) * HD + lane * E);
#pragma unroll
        for (int e = 0; e < E / 2; ++e) {
            const float2 f = __half22float2(__ldcg(qp + e));
            qf[2 * e] = f.x * qscale;
            qf[2 * e + 1] = f.y * qscale;
        }
    }
    float m = -FLT_MAX, l = 0.f, acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;
    for (int k0 = p0; k0 < p1; k0 += kKeys) {
        __half2 kh[kKeys][E / 2], vh[kKeys][E / 2];
#pragma unroll
        for (int k = 0; k < kKeys; ++k) {
            const int pk = min(k0 + k, p1 - 1);
            const __half2 *kp = reinterpret_cast<const __half2 *>(kbase + static_cast<int64_t>(pk) * HD);
            const __half2 *vp = reinterpret_cast<const __half2 *>(vbase + static_cast<int64_t>(pk) * HD);
#pragma unroll
            for (int e = 0; e < E / 2; ++e) {
                kh[k][e] = __ldcg(kp + e);
                vh[k][e] = __ldcg(vp + e);
            }
        }
        float dot[kKeys];
#pragma unroll
        for (int k = 0; k < kKeys; ++k) {
            dot[k] = 0.f;
#pragma unroll
            for (int e = 0; e < E / 2; ++e) {
                const float2 a = __half22float2(kh[k][e]);
                dot[k] += qf[2 * e] * a.x + qf[2 * e + 1] * a.y;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int k = 0; k < kKeys; ++k) dot[k] += __shfl_xor_sync(~0u, dot[k], o);
        float mx = m;
#pragma unroll
        for (int k = 0; k < kKeys; ++k)
            if (k0 + k < p1) mx = fmaxf(mx, dot[k]);
        const float corr = exp2f(m - mx);
        l *= corr;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] *= corr;
#pragma unroll
        for (int k = 0; k < kKeys; ++k) {
            const float pk = k0 + k < p1 ? exp2f(dot[k] - mx) : 0.f;
            l += pk;
#pragma unroll
            for (int e = 0; e < E / 2; ++e) {
                const float2 b = __half22float2(vh[k][e]);
                acc[2 * e] += pk * b.x;
                acc[2 * e + 1] += pk * b.y;
            }
        }
        m = mx;
    }
    // The block's warps (and then the blocks) merge with the same online rescaling; a warp or
    // block without keys carries m = -FLT_MAX, l = 0 and adds nothing.
    float *warp_o = scratch, *warp_ml = scratch + kConsumerWarps * HD;
#pragma unroll
    for (int e = 0; e < E; ++e) warp_o[warp * HD + lane * E + e] = acc[e];
    if (lane == 0) {
        warp_ml[2 * warp] = m;
        warp_ml[2 * warp + 1] = l;
    }
    consumers_sync();
    if (warp != 0) return;
    float out[E], mall = -FLT_MAX, den = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] = 0.f;
    auto merge = [&](float mi, float li, const float *oi) {
        const float mnew = fmaxf(mall, mi);
        const float keep = exp2f(mall - mnew), w = exp2f(mi - mnew);
        den = den * keep + w * li;
#pragma unroll
        for (int e = 0; e < E; ++e) out[e] = out[e] * keep + w * oi[e];
        mall = mnew;
    };
    for (int w = 0; w < kConsumerWarps; ++w) {
        float oi[E];
#pragma unroll
        for (int e = 0; e < E; ++e) oi[e] = warp_o[w * HD + lane * E + e];
        merge(warp_ml[2 * w], warp_ml[2 * w + 1], oi);
    }
    unsigned char *img = reinterpret_cast<unsigned char *>(p.img_att);
    const int half = (h * HD + lane * E) / 16, sub = lane % (16 / E);
    if (used > 1) {
        float *po = p.part_o + static_cast<int64_t>(h) * kMaxPersistentSplits * HD;
        float2 *pml = p.part_ml + static_cast<int64_t>(h) * kMaxPersistentSplits;
#pragma unroll
        for (int e = 0; e < E; ++e) po[part * HD + lane * E + e] = out[e];
        if (lane == 0) pml[part] = make_float2(mall, den);
        __threadfence();
        __syncwarp();
        int prev = 0;
        if (lane == 0) prev = atomicAdd(p.att_counters + h, 1);
        if (__shfl_sync(~0u, prev, 0) != used - 1) return;
        __threadfence();
        mall = -FLT_MAX;
        den = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) out[e] = 0.f;
#pragma unroll 4
        for (int i = 0; i < used; ++i) {
            const float2 ml = __ldcg(pml + i);
            float oi[E];
#pragma unroll
            for (int e = 0; e < E; ++e) oi[e] = __ldcg(po + i * HD + lane * E + e);
            merge(ml.x, ml.y, oi);
        }
        if (lane == 0) p.att_counters[h] = 0;  // ready for the next step
    }
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] /= den;
    write_image<E>(out, true, half, sub, img, p.runs_att);
}

// QKV's epilogue for one stored tile: RoPE on q and k rows (rows i and i + 8 are a rotation
// pair, tiled_weight.cuh), q to p.q, k and v into the cache at the column's position.
__device__ void qkv_tile(const PersistentStep &p, const SmState &st, int layer, int tile, float v) {
    const int lane = threadIdx.x % 32, D = p.head_dim;
    const float partner = __shfl_down_sync(~0u, v, 8);
    const StepColumn &c = st.col;
    const int base = tile * 16;
    if (base < p.q_rows + p.kv_rows) {
        if (lane >= 8) return;
        const bool is_q = base < p.q_rows;
        const int rel = is_q ? base : base - p.q_rows;
        const int head = rel / D, j = (rel % D) / 16;
        const int d_lo = 8 * j + lane, d_hi = d_lo + D / 2;
        const float cf = st.rope_cos[d_lo], sf = st.rope_sin[d_lo];
        const float out_lo = v * cf - partner * sf, out_hi = partner * cf + v * sf;
        __half *dst = is_q ? p.q + static_cast<int64_t>(head) * D
                           : c.cache + ((static_cast<int64_t>(layer) * 2 * p.n_kv_heads + head) * c.n_ctx + c.pos) * D;
        dst[d_lo] = __float2half(out_lo);
        dst[d_hi] = __float2half(out_hi);
    } else if (lane < 16) {
        const int rel = base - p.q_rows - p.kv_rows;
        const int head = rel / D, d = rel % D + lane;
        c.cache[(((static_cast<int64_t>(layer) * 2 + 1) * p.n_kv_heads + head) * c.n_ctx + c.pos) * D + d] = __float2half(v);
    }
}

#endif  // sm_90 device code

template <int HD>
__global__ void __launch_bounds__(kThreads, 1) persistent_step_kernel(const PersistentStep p) {
#ifdef PUMICE_PERSISTENT_ARCH
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) uint64_t full[kMaxStages], empty[kMaxStages];
    unsigned char *ring = smem;
    uint4 *img_s = reinterpret_cast<uint4 *>(smem + static_cast<size_t>(p.stages) * p.stage_bytes);
    float4 *pairs_s = reinterpret_cast<float4 *>(reinterpret_cast<unsigned char *>(img_s) + p.image_bytes);
    float *red = reinterpret_cast<float *>(reinterpret_cast<unsigned char *>(pairs_s) + p.image_bytes / 2);
    if (threadIdx.x == 0) {
        for (int i = 0; i < p.stages; ++i) {
            asm volatile("mbarrier.init.shared.b64 [%0], 1;\n" ::"r"(smem_addr(&full[i])));
            asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(smem_addr(&empty[i])), "r"(kGroupWarps));
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x >= kConsumerThreads) {
        if (threadIdx.x == kConsumerThreads) produce(p, ring, full, empty);
        return;
    }
    const int warp = threadIdx.x / 32;
    __shared__ SmState st;
    const int owned = owned_row_blocks(p.layers[0].o);  // this SM's residual tiles
    if (threadIdx.x == 0) st.col = p.cols[0];
    fetch_layer(p, 0, st.layer_slot(0));
    if (static_cast<int>(threadIdx.x) < kLayerCopyThreads) wait_async_copies();
    consumers_sync();
    for (int i = threadIdx.x; i < p.head_dim / 2; i += kConsumerThreads) {
        // The angle in float like the reference; its cosine in double, so large positions keep
        // their accuracy (fast-math sincosf would not).
        double sn, cs;
        sincos(static_cast<double>(static_cast<float>(st.col.pos) * p.inv_freq[i]), &sn, &cs);
        st.rope_cos[i] = static_cast<float>(cs);
        st.rope_sin[i] = static_cast<float>(sn);
    }
    // Layer 0's input: the token's embedding at this SM's residual rows, normed by the first
    // attention norm.
    if (warp < owned && threadIdx.x % 32 < 16) {
        const int lane = threadIdx.x % 32;
        const int row = (static_cast<int>(blockIdx.x) + warp * static_cast<int>(gridDim.x)) * 16 + lane;
        st.resid[warp * 16 + lane] = row < p.hidden ? weight_at(p.embed, st.col.token, row) : 0.f;
        st.gain[warp * 16 + lane] = row < p.hidden ? p.layers[0].attn_norm[row] : 0.f;
    }
    consumers_sync();
    if (warp < owned) residual_tile(p, st, warp, 0.f, false);
    unsigned target = 0;
    RingCursor cursor;  // the consumers' place in the ring
    grid_barrier(p, target);

    for (int l = 0; l < p.n_layers; ++l) {
        const PersistentLayer &L = st.layer(l);
        if (l + 1 < p.n_layers) fetch_layer(p, l + 1, st.layer_slot(l + 1));
        const float s_qkv = stage_input(p, st, p.img_x, p.runs_x, L.qkv, true, img_s, pairs_s);
        run_matrix(p, L.qkv, cursor, ring, full, empty, img_s, pairs_s, red, st, nullptr,
                   [&](int tile, int, float v) { qkv_tile(p, st, l, tile, v * s_qkv); });
        if (static_cast<int>(threadIdx.x) < kLayerCopyThreads) wait_async_copies();  // the next layer's
        grid_barrier(p, target);
        if (!p.skip_attention) {
            attention_phase<HD>(p, st, l, red);
            grid_barrier(p, target);
        }

        stage_input(p, st, p.img_att, p.runs_att, L.o, false, img_s, pairs_s);
        run_matrix(p, L.o, cursor, ring, full, empty, img_s, pairs_s, red, st, L.mlp_norm,
                   [&](int, int b, float v) { residual_tile(p, st, b, v, false); });
        grid_barrier(p, target);

        const float s_gu = stage_input(p, st, p.img_x, p.runs_x, L.gate_up, true, img_s, pairs_s);
        run_matrix(p, L.gate_up, cursor, ring, full, empty, img_s, pairs_s, red, st, nullptr, [&](int pair, int, float v) {
            const int lane = threadIdx.x % 32, row = pair * 16 + lane;
            const float up = __shfl_down_sync(~0u, v, 16);
            const float x[1] = {lane < 16 && row < p.inter ? silu(v * s_gu) * (up * s_gu) : 0.f};
            write_image<1>(x, lane < 16, pair, lane, reinterpret_cast<unsigned char *>(p.img_act), p.runs_act);
        });
        grid_barrier(p, target);

        stage_input(p, st, p.img_act, p.runs_act, L.down, false, img_s, pairs_s);
        const bool last = l + 1 == p.n_layers, head_after = last && p.n_head_parts == 0;
        run_matrix(p, L.down, cursor, ring, full, empty, img_s, pairs_s, red, st,
                   last ? p.final_norm : st.layer(l + 1).attn_norm,
                   [&](int, int b, float v) { residual_tile(p, st, b, v, head_after); });
        if (!head_after) grid_barrier(p, target);
    }
    if (p.n_head_parts > 0) {
        const float s_head = stage_input(p, st, p.img_x, p.runs_x, p.head[0], true, img_s, pairs_s);
        for (int part = 0; part < p.n_head_parts; ++part) {
            const int tile0 = p.head_tile0[part];
            run_matrix(p, p.head[part], cursor, ring, full, empty, img_s, pairs_s, red, st, nullptr,
                       [&](int tile, int, float v) {
                           const int row = (tile0 + tile) * 16 + static_cast<int>(threadIdx.x % 32);
                           if (threadIdx.x % 32 < 16 && row < p.vocab) p.logits[row] = v * s_head;
                       });
            consumers_sync();  // red is reused by the next part
        }
    }
#endif
}

using StepKernel = void (*)(PersistentStep);
StepKernel kernel_for(int head_dim) { return head_dim == 64 ? persistent_step_kernel<64> : persistent_step_kernel<128>; }

}  // namespace

size_t persistent_smem_bytes(const PersistentStep &p) {
    // The staged image (one byte per input), then one 16-byte pair record per 32 inputs.
    return static_cast<size_t>(p.stages) * p.stage_bytes + static_cast<size_t>(p.image_bytes) +
           static_cast<size_t>(p.image_bytes) / 2 + sizeof(float) * kRedFloats;
}

bool persistent_step_supported(int device, const PersistentStep &p, int num_sms, std::string *why) {
    int major = 0, optin = 0;
    PUMICE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (major < 9) {
        *why = "needs sm_90 (bulk copies into shared memory)";
        return false;
    }
    PUMICE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const StepKernel kernel = kernel_for(p.head_dim);
    cudaFuncAttributes attrs{};
    PUMICE_CUDA_CHECK(cudaFuncGetAttributes(&attrs, kernel));
    const size_t smem = persistent_smem_bytes(p);
    if (smem + attrs.sharedSizeBytes > static_cast<size_t>(optin)) {
        *why = "needs " + std::to_string(smem + attrs.sharedSizeBytes) +
               " bytes of shared memory per block, the device allows " + std::to_string(optin);
        return false;
    }
    // The grid barriers need one resident block per SM (the cooperative launch checks it too).
    PUMICE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    int per_sm = 0;
    PUMICE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    int sms = 0;
    PUMICE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (per_sm < 1 || sms < num_sms) {
        *why = "one block per SM does not fit";
        return false;
    }
    return true;
}

void launch_persistent_step(const PersistentStep &p, int num_sms, cudaStream_t stream) {
    const size_t smem = persistent_smem_bytes(p);
    const StepKernel kernel = kernel_for(p.head_dim);
    PUMICE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    // Cooperative: the grid barriers need every block resident, which the launch then guarantees.
    cudaLaunchAttribute attr[1] = {};
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(num_sms));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    PUMICE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
    PUMICE_CUDA_CHECK_LAUNCH("persistent_step");
}

}  // namespace cuda
}  // namespace pumice
