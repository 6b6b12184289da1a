// CPU kernels of fused_lstm::lstm_forward / lstm_inference / lstm_backward: the op entry points.
//
// One translation unit: this file includes the parts below, each one thing (csrc/cpu/):
//   common.h        scratch, row copies, transposes, Operand, GCC vectors
//   blas.h          library glue: BLAS, oneDNN matmul, oneDNN brgemm
//   plan.h          the kernel choice: which variant a call runs, and why
//   cell.h          the cell passes (lstm_cell.h's math over contiguous runs)
//   weights.h       weight preparation (pointers, bias, brgemm packing)
//   small_hidden.h  variant: small hidden sizes, batch-fastest layout
//   row_wise.h      variant: row-wise steps (brgemm / bf16_gemm / BLAS products)
//   thin.h          variant: thin-batch inference
//   bf16_products.h variant: bf16 products (weights packed for bf16_gemm, backward jobs)
//   forward.h       forward and inference drivers
//   backward.h      backward driver
// One unit rather than one per part: the parts share always-inline templates and
// target_clones functions (cell passes, small-hidden products) that the compiler inlines or
// dispatches across part boundaries exactly as when they were one file, so splitting the
// file changed no generated code path (and no result bit).
//
// Per layer and direction (Appleyard et al. 2016):
//   forward:  gates[rows, 4H] = x W_ih^T                    (one GEMM over every step, or
//                                                            fused into each step's product)
//             per step t: gates_t += h_{t-1} W_hh^T
//                         one fused pass: + b_ih + b_hh, activations, c_t, h_t (lstm_cell.h)
//                         [proj] h_t = (o * tanh c_t) W_hr^T
//   backward: per step, in reverse: one fused pass -> d(gates)_t, dh_{t-1} = d(gates)_t W_hh
//             then dW_ih, dW_hh, dW_hr, db, dx as a few large GEMMs over every step.
// Nothing is allocated per time step. Everything runs in the math dtype (float for
// float/bfloat16/half, double for double); a bfloat16 model's products take bf16 operands with
// float32 sums on CPUs with AVX512_BF16 (bf16_gemm.h), forward and backward.
#include "backward.h"
#include "describe.h"
#include "forward.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

namespace fused_lstm {
namespace {

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// The plan of one op call: the settings are read once, when the call starts; the op boundary
// asks whether a bfloat16 call keeps its tensors bf16 (lstm.h KeepBf16) before the kernels
// run; the plan is made once, at the first of the two questions (the same shape and dtype).
struct CallPlan {
  CpuSettings settings = cpu_settings();
  bool inference = false;
  mutable std::optional<CpuPlan> planned;  // made when the op boundary asked (bf16 calls)

