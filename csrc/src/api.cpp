// api.cpp — the C ABI (csrc/include/pumice.h).
//
// This layer checks every argument a caller can get wrong, so that backends may assume valid
// input, and it is the only place where exceptions stop: every entry point runs its body inside
// `guarded`, which turns a pumice::Error into its status, std::bad_alloc into
// PUMICE_ERR_OUT_OF_MEMORY and anything else into PUMICE_ERR_INTERNAL, with the message kept
// per thread for pumice_last_error. Nothing here may let an exception cross into C.
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <set>
#include <string>
#include <vector>

#include "backend.h"
#include "cpu_ops.h"
#include "errors.h"
#include "linear.h"
#include "llama_config.h"
#include "model_file.h"
#include "pumice.h"
#include "sampling.h"

struct pumice_model {
    std::string path;
    std::unique_ptr<pumice::ModelFile> file;
    pumice::LlamaConfig config;
    std::unique_ptr<pumice::Backend> backend;
    pumice_model_info info{};
    int32_t device = PUMICE_DEVICE_CPU;
};

struct pumice_session {
    pumice_model *model = nullptr;
    std::unique_ptr<pumice::BackendSession> state;
};

namespace {

using namespace pumice;

thread_local std::string t_last_error;

void set_error(const char *message) noexcept {
    try {
        t_last_error = message;
    } catch (...) {
        // Out of memory while recording the message: keep whatever was there.
    }
}

template <class Body>
pumice_status guarded(Body &&body) noexcept {
    try {
        body();
        return PUMICE_OK;
    } catch (const Error &e) {
        set_error(e.what());
        return e.status;
    } catch (const std::bad_alloc &) {
        set_error("out of memory");
        return PUMICE_ERR_OUT_OF_MEMORY;
    } catch (const std::exception &e) {
        try {
            set_error((std::string("internal error (please report): ") + e.what()).c_str());
        } catch (...) {
            set_error("internal error (please report)");
        }
        return PUMICE_ERR_INTERNAL;
    } catch (...) {
        set_error("internal error (please report): unknown exception");
        return PUMICE_ERR_INTERNAL;
    }
}

void require(bool ok, const char *message) {
    if (!ok) throw InvalidArgument(message);
}

void check_tokens(const pumice_model &m, const int32_t *tokens, int32_t n) {
    const int32_t vocab = m.config.vocab_size;
    for (int32_t i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= vocab)
            throw InvalidArgument("token id " + std::to_string(tokens[i]) + " at index " +
                                  std::to_string(i) + " is outside the vocabulary [0, " +
                                  std::to_string(vocab) + ")");
}

int64_t logical_numel(const TensorEntry &e) {
    int64_t n = 1;
    for (int64_t d : e.shape)
        if (__builtin_mul_overflow(n, d, &n))
            throw FormatError("tensor '" + e.name + "': shape overflows 64 bits");
    return n;
}

std::unique_ptr<Backend> make_backend(pumice_model &m, const pumice_model_options &o) {
    if (o.device == PUMICE_DEVICE_CPU) return make_cpu_backend(*m.file, m.config, o.n_threads);
#ifdef PUMICE_WITH_CUDA
    return make_cuda_backend(*m.file, m.config, o.device_index);
#else
    throw UnsupportedError("this library was built without CUDA; use device \"cpu\", or build "
                           "pumice on a machine with the CUDA toolkit (nvcc) to get libpumice_cuda");
#endif
}

void fill_info(pumice_model &m) {
    pumice_model_info &info = m.info;
    const LlamaConfig &c = m.config;
    info.vocab_size = c.vocab_size;
    info.hidden_size = c.hidden_size;
    info.intermediate_size = c.intermediate_size;
    info.num_layers = c.num_layers;
    info.num_heads = c.num_heads;
    info.num_kv_heads = c.num_kv_heads;
    info.head_dim = c.head_dim;
    info.max_context = c.max_context;
    int64_t params = 0;
    for (const TensorEntry &e : m.file->tensors())
        if (e.kind != "blob" && e.shape.size() == 2) params += logical_numel(e);
    info.n_params = params;
    info.weight_bytes = m.backend->weight_bytes();
}

// Checks a batch as pumice_decode_batch documents it; returns its model.
pumice_model *check_batch(pumice_session *const *sessions, const int32_t *tokens, int32_t n_sessions) {
        require(sessions != nullptr, "sessions is NULL");
        require(tokens != nullptr, "tokens is NULL");
        if (n_sessions <= 0)
            throw InvalidArgument("n_sessions must be positive, got " + std::to_string(n_sessions));
        std::set<const pumice_session *> seen;
        pumice_model *model = nullptr;
        for (int32_t i = 0; i < n_sessions; ++i) {
            const pumice_session *s = sessions[i];
            if (!s) throw InvalidArgument("sessions[" + std::to_string(i) + "] is NULL");
            if (!seen.insert(s).second)
                throw InvalidArgument("sessions[" + std::to_string(i) + "] appears twice in the batch");
            if (model && s->model != model)
                throw InvalidArgument("sessions[" + std::to_string(i) + "] belongs to another model "
                                      "than sessions[0]; a batch runs one model");
            model = s->model;
        }
        check_tokens(*model, tokens, n_sessions);
        for (int32_t i = 0; i < n_sessions; ++i) {
            const BackendSession &s = *sessions[i]->state;
            if (s.n_past >= s.n_ctx)
                throw ContextFull("context full: sessions[" + std::to_string(i) + "] holds " +
                                  std::to_string(s.n_past) + " of its n_ctx " + std::to_string(s.n_ctx) +
                                  " tokens; nothing was computed");
        }
        return model;
}

std::vector<BackendSession *> backend_states(pumice_session *const *sessions, int32_t n) {
    std::vector<BackendSession *> states(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) states[i] = sessions[i]->state.get();
    return states;
}

// Validated copies of the caller's sampling parameters.
std::vector<SamplingParams> sampling_params(const pumice_sampling_params *params, int32_t n) {
    require(params != nullptr, "params is NULL");
    std::vector<SamplingParams> out(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) {
        SamplingParams &p = out[i];
        p.temperature = params[i].temperature;
        p.top_k = params[i].top_k;
        p.top_p = params[i].top_p;
        p.min_p = params[i].min_p;
        p.seed = params[i].seed;
        validate_sampling_params(p, n == 1 ? std::string("params") : "params[" + std::to_string(i) + "]");
    }
    return out;
}

void check_forward(pumice_session *session, const int32_t *tokens, int32_t n_tokens) {
    require(session != nullptr, "session is NULL");
    require(tokens != nullptr, "tokens is NULL");
    if (n_tokens <= 0) throw InvalidArgument("n_tokens must be positive, got " + std::to_string(n_tokens));
    check_tokens(*session->model, tokens, n_tokens);
    const BackendSession &s = *session->state;
    if (int64_t(s.n_past) + n_tokens > s.n_ctx)
        throw ContextFull("context full: the session holds " + std::to_string(s.n_past) +
                          " tokens, " + std::to_string(n_tokens) + " more would exceed n_ctx " +
                          std::to_string(s.n_ctx));
}

}  // namespace

