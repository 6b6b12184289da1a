// Autograd for fused_lstm::lstm_forward, in C++ and backend-independent: the forward
// redispatches below autograd to the CPU or CUDA kernel, the backward is ONE call of
// fused_lstm::lstm_backward for the whole stack.
//
// Why C++ and not torch.library.register_autograd: at tutorial sizes the wrapper IS the cost.
// Measured on the 2-core dev machine (empty stand-ins, forward + backward of 3 outputs and 9
// inputs): register_autograd about 2.1x the time of this kernel
// (benchmarks/notes/python-overhead.md, "Autograd wiring: a C++ autograd kernel").
//
// Double backward (create_graph=True): the gradient must itself be differentiable, so backward
// then calls fused_lstm::lstm_backward_composite, implemented in Python (fused_lstm/ops.py) by
// differentiating the plain-PyTorch reference: slower, exact, differentiable again.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "lstm.h"

namespace fused_lstm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, at::TensorList,
    const OptTensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    int64_t, bool, bool, int64_t, bool);
using CompositeSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, at::TensorList,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, int64_t, bool, bool,
    int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

OptTensor defined_or_none(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

struct LSTMFunction : public torch::autograd::Function<LSTMFunction> {
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const OptTensor& batch_sizes,
      const OptTensor& hx, const OptTensor& cx, at::TensorList weights,
      const OptTensor& dropout_mask, int64_t num_layers, bool bidirectional, bool has_biases,
      int64_t proj_size) {
    static const auto op = find_op<ForwardSig>("fused_lstm::lstm_forward");
    at::Tensor output, hy, cy, reserve;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, hy, cy, reserve) = op.call(input, batch_sizes, hx, cx, weights,
                                                  dropout_mask, num_layers, bidirectional,
                                                  has_biases, proj_size);
    }
    ctx->mark_non_differentiable({reserve});
    ctx->set_materialize_grads(false);
    variable_list saved{input, hx.value_or(at::Tensor()), cx.value_or(at::Tensor()),
                        dropout_mask.value_or(at::Tensor()), reserve};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(std::move(saved));
    ctx->saved_data["batch_sizes"] = batch_sizes.value_or(at::Tensor());
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["bidirectional"] = bidirectional;
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["proj_size"] = proj_size;
    return {output, hy, cy, reserve};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const OptTensor hx = defined_or_none(saved[1]);
    const OptTensor cx = defined_or_none(saved[2]);
    const OptTensor mask = defined_or_none(saved[3]);
    const at::Tensor& reserve = saved[4];
    const std::vector<at::Tensor> weights(saved.begin() + 5, saved.end());
    const OptTensor batch_sizes = defined_or_none(ctx->saved_data["batch_sizes"].toTensor());
    const int64_t num_layers = ctx->saved_data["num_layers"].toInt();
    const bool bidirectional = ctx->saved_data["bidirectional"].toBool();
    const bool has_biases = ctx->saved_data["has_biases"].toBool();
    const int64_t proj_size = ctx->saved_data["proj_size"].toInt();
    const OptTensor grad_output = defined_or_none(grads[0]);
    const OptTensor grad_hy = defined_or_none(grads[1]);
    const OptTensor grad_cy = defined_or_none(grads[2]);

    // One entry per flattened forward argument (the non-tensor ones are dropped by autograd).
    variable_list result(4 + weights.size() + 5);
    if (!grad_output && !grad_hy && !grad_cy) return result;

    at::Tensor grad_input, grad_hx, grad_cx;
    std::vector<at::Tensor> grad_weights;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable gradient
      static const auto op = find_op<CompositeSig>("fused_lstm::lstm_backward_composite");
      std::tie(grad_input, grad_hx, grad_cx, grad_weights) =
          op.call(input, batch_sizes, hx, cx, weights, mask, grad_output, grad_hy, grad_cy,
                  num_layers, bidirectional, has_biases, proj_size);
    } else {
      // Where the input needs no gradient (the usual training call: the data does not require
      // grad), the op computes none: layer 0's dL/dx products are skipped.
      static const auto op = find_op<BackwardSig>("fused_lstm::lstm_backward");
      std::tie(grad_input, grad_hx, grad_cx, grad_weights) =
          op.call(input, batch_sizes, hx, cx, weights, mask, reserve, grad_output, grad_hy,
                  grad_cy, num_layers, bidirectional, has_biases, proj_size,
                  ctx->needs_input_grad(0));
    }
    if (ctx->needs_input_grad(0)) result[0] = grad_input;
    if (hx) result[2] = grad_hx;
    if (cx) result[3] = grad_cx;
    for (size_t i = 0; i < grad_weights.size(); ++i) result[4 + i] = grad_weights[i];
    return result;
  }
};

// The input as backward must read it: the values it had in the forward, as nn.LSTM's backward
// reads them. A non-contiguous input (batch_first input reaches the op transposed) is copied
// here, through autograd (so double backward still reaches the caller's tensor), instead of
// inside the op (prepare_forward's to_math would copy it anyway, and prepare_backward again):
// the same one copy, now saved, as nn.LSTM's CPU paths save a contiguous copy of a transposed
// input. So, as with nn.LSTM, an in-place edit of the caller's tensor between forward and
// backward changes nothing, and an input made under torch.inference_mode trains (the copy is
// a normal tensor). A contiguous input is saved as it is: then an in-place edit makes
// backward raise autograd's error, and an inference tensor cannot be saved (the op's error;
// FusedLSTM then lets nn.LSTM raise its own), both as nn.LSTM does.
at::Tensor saveable_input(const at::Tensor& input) {
  return input.is_contiguous() ? input : input.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_autograd(
    const at::Tensor& input, const OptTensor& batch_sizes, const OptTensor& hx,
    const OptTensor& cx, at::TensorList weights, const OptTensor& dropout_mask,
    int64_t num_layers, bool bidirectional, bool has_biases, int64_t proj_size) {
  auto out = LSTMFunction::apply(saveable_input(input), batch_sizes, hx, cx, weights,
                                 dropout_mask, num_layers, bidirectional, has_biases, proj_size);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) {
  m.impl("lstm_forward", &lstm_forward_autograd);
}

}  // namespace fused_lstm
