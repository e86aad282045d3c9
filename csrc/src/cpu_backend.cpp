// cpu_backend.cpp — the Llama forward pass on the CPU.
//
// Every step processes a set of "rows": one row is one new token of one session at one
// position. A prefill is many rows of one session; a batched decode is one row of each of
// many sessions. Rows share every linear layer (batch = rows, so weights stream from memory
// once per step) and differ only in attention, where each row reads its own session's cache up
// to and including its own position — which is also the causal mask.
//
// KV cache: per session, float32, laid out [layer][kv_head][position][head_dim], so that one
// head's keys (and values) for consecutive positions are contiguous: attention for a query
// streams through one block. It is reserved with mmap(MAP_NORESERVE): a session with a long
// n_ctx costs address space only, and memory only for the positions actually written.
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>

#include "backend.h"
#include "cpu_ops.h"
#include "errors.h"
#include "linear.h"
#include "threadpool.h"

namespace pumice {

namespace {

// Rows per pass through the layers: bounds the activation scratch for long prompts (a prompt
// longer than this runs as several passes, which the KV cache makes exactly equivalent).
constexpr int64_t kMaxRowsPerPass = 256;

std::string shape_str(const std::vector<int64_t> &shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

class CpuSession final : public BackendSession {
public:
    CpuSession(int64_t floats_per_cache) {
        bytes_ = static_cast<size_t>(floats_per_cache) * sizeof(float);
        if (bytes_ == 0) bytes_ = sizeof(float);
        void *k = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (k == MAP_FAILED) throw std::bad_alloc();
        void *v = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (v == MAP_FAILED) {
            ::munmap(k, bytes_);
            throw std::bad_alloc();
        }
        k_ = static_cast<float *>(k);
        v_ = static_cast<float *>(v);
    }
    ~CpuSession() override {
        ::munmap(k_, bytes_);
        ::munmap(v_, bytes_);
    }
    float *k_ = nullptr;
    float *v_ = nullptr;

private:
    size_t bytes_ = 0;
};

struct Layer {
    std::unique_ptr<LinearOp> q, k, v, o, gate, up, down;
    std::vector<float> input_norm, post_norm;
    std::vector<float> q_bias, k_bias, v_bias, o_bias, gate_bias, up_bias, down_bias;  // empty: none
};

void add_bias(float *y, const std::vector<float> &bias, int64_t rows) {
    if (bias.empty()) return;
    const int64_t n = static_cast<int64_t>(bias.size());
    for (int64_t r = 0; r < rows; ++r) cpu::add_inplace(y + r * n, bias.data(), n);
}

}  // namespace

namespace {

class CpuBackend final : public Backend {
public:
    CpuBackend(const ModelFile &file, const LlamaConfig &config, int n_threads)
        : Backend(config.vocab_size), file_(file), cfg_(config), pool_(n_threads) {
        if (cfg_.tensors_only()) {
            build_all_linear_tensors();
        } else {
            build_llama();
        }
    }

    std::unique_ptr<BackendSession> create_session(int32_t n_ctx) override {
        if (cfg_.tensors_only())
            throw UnsupportedError("this file holds tensors only (architecture 'tensors'); it has no "
                                   "model to run a session on");
        if (n_ctx <= 0) throw InvalidArgument("n_ctx must be positive");
        const int64_t floats = int64_t(cfg_.num_layers) * cfg_.num_kv_heads * n_ctx * cfg_.head_dim;
        auto s = std::make_unique<CpuSession>(floats);
        s->n_ctx = n_ctx;
        s->n_past = 0;
        return s;
    }