  CpuPlan of(const LSTMShape& s, at::ScalarType dtype) const {
    if (!planned)
      planned = plan_cpu(s, settings, dtype != at::kDouble, dtype == at::kBFloat16, inference);
    return *planned;
  }
  KeepBf16 keep_bf16() const {
    return [this](const LSTMShape& s) { return of(s, at::kBFloat16).keep_bf16; };
  }
  KeepBf16 backward_widens_bf16() const {
    return [this](const LSTMShape& s) { return of(s, at::kBFloat16).backward_widens_bf16; };
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size) {
  const CallPlan call{cpu_settings(), /*inference=*/false};
  ForwardArgs a = prepare_forward(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                                  bidirectional, has_biases, proj_size, /*with_reserve=*/true,
                                  call.keep_bf16());
  const CpuPlan plan = call.of(a.shape, a.dtype);
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_forward_cpu", [&] {
    forward_impl<scalar_t>(plan, a.shape, operand<scalar_t>(a.input), ptr_or_null<scalar_t>(a.hx),
                           ptr_or_null<scalar_t>(a.cx), a.weights,
                           ptr_or_null<scalar_t>(a.dropout_mask), a.hy.mutable_data_ptr<scalar_t>(),
                           a.cy.mutable_data_ptr<scalar_t>(), a.reserve.mutable_data_ptr<scalar_t>());
  });
  return finish_forward(a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_inference_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size) {
  const CallPlan call{cpu_settings(), /*inference=*/true};
  ForwardArgs a = prepare_forward(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                                  bidirectional, has_biases, proj_size, /*with_reserve=*/false,
                                  call.keep_bf16());
  const LSTMShape& s = a.shape;
  const CpuPlan plan = call.of(s, a.dtype);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = s.num_directions * s.out_size;
  at::Tensor output = a.output.defined()  // [T, B, D*out] == [rows, D*out]
      ? a.output
      : at::empty(out_shape, a.hy.options());
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_inference_cpu", [&] {
    inference_impl<scalar_t>(plan, s, operand<scalar_t>(a.input), ptr_or_null<scalar_t>(a.hx),
                             ptr_or_null<scalar_t>(a.cx), a.weights,
                             ptr_or_null<scalar_t>(a.dropout_mask), a.hy.mutable_data_ptr<scalar_t>(),
                             a.cy.mutable_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>());
  });
  return {in_dtype(output, a.dtype), in_dtype(a.hy, a.dtype), in_dtype(a.cy, a.dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_backward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& reserve, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
    int64_t num_layers, bool bidirectional, bool has_biases, int64_t proj_size) {
  const CallPlan call{cpu_settings(), /*inference=*/false};
  BackwardArgs a = prepare_backward(input, batch_sizes, hx, cx, weights, dropout_mask, reserve,
                                    grad_output, grad_hy, grad_cy, num_layers, bidirectional,
                                    has_biases, proj_size, call.keep_bf16(),
                                    call.backward_widens_bf16());
  const CpuPlan plan = call.of(a.shape, a.dtype);
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_backward_cpu", [&] {
    backward_impl<scalar_t>(
        plan, a.shape, operand<scalar_t>(a.input), ptr_or_null<scalar_t>(a.hx),
        ptr_or_null<scalar_t>(a.cx), a.weights, ptr_or_null<scalar_t>(a.dropout_mask),
        a.reserve.const_data_ptr<scalar_t>(), operand<scalar_t>(a.grad_output),
        ptr_or_null<scalar_t>(a.grad_hy), ptr_or_null<scalar_t>(a.grad_cy),
        a.grad_input.mutable_data_ptr<scalar_t>(), a.grad_hx.mutable_data_ptr<scalar_t>(),
        a.grad_cx.mutable_data_ptr<scalar_t>(), a.grad_weights);
  });
  return finish_backward(a, weights);
}

// fused_lstm::cpu_plan: the plan of a call of these sizes, as describe() writes it
// (fused_lstm.explain reads it). batch_sizes: one per step (every step's batch, or a packed
// sequence's batch sizes).
std::string cpu_plan_op(int64_t input_size, int64_t hidden_size, int64_t proj_size,
                        int64_t num_layers, bool bidirectional, bool has_biases,
                        std::vector<int64_t> batch_sizes, at::ScalarType dtype, bool inference) {
  TORCH_CHECK_VALUE(input_size >= 1 && hidden_size >= 1 && proj_size >= 0 &&
                        proj_size < hidden_size + (proj_size == 0) && num_layers >= 1 &&
                        !batch_sizes.empty(),
                    "fused_lstm::cpu_plan: bad sizes");
  LSTMShape s;
  s.num_layers = num_layers;
  s.num_directions = bidirectional ? 2 : 1;
  s.input_size = input_size;
  s.hidden_size = hidden_size;
  s.proj_size = proj_size;
  s.out_size = proj_size > 0 ? proj_size : hidden_size;
  s.seq_len = static_cast<int64_t>(batch_sizes.size());
  s.batch = batch_sizes[0];
  s.has_biases = has_biases;
  for (const int64_t b : batch_sizes) {
    s.step_offset.push_back(s.rows);
    s.rows += b;
  }
  s.packed = batch_sizes.front() != batch_sizes.back();
  s.batch_sizes = std::move(batch_sizes);
  const CallPlan call{cpu_settings(), inference};
  return describe(call.of(s, dtype), s);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  m.def("cpu_plan(int input_size, int hidden_size, int proj_size, int num_layers, "
        "bool bidirectional, bool has_biases, int[] batch_sizes, ScalarType dtype, "
        "bool inference) -> str",
        &cpu_plan_op);
}

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_inference", &lstm_inference_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace fused_lstm
