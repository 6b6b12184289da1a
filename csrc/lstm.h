// Shared by every backend: the op's argument checks and the layout of the reserve buffer
// (what forward saves for backward). Kernels live in cpu/ and cuda/; gate math in lstm_cell.h.
#pragma once

#include "convert_16bit.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <utility>
#include <functional>
#include <vector>

namespace fused_lstm {


// Sizes of one call of the stacked-LSTM op, validated.
//
// Data layout is time-major and "packed": the rows of step t are the first batch_sizes[t] batch
// entries, stored at rows [step_offset[t], step_offset[t] + batch_sizes[t]). An unpacked
// [T, B, C] tensor is the special case batch_sizes = {B, ..., B}, so one code path serves both.
//
// Reserve (1-D, in the math dtype: float for float/bfloat16/half, double for double), per layer l:
//   layer_out  [rows, D * out_size]         h of every step, both directions (pre-dropout)
//   per direction d:
//     gates    [rows, 4 * hidden]           activated i, f, g, o; absent without `gates`
//     cells    [rows, hidden]               c_t
//     pre_proj [rows, hidden]               o * tanh(c_t), only when proj_size > 0
// Each [rows, n] block is row-major, step t's rows at [step_offset[t], + batch_sizes[t]); except
// on the CPU below 16 hidden units (the small-hidden variant, cpu/plan.h kRowWiseHidden, which
// the sizes alone choose, so its forward and backward always agree), where gates and cells
// hold each step's block transposed, [n][batch_sizes[t]] at the same place (element (row
// step_offset[t] + b, column k) at step_offset[t] * n + k * batch_sizes[t] + b), as its steps
// compute and read them (cpu/small_hidden.h); layer_out and pre_proj stay row-major there too.
// Without `gates` (gates_in_reserve below: packed bfloat16 calls on the CPU), the backward
// recomputes each step's gates from the layer input and h_{t-1}, as the forward computed them.
// The sizes come from reserve_direction_numel / reserve_layer_numel / reserve_numel_of below,
// the one formula: the kernels use it through LSTMShape (int64_t), the fake kernels
// (fused_lstm/ops.py) through the fused_lstm::reserve_numel op (c10::SymInt).
template <typename Int>
Int reserve_direction_numel(const Int& rows, const Int& hidden_size, int64_t proj_size,
                            bool gates = true) {
  return rows * (hidden_size * (gates ? 5 : 1) + (proj_size > 0 ? hidden_size : Int(0)));
}
template <typename Int>
Int reserve_layer_numel(const Int& rows, int64_t num_directions, const Int& hidden_size,
                        int64_t proj_size, bool gates = true) {
  const Int out_size = proj_size > 0 ? Int(proj_size) : hidden_size;
  return rows * num_directions * out_size +
      reserve_direction_numel(rows, hidden_size, proj_size, gates) * num_directions;
}
template <typename Int>
Int reserve_numel_of(const Int& rows, int64_t num_layers, int64_t num_directions,
                     const Int& hidden_size, int64_t proj_size, bool gates = true) {
  return reserve_layer_numel(rows, num_directions, hidden_size, proj_size, gates) * num_layers;
}

// Weights per layer and direction in nn.LSTM's _flat_weights order: W_ih, W_hh, then b_ih and
// b_hh where has_biases, then W_hr where proj_size > 0.
inline int64_t weights_per_direction(bool has_biases, int64_t proj_size) {
  return 2 + (has_biases ? 2 : 0) + (proj_size > 0 ? 1 : 0);
}

struct LSTMShape {
  int64_t num_layers = 0;
  int64_t num_directions = 0;
  int64_t input_size = 0;
  int64_t hidden_size = 0;
  int64_t proj_size = 0;
  int64_t out_size = 0;  // proj_size if > 0, else hidden_size
  int64_t seq_len = 0;
  int64_t batch = 0;  // batch_sizes[0]
  int64_t rows = 0;   // sum of batch_sizes
  bool has_biases = false;
  bool packed = false;
  bool gates_in_reserve = true;  // the reserve's layout (gates_in_reserve above)
  std::vector<int64_t> batch_sizes;  // [seq_len]
  std::vector<int64_t> step_offset;  // [seq_len], first row of each step

