// The op fused_lstm::cuda_path_predict: the CUDA path rule (cuda/lstm_path_rule.h) for given
// sizes, an assumed device's limits and the overrides, in every build (no GPU, no CUDA code:
// the rule is host arithmetic). fused_lstm/explain.py's predict_cuda_path and decide_cuda_path
// call it; on a GPU, explain() asks fused_lstm::cuda_path_choice, which decides with the same
// rule (plus the occupancy API's final word).
#include "cuda/lstm_path_rule.h"

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace fused_lstm {
namespace {

// device_limits: lstm_path_rule.h's DeviceLimits in field order (fused_lstm.explain's
// DeviceLimits.as_list()); mode: auto, persistent or step (fused_lstm.backends.cuda.path's
// words); units, batch_tile, k_split: 0 = the rule's choice, else what the settings
// cuda.persistent_* would fix, within the same bounds. Returns describe()'s line.
std::string cuda_path_predict(int64_t hidden_size, int64_t proj_size, int64_t batch,
                              int64_t seq_len, int64_t num_directions, int64_t num_runs,
                              int64_t elem_size, bool backward, c10::IntArrayRef device_limits,
                              c10::string_view mode, int64_t units, int64_t batch_tile,
                              int64_t k_split) {
  using namespace gpu;
  TORCH_CHECK(num_directions == 1 || num_directions == 2,
              "fused_lstm: cuda_path_predict: num_directions must be 1 or 2, got ",
              num_directions);
  TORCH_CHECK(elem_size == 4 || elem_size == 8,
              "fused_lstm: cuda_path_predict: elem_size must be 4 (float) or 8 (double), got ",
              elem_size);
  TORCH_CHECK(num_runs >= 0, "fused_lstm: cuda_path_predict: num_runs must be >= 0");
  TORCH_CHECK(device_limits.size() == 6,
              "fused_lstm: cuda_path_predict: device_limits must be [cooperative_launch, "
              "sm_count, smem_per_sm, smem_per_block_optin, reserved_smem_per_block, "
              "max_blocks_per_sm], got ", device_limits.size(), " values");
  for (const int64_t v : device_limits) {
    TORCH_CHECK(v >= 0, "fused_lstm: cuda_path_predict: device_limits must be >= 0, got ",
                device_limits);
  }
  PathOverrides o;
  const std::string_view m(mode.data(), mode.size());
  if (m == "auto") {
    o.mode = PathMode::kAuto;
  } else if (m == "persistent") {
    o.mode = PathMode::kPersistent;
  } else if (m == "step") {
    o.mode = PathMode::kStep;
  } else {
    TORCH_CHECK(false, "fused_lstm: cuda_path_predict: mode must be auto, persistent or step; "
                "got '", std::string(m), "'");
  }
  TORCH_CHECK(units >= 0, "fused_lstm: cuda_path_predict: units must be >= 0, got ", units);
  TORCH_CHECK(batch_tile >= 0 && batch_tile <= kPersistentMaxTile,
              "fused_lstm: cuda_path_predict: batch_tile must be in [0, ", kPersistentMaxTile,
              "], got ", batch_tile);
  TORCH_CHECK(k_split >= 0 && k_split <= 32 && (k_split == 0 || pow2_floor(k_split) == k_split),
              "fused_lstm: cuda_path_predict: k_split must be 0 or a power of two <= 32, got ",
              k_split);
  o.units = units;
  o.batch_tile = batch_tile;
  o.k_split = k_split;
  PathQuery q;
  q.hidden_size = hidden_size;
  q.proj_size = proj_size;
  q.batch = batch;
  q.seq_len = seq_len;
  q.num_directions = num_directions;
  q.num_runs = num_runs;
  q.elem_size = elem_size;
  q.backward = backward;
  const DeviceLimits lim{device_limits[0] != 0, device_limits[1], device_limits[2],
                         device_limits[3],      device_limits[4], device_limits[5]};
  return describe(decide_cuda_path(q, lim, o));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CompositeExplicitAutograd, m) {
  m.impl("cuda_path_predict", &cuda_path_predict);
}

}  // namespace fused_lstm
