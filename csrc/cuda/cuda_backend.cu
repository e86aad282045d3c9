// cuda_backend.cu — the CUDA implementation of pumice::Backend (backend.h).
//
// Decode (and prompts of up to 16 tokens): one "step" of up to 16 columns — tokens of distinct
// sessions (decode_batch) or consecutive tokens of one session — runs as a CUDA graph, captured
// once per column count: embedding, then per layer RMSNorm -> fused QKV GEMV (RoPE + KV-cache
// write in its epilogue) -> split-K attention -> O GEMV (+ residual) -> RMSNorm -> fused
// gate/up GEMV (SwiGLU in its epilogue) -> down GEMV (+ residual), then the head. Positions,
// tokens and caches are read from a small device array, so one graph serves every step.
//
// Long prompts: chunks of up to 2048 tokens; each matrix is dequantized to f16 into a scratch
// buffer and multiplied with cuBLAS (tensor cores), attention is two batched cuBLAS GEMMs around
// a causal softmax; the same epilogue kernels as decode apply RoPE, SwiGLU and residuals.
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "cublas_loader.h"
#include "cuda_common.cuh"
#include "device_linear.cuh"
#include "kernels.cuh"
#include "persistent_step.cuh"
#include "sampling.cuh"
#include "weights.cuh"

namespace pumice {
namespace cuda {
namespace {

constexpr int kMaxStepCols = 16;
constexpr int kMaxPrefillChunk = 2048;
constexpr int kMaxSplits = 64;

bool verbose() { return env_on("PUMICE_VERBOSE"); }
// Tests: run every group's tensors one by one (the path of bcq and caldera groups) for all kinds.
bool unfused_forced() { return env_on("PUMICE_CUDA_UNFUSED"); }
// RMSNorm folded into the residual-producing epilogues and the consuming GEMVs (kernels.cuh).
bool fused_norm_enabled() { return !env_is("PUMICE_CUDA_FUSED_NORM", "0"); }
// Benchmarks: PUMICE_CUDA_STEP=gemv leaves only the linear layers in a decode step (wrong
// results, but the time of "the GEMVs alone" in their real launch sequence); gemv:qkv, gemv:o,
// gemv:gu, gemv:down or gemv:head keeps only those (per-shape bandwidth). 0 = a normal step.
enum StepPart : int { PART_QKV = 1, PART_O = 2, PART_GU = 4, PART_DOWN = 8, PART_HEAD = 16, PART_ALL = 31 };
int gemv_only_step() {
    const char *v = std::getenv("PUMICE_CUDA_STEP");
    if (!v) return 0;
    const std::string m(v);
    if (m == "gemv") return PART_ALL;
    if (m == "gemv:qkv") return PART_QKV;
    if (m == "gemv:o") return PART_O;
    if (m == "gemv:gu") return PART_GU;
    if (m == "gemv:down") return PART_DOWN;
    if (m == "gemv:head") return PART_HEAD;
    return 0;
}
// The batch-1 step as one persistent kernel (persistent_step.cuh) where the model allows it.
// Its activations are int8, like the CPU backend's default rtn path, so the exact-activation
// setting (PUMICE_RTN_ACTIVATIONS=f32) keeps the chain of launches too; PUMICE_CUDA_PERSISTENT
// = 0 / 1 decides outright.
bool persistent_requested() {
    const char *v = std::getenv("PUMICE_CUDA_PERSISTENT");
    if (v && *v) return env_on("PUMICE_CUDA_PERSISTENT");
    return !env_is("PUMICE_RTN_ACTIVATIONS", "f32");
}
// PUMICE_CUDA_PERSISTENT_HEAD=0: the head as its own launch after the kernel (comparisons, tests).
bool persistent_head() { return !env_is("PUMICE_CUDA_PERSISTENT_HEAD", "0"); }
// Benchmarks: PUMICE_CUDA_PERSISTENT_SKIP = kPersistentSkip* bits (wrong results, their timing).
int persistent_skip() { return env_int("PUMICE_CUDA_PERSISTENT_SKIP", 0) & 31; }

// PDL and the fused RMSNorm pay at every column count (docs/CUDA.md, "Decode step"; PDL at 9-16
// columns only since QKV's three-tile blocks: with 192 four-tile blocks, waiting blocks of the
// next kernel took the room of QKV's second wave). PUMICE_PDL_COLS and
// PUMICE_CUDA_FUSED_NORM_COLS move either limit (0-16) for comparisons.
int step_cols_setting(const char *name, int fallback) {
    return std::max(0, std::min(kMaxStepCols, env_int(name, fallback)));
}
int pdl_max_cols() { return step_cols_setting("PUMICE_PDL_COLS", kMaxStepCols); }
int fused_norm_max_cols() { return step_cols_setting("PUMICE_CUDA_FUSED_NORM_COLS", kMaxStepCols); }

// The settings a captured step depends on (a graph is kept per column count and settings).
int64_t step_variant(int n_cols) {
    return n_cols | (pdl_enabled() ? 1 << 8 : 0) | (fused_norm_enabled() ? 1 << 9 : 0) |
           (early_epilogue_reads_enabled() ? 1 << 10 : 0) | (persistent_requested() ? 1 << 11 : 0) |
           (persistent_head() ? 1 << 12 : 0) | (gemv_only_step() << 13) |
           ((persistent_skip() & 15) << 19) | (wide_tiles_enabled() ? 1 << 23 : 0) |
           (three_tiles_enabled() ? 1 << 24 : 0) | (residual_pairs_mode() << 25) |
           ((persistent_skip() & 16) ? 1 << 27 : 0) |
           (int64_t(std::min(attention_min_slice(), 0x7fff)) << 48) |
           (int64_t(fused_norm_max_cols()) << 32) | (int64_t(pdl_max_cols()) << 40);
}
bool graphs_enabled() { return !env_is("PUMICE_CUDA_GRAPHS", "0"); }
// Benchmarks: PUMICE_CUDA_STEP_REPEAT=n runs each step n times back to back (the same columns,
// wrong results), so that host time over n is the GPU's time per step without the host's turn
// between steps — how the copy bandwidth it is compared with is timed (bench_cuda.py).
int step_repeat() { return std::max(1, env_int("PUMICE_CUDA_STEP_REPEAT", 1)); }

// Makes the backend's device current for the calling thread (sessions may move threads).
class DeviceScope {
public:
    explicit DeviceScope(int device) { PUMICE_CUDA_CHECK(cudaSetDevice(device)); }
};

DeviceBuffer upload_vector(const std::vector<float> &v, const char *what, cudaStream_t stream) {
    DeviceBuffer buf(v.size() * sizeof(float), what);
    PUMICE_CUDA_CHECK(cudaMemcpyAsync(buf.get(), v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
    PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream));
    return buf;
}

// One launch of the step: q/k/v, gate/up, or a single tensor. Either one fused tiled GEMV, or
// (when a tensor has another GPU form) its tensors one by one into f32 rows, then the epilogue.
struct LinearGroup {
    struct Part {
        const DeviceLinear *linear = nullptr;
        RowMap map;
    };
    LinearSlot fused;          // all stored tiles, when parts is empty
    std::vector<Part> parts;
    int64_t n_tiles = 0;       // stored row tiles
    int64_t n_rows = 0;        // rows the epilogue sees (SwiGLU: outputs)
    int64_t k = 0;
    bool is_fused() const { return parts.empty(); }
};

// A named tensor for linear_apply: its place in a fused weight, or its own DeviceLinear.
struct NamedLinear {
    LinearSlot slot;
    const DeviceLinear *linear = nullptr;
    int perm_d = 0;
};

struct Layer {
    LinearGroup qkv, o, gate_up, down;
    DeviceBuffer attn_norm, mlp_norm;
    DeviceBuffer qkv_bias, o_bias, gate_up_bias, down_bias;  // f32 by stored row, or empty
};

class CudaSession final : public BackendSession {
public:
    DeviceBuffer cache;  // [layer][k|v][kv_head][n_ctx][head_dim] f16
};

// Buffers of the prefill path, grown on demand.
struct PrefillWorkspace {
    DeviceBuffer cols, resid, xn, y, q, attn, act, wscratch, dscratch, scores, probs, ptrs;
    PinnedBuffer cols_host, ptrs_host;
};

class CudaBackend final : public Backend {
public:
    CudaBackend(const ModelFile &file, const LlamaConfig &config, int device_index);
    ~CudaBackend() override;

