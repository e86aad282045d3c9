// cublas_loader.cu — see cublas_loader.h.
#include "cublas_loader.h"

#include <dlfcn.h>

#include <cstdlib>

#include "errors.h"

namespace pumice {
namespace cuda {
namespace {

// Values from the public cuBLAS API (cublas_api.h), stable across major versions.
constexpr int kOpN = 0, kOpT = 1;
constexpr int kComputeF32 = 68;   // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;  // CUBLAS_GEMM_DEFAULT

using CreateFn = int (*)(void **);
using DestroyFn = int (*)(void *);
using SetStreamFn = int (*)(void *, cudaStream_t);
using GemmExFn = int (*)(void *, int, int, int, int, int, const void *, const void *, cudaDataType, int,
                         const void *, cudaDataType, int, const void *, void *, cudaDataType, int, int, int);
using GemmBatchedExFn = int (*)(void *, int, int, int, int, int, const void *, const void *const *, cudaDataType,
                                int, const void *const *, cudaDataType, int, const void *, void *const *,
                                cudaDataType, int, int, int, int);

}  // namespace

struct Cublas::Api {
    CreateFn create = nullptr;
    DestroyFn destroy = nullptr;
    SetStreamFn set_stream = nullptr;
    GemmExFn gemm_ex = nullptr;
    GemmBatchedExFn gemm_batched_ex = nullptr;
};

Cublas *Cublas::open(cudaStream_t stream, std::string *why) {
    const char *env = std::getenv("PUMICE_CUBLAS");
    if (env && std::string(env) == "off") { *why = "disabled by PUMICE_CUBLAS=off"; return nullptr; }
    const char *candidates[] = {env, "libcublas.so.13", "libcublas.so.12", "libcublas.so"};
    void *lib = nullptr;
    std::string path;
    for (const char *name : candidates) {
        if (!name || !*name) continue;
        lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
        if (lib) { path = name; break; }
    }
    if (!lib) { *why = "libcublas not found"; return nullptr; }
    Cublas *c = new Cublas();
    c->lib_ = lib;
    c->path_ = path;
    c->api_ = new Api();
    c->api_->create = reinterpret_cast<CreateFn>(dlsym(lib, "cublasCreate_v2"));
    c->api_->destroy = reinterpret_cast<DestroyFn>(dlsym(lib, "cublasDestroy_v2"));
    c->api_->set_stream = reinterpret_cast<SetStreamFn>(dlsym(lib, "cublasSetStream_v2"));
    c->api_->gemm_ex = reinterpret_cast<GemmExFn>(dlsym(lib, "cublasGemmEx"));
    c->api_->gemm_batched_ex = reinterpret_cast<GemmBatchedExFn>(dlsym(lib, "cublasGemmBatchedEx"));
    if (!c->api_->create || !c->api_->destroy || !c->api_->set_stream || !c->api_->gemm_ex ||
        !c->api_->gemm_batched_ex) {
        *why = path + " lacks the GEMM entry points";
        delete c;
        return nullptr;
    }
    if (c->api_->create(&c->handle_) != 0) {
        c->handle_ = nullptr;
        *why = "cublasCreate failed";
        delete c;
        return nullptr;
    }
    if (c->api_->set_stream(c->handle_, stream) != 0) {
        *why = "cublasSetStream failed";
        delete c;
        return nullptr;
    }
    return c;
}

Cublas::~Cublas() {
    if (handle_ && api_) api_->destroy(handle_);
    delete api_;
    // The library stays loaded: other users in the process (torch) may share it.
}

// cuBLAS is column-major: row-major C = A * op(B) is column-major C^T = op(B)^T * A^T.
void Cublas::gemm(int m, int n, int k, float alpha, const void *a, long long lda, const void *b, long long ldb,
                  bool b_transposed, float beta, void *c, cudaDataType c_type, long long ldc) const {
    const int st = api_->gemm_ex(handle_, b_transposed ? kOpT : kOpN, kOpN, n, m, k, &alpha, b, CUDA_R_16F,
                                 static_cast<int>(ldb), a, CUDA_R_16F, static_cast<int>(lda), &beta, c, c_type,
                                 static_cast<int>(ldc), kComputeF32, kGemmDefault);
    if (st != 0) throw DeviceError("cublasGemmEx failed with status " + std::to_string(st));
}

void Cublas::gemm_batched(int m, int n, int k, float alpha, const void *const *a, long long lda,
                          const void *const *b, long long ldb, bool b_transposed, float beta, void *const *c,
                          cudaDataType c_type, long long ldc, int count) const {
    const int st = api_->gemm_batched_ex(handle_, b_transposed ? kOpT : kOpN, kOpN, n, m, k, &alpha, b, CUDA_R_16F,
                                         static_cast<int>(ldb), a, CUDA_R_16F, static_cast<int>(lda), &beta, c,
                                         c_type, static_cast<int>(ldc), count, kComputeF32, kGemmDefault);
    if (st != 0) throw DeviceError("cublasGemmBatchedEx failed with status " + std::to_string(st));
}

}  // namespace cuda
}  // namespace pumice
