// kind_rtn.cpp — the `rtn` kind: W[n, k] = scale[n, k/g] * code(n, k) + min[n, k/g].
//
// Batch 1 (decode) is bound by reading the codes, so the weights are never expanded to memory:
// a block of 32 codes is unpacked in registers and multiplied with the activations there.
//   * INT8 mode (default): x is quantized once per call to int8 per block of 32 (absmax/127);
//     for 2..4 bits a block is one maddubs + madd (u8 codes × i8 x), for 8 bits two madd on
//     16-bit lanes (u8 × i8 would saturate). The per-block integer dot product is scaled by the
//     block's x scale, the group's f16 scale multiplies the group total; a per-group correction
//     makes the rounding meet the codes centred on their mid-range (centring_corrections).
//   * F32 mode (exact): codes → floats, FMA with f32 x.
// In both modes the mins are folded in through the group sums of x:
//   sum_k (s_g c_k + m_g) x_k = sum_g s_g (sum_{k in g} c_k x_k) + sum_g m_g X_g,
// with X_g = sum_{k in g} x_k computed once per call (exactly, in f32) for all rows.
// Batch > 1 (prefill, decode_batch) dequantizes tiles of rows to f32 and uses gemm_rows().
#include "kind_rtn.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_gemm.h"
#include "cpu_simd.h"
#include "errors.h"

namespace pumice {

namespace {

constexpr int64_t kBlock = 32;

// ---- block orders ----------------------------------------------------------------------------
// 2 bits: qword q of the register holds the 8 bytes shifted right by 2q → lane 8q+i is code 4i+q.
// 3 bits: codes are decoded into 16-bit lanes, codes 0..15 in one register and 16..31 in a
//         second, then packed to bytes per 128-bit half → lane 16h+m is code 8h+m for m < 8 and
//         16+8h+(m-8) for m >= 8.
// 4 bits: both halves hold the 16 bytes, the upper shifted by 4 → lane 16h+i is code 2i+h.
// 8 bits: natural.
struct BlockOrders {
    uint8_t order[9][kBlock] = {};
    BlockOrders() {
        for (int lane = 0; lane < kBlock; ++lane) {
            order[2][lane] = uint8_t(4 * (lane % 8) + lane / 8);
            const int h = lane / 16, m = lane % 16;
            order[3][lane] = uint8_t(m < 8 ? 8 * h + m : 16 + 8 * h + (m - 8));
            order[4][lane] = uint8_t(2 * (lane % 16) + lane / 16);
            order[8][lane] = uint8_t(lane);
        }
    }
};
const BlockOrders kOrders;

// Code j of a row, straight from the bit-stream definition (FORMAT.md).
inline uint32_t code_at(const uint8_t *row, int bits, int64_t j) {
    const int64_t bit = j * bits;
    const int64_t byte = bit >> 3;
    const int shift = int(bit & 7);
    uint32_t v = row[byte];
    if (shift + bits > 8) v |= uint32_t(row[byte + 1]) << 8;
    return (v >> shift) & ((1u << bits) - 1);
}

// Portable unpack of one block into kernel order.
inline void unpack_block_scalar(const uint8_t *block, int bits, uint8_t *out) {
    const uint8_t *order = kOrders.order[bits];
    for (int lane = 0; lane < kBlock; ++lane) out[lane] = uint8_t(code_at(block, bits, order[lane]));
}

#if PUMICE_HAVE_AVX2
template <int B>
inline __m256i unpack32(const uint8_t *p) {
    if constexpr (B == 2) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        return _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(int64_t(v)),
                                                  _mm256_setr_epi64x(0, 2, 4, 6)),
                                _mm256_set1_epi8(0x03));
    } else if constexpr (B == 3) {
        // Each 16-bit lane gathers the two bytes holding its code (pshufb), a multiply by
        // 2^(13 - bit offset) moves the code to bits 13..15 and a shift brings it down: AVX2 has
        // no per-lane 16-bit shift, the multiply is one. Ten instructions for 32 codes.
        uint32_t tail;
        std::memcpy(&tail, p + 8, 4);
        const __m128i bytes = _mm_insert_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i *>(p)), int(tail), 2);
        const __m256i both = _mm256_broadcastsi128_si256(bytes);
        const __m256i first = _mm256_shuffle_epi8(
            both, _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 1, 2, 1, 2, 1, 2, 2, 3, 2, 3,
                                   3, 4, 3, 4, 3, 4, 4, 5, 4, 5, 4, 5, 5, 6, 5, 6));
        const __m256i second = _mm256_shuffle_epi8(
            both, _mm256_setr_epi8(6, 7, 6, 7, 6, 7, 7, 8, 7, 8, 7, 8, 8, 9, 8, 9,
                                   9, 10, 9, 10, 9, 10, 10, 11, 10, 11, 10, 11, 11, -1, 11, -1));
        const __m256i to_top = _mm256_setr_epi16(8192, 1024, 128, 4096, 512, 64, 2048, 256,
                                                 8192, 1024, 128, 4096, 512, 64, 2048, 256);
        const __m256i a = _mm256_srli_epi16(_mm256_mullo_epi16(first, to_top), 13);
        const __m256i b = _mm256_srli_epi16(_mm256_mullo_epi16(second, to_top), 13);
        return _mm256_packus_epi16(a, b);
    } else if constexpr (B == 4) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
        return _mm256_and_si256(_mm256_srlv_epi64(_mm256_broadcastsi128_si256(v),
                                                  _mm256_setr_epi64x(0, 0, 4, 4)),
                                _mm256_set1_epi8(0x0f));
    } else {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
    }
}