    std::unique_ptr<BackendSession> create_session(int32_t n_ctx) override;
    void forward(BackendSession &session, const int32_t *tokens, int32_t n, float *logits, bool all) override;
    void decode_batch(BackendSession *const *sessions, const int32_t *tokens, int32_t n, float *logits) override;
    void linear_apply(const std::string &name, const float *x, int64_t batch, float *y) override;
    int64_t weight_bytes() const override { return weight_bytes_; }

    // Sampling on the device (sampling.cu): only token ids come back.
    void sample(const float *logits, int32_t n_rows, const SamplingParams *params, const int64_t *positions,
                int32_t *out) override;
    void decode_batch_sample(BackendSession *const *sessions, const int32_t *tokens, int32_t n,
                             const SamplingParams *params, int32_t *next, float *logits) override;
    void forward_sample(BackendSession &session, const int32_t *tokens, int32_t n, const SamplingParams &params,
                        int32_t *next, float *logits) override;

private:
    void open_device(int device_index);
    void load_llama(const ModelFile &file);
    void load_tensors_only(const ModelFile &file);
    const LinearSlot &add_single(const TensorEntry &e);
    // Loads tensors sharing one launch (parts' stored tiles within n_tiles); slots: each part's place.
    LinearGroup load_group(const std::vector<FusePart> &parts, int64_t n_tiles, int64_t n_rows,
                           std::vector<LinearSlot> *slots);
    DeviceBuffer stored_bias(const ModelFile &file, const std::vector<std::pair<std::string, FusePart>> &parts,
                             const std::vector<LinearSlot> &slots, int64_t n_tiles);
    void allocate_step_buffers();
    // Fills persistent_ when every linear layer suits the persistent step; why not otherwise.
    bool prepare_persistent(std::string *why);
    void enqueue_persistent_step();

    // Decode step over cols_host_[0..n) (already filled): logits to logits_dev_.
    void run_step(int n_cols);
    void enqueue_step(int n_cols);
    void copy_logits(int n_rows, const float *src_dev, float *dst);

    void prefill_chunk(CudaSession &s, const int32_t *tokens, int32_t n, int32_t p0, float *logits, bool all,
                       bool last_chunk);
    void gemm_linear(const LinearGroup &g, const __half *x, int64_t ldx, int n, float *y, int64_t ldy);
    // A decode-step launch of a group with its epilogue (tiles_per_block: 2 for SwiGLU pairs).
    void step_linear(const LinearGroup &g, const __half *x, int64_t ldx, int n, const Epilogue &epi,
                     int tiles_per_block);
    int prefill_chunk_size(int32_t n_past, int32_t n_remaining) const;

    // Samples n <= kMaxStepCols rows of device logits (row r at rows_dev + r * vocab).
    void sample_rows(const float *rows_dev, int n, const SamplingParams *params, const int64_t *positions,
                     int32_t *out);

    GemvCall gemv_call(const LinearSlot &slot, const __half *x, int64_t ldx, int batch) const;
    // The epilogues of a layer's launches (decode step and prefill alike).
    Epilogue qkv_epilogue(const Layer &L, int layer, const StepColumn *cols, __half *q) const;
    Epilogue residual_epilogue(float *resid, const DeviceBuffer &bias) const;
    Epilogue swiglu_epilogue(__half *act, const DeviceBuffer &bias) const;
    // The logits (f32), with the fused RMSNorm's scale from the last down epilogue's partials.
    Epilogue head_epilogue(bool fused_norm) const;
    // Consumer side of the fused RMSNorm: scale e's dot products by the norm of the residual
    // whose squares `producer`'s epilogue summed.
    void consume_norm(Epilogue &e, const LinearGroup &producer) const;
    int attention_splits(int n_cols) const;

    LlamaConfig cfg_;
    int device_ = 0;
    int num_sms_ = 1;
    cudaStream_t stream_ = nullptr;
    std::unique_ptr<Cublas> cublas_;
    int64_t weight_bytes_ = 0;

    std::vector<std::unique_ptr<TiledWeight>> weights_;
    std::vector<std::unique_ptr<DeviceLinear>> device_linears_;
    std::vector<Layer> layers_;
    LinearSlot embed_;
    LinearGroup lm_head_;
    DeviceBuffer final_norm_, inv_freq_;
    std::map<std::string, NamedLinear> by_name_;

    int64_t hs_ = 0, qs_ = 0, is_ = 0;  // padded row strides of activations (hidden, q, mlp)
    int q_rows_ = 0, kv_rows_ = 0;

    // Step buffers.
    DeviceBuffer cols_dev_, resid_, xn_, q_, attn_, act_, logits_dev_, part_o_, part_ml_, att_counters_;
    DeviceBuffer group_out_;     // f32 rows of an unfused group before its epilogue
    DeviceBuffer norm_partials_; // [col][tile] sums of squares of the residual (fused RMSNorm)
    int64_t group_out_ld_ = 0;
    PinnedBuffer cols_host_, logits_host_;
    // The pinned column array may be rewritten only once its last upload has run.
    cudaEvent_t cols_uploaded_ = nullptr;
    StepColumn *writable_cols();
    // Step columns for one next token of each of n sessions (decode_batch and its sampling twin).
    void stage_next_tokens(BackendSession *const *sessions, const int32_t *tokens, int n);
    std::map<int64_t, cudaGraphExec_t> graphs_;

    PrefillWorkspace pw_;

    // The persistent batch-1 step: its arguments and buffers, when the model suits it.
    bool persistent_ready_ = false;
    PersistentStep persistent_;
    DeviceBuffer persistent_layers_, persistent_images_, persistent_runs_, persistent_sumsq_, persistent_barrier_;

