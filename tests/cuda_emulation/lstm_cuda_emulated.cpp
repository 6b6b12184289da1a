// The CUDA host code of csrc/cuda compiled for the CPU, with every kernel launch replaced by
// loops over the kernel's own per-element (step path) or per-block (persistent kernels) body.
// tests/test_cuda_compile.py builds it (torch.utils.cpp_extension.load, no CUDA) as the ops
// fused_lstm_emulated::* for CPU tensors and compares them with the CPU kernels; its docstring
// says what this checks and what it cannot.
//
// include/ holds stand-ins for the CUDA runtime's and c10's CUDA headers that the host code
// names (a stream type, a device guard, the current stream).
//
// emulation_system_includes.h is written by the test into the build directory: an #include <...>
// of every system header that this file reaches through the project's own "..." includes, so
// that all of them are read while `fused_lstm` and `CUDA` are still plain words. Then the
// project's sources, with the namespace renamed (the ops become fused_lstm_emulated::*, beside
// the real ones) and the CUDA dispatch key replaced by CPU.
#include "emulation_system_includes.h"

// What the emulation below uses beyond the project's own includes.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#define fused_lstm fused_lstm_emulated
#define CUDA CPU
#include "lstm.cpp"
#include "ops.cpp"
#include "convert_16bit.cpp"
#include "settings.cpp"
#include "cpu/buffer_cache.cpp"
#include "cuda/lstm_cuda.cu"
#include "cuda/lstm_step.cuh"
#include "cuda/lstm_persistent.cuh"

// ---- The step path: each kernel launch becomes a loop over the kernel's per-element function --
// (Defined in this translation unit, after their uses: the templates are instantiated here for
// every type lstm_cuda.cu uses, as are the persistent launchers below.)
namespace fused_lstm::gpu {
template <typename T>
void lstm_forward_step(int64_t batch, int64_t hidden, T* gates, T* c_state, T* cells, T* h_out,
                       int64_t ld_h_out, T* h_state, cudaStream_t) {
  for (int64_t idx = 0; idx < batch * hidden; ++idx)
    forward_step_element<T>(idx, hidden, gates, c_state, cells, h_out, ld_h_out, h_state);
}
template <typename T>
void lstm_backward_step(const BackwardStep<T>& step, cudaStream_t) {
  for (int64_t idx = 0; idx < step.batch * step.hidden; ++idx) backward_step_element<T>(step, idx);
}
}  // namespace fused_lstm::gpu

// ---- The persistent kernels: each launch becomes loops over their per-block bodies -----------
// (lstm_persistent.cuh); the grid barrier is the boundary between two loops over every block.
namespace fused_lstm::gpu {

// The emulated device: FUSED_LSTM_EMULATED_DEVICE = "cooperative,sm_count,smem_per_sm,
// smem_per_block_optin,reserved_smem_per_block,max_blocks_per_sm" (default: an H100 SXM's);
// FUSED_LSTM_EMULATED_CORESIDENT: what the occupancy API answers (default: the model's).
DeviceLimits emulated_limits() {
  DeviceLimits lim{true, 132, 233472, 232448, 1024, 2};
  if (const char* v = std::getenv("FUSED_LSTM_EMULATED_DEVICE")) {
    long long f[6];
    TORCH_CHECK(std::sscanf(v, "%lld,%lld,%lld,%lld,%lld,%lld", &f[0], &f[1], &f[2], &f[3],
                            &f[4], &f[5]) == 6, "bad FUSED_LSTM_EMULATED_DEVICE: ", v);
    lim = DeviceLimits{f[0] != 0, f[1], f[2], f[3], f[4], f[5]};
  }
  return lim;
}

DeviceLimits persistent_device_limits(int, bool, bool) { return emulated_limits(); }

int64_t persistent_coresident_blocks(int, bool, bool, int64_t smem_bytes) {
  if (const char* v = std::getenv("FUSED_LSTM_EMULATED_CORESIDENT")) return std::atoll(v);
  return modelled_coresident_blocks(emulated_limits(), smem_bytes);
}

std::atomic<int64_t> persistent_launch_count{0};

// The threads of one block, one after the other (in reverse order).
struct HostBlock {
  int nthreads;
  void sync() const {}
  template <typename F>
  void for_each_thread(F&& f) const {
    for (int tid = nthreads - 1; tid >= 0; --tid) f(tid);
  }
  template <typename AccT, typename Partial, typename Finish>
  void for_each_team(int k_split, int64_t items, Partial&& partial, Finish&& finish) const {
    TORCH_CHECK(k_split >= 1 && k_split <= 32 && (k_split & (k_split - 1)) == 0 &&
                nthreads % 32 == 0, "k_split");
    constexpr int n = sizeof(AccT::v) / sizeof(AccT::v[0]);
    const int teams = nthreads / k_split;
    for (int64_t first = 0; first < items; first += teams) {
      for (int team = teams - 1; team >= 0; --team) {
        const int64_t item = first + team;
        std::vector<AccT> lanes(k_split, AccT{});
        if (item < items)
          for (int lane = 0; lane < k_split; ++lane) partial(item, lane, lanes[lane]);
        // __shfl_xor_sync's butterfly: lane l adds lane l ^ offset's value to its own.
        for (int offset = 1; offset < k_split; offset <<= 1) {
          std::vector<AccT> next = lanes;
          for (int lane = 0; lane < k_split; ++lane)
            for (int i = 0; i < n; ++i) next[lane].v[i] = lanes[lane].v[i] + lanes[lane ^ offset].v[i];
          lanes = next;
        }
        if (item < items)
          for (int lane = k_split - 1; lane >= 0; --lane)
            finish(item, lane, static_cast<const AccT&>(lanes[lane]));
      }
    }
  }
};

template <typename T>
std::vector<std::vector<T>> emulated_grid_smem(const PersistentPlan& plan, int64_t directions,
                                               bool backward) {
  const int64_t n = int64_t{plan.blocks} * directions;
  // What cudaLaunchCooperativeKernel and the dynamic shared memory limit refuse.
  TORCH_CHECK(n <= persistent_coresident_blocks(-1, backward, sizeof(T) == 8, plan.smem_bytes),
              "emulated launch: grid of ", n, " blocks is not co-resident");
  TORCH_CHECK(plan.smem_bytes <= emulated_limits().smem_per_block_optin, "emulated: smem");
  TORCH_CHECK(plan.smem_bytes % sizeof(T) == 0 && plan.threads == kPersistentThreads, "plan");
  // Shared memory starts as NaN: reading what was never staged shows in the results.
  return std::vector<std::vector<T>>(
      n, std::vector<T>(plan.smem_bytes / sizeof(T), std::numeric_limits<T>::quiet_NaN()));
}

// One cooperative launch: its grid's shared memory (one buffer per block) and its blocks, run one
// after the other in reverse order, so that a block reading what another block writes in the
// same phase gives a wrong result.
template <typename T>
struct EmulatedGrid {
  int blocks;                         // per direction
  std::vector<std::vector<T>> smem;  // per block: direction * blocks + block
  HostBlock blk;