// Sum over 32 lanes of u8 codes × i8 activations, as eight i32 partial sums.
template <int B>
inline __m256i dot32_u8_i8(__m256i codes, const int8_t *xq) {
    if constexpr (B <= 4) {
        // codes ≤ 15, |x| ≤ 127: pairs stay far below the i16 saturation of maddubs.
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xq));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1));
    } else {
        // 8-bit codes: xq points at the int16 copy of the block (PreparedX::xq16).
        const int16_t *x16 = reinterpret_cast<const int16_t *>(xq);
        const __m256i c_lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(codes));
        const __m256i c_hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(codes, 1));
        const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x16));
        const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x16 + 16));
        return _mm256_add_epi32(_mm256_madd_epi16(c_lo, x_lo), _mm256_madd_epi16(c_hi, x_hi));
    }
}

// The four groups of eight codes of an unpacked block, as floats.
inline void codes_to_f32(__m256i codes, __m256 out[4]) {
    const __m128i lo = _mm256_castsi256_si128(codes);
    const __m128i hi = _mm256_extracti128_si256(codes, 1);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}
#endif

// sum_i f16(a[i]) * b[i]
inline float dot_f16_f32(const uint16_t *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if PUMICE_HAVE_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(simd::load8_f16(a + i), _mm256_loadu_ps(b + i), acc);
    s = simd::hsum(acc);
#endif
    for (; i < n; ++i) s += simd::f16_to_f32(a[i]) * b[i];
    return s;
}

// ---- activations prepared once per call --------------------------------------------------------

struct PreparedX {
    std::vector<float> xf;      // [Kp] in kernel order, zero padded
    std::vector<int8_t> xq;     // [Kp] int8, kernel order (INT8 mode)
    std::vector<int16_t> xq16;  // [Kp] the same values as int16 (INT8 mode, 8-bit codes)
    std::vector<float> dx;      // [Kp/32] scale of each int8 block
    std::vector<float> xsum;    // [G] exact group sums of x
    std::vector<float> xcentre; // [G] (INT8 mode) (L/2) * sum over the group's blocks of (X - d Q)
};

// x (natural order, K floats) → kernel order, zero padded to Kp.
void permute_x(const float *x, int64_t K, int64_t Kp, int bits, float *out) {
    const uint8_t *order = kOrders.order[bits];
    for (int64_t b0 = 0; b0 < Kp; b0 += kBlock) {
        if (b0 + kBlock <= K) {
            for (int lane = 0; lane < kBlock; ++lane) out[b0 + lane] = x[b0 + order[lane]];
        } else {
            for (int lane = 0; lane < kBlock; ++lane) {
                const int64_t k = b0 + order[lane];
                out[b0 + lane] = k < K ? x[k] : 0.0f;
            }
        }
    }
}

void quantize_blocks_int8(const float *xf, int64_t Kp, int8_t *xq, float *dx) {
    for (int64_t b0 = 0, blk = 0; b0 < Kp; b0 += kBlock, ++blk) {
        float amax = 0.0f;
        for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xf[b0 + i]));
        const float d = amax / 127.0f;
        dx[blk] = d;
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < kBlock; ++i)
            xq[b0 + i] = int8_t(std::lrintf(std::min(127.0f, std::max(-127.0f, xf[b0 + i] * inv))));
    }
}