    // Device sampler's rows and results (grown on first use).
    DeviceBuffer sample_rows_dev_, sample_out_dev_;
    PinnedBuffer sample_rows_host_, sample_out_host_;
};

CudaBackend::CudaBackend(const ModelFile &file, const LlamaConfig &config, int device_index)
    : Backend(config.vocab_size), cfg_(config) {
    open_device(device_index);
    try {
        if (cfg_.tensors_only()) load_tensors_only(file);
        else load_llama(file);
        for (const TensorEntry &e : file.tensors())
            if (e.kind != "blob")
                for (const auto &kv : e.parts) weight_bytes_ += static_cast<int64_t>(kv.second.length);
        if (!cfg_.tensors_only()) {
            allocate_step_buffers();
            std::string why;
            persistent_ready_ = prepare_persistent(&why);
            if (verbose())
                std::fprintf(stderr, "pumice cuda: persistent batch-1 step: %s\n",
                             persistent_ready_ ? (persistent_requested() ? "on" : "off (by setting)") : why.c_str());
        }
        std::string why;
        cublas_.reset(Cublas::open(stream_, &why));
        if (verbose())
            std::fprintf(stderr, "pumice cuda: device %d, %d SMs; prefill GEMMs: %s\n", device_, num_sms_,
                         cublas_ ? ("cuBLAS (" + cublas_->path() + ")").c_str() : ("batched GEMV: " + why).c_str());
    } catch (...) {
        for (auto &kv : graphs_) cudaGraphExecDestroy(kv.second);
        graphs_.clear();
        cublas_.reset();
        if (cols_uploaded_) cudaEventDestroy(cols_uploaded_);
        cols_uploaded_ = nullptr;
        cudaStreamDestroy(stream_);
        stream_ = nullptr;
        throw;
    }
}

CudaBackend::~CudaBackend() {
    cudaSetDevice(device_);
    if (stream_) cudaStreamSynchronize(stream_);
    for (auto &kv : graphs_) cudaGraphExecDestroy(kv.second);
    cublas_.reset();
    if (cols_uploaded_) cudaEventDestroy(cols_uploaded_);
    if (stream_) cudaStreamDestroy(stream_);
}

StepColumn *CudaBackend::writable_cols() {
    PUMICE_CUDA_CHECK(cudaEventSynchronize(cols_uploaded_));
    return cols_host_.as<StepColumn>();
}

void CudaBackend::open_device(int device_index) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        (void)cudaGetLastError();
        throw DeviceError(std::string("no CUDA device available (") +
                          (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") + ")");
    }
    if (device_index >= count)
        throw DeviceError("CUDA device " + std::to_string(device_index) + " requested, but only " +
                          std::to_string(count) + " present");
    device_ = device_index;
    PUMICE_CUDA_CHECK(cudaSetDevice(device_));
    cudaDeviceProp prop;
    PUMICE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    if (prop.major < 8)
        throw UnsupportedError(std::string("the CUDA backend needs compute capability 8.0 or newer; ") + prop.name +
                               " has " + std::to_string(prop.major) + "." + std::to_string(prop.minor));
    num_sms_ = prop.multiProcessorCount;
    PUMICE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
}

const LinearSlot &CudaBackend::add_single(const TensorEntry &e) {
    std::vector<LinearSlot> slots;
    const int64_t tiles = ceil_div(e.shape.at(0), 16);
    weights_.push_back(load_fused({FusePart{&e, 0, 0, 1}}, tiles, stream_, &slots));
    NamedLinear &named = by_name_[e.name];
    named.slot = slots.at(0);
    return named.slot;
}

LinearGroup CudaBackend::load_group(const std::vector<FusePart> &parts, int64_t n_tiles, int64_t n_rows,
                                    std::vector<LinearSlot> *slots) {
    LinearGroup g;
    g.n_tiles = n_tiles;
    g.n_rows = n_rows;
    g.k = parts.at(0).entry->shape.at(1);
    std::vector<std::unique_ptr<DeviceLinear>> native;
    bool any_native = false;
    for (const FusePart &p : parts) {
        native.push_back(make_native_device_linear(*p.entry, stream_));
        any_native = any_native || native.back();
    }
    if (!any_native && !unfused_forced()) {
        weights_.push_back(load_fused(parts, n_tiles, stream_, slots));
        g.fused = LinearSlot{weights_.back().get(), 0, 1, n_tiles, n_rows, g.k, 0};
        for (size_t i = 0; i < parts.size(); ++i) by_name_[parts[i].entry->name].slot = (*slots)[i];
        return g;
    }
    slots->clear();
    for (size_t i = 0; i < parts.size(); ++i) {
        const FusePart &p = parts[i];
        const TensorEntry &e = *p.entry;
        std::unique_ptr<DeviceLinear> lin = native[i] ? std::move(native[i]) : make_device_linear(e, p.perm_d, stream_);
        const RowMap map{p.tile_base, p.tile_stride, p.perm_d};
        g.parts.push_back(LinearGroup::Part{lin.get(), map});
        by_name_[e.name] = NamedLinear{LinearSlot{}, lin.get(), p.perm_d};
        const int64_t rows = e.shape.at(0);
        slots->push_back(LinearSlot{nullptr, p.tile_base, p.tile_stride, ceil_div(rows, 16), rows, e.shape.at(1), p.perm_d});
        device_linears_.push_back(std::move(lin));
    }
    group_out_ld_ = std::max(group_out_ld_, n_tiles * 16);
    return g;
}

void CudaBackend::load_tensors_only(const ModelFile &file) {
    for (const TensorEntry &e : file.tensors()) {
        if (e.kind == "blob" || e.shape.size() != 2) continue;
        std::vector<LinearSlot> slots;
        load_group({FusePart{&e, 0, 0, 1}}, ceil_div(e.shape[0], 16), e.shape[0], &slots);
    }
}

DeviceBuffer CudaBackend::stored_bias(const ModelFile &file,
                                      const std::vector<std::pair<std::string, FusePart>> &parts,
                                      const std::vector<LinearSlot> &slots, int64_t n_tiles) {
    bool any = false;
    for (const auto &p : parts) any = any || file.find(p.first) != nullptr;
    if (!any) return DeviceBuffer();
    std::vector<float> stored(static_cast<size_t>(n_tiles * 16), 0.f);
    for (size_t i = 0; i < parts.size(); ++i) {
        const TensorEntry *e = file.find(parts[i].first);
        if (!e) continue;
        const std::vector<float> b = dense_vector_f32(*e);
        const LinearSlot &s = slots[i];
        if (static_cast<int64_t>(b.size()) != s.n_rows)
            throw FormatError("tensor '" + e->name + "' has " + std::to_string(b.size()) + " values, expected " +
                              std::to_string(s.n_rows));
        for (int64_t l = 0; l < s.n_tiles; ++l)
            for (int r = 0; r < 16; ++r) {
                const int64_t lrow = l * 16 + r;
                if (lrow >= s.n_rows) continue;
                stored[static_cast<size_t>((s.tile_base + l * s.tile_stride) * 16 + r)] = b[source_row(lrow, s.perm_d)];
            }
    }
    return upload_vector(stored, "bias", stream_);
}

void CudaBackend::load_llama(const ModelFile &file) {
    const LlamaConfig &c = cfg_;
    const int D = c.head_dim;
    if (D != 64 && D != 128) throw UnsupportedError("the CUDA backend supports head_dim 64 and 128, not " + std::to_string(D));
    if (c.num_heads % c.num_kv_heads != 0 || c.num_heads / c.num_kv_heads > 8)
        throw UnsupportedError("the CUDA backend supports 1 to 8 query heads per kv head");
    q_rows_ = c.num_heads * D;
    kv_rows_ = c.num_kv_heads * D;
    hs_ = round_up(c.hidden_size, 128);
    qs_ = round_up(q_rows_, 128);
    is_ = round_up(c.intermediate_size, 128);

    auto expect = [&](const TensorEntry &e, int64_t n, int64_t k) {
        if (e.shape.size() != 2 || e.shape[0] != n || e.shape[1] != k)
            throw FormatError("tensor '" + e.name + "' has the wrong shape for this config (expected [" +
                              std::to_string(n) + ", " + std::to_string(k) + "])");
    };
    const int64_t H = c.hidden_size, I = c.intermediate_size;
    for (int l = 0; l < c.num_layers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        Layer L;
        const TensorEntry &q = file.get(p + "self_attn.q_proj.weight");
        const TensorEntry &k = file.get(p + "self_attn.k_proj.weight");
        const TensorEntry &v = file.get(p + "self_attn.v_proj.weight");
        const TensorEntry &o = file.get(p + "self_attn.o_proj.weight");
        const TensorEntry &g = file.get(p + "mlp.gate_proj.weight");
        const TensorEntry &u = file.get(p + "mlp.up_proj.weight");
        const TensorEntry &d = file.get(p + "mlp.down_proj.weight");
        expect(q, q_rows_, H); expect(k, kv_rows_, H); expect(v, kv_rows_, H); expect(o, H, q_rows_);
        expect(g, I, H); expect(u, I, H); expect(d, H, I);

        // QKV: q tiles, then k, then v; q and k rows RoPE-permuted.
        const int64_t qt = q_rows_ / 16, kt = kv_rows_ / 16;
        std::vector<LinearSlot> slots;
        std::vector<std::pair<std::string, FusePart>> qkv = {
            {p + "self_attn.q_proj.bias", FusePart{&q, D, 0, 1}},
            {p + "self_attn.k_proj.bias", FusePart{&k, D, qt, 1}},
            {p + "self_attn.v_proj.bias", FusePart{&v, 0, qt + kt, 1}}};
        L.qkv = load_group({qkv[0].second, qkv[1].second, qkv[2].second}, qt + 2 * kt, q_rows_ + 2 * kv_rows_, &slots);
        if (c.attention_bias) L.qkv_bias = stored_bias(file, qkv, slots, qt + 2 * kt);

        // gate/up: interleaved tiles (gate tile i at 2i, up tile i at 2i+1) for the SwiGLU epilogue.
        slots.clear();
        const int64_t it = ceil_div(I, 16);
        std::vector<std::pair<std::string, FusePart>> gu = {{p + "mlp.gate_proj.bias", FusePart{&g, 0, 0, 2}},
                                                            {p + "mlp.up_proj.bias", FusePart{&u, 0, 1, 2}}};
        L.gate_up = load_group({gu[0].second, gu[1].second}, 2 * it, I, &slots);
        if (c.mlp_bias) L.gate_up_bias = stored_bias(file, gu, slots, 2 * it);

        const FusePart o_part{&o, 0, 0, 1}, d_part{&d, 0, 0, 1};
        std::vector<LinearSlot> o_slots, d_slots;
        L.o = load_group({o_part}, ceil_div(H, 16), H, &o_slots);
        L.down = load_group({d_part}, ceil_div(H, 16), H, &d_slots);
        if (c.attention_bias)
            L.o_bias = stored_bias(file, {{p + "self_attn.o_proj.bias", o_part}}, o_slots, L.o.n_tiles);
        if (c.mlp_bias)
            L.down_bias = stored_bias(file, {{p + "mlp.down_proj.bias", d_part}}, d_slots, L.down.n_tiles);

        auto norm = [&](const std::string &name) {
            const std::vector<float> w = dense_vector_f32(file.get(name));
            if (static_cast<int64_t>(w.size()) != H) throw FormatError("tensor '" + name + "' has the wrong length");
            return upload_vector(w, "norm weight", stream_);
        };
        L.attn_norm = norm(p + "input_layernorm.weight");
        L.mlp_norm = norm(p + "post_attention_layernorm.weight");
        layers_.push_back(std::move(L));
    }
    const TensorEntry &emb = file.get("model.embed_tokens.weight");
    expect(emb, c.vocab_size, H);
    embed_ = add_single(emb);
    if (c.tie_word_embeddings || !file.find("lm_head.weight")) {
        lm_head_.fused = embed_;
        lm_head_.n_tiles = embed_.n_tiles;
        lm_head_.n_rows = embed_.n_rows;
        lm_head_.k = embed_.k;
    } else {
        const TensorEntry &head = file.get("lm_head.weight");
        expect(head, c.vocab_size, H);
        std::vector<LinearSlot> head_slots;
        lm_head_ = load_group({FusePart{&head, 0, 0, 1}}, ceil_div(c.vocab_size, 16), c.vocab_size, &head_slots);
    }
    const std::vector<float> fn = dense_vector_f32(file.get("model.norm.weight"));
    if (static_cast<int64_t>(fn.size()) != H) throw FormatError("tensor 'model.norm.weight' has the wrong length");
    final_norm_ = upload_vector(fn, "final norm", stream_);
    std::vector<float> inv(static_cast<size_t>(D / 2));
    c.rope_inv_freq(inv.data());
    inv_freq_ = upload_vector(inv, "rope frequencies", stream_);
}

void CudaBackend::allocate_step_buffers() {
    const int C = kMaxStepCols;
    cols_dev_.allocate(sizeof(StepColumn) * C, "step columns");
    resid_.allocate(sizeof(float) * C * hs_, "activations");
    xn_.allocate(sizeof(__half) * C * hs_, "activations");
    q_.allocate(sizeof(__half) * C * qs_, "activations");
    attn_.allocate(sizeof(__half) * C * qs_, "activations");
    act_.allocate(sizeof(__half) * C * is_, "activations");
    logits_dev_.allocate(sizeof(float) * C * cfg_.vocab_size, "logits");
    part_o_.allocate(sizeof(float) * C * cfg_.num_heads * kMaxSplits * cfg_.head_dim, "attention partials");
    part_ml_.allocate(sizeof(float2) * C * cfg_.num_heads * kMaxSplits, "attention partials");
    att_counters_.allocate(sizeof(int) * C * cfg_.num_kv_heads, "attention counters");
    if (group_out_ld_ > 0) group_out_.allocate(sizeof(float) * C * group_out_ld_, "activations");
    norm_partials_.allocate(sizeof(float) * C * ceil_div(hs_, 16), "activations");
    for (DeviceBuffer *b : {&resid_, &xn_, &q_, &attn_, &act_, &att_counters_}) b->zero(stream_);
    cols_host_.reserve(sizeof(StepColumn) * C, "step columns");
    PUMICE_CUDA_CHECK(cudaEventCreateWithFlags(&cols_uploaded_, cudaEventDisableTiming));
    PUMICE_CUDA_CHECK(cudaEventRecord(cols_uploaded_, stream_));
    logits_host_.reserve(sizeof(float) * C * cfg_.vocab_size, "logits");
    PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

std::unique_ptr<BackendSession> CudaBackend::create_session(int32_t n_ctx) {
    if (cfg_.tensors_only()) throw UnsupportedError("this file holds tensors only; it cannot run a session");
    DeviceScope scope(device_);
    auto s = std::make_unique<CudaSession>();
    const size_t bytes = static_cast<size_t>(cfg_.num_layers) * 2 * cfg_.num_kv_heads * static_cast<size_t>(n_ctx) *
                         cfg_.head_dim * sizeof(__half);
    s->cache.allocate(bytes, "the session's KV cache");
    s->n_ctx = n_ctx;
    return s;
}

GemvCall CudaBackend::gemv_call(const LinearSlot &slot, const __half *x, int64_t ldx, int batch) const {
    GemvCall c;
    c.w = slot.weight->view;
    c.tile_base = slot.tile_base;
    c.tile_stride = slot.tile_stride;
    c.n_tiles = slot.n_tiles;
    c.x = x;
    c.ldx = ldx;
    c.batch = batch;
    c.epi.n_rows = slot.n_rows;
    return c;
}

Epilogue CudaBackend::qkv_epilogue(const Layer &L, int layer, const StepColumn *cols, __half *q) const {
    Epilogue e;
    e.mode = EPI_QKV;
    e.out_h = q;
    e.ldo = qs_;
    e.bias = L.qkv_bias.as<float>();
    e.q_rows = q_rows_;
    e.kv_rows = kv_rows_;
    e.head_dim = cfg_.head_dim;
    e.n_kv_heads = cfg_.num_kv_heads;
    e.layer = layer;
    e.inv_freq = inv_freq_.as<float>();
    e.cols = cols;
    return e;
}

Epilogue CudaBackend::residual_epilogue(float *resid, const DeviceBuffer &bias) const {
    Epilogue e;
    e.mode = EPI_ADD;
    e.out_f32 = resid;
    e.ldo = hs_;
    e.bias = bias.as<float>();
    return e;
}

Epilogue CudaBackend::swiglu_epilogue(__half *act, const DeviceBuffer &bias) const {
    Epilogue e;
    e.mode = EPI_SWIGLU;
    e.n_rows = cfg_.intermediate_size;
    e.out_h = act;
    e.ldo = is_;
    e.bias = bias.as<float>();
    return e;
}

Epilogue CudaBackend::head_epilogue(bool fused_norm) const {
    Epilogue e;
    e.mode = EPI_F32;
    e.out_f32 = logits_dev_.as<float>();
    e.ldo = cfg_.vocab_size;
    if (fused_norm && !layers_.empty()) consume_norm(e, layers_.back().down);
    return e;
}

void CudaBackend::consume_norm(Epilogue &e, const LinearGroup &producer) const {
    e.norm_partials = norm_partials_.as<float>();
    e.n_norm_partials = static_cast<int>(producer.n_tiles);
    e.norm_ld = ceil_div(hs_, 16);
    e.norm_hidden = cfg_.hidden_size;
    e.norm_eps = cfg_.rms_norm_eps;
}

int CudaBackend::attention_splits(int n_cols) const {
    const int blocks = n_cols * cfg_.num_kv_heads;
    // About six blocks per SM once the context is long; short contexts leave most splits idle
    // (each split covers at least attention_min_slice() positions).
    const int want = static_cast<int>(ceil_div(6 * num_sms_, blocks));
    return std::max(1, std::min(kMaxSplits, want));
}

void CudaBackend::step_linear(const LinearGroup &g, const __half *x, int64_t ldx, int n, const Epilogue &epi,
                              int tiles_per_block) {
    if (g.is_fused()) {
        GemvCall call = gemv_call(g.fused, x, ldx, n);
        call.epi = epi;
        call.epi.n_rows = g.n_rows;
        call.tiles_per_block = tiles_per_block;
        launch_gemv(call, num_sms_, stream_);
        return;
    }
    float *y = group_out_.as<float>();
    for (const LinearGroup::Part &p : g.parts) p.linear->apply(x, ldx, n, y, group_out_ld_, p.map, stream_);
    Epilogue e = epi;
    e.n_rows = g.n_rows;
    launch_epilogue(e, g.n_tiles, tiles_per_block, y, group_out_ld_, n, stream_);
}

void CudaBackend::enqueue_step(int n) {
    const int parts = gemv_only_step();  // the per-matrix timings keep the chain of launches
    if (n == 1 && persistent_ready_ && persistent_requested() && (parts == 0 || parts == PART_ALL)) {
        enqueue_persistent_step();
        return;
    }
    const LlamaConfig &c = cfg_;
    const StepColumn *cols = cols_dev_.as<StepColumn>();
    float *resid = resid_.as<float>();
    __half *xn = xn_.as<__half>();
    // Fused RMSNorm: the O and down epilogues write half(resid * next norm weight) and partial
    // sums of squares; the QKV, gate/up and head GEMVs scale their dot products. Layer 0's input
    // norm follows the embedding as its own kernel.
    const bool fuse_norm = fused_norm_enabled() && c.num_layers > 0 && n <= fused_norm_max_cols();
    const PdlOff no_pdl(n > pdl_max_cols());
    const bool gemv_only = parts != 0;
    auto keep = [&](int part) { return !gemv_only || (parts & part); };
    auto produce_norm = [&](Epilogue &e, const DeviceBuffer &weight) {
        if (!fuse_norm) return;
        e.norm_weight = weight.as<float>();
        e.norm_out = xn;
        e.norm_ldo = hs_;
        e.norm_partials_out = norm_partials_.as<float>();
        e.norm_ld = ceil_div(hs_, 16);
    };
    if (!gemv_only) launch_embed(embed_.weight->view, cols, n, c.hidden_size, resid, hs_, stream_);
    for (int l = 0; l < c.num_layers; ++l) {
        const Layer &L = layers_[l];
        if ((l == 0 || !fuse_norm) && !gemv_only)
            launch_rmsnorm(resid, hs_, L.attn_norm.as<float>(), c.hidden_size, c.rms_norm_eps, xn, hs_, n, stream_);

        Epilogue qkv = qkv_epilogue(L, l, cols, q_.as<__half>());
        if (l > 0 && fuse_norm) consume_norm(qkv, layers_[l - 1].down);
        if (keep(PART_QKV)) step_linear(L.qkv, xn, hs_, n, qkv, 1);

        AttentionCall at;
        at.q = q_.as<__half>();
        at.ldq = qs_;
        at.cols = cols;
        at.n_cols = n;
        at.layer = l;
        at.n_heads = c.num_heads;
        at.n_kv_heads = c.num_kv_heads;
        at.head_dim = c.head_dim;
        at.splits = attention_splits(n);
        at.partial_o = part_o_.as<float>();
        at.partial_ml = part_ml_.as<float2>();
        at.out = attn_.as<__half>();
        at.ldo = qs_;
        at.counters = att_counters_.as<int>();
        if (!gemv_only) launch_attention_decode(at, stream_);

        Epilogue o = residual_epilogue(resid, L.o_bias);
        produce_norm(o, L.mlp_norm);
        if (keep(PART_O)) step_linear(L.o, attn_.as<__half>(), qs_, n, o, 1);

        if (!fuse_norm && !gemv_only)
            launch_rmsnorm(resid, hs_, L.mlp_norm.as<float>(), c.hidden_size, c.rms_norm_eps, xn, hs_, n, stream_);

        Epilogue gu = swiglu_epilogue(act_.as<__half>(), L.gate_up_bias);
        if (fuse_norm) consume_norm(gu, L.o);
        if (keep(PART_GU)) step_linear(L.gate_up, xn, hs_, n, gu, 2);

        Epilogue dn = residual_epilogue(resid, L.down_bias);
        produce_norm(dn, l + 1 < c.num_layers ? layers_[l + 1].attn_norm : final_norm_);
        if (keep(PART_DOWN)) step_linear(L.down, act_.as<__half>(), is_, n, dn, 1);
    }
    if (!fuse_norm && !gemv_only)
        launch_rmsnorm(resid, hs_, final_norm_.as<float>(), c.hidden_size, c.rms_norm_eps, xn, hs_, n, stream_);
    if (keep(PART_HEAD)) step_linear(lm_head_, xn, hs_, n, head_epilogue(fuse_norm), 1);
}

bool CudaBackend::prepare_persistent(std::string *why) {
    const LlamaConfig &c = cfg_;
    if (c.num_layers == 0) return *why = "no layers", false;
    if (c.attention_bias || c.mlp_bias) return *why = "biases are not supported", false;
    if (ceil_div(ceil_div(c.hidden_size, 16), num_sms_) > kPersistentOwnedTiles)
        return *why = "the hidden size is too large for this GPU's SM count", false;
    if (c.num_heads > num_sms_) return *why = "more attention heads than SMs (one block per head)", false;
    int group_size = 0;
    // A fused group as one persistent matrix: 2-bit rtn, 32-input runs inside one group, scales
    // per unit contiguous, the whole stored weight (row blocks of `tiles_per_block` tiles).
    auto matrix = [&](const LinearGroup &g, int tiles_per_block, int64_t k, PersistentMatrix *m,
                      int64_t first_tile = 0, int64_t max_row_blocks = 0) {
        if (!g.is_fused()) return false;
        const LinearSlot &slot = g.fused;
        const WeightView &w = slot.weight->view;
        if (w.bits != 2 || slot.tile_base != 0 || slot.tile_stride != 1 || slot.n_tiles != slot.weight->n_tiles)
            return false;
        if (w.group_size != 32 && w.group_size != 64 && w.group_size != 128) return false;
        if (group_size != 0 && w.group_size != group_size) return false;
        group_size = w.group_size;
        if (w.kp != k || w.groups * w.group_size != w.units * 128 || g.n_tiles % tiles_per_block != 0) return false;
        m->tiles_per_block = tiles_per_block;
        m->units = static_cast<int>(w.units);
        m->scale_bytes_per_unit = 8192 / w.group_size;
        m->codes = w.codes;
        m->scales = reinterpret_cast<const unsigned char *>(w.scale_min);
        m->row_blocks = static_cast<int>(g.n_tiles / tiles_per_block);
        if (max_row_blocks > 0) {  // head parts: rows [first_tile, first_tile + max_row_blocks)
            m->row_blocks = static_cast<int>(std::min<int64_t>(max_row_blocks, g.n_tiles - first_tile));
            m->codes += first_tile * w.units * 32;
            m->scales += first_tile * w.units * m->scale_bytes_per_unit;
        }
        const int64_t chunks = ceil_div(tiles_per_block * w.units, kPersistentChunkUnits);
        return ceil_div(m->row_blocks, num_sms_) * chunks <= kPersistentItemsPerMatrix;
    };
    std::vector<PersistentLayer> host(layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer &L = layers_[l];
        PersistentLayer &P = host[l];
        if (!matrix(L.qkv, 1, hs_, &P.qkv) || !matrix(L.o, 1, qs_, &P.o) || !matrix(L.gate_up, 2, hs_, &P.gate_up) ||
            !matrix(L.down, 1, is_, &P.down))
            return *why = "layer " + std::to_string(l) +
                          " does not suit it (2-bit rtn, groups of 32-128, at most 24 work items per SM)",
                   false;
        P.attn_norm = L.attn_norm.as<float>();
        P.mlp_norm = L.mlp_norm.as<float>();
    }
    PersistentStep &p = persistent_;
    p.n_layers = c.num_layers;
    p.hidden = static_cast<int>(c.hidden_size);
    p.q_rows = q_rows_;
    p.kv_rows = kv_rows_;
    p.inter = static_cast<int>(c.intermediate_size);
    p.n_heads = c.num_heads;
    p.n_kv_heads = c.num_kv_heads;
    p.head_dim = c.head_dim;
    p.eps = c.rms_norm_eps;
    p.image_bytes = static_cast<int>(std::max(hs_, std::max(qs_, is_)));
    p.stage_bytes = kPersistentChunkUnits * (512 + 8192 / group_size);
    int optin = 0;
    PUMICE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
    // Six stages (120 KB of 20 KB at g64) hold ~5 us of an SM's stream, more than a matrix
    // boundary lasts. Eight measured 1-2% slower (GEMVs alone and the full step, alternating
    // processes; docs/CUDA.md, "The boundaries"), four 2% slower. Fewer where shared memory is
    // short (the kernel's own ~2 KB aside).
    p.stages = 6;
    while (p.stages > 3 && persistent_smem_bytes(p) + 2048 > static_cast<size_t>(optin)) --p.stages;
    if (!persistent_step_supported(device_, p, num_sms_, why)) return false;

    persistent_layers_.allocate(sizeof(PersistentLayer) * host.size(), "persistent step");
    PUMICE_CUDA_CHECK(cudaMemcpyAsync(persistent_layers_.get(), host.data(), sizeof(PersistentLayer) * host.size(),
                                      cudaMemcpyHostToDevice, stream_));
    // Three images (normed residual, attention output, SwiGLU output), zero where padded.
    persistent_images_.allocate(static_cast<size_t>(hs_ + qs_ + is_), "persistent step");
    persistent_runs_.allocate(sizeof(float4) * static_cast<size_t>(hs_ + qs_ + is_) / 16, "persistent step");
    persistent_sumsq_.allocate(sizeof(float) * ceil_div(hs_, 16), "persistent step");
    persistent_barrier_.allocate(sizeof(unsigned), "persistent step");
    for (DeviceBuffer *b : {&persistent_images_, &persistent_runs_, &persistent_sumsq_}) b->zero(stream_);
    PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    p.layers = persistent_layers_.as<PersistentLayer>();
    p.cols = cols_dev_.as<StepColumn>();
    p.final_norm = final_norm_.as<float>();
    p.inv_freq = inv_freq_.as<float>();
    p.embed = embed_.weight->view;
    p.logits = logits_dev_.as<float>();
    p.vocab = c.vocab_size;
    // The head in parts of at most the items per SM that shared memory holds.
    const int64_t per_part = static_cast<int64_t>(kPersistentItemsPerMatrix) * num_sms_;
    p.n_head_parts = static_cast<int>(ceil_div(lm_head_.n_tiles, per_part));
    for (int i = 0; i < p.n_head_parts; ++i) {
        p.head_tile0[i] = static_cast<int>(i * per_part);
        if (i >= kPersistentHeadParts || !matrix(lm_head_, 1, hs_, &p.head[i], i * per_part, per_part)) {
            p.n_head_parts = 0;
            break;
        }
    }
    p.q = q_.as<__half>();
    unsigned char *img = persistent_images_.as<unsigned char>();
    float4 *runs = persistent_runs_.as<float4>();
    p.img_x = reinterpret_cast<uint4 *>(img);
    p.img_att = reinterpret_cast<uint4 *>(img + hs_);
    p.img_act = reinterpret_cast<uint4 *>(img + hs_ + qs_);
    p.runs_x = runs;
    p.runs_att = runs + hs_ / 16;
    p.runs_act = runs + (hs_ + qs_) / 16;
    p.sumsq = persistent_sumsq_.as<float>();
    p.part_o = part_o_.as<float>();
    p.part_ml = part_ml_.as<float2>();
    p.att_counters = att_counters_.as<int>();
    p.xn = xn_.as<__half>();
    p.norm_partials = norm_partials_.as<float>();
    p.barrier = persistent_barrier_.as<unsigned>();
    return true;
}

// The persistent kernel (embedding to logits); a head that is not 2-bit rtn follows as in the
// chained step (its fused RMSNorm reads what the last down epilogue wrote).
void CudaBackend::enqueue_persistent_step() {
    PUMICE_CUDA_CHECK(cudaMemsetAsync(persistent_barrier_.get(), 0, sizeof(unsigned), stream_));
    PersistentStep p = persistent_;
    p.skip_attention = gemv_only_step() != 0;
    p.skip = persistent_skip();
    if (!persistent_head()) p.n_head_parts = 0;
    launch_persistent_step(p, num_sms_, stream_);
    if (p.n_head_parts > 0) return;
    step_linear(lm_head_, xn_.as<__half>(), hs_, 1, head_epilogue(true), 1);
}

void CudaBackend::run_step(int n) {
    PUMICE_CUDA_CHECK(cudaMemcpyAsync(cols_dev_.get(), cols_host_.as<StepColumn>(), sizeof(StepColumn) * n,
                                      cudaMemcpyHostToDevice, stream_));
    PUMICE_CUDA_CHECK(cudaEventRecord(cols_uploaded_, stream_));
    if (!graphs_enabled()) {
        for (int r = step_repeat(); r > 0; --r) enqueue_step(n);
        return;
    }
    const int64_t variant = step_variant(n);
    auto it = graphs_.find(variant);
    if (it == graphs_.end()) {
        cudaGraph_t graph = nullptr;
        PUMICE_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
        try {
            enqueue_step(n);
        } catch (...) {
            cudaStreamEndCapture(stream_, &graph);
            if (graph) cudaGraphDestroy(graph);
            (void)cudaGetLastError();
            throw;
        }
        PUMICE_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
        cudaGraphExec_t exec = nullptr;
        const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
        cudaGraphDestroy(graph);
        PUMICE_CUDA_CHECK(err);
        it = graphs_.emplace(variant, exec).first;
    }
    for (int r = step_repeat(); r > 0; --r) PUMICE_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
}

void CudaBackend::copy_logits(int n_rows, const float *src_dev, float *dst) {
    const size_t bytes = sizeof(float) * static_cast<size_t>(n_rows) * cfg_.vocab_size;
    logits_host_.reserve(bytes, "logits");
    PUMICE_CUDA_CHECK(cudaMemcpyAsync(logits_host_.as<float>(), src_dev, bytes, cudaMemcpyDeviceToHost, stream_));
    PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::memcpy(dst, logits_host_.as<float>(), bytes);
}

void CudaBackend::forward(BackendSession &session, const int32_t *tokens, int32_t n, float *logits, bool all) {
    DeviceScope scope(device_);
    CudaSession &s = static_cast<CudaSession &>(session);
    const int32_t p_start = s.n_past;
    const int64_t V = cfg_.vocab_size;
    if (n > kMaxStepCols && cublas_) {
        int32_t done = 0;
        while (done < n) {
            const int chunk = prefill_chunk_size(p_start + done, n - done);
            const bool last = done + chunk == n;
            prefill_chunk(s, tokens + done, chunk, p_start + done, logits ? (all ? logits + done * V : logits) : nullptr,
                          all, last);
            done += chunk;
        }
    } else {
        for (int32_t done = 0; done < n; done += kMaxStepCols) {
            const int cols = std::min<int32_t>(kMaxStepCols, n - done);
            StepColumn *ch = writable_cols();
            for (int i = 0; i < cols; ++i)
                ch[i] = StepColumn{tokens[done + i], p_start + done + i, s.n_ctx, p_start + done, s.cache.as<__half>()};
            run_step(cols);
            if (logits && all) copy_logits(cols, logits_dev_.as<float>(), logits + done * V);
            else if (logits && done + cols == n)
                copy_logits(1, logits_dev_.as<float>() + (cols - 1) * V, logits);
        }
    }
    PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    s.n_past = p_start + n;
}

void CudaBackend::stage_next_tokens(BackendSession *const *sessions, const int32_t *tokens, int n) {
    StepColumn *ch = writable_cols();
    for (int i = 0; i < n; ++i) {
        CudaSession &s = static_cast<CudaSession &>(*sessions[i]);
        ch[i] = StepColumn{tokens[i], s.n_past, s.n_ctx, s.n_past, s.cache.as<__half>()};
    }
}

void CudaBackend::decode_batch(BackendSession *const *sessions, const int32_t *tokens, int32_t n, float *logits) {
    DeviceScope scope(device_);
    const int64_t V = cfg_.vocab_size;
    for (int32_t done = 0; done < n; done += kMaxStepCols) {
        const int cols = std::min<int32_t>(kMaxStepCols, n - done);
        stage_next_tokens(sessions + done, tokens + done, cols);
        run_step(cols);
        if (logits) copy_logits(cols, logits_dev_.as<float>(), logits + done * V);
    }
    PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    for (int32_t i = 0; i < n; ++i) sessions[i]->n_past += 1;
}

int CudaBackend::prefill_chunk_size(int32_t n_past, int32_t n_remaining) const {
    // Scores (f32) and probabilities (f16) of all heads must stay modest: about 1.5 GiB.
    int chunk = std::min<int32_t>(n_remaining, kMaxPrefillChunk);
    const double budget = 1.5 * (1 << 30);
    while (chunk > 256 &&
           static_cast<double>(cfg_.num_heads) * chunk * (n_past + chunk) * 6.0 > budget)
        chunk /= 2;
    return chunk;
}

void CudaBackend::gemm_linear(const LinearGroup &g, const __half *x, int64_t ldx, int n, float *y, int64_t ldy) {
    if (g.is_fused()) {
        const TiledWeight &w = *g.fused.weight;
        pw_.wscratch.reserve(sizeof(__half) * w.n_tiles * 16 * w.view.kp, "prefill weight scratch");
        launch_dequantize_f16(w.view, w.n_tiles, pw_.wscratch.as<__half>(), w.view.kp, 0, 1, stream_);
        cublas_->gemm(n, static_cast<int>(w.n_tiles * 16), static_cast<int>(w.view.kp), 1.0f, x, ldx,
                      pw_.wscratch.get(), w.view.kp, true, 0.0f, y, CUDA_R_32F, ldy);
        return;
    }
    // Each tensor dequantizes into its stored rows; rows no tensor covers stay zero.
    const int64_t ldw = round_up(g.k, 128), rows = g.n_tiles * 16;
    size_t scratch = 0;
    for (const LinearGroup::Part &p : g.parts) scratch = std::max(scratch, p.linear->scratch_bytes());
    pw_.wscratch.reserve(sizeof(__half) * rows * ldw, "prefill weight scratch");
    if (scratch) pw_.dscratch.reserve(scratch, "prefill dequantization scratch");
    PUMICE_CUDA_CHECK(cudaMemsetAsync(pw_.wscratch.get(), 0, sizeof(__half) * rows * ldw, stream_));
    for (const LinearGroup::Part &p : g.parts)
        p.linear->dequantize_f16(pw_.wscratch.as<__half>(), ldw, p.map, pw_.dscratch.get(), stream_);
    cublas_->gemm(n, static_cast<int>(rows), static_cast<int>(ldw), 1.0f, x, ldx, pw_.wscratch.get(), ldw, true,
                  0.0f, y, CUDA_R_32F, ldy);
}

void CudaBackend::prefill_chunk(CudaSession &s, const int32_t *tokens, int32_t n, int32_t p0, float *logits,
                                bool all, bool last_chunk) {
    const LlamaConfig &c = cfg_;
    const int D = c.head_dim, G = c.num_heads / c.num_kv_heads;
    const int L_keys = p0 + n;
    int64_t y_cols = 0;
    for (const Layer &L : layers_)
        y_cols = std::max({y_cols, L.qkv.n_tiles * 16, L.gate_up.n_tiles * 16, L.o.n_tiles * 16, L.down.n_tiles * 16});

    pw_.cols.reserve(sizeof(StepColumn) * n, "prefill columns");
    pw_.cols_host.reserve(sizeof(StepColumn) * n, "prefill columns");
    pw_.resid.reserve(sizeof(float) * n * hs_, "prefill activations");
    pw_.xn.reserve(sizeof(__half) * n * hs_, "prefill activations");
    pw_.y.reserve(sizeof(float) * n * y_cols, "prefill activations");
    pw_.q.reserve(sizeof(__half) * n * qs_, "prefill activations");
    pw_.attn.reserve(sizeof(__half) * n * qs_, "prefill activations");
    pw_.act.reserve(sizeof(__half) * n * is_, "prefill activations");
    pw_.scores.reserve(sizeof(float) * c.num_heads * n * static_cast<size_t>(L_keys), "prefill attention scores");
    pw_.probs.reserve(sizeof(__half) * c.num_heads * n * static_cast<size_t>(L_keys), "prefill attention scores");
    const size_t n_ptrs = static_cast<size_t>(c.num_layers) * 6 * c.num_heads;
    pw_.ptrs.reserve(sizeof(void *) * n_ptrs, "prefill pointers");
    pw_.ptrs_host.reserve(sizeof(void *) * n_ptrs, "prefill pointers");
    // Padding columns of the f16 activations must be zero (the GEMMs read kp inputs).
    pw_.xn.zero(stream_);
    pw_.attn.zero(stream_);
    pw_.act.zero(stream_);

    StepColumn *ch = pw_.cols_host.as<StepColumn>();
    for (int i = 0; i < n; ++i) ch[i] = StepColumn{tokens[i], p0 + i, s.n_ctx, p0, s.cache.as<__half>()};
    // Attention operand pointers, per layer: Q, K, S | P, V, O for every query head.
    const void **ptr = pw_.ptrs_host.as<const void *>();
    const size_t lstride = static_cast<size_t>(6) * c.num_heads;
    for (int l = 0; l < c.num_layers; ++l)
        for (int h = 0; h < c.num_heads; ++h) {
            const int kvh = h / G;
            const __half *kc = s.cache.as<__half>() + ((static_cast<int64_t>(l) * 2 * c.num_kv_heads + kvh) * s.n_ctx) * D;
            const __half *vc = s.cache.as<__half>() + (((static_cast<int64_t>(l) * 2 + 1) * c.num_kv_heads + kvh) * s.n_ctx) * D;
            const void **p = ptr + l * lstride;
            p[0 * c.num_heads + h] = pw_.q.as<__half>() + static_cast<int64_t>(h) * D;
            p[1 * c.num_heads + h] = kc;
            p[2 * c.num_heads + h] = pw_.scores.as<float>() + static_cast<int64_t>(h) * n * L_keys;
            p[3 * c.num_heads + h] = pw_.probs.as<__half>() + static_cast<int64_t>(h) * n * L_keys;
            p[4 * c.num_heads + h] = vc;
            p[5 * c.num_heads + h] = pw_.attn.as<__half>() + static_cast<int64_t>(h) * D;
        }
    PUMICE_CUDA_CHECK(cudaMemcpyAsync(pw_.cols.get(), ch, sizeof(StepColumn) * n, cudaMemcpyHostToDevice, stream_));
    PUMICE_CUDA_CHECK(cudaMemcpyAsync(pw_.ptrs.get(), ptr, sizeof(void *) * n_ptrs, cudaMemcpyHostToDevice, stream_));

    const StepColumn *cols = pw_.cols.as<StepColumn>();
    float *resid = pw_.resid.as<float>();
    __half *xn = pw_.xn.as<__half>();
    float *y = pw_.y.as<float>();
    launch_embed(embed_.weight->view, cols, n, c.hidden_size, resid, hs_, stream_);
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    for (int l = 0; l < c.num_layers; ++l) {
        const Layer &L = layers_[l];
        launch_rmsnorm(resid, hs_, L.attn_norm.as<float>(), c.hidden_size, c.rms_norm_eps, xn, hs_, n, stream_);

        int64_t ldy = L.qkv.n_tiles * 16;
        gemm_linear(L.qkv, xn, hs_, n, y, ldy);
        Epilogue e = qkv_epilogue(L, l, cols, pw_.q.as<__half>());
        e.n_rows = L.qkv.n_rows;
        launch_epilogue(e, L.qkv.n_tiles, 1, y, ldy, n, stream_);

        void *const *dp = pw_.ptrs.as<void *>() + l * lstride;
        const int H = c.num_heads;
        cublas_->gemm_batched(n, L_keys, D, scale, dp + 0 * H, qs_, dp + 1 * H, D, true, 0.0f, dp + 2 * H,
                              CUDA_R_32F, L_keys, H);
        launch_causal_softmax(pw_.scores.as<float>(), pw_.probs.as<__half>(), H, n, L_keys, L_keys, p0, stream_);
        cublas_->gemm_batched(n, D, L_keys, 1.0f, dp + 3 * H, L_keys, dp + 4 * H, D, false, 0.0f, dp + 5 * H,
                              CUDA_R_16F, qs_, H);

        ldy = L.o.n_tiles * 16;
        gemm_linear(L.o, pw_.attn.as<__half>(), qs_, n, y, ldy);
        Epilogue eo = residual_epilogue(resid, L.o_bias);
        eo.n_rows = L.o.n_rows;
        launch_epilogue(eo, L.o.n_tiles, 1, y, ldy, n, stream_);

        launch_rmsnorm(resid, hs_, L.mlp_norm.as<float>(), c.hidden_size, c.rms_norm_eps, xn, hs_, n, stream_);
        ldy = L.gate_up.n_tiles * 16;
        gemm_linear(L.gate_up, xn, hs_, n, y, ldy);
        const Epilogue eg = swiglu_epilogue(pw_.act.as<__half>(), L.gate_up_bias);
        launch_epilogue(eg, L.gate_up.n_tiles, 2, y, ldy, n, stream_);

        ldy = L.down.n_tiles * 16;
        gemm_linear(L.down, pw_.act.as<__half>(), is_, n, y, ldy);
        Epilogue ed = residual_epilogue(resid, L.down_bias);
        ed.n_rows = L.down.n_rows;
        launch_epilogue(ed, L.down.n_tiles, 1, y, ldy, n, stream_);
    }
    // The next chunk rewrites the pinned column and pointer arrays: let this one's uploads finish.
    PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (!logits || (!all && !last_chunk)) return;
    // The head, through the GEMV, 16 rows at a time (only the last row unless all).
    const int first = all ? 0 : n - 1;
    const int64_t V = c.vocab_size;
    for (int r0 = first; r0 < n; r0 += kMaxStepCols) {
        const int rows = std::min(kMaxStepCols, n - r0);
        launch_rmsnorm(resid + r0 * hs_, hs_, final_norm_.as<float>(), c.hidden_size, c.rms_norm_eps, xn_.as<__half>(),
                       hs_, rows, stream_);
        step_linear(lm_head_, xn_.as<__half>(), hs_, rows, head_epilogue(false), 1);
        copy_logits(rows, logits_dev_.as<float>(), all ? logits + (r0 - first) * V : logits);
    }
}

void CudaBackend::sample_rows(const float *rows_dev, int n, const SamplingParams *params, const int64_t *positions,
                              int32_t *out) {
    const int V = cfg_.vocab_size;
    sample_rows_dev_.reserve(sizeof(SampleRow) * kMaxStepCols, "sampling rows");
    sample_out_dev_.reserve(sizeof(int32_t) * kMaxStepCols, "sampled tokens");
    sample_rows_host_.reserve(sizeof(SampleRow) * kMaxStepCols, "sampling rows");
    sample_out_host_.reserve(sizeof(int32_t) * kMaxStepCols, "sampled tokens");
    // Every call ends with a stream synchronisation, so the pinned rows are free to rewrite.
    SampleRow *rows = sample_rows_host_.as<SampleRow>();
    for (int i = 0; i < n; ++i)
        rows[i] = SampleRow{params[i].temperature, params[i].top_k, params[i].top_p, params[i].min_p,
                            params[i].seed, static_cast<uint64_t>(positions[i])};
    PUMICE_CUDA_CHECK(cudaMemcpyAsync(sample_rows_dev_.get(), rows, sizeof(SampleRow) * n, cudaMemcpyHostToDevice,
                                      stream_));
    launch_sample(rows_dev, V, V, sample_rows_dev_.as<SampleRow>(), n, sample_out_dev_.as<int32_t>(), stream_);
    PUMICE_CUDA_CHECK(cudaMemcpyAsync(sample_out_host_.as<int32_t>(), sample_out_dev_.get(), sizeof(int32_t) * n,
                                      cudaMemcpyDeviceToHost, stream_));
    PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const int32_t *drawn = sample_out_host_.as<int32_t>();
    std::vector<float> row;
    for (int i = 0; i < n; ++i) {
        if (drawn[i] == -1) {  // too many candidates for the kernel's shared memory: same rules on the host
            row.resize(static_cast<size_t>(V));
            copy_logits(1, rows_dev + static_cast<int64_t>(i) * V, row.data());
            out[i] = sample_token(row.data(), V, params[i], static_cast<uint64_t>(positions[i]));
        } else if (drawn[i] < 0 || drawn[i] >= V) {
            throw Error(PUMICE_ERR_INTERNAL, "the device sampler returned token " + std::to_string(drawn[i]) +
                                                 " outside the vocabulary");
        } else {
            out[i] = drawn[i];
        }
    }
}

void CudaBackend::sample(const float *logits, int32_t n_rows, const SamplingParams *params, const int64_t *positions,
                         int32_t *out) {
    if (cfg_.tensors_only()) {  // no step buffers: the host sampler
        Backend::sample(logits, n_rows, params, positions, out);
        return;
    }
    DeviceScope scope(device_);
    const int64_t V = cfg_.vocab_size;
    for (int32_t r0 = 0; r0 < n_rows; r0 += kMaxStepCols) {
        const int rows = std::min<int32_t>(kMaxStepCols, n_rows - r0);
        PUMICE_CUDA_CHECK(cudaMemcpyAsync(logits_dev_.get(), logits + r0 * V, sizeof(float) * rows * V,
                                          cudaMemcpyHostToDevice, stream_));
        sample_rows(logits_dev_.as<float>(), rows, params + r0, positions + r0, out + r0);
    }
}

void CudaBackend::decode_batch_sample(BackendSession *const *sessions, const int32_t *tokens, int32_t n,
                                      const SamplingParams *params, int32_t *next, float *logits) {
    DeviceScope scope(device_);
    const int64_t V = cfg_.vocab_size;
    int64_t positions[kMaxStepCols];
    for (int32_t done = 0; done < n; done += kMaxStepCols) {
        const int cols = std::min<int32_t>(kMaxStepCols, n - done);
        stage_next_tokens(sessions + done, tokens + done, cols);
        // Where each drawn token goes (the sampler's counter).
        for (int i = 0; i < cols; ++i) positions[i] = int64_t(sessions[done + i]->n_past) + 1;
        run_step(cols);
        if (logits) copy_logits(cols, logits_dev_.as<float>(), logits + done * V);
        sample_rows(logits_dev_.as<float>(), cols, params + done, positions, next + done);
    }
    PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    for (int32_t i = 0; i < n; ++i) sessions[i]->n_past += 1;
}

void CudaBackend::forward_sample(BackendSession &session, const int32_t *tokens, int32_t n,
                                 const SamplingParams &params, int32_t *next, float *logits) {
    DeviceScope scope(device_);
    CudaSession &s = static_cast<CudaSession &>(session);
    const int64_t V = cfg_.vocab_size;
    if (n > kMaxStepCols) {
        // A long prompt (once per request): its last row of logits goes up again to be sampled.
        std::vector<float> row;
        float *last = logits;
        if (!last) {
            row.resize(static_cast<size_t>(V));
            last = row.data();
        }
        const int32_t p_start = s.n_past;
        forward(session, tokens, n, last, false);
        try {  // all or nothing, like the short path: a failed draw leaves the cache as it was
            PUMICE_CUDA_CHECK(cudaMemcpyAsync(logits_dev_.get(), last, sizeof(float) * V, cudaMemcpyHostToDevice, stream_));
            const int64_t position = s.n_past;
            sample_rows(logits_dev_.as<float>(), 1, &params, &position, next);
        } catch (...) {
            s.n_past = p_start;
            throw;
        }
        return;
    }
    // One step of consecutive tokens (a decode, or a short prompt): sample its last column.
    const int32_t p_start = s.n_past;
    StepColumn *ch = writable_cols();
    for (int i = 0; i < n; ++i) ch[i] = StepColumn{tokens[i], p_start + i, s.n_ctx, p_start, s.cache.as<__half>()};
    run_step(n);
    const float *last_dev = logits_dev_.as<float>() + int64_t(n - 1) * V;
    if (logits) copy_logits(1, last_dev, logits);
    const int64_t position = int64_t(p_start) + n;
    sample_rows(last_dev, 1, &params, &position, next);
    s.n_past = p_start + n;
}

void CudaBackend::linear_apply(const std::string &name, const float *x, int64_t batch, float *y) {
    DeviceScope scope(device_);
    auto it = by_name_.find(name);
    if (it == by_name_.end()) throw InvalidArgument("the model has no linear tensor named '" + name + "'");
    const NamedLinear &named = it->second;
    const LinearSlot &slot = named.slot;
    const int64_t K = named.linear ? named.linear->in_features() : slot.k;
    const int64_t N = named.linear ? named.linear->out_features() : slot.n_rows;
    const int64_t ks = round_up(K, 128);
    // A DeviceLinear writes its rows at stored positions (RoPE-permuted for q/k); read them back.
    const RowMap map{0, 1, named.perm_d};
    const int64_t ldo = named.linear ? round_up(N, 16) : N;
    const int64_t chunk = std::min<int64_t>(batch, kMaxStepCols);
    DeviceBuffer xd(sizeof(__half) * chunk * ks, "linear_apply input");
    DeviceBuffer yd(sizeof(float) * chunk * ldo, "linear_apply output");
    std::vector<__half> xh(static_cast<size_t>(chunk * ks), __float2half(0.f));
    std::vector<float> yh(static_cast<size_t>(chunk * ldo));
    for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
        const int64_t rows = std::min(chunk, batch - b0);
        for (int64_t b = 0; b < rows; ++b)
            for (int64_t k = 0; k < K; ++k) xh[b * ks + k] = __float2half(x[(b0 + b) * K + k]);
        PUMICE_CUDA_CHECK(cudaMemcpyAsync(xd.get(), xh.data(), sizeof(__half) * rows * ks, cudaMemcpyHostToDevice, stream_));
        if (named.linear) {
            named.linear->apply(xd.as<__half>(), ks, static_cast<int>(rows), yd.as<float>(), ldo, map, stream_);
            PUMICE_CUDA_CHECK(cudaMemcpyAsync(yh.data(), yd.get(), sizeof(float) * rows * ldo, cudaMemcpyDeviceToHost, stream_));
            PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream_));
            for (int64_t b = 0; b < rows; ++b)
                for (int64_t r = 0; r < N; ++r) y[(b0 + b) * N + r] = yh[b * ldo + map(r)];
            continue;
        }
        GemvCall call = gemv_call(slot, xd.as<__half>(), ks, static_cast<int>(rows));
        call.epi.mode = EPI_F32;
        call.epi.out_f32 = yd.as<float>();
        call.epi.ldo = N;
        call.epi.perm_d = slot.perm_d;
        launch_gemv(call, num_sms_, stream_);
        PUMICE_CUDA_CHECK(cudaMemcpyAsync(y + b0 * N, yd.get(), sizeof(float) * rows * N, cudaMemcpyDeviceToHost, stream_));
        PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    }
}

}  // namespace
}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(const ModelFile &file, const LlamaConfig &config, int device_index) {
    return std::make_unique<cuda::CudaBackend>(file, config, device_index);
}

}  // namespace pumice
