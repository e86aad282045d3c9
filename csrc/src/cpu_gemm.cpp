// cpu_gemm.cpp — see cpu_gemm.h.
#include "cpu_gemm.h"

#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace pumice {

namespace {

// Register tile: kRows weight rows × kTokens tokens of dot products at a time. With AVX2 this
// is 12 accumulators + 4 weight vectors (x is a memory operand of the FMA), i.e. 16 registers.
#ifndef PUMICE_GEMM_ROWS
#define PUMICE_GEMM_ROWS 3
#define PUMICE_GEMM_TOKENS 4
#endif
constexpr int kRows = PUMICE_GEMM_ROWS;
constexpr int kTokens = PUMICE_GEMM_TOKENS;

// out[t*ldy + r] += dot(w[r][0..kc), x[t*ldx + 0..kc)) for r < R, t < T.
template <int R, int T>
void micro_kernel(const float *const *w, const float *x, int64_t ldx, int64_t kc, float *y,
                  int64_t ldy) {
    int64_t k = 0;
    float sums[R][T];
#if PUMICE_HAVE_AVX2
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    for (; k + 8 <= kc; k += 8) {
        __m256 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w[r] + k);
        for (int t = 0; t < T; ++t) {
            const __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
            for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) sums[r][t] = simd::hsum(acc[r][t]);
#else
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) sums[r][t] = 0.0f;
#endif
    for (; k < kc; ++k)
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) sums[r][t] += w[r][k] * x[t * ldx + k];
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) y[t * ldy + r] += sums[r][t];
}

using MicroKernel = void (*)(const float *const *, const float *, int64_t, int64_t, float *,
                             int64_t);

template <int R, int T = kTokens>
MicroKernel pick_tokens(int t) {
    if constexpr (T == 1) {
        return micro_kernel<R, 1>;
    } else {
        return t >= T ? micro_kernel<R, T> : pick_tokens<R, T - 1>(t);
    }
}

template <int R = kRows>
MicroKernel pick(int r, int t) {
    if constexpr (R == 1) {
        return pick_tokens<1>(t);
    } else {
        return r >= R ? pick_tokens<R>(t) : pick<R - 1>(r, t);
    }
}

}  // namespace

int64_t rows_grain(int64_t K, int64_t multiple) {
    // About 32K multiply-adds per chunk at least.
    int64_t rows = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, K));
    return (rows + multiple - 1) / multiple * multiple;
}

void gemm_rows(const void *ctx, GemmRowLoader load, int64_t N, int64_t K, const float *x,
               int64_t ldx, int64_t batch, float *y, ThreadPool &pool) {
    if (N <= 0 || batch <= 0) return;
    const int64_t n_blocks = (N + kRows - 1) / kRows;
    const int64_t grain = std::max<int64_t>(1, rows_grain(K * std::min<int64_t>(batch, 8), kRows) / kRows);
    pool.parallel_for(n_blocks, grain, [&](int64_t block_begin, int64_t block_end) {
        thread_local std::vector<float> scratch;
        scratch.resize(size_t(kRows * kGemmKChunk));
        const int64_t row_begin = block_begin * kRows;
        const int64_t row_end = std::min(N, block_end * kRows);
        for (int64_t b = 0; b < batch; ++b)
            std::fill(y + b * N + row_begin, y + b * N + row_end, 0.0f);
        // Row blocks outermost: each weight row is then read front to back (a stream the
        // hardware prefetcher follows); walking K in the outer loop instead touches every row
        // in short pieces and measured 4-5x slower. The activations of all tokens for one K
        // chunk are re-read per row block from L2/L3.
        for (int64_t n0 = row_begin; n0 < row_end; n0 += kRows) {
            const int rows = int(std::min<int64_t>(kRows, row_end - n0));
            const MicroKernel full = pick(rows, kTokens);
            for (int64_t k0 = 0; k0 < K; k0 += kGemmKChunk) {
                const int64_t k1 = std::min(K, k0 + kGemmKChunk);
                const float *w[kRows];
                for (int r = 0; r < rows; ++r)
                    w[r] = load(ctx, n0 + r, k0, k1, scratch.data() + r * kGemmKChunk);
                int64_t t0 = 0;
                for (; t0 + kTokens <= batch; t0 += kTokens)
                    full(w, x + t0 * ldx + k0, ldx, k1 - k0, y + t0 * N + n0, N);
                if (t0 < batch)
                    pick(rows, int(batch - t0))(w, x + t0 * ldx + k0, ldx, k1 - k0,
                                                y + t0 * N + n0, N);
            }
        }
    });
}

}  // namespace pumice