// The int8 rounding meets the codes centred on L/2 (L = 2^bits - 1) instead of the codes
// themselves: sum_k c_k x_k ~= d sum_k c_k q_k + (L/2) (X - d Q) per block, with X = sum_k x_k
// exact and Q = sum_k q_k, because the (L/2)·x part is carried by X. With uniform codes that is
// about 0.6x (2 bits) to 0.5x (4 and 8 bits) the error of d sum_k c_k q_k alone. out[g] holds
// the group's correction (before its scale); its X is the group sum the mins use.
void centring_corrections(const int8_t *xq, const float *dx, const float *xsum, int64_t n_blocks,
                          int64_t blocks_per_group, int64_t G, int bits, float *out) {
    const float half_range = 0.5f * float((1 << bits) - 1);
    for (int64_t gi = 0; gi < G; ++gi) {
        float dq = 0.0f;
        const int64_t end = std::min(n_blocks, (gi + 1) * blocks_per_group);
        for (int64_t blk = gi * blocks_per_group; blk < end; ++blk) {
            int q_sum = 0;
            for (int i = 0; i < kBlock; ++i) q_sum += xq[blk * kBlock + i];
            dq += dx[blk] * float(q_sum);
        }
        out[gi] = half_range * (xsum[gi] - dq);
    }
}

void group_sums(const float *x, int64_t K, int64_t g, int64_t G, float *out) {
    for (int64_t gi = 0; gi < G; ++gi) {
        float s = 0.0f;
        const int64_t end = std::min(K, (gi + 1) * g);
        for (int64_t k = gi * g; k < end; ++k) s += x[k];
        out[gi] = s;
    }
}

// ---- batch-1 kernels -----------------------------------------------------------------------------

struct GemvArgs {
    const uint8_t *codes;
    const uint16_t *scales;
    const uint16_t *mins;
    int64_t row_bytes, n_groups, n_blocks, blocks_per_group;
    const PreparedX *px;
    float *y;
};

#if PUMICE_HAVE_AVX2
// Two rows at a time: they share the activation loads and give the core two independent chains.
template <int B, int ROWS>
void gemv_int8_block(const GemvArgs &a, int64_t n) {
    constexpr int64_t block_bytes = 4 * B;
    const PreparedX &px = *a.px;
    const uint8_t *row[ROWS];
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        row[r] = a.codes + (n + r) * a.row_bytes;
        acc[r] = _mm256_setzero_ps();
    }
    for (int64_t gi = 0; gi < a.n_groups; ++gi) {
        const int64_t blk_begin = gi * a.blocks_per_group;
        const int64_t blk_end = std::min(a.n_blocks, blk_begin + a.blocks_per_group);
        __m256 group_acc[ROWS];
        for (int r = 0; r < ROWS; ++r) group_acc[r] = _mm256_setzero_ps();
        for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
            const int8_t *xq = B == 8 ? reinterpret_cast<const int8_t *>(px.xq16.data() + blk * kBlock)
                                      : px.xq.data() + blk * kBlock;
            const __m256 d = _mm256_broadcast_ss(px.dx.data() + blk);
            for (int r = 0; r < ROWS; ++r) {
                const __m256i c = unpack32<B>(row[r] + blk * block_bytes);
                group_acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_u8_i8<B>(c, xq)), d,
                                               group_acc[r]);
            }
        }
        for (int r = 0; r < ROWS; ++r)
            acc[r] = _mm256_fmadd_ps(group_acc[r],
                                     _mm256_set1_ps(_cvtsh_ss(a.scales[(n + r) * a.n_groups + gi])),
                                     acc[r]);
    }
    // The mins meet the exact group sums; the scales meet the centring corrections.
    for (int r = 0; r < ROWS; ++r)
        a.y[n + r] = simd::hsum(acc[r]) +
                     dot_f16_f32(a.mins + (n + r) * a.n_groups, px.xsum.data(), a.n_groups) +
                     dot_f16_f32(a.scales + (n + r) * a.n_groups, px.xcentre.data(), a.n_groups);
}

