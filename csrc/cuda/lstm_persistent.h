// The persistent CUDA path: ONE cooperative launch runs every time step of one layer, both
// directions at once (blockIdx.y = direction), with each block's rows of W_hh held in shared
// memory for the whole sequence (Diamos et al. 2016, "Persistent RNNs"; FlashRNN).
//
// This header holds what host code needs, with no CUDA syntax, so that lstm_cuda.cu's host code
// and the CPU emulation in tests/test_cuda_compile.py compile it with a plain C++ compiler:
//   * the kernels' argument structs (PersistentForward, PersistentBackward) and the per-step
//     row schedule (StepSchedule), passed by value as kernel arguments;
//   * the path decision for a call on a device: THE rule (lstm_path_rule.h: persistent or step,
//     the plan, a pure function of sizes and device limits, also compiled into the CPU build for
//     fused_lstm/explain.py) with the settings' overrides (fused_lstm.backends.cuda), the
//     device's limits and the occupancy API's word (choose_cuda_path);
//   * the host glue around a launch (persistent_forward_layer / persistent_backward_layer): the
//     input-projection GEMM before it, the weight-gradient GEMMs after it, both through ATen
//     exactly as the step path in lstm_cuda.cu does them, into the same reserve layout (lstm.h).
// The per-block bodies of the kernels are lstm_persistent.cuh's; the kernels, launchers and the
// device queries are lstm_persistent.cu's.
//
// Work split. Block (x, d) owns hidden units [x*U, min((x+1)*U, H)) of direction d, for every
// batch row; per step it computes those units' gates for all rows of the step:
//   forward:  gates[:, g*H + j] += h_{t-1} . W_hh[g*H + j, :]  (W_hh rows of its units, 4U x H),
//             then lstm_step.cuh's forward_step_element (lstm_cell.h's cell_forward);
//             one grid barrier per step (h_t of every block must be written before step t+1).
//   backward: phase A, its units' dgates (lstm_step.cuh's backward_step_element, cell_backward);
//             grid barrier; phase B, dh_{t-1}[:, its units] = dgates_t . W_hh[:, its units]
//             (the W_hh column slice, 4H x U, held transposed; a team sums 4 units x 4 rows).
//             Phase B's outputs are read only by the same block's next phase A: one grid
//             barrier per step.
// Limits (the step path runs everything else): no projection (proj_size == 0); at most
// kPersistentMaxRuns distinct batch sizes in a packed sequence; the W_hh slices of a grid that
// fits on the device at once (cooperative launch) must fit in shared memory.
#pragma once

