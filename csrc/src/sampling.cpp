// sampling.cpp — the host sampler, and the Backend's default sampling methods (used by the
// CPU backend; the CUDA backend samples on the device and comes here only for rows its kernel
// hands back, see csrc/cuda/sampling.cu).
//
// Cost: one pass over the vocabulary finds the maximum, a second computes each token's scaled
// log-weight and keeps the "candidates" above the 2^-40 cut (for a peaked LLM distribution a
// few hundred of 128k; for a flat one, all). Top-k needs only the ranks, so it runs first, as a
// selection of the k best keys, and exp runs only for the tokens it keeps, in a loop the
// compiler vectorises (weights_of). Top-p is a quickselect weighted by mass; the draw walks the
// candidates in id order. No full sort of the vocabulary ever happens.
#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "backend.h"
#include "errors.h"
#include "sampling_core.h"

namespace pumice {

namespace {

struct RankedMass {
    uint64_t key, mass;
};

// The tokens above the cut of one row, as columns (one per thread, reused: no allocation per
// token once a row of this vocabulary has been seen).
struct Candidates {
    std::vector<uint64_t> key;     // rank key (sampling_core.h)
    std::vector<float> log_w;      // scaled log-weight
    std::vector<int32_t> id;
    std::vector<float> weight;     // float(exp(log_w))
    std::vector<uint64_t> mass;    // floor(weight * 2^40)
    std::vector<uint64_t> ranked;  // scratch for top-k
    std::vector<RankedMass> ranked_mass;  // scratch for top-p
};

Candidates &thread_candidates() {
    thread_local Candidates c;
    return c;
}

std::string number(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.9g", v);
    return buf;
}

// The k-th largest of n distinct keys (k < n). A small k keeps a min-heap of the best k seen:
// on a row in no particular order almost every key fails the one comparison with its top, where
// a selection over all n keys moves each of them several times.
uint64_t kth_largest(const uint64_t *key, size_t n, size_t k, std::vector<uint64_t> &scratch) {
    if (k > 1024) {
        scratch.assign(key, key + n);
        std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<uint64_t>());
        return scratch[k - 1];
    }
    scratch.assign(key, key + k);
    std::make_heap(scratch.begin(), scratch.end(), std::greater<uint64_t>());
    for (size_t j = k; j < n; ++j)
        if (key[j] > scratch.front()) {
            std::pop_heap(scratch.begin(), scratch.end(), std::greater<uint64_t>());
            scratch.back() = key[j];
            std::push_heap(scratch.begin(), scratch.end(), std::greater<uint64_t>());
        }
    return scratch.front();
}

// The rank key of the last token of the shortest best-first prefix of the n candidates whose
// mass reaches `need` (1 <= need <= their total): a quickselect weighted by mass, O(n) expected
// whether the prefix is a handful of tokens of a peaked row or most of a flat one. Each round
// splits the range at a pivot key; the prefix ends above the pivot, at it, or below it (then
// the mass above and at the pivot is already counted). (A branch-free out-of-place split
// measured slower: 590 against 400 us on real 49k-token rows.)
uint64_t top_p_min_key(Candidates &c, size_t n, uint64_t need) {
    std::vector<RankedMass> &items = c.ranked_mass;
    items.resize(n);
    for (size_t j = 0; j < n; ++j) items[j] = RankedMass{c.key[j], c.mass[j]};
    size_t lo = 0, hi = n;  // the prefix ends in items[lo, hi)
    while (true) {
        const uint64_t a = items[lo].key, b = items[lo + (hi - lo) / 2].key, d = items[hi - 1].key;
        const uint64_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), d));  // median of three
        const auto first = items.begin() + static_cast<std::ptrdiff_t>(lo);
        const auto last = items.begin() + static_cast<std::ptrdiff_t>(hi);
        const auto split = std::partition(first, last, [pivot](const RankedMass &r) { return r.key > pivot; });
        uint64_t above = 0;
        for (auto it = first; it != split; ++it) above += it->mass;
        if (above >= need) {  // (split < hi: the pivot itself is not above)
            hi = static_cast<size_t>(split - items.begin());
            continue;
        }
        const auto at = std::find_if(split, last, [pivot](const RankedMass &r) { return r.key == pivot; });
        if (above + at->mass >= need) return pivot;
        need -= above + at->mass;
        std::iter_swap(at, split);
        lo = static_cast<size_t>(split - items.begin()) + 1;
    }
}

