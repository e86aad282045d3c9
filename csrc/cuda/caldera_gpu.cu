// caldera_gpu.cu — `caldera` (W = T_outᵀ (Q + L R) T_in) and `lplr` (W = T_outᵀ L R T_in) tensors
// on the GPU, without materialising W (docs/CALDERA.md, section "CUDA").
//
// Q, L and R keep their own storage: rtn and dense sub-tensors in the tiled layout of
// tiled_weight.cuh (load_fused on a prefix-stripped copy of the entry), a bcq Q in bcq's own GPU
// form when it has one, anything else dequantized on the host to f16 tiles by load_fused.
//
// Decode (apply, 1..16 columns), five launches:
//     x' = T_in x                    split over many blocks per column (hadamard_gpu.cu), f16 out
//     y' = Q x'                      tiled GEMV, f32 rows into a scratch held by this tensor
//     t  = R x'                      tiled GEMV, f16 out (the next GEMV's operand)
//     y' += L t                      tiled GEMV, residual-add epilogue into the same scratch
//     out[map(r)] = (T_outᵀ y')[r]   split the same way, f32 out at the group's stored rows
// Prefill (dequantize_f16): Q, L, R to f16; M = Q + L R in f32; every row of M gets T_inᵀ (so M
// becomes M T_in); M is transposed and every row of Mᵀ (a column of M) gets T_outᵀ; Mᵀ is
// transposed back into f16 rows at map(r).
#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "device_linear.cuh"
#include "hadamard_gpu.cuh"
#include "kernels.cuh"
#include "linear.h"
#include "weights.cuh"

