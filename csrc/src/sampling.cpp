// sampling.cpp — the host sampler, and the Backend's default sampling methods (used by the
// CPU backend; the CUDA backend samples on the device and comes here only for rows its kernel
// hands back, see csrc/cuda/sampling.cu).
//
// Cost: one pass over the vocabulary finds the maximum, a second computes each token's scaled
// log-weight and keeps the "candidates" above the 2^-40 cut (exp runs only for those; for a
// peaked LLM distribution they are a few hundred of 128k). Top-k is a partial selection
// (nth_element) among candidates; top-p sorts only a growing head of them; the draw walks the
// candidates in id order. No full sort of the vocabulary ever happens.
#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "backend.h"
#include "errors.h"
#include "sampling_core.h"

namespace pumice {

namespace {

struct Candidate {
    uint64_t key;   // rank key (sampling_core.h)
    uint64_t mass;  // floor(w * 2^40)
    float weight;
    int32_t id;
};

std::string number(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.9g", v);
    return buf;
}

// Index (into `order`) of the last token of the shortest best-first prefix of order[0..n)
// whose mass reaches `need`. Sorts only as much of the head as it must.
size_t top_p_last(const std::vector<Candidate> &c, std::vector<uint32_t> &order, size_t n, uint64_t need) {
    auto better = [&](uint32_t a, uint32_t b) { return c[a].key > c[b].key; };
    size_t head = std::min<size_t>(n, 256);
    size_t sorted = 0;
    uint64_t cumulative = 0;
    while (true) {
        std::partial_sort(order.begin() + sorted, order.begin() + head, order.begin() + n, better);
        for (size_t j = sorted; j < head; ++j) {
            cumulative += c[order[j]].mass;
            if (cumulative >= need) return j;
        }
        sorted = head;
        if (head == n) return n - 1;  // unreachable: the whole set holds `need`
        head = std::min(n, head * 8);
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

// The best token: the lowest id holding the largest (sanitised) logit.
int32_t argmax_of(const float *logits, int32_t vocab, float max_logit) {
    if (max_logit > -std::numeric_limits<float>::infinity())
        for (int32_t i = 0; i < vocab; ++i)
            if (logits[i] == max_logit) return i;  // (-0 == +0, as sanitising makes them)
    // Every logit is -inf or NaN: all tie at -inf after sanitising.
    return 0;
}

}  // namespace

int32_t sample_token(const float *logits, int32_t vocab, const SamplingParams &p, uint64_t position) {
    using namespace sampling;
    const float max_logit = max_logit_of(logits, vocab);
    const int32_t best = argmax_of(logits, vocab, max_logit);
    if (sampling_is_greedy(p)) return best;
    const float inv_t = 1.0f / p.temperature;
    if (!std::isfinite(max_logit) || !std::isfinite(inv_t)) return best;

    thread_local std::vector<Candidate> cand;
    thread_local std::vector<uint32_t> order;
    cand.clear();
    // A logit below `floor` cannot reach the cut ((x - max) / T < cut with a wide margin), so the
    // exact test runs only above it; NaN fails both tests.
    const float floor = max_logit + 1.001f * kLogWeightCut * p.temperature - 1e-3f * std::fabs(max_logit);
    for (int32_t i = 0; i < vocab; ++i) {
        if (!(logits[i] >= floor)) continue;
        const float x = sanitize(logits[i]);
        const float lw = log_weight(x, max_logit, inv_t);
        if (!(lw >= kLogWeightCut)) continue;
        Candidate c;
        c.mass = token_mass(lw, &c.weight);
        c.key = rank_key(x, i);
        c.id = i;
        cand.push_back(c);
    }

    // The lowest rank key that top-k and top-p keep (0: all).
    uint64_t min_key = 0;
    const bool use_top_k = p.top_k > 0 && p.top_k < vocab;
    if (use_top_k || p.top_p < 1.0f) {
        const size_t n_cand = cand.size();
        order.resize(n_cand);
        for (size_t j = 0; j < n_cand; ++j) order[j] = static_cast<uint32_t>(j);
        auto better = [&](uint32_t a, uint32_t b) { return cand[a].key > cand[b].key; };
        // Tokens below the cut weigh nothing: if top-k reaches past the candidates, it keeps
        // them all (and massless others that can never be drawn).
        size_t n_k = n_cand;
        if (use_top_k && static_cast<size_t>(p.top_k) < n_cand) {
            n_k = static_cast<size_t>(p.top_k);
            std::nth_element(order.begin(), order.begin() + (n_k - 1), order.end(), better);
            min_key = cand[order[n_k - 1]].key;  // everything before it ranks higher
        }
        if (p.top_p < 1.0f) {
            uint64_t total = 0;
            for (size_t j = 0; j < n_k; ++j) total += cand[order[j]].mass;
            const size_t last = top_p_last(cand, order, n_k, top_p_need(p.top_p, total));
            min_key = cand[order[last]].key;
        }
    }

    uint64_t total = 0;
    for (const Candidate &c : cand)
        if (c.key >= min_key && c.weight >= p.min_p) total += c.mass;
    uint64_t offset = draw_offset(draw_bits(p.seed, position), total);
    for (const Candidate &c : cand) {
        if (c.key < min_key || c.weight < p.min_p) continue;
        if (offset < c.mass) return c.id;
        offset -= c.mass;
    }
    return best;  // unreachable: offset < total
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
