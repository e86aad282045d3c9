/*
 * pumice.h — the one contract between Python (cffi, ABI mode) and the native runtime.
 *
 * Rules every function follows:
 *  - Returns a pumice_status; PUMICE_OK (0) on success. On failure the thread's last error
 *    message (pumice_last_error) says what went wrong; nothing aborts the process.
 *  - Pointers handed out (models, sessions) are freed by the matching *_free; freeing NULL is a
 *    no-op. A model must outlive its sessions.
 *  - A session is used by one thread at a time; different sessions may run concurrently only
 *    through pumice_decode_batch (which is how the server batches them).
 *
 * This header is parsed by cffi's cdef: keep it free of preprocessor logic other than the
 * include guard and the extern "C" wrapper, and of anything cffi cannot parse.
 */
#ifndef PUMICE_H
#define PUMICE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pumice_status {
    PUMICE_OK = 0,
    PUMICE_ERR_IO = 1,                 /* file missing, unreadable, not a regular file */
    PUMICE_ERR_FORMAT = 2,             /* corrupt or truncated file, bad checksum, bad JSON */
    PUMICE_ERR_UNSUPPORTED = 3,        /* valid file asking for something this build lacks */
    PUMICE_ERR_INVALID_ARGUMENT = 4,   /* bad argument from the caller (token id, NULL, ...) */
    PUMICE_ERR_OUT_OF_MEMORY = 5,      /* host or device allocation failed */
    PUMICE_ERR_CONTEXT_FULL = 6,       /* the tokens would not fit in the session's context */
    PUMICE_ERR_DEVICE = 7,             /* accelerator error (driver, kernel launch, no device) */
    PUMICE_ERR_INTERNAL = 8            /* a bug: please report */
} pumice_status;

typedef enum pumice_device {
    PUMICE_DEVICE_CPU = 0,
    PUMICE_DEVICE_CUDA = 1
} pumice_device;

typedef struct pumice_model pumice_model;
typedef struct pumice_session pumice_session;

typedef struct pumice_model_options {
    int32_t device;            /* pumice_device */
    int32_t device_index;      /* which GPU, for PUMICE_DEVICE_CUDA */
    int32_t n_threads;         /* CPU worker threads; <= 0 means all cores */
    int32_t verify_checksums;  /* nonzero: check every part's CRC-32 at open (recommended) */
} pumice_model_options;

typedef struct pumice_model_info {
    int32_t vocab_size;
    int32_t hidden_size;
    int32_t intermediate_size;
    int32_t num_layers;
    int32_t num_heads;
    int32_t num_kv_heads;
    int32_t head_dim;
    int32_t max_context;       /* max_position_embeddings from the file */
    int64_t n_params;          /* logical weights in the linear layers + embeddings */
    int64_t weight_bytes;      /* bytes of tensor data loaded (all kinds, as stored) */
} pumice_model_info;

/* Version string of the native library, e.g. "0.1.0". Never NULL. */
const char *pumice_version(void);

/* Message of the last failed call on this thread ("" if none). Valid until the next call. */
const char *pumice_last_error(void);

/* Open and validate a .pumice file. On failure *out is NULL. */
pumice_status pumice_model_open(const char *path, const pumice_model_options *options,
                                pumice_model **out);
void pumice_model_free(pumice_model *model);
pumice_status pumice_model_get_info(const pumice_model *model, pumice_model_info *out);

/* A session owns a KV cache of n_ctx positions (n_ctx <= 0: the model's max_context). */
pumice_status pumice_session_create(pumice_model *model, int32_t n_ctx, pumice_session **out);
void pumice_session_free(pumice_session *session);
/* Tokens currently held in the session's cache. */
int32_t pumice_session_n_past(const pumice_session *session);
int32_t pumice_session_n_ctx(const pumice_session *session);
/* Keep the first n_keep cached positions, drop the rest (0 resets). */
pumice_status pumice_session_truncate(pumice_session *session, int32_t n_keep);

