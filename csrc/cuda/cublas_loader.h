// cublas_loader.h — cuBLAS, opened at run time for the prefill GEMMs.
//
// The library is found with dlopen (PUMICE_CUBLAS, then libcublas.so.13 / .12 / .so — a
// process that imported torch already has one loaded), so libpumice_cuda.so builds without the
// cuBLAS headers and loads on machines without cuBLAS; there the prefill falls back to the
// batched GEMV path (correct, slower). Only the few entry points we call are declared, with the
// enum values of the public cuBLAS API.
#pragma once
#include <cuda_runtime.h>
#include <library_types.h>

#include <string>

namespace pumice {
namespace cuda {

class Cublas {
public:
    // Returns nullptr (and a reason in *why) when no usable cuBLAS is found.
    static Cublas *open(cudaStream_t stream, std::string *why);
    ~Cublas();
    const std::string &path() const { return path_; }

    // Row-major C[m][n] (ldc) = alpha * A[m][k] (lda) * op(B) + beta * C, where op(B) = B^T with
    // B stored row-major [n][k] (ldb) when b_transposed, else B stored row-major [k][n].
    // All pointers on the device; A and B f16; C f16 or f32; accumulation f32.
    void gemm(int m, int n, int k, float alpha, const void *a, long long lda, const void *b,
              long long ldb, bool b_transposed, float beta, void *c, cudaDataType c_type,
              long long ldc) const;
    // The same over `count` problems given by device arrays of pointers.
    void gemm_batched(int m, int n, int k, float alpha, const void *const *a, long long lda,
                      const void *const *b, long long ldb, bool b_transposed, float beta,
                      void *const *c, cudaDataType c_type, long long ldc, int count) const;

private:
    Cublas() = default;
    struct Api;
    void *lib_ = nullptr;
    void *handle_ = nullptr;
    Api *api_ = nullptr;
    std::string path_;
};

}  // namespace cuda
}  // namespace pumice
