// cuda_common.cu — see cuda_common.cuh.
#include "cuda_common.cuh"

#include <cstdlib>

namespace pumice {
namespace cuda {

void throw_cuda_error(cudaError_t err, const char *what, const char *file, int line) {
    // Clear a non-sticky error so that later calls on this thread start clean.
    (void)cudaGetLastError();
    std::string msg = std::string("CUDA error: ") + cudaGetErrorString(err) + " (" + cudaGetErrorName(err) +
                      ") in " + what + " at " + file + ":" + std::to_string(line);
    if (err == cudaErrorMemoryAllocation) throw Error(PUMICE_ERR_OUT_OF_MEMORY, msg);
    throw DeviceError(msg);
}

namespace {
thread_local bool pdl_off_here = false;
}

PdlOff::PdlOff(bool off) : previous_(pdl_off_here) { pdl_off_here = pdl_off_here || off; }
PdlOff::~PdlOff() { pdl_off_here = previous_; }

bool pdl_enabled() {
    // The attribute needs compute capability 9.0; PUMICE_PDL=0 turns it off (comparisons).
    static thread_local int cached_device = -1;
    static thread_local bool capable = false;
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    if (device != cached_device) {
        int major = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
            (void)cudaGetLastError();
            major = 0;
        }
        capable = major >= 9;
        cached_device = device;
    }
    return capable && !pdl_off_here && !env_is("PUMICE_PDL", "0");
}

bool env_is(const char *name, const char *value) {
    const char *v = std::getenv(name);
    return v && std::string(v) == value;
}

bool env_on(const char *name) {
    const char *v = std::getenv(name);
    return v && *v && std::string(v) != "0";
}

int env_int(const char *name, int fallback) {
    const char *v = std::getenv(name);
    return v && *v ? std::atoi(v) : fallback;
}

void DeviceBuffer::allocate(size_t bytes, const char *what) {
    release();
    if (bytes == 0) bytes = 1;
    void *p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        const std::string msg = std::string("out of GPU memory: ") + std::to_string(bytes >> 20) + " MiB for " +
                                what + " (" + std::to_string(free_b >> 20) + " MiB free of " +
                                std::to_string(total_b >> 20) + " MiB): " + cudaGetErrorString(err);
        if (err == cudaErrorMemoryAllocation) throw Error(PUMICE_ERR_OUT_OF_MEMORY, msg);
        throw DeviceError(msg);
    }
    ptr_ = p;
    bytes_ = bytes;
}

void DeviceBuffer::zero(cudaStream_t stream) {
    if (ptr_) PUMICE_CUDA_CHECK(cudaMemsetAsync(ptr_, 0, bytes_, stream));
}

void DeviceBuffer::release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
}

void PinnedBuffer::reserve(size_t bytes, const char *what) {
    if (bytes <= bytes_) return;
    if (ptr_) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    void *p = nullptr;
    const cudaError_t err = cudaMallocHost(&p, bytes);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        throw Error(PUMICE_ERR_OUT_OF_MEMORY, std::string("out of pinned host memory for ") + what + ": " +
                                                   cudaGetErrorString(err));
    }
    ptr_ = p;
    bytes_ = bytes;
}

}  // namespace cuda
}  // namespace pumice
