// backend.h — what a compute backend (CPU, CUDA) provides to the C ABI layer (api.cpp).
//
// The ABI layer owns validation of arguments and the translation of exceptions to status codes;
// a backend owns the weights in its memory, the KV caches, and the forward pass.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "llama_config.h"
#include "model_file.h"
#include "sampling.h"

namespace pumice {

// Per-session state a backend keeps (its KV cache lives here).
class BackendSession {
public:
    virtual ~BackendSession() = default;
    int32_t n_ctx = 0;
    int32_t n_past = 0;
};

class Backend {
public:
    explicit Backend(int32_t vocab_size) : vocab_size(vocab_size) {}
    virtual ~Backend() = default;
    virtual std::unique_ptr<BackendSession> create_session(int32_t n_ctx) = 0;
    // Append n tokens at positions n_past..n_past+n-1 and advance n_past. The caller has checked
    // that the tokens are in range and fit. logits: last row (all=false) or every row (all=true),
    // or nullptr.
    virtual void forward(BackendSession &session, const int32_t *tokens, int32_t n,
                         float *logits, bool all) = 0;
    // One token for each of n distinct sessions, weights read once for all of them.
    virtual void decode_batch(BackendSession *const *sessions, const int32_t *tokens, int32_t n,
                              float *logits) = 0;
    // Apply a named linear tensor (tests and benchmarks); x, y are host float32 arrays.
    virtual void linear_apply(const std::string &name, const float *x, int64_t batch, float *y) = 0;
    virtual int64_t weight_bytes() const = 0;

    // Sampling inside the runtime (sampling.h). The defaults compute logits on the host and
    // run the host sampler there (the CPU backend); the CUDA backend samples on the device and
    // copies only token ids back. `logits` may be nullptr (then none reach the caller).
    //
    // One token per row of host logits [n_rows][vocab_size]; positions[r] is row r's RNG counter.
    virtual void sample(const float *logits, int32_t n_rows, const SamplingParams *params,
                        const int64_t *positions, int32_t *out);
    // decode_batch, then each session's next token (RNG counter: its n_past after the step).
    virtual void decode_batch_sample(BackendSession *const *sessions, const int32_t *tokens, int32_t n,
                                     const SamplingParams *params, int32_t *next, float *logits);
    // forward (last position only), then the next token (RNG counter: n_past after the call).
    virtual void forward_sample(BackendSession &session, const int32_t *tokens, int32_t n,
                                const SamplingParams &params, int32_t *next, float *logits);

    const int32_t vocab_size;  // the model's (0 for tensors-only files)
};

std::unique_ptr<Backend> make_cpu_backend(const ModelFile &file, const LlamaConfig &config,
                                          int n_threads);
#ifdef PUMICE_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(const ModelFile &file, const LlamaConfig &config,
                                           int device_index);
#endif

}  // namespace pumice