    void forward(BackendSession &session, const int32_t *tokens, int32_t n, float *logits,
                 bool all) override {
        std::lock_guard<std::mutex> lock(mutex_);
        auto &s = static_cast<CpuSession &>(session);
        if (int64_t(s.n_past) + n > s.n_ctx) throw ContextFull("context full");
        for (int64_t c0 = 0; c0 < n; c0 += kMaxRowsPerPass) {
            const int64_t m = std::min<int64_t>(kMaxRowsPerPass, n - c0);
            row_session_.assign(static_cast<size_t>(m), &s);
            row_pos_.resize(static_cast<size_t>(m));
            for (int64_t i = 0; i < m; ++i) row_pos_[i] = s.n_past + int32_t(c0 + i);
            const bool last_pass = c0 + m == n;
            if (logits && all) {
                run_rows(tokens + c0, m, logits + c0 * cfg_.vocab_size, /*logit_rows_from=*/0);
            } else if (logits && last_pass) {
                run_rows(tokens + c0, m, logits, /*logit_rows_from=*/m - 1);
            } else {
                run_rows(tokens + c0, m, nullptr, m);
            }
        }
        s.n_past += n;
    }

    void decode_batch(BackendSession *const *sessions, const int32_t *tokens, int32_t n,
                      float *logits) override {
        std::lock_guard<std::mutex> lock(mutex_);
        for (int32_t i = 0; i < n; ++i)
            if (sessions[i]->n_past >= sessions[i]->n_ctx) throw ContextFull("context full");
        for (int64_t c0 = 0; c0 < n; c0 += kMaxRowsPerPass) {
            const int64_t m = std::min<int64_t>(kMaxRowsPerPass, n - c0);
            row_session_.resize(static_cast<size_t>(m));
            row_pos_.resize(static_cast<size_t>(m));
            for (int64_t i = 0; i < m; ++i) {
                row_session_[i] = static_cast<CpuSession *>(sessions[c0 + i]);
                row_pos_[i] = sessions[c0 + i]->n_past;
            }
            run_rows(tokens + c0, m, logits ? logits + c0 * cfg_.vocab_size : nullptr,
                     logits ? 0 : m);
        }
        for (int32_t i = 0; i < n; ++i) sessions[i]->n_past += 1;
    }

    void linear_apply(const std::string &name, const float *x, int64_t batch, float *y) override {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = ops_by_name_.find(name);
        if (it == ops_by_name_.end()) {
            const TensorEntry *e = file_.find(name);
            if (!e) throw InvalidArgument("the model has no tensor named '" + name + "'");
            throw InvalidArgument("tensor '" + name + "' (kind '" + e->kind + "', shape " +
                                  shape_str(e->shape) + ") is not a linear layer");
        }
        it->second->apply(x, batch, y, pool_);
    }

    int64_t weight_bytes() const override { return weight_bytes_; }

private:
    const ModelFile &file_;
    LlamaConfig cfg_;
    ThreadPool pool_;
    std::mutex mutex_;

    std::vector<std::unique_ptr<LinearOp>> owned_ops_;  // tensors-only files
    std::map<std::string, const LinearOp *> ops_by_name_;
    int64_t weight_bytes_ = 0;

    std::unique_ptr<LinearOp> embed_;
    std::unique_ptr<LinearOp> lm_head_;  // null when tied to embed_
    std::vector<float> final_norm_;
    std::vector<Layer> layers_;
    std::vector<float> inv_freq_;

    // Scratch, grown on demand and reused by every step (guarded by mutex_).
    std::vector<CpuSession *> row_session_;
    std::vector<int32_t> row_pos_;
    std::vector<float> x_, xn_, q_, k_, v_, attn_, gate_, up_, tmp_, cos_, sin_;
    std::vector<float> part_max_, part_sum_, part_out_;  // attention over split key ranges

    // ---- construction ----------------------------------------------------------------------