template <int B, int ROWS>
void gemv_f32_block(const GemvArgs &a, int64_t n) {
    constexpr int64_t block_bytes = 4 * B;
    const PreparedX &px = *a.px;
    const uint8_t *row[ROWS];
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        row[r] = a.codes + (n + r) * a.row_bytes;
        acc[r] = _mm256_setzero_ps();
    }
    for (int64_t gi = 0; gi < a.n_groups; ++gi) {
        const int64_t blk_begin = gi * a.blocks_per_group;
        const int64_t blk_end = std::min(a.n_blocks, blk_begin + a.blocks_per_group);
        __m256 even[ROWS], odd[ROWS];
        for (int r = 0; r < ROWS; ++r) even[r] = odd[r] = _mm256_setzero_ps();
        for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
            const float *xf = px.xf.data() + blk * kBlock;
            const __m256 x0 = _mm256_loadu_ps(xf), x1 = _mm256_loadu_ps(xf + 8),
                         x2 = _mm256_loadu_ps(xf + 16), x3 = _mm256_loadu_ps(xf + 24);
            for (int r = 0; r < ROWS; ++r) {
                __m256 c[4];
                codes_to_f32(unpack32<B>(row[r] + blk * block_bytes), c);
                even[r] = _mm256_fmadd_ps(c[0], x0, even[r]);
                odd[r] = _mm256_fmadd_ps(c[1], x1, odd[r]);
                even[r] = _mm256_fmadd_ps(c[2], x2, even[r]);
                odd[r] = _mm256_fmadd_ps(c[3], x3, odd[r]);
            }
        }
        for (int r = 0; r < ROWS; ++r)
            acc[r] = _mm256_fmadd_ps(_mm256_add_ps(even[r], odd[r]),
                                     _mm256_set1_ps(_cvtsh_ss(a.scales[(n + r) * a.n_groups + gi])),
                                     acc[r]);
    }
    for (int r = 0; r < ROWS; ++r)
        a.y[n + r] = simd::hsum(acc[r]) +
                     dot_f16_f32(a.mins + (n + r) * a.n_groups, px.xsum.data(), a.n_groups);
}

template <int B>
void gemv_rows(const GemvArgs &a, int64_t n0, int64_t n1, RtnActivations mode) {
    int64_t n = n0;
    if (mode == RtnActivations::INT8) {
        for (; n + 4 <= n1; n += 4) gemv_int8_block<B, 4>(a, n);
        for (; n + 2 <= n1; n += 2) gemv_int8_block<B, 2>(a, n);
        for (; n < n1; ++n) gemv_int8_block<B, 1>(a, n);
    } else {
        for (; n + 2 <= n1; n += 2) gemv_f32_block<B, 2>(a, n);
        for (; n < n1; ++n) gemv_f32_block<B, 1>(a, n);
    }
}
#endif

// Portable batch-1 kernel (exact f32).
[[maybe_unused]] void gemv_rows_scalar(const GemvArgs &a, int bits, int64_t n0, int64_t n1) {
    const PreparedX &px = *a.px;
    const int64_t block_bytes = 4 * bits;
    uint8_t codes[kBlock];
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *row = a.codes + n * a.row_bytes;
        float total = 0.0f;
        for (int64_t gi = 0; gi < a.n_groups; ++gi) {
            const int64_t blk_begin = gi * a.blocks_per_group;
            const int64_t blk_end = std::min(a.n_blocks, blk_begin + a.blocks_per_group);
            float group = 0.0f;
            for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
                unpack_block_scalar(row + blk * block_bytes, bits, codes);
                const float *xf = px.xf.data() + blk * kBlock;
                for (int lane = 0; lane < kBlock; ++lane) group += float(codes[lane]) * xf[lane];
            }
            total += simd::f16_to_f32(a.scales[n * a.n_groups + gi]) * group;
        }
        a.y[n] = total + dot_f16_f32(a.mins + n * a.n_groups, px.xsum.data(), a.n_groups);
    }
}

RtnActivations activations_from_env() {
    const char *v = std::getenv("PUMICE_RTN_ACTIVATIONS");
    if (v && std::string(v) == "f32") return RtnActivations::F32;
    return RtnActivations::INT8;
}

}  // namespace

const uint8_t *rtn_block_order(int bits) { return kOrders.order[bits]; }

int64_t rtn_per_token_batch_limit(int bits, RtnActivations mode) {
    if (mode == RtnActivations::F32) return 2;
    return (bits == 2 || bits == 4) ? 8 : 4;
}