  int64_t weights_per_direction() const {
    return fused_lstm::weights_per_direction(has_biases, proj_size);
  }
  // Whether weight i (nn.LSTM's _flat_weights order) is a W_ih or a W_hh.
  bool is_w_ih_or_w_hh(int64_t i) const { return i % weights_per_direction() < 2; }
  int64_t weight_index(int64_t layer, int64_t direction) const {
    return (layer * num_directions + direction) * weights_per_direction();
  }
  int64_t layer_input_size(int64_t layer) const {
    return layer == 0 ? input_size : num_directions * out_size;
  }
  int64_t widest_layer_input() const {
    return std::max(input_size, num_layers > 1 ? num_directions * out_size : int64_t{0});
  }
  int64_t direction_numel() const {
    return reserve_direction_numel(rows, hidden_size, proj_size, gates_in_reserve);
  }
  int64_t layer_numel() const {
    return reserve_layer_numel(rows, num_directions, hidden_size, proj_size, gates_in_reserve);
  }
  int64_t reserve_numel() const {
    return reserve_numel_of(rows, num_layers, num_directions, hidden_size, proj_size,
                            gates_in_reserve);
  }
  int64_t layer_out_offset(int64_t layer) const { return layer * layer_numel(); }
  // Where gates_in_reserve (else there are none: the offset is the cells').
  int64_t gates_offset(int64_t layer, int64_t direction) const {
    return layer * layer_numel() + rows * num_directions * out_size +
        direction * direction_numel();
  }
  int64_t cells_offset(int64_t layer, int64_t direction) const {
    return gates_offset(layer, direction) + (gates_in_reserve ? rows * 4 * hidden_size : 0);
  }
  int64_t pre_proj_offset(int64_t layer, int64_t direction) const {
    return cells_offset(layer, direction) + rows * hidden_size;
  }
};

// Whether a call's reserve keeps the activated gates. Not on the CPU for packed (batch_sizes
// given) bfloat16 calls, nor for float16 calls of more than 8 rows whose gates outweigh what
// recomputing them holds (kDropGatesMinRows: below it the thin kernel writes the gates in its
// forward; cpu/plan.h kThinMaxBatch):
// - a hidden size of at least 16 (kDropGatesMinHidden, cpu/plan.h kRowWiseHidden) and gates of
//   at least twice as many rows (rows x layers x directions) as the widest layer input plus
//   out: the recompute's packed and widened weights are [4H, input + out] and [4H, input], one
//   layer and direction's at a time, against the gates' [rows, 4H] of each;
// - below 16 hidden units (the small-hidden variant, which recomputes a step's gates at a time
//   in its own step buffers: cpu/small_hidden_backward.h tiny_backward_steps), layer inputs of at most
//   kDropGatesMaxSmallInput (which the forward, too, projects with the small-hidden product,
//   so the recomputed gates are the forward's bit for bit; a wider input's projection is a
//   GEMM over every row there), and gates of every layer and direction (4H x rows each) at
//   least the widest layer input plus out plus 3H for each row of a step (the batch; every
//   row where the batch is packed, as the fake kernels know no batch there).
// Their backward recomputes the gates (csrc/cpu/backward.h, backward_products.h). The gates are
// two thirds of the reserve, and without them packed bf16 and float16 training hold less than
// nn.LSTM's bf16 and float16 (benchmarks/notes/memory.md, "bf16 training at the small sizes",
// "float16 training: no gates kept"). From the call's dtype, device, packing and sizes only,
// which the fake kernels know too (fused_lstm/ops.py). Applied by prepare_forward /
// prepare_backward where the backend says it recomputes them (`may_drop_gates`: the CPU
// backend); check_lstm_args leaves gates_in_reserve true.
constexpr int64_t kDropGatesMinRows = 9;
constexpr int64_t kDropGatesMinHidden = 16;
constexpr int64_t kDropGatesMaxSmallInput = 32;
inline bool gates_in_reserve(const LSTMShape& s, at::ScalarType dtype, bool cpu) {
  if (!cpu) return true;
  if (s.packed && dtype == at::kBFloat16) return false;
  const int64_t widest_input = s.widest_layer_input();
  if (dtype != at::kHalf || s.rows < kDropGatesMinRows) return true;
  const int64_t H = s.hidden_size, LD = s.num_layers * s.num_directions;
  if (H < kDropGatesMinHidden)
    return widest_input > kDropGatesMaxSmallInput ||
           4 * H * s.rows * LD < (widest_input + s.out_size + 3 * H) * (s.packed ? s.rows : s.batch);
  return s.rows * LD < 2 * (widest_input + s.out_size);
}

// The C++ signature of lstm_forward / lstm_inference / lstm (their schema is in ops.cpp), for
// typed dispatcher handles.
template <typename Result>
using LSTMOpSignature = Result(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, at::TensorList, const std::optional<at::Tensor>&, int64_t,
    bool, bool, int64_t);
using ForwardSig = LSTMOpSignature<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>>;
using InferenceSig = LSTMOpSignature<std::tuple<at::Tensor, at::Tensor, at::Tensor>>;

// Whether a gradient can flow from a call: grad mode on and an argument requiring grad. The one
// place this rule is written: fused_lstm::lstm (below) applies it, and FusedLSTM's C++ entry
// (python_entry.cpp) calls that same function.
bool needs_grad(const at::Tensor& input, const std::optional<at::Tensor>& hx,
                const std::optional<at::Tensor>& cx, at::TensorList weights);

// The kernel of fused_lstm::lstm (CompositeImplicitAutograd, schema in ops.cpp): lstm_forward,
// its reserve dropped, when needs_grad(), else lstm_inference, each through the dispatcher.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size);

// Validates every argument of the forward op (shapes, dtypes, devices, batch_sizes) and returns
// the sizes. Raises c10 errors (RuntimeError / ValueError in Python), never crashes.
LSTMShape check_lstm_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx,
    const std::optional<at::Tensor>& cx,
    at::TensorList weights,
    const std::optional<at::Tensor>& dropout_mask,
    int64_t num_layers,
    bool bidirectional,
    bool has_biases,
    int64_t proj_size);

