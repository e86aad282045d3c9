// sampling_core.h — the arithmetic both samplers share (host: sampling.cpp, CUDA: sampling.cu).
//
// Everything that decides *which* token is drawn is defined here once, so that the host and
// the device sampler agree bit for bit on the same logits: the order of tokens, the weight of a
// token, its integer mass, the random number of a step. Only IEEE-exact operations appear
// (compare, subtract, multiply, conversions, a correctly rounded reciprocal); exp is taken in
// double and rounded to float — on the device by CUDA's exp (weight_of), on the host by a
// vectorised series of the same accuracy (sampling.cpp, weights_of) — which agrees on both
// sides except in vanishingly rare cases (and the CUDA build's --use_fast_math touches single
// precision only).
//
// Definitions (docs/RUNTIME.md, "Native sampling"):
//  - logits are sanitised: NaN counts as -inf, -0 as +0;
//  - order: a token ranks above another if its logit is larger, or equal with a lower id. The
//    64-bit "rank key" (ordered logit bits << 32 | ~id) is unique per token and sorts that way;
//  - weight w = exp((logit - max) * (1/T)) as float; mass q = floor(w * 2^40) as an integer, and
//    tokens with (logit - max) * (1/T) < kLogWeightCut have mass 0 (they are below 2^-40 of the
//    best token). Integer masses make every sum exact, so totals do not depend on summation
//    order (GPU reductions stay deterministic).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PUMICE_HD __host__ __device__ __forceinline__
#else
#define PUMICE_HD inline
#endif

namespace pumice {
namespace sampling {

// exp(-27.8) < 2^-40: below this the mass floor(w * 2^40) is 0 anyway; skipping exp there is
// the host sampler's main saving, and stating it as a rule keeps both sides identical.
constexpr float kLogWeightCut = -27.8f;
constexpr float kMassScale = 1099511627776.0f;  // 2^40

// The bits of a float as uint32 and back (memcpy: defined behaviour, a register move on both sides).
template <class To, class From> PUMICE_HD To bit_copy(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit_copy needs equal sizes");
    To out;
    std::memcpy(&out, &v, sizeof out);
    return out;
}
PUMICE_HD uint32_t float_bits(float x) { return bit_copy<uint32_t>(x); }
PUMICE_HD float bits_float(uint32_t u) { return bit_copy<float>(u); }

PUMICE_HD float sanitize(float x) {
    if (x != x) return bits_float(0xff800000u);  // NaN -> -inf
    return x == 0.0f ? 0.0f : x;                 // -0 -> +0
}

// Monotone map of a (sanitised) float to uint32: a < b  <=>  ordered(a) < ordered(b).
// Branch-free (the sign of a logit is a coin toss on flat rows): negative floats have every bit
// flipped, others only the sign bit.
PUMICE_HD uint32_t ordered_bits(float x) {
    const uint32_t u = float_bits(x);
    const uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31);
    return u ^ (negative | 0x80000000u);
}

PUMICE_HD float from_ordered_bits(uint32_t k) {
    return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Unique per token; larger key = ranks higher (larger logit, then lower id). Never 0.
PUMICE_HD uint64_t rank_key(float sanitized_logit, int32_t id) {
    return (static_cast<uint64_t>(ordered_bits(sanitized_logit)) << 32) |
           static_cast<uint64_t>(~static_cast<uint32_t>(id));
}
PUMICE_HD float rank_key_logit(uint64_t key) { return from_ordered_bits(static_cast<uint32_t>(key >> 32)); }

// The scaled log-weight of a token: (logit - max) / T, as the product with the reciprocal.
PUMICE_HD float log_weight(float sanitized_logit, float max_logit, float inv_temperature) {
    return (sanitized_logit - max_logit) * inv_temperature;
}

PUMICE_HD float weight_of(float log_w) {
#if defined(__CUDA_ARCH__)
    return static_cast<float>(::exp(static_cast<double>(log_w)));
#else
    return static_cast<float>(__builtin_exp(static_cast<double>(log_w)));
#endif
}

// w * 2^40 <= 2^40 fits int64, whose conversion is one instruction (to uint64 x86 needs a branch).
PUMICE_HD uint64_t mass_of_weight(float w) { return static_cast<uint64_t>(static_cast<int64_t>(w * kMassScale)); }

// Mass of a token, and its weight (0 below the cut).
PUMICE_HD uint64_t token_mass(float log_w, float *w_out) {
    if (!(log_w >= kLogWeightCut)) {
        *w_out = 0.0f;
        return 0;
    }
    const float w = weight_of(log_w);
    *w_out = w;
    return mass_of_weight(w);
}

// Top-p: the mass the kept prefix must reach, ceil(top_p * total), at least 1, at most total.
PUMICE_HD uint64_t top_p_need(float top_p, uint64_t total) {
    double want = static_cast<double>(top_p) * static_cast<double>(total);
#if defined(__CUDA_ARCH__)
    want = ::ceil(want);
#else
    want = __builtin_ceil(want);
#endif
    uint64_t need = want >= 18446744073709551615.0 ? total : static_cast<uint64_t>(want);
    if (need < 1) need = 1;
    if (need > total) need = total;
    return need;
}

// ---- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) ----

struct Philox4 {
    uint32_t v[4];
};

PUMICE_HD void mul_hi_lo(uint32_t a, uint32_t b, uint32_t *hi, uint32_t *lo) {
    const uint64_t p = static_cast<uint64_t>(a) * b;
    *hi = static_cast<uint32_t>(p >> 32);
    *lo = static_cast<uint32_t>(p);
}

PUMICE_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; ++round) {
        uint32_t hi0, lo0, hi1, lo1;
        mul_hi_lo(0xD2511F53u, ctr.v[0], &hi0, &lo0);
        mul_hi_lo(0xCD9E8D57u, ctr.v[2], &hi1, &lo1);
        Philox4 next;
        next.v[0] = hi1 ^ ctr.v[1] ^ k0;
        next.v[1] = lo1;
        next.v[2] = hi0 ^ ctr.v[3] ^ k1;
        next.v[3] = lo0;
        ctr = next;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return ctr;
}

// The step's 64 random bits: keyed by the seed, counted by the position the sampled token will
// occupy in its session (so batching, streaming and neighbours never change a draw).
constexpr uint32_t kDrawDomain = 0x73616d70u;  // "samp": keeps other future streams apart

PUMICE_HD uint64_t draw_bits(uint64_t seed, uint64_t position) {
    Philox4 ctr;
    ctr.v[0] = static_cast<uint32_t>(position);
    ctr.v[1] = static_cast<uint32_t>(position >> 32);
    ctr.v[2] = kDrawDomain;
    ctr.v[3] = 0;
    const Philox4 out = philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    return (static_cast<uint64_t>(out.v[0]) << 32) | out.v[1];
}

// floor(bits / 2^64 * total): the mass offset the draw lands on, uniform in [0, total).
PUMICE_HD uint64_t draw_offset(uint64_t bits, uint64_t total) {
#if defined(__CUDA_ARCH__)
    return __umul64hi(bits, total);
#else
    return static_cast<uint64_t>((static_cast<unsigned __int128>(bits) * total) >> 64);
#endif
}

}  // namespace sampling
}  // namespace pumice