#include "../lstm.h"
#include "../settings.h"
#include "lstm_kernels.h"
#include "lstm_path_rule.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace fused_lstm {
namespace gpu {

// ---- Per-step rows -----------------------------------------------------------------------------
// A packed batch_sizes is non-increasing: it is a few runs of equal sizes. Steps
// [first_step, next run's first_step) have `batch` rows each, the first at row first_row.
struct StepRun {
  int64_t first_row;
  int32_t first_step;
  int32_t batch;
};

struct StepSchedule {
  int32_t seq_len;
  int32_t num_runs;
  StepRun runs[kPersistentMaxRuns];
};

struct StepRows {
  int64_t offset;  // first row
  int64_t count;   // rows
};

// Rows of step t.
C10_HOST_DEVICE inline StepRows step_rows(const StepSchedule& s, int64_t t) {
  int r = 0;
  while (r + 1 < s.num_runs && s.runs[r + 1].first_step <= t) ++r;
  const StepRun& run = s.runs[r];
  return {run.first_row + (t - run.first_step) * run.batch, run.batch};
}

// The rows of step t that continue from the step processed just before t in direction d
// (forward: t-1; reverse: t+1, of which only the first batch_sizes[t+1] rows exist): rows
// [0, count) of step t, found at rows [offset, offset + count). The others start from h0/c0.
// lstm_cuda.cu's prev_rows.
C10_HOST_DEVICE inline StepRows prev_step_rows(const StepSchedule& s, int d, int64_t t) {
  if (d == 0) {
    if (t > 0) return {step_rows(s, t - 1).offset, step_rows(s, t).count};
  } else if (t + 1 < s.seq_len) {
    return step_rows(s, t + 1);
  }
  return {0, 0};
}

inline int64_t count_runs(const std::vector<int64_t>& batch_sizes) {
  int64_t runs = 0;
  for (size_t t = 0; t < batch_sizes.size(); ++t)
    if (t == 0 || batch_sizes[t] != batch_sizes[t - 1]) ++runs;
  return runs;
}

inline StepSchedule step_schedule(const LSTMShape& s) {
  StepSchedule sc;
  std::memset(&sc, 0, sizeof(sc));
  sc.seq_len = static_cast<int32_t>(s.seq_len);
  int64_t row = 0;
  for (int64_t t = 0; t < s.seq_len; ++t) {
    const int64_t bs = s.batch_sizes[t];
    if (t == 0 || bs != s.batch_sizes[t - 1]) {
      TORCH_CHECK(sc.num_runs < kPersistentMaxRuns, "fused_lstm: too many batch-size runs");
      sc.runs[sc.num_runs++] = {row, static_cast<int32_t>(t), static_cast<int32_t>(bs)};
    }
    row += bs;
  }
  return sc;
}

// ---- Kernel arguments (by value: no host-to-device copy, so capturable in a CUDA graph) --------
// Per-direction pointers are indexed by d in [0, num_directions). Shapes: rows = sum of batch
// sizes, G = 4H; every pointer is device memory in the math dtype T, row-major.
template <typename T>
struct PersistentForward {
  int64_t hidden = 0;          // H (no projection: out_size == H)
  int64_t batch = 0;           // B
  int64_t num_directions = 0;  // D
  int64_t out_stride = 0;      // D*H: row stride of layer_out
  PersistentPlan plan;
  StepSchedule steps;
  const T* w_hh[2] = {};       // [4H, H]
  const T* h0[2] = {};         // [B, H] initial h, read-only; null means zeros
  T* gates[2] = {};            // [rows, G]  in: x W_ih^T + b_ih + b_hh; out: activated i, f, g, o
  T* cells[2] = {};            // [rows, H]  out: c_t
  T* h_state[2] = {};          // [B, H]     out: h_n (each row's last h)
  T* c_state[2] = {};          // [B, H]     in: c0 (or zeros); out: c_n
  T* layer_out = nullptr;      // [rows, D*H] out: h_t of direction d in columns [d*H, (d+1)*H)
};

template <typename T>
struct PersistentBackward {
  int64_t hidden = 0;
  int64_t batch = 0;
  int64_t num_directions = 0;
  int64_t out_stride = 0;      // D*H
  PersistentPlan plan;
  StepSchedule steps;
  const T* w_hh[2] = {};       // [4H, H]
  const T* gates[2] = {};      // [rows, G]  activated gates of the forward
  const T* cells[2] = {};      // [rows, H]  c_t of the forward
  const T* c0[2] = {};         // [B, H] or null (zeros)
  const T* h0[2] = {};         // [B, H] or null (zeros)
  const T* layer_out = nullptr;  // [rows, D*H] h_t of the forward
  const T* dy = nullptr;       // [rows, D*H] dL/d(layer output)
  T* dh_state[2] = {};         // [B, H] in: dL/dh_n; carried; out: dL/dh0
  T* dc_state[2] = {};         // [B, H] in: dL/dc_n; carried; out: dL/dc0
  T* dgates[2] = {};           // [rows, G]  out: dL/d(gate pre-activations)
  T* h_prev[2] = {};           // [rows, H]  out: h_{t-1} of every row, for dW_hh
};

// Kernel arguments live in the 4 KB parameter space of every CUDA version.
static_assert(sizeof(PersistentForward<double>) <= 4000, "kernel arguments too large");
static_assert(sizeof(PersistentBackward<double>) <= 4000, "kernel arguments too large");

// The settings' overrides (fused_lstm.backends.cuda, csrc/settings.h), read once per call.
inline PathOverrides path_overrides() {
  const CudaSettings c = cuda_settings();
  PathOverrides o;
  o.mode = c.path == 1 ? PathMode::kPersistent : c.path == 2 ? PathMode::kStep : PathMode::kAuto;
  o.units = c.persistent_units;
  o.batch_tile = std::min<int64_t>(c.persistent_tile, kPersistentMaxTile);
  o.k_split = c.persistent_k_split;
  TORCH_CHECK(o.k_split == 0 || pow2_floor(o.k_split) == o.k_split,
              "fused_lstm: cuda.persistent_k_split must be a power of two");
  return o;
}

inline PathQuery path_query(const LSTMShape& s, bool is_double, bool backward) {
  PathQuery q;
  q.hidden_size = s.hidden_size;
  q.proj_size = s.proj_size;
  q.batch = s.batch;
  q.seq_len = s.seq_len;
  q.num_directions = s.num_directions;
  q.num_runs = count_runs(s.batch_sizes);
  q.elem_size = is_double ? 8 : 4;
  q.backward = backward;
  return q;
}

// ---- Device side (lstm_persistent.cu; the CPU emulation defines its own) ------------------------
// The limits of the current device for one kernel (forward or backward, float or double); cached
// per device. Sets the kernel's shared-memory attributes on first use.
DeviceLimits persistent_device_limits(int device, bool backward, bool is_double);
// Co-resident blocks on the whole device by the CUDA occupancy API, for exactly `smem_bytes` of
// dynamic shared memory; cached.
int64_t persistent_coresident_blocks(int device, bool backward, bool is_double,
                                     int64_t smem_bytes);
// One cooperative launch: grid (plan.blocks, num_directions), plan.threads threads,
// plan.smem_bytes of dynamic shared memory, on `stream`; checked, never synchronising.
template <typename T>
void persistent_forward(const PersistentForward<T>& p, cudaStream_t stream);
template <typename T>
void persistent_backward(const PersistentBackward<T>& p, cudaStream_t stream);

// The decision for one call on `device`: the rule, then the occupancy API's word on its plan.
inline PathChoice choose_cuda_path(const PathQuery& q, int device) {
  const PathOverrides o = path_overrides();
  if (o.mode == PathMode::kStep) return decide_cuda_path(q, DeviceLimits{}, o);
  const bool is_double = q.elem_size == 8;
  PathChoice c = decide_cuda_path(q, persistent_device_limits(device, q.backward, is_double), o);
  if (c.persistent) {
    const int64_t exact =
        persistent_coresident_blocks(device, q.backward, is_double, c.plan.smem_bytes);
    if (exact < int64_t{c.plan.blocks} * q.num_directions) {
      c.persistent = false;
      c.reason = PathReason::kOccupancyRefused;
      c.coresident_blocks = exact;
    }
  }
  return c;
}

// What lstm_forward and lstm_backward choose for these sizes on `device` (the current device):
// "forward: <describe>\nbackward: <describe>". The op fused_lstm::cuda_path_choice.
//   input: [T, B, I], or packed [rows, I] with batch_sizes ([T], CPU int64)
inline std::string cuda_path_choice_text(const at::Tensor& input,
                                         const std::optional<at::Tensor>& batch_sizes,
                                         int64_t hidden_size, bool bidirectional,
                                         int64_t proj_size, int device) {
  PathQuery q;
  q.hidden_size = hidden_size;
  q.proj_size = proj_size;
  q.num_directions = bidirectional ? 2 : 1;
  q.elem_size = input.scalar_type() == at::kDouble ? 8 : 4;
  if (batch_sizes.has_value()) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "fused_lstm: batch_sizes must be a 1-D int64 CPU tensor");
    const at::Tensor c = bs.contiguous();
    const int64_t* v = c.const_data_ptr<int64_t>();
    const std::vector<int64_t> sizes(v, v + c.numel());
    q.seq_len = c.numel();
    q.batch = sizes.empty() ? 0 : sizes[0];
    q.num_runs = count_runs(sizes);
  } else {
    TORCH_CHECK(input.dim() == 3, "fused_lstm: cuda_path_choice expects [T, B, I] input");
    q.seq_len = input.size(0);
    q.batch = input.size(1);
  }
  q.backward = false;
  std::string text = "forward: " + describe(choose_cuda_path(q, device));
  q.backward = true;
  text += "\nbackward: " + describe(choose_cuda_path(q, device));
  return text;
}