// ---- The op boundary every backend shares ----
// The kernels compute in the math dtype: float for float/bfloat16/half, double for double.
// prepare_* checks the arguments, converts every tensor to the math dtype (contiguous) and
// allocates the results; the kernels fill them; finish_* converts them back to the caller's
// dtypes. Absent optional tensors stay undefined. On the CPU, the bfloat16 and float16 tensors
// of a call are widened by one loop into one scratch buffer (widen_to_float), which the
// converted tensors view, and results are rounded back by round_to (in_dtype): no ATen
// conversion per tensor. Except where `keep(shape, dtype)` holds: a bfloat16 call keeps the input,
// every W_ih and every W_hh, and the backward's grad_output, as given (a backend whose products
// read bf16 operands as they are; made contiguous; an input or grad_output that is not
// contiguous is widened with the rest instead); a float16 call keeps W_ih and W_hh only (a
// kernel that widens them as it reads them): no float copy of them is made; the biases, W_hr
// and everything else are converted. prepare_backward's `keep_weights(shape, dtype)` keeps only W_ih
// and W_hh so, in either dtype (a backend that widens them to float a layer at a time), and
// then gives each weight gradient its own buffer, so finish_backward can release each as it is
// rounded.
using Keep16 = std::function<bool(const LSTMShape&, at::ScalarType)>;

