// bcq_gpu.cu — bcq tensors on the GPU (LUT GEMM). Not yet written: bcq runs tiled (f16).
#include "device_linear.cuh"

namespace pumice {
namespace cuda {

std::unique_ptr<DeviceLinear> make_bcq_device_linear(const TensorEntry &, cudaStream_t) { return nullptr; }

}  // namespace cuda
}  // namespace pumice