// ---- Host glue around one launch (one layer, both directions) ----------------------------------

// x: [rows, I_l] this layer's input; hx, cx: [L*D, B, H] or undefined; weights: nn.LSTM's flat
// order, contiguous, math dtype; hy, cy: [L*D, B, H] outputs; reserve: [reserve_numel].
// The fields the forward and backward launch arguments share.
template <typename Params>
void fill_launch_fields(Params& p, const LSTMShape& s, const PersistentPlan& plan) {
  p.hidden = s.hidden_size;
  p.batch = s.batch;
  p.num_directions = s.num_directions;
  p.out_stride = s.num_directions * s.hidden_size;
  p.plan = plan;
  p.steps = step_schedule(s);
}

template <typename T>
void persistent_forward_layer(const LSTMShape& s, int64_t layer, const at::Tensor& x,
                              const at::Tensor& hx, const at::Tensor& cx,
                              const std::vector<at::Tensor>& weights, const at::Tensor& hy,
                              const at::Tensor& cy, const at::Tensor& reserve,
                              const PersistentPlan& plan, cudaStream_t stream) {
  const int64_t H = s.hidden_size, G = 4 * H, D = s.num_directions;
  PersistentForward<T> p;
  fill_launch_fields(p, s, plan);
  for (int64_t d = 0; d < D; ++d) {
    const int64_t k = s.weight_index(layer, d);
    const at::Tensor& w_ih = weights[k];
    at::Tensor gates =
        reserve.narrow(0, s.gates_offset(layer, d), s.rows * G).view({s.rows, G});
    // Input projection of every step at once: gates = x W_ih^T + (b_ih + b_hh).
    if (s.has_biases) {
      at::addmm_out(gates, at::add(weights[k + 2], weights[k + 3]), x, w_ih.t());
    } else {
      at::mm_out(gates, x, w_ih.t());
    }
    const int64_t ld = layer * D + d;
    at::Tensor h_state = hy.select(0, ld);
    at::Tensor c_state = cy.select(0, ld);
    if (hx.defined()) h_state.copy_(hx.select(0, ld));
    else h_state.zero_();
    if (cx.defined()) c_state.copy_(cx.select(0, ld));
    else c_state.zero_();
    p.w_hh[d] = weights[k + 1].const_data_ptr<T>();
    // h0 from hx itself, not from h_n: h_n is written while other blocks still read h0.
    p.h0[d] = hx.defined() ? hx.select(0, ld).const_data_ptr<T>() : nullptr;
    p.gates[d] = gates.mutable_data_ptr<T>();
    p.cells[d] = reserve.mutable_data_ptr<T>() + s.cells_offset(layer, d);
    p.h_state[d] = h_state.mutable_data_ptr<T>();
    p.c_state[d] = c_state.mutable_data_ptr<T>();
  }
  p.layer_out = reserve.mutable_data_ptr<T>() + s.layer_out_offset(layer);
  persistent_forward<T>(p, stream);
}

