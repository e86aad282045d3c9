// launch_config.cuh — a cudaLaunchKernelEx configuration, with or without programmatic
// dependent launch (header-only, no other dependencies: the standalone benchmarks use it too).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace pumice {
namespace cuda {

// cfg points into this object (its attribute): keep it where it was built.
struct LaunchConfig {
    cudaLaunchAttribute attr[1];
    cudaLaunchConfig_t cfg;
    LaunchConfig(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool programmatic) : attr{}, cfg{} {
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.gridDim = grid;
        cfg.blockDim = block;
        cfg.dynamicSmemBytes = smem;
        cfg.stream = stream;
        cfg.attrs = attr;
        cfg.numAttrs = programmatic ? 1 : 0;
    }
    LaunchConfig(const LaunchConfig &) = delete;
    LaunchConfig &operator=(const LaunchConfig &) = delete;
};

}  // namespace cuda
}  // namespace pumice
