// The per-step fused pointwise kernels (shapes in lstm_kernels.h): one thread per (row, hidden
// unit) element of the step, in a grid-stride loop; what each element does is lstm_step.cuh's.
#include "lstm_kernels.h"
#include "lstm_step.cuh"

#include <c10/cuda/CUDAException.h>

#include <algorithm>

namespace fused_lstm {
namespace gpu {
namespace {

constexpr int kThreads = 256;
// A grid-stride loop covers the rest; keeps the grid far below any launch limit.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_forward_step_kernel(
    int64_t n, int64_t hidden, T* __restrict__ gates, T* __restrict__ c_state,
    T* __restrict__ cells, T* __restrict__ h_out, int64_t ld_h_out, T* __restrict__ h_state) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += stride) {
    forward_step_element<T>(idx, hidden, gates, c_state, cells, h_out, ld_h_out, h_state);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_backward_step_kernel(const BackwardStep<T> p) {
  const int64_t n = p.batch * p.hidden;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += stride) {
    backward_step_element<T>(p, idx);
  }
}

}  // namespace

template <typename T>
void lstm_forward_step(int64_t batch, int64_t hidden, T* gates, T* c_state, T* cells, T* h_out,
                       int64_t ld_h_out, T* h_state, cudaStream_t stream) {
  const int64_t n = batch * hidden;
  if (n <= 0) return;
  lstm_forward_step_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
      n, hidden, gates, c_state, cells, h_out, ld_h_out, h_state);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void lstm_backward_step(const BackwardStep<T>& step, cudaStream_t stream) {
  const int64_t n = step.batch * step.hidden;
  if (n <= 0) return;
  lstm_backward_step_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(step);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void lstm_forward_step<float>(int64_t, int64_t, float*, float*, float*, float*, int64_t,
                                       float*, cudaStream_t);
template void lstm_forward_step<double>(int64_t, int64_t, double*, double*, double*, double*,
                                        int64_t, double*, cudaStream_t);
template void lstm_backward_step<float>(const BackwardStep<float>&, cudaStream_t);
template void lstm_backward_step<double>(const BackwardStep<double>&, cudaStream_t);

}  // namespace gpu
}  // namespace fused_lstm