// Held by ForwardArgs / BackwardArgs (their first member, so destroyed last): where the op
// made float views of a scratch buffer (lstm.cpp ToMath), the pool that keeps their
// TensorImpls lets go of the buffer when the args are gone, i.e. at the end of the op call.
class ViewLease {
 public:
  ViewLease() = default;
  ViewLease(ViewLease&& other) noexcept : active_(std::exchange(other.active_, false)) {}
  ViewLease(const ViewLease&) = delete;
  ViewLease& operator=(ViewLease&&) = delete;
  ViewLease& operator=(const ViewLease&) = delete;
  ~ViewLease();
  void hold() { active_ = true; }

 private:
  bool active_ = false;
};

struct ForwardArgs {
  ViewLease lease;  // first: destroyed after the views below
  LSTMShape shape;
  at::ScalarType dtype;  // the caller's
  at::ScalarType math;
  at::Tensor input, hx, cx, dropout_mask;  // as given, in the math dtype (or kept 16-bit)
  std::vector<at::Tensor> weights;         // in the math dtype (W_ih and W_hh maybe kept 16-bit)
  at::Tensor hy, cy, reserve;  // results: [L*D, B, out], [L*D, B, H], [reserve_numel()]
                               // (reserve undefined when prepared without one)
  // Prepared without a reserve (inference), where 16-bit tensors were widened on the CPU:
  // the output [*input.shape[:-1], D*out] in the math dtype, in the same scratch buffer as
  // them (and hy, cy); else undefined (the backend allocates it, also where the backend
  // writes it in the call's 16-bit dtype: prepare_forward's output_in_dtype).
  at::Tensor output;
};

struct BackwardArgs {
  ViewLease lease;  // first: destroyed after the views below
  LSTMShape shape;
  at::ScalarType dtype;
  at::ScalarType math;
  // In the math dtype, as ForwardArgs' (input, W_ih, W_hh and grad_output maybe kept 16-bit).
  at::Tensor input, hx, cx, dropout_mask, reserve, grad_output, grad_hy, grad_cy;
  std::vector<at::Tensor> weights;
  // results, in the math dtype: shaped like input, [L*D, B, out], [L*D, B, H], like weights
  at::Tensor grad_input, grad_hx, grad_cx;
  std::vector<at::Tensor> grad_weights;
  // W_ih's and W_hh's entries of grad_weights hold their factors instead (prepare_backward's
  // weight_grads_apart): returned as they are.
  bool weight_grads_apart = false;
};

// A 1-D CPU tensor of `numel` elements whose memory is recycled within the process: large
// buffers (the reserve, backward scratch) would otherwise be fresh mmap'd pages on every call,
// each page faulted in and zeroed again (csrc/cpu/buffer_cache.cpp; benchmarks/notes/memory.md,
// "Recycling the large CPU buffers").
at::Tensor cpu_cached_empty(int64_t numel, at::ScalarType dtype);
// Frees the blocks the cache holds (a test hook: tests that count allocations start from an
// empty cache, whatever the tests before them left there).
void empty_buffer_cache();

ForwardArgs prepare_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size, bool with_reserve = true,
    Keep16 keep = nullptr, bool may_drop_gates = false, Keep16 output_in_dtype = nullptr,
    Keep16 keep_half_input = nullptr);

// t in `dtype`: t itself when it already is (no dispatcher call, ~0.2 us), else a converted
// copy: a contiguous float32 CPU tensor to bfloat16 or float16 by round_to into a fresh tensor
// (the same values as t.to(dtype)), anything else by t.to(dtype).
inline at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  if (is_16bit(dtype) && t.scalar_type() == at::kFloat && t.is_cpu() && t.is_contiguous()) {
    at::Tensor out = at::empty(t.sizes(), t.options().dtype(dtype));
    round_to(t.const_data_ptr<float>(), t.numel(), dtype, out.mutable_data_ptr());
    return out;
  }
  return t.to(dtype);
}

