// sampling.h — choosing the next token from logits inside the runtime (the host sampler).
//
// The same rules run on the GPU (csrc/cuda/sampling.cu); the arithmetic they share is in
// sampling_core.h. Semantics, in order: temperature (0: greedy argmax, lowest id on ties) ->
// top-k (the k best tokens) -> top-p (the fewest best tokens whose mass reaches top_p of the
// top-k survivors' mass) -> min-p (weight at least min_p times the best token's) -> one draw,
// by inverse CDF over the kept tokens in id order, from 64 random bits keyed by (seed,
// position). docs/RUNTIME.md ("Native sampling") states them in full.
#pragma once
#include <cstdint>
#include <string>

namespace pumice {

// Mirror of pumice_sampling_params (pumice.h): the ABI layer copies it after validation.
struct SamplingParams {
    float temperature = 0.0f;  // >= 0; 0: greedy
    int32_t top_k = 0;         // >= 0; 0 or >= vocab: off
    float top_p = 1.0f;        // (0, 1]; 1: off
    float min_p = 0.0f;        // [0, 1]; 0: off
    uint64_t seed = 0;
};

// Throws InvalidArgument naming `what` (e.g. "params[2]") and the offending field.
void validate_sampling_params(const SamplingParams &p, const std::string &what);

// True when the parameters select the argmax without drawing (temperature 0).
inline bool sampling_is_greedy(const SamplingParams &p) { return p.temperature == 0.0f; }

// The token drawn from one row of `vocab` logits; `position` is the RNG counter (the index the
// sampled token will take in its session).
int32_t sample_token(const float *logits, int32_t vocab, const SamplingParams &p, uint64_t position);

}  // namespace pumice
