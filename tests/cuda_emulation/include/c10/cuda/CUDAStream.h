// Stand-in for c10's CUDA stream in the CPU emulation (tests/test_cuda_compile.py,
// lstm_cuda_emulated.cpp): the host code only asks for the current stream and passes it on.
#pragma once
#include <cuda_runtime_api.h>
#include <c10/core/Device.h>
namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