extern "C" {

const char *pumice_version(void) { return "0.1.0"; }

const char *pumice_last_error(void) { return t_last_error.c_str(); }

pumice_status pumice_model_open(const char *path, const pumice_model_options *options,
                                pumice_model **out) {
    if (out) *out = nullptr;
    return guarded([&] {
        require(path != nullptr, "path is NULL");
        require(out != nullptr, "out is NULL");
        pumice_model_options o{PUMICE_DEVICE_CPU, 0, 0, 1};
        if (options) o = *options;
        if (o.device != PUMICE_DEVICE_CPU && o.device != PUMICE_DEVICE_CUDA)
            throw InvalidArgument("unknown device " + std::to_string(o.device) + " (0: cpu, 1: cuda)");
        if (o.device_index < 0) throw InvalidArgument("device_index must not be negative");

        auto m = std::make_unique<pumice_model>();
        m->path = path;
        m->device = o.device;
        m->file = ModelFile::open(m->path, o.verify_checksums != 0);
        // Errors past this point come from the metadata and the weights' kinds: name the file.
        try {
            m->config = LlamaConfig::from_metadata(m->file->metadata());
            m->backend = make_backend(*m, o);
            fill_info(*m);
        } catch (const Error &e) {
            throw Error(e.status, "'" + m->path + "': " + e.what());
        }
        *out = m.release();
    });
}

void pumice_model_free(pumice_model *model) { delete model; }

pumice_status pumice_model_get_info(const pumice_model *model, pumice_model_info *out) {
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(out != nullptr, "out is NULL");
        *out = model->info;
    });
}

pumice_status pumice_session_create(pumice_model *model, int32_t n_ctx, pumice_session **out) {
    if (out) *out = nullptr;
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(out != nullptr, "out is NULL");
        if (model->config.tensors_only())
            throw UnsupportedError("'" + model->path + "' holds tensors only (architecture "
                                   "'tensors'): it cannot run a session");
        const int32_t max_ctx = model->config.max_context;
        if (n_ctx <= 0) n_ctx = max_ctx;
        if (n_ctx > max_ctx)
            throw InvalidArgument("n_ctx " + std::to_string(n_ctx) + " exceeds the model's context length " +
                                  std::to_string(max_ctx) + " (max_position_embeddings)");
        auto s = std::make_unique<pumice_session>();
        s->model = model;
        s->state = model->backend->create_session(n_ctx);
        s->state->n_ctx = n_ctx;
        s->state->n_past = 0;
        *out = s.release();
    });
}

void pumice_session_free(pumice_session *session) { delete session; }

int32_t pumice_session_n_past(const pumice_session *session) {
    return session ? session->state->n_past : 0;
}

int32_t pumice_session_n_ctx(const pumice_session *session) {
    return session ? session->state->n_ctx : 0;
}