// (output, hy, cy, reserve); output is the last layer's rows of the reserve, copied out.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_forward(const ForwardArgs& a);

BackwardArgs prepare_backward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& reserve, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
    int64_t num_layers, bool bidirectional, bool has_biases, int64_t proj_size,
    Keep16 keep = nullptr, Keep16 keep_weights = nullptr,
    bool may_drop_gates = false, Keep16 grads_16bit = nullptr, Keep16 keep_half_input = nullptr,
    bool input_grad = true, Keep16 weight_grads_apart = nullptr);

// (grad_input, grad_hx, grad_cx, grad_weights), each in its argument's dtype. Releases what `a`
// holds as it goes (the math-dtype gradients once converted).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> finish_backward(
    BackwardArgs& a, at::TensorList weights);

// ---- W_ih's and W_hh's gradients apart (csrc/autograd.cpp) ----
// A training call of a few rows (one streaming step) spends little memory besides its weight
// gradients, which one backward returns all at once. Where the CPU backend says it can
// (cpu_weight_grads_apart), the autograd kernel gives W_ih and W_hh each an autograd node of its
// own: the op's backward leaves their gradients as factors, dL/dgates beside the rows they
// multiply (the layer input for W_ih, h_{t-1} for W_hh), and each weight's node makes its
// gradient from them (weight_grad_from_factors), which autograd adds into .grad and frees before
// the next is made. A layer and direction's factors are one float32 tensor that its W_ih and
// W_hh entries share (apart_factors_numel): dL/dgates [rows, 4H], then the layer input's rows
// [rows, in], then h_{t-1}'s [rows, out]. Up to 8 rows the gradients are the same bit for bit
// as the op's; from 9 rows (a float16 model, where the factors are smaller than the float32
// gradients: csrc/cpu/plan.h) each node's product sums the same rows in float32 and rounds once,
// as the op does, but in its own order.
// Measured: benchmarks/notes/memory.md, "Few-row training: the weight gradients one at a time"
// and "float16 training from 9 rows up to ~1,000".

// The number of float32 factors of layer `layer`'s each direction (above).
inline int64_t apart_factors_numel(const LSTMShape& s, int64_t layer) {
  return s.rows * (4 * s.hidden_size + s.layer_input_size(layer) + s.out_size);
}

// Whether a training call of these arguments takes its W_ih and W_hh gradients apart: a CPU call
// whose plan says so (csrc/cpu/plan.h weight_grads_apart) with the setting on
// (cpu.allow_weight_grads_apart).
bool cpu_weight_grads_apart(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size);

// The CPU backward: fused_lstm::lstm_backward's arguments and results (its CPU kernel), except
// that with weight_grads_apart W_ih's and W_hh's entries of the weight gradients are their
// factors, where this call's plan takes them apart (as planned now, by prepare_backward's
// question: a setting may have changed since the forward; else their gradients, as the op
// returns them). Without state_grad (h0 needs no gradient) grad_hx is not computed: its values
// are undefined (the first step's dL/dh_{t-1} product, which only it reads, is skipped).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> cpu_backward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& reserve, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
    int64_t num_layers, bool bidirectional, bool has_biases, int64_t proj_size,
    bool input_grad, bool weight_grads_apart, bool state_grad = true);

// W_ih's (`w_ih`) or W_hh's gradient [4H, in] or [4H, out] in `dtype` from its layer and
// direction's factors (above): the sum over the rows of dL/dgates^T times the row, in float32,
// rounded once to `dtype`.
at::Tensor weight_grad_from_factors(const at::Tensor& factors, int64_t G, int64_t in,
                                    int64_t out, bool w_ih, at::ScalarType dtype);

// Additional checks of the backward op: reserve size and gradient shapes.
void check_lstm_backward_args(
    const LSTMShape& shape,
    const at::Tensor& input,
    const at::Tensor& reserve,
    const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy);

}  // namespace fused_lstm