RtnLinear::RtnLinear(const TensorView &view) {
    out_features = view.shape[0];
    in_features = view.shape[1];
    const int64_t bits = view.int_param("bits");
    const int64_t g = view.int_param("group_size");
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        throw FormatError("tensor '" + view.name() + "': rtn bits must be 2, 3, 4 or 8, not " +
                          std::to_string(bits));
    if (g < 32 || g > 4096 || g % 32 != 0)
        throw FormatError("tensor '" + view.name() +
                          "': rtn group_size must be a multiple of 32 in 32..4096, not " +
                          std::to_string(g));
    bits_ = int(bits);
    group_size_ = g;
    const int64_t N = out_features, K = in_features;
    n_groups_ = (K + g - 1) / g;
    padded_k_ = (K + kBlock - 1) / kBlock * kBlock;
    row_bytes_ = padded_k_ * bits_ / 8;
    codes_ = view.part("codes", DType::U8, {N, row_bytes_}).data;
    scales_ = reinterpret_cast<const uint16_t *>(view.part("scales", DType::F16, {N, n_groups_}).data);
    mins_ = reinterpret_cast<const uint16_t *>(view.part("mins", DType::F16, {N, n_groups_}).data);
    activations_ = activations_from_env();
#if !PUMICE_HAVE_AVX2
    activations_ = RtnActivations::F32;
#endif
}

int64_t RtnLinear::stored_bytes() const {
    return out_features * (row_bytes_ + 4 * n_groups_);
}

void RtnLinear::apply(const float *x, int64_t batch, float *y, ThreadPool &pool) const {
    // The tiled GEMM costs about 8 ms for 8 tokens on 4096×4096 at any width (FMA bound, one
    // thread) against, per token, 0.74 / 1.73 / 0.89 / 1.58 ms for the 2 / 3 / 4 / 8-bit int8
    // GEMV and ~2 ms for the exact one. Small batches (decode_batch) therefore run the GEMV
    // per token, which also gives each session exactly the result it would get decoding alone.
    const int64_t per_token_limit = rtn_per_token_batch_limit(bits_, activations_);
    if (batch <= per_token_limit) {
        for (int64_t b = 0; b < batch; ++b)
            gemv(x + b * in_features, y + b * out_features, pool, activations_);
    } else {
        gemm(x, batch, y, pool);
    }
}

void RtnLinear::gemv(const float *x, float *y, ThreadPool &pool, RtnActivations mode) const {
#if !PUMICE_HAVE_AVX2
    mode = RtnActivations::F32;
#endif
    const int64_t K = in_features, Kp = padded_k_;
    thread_local PreparedX px;
    px.xf.resize(size_t(Kp));
    px.xsum.resize(size_t(n_groups_));
    permute_x(x, K, Kp, bits_, px.xf.data());
    group_sums(x, K, group_size_, n_groups_, px.xsum.data());
    if (mode == RtnActivations::INT8) {
        px.xq.resize(size_t(Kp));
        px.dx.resize(size_t(Kp / kBlock));
        quantize_blocks_int8(px.xf.data(), Kp, px.xq.data(), px.dx.data());
        px.xcentre.resize(size_t(n_groups_));
        centring_corrections(px.xq.data(), px.dx.data(), px.xsum.data(), Kp / kBlock, group_size_ / kBlock,
                             n_groups_, bits_, px.xcentre.data());
        if (bits_ == 8) px.xq16.assign(px.xq.begin(), px.xq.end());
    }
    const GemvArgs args{codes_, scales_, mins_, row_bytes_, n_groups_, Kp / kBlock,
                        group_size_ / kBlock, &px, y};
    const int bits = bits_;
    pool.parallel_for(out_features, rows_grain(K, 2), [&](int64_t n0, int64_t n1) {
#if PUMICE_HAVE_AVX2
        switch (bits) {
            case 2: gemv_rows<2>(args, n0, n1, mode); break;
            case 3: gemv_rows<3>(args, n0, n1, mode); break;
            case 4: gemv_rows<4>(args, n0, n1, mode); break;
            default: gemv_rows<8>(args, n0, n1, mode); break;
        }
#else
        gemv_rows_scalar(args, bits, n0, n1);
#endif
    });
}