// float(exp(x)) through double for x in [kLogWeightCut, 0], as one loop the compiler vectorises
// (with AVX2 1.3 ns a value against 6.6 for a libm call; all of 20M random values in the range
// gave the same float as libm's exp).
// Cody-Waite reduction x = k ln2 + r with |r| <= ln2/2, then the Taylor series of exp(r) to
// degree 13 (the first term left out is below 1e-17 of the result): a few ulp of double, so the
// float it rounds to is the correctly rounded weight except when exp(x) lies within a few ulp
// (double) of a float rounding boundary. That is the same exposure as the device's and libm's
// exp (sampling_core.h); a weight one float ulp off moves its token's mass by 2^-24 of itself.
void weights_of(const float *log_w, float *w, size_t n) {
    constexpr double kLog2e = 1.4426950408889634;
    constexpr double kLn2Hi = 6.93147180369123816490e-01;  // its last 21 mantissa bits are 0: k * kLn2Hi is exact
    constexpr double kLn2Lo = 1.90821492927058770002e-10;
    constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: t = y + kRound holds round(y) in its low bits
    const uint64_t round_bits = sampling::bit_copy<uint64_t>(kRound);
    for (size_t i = 0; i < n; ++i) {
        const double x = log_w[i];
        const double t = x * kLog2e + kRound;
        const double k = t - kRound;
        const double r = (x - k * kLn2Hi) - k * kLn2Lo;
        double e = 1.0 / 6227020800.0;  // 1/13!
        e = e * r + 1.0 / 479001600.0;
        e = e * r + 1.0 / 39916800.0;
        e = e * r + 1.0 / 3628800.0;
        e = e * r + 1.0 / 362880.0;
        e = e * r + 1.0 / 40320.0;
        e = e * r + 1.0 / 5040.0;
        e = e * r + 1.0 / 720.0;
        e = e * r + 1.0 / 120.0;
        e = e * r + 1.0 / 24.0;
        e = e * r + 1.0 / 6.0;
        e = e * r + 0.5;
        e = e * r + 1.0;
        e = e * r + 1.0;
        // 2^k from the integer in t's low bits (k in [-41, 0]: a normal double).
        const uint64_t scale = (sampling::bit_copy<uint64_t>(t) - round_bits + 1023u) << 52;
        w[i] = static_cast<float>(e * sampling::bit_copy<double>(scale));
    }
}

}  // namespace

void validate_sampling_params(const SamplingParams &p, const std::string &what) {
    if (!std::isfinite(p.temperature) || p.temperature < 0.0f)
        throw InvalidArgument(what + ".temperature must be a finite number >= 0 (0 means greedy), got " +
                              number(p.temperature));
    if (p.top_k < 0)
        throw InvalidArgument(what + ".top_k must be >= 0 (0 turns top-k off), got " + std::to_string(p.top_k));
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
        throw InvalidArgument(what + ".top_p must be in (0, 1] (1 turns top-p off), got " + number(p.top_p));
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f))
        throw InvalidArgument(what + ".min_p must be in [0, 1] (0 turns min-p off), got " + number(p.min_p));
}

namespace {

// The largest logit (NaN never wins: every comparison with it is false). Eight independent
// lanes, each `x > m ? x : m`, which is exactly the vector max instruction: this vectorises.
float max_logit_of(const float *logits, int32_t vocab) {
    float m[8];
    for (float &v : m) v = -std::numeric_limits<float>::infinity();
    int32_t i = 0;
    for (; i + 8 <= vocab; i += 8)
        for (int j = 0; j < 8; ++j) m[j] = logits[i + j] > m[j] ? logits[i + j] : m[j];
    for (; i < vocab; ++i) m[0] = logits[i] > m[0] ? logits[i] : m[0];
    float best = m[0];
    for (int j = 1; j < 8; ++j) best = m[j] > best ? m[j] : best;
    return best;
}

// The best token: the lowest id holding the largest (sanitised) logit. Blocks of eight are
// compared at once (one vector compare), then the block that holds it one by one.
int32_t argmax_of(const float *logits, int32_t vocab, float max_logit) {
    if (max_logit > -std::numeric_limits<float>::infinity()) {
        int32_t i = 0;
        for (; i + 8 <= vocab; i += 8) {
            int hit = 0;
            for (int j = 0; j < 8; ++j) hit |= logits[i + j] == max_logit;
            if (hit) break;
        }
        for (; i < vocab; ++i)
            if (logits[i] == max_logit) return i;  // (-0 == +0, as sanitising makes them)
    }
    // Every logit is -inf or NaN: all tie at -inf after sanitising.
    return 0;
}

}  // namespace

