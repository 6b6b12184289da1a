// The persistent kernels (lstm_persistent.h says what and why), their launchers, the device
// queries behind the path decision, and the op that shows the decision
// (fused_lstm::cuda_path_choice, used by fused_lstm.explain).
//
// One cooperative launch per layer, grid (blocks, D): blockIdx.y is the direction, blockIdx.x
// the slice of hidden units. The grid never exceeds what the device holds at once: the decision
// checks it with the occupancy API for exactly the dynamic shared memory launched with, and
// cudaLaunchCooperativeKernel refuses (error, never a hang) a grid that does not fit.
// cooperative_groups' grid.sync() is the barrier between steps (release/acquire at GPU scope);
// what another block wrote before it is read through L2 (lstm_persistent.cuh's load_from_grid).
// Enqueued on the current stream, checked, never synchronising the host.
#include "lstm_persistent.h"
#include "lstm_persistent.cuh"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cooperative_groups.h>

#include <map>
#include <mutex>
#include <tuple>

namespace fused_lstm {
namespace gpu {
namespace {

namespace cg = cooperative_groups;

// The threads of one block, as lstm_persistent.cuh's Block.
struct DeviceBlock {
  int tid;
  int nthreads;

  __device__ __forceinline__ void sync() const { __syncthreads(); }

  template <typename F>
  __device__ __forceinline__ void for_each_thread(F&& f) const {
    f(tid);
  }

  template <typename AccT, typename Partial, typename Finish>
  __device__ __forceinline__ void for_each_team(int k_split, int64_t items, Partial&& partial,
                                                Finish&& finish) const {
    const int lane = tid & (k_split - 1);
    const int team = tid / k_split;
    const int teams = nthreads / k_split;
    // Uniform trip count: every lane of every warp reaches every shuffle.
    for (int64_t first = 0; first < items; first += teams) {
      const int64_t item = first + team;
      AccT acc{};
      if (item < items) partial(item, lane, acc);
      // Butterfly within aligned groups of k_split lanes (k_split divides 32).
      for (int offset = 1; offset < k_split; offset <<= 1) {
#pragma unroll
        for (int i = 0; i < static_cast<int>(sizeof(acc.v) / sizeof(acc.v[0])); ++i)
          acc.v[i] += __shfl_xor_sync(0xffffffffu, acc.v[i], offset);
      }
      if (item < items) finish(item, lane, static_cast<const AccT&>(acc));
    }
  }
};

extern __shared__ __align__(16) unsigned char persistent_smem[];

// Grid (plan.blocks, D) x plan.threads; plan.smem_bytes of dynamic shared memory.
// 2 blocks per SM in __launch_bounds__ caps registers at 128 per thread.
template <typename T>
__global__ void __launch_bounds__(kPersistentThreads, 2)
    persistent_forward_kernel(const __grid_constant__ PersistentForward<T> p) {
  T* smem = reinterpret_cast<T*>(persistent_smem);
  const int d = blockIdx.y, block = blockIdx.x;
  const DeviceBlock blk{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)};
  cg::grid_group grid = cg::this_grid();
  forward_stage_weights(p, d, block, smem, blk);
  for (int64_t step = 0; step < p.steps.seq_len; ++step) {
    // h_{t-1} of every block (both directions) written. Unconditional: every block of the grid
    // reaches every barrier, whatever its direction's rows at this step.
    if (step > 0) grid.sync();
    forward_block_step(p, d, block, step, smem, blk);
  }
}

template <typename T>
__global__ void __launch_bounds__(kPersistentThreads, 2)
    persistent_backward_kernel(const __grid_constant__ PersistentBackward<T> p) {
  T* smem = reinterpret_cast<T*>(persistent_smem);
  const int d = blockIdx.y, block = blockIdx.x;
  const DeviceBlock blk{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)};
  cg::grid_group grid = cg::this_grid();
  backward_stage_weights(p, d, block, smem, blk);
  for (int64_t step = 0; step < p.steps.seq_len; ++step) {
    backward_block_phase_a(p, d, block, step, blk);
    grid.sync();  // dgates_t of every block written
    backward_block_phase_b(p, d, block, step, smem, blk);
    __syncthreads();  // phase B's dh_state written before this block's next phase A reads it
  }
}

const void* kernel_of(bool backward, bool is_double) {
  if (backward) {
    return is_double ? reinterpret_cast<const void*>(&persistent_backward_kernel<double>)
                     : reinterpret_cast<const void*>(&persistent_backward_kernel<float>);
  }
  return is_double ? reinterpret_cast<const void*>(&persistent_forward_kernel<double>)
                   : reinterpret_cast<const void*>(&persistent_forward_kernel<float>);
}

int attribute(cudaDeviceAttr what, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, what, device));
  return value;
}