/*
 * Append n_tokens tokens to the session (prefill when n_tokens > 1, decode when 1) and compute
 * logits. logits_all = 0: write the last position's logits, vocab_size floats. logits_all = 1:
 * write every new position's logits, n_tokens * vocab_size floats, row-major. logits may be NULL
 * (only fill the cache). Fails with PUMICE_ERR_CONTEXT_FULL, leaving the cache unchanged, if
 * n_past + n_tokens > n_ctx.
 */
pumice_status pumice_forward(pumice_session *session, const int32_t *tokens, int32_t n_tokens,
                             float *logits, int32_t logits_all);

/*
 * Advance n_sessions sessions (all of one model, all distinct) by one token each in one pass
 * that reads the weights once. logits: n_sessions * vocab_size floats, row i for sessions[i].
 * All-or-nothing: if any session is full, nothing changes and PUMICE_ERR_CONTEXT_FULL is returned.
 */
pumice_status pumice_decode_batch(pumice_session *const *sessions, const int32_t *tokens,
                                  int32_t n_sessions, float *logits);

/*
 * Sampling inside the runtime (docs/RUNTIME.md, "Native sampling"): the step chooses each
 * session's next token itself, so only token ids need to reach the caller (on CUDA the logits
 * stay on the GPU). Rules, in order: temperature (0: greedy, the argmax with ties to the lower
 * id) -> top-k -> top-p (of the top-k survivors' mass) -> min-p -> one draw. The draw's random
 * bits come from Philox4x32-10 keyed by `seed` and counted by the position the new token takes
 * in its session (n_past after the call): the same seed gives the same tokens whatever the
 * batch, its order, or streaming. Out-of-range fields fail with PUMICE_ERR_INVALID_ARGUMENT.
 */
typedef struct pumice_sampling_params {
    float temperature;  /* finite, >= 0; 0: greedy */
    int32_t top_k;      /* >= 0; 0 or >= vocab_size: off */
    float top_p;        /* (0, 1]; 1: off */
    float min_p;        /* [0, 1]; 0: off */
    uint64_t seed;
} pumice_sampling_params;

/*
 * pumice_decode_batch, then one token per session: params[i] and next_tokens[i] belong to
 * sessions[i]. logits: n_sessions * vocab_size floats as pumice_decode_batch writes them, or NULL
 * (no logits are copied anywhere). All-or-nothing as pumice_decode_batch.
 */
pumice_status pumice_decode_batch_sample(pumice_session *const *sessions, const int32_t *tokens,
                                         int32_t n_sessions, const pumice_sampling_params *params,
                                         int32_t *next_tokens, float *logits);

/*
 * pumice_forward (a prompt, or any tokens), then the next token from the last position's
 * logits. logits: vocab_size floats (the last position's), or NULL. All-or-nothing: on failure
 * the session's cache is as it was before the call.
 */
pumice_status pumice_forward_sample(pumice_session *session, const int32_t *tokens, int32_t n_tokens,
                                    const pumice_sampling_params *params, int32_t *next_token,
                                    float *logits);

/*
 * Sampler access, for tests and benchmarks: one token per row of the given logits
 * (n_rows * vocab_size floats) with params[r], RNG counter positions[r] (>= 0), on the model's
 * device (the CUDA backend uploads the rows and runs its kernel).
 */
pumice_status pumice_sample_logits(pumice_model *model, const float *logits, int32_t n_rows,
                                   const pumice_sampling_params *params, const int64_t *positions,
                                   int32_t *out);

/*
 * Kernel access, for tests and benchmarks: apply the named linear tensor of the model (any
 * storage kind) to a batch of inputs. x: batch * in_features floats, y: batch * out_features.
 */
pumice_status pumice_linear_apply(pumice_model *model, const char *tensor_name,
                                  const float *x, int32_t batch, float *y);
/* Reconstruct the named tensor as float32 (out_features * in_features floats, or numel). */
pumice_status pumice_tensor_dequantize(pumice_model *model, const char *tensor_name,
                                       float *out, int64_t out_len);

#ifdef __cplusplus
}
#endif

#endif /* PUMICE_H */