    std::unique_ptr<LinearOp> linear(const std::string &name, int64_t out, int64_t in) {
        const TensorEntry *e = file_.find(name);
        if (!e) throw FormatError("missing tensor '" + name + "'");
        if (e->shape != std::vector<int64_t>{out, in})
            throw FormatError("tensor '" + name + "' has shape " + shape_str(e->shape) +
                              ", the config implies [" + std::to_string(out) + ", " +
                              std::to_string(in) + "]");
        auto op = make_linear(*e);
        if (op->out_features != out || op->in_features != in)
            throw FormatError("tensor '" + name + "': its kind '" + e->kind + "' built a " +
                              std::to_string(op->out_features) + " x " + std::to_string(op->in_features) +
                              " operator, expected " + std::to_string(out) + " x " + std::to_string(in));
        ops_by_name_[name] = op.get();
        weight_bytes_ += op->stored_bytes();
        return op;
    }

    std::vector<float> vector(const std::string &name, int64_t n) {
        const TensorEntry *e = file_.find(name);
        if (!e) throw FormatError("missing tensor '" + name + "'");
        auto v = cpu::load_dense_vector(*e, n);
        for (const auto &kv : e->parts) weight_bytes_ += static_cast<int64_t>(kv.second.length);
        return v;
    }

    std::vector<float> optional_bias(bool present, const std::string &name, int64_t n) {
        if (!present) return {};
        return vector(name, n);
    }

    void build_all_linear_tensors() {
        for (const TensorEntry &e : file_.tensors()) {
            if (e.kind == "blob" || e.shape.size() != 2) continue;
            auto op = make_linear(e);
            ops_by_name_[e.name] = op.get();
            weight_bytes_ += op->stored_bytes();
            owned_ops_.push_back(std::move(op));
        }
    }

    void build_llama() {
        const int64_t d = cfg_.hidden_size, I = cfg_.intermediate_size, V = cfg_.vocab_size;
        const int64_t qd = int64_t(cfg_.num_heads) * cfg_.head_dim;
        const int64_t kvd = int64_t(cfg_.num_kv_heads) * cfg_.head_dim;
        if (cfg_.num_heads / cfg_.num_kv_heads > 64)
            throw UnsupportedError("more than 64 query heads per key/value head are not supported");
        embed_ = linear("model.embed_tokens.weight", V, d);
        if (!cfg_.tie_word_embeddings) lm_head_ = linear("lm_head.weight", V, d);
        final_norm_ = vector("model.norm.weight", d);
        layers_.resize(static_cast<size_t>(cfg_.num_layers));
        for (int32_t i = 0; i < cfg_.num_layers; ++i) {
            const std::string p = "model.layers." + std::to_string(i) + ".";
            Layer &L = layers_[i];
            L.q = linear(p + "self_attn.q_proj.weight", qd, d);
            L.k = linear(p + "self_attn.k_proj.weight", kvd, d);
            L.v = linear(p + "self_attn.v_proj.weight", kvd, d);
            L.o = linear(p + "self_attn.o_proj.weight", d, qd);
            L.gate = linear(p + "mlp.gate_proj.weight", I, d);
            L.up = linear(p + "mlp.up_proj.weight", I, d);
            L.down = linear(p + "mlp.down_proj.weight", d, I);
            L.input_norm = vector(p + "input_layernorm.weight", d);
            L.post_norm = vector(p + "post_attention_layernorm.weight", d);
            L.q_bias = optional_bias(cfg_.attention_bias, p + "self_attn.q_proj.bias", qd);
            L.k_bias = optional_bias(cfg_.attention_bias, p + "self_attn.k_proj.bias", kvd);
            L.v_bias = optional_bias(cfg_.attention_bias, p + "self_attn.v_proj.bias", kvd);
            L.o_bias = optional_bias(cfg_.attention_bias, p + "self_attn.o_proj.bias", d);
            L.gate_bias = optional_bias(cfg_.mlp_bias, p + "mlp.gate_proj.bias", I);
            L.up_bias = optional_bias(cfg_.mlp_bias, p + "mlp.up_proj.bias", I);
            L.down_bias = optional_bias(cfg_.mlp_bias, p + "mlp.down_proj.bias", d);
        }
        inv_freq_.resize(static_cast<size_t>(cfg_.head_dim / 2));
        cfg_.rope_inv_freq(inv_freq_.data());

        // Tensors the model does not use must still be valid (FORMAT.md 3: a reader rejects an
        // unknown kind or bad parts anywhere in the file): build and drop their operators.
        for (const TensorEntry &e : file_.tensors()) {
            if (e.kind == "blob" || e.kind == "dense" || ops_by_name_.count(e.name)) continue;
            make_linear(e);
        }
    }