pumice_status pumice_session_truncate(pumice_session *session, int32_t n_keep) {
    return guarded([&] {
        require(session != nullptr, "session is NULL");
        BackendSession &s = *session->state;
        if (n_keep < 0 || n_keep > s.n_past)
            throw InvalidArgument("n_keep " + std::to_string(n_keep) + " is outside [0, " +
                                  std::to_string(s.n_past) + "] (the tokens the session holds)");
        s.n_past = n_keep;
    });
}

pumice_status pumice_forward(pumice_session *session, const int32_t *tokens, int32_t n_tokens,
                             float *logits, int32_t logits_all) {
    return guarded([&] {
        check_forward(session, tokens, n_tokens);
        session->model->backend->forward(*session->state, tokens, n_tokens, logits, logits_all != 0);
    });
}

pumice_status pumice_decode_batch(pumice_session *const *sessions, const int32_t *tokens,
                                  int32_t n_sessions, float *logits) {
    return guarded([&] {
        pumice_model *model = check_batch(sessions, tokens, n_sessions);
        std::vector<BackendSession *> states = backend_states(sessions, n_sessions);
        model->backend->decode_batch(states.data(), tokens, n_sessions, logits);
    });
}

pumice_status pumice_decode_batch_sample(pumice_session *const *sessions, const int32_t *tokens,
                                         int32_t n_sessions, const pumice_sampling_params *params,
                                         int32_t *next_tokens, float *logits) {
    return guarded([&] {
        pumice_model *model = check_batch(sessions, tokens, n_sessions);
        require(next_tokens != nullptr, "next_tokens is NULL");
        const std::vector<SamplingParams> p = sampling_params(params, n_sessions);
        std::vector<BackendSession *> states = backend_states(sessions, n_sessions);
        model->backend->decode_batch_sample(states.data(), tokens, n_sessions, p.data(), next_tokens, logits);
    });
}

pumice_status pumice_forward_sample(pumice_session *session, const int32_t *tokens, int32_t n_tokens,
                                    const pumice_sampling_params *params, int32_t *next_token,
                                    float *logits) {
    return guarded([&] {
        check_forward(session, tokens, n_tokens);
        require(next_token != nullptr, "next_token is NULL");
        const std::vector<SamplingParams> p = sampling_params(params, 1);
        session->model->backend->forward_sample(*session->state, tokens, n_tokens, p[0], next_token, logits);
    });
}

pumice_status pumice_sample_logits(pumice_model *model, const float *logits, int32_t n_rows,
                                   const pumice_sampling_params *params, const int64_t *positions,
                                   int32_t *out) {
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(logits != nullptr, "logits is NULL");
        require(positions != nullptr, "positions is NULL");
        require(out != nullptr, "out is NULL");
        if (n_rows <= 0) throw InvalidArgument("n_rows must be positive, got " + std::to_string(n_rows));
        if (model->config.tensors_only() || model->config.vocab_size <= 0)
            throw UnsupportedError("'" + model->path + "' holds tensors only: it has no vocabulary to sample");
        const std::vector<SamplingParams> p = sampling_params(params, n_rows);
        for (int32_t r = 0; r < n_rows; ++r)
            if (positions[r] < 0)
                throw InvalidArgument("positions[" + std::to_string(r) + "] must be >= 0, got " +
                                      std::to_string(positions[r]));
        model->backend->sample(logits, n_rows, p.data(), positions, out);
    });
}

pumice_status pumice_linear_apply(pumice_model *model, const char *tensor_name, const float *x,
                                  int32_t batch, float *y) {
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(tensor_name != nullptr, "tensor_name is NULL");
        require(x != nullptr, "x is NULL");
        require(y != nullptr, "y is NULL");
        if (batch <= 0) throw InvalidArgument("batch must be positive, got " + std::to_string(batch));
        model->backend->linear_apply(tensor_name, x, batch, y);
    });
}

pumice_status pumice_tensor_dequantize(pumice_model *model, const char *tensor_name, float *out,
                                       int64_t out_len) {
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(tensor_name != nullptr, "tensor_name is NULL");
        require(out != nullptr, "out is NULL");
        const TensorEntry *e = model->file->find(tensor_name);
        if (!e) throw InvalidArgument(std::string("the model has no tensor named '") + tensor_name + "'");
        if (e->kind == "blob")
            throw InvalidArgument("tensor '" + e->name + "' is a blob (opaque bytes), not a weight");
        const int64_t numel = logical_numel(*e);
        if (out_len < numel)
            throw InvalidArgument("out_len " + std::to_string(out_len) + " is too small: tensor '" +
                                  e->name + "' has " + std::to_string(numel) + " elements");
        if (e->kind == "dense") {
            cpu::dense_to_f32(*e, out);
            return;
        }
        auto op = make_linear(*e);
        if (op->out_features * op->in_features != numel)
            throw FormatError("tensor '" + e->name + "': its operator does not match its shape");
        op->dequantize(out);
    });
}

}  // extern "C"