namespace {
#if PUMICE_HAVE_AVX2
// Blocks [block_begin, block_end) of one row → floats in kernel order; scale and min are
// converted once per group rather than once per block.
template <int B>
void dequantize_blocks_avx2(const uint8_t *codes, const uint16_t *scales, const uint16_t *mins,
                            int64_t blocks_per_group, int64_t block_begin, int64_t block_end,
                            float *out) {
    int64_t blk = block_begin;
    while (blk < block_end) {
        const int64_t gi = blk / blocks_per_group;
        const int64_t group_end = std::min(block_end, (gi + 1) * blocks_per_group);
        const __m256 sv = _mm256_set1_ps(_cvtsh_ss(scales[gi]));
        const __m256 mv = _mm256_set1_ps(_cvtsh_ss(mins[gi]));
        for (; blk < group_end; ++blk, out += kBlock) {
            __m256 cf[4];
            codes_to_f32(unpack32<B>(codes + blk * 4 * B), cf);
            for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + 8 * j, _mm256_fmadd_ps(cf[j], sv, mv));
        }
    }
}
#endif
}  // namespace

void RtnLinear::dequantize_blocks(int64_t row, int64_t block_begin, int64_t block_end,
                                  float *out) const {
    const uint8_t *codes = codes_ + row * row_bytes_;
    const uint16_t *scales = scales_ + row * n_groups_;
    const uint16_t *mins = mins_ + row * n_groups_;
    const int64_t blocks_per_group = group_size_ / kBlock;
#if PUMICE_HAVE_AVX2
    switch (bits_) {
        case 2: dequantize_blocks_avx2<2>(codes, scales, mins, blocks_per_group, block_begin, block_end, out); break;
        case 3: dequantize_blocks_avx2<3>(codes, scales, mins, blocks_per_group, block_begin, block_end, out); break;
        case 4: dequantize_blocks_avx2<4>(codes, scales, mins, blocks_per_group, block_begin, block_end, out); break;
        default: dequantize_blocks_avx2<8>(codes, scales, mins, blocks_per_group, block_begin, block_end, out); break;
    }
#else
    const int64_t block_bytes = 4 * bits_;
    uint8_t c[kBlock];
    for (int64_t blk = block_begin; blk < block_end; ++blk, out += kBlock) {
        const int64_t gi = blk / blocks_per_group;
        const float s = simd::f16_to_f32(scales[gi]);
        const float m = simd::f16_to_f32(mins[gi]);
        unpack_block_scalar(codes + blk * block_bytes, bits_, c);
        for (int lane = 0; lane < kBlock; ++lane) out[lane] = s * float(c[lane]) + m;
    }
#endif
}

const float *RtnLinear::load_rows(const void *ctx, int64_t row, int64_t k0, int64_t k1,
                                  float *scratch) {
    static_cast<const RtnLinear *>(ctx)->dequantize_blocks(row, k0 / kBlock, k1 / kBlock, scratch);
    return scratch;
}

void RtnLinear::gemm(const float *x, int64_t batch, float *y, ThreadPool &pool) const {
    const int64_t K = in_features, Kp = padded_k_;
    thread_local std::vector<float> xp;
    xp.resize(size_t(batch * Kp));
    for (int64_t b = 0; b < batch; ++b) permute_x(x + b * K, K, Kp, bits_, xp.data() + b * Kp);
    gemm_rows(this, &RtnLinear::load_rows, out_features, Kp, xp.data(), Kp, batch, y, pool);
}

void RtnLinear::dequantize_row(int64_t row, float *out) const {
    const uint8_t *codes = codes_ + row * row_bytes_;
    for (int64_t gi = 0; gi < n_groups_; ++gi) {
        const float s = simd::f16_to_f32(scales_[row * n_groups_ + gi]);
        const float m = simd::f16_to_f32(mins_[row * n_groups_ + gi]);
        const int64_t end = std::min(in_features, (gi + 1) * group_size_);
        for (int64_t k = gi * group_size_; k < end; ++k)
            out[k] = s * float(code_at(codes, bits_, k)) + m;
    }
}

void RtnLinear::dequantize(float *out) const {
    for (int64_t n = 0; n < out_features; ++n) dequantize_row(n, out + n * in_features);
}

namespace {
const bool registered = register_linear_kind(
    "rtn", [](const TensorView &view) -> std::unique_ptr<LinearOp> {
        return std::make_unique<RtnLinear>(view);
    });
}  // namespace

}  // namespace pumice