int32_t sample_token(const float *logits, int32_t vocab, const SamplingParams &p, uint64_t position) {
    using namespace sampling;
    const float max_logit = max_logit_of(logits, vocab);
    if (sampling_is_greedy(p)) return argmax_of(logits, vocab, max_logit);
    const float inv_t = 1.0f / p.temperature;
    if (!std::isfinite(max_logit) || !std::isfinite(inv_t)) return argmax_of(logits, vocab, max_logit);

    Candidates &c = thread_candidates();
    c.key.resize(vocab);
    c.log_w.resize(vocab);
    c.id.resize(vocab);
    // Branch-free compaction: every token is written at the next free slot, which advances only
    // past tokens above the cut (on real logits that test is a coin toss for thousands of
    // tokens; a branch on it cost more than the whole scan). NaN fails the test.
    size_t n = 0;
    for (int32_t i = 0; i < vocab; ++i) {
        const float x = sanitize(logits[i]);
        const float lw = log_weight(x, max_logit, inv_t);
        c.key[n] = rank_key(x, i);
        c.log_w[n] = lw;
        c.id[n] = i;
        n += lw >= kLogWeightCut ? 1 : 0;
    }

    // The lowest rank key that top-k and top-p keep (0: all). Top-k first: it needs only ranks.
    // Tokens below the cut weigh nothing: if top-k reaches past the candidates, it keeps them
    // all (and massless others that can never be drawn).
    uint64_t min_key = 0;
    if (p.top_k > 0 && static_cast<size_t>(p.top_k) < n) {  // (n <= vocab: a top-k past it is off)
        const size_t k = static_cast<size_t>(p.top_k);
        min_key = kth_largest(c.key.data(), n, k, c.ranked);  // keys are unique: exactly k rank at or above it
        size_t kept = 0;  // the top k, still in id order
        for (size_t j = 0; j < n; ++j)
            if (c.key[j] >= min_key) {
                c.key[kept] = c.key[j];
                c.log_w[kept] = c.log_w[j];
                c.id[kept++] = c.id[j];
            }
        n = kept;
    }
    c.weight.resize(n);
    c.mass.resize(n);
    weights_of(c.log_w.data(), c.weight.data(), n);
    for (size_t j = 0; j < n; ++j) c.mass[j] = mass_of_weight(c.weight[j]);
    if (p.top_p < 1.0f) {
        uint64_t total = 0;
        for (size_t j = 0; j < n; ++j) total += c.mass[j];
        min_key = top_p_min_key(c, n, top_p_need(p.top_p, total));
    }

    uint64_t total = 0;
    for (size_t j = 0; j < n; ++j)
        if (c.key[j] >= min_key && c.weight[j] >= p.min_p) total += c.mass[j];
    uint64_t offset = draw_offset(draw_bits(p.seed, position), total);
    for (size_t j = 0; j < n; ++j) {
        if (c.key[j] < min_key || c.weight[j] < p.min_p) continue;
        if (offset < c.mass[j]) return c.id[j];
        offset -= c.mass[j];
    }
    return argmax_of(logits, vocab, max_logit);  // unreachable: offset < total
}

// ---- the Backend's default methods: compute logits on the host, sample them there ----------

void Backend::sample(const float *logits, int32_t n_rows, const SamplingParams *params,
                     const int64_t *positions, int32_t *out) {
    for (int32_t r = 0; r < n_rows; ++r)
        out[r] = sample_token(logits + static_cast<int64_t>(r) * vocab_size, vocab_size, params[r],
                              static_cast<uint64_t>(positions[r]));
}

void Backend::decode_batch_sample(BackendSession *const *sessions, const int32_t *tokens, int32_t n,
                                  const SamplingParams *params, int32_t *next, float *logits) {
    thread_local std::vector<float> scratch;
    float *rows = logits;
    if (!rows) {
        scratch.resize(static_cast<size_t>(n) * vocab_size);
        rows = scratch.data();
    }
    decode_batch(sessions, tokens, n, rows);
    for (int32_t i = 0; i < n; ++i)
        next[i] = sample_token(rows + static_cast<int64_t>(i) * vocab_size, vocab_size, params[i],
                               static_cast<uint64_t>(sessions[i]->n_past));
}

void Backend::forward_sample(BackendSession &session, const int32_t *tokens, int32_t n,
                             const SamplingParams &params, int32_t *next, float *logits) {
    thread_local std::vector<float> scratch;
    float *row = logits;
    if (!row) {
        scratch.resize(static_cast<size_t>(vocab_size));
        row = scratch.data();
    }
    forward(session, tokens, n, row, false);
    *next = sample_token(row, vocab_size, params, static_cast<uint64_t>(session.n_past));
}

}  // namespace pumice