    // ---- forward ---------------------------------------------------------------------------

    static void grow(std::vector<float> &v, int64_t n) {
        if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
    }

    // Runs `m` rows (row_session_, row_pos_ filled in) through the model. Logits are written
    // for rows logit_rows_from..m-1 (consecutively from `logits`) when logits is non-null.
    void run_rows(const int32_t *tokens, int64_t m, float *logits, int64_t logit_rows_from) {
        const int64_t d = cfg_.hidden_size, I = cfg_.intermediate_size;
        const int64_t H = cfg_.num_heads, KV = cfg_.num_kv_heads, hd = cfg_.head_dim, half = hd / 2;
        const int64_t qd = H * hd, kvd = KV * hd;
        grow(x_, m * d);
        grow(xn_, m * d);
        grow(q_, m * qd);
        grow(k_, m * kvd);
        grow(v_, m * kvd);
        grow(attn_, m * qd);
        grow(gate_, m * I);
        grow(up_, m * I);
        grow(tmp_, m * d);
        grow(cos_, m * half);
        grow(sin_, m * half);
        float *x = x_.data(), *xn = xn_.data(), *q = q_.data(), *k = k_.data(), *v = v_.data();
        float *attn = attn_.data(), *gate = gate_.data(), *up = up_.data(), *tmp = tmp_.data();

        for (int64_t r = 0; r < m; ++r) embed_->dequantize_row(tokens[r], x + r * d);

        // RoPE angles as Hugging Face forms them: float32 position times float32 frequency.
        for (int64_t r = 0; r < m; ++r) {
            const float pos = static_cast<float>(row_pos_[r]);
            for (int64_t j = 0; j < half; ++j) {
                const float angle = pos * inv_freq_[j];
                cos_[r * half + j] = static_cast<float>(std::cos(static_cast<double>(angle)));
                sin_[r * half + j] = static_cast<float>(std::sin(static_cast<double>(angle)));
            }
        }

        const float eps = cfg_.rms_norm_eps;
        for (size_t li = 0; li < layers_.size(); ++li) {
            const Layer &L = layers_[li];
            norm_rows(x, L.input_norm.data(), eps, m, d, xn);
            L.q->apply(xn, m, q, pool_);
            L.k->apply(xn, m, k, pool_);
            L.v->apply(xn, m, v, pool_);
            add_bias(q, L.q_bias, m);
            add_bias(k, L.k_bias, m);
            add_bias(v, L.v_bias, m);
            for (int64_t r = 0; r < m; ++r) {
                const float *c = cos_.data() + r * half, *s = sin_.data() + r * half;
                for (int64_t h = 0; h < H; ++h) cpu::rope_head(q + r * qd + h * hd, c, s, half);
                for (int64_t h = 0; h < KV; ++h) cpu::rope_head(k + r * kvd + h * hd, c, s, half);
            }
            store_kv(li, k, v, m);
            attention(li, q, m, attn);
            L.o->apply(attn, m, tmp, pool_);
            add_bias(tmp, L.o_bias, m);
            cpu::add_inplace(x, tmp, m * d);

            norm_rows(x, L.post_norm.data(), eps, m, d, xn);
            L.gate->apply(xn, m, gate, pool_);
            L.up->apply(xn, m, up, pool_);
            add_bias(gate, L.gate_bias, m);
            add_bias(up, L.up_bias, m);
            pool_.parallel_for(m * I, 4096, [&](int64_t b, int64_t e) {
                cpu::silu_mul(gate + b, up + b, e - b);
            });
            L.down->apply(gate, m, tmp, pool_);
            add_bias(tmp, L.down_bias, m);
            cpu::add_inplace(x, tmp, m * d);
        }

        if (!logits || logit_rows_from >= m) return;
        const int64_t rows = m - logit_rows_from;
        norm_rows(x + logit_rows_from * d, final_norm_.data(), eps, rows, d, xn);
        const LinearOp &head = lm_head_ ? *lm_head_ : *embed_;
        head.apply(xn, rows, logits, pool_);
    }

