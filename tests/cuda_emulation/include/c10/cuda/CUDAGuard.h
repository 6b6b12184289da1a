// Stand-in for c10's CUDA device guard in the CPU emulation (tests/test_cuda_compile.py,
// lstm_cuda_emulated.cpp): the host code only constructs one.
#pragma once
#include <c10/core/Device.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
