// cuda_common.cuh — error checking and device memory ownership for the CUDA backend.
//
// Every CUDA call goes through PUMICE_CUDA_CHECK: a failure becomes a pumice::Error (out of
// memory -> PUMICE_ERR_OUT_OF_MEMORY, anything else -> PUMICE_ERR_DEVICE) that the C ABI turns
// into a status code. Nothing in the backend aborts the process.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "errors.h"
#include "launch_config.cuh"

namespace pumice {
namespace cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char *what, const char *file, int line);

#define PUMICE_CUDA_CHECK(call)                                                              \
    do {                                                                                     \
        cudaError_t pumice_err_ = (call);                                                    \
        if (pumice_err_ != cudaSuccess)                                                      \
            ::pumice::cuda::throw_cuda_error(pumice_err_, #call, __FILE__, __LINE__);        \
    } while (0)

// After a kernel launch: catches bad launch configurations (and, in capture, invalid graphs).
#define PUMICE_CUDA_CHECK_LAUNCH(name) PUMICE_CUDA_CHECK(cudaGetLastError())

// One device allocation, freed on destruction. Allocation failure throws the OOM status with
// the size and what it was for, so "model larger than the GPU" reads as such.
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    DeviceBuffer(size_t bytes, const char *what) { allocate(bytes, what); }
    ~DeviceBuffer() { release(); }
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer &operator=(const DeviceBuffer &) = delete;
    DeviceBuffer(DeviceBuffer &&o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; o.bytes_ = 0; }
    DeviceBuffer &operator=(DeviceBuffer &&o) noexcept {
        if (this != &o) { release(); ptr_ = o.ptr_; bytes_ = o.bytes_; o.ptr_ = nullptr; o.bytes_ = 0; }
        return *this;
    }
    void allocate(size_t bytes, const char *what);
    // Grows (never shrinks) to at least `bytes`; contents are not kept.
    void reserve(size_t bytes, const char *what) { if (bytes > bytes_) { release(); allocate(bytes, what); } }
    void zero(cudaStream_t stream);
    void release();
    template <class T> T *as() const { return static_cast<T *>(ptr_); }
    void *get() const { return ptr_; }
    size_t size() const { return bytes_; }
    explicit operator bool() const { return ptr_ != nullptr; }

private:
    void *ptr_ = nullptr;
    size_t bytes_ = 0;
};

// Page-locked host memory (fast, asynchronous copies of logits and step descriptors).
class PinnedBuffer {
public:
    PinnedBuffer() = default;
    ~PinnedBuffer() { if (ptr_) cudaFreeHost(ptr_); }
    PinnedBuffer(const PinnedBuffer &) = delete;
    PinnedBuffer &operator=(const PinnedBuffer &) = delete;
    void reserve(size_t bytes, const char *what);
    template <class T> T *as() const { return static_cast<T *>(ptr_); }
    size_t size() const { return bytes_; }

private:
    void *ptr_ = nullptr;
    size_t bytes_ = 0;
};

// Programmatic dependent launch (Hopper and later). A kernel of the decode step lets the next
// one start early (pdl_launch_dependents) so that its blocks load their weights, which no kernel
// writes, while this one finishes; everything that reads a predecessor's output or writes
// anything comes after pdl_wait, which returns once every earlier kernel has completed and its
// memory is visible. Without the launch attribute (older GPUs, PUMICE_PDL=0) both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether launches on the current device carry the programmatic-serialization attribute.
bool pdl_enabled();

// The backend's switches: env_is(name, value) when the variable is set to exactly value;
// env_on(name) when it is set, non-empty and not "0"; env_int(name, fallback) its integer
// value (fallback when unset or empty).
bool env_is(const char *name, const char *value);
bool env_on(const char *name);
int env_int(const char *name, int fallback);

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }
// Turns PDL off for this thread's launches while it lives (a decode step past PUMICE_PDL_COLS).
class PdlOff {
public:
    explicit PdlOff(bool off);
    ~PdlOff();
    PdlOff(const PdlOff &) = delete;
    PdlOff &operator=(const PdlOff &) = delete;

private:
    bool previous_;
};

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when enabled.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args &&...args) {
    const LaunchConfig config(grid, block, smem, stream, pdl_enabled());
    PUMICE_CUDA_CHECK(cudaLaunchKernelEx(&config.cfg, kernel, std::forward<Args>(args)...));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace cuda
}  // namespace pumice