    void norm_rows(const float *x, const float *w, float eps, int64_t rows, int64_t d, float *out) {
        if (rows == 1) {
            cpu::rms_norm(x, w, eps, d, out);
            return;
        }
        pool_.parallel_for(rows, 8, [&](int64_t b, int64_t e) {
            for (int64_t r = b; r < e; ++r) cpu::rms_norm(x + r * d, w, eps, d, out + r * d);
        });
    }

    int64_t cache_index(const CpuSession &s, size_t layer, int64_t kv_head, int64_t pos) const {
        return ((int64_t(layer) * cfg_.num_kv_heads + kv_head) * s.n_ctx + pos) * cfg_.head_dim;
    }

    void store_kv(size_t layer, const float *k, const float *v, int64_t m) {
        const int64_t KV = cfg_.num_kv_heads, hd = cfg_.head_dim;
        for (int64_t r = 0; r < m; ++r) {
            CpuSession &s = *row_session_[r];
            for (int64_t h = 0; h < KV; ++h) {
                const int64_t at = cache_index(s, layer, h, row_pos_[r]);
                std::memcpy(s.k_ + at, k + (r * KV + h) * hd, size_t(hd) * sizeof(float));
                std::memcpy(s.v_ + at, v + (r * KV + h) * hd, size_t(hd) * sizeof(float));
            }
        }
    }