std::mutex cache_mutex;

}  // namespace

DeviceLimits persistent_device_limits(int device, bool backward, bool is_double) {
  static std::map<std::tuple<int, bool, bool>, DeviceLimits> cache;
  const auto key = std::make_tuple(device, backward, is_double);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  // The caller's guard made `device` current: function attributes apply to it.
  DeviceLimits lim;
  lim.cooperative_launch = attribute(cudaDevAttrCooperativeLaunch, device) != 0;
  lim.sm_count = attribute(cudaDevAttrMultiProcessorCount, device);
  lim.smem_per_sm = attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  lim.smem_per_block_optin = attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  lim.reserved_smem_per_block = attribute(cudaDevAttrReservedSharedMemoryPerBlock, device);
  const void* kernel = kernel_of(backward, is_double);
  // Beyond 48 KB of dynamic shared memory a kernel must opt in; and prefer shared memory to L1
  // so that the occupancy API and the launch see the largest carve-out.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(lim.smem_per_block_optin)));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      static_cast<int>(cudaSharedmemCarveoutMaxShared)));
  int per_sm = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistentThreads, 0));
  lim.max_blocks_per_sm = per_sm;
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.emplace(key, lim);
  return lim;
}

int64_t persistent_coresident_blocks(int device, bool backward, bool is_double,
                                     int64_t smem_bytes) {
  static std::map<std::tuple<int, bool, bool, int64_t>, int64_t> cache;
  const auto key = std::make_tuple(device, backward, is_double, smem_bytes);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  // The attributes are set: persistent_device_limits ran for this device and kernel first.
  const DeviceLimits lim = persistent_device_limits(device, backward, is_double);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel_of(backward, is_double), kPersistentThreads,
      static_cast<size_t>(smem_bytes)));
  const int64_t blocks = int64_t{per_sm} * lim.sm_count;
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.emplace(key, blocks);
  return blocks;
}

template <typename T>
void persistent_forward(const PersistentForward<T>& p, cudaStream_t stream) {
  if (p.plan.blocks <= 0 || p.num_directions <= 0 || p.steps.seq_len <= 0) return;
  const dim3 grid(static_cast<unsigned>(p.plan.blocks), static_cast<unsigned>(p.num_directions));
  const dim3 block(static_cast<unsigned>(p.plan.threads));
  void* args[] = {const_cast<PersistentForward<T>*>(&p)};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(&persistent_forward_kernel<T>), grid, block, args,
      static_cast<size_t>(p.plan.smem_bytes), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void persistent_backward(const PersistentBackward<T>& p, cudaStream_t stream) {
  if (p.plan.blocks <= 0 || p.num_directions <= 0 || p.steps.seq_len <= 0) return;
  const dim3 grid(static_cast<unsigned>(p.plan.blocks), static_cast<unsigned>(p.num_directions));
  const dim3 block(static_cast<unsigned>(p.plan.threads));
  void* args[] = {const_cast<PersistentBackward<T>*>(&p)};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(&persistent_backward_kernel<T>), grid, block, args,
      static_cast<size_t>(p.plan.smem_bytes), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void persistent_forward<float>(const PersistentForward<float>&, cudaStream_t);
template void persistent_forward<double>(const PersistentForward<double>&, cudaStream_t);
template void persistent_backward<float>(const PersistentBackward<float>&, cudaStream_t);
template void persistent_backward<double>(const PersistentBackward<double>&, cudaStream_t);

namespace {

// fused_lstm::cuda_path_choice (lstm_persistent.h's cuda_path_choice_text) on input's device.
std::string cuda_path_choice(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                             int64_t hidden_size, bool bidirectional, int64_t proj_size) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  return cuda_path_choice_text(input, batch_sizes, hidden_size, bidirectional, proj_size,
                               input.get_device());
}

}  // namespace

}  // namespace gpu

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  // Which CUDA path lstm_forward / lstm_backward take for these sizes, and why (for
  // fused_lstm.explain). Only where the CUDA kernels are compiled.
  m.def(
      "cuda_path_choice(Tensor input, Tensor? batch_sizes, int hidden_size, bool bidirectional, "
      "int proj_size) -> str");
}

TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) {
  m.impl("cuda_path_choice", &gpu::cuda_path_choice);
}

}  // namespace fused_lstm
