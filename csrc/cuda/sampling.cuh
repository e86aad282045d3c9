// sampling.cuh — the device sampler (sampling.cu): the next token of up to 16 step columns
// chosen from the step's f32 logits on the GPU, by exactly the host sampler's rules
// (csrc/src/sampling.h, sampling_core.h).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace pumice {
namespace cuda {

// One row to sample: the ABI's parameters plus the row's RNG counter.
struct SampleRow {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    uint64_t seed;
    uint64_t position;
};

// Candidates (tokens within 2^-40 of the best one's weight) the kernel can rank in shared
// memory. A row with top-k or top-p and more candidates than this gets -1 (the caller samples
// it on the host: same rules, rare — only near-flat distributions have that many).
constexpr int kSampleMaxCandidates = 4096;

// out[r] = the token drawn from logits[r * ld .. r * ld + vocab) with rows[r], or -1 (above).
// One block per row; rows and out are device pointers.
void launch_sample(const float *logits, int64_t ld, int vocab, const SampleRow *rows, int n_rows,
                   int32_t *out, cudaStream_t stream);

}  // namespace cuda
}  // namespace pumice
