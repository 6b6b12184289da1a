// THE CUDA path rule: persistent kernel or step path, the persistent launch plan and the cost
// model, as a pure function of a call's sizes and the device's limits (decide_cuda_path), and
// its one-line text (describe). lstm_persistent.h says what the two paths are.
//
// Host code only, plain C++ (no CUDA, no ATen), so that it is compiled into every build:
//   * the CUDA build decides with it (lstm_persistent.h: choose_cuda_path, which adds the
//     device's limits, the environment overrides and the occupancy API's final word);
//   * every build, the CPU-only one included, registers it as the op
//     fused_lstm::cuda_path_predict (csrc/cuda_path_rule.cpp), through which
//     fused_lstm/explain.py predicts the choice for an assumed device without a GPU.
// The kernels (lstm_persistent.cuh / .cu) use its constants and PersistentPlan.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

namespace fused_lstm {
namespace gpu {

// ---- Constants of the kernels -----------------------------------------------------------------
constexpr int kPersistentThreads = 256;       // threads per block
constexpr int kPersistentRowsPerThread = 4;   // batch rows per dot-product team (register tile)
constexpr int kPersistentUnitsPerTeam = 4;    // backward: hidden units per team (register tile)
constexpr int kPersistentMaxRuns = 128;       // distinct batch sizes a packed sequence may have
constexpr int64_t kPersistentMaxTile = 64;    // batch rows staged in shared memory at once
// Fewer multiply-adds per block and step than this is latency, not work: rather fewer, fuller
// blocks (fewer to wait for at each barrier).
constexpr int64_t kPersistentMinFma = 16384;
// Auto mode's cost model of one step (one layer, every direction), in nanoseconds. Guesses for an
// H100 from published rates, never measured (benchmarks/notes/cuda.md, "The plan and the cost model
// (what `explain` will say on an H100,
// predicted)"); tune them on a GPU.
//   persistent: kGridSyncNs + bytes staged from L2 by every block / kStagedBytesPerNs
//               + the busiest SM's multiply-adds * 10 / kSmemFmaPer10Ns (double: twice)
//               [+ kPhaseANs backward]
//   step path:  per direction, kStepLaunchNs * 2 (GEMM + pointwise, issued by the host)
//               + the GEMM's 2*B*4H*H flops / kGemmFlopsPerNs (double: twice)
constexpr int64_t kGridSyncNs = 1500;      // one grid.sync() of up to ~260 blocks
constexpr int64_t kStagedBytesPerNs = 5500;  // L2 to the SMs, all together: 5.5 TB/s
constexpr int64_t kSmemFmaPer10Ns = 1123;  // one SM: 32 shared-memory words per clock, 0.5 loads
                                           // per multiply-add, 1.755 GHz: 112.3 per ns
constexpr int64_t kPhaseANs = 300;         // backward's elementwise phase
constexpr int64_t kStepLaunchNs = 5000;    // one eager ATen call that launches a kernel
constexpr int64_t kGemmFlopsPerNs = 40000;  // cuBLAS float32 on one step's GEMM: 40 TFLOP/s

// ---- Launch plan -----------------------------------------------------------------------------
// Shared memory of one block: w_rows x w_stride weights, then batch_tile x x_stride staged
// activations (h_{t-1} forward, dgates_t backward), all in the math dtype.
struct PersistentPlan {
  int32_t units = 0;       // U: hidden units per block
  int32_t blocks = 0;      // blocks per direction: ceil(H / U)
  int32_t threads = 0;     // per block
  int32_t k_split = 1;     // lanes that share one dot product (power of two, <= 32)
  int32_t batch_tile = 0;  // rows staged at once (multiple of kPersistentRowsPerThread)
  int32_t w_rows = 0;      // forward 4U (gate-major: g*U + u); backward U rounded up to
                           // kPersistentUnitsPerTeam (the W_hh column slice, transposed)
  int32_t w_stride = 0;    // elements per weight row (>= K, padded against bank conflicts)
  int32_t x_stride = 0;    // elements per staged row (>= K)
  int64_t smem_bytes = 0;  // dynamic shared memory per block
};

// ---- The decision: persistent or step ---------------------------------------------------------
// What the decision depends on, no more: sizes of the call and the math dtype's width.
struct PathQuery {
  int64_t hidden_size = 0;
  int64_t proj_size = 0;
  int64_t batch = 0;           // rows of the first (largest) step
  int64_t seq_len = 0;
  int64_t num_directions = 1;
  int64_t num_runs = 1;        // distinct batch sizes (1 when not packed)
  int64_t elem_size = 4;       // bytes of the math dtype: 4 (float) or 8 (double)
  bool backward = false;
};

// What the device offers one persistent kernel.
struct DeviceLimits {
  bool cooperative_launch = false;
  int64_t sm_count = 0;
  int64_t smem_per_sm = 0;              // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int64_t smem_per_block_optin = 0;     // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int64_t reserved_smem_per_block = 0;  // cudaDevAttrReservedSharedMemoryPerBlock
  int64_t max_blocks_per_sm = 0;        // the kernel's own limit (threads, registers): occupancy
                                        // at zero dynamic shared memory
};

enum class PathMode { kAuto, kPersistent, kStep };

// The settings fused_lstm.backends.cuda.path = auto|persistent|step; the others are for tests and
// tuning: they fix one parameter of the plan (0 = chosen by the rule).
struct PathOverrides {
  PathMode mode = PathMode::kAuto;
  int64_t units = 0;       // cuda.persistent_units
  int64_t batch_tile = 0;  // cuda.persistent_tile
  int64_t k_split = 0;     // cuda.persistent_k_split
};

// Why; the words are what explain() shows (fused_lstm/explain.py has a sentence for each).
enum class PathReason {
  kForcedStep,          // cuda.path = "step"
  kNoCooperativeLaunch, // the device cannot launch cooperative kernels
  kEmptyBatch,          // nothing to compute
  kProjection,          // proj_size > 0
  kTooManyRuns,         // packed sequence with more than kPersistentMaxRuns distinct batch sizes
  kDoesNotFit,          // no co-resident grid holds W_hh in shared memory
  kStepPathFaster,      // auto: the cost model predicts the step path faster
  kOccupancyRefused,    // the occupancy API allows fewer co-resident blocks than the model
  kAuto,                // auto: persistent
  kForcedPersistent,    // cuda.path = "persistent"
};

inline const char* reason_word(PathReason r) {
  switch (r) {
    case PathReason::kForcedStep: return "forced_step";
    case PathReason::kNoCooperativeLaunch: return "no_cooperative_launch";
    case PathReason::kEmptyBatch: return "empty_batch";
    case PathReason::kProjection: return "projection";
    case PathReason::kTooManyRuns: return "too_many_batch_size_runs";
    case PathReason::kDoesNotFit: return "does_not_fit";
    case PathReason::kStepPathFaster: return "step_path_predicted_faster";
    case PathReason::kOccupancyRefused: return "occupancy_refused";
    case PathReason::kAuto: return "auto";
    case PathReason::kForcedPersistent: return "forced_persistent";
  }
  return "unknown";
}

struct PathChoice {
  bool persistent = false;
  PathReason reason = PathReason::kForcedStep;
  PersistentPlan plan;                 // when a plan was found (even if not taken)
  int64_t coresident_blocks = 0;       // of that plan's shared memory, whole device
  int64_t fma_per_block_step = 0;      // multiply-adds of one block in one step (all rows)
  int64_t persistent_ns = 0;           // the cost model's step time, persistent
  int64_t step_path_ns = 0;            // the cost model's step time, step path
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t pow2_floor(int64_t x) {
  int64_t p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}
inline int64_t pow2_ceil(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// Blocks of `smem_bytes` dynamic shared memory that fit on the whole device at once, by the
// occupancy calculator's rules (the launch re-checks with the CUDA occupancy API itself).
inline int64_t modelled_coresident_blocks(const DeviceLimits& lim, int64_t smem_bytes) {
  if (smem_bytes > lim.smem_per_block_optin) return 0;
  const int64_t by_smem = lim.smem_per_sm / (smem_bytes + lim.reserved_smem_per_block);
  return lim.sm_count * std::min(lim.max_blocks_per_sm, by_smem);
}

// The plan for U units per block; batch_tile == 0 when no tile fits in one block's shared memory.
inline PersistentPlan make_plan(const PathQuery& q, const DeviceLimits& lim, int64_t units,
                                const PathOverrides& o) {
  const int64_t R = kPersistentRowsPerThread;
  const int64_t H = q.hidden_size;
  const int64_t K = q.backward ? 4 * H : H;  // length of one dot product
  PersistentPlan p;
  p.units = static_cast<int32_t>(units);
  p.blocks = static_cast<int32_t>(ceil_div(H, units));
  p.threads = kPersistentThreads;
  p.w_rows = static_cast<int32_t>(q.backward ? round_up(units, kPersistentUnitsPerTeam)
                                              : 4 * units);
  // Teams per row group: one per unit forward (its 4 gates), one per 4 units backward.
  const int64_t teams_per_group = q.backward ? ceil_div(units, kPersistentUnitsPerTeam) : units;
  int64_t tile = round_up(std::min<int64_t>(q.batch, o.batch_tile > 0 ? o.batch_tile
                                                                       : kPersistentMaxTile), R);
  for (; tile >= R; tile -= R) {
    const int64_t items = (tile / R) * teams_per_group;  // dot-product teams wanted per tile
    int64_t k_split = o.k_split > 0
        ? o.k_split
        : std::min<int64_t>({32, std::max<int64_t>(1, pow2_floor(kPersistentThreads / items)),
                             pow2_ceil(K)});
    // Lanes of one team read consecutive k; a row stride of k_split (mod 32) words puts the
    // teams of a warp (consecutive units or rows) on distinct banks.
    const int64_t stride = round_up(K, 32) + (k_split % 32);
    const int64_t smem = (p.w_rows * stride + tile * stride) * q.elem_size;
    if (smem <= lim.smem_per_block_optin) {
      p.k_split = static_cast<int32_t>(k_split);
      p.batch_tile = static_cast<int32_t>(tile);
      p.w_stride = p.x_stride = static_cast<int32_t>(stride);
      p.smem_bytes = smem;
      return p;
    }
  }
  p.batch_tile = 0;
  return p;
}

// THE rule. Hard limits first (what the kernels cannot do), then the smallest U, i.e. the most
// blocks, whose grid fits on the device at once, but no more blocks than SMs (every block reads
// all of h_{t-1} each step: more blocks, more of that traffic, for no more arithmetic per SM) and
// no fewer units than keep a block busy (kPersistentMinFma); then, in auto mode, whether the
// cost model predicts a step faster than the step path's.
inline PathChoice decide_cuda_path(const PathQuery& q, const DeviceLimits& lim,
                                   const PathOverrides& o) {
  PathChoice c;
  const auto no = [&](PathReason r) {
    c.persistent = false;
    c.reason = r;
    return c;
  };
  if (o.mode == PathMode::kStep) return no(PathReason::kForcedStep);
  if (!lim.cooperative_launch) return no(PathReason::kNoCooperativeLaunch);
  if (q.batch <= 0 || q.seq_len <= 0 || q.hidden_size <= 0) return no(PathReason::kEmptyBatch);
  if (q.proj_size > 0) return no(PathReason::kProjection);
  if (q.num_runs > kPersistentMaxRuns) return no(PathReason::kTooManyRuns);
  const int64_t H = q.hidden_size, R = kPersistentRowsPerThread;
  const int64_t fma_per_unit = 4 * round_up(q.batch, R) * H;  // per block step, per unit
  const int64_t blocks_per_direction = std::max<int64_t>(1, lim.sm_count / q.num_directions);
  int64_t first = std::min(H, std::max(ceil_div(kPersistentMinFma, fma_per_unit),
                                       ceil_div(H, blocks_per_direction)));
  int64_t last = H;
  if (o.units > 0) first = last = std::min(o.units, H);
  bool found = false;
  for (int64_t u = first; u <= last; ++u) {
    const PersistentPlan p = make_plan(q, lim, u, o);
    if (p.batch_tile == 0) {
      // Not even the smallest tile fits; more units only need more shared memory.
      const int64_t K = q.backward ? 4 * H : H;
      if ((p.w_rows + R) * round_up(K, 32) * q.elem_size > lim.smem_per_block_optin) break;
      continue;
    }
    // The grid of u - 1 units did not fit: one with as many blocks and more units cannot.
    if (u > first && ceil_div(H, u) == ceil_div(H, u - 1)) continue;
    const int64_t coresident = modelled_coresident_blocks(lim, p.smem_bytes);
    c.plan = p;
    c.coresident_blocks = coresident;
    if (p.blocks * q.num_directions <= coresident) {
      found = true;
      break;
    }
  }
  if (!found) return no(PathReason::kDoesNotFit);
  c.fma_per_block_step = fma_per_unit * c.plan.units;
  // The cost model, in integers.
  const int64_t width = q.elem_size / 4;  // double: half the rate
  const int64_t grid_blocks = int64_t{c.plan.blocks} * q.num_directions;
  const int64_t staged_bytes = grid_blocks * q.batch * c.plan.x_stride * q.elem_size;
  const int64_t busiest_sm_fma = ceil_div(grid_blocks, lim.sm_count) * c.fma_per_block_step;
  c.persistent_ns = kGridSyncNs + staged_bytes / kStagedBytesPerNs +
                    busiest_sm_fma * width * 10 / kSmemFmaPer10Ns +
                    (q.backward ? kPhaseANs : 0);
  c.step_path_ns = q.num_directions *
                   (2 * kStepLaunchNs + 2 * q.batch * 4 * H * H * width / kGemmFlopsPerNs);
  if (o.mode == PathMode::kAuto && c.persistent_ns >= c.step_path_ns) {
    return no(PathReason::kStepPathFaster);
  }
  c.persistent = true;
  c.reason = o.mode == PathMode::kAuto ? PathReason::kAuto : PathReason::kForcedPersistent;
  return c;
}

// One line, "key=value" words; fused_lstm/explain.py parses it.
inline std::string describe(const PathChoice& c) {
  std::string s = c.persistent ? "path=persistent" : "path=step";
  s += std::string(" reason=") + reason_word(c.reason);
  const PersistentPlan& p = c.plan;
  if (p.units > 0 && p.batch_tile > 0) {
    s += " units=" + std::to_string(p.units) + " blocks=" + std::to_string(p.blocks) +
         " threads=" + std::to_string(p.threads) + " k_split=" + std::to_string(p.k_split) +
         " batch_tile=" + std::to_string(p.batch_tile) +
         " smem_bytes=" + std::to_string(p.smem_bytes) +
         " coresident_blocks=" + std::to_string(c.coresident_blocks) +
         " fma_per_block_step=" + std::to_string(c.fma_per_block_step) +
         " persistent_ns=" + std::to_string(c.persistent_ns) +
         " step_path_ns=" + std::to_string(c.step_path_ns);
  }
  return s;
}

}  // namespace gpu
}  // namespace fused_lstm