  EmulatedGrid(const PersistentPlan& plan, int64_t directions, bool backward)
      : blocks(plan.blocks),
        smem(emulated_grid_smem<T>(plan, directions, backward)),
        blk{plan.threads} {}

  // f(direction, block, its shared memory) for every block of the grid.
  template <typename F>
  void for_each_block(F&& f) {
    for (int i = static_cast<int>(smem.size()) - 1; i >= 0; --i)
      f(i / blocks, i % blocks, smem[i].data());
  }
};

template <typename T>
void persistent_forward(const PersistentForward<T>& p, cudaStream_t) {
  ++persistent_launch_count;
  EmulatedGrid<T> grid(p.plan, p.num_directions, false);
  grid.for_each_block([&](int d, int x, T* smem) { forward_stage_weights(p, d, x, smem, grid.blk); });
  for (int64_t step = 0; step < p.steps.seq_len; ++step) {
    // grid.sync()
    grid.for_each_block(
        [&](int d, int x, T* smem) { forward_block_step(p, d, x, step, smem, grid.blk); });
  }
}

template <typename T>
void persistent_backward(const PersistentBackward<T>& p, cudaStream_t) {
  ++persistent_launch_count;
  EmulatedGrid<T> grid(p.plan, p.num_directions, true);
  grid.for_each_block(
      [&](int d, int x, T* smem) { backward_stage_weights(p, d, x, smem, grid.blk); });
  for (int64_t step = 0; step < p.steps.seq_len; ++step) {
    grid.for_each_block([&](int d, int x, T*) { backward_block_phase_a(p, d, x, step, grid.blk); });
    // grid.sync()
    grid.for_each_block(
        [&](int d, int x, T* smem) { backward_block_phase_b(p, d, x, step, smem, grid.blk); });
  }
}

namespace {

int64_t persistent_launches() { return persistent_launch_count.load(); }

std::string cuda_path_choice(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                             int64_t hidden_size, bool bidirectional, int64_t proj_size) {
  return cuda_path_choice_text(input, batch_sizes, hidden_size, bidirectional, proj_size, -1);
}

}  // namespace
}  // namespace fused_lstm::gpu

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  m.def("persistent_launches() -> int", &fused_lstm::gpu::persistent_launches);
  m.def("cuda_path_choice(Tensor input, Tensor? batch_sizes, int hidden_size, "
        "bool bidirectional, int proj_size) -> str", &fused_lstm::gpu::cuda_path_choice);
}