namespace pumice {
namespace cuda {
namespace {

constexpr int kMaxCols = 16;

// ---- prefill kernels ---------------------------------------------------------------------------

constexpr int kCombineRows = 32, kCombineCols = 128, kCombineJ = 16;

// m[n * ldm + k] = q[n * ldq + k] + Σ_{j < rank} l[n * ldl + j] · r[j * ldr + k]   (n < N, k < K)
// q may be null (lplr). Block: 32 rows × 128 columns, 256 threads, each 4 rows × 4 columns.
__global__ void __launch_bounds__(256)
    combine_kernel(const __half *q, int64_t ldq, const __half *l, int64_t ldl, const __half *r, int64_t ldr,
                   int64_t rank, float *m, int64_t ldm, int64_t N, int64_t K) {
    __shared__ float ls[kCombineRows][kCombineJ + 1];
    __shared__ float rs[kCombineJ][kCombineCols];
    const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kCombineRows;
    const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kCombineCols;
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[a][c] = 0.0f;
    for (int64_t j0 = 0; j0 < rank; j0 += kCombineJ) {
        for (int e = threadIdx.x; e < kCombineRows * kCombineJ; e += blockDim.x) {
            const int rr = e / kCombineJ, jj = e % kCombineJ;
            const int64_t n = n0 + rr, j = j0 + jj;
            ls[rr][jj] = (n < N && j < rank) ? __half2float(l[n * ldl + j]) : 0.0f;
        }
        for (int e = threadIdx.x; e < kCombineJ * kCombineCols; e += blockDim.x) {
            const int jj = e / kCombineCols, cc = e % kCombineCols;
            const int64_t j = j0 + jj, k = k0 + cc;
            rs[jj][cc] = (j < rank && k < K) ? __half2float(r[j * ldr + k]) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int jj = 0; jj < kCombineJ; ++jj) {
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                const float lv = ls[ty + 8 * a][jj];
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[a][c] += lv * rs[jj][tx + 32 * c];
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int64_t n = n0 + ty + 8 * a;
        if (n >= N) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int64_t k = k0 + tx + 32 * c;
            if (k >= K) continue;
            m[n * ldm + k] = acc[a][c] + (q ? __half2float(q[n * ldq + k]) : 0.0f);
        }
    }
}

// out[c * ld_out + r] = in[r * ld_in + c] for r < rows, c < cols. Block (32, 8), 32×32 tiles.
__global__ void transpose_kernel(const float *in, int64_t ld_in, int64_t rows, int64_t cols, float *out,
                                 int64_t ld_out) {
    __shared__ float tile[32][33];
    const int64_t c0 = static_cast<int64_t>(blockIdx.x) * 32, r0 = static_cast<int64_t>(blockIdx.y) * 32;
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int64_t r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = in[r * ld_in + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int64_t c = c0 + i, r = r0 + threadIdx.x;
        if (c < cols && r < rows) out[c * ld_out + r] = tile[threadIdx.x][i];
    }
}

// out[map(n) * ldo + k] = half(mt[k * ldt + n]) for n < N, k < K, and 0 for K <= k < ldo.
__global__ void write_rows_f16_kernel(const float *mt, int64_t ldt, int64_t N, int64_t K, __half *out, int64_t ldo,
                                      const RowMap map) {
    __shared__ float tile[32][33];
    const int64_t k0 = static_cast<int64_t>(blockIdx.x) * 32, n0 = static_cast<int64_t>(blockIdx.y) * 32;
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int64_t k = k0 + i, n = n0 + threadIdx.x;
        tile[i][threadIdx.x] = (k < K && n < N) ? mt[k * ldt + n] : 0.0f;
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int64_t n = n0 + i, k = k0 + threadIdx.x;
        if (n < N && k < ldo) out[map(n) * ldo + k] = __float2half(k < K ? tile[threadIdx.x][i] : 0.0f);
    }
}

// ---- decode kernel without a transform ---------------------------------------------------------

// out[col * ldo + map(r)] = y[col * ldy + r] for r < n.
__global__ void map_rows_kernel(const float *y, int64_t ldy, int64_t n, float *out, int64_t ldo, const RowMap map) {
    const int64_t col = blockIdx.y;
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r < n) out[col * ldo + map(r)] = y[col * ldy + r];
}

// ---- loading -----------------------------------------------------------------------------------

// A sub-tensor ("q", "l", "r") as a top-level entry of its own kind: its params object and its
// parts without the prefix, so every loader of that kind takes it unchanged.
TensorEntry sub_entry(const TensorEntry &e, const std::string &key, std::vector<int64_t> shape) {
    const Json *params = e.params.find(key);
    if (!params || !params->is_object() || !params->find("kind") || !params->find("kind")->is_string())
        throw FormatError("tensor '" + e.name + "': parameter '" + key + "' must be an object with a string 'kind'");
    TensorEntry s;
    s.name = e.name + " (" + key + ")";
    s.kind = params->find("kind")->as_string();
    s.shape = std::move(shape);
    s.params = *params;
    const std::string prefix = key + ".";
    for (const auto &kv : e.parts)
        if (kv.first.compare(0, prefix.size(), prefix) == 0) s.parts[kv.first.substr(prefix.size())] = kv.second;
    return s;
}

std::unique_ptr<TiledWeight> load_tiled(const TensorEntry &sub, cudaStream_t stream) {
    std::vector<LinearSlot> slots;
    return load_fused({FusePart{&sub, 0, 0, 1}}, ceil_div(sub.shape.at(0), 16), stream, &slots);
}

int device_sms() {
    int device = 0, sms = 1;
    PUMICE_CUDA_CHECK(cudaGetDevice(&device));
    PUMICE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
}

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

class CalderaDeviceLinear final : public DeviceLinear {
public:
    CalderaDeviceLinear(const TensorEntry &e, int64_t rank, bool hadamard, cudaStream_t stream)
        : n_(e.shape[0]), k_(e.shape[1]), rank_(rank), hadamard_(hadamard), num_sms_(device_sms()) {
        const bool with_q = e.kind == "caldera";
        if (with_q) {
            q_entry_ = sub_entry(e, "q", {n_, k_});
            if (q_entry_.kind == "bcq") q_native_ = make_bcq_device_linear(q_entry_, stream);
            if (q_native_) {
                if (q_native_->out_features() != n_ || q_native_->in_features() != k_)
                    throw Error(PUMICE_ERR_INTERNAL, "tensor '" + e.name + "': the GPU form of Q has the wrong shape");
            } else {
                q_ = load_tiled(q_entry_, stream);
            }
        }
        if (rank_ > 0) {
            l_entry_ = sub_entry(e, "l", {n_, rank_});
            r_entry_ = sub_entry(e, "r", {rank_, k_});
            l_ = load_tiled(l_entry_, stream);
            r_ = load_tiled(r_entry_, stream);
        }
        if (hadamard_) {
            prepare_hadamard_kernels();
            t_in_ = DeviceHadamard(k_, e.parts.at("hadamard.in_signs").data, stream);
            t_out_ = DeviceHadamard(n_, e.parts.at("hadamard.out_signs").data, stream);
        }
        // Decode intermediates for up to 16 columns. Padding that a GEMV reads (x' beyond K, t
        // beyond rank) must be zero: x' padding is rewritten by every transform, t's is never
        // written after this.
        ldx_ = round_up(k_, 128);
        ldy_ = round_up(n_, 16);
        ldt_ = round_up(rank_ > 0 ? rank_ : 1, 128);
        if (hadamard_) {
            xr_.allocate(sizeof(__half) * kMaxCols * ldx_, "caldera rotated input");
            xr_.zero(stream);
        }
        y_.allocate(sizeof(float) * kMaxCols * ldy_, "caldera rotated output");
        if (rank_ > 0) {
            t_.allocate(sizeof(__half) * kMaxCols * ldt_, "caldera low-rank activations");
            t_.zero(stream);
        }
        plan_scratch();
        PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream));
    }

    int64_t out_features() const override { return n_; }
    int64_t in_features() const override { return k_; }
    int64_t bytes() const override {
        int64_t total = t_in_.bytes() + t_out_.bytes();
        if (q_) total += q_->bytes();
        if (q_native_) total += q_native_->bytes();
        if (l_) total += l_->bytes() + r_->bytes();
        return total + static_cast<int64_t>(xr_.size() + y_.size() + t_.size());
    }
    size_t scratch_bytes() const override { return scratch_; }

    void apply(const __half *x, int64_t ldx, int n_cols, float *out, int64_t ldo, const RowMap &map,
               cudaStream_t stream) const override {
        if (n_cols < 1 || n_cols > kMaxCols) throw Error(PUMICE_ERR_INTERNAL, "caldera apply: column count out of range");
        const __half *xin = x;
        int64_t ldin = ldx;
        if (hadamard_) {
            launch_hadamard_forward_f16(t_in_.view(), x, ldx, xr_.as<__half>(), ldx_, ldx_, n_cols, num_sms_,
                                        stream);
            xin = xr_.as<__half>();
            ldin = ldx_;
        }
        float *y = y_.as<float>();
        bool written = false;
        if (q_native_) {
            q_native_->apply(xin, ldin, n_cols, y, ldy_, RowMap{}, stream);
            written = true;
        } else if (q_) {
            gemv(*q_, n_, xin, ldin, n_cols, EPI_F32, y, nullptr, ldy_, stream);
            written = true;
        }
        if (rank_ > 0) {
            gemv(*r_, rank_, xin, ldin, n_cols, EPI_F16, nullptr, t_.as<__half>(), ldt_, stream);
            gemv(*l_, n_, t_.as<__half>(), ldt_, n_cols, written ? EPI_ADD : EPI_F32, y, nullptr, ldy_, stream);
        }
        if (hadamard_) {
            launch_hadamard_inverse_mapped(t_out_.view(), y, ldy_, out, ldo, map, n_cols, num_sms_, stream);
        } else {
            dim3 grid(static_cast<unsigned>(ceil_div(n_, 256)), static_cast<unsigned>(n_cols));
            map_rows_kernel<<<grid, 256, 0, stream>>>(y, ldy_, n_, out, ldo, map);
            PUMICE_CUDA_CHECK_LAUNCH("caldera map_rows");
        }
    }

    void dequantize_f16(__half *out, int64_t ldo, const RowMap &map, void *scratch,
                        cudaStream_t stream) const override {
        if (ldo < k_) throw Error(PUMICE_ERR_INTERNAL, "caldera dequantize_f16: output rows too short");
        if (!scratch) throw Error(PUMICE_ERR_INTERNAL, "caldera dequantize_f16: no scratch");
        char *base = static_cast<char *>(scratch);
        __half *qh = reinterpret_cast<__half *>(base + off_a_);  // [ldy_][ldx_] f16, then:
        float *mt = reinterpret_cast<float *>(base + off_a_);    // [K][N] f32 (Q is consumed by then)
        float *m = reinterpret_cast<float *>(base + off_m_);     // [N][K] f32
        __half *lh = reinterpret_cast<__half *>(base + off_l_);  // [ldy_][ldt_] f16
        __half *rh = reinterpret_cast<__half *>(base + off_r_);  // [round_up(rank, 16)][ldx_] f16
        if (q_native_) {
            q_native_->dequantize_f16(qh, ldx_, RowMap{}, base + off_qs_, stream);
        } else if (q_) {
            launch_dequantize_f16(q_->view, q_->n_tiles, qh, ldx_, 0, 1, stream);
        }
        if (rank_ > 0) {
            launch_dequantize_f16(l_->view, l_->n_tiles, lh, ldt_, 0, 1, stream);
            launch_dequantize_f16(r_->view, r_->n_tiles, rh, ldx_, 0, 1, stream);
        }
        {
            dim3 grid(static_cast<unsigned>(ceil_div(k_, kCombineCols)), static_cast<unsigned>(ceil_div(n_, kCombineRows)));
            combine_kernel<<<grid, 256, 0, stream>>>((q_ || q_native_) ? qh : nullptr, ldx_, lh, ldt_, rh, ldx_, rank_,
                                                     m, k_, n_, k_);
            PUMICE_CUDA_CHECK_LAUNCH("caldera combine");
        }
        // Each row m ↦ T_inᵀ m (that is M T_in), then each column ↦ T_outᵀ c (rows of Mᵀ).
        if (hadamard_) launch_hadamard_inverse_rows(t_in_.view(), m, k_, n_, stream);
        {
            dim3 grid(static_cast<unsigned>(ceil_div(k_, 32)), static_cast<unsigned>(ceil_div(n_, 32)));
            transpose_kernel<<<grid, dim3(32, 8), 0, stream>>>(m, k_, n_, k_, mt, n_);
            PUMICE_CUDA_CHECK_LAUNCH("caldera transpose");
        }
        if (hadamard_) launch_hadamard_inverse_rows(t_out_.view(), mt, n_, k_, stream);
        {
            dim3 grid(static_cast<unsigned>(ceil_div(ldo, 32)), static_cast<unsigned>(ceil_div(n_, 32)));
            write_rows_f16_kernel<<<grid, dim3(32, 8), 0, stream>>>(mt, n_, n_, k_, out, ldo, map);
            PUMICE_CUDA_CHECK_LAUNCH("caldera write_rows_f16");
        }
    }