    // Softmax(q K^T / sqrt(head_dim)) V for every (row, query head); a row sees its session's
    // positions 0..row_pos inclusive.
    //
    // A work item is (row, KV head, key range): the query heads sharing a KV head (GQA) are
    // handled together, so each cached key and value is read from memory once per group rather
    // than once per query head — at long contexts the f32 cache is as large as 4-bit weights,
    // and attention is bound by reading it. When there are too few (row, KV head) pairs to keep
    // the pool busy (decoding one or a few sessions), the keys are also split into ranges whose
    // partial softmax results (max, sum, unnormalised output) are merged afterwards.
    void attention(size_t layer, const float *q, int64_t m, float *out) {
        const int64_t H = cfg_.num_heads, KV = cfg_.num_kv_heads, hd = cfg_.head_dim;
        const int64_t group = H / KV;
        const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
        int64_t max_keys = 0;
        for (int64_t r = 0; r < m; ++r) max_keys = std::max<int64_t>(max_keys, int64_t(row_pos_[r]) + 1);
        constexpr int64_t kMinKeysPerSplit = 128;
        const int64_t want_items = 4 * int64_t(pool_.size());
        int64_t splits = 1;
        if (m * KV < want_items)
            splits = std::max<int64_t>(1, std::min((want_items + m * KV - 1) / (m * KV),
                                                   max_keys / kMinKeysPerSplit));
        const int64_t keys_per_split = (max_keys + splits - 1) / splits;
        if (splits > 1) {
            grow(part_max_, m * H * splits);
            grow(part_sum_, m * H * splits);
            grow(part_out_, m * H * splits * hd);
        }
        pool_.parallel_for(m * KV * splits, 1, [&](int64_t b, int64_t e) {
            thread_local std::vector<float> scores;
            for (int64_t item = b; item < e; ++item) {
                const int64_t split = item % splits, r = item / splits / KV, kvh = item / splits % KV;
                const CpuSession &s = *row_session_[r];
                const int64_t n_keys = int64_t(row_pos_[r]) + 1;
                const int64_t t0 = std::min(n_keys, split * keys_per_split);
                const int64_t t1 = std::min(n_keys, t0 + keys_per_split);
                const int64_t len = t1 - t0;
                const float *K = s.k_ + cache_index(s, layer, kvh, t0);
                const float *Vc = s.v_ + cache_index(s, layer, kvh, t0);
                const float *qg = q + (r * H + kvh * group) * hd;  // the group's query heads
                if (static_cast<int64_t>(scores.size()) < group * len) scores.resize(size_t(group * len));
                float *sc = scores.data();
                for (int64_t t = 0; t < len; ++t)
                    for (int64_t g = 0; g < group; ++g)
                        sc[g * len + t] = cpu::dot(qg + g * hd, K + t * hd, hd) * scale;
                float mx[64], sum[64];  // group <= 64 checked at construction
                for (int64_t g = 0; g < group; ++g) {
                    float *row = sc + g * len;
                    float mg = -std::numeric_limits<float>::infinity();
                    for (int64_t t = 0; t < len; ++t) mg = std::max(mg, row[t]);
                    float total = 0.0f;
                    for (int64_t t = 0; t < len; ++t) {
                        row[t] = std::exp(row[t] - mg);
                        total += row[t];
                    }
                    mx[g] = mg;
                    sum[g] = total;
                }
                for (int64_t g = 0; g < group; ++g) {
                    const int64_t h = kvh * group + g;
                    float *o = splits > 1 ? part_out_.data() + ((r * H + h) * splits + split) * hd
                                          : out + (r * H + h) * hd;
                    std::fill(o, o + hd, 0.0f);
                }
                for (int64_t t = 0; t < len; ++t)
                    for (int64_t g = 0; g < group; ++g) {
                        const int64_t h = kvh * group + g;
                        float *o = splits > 1 ? part_out_.data() + ((r * H + h) * splits + split) * hd
                                              : out + (r * H + h) * hd;
                        cpu::axpy(sc[g * len + t], Vc + t * hd, o, hd);
                    }
                for (int64_t g = 0; g < group; ++g) {
                    const int64_t h = kvh * group + g;
                    if (splits > 1) {
                        part_max_[(r * H + h) * splits + split] = mx[g];
                        part_sum_[(r * H + h) * splits + split] = sum[g];
                    } else {
                        float *o = out + (r * H + h) * hd;
                        const float inv = 1.0f / sum[g];
                        for (int64_t i = 0; i < hd; ++i) o[i] *= inv;
                    }
                }
            }
        });
        if (splits == 1) return;
        // Merge the key ranges: rescale each partial result to the overall max.
        for (int64_t rh = 0; rh < m * H; ++rh) {
            const float *pm = part_max_.data() + rh * splits, *ps = part_sum_.data() + rh * splits;
            float M = -std::numeric_limits<float>::infinity();
            for (int64_t sp = 0; sp < splits; ++sp)
                if (ps[sp] > 0.0f) M = std::max(M, pm[sp]);
            float total = 0.0f;
            float *o = out + rh * hd;
            std::fill(o, o + hd, 0.0f);
            for (int64_t sp = 0; sp < splits; ++sp) {
                if (!(ps[sp] > 0.0f)) continue;  // an empty key range
                const float w = std::exp(pm[sp] - M);
                total += ps[sp] * w;
                cpu::axpy(w, part_out_.data() + (rh * splits + sp) * hd, o, hd);
            }
            const float inv = 1.0f / total;
            for (int64_t i = 0; i < hd; ++i) o[i] *= inv;
        }
    }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const ModelFile &file, const LlamaConfig &config,
                                          int n_threads) {
    return std::make_unique<CpuBackend>(file, config, n_threads);
}

}  // namespace pumice