// As persistent_forward_layer, plus: dy [rows, D*H] the gradient of this layer's output;
// grad_hy, grad_cy or undefined (zeros); out: dx_l [rows, I_l] (this layer's input gradient),
// grad_hx, grad_cx (this layer's slices), grad_weights (this layer's). dgates / h_prev: scratch
// [rows, 4H] / [rows, H] per direction; [0] is the step path's, [1] is allocated on first use.
template <typename T>
void persistent_backward_layer(const LSTMShape& s, int64_t layer, const at::Tensor& x,
                               const at::Tensor& hx, const at::Tensor& cx,
                               const std::vector<at::Tensor>& weights, const at::Tensor& reserve,
                               const at::Tensor& dy, const at::Tensor& grad_hy,
                               const at::Tensor& grad_cy, at::Tensor dx_l,
                               const at::Tensor& grad_hx, const at::Tensor& grad_cx,
                               std::vector<at::Tensor>& grad_weights,
                               std::array<at::Tensor, 2>& dgates,
                               std::array<at::Tensor, 2>& h_prev, const PersistentPlan& plan,
                               cudaStream_t stream) {
  const int64_t H = s.hidden_size, G = 4 * H, D = s.num_directions;
  PersistentBackward<T> p;
  fill_launch_fields(p, s, plan);
  p.layer_out = reserve.const_data_ptr<T>() + s.layer_out_offset(layer);
  p.dy = dy.const_data_ptr<T>();
  for (int64_t d = 0; d < D; ++d) {
    if (!dgates[d].defined()) dgates[d] = at::empty({s.rows, G}, x.options());
    if (!h_prev[d].defined()) h_prev[d] = at::empty({s.rows, H}, x.options());
    const int64_t ld = layer * D + d;
    at::Tensor dh_state = grad_hx.select(0, ld);
    at::Tensor dc_state = grad_cx.select(0, ld);
    if (grad_hy.defined()) dh_state.copy_(grad_hy.select(0, ld));
    else dh_state.zero_();
    if (grad_cy.defined()) dc_state.copy_(grad_cy.select(0, ld));
    else dc_state.zero_();
    p.w_hh[d] = weights[s.weight_index(layer, d) + 1].const_data_ptr<T>();
    p.gates[d] = reserve.const_data_ptr<T>() + s.gates_offset(layer, d);
    p.cells[d] = reserve.const_data_ptr<T>() + s.cells_offset(layer, d);
    p.c0[d] = cx.defined() ? cx.select(0, ld).const_data_ptr<T>() : nullptr;
    p.h0[d] = hx.defined() ? hx.select(0, ld).const_data_ptr<T>() : nullptr;
    p.dh_state[d] = dh_state.mutable_data_ptr<T>();
    p.dc_state[d] = dc_state.mutable_data_ptr<T>();
    p.dgates[d] = dgates[d].mutable_data_ptr<T>();
    p.h_prev[d] = h_prev[d].mutable_data_ptr<T>();
  }
  persistent_backward<T>(p, stream);
  // The weight gradients and dx as large GEMMs over every step: lstm_cuda.cu's, per direction.
  for (int64_t d = 0; d < D; ++d) {
    const int64_t k = s.weight_index(layer, d);
    const at::Tensor& dg = dgates[d];
    at::mm_out(grad_weights[k], dg.t(), x);             // dW_ih [4H, I_l]
    at::mm_out(grad_weights[k + 1], dg.t(), h_prev[d]);  // dW_hh [4H, H]
    if (s.has_biases) {
      const int64_t rows_dim[] = {0};
      at::sum_out(grad_weights[k + 2], dg, at::IntArrayRef(rows_dim));  // db_ih [4H]
      grad_weights[k + 3].copy_(grad_weights[k + 2]);                   // db_hh
    }
    if (d == 0) at::mm_out(dx_l, dg, weights[k]);
    else dx_l.addmm_(dg, weights[k]);
  }
}

}  // namespace gpu
}  // namespace fused_lstm