private:
    void gemv(const TiledWeight &w, int64_t rows, const __half *x, int64_t ldx, int n_cols, int mode, float *out_f32,
              __half *out_h, int64_t ldo, cudaStream_t stream) const {
        GemvCall c;
        c.w = w.view;
        c.n_tiles = w.n_tiles;
        c.x = x;
        c.ldx = ldx;
        c.batch = n_cols;
        c.epi.mode = mode;
        c.epi.n_rows = rows;
        c.epi.out_f32 = out_f32;
        c.epi.out_h = out_h;
        c.epi.ldo = ldo;
        launch_gemv(c, num_sms_, stream);
    }

    // Prefill workspace: A holds Q as f16 [ldy_][ldx_], later Mᵀ as f32 [K][N]; M is f32 [N][K];
    // then L and R as f16, then the scratch of a native Q.
    void plan_scratch() {
        const size_t nk = static_cast<size_t>(n_) * static_cast<size_t>(k_) * sizeof(float);
        const size_t q16 = (q_ || q_native_) ? static_cast<size_t>(ldy_ * ldx_) * sizeof(__half) : 0;
        size_t off = 0;
        off_a_ = off;
        off += align256(std::max(nk, q16));
        off_m_ = off;
        off += align256(nk);
        off_l_ = off;
        if (rank_ > 0) off += align256(static_cast<size_t>(ldy_ * ldt_) * sizeof(__half));
        off_r_ = off;
        if (rank_ > 0) off += align256(static_cast<size_t>(round_up(rank_, 16) * ldx_) * sizeof(__half));
        off_qs_ = off;
        if (q_native_) off += align256(q_native_->scratch_bytes());
        scratch_ = off;
    }

    int64_t n_, k_, rank_;
    bool hadamard_;
    int num_sms_;
    TensorEntry q_entry_, l_entry_, r_entry_;  // kept: a native form may refer to its entry
    std::unique_ptr<DeviceLinear> q_native_;
    std::unique_ptr<TiledWeight> q_, l_, r_;
    DeviceHadamard t_in_, t_out_;
    DeviceBuffer xr_, y_, t_;
    int64_t ldx_ = 0, ldy_ = 0, ldt_ = 0;
    size_t off_a_ = 0, off_m_ = 0, off_l_ = 0, off_r_ = 0, off_qs_ = 0, scratch_ = 0;
};

bool disabled_by_env() { return env_is("PUMICE_CALDERA_GPU", "0"); }

}  // namespace

std::unique_ptr<DeviceLinear> make_caldera_device_linear(const TensorEntry &entry, cudaStream_t stream) {
    if (entry.kind != "caldera" && entry.kind != "lplr") return nullptr;
    // The CPU kind validates params, sub-kinds, part dtypes and shapes, and throws FormatError
    // naming the tensor; its operator only views the mapping, so building it costs little.
    make_linear(entry);
    if (disabled_by_env()) return nullptr;
    const int64_t N = entry.shape.at(0), K = entry.shape.at(1);
    const int64_t rank = entry.params.at("rank").as_int();
    const bool hadamard = entry.params.at("transform").as_string() == "hadamard";
    // A vector of the transform lives in one block's shared memory; beyond that, the tensor
    // keeps the host-dequantized f16 form.
    if (hadamard && !hadamard_fits_device(std::max(N, K))) return nullptr;
    return std::make_unique<CalderaDeviceLinear>(entry, rank, hadamard, stream);
}

}  // namespace cuda
}  // namespace pumice
