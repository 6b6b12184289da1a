// The op schemas (declared once, implemented per backend in cpu/ and cuda/), and the kernels
// that need no backend: lstm (which chooses lstm_forward or lstm_inference), lstm_inference's
// default, and reserve_numel.
#include "lstm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace fused_lstm {

TORCH_LIBRARY(fused_lstm, m) {
  // The whole stack in one call: every layer, both directions, projection and inter-layer
  // dropout (applied as a given mask so the op stays deterministic).
  //   input:        [T, B, I] time-major, or packed [rows, I] when batch_sizes ([T], CPU int64)
  //   hx, cx:       [L*D, B, out_size], [L*D, B, hidden]; None means zeros
  //   weights:      nn.LSTM's _flat_weights order (w_ih, w_hh, [b_ih, b_hh], [w_hr]) per layer
  //                 and direction
  //   dropout_mask: [L-1, *input.shape[:-1], D*out_size], already scaled by 1/(1-p); or None
  // Returns output [*input.shape[:-1], D*out_size], hy, cy, and the reserve for backward.
  m.def(
      "lstm_forward(Tensor input, Tensor? batch_sizes, Tensor? hx, Tensor? cx, Tensor[] weights, "
      "Tensor? dropout_mask, int num_layers, bool bidirectional, bool has_biases, int proj_size) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // lstm_forward without the reserve, for calls that need no gradient (lstm chooses): a
  // backend may skip storing what backward needs. Default: lstm_forward, reserve dropped.
  m.def(
      "lstm_inference(Tensor input, Tensor? batch_sizes, Tensor? hx, Tensor? cx, Tensor[] weights, "
      "Tensor? dropout_mask, int num_layers, bool bidirectional, bool has_biases, int proj_size) "
      "-> (Tensor, Tensor, Tensor)");
  // The op FusedLSTM calls: decides between the two above (lstm() in this file, registered as
  // CompositeImplicitAutograd): lstm_forward, reserve dropped, when a gradient can flow (grad
  // mode on and an argument requiring grad), else lstm_inference. Recorded as itself by
  // torch.jit.trace and Dynamo, so a traced graph decides when it runs; autograd, AOTAutograd
  // and export see the op it chose.
  m.def(
      "lstm(Tensor input, Tensor? batch_sizes, Tensor? hx, Tensor? cx, Tensor[] weights, "
      "Tensor? dropout_mask, int num_layers, bool bidirectional, bool has_biases, int proj_size) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradients of lstm_forward for the whole stack in one call. Missing grads mean zeros.
  // Returns grad_input, grad_hx, grad_cx (zeros-shaped like hx/cx even when they were None)
  // and one gradient per weight. input_grad=False: the input's gradient is not computed (the
  // autograd kernel passes it where the input needs none: layer 0's dL/dx products skipped)
  // and grad_input is an empty tensor of shape [0].
  m.def(
      "lstm_backward(Tensor input, Tensor? batch_sizes, Tensor? hx, Tensor? cx, Tensor[] weights, "
      "Tensor? dropout_mask, Tensor reserve, Tensor? grad_output, Tensor? grad_hy, "
      "Tensor? grad_cy, int num_layers, bool bidirectional, bool has_biases, int proj_size, "
      "bool input_grad=True) -> (Tensor, Tensor, Tensor, Tensor[])");
  // The same gradients, computed so that they are differentiable again (double backward):
  // implemented in Python (fused_lstm/ops.py) by differentiating the reference implementation.
  // autograd.cpp calls it instead of lstm_backward when backward runs with create_graph=True.
  m.def(
      "lstm_backward_composite(Tensor input, Tensor? batch_sizes, Tensor? hx, Tensor? cx, "
      "Tensor[] weights, Tensor? dropout_mask, Tensor? grad_output, Tensor? grad_hy, "
      "Tensor? grad_cy, int num_layers, bool bidirectional, bool has_biases, int proj_size) "
      "-> (Tensor, Tensor, Tensor, Tensor[])");
  // The CUDA path rule (cuda/lstm_path_rule.h) for an assumed device, in every build: which
  // path, persistent or step, lstm_forward (backward=False) / lstm_backward take on CUDA for
  // these sizes, as one line "path=... reason=... [plan]" (fused_lstm/explain.py reads it).
  //   batch: rows of the first step; num_runs: distinct batch sizes (1 unless packed);
  //   elem_size: 4 or 8 (the math dtype); device_limits: [cooperative_launch, sm_count,
  //   smem_per_sm, smem_per_block_optin, reserved_smem_per_block, max_blocks_per_sm];
  //   mode: auto|persistent|step; units, batch_tile, k_split: 0 = the rule's choice.
  // Implemented in cuda_path_rule.cpp. Without the occupancy API's final word (on a GPU,
  // cuda_path_choice has it).
  m.def(
      "cuda_path_predict(int hidden_size, int proj_size, int batch, int seq_len, "
      "int num_directions, int num_runs, int elem_size, bool backward, int[] device_limits, "
      "str mode=\"auto\", int units=0, int batch_tile=0, int k_split=0) -> str");
  // Elements of lstm_forward's reserve (lstm.h): the fake kernels (fused_lstm/ops.py) ask for
  // the size here, so it has one formula; SymInt, as they ask it with symbolic sizes. gates:
  // whether it keeps the gates (lstm.h, gates_in_reserve).
  m.def(
      "reserve_numel(SymInt rows, int num_layers, int num_directions, SymInt hidden_size, "
      "int proj_size, bool gates=True) -> SymInt");
}

bool needs_grad(const at::Tensor& input, const std::optional<at::Tensor>& hx,
                const std::optional<at::Tensor>& cx, at::TensorList weights) {
  if (!c10::GradMode::is_enabled()) return false;
  if (input.requires_grad() || (hx && hx->requires_grad()) || (cx && cx->requires_grad()))
    return true;
  for (const auto& w : weights)
    if (w.requires_grad()) return true;
  return false;
}

namespace {

// lstm_forward with its reserve dropped: lstm_inference's default kernel (a backend without an
// inference kernel of its own), and lstm's choice when a gradient can flow.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_without_reserve(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size) {
  static const auto forward = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("fused_lstm::lstm_forward", "")
                                  .typed<ForwardSig>();
  auto [output, hy, cy, reserve] = forward.call(input, batch_sizes, hx, cx, weights, dropout_mask,
                                               num_layers, bidirectional, has_biases, proj_size);
  return {output, hy, cy};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size) {
  if (needs_grad(input, hx, cx, weights))
    return forward_without_reserve(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                                   bidirectional, has_biases, proj_size);
  static const auto inference = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("fused_lstm::lstm_inference", "")
                                    .typed<InferenceSig>();
  return inference.call(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                        bidirectional, has_biases, proj_size);
}

namespace {

c10::SymInt reserve_numel_op(c10::SymInt rows, int64_t num_layers, int64_t num_directions,
                             c10::SymInt hidden_size, int64_t proj_size, bool gates) {
  return reserve_numel_of(rows, num_layers, num_directions, hidden_size, proj_size, gates);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CompositeExplicitAutograd, m) {
  m.impl("lstm_inference", &forward_without_reserve);
}

// reserve_numel has no tensor arguments: the dispatcher runs its kernel for every call (fake
// mode included). lstm decomposes into the op it chooses.
TORCH_LIBRARY_IMPL(fused_lstm, CompositeImplicitAutograd, m) {
  m.impl("reserve_numel", &reserve_numel_op);
  m.impl("lstm", &lstm);
}

}  // namespace fused_lstm
