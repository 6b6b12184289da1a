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

// Whether weight i (nn.LSTM's _flat_weights order) is a W_ih or a W_hh: the weights whose
// gradients are made apart (lstm.h), by autograd nodes of their own.
bool made_apart(size_t i, bool has_biases, int64_t proj_size) {
  return static_cast<int64_t>(i) % weights_per_direction(has_biases, proj_size) < 2;
}

// Plain CPU tensors (or none): not a tracing or transform's wrapper (FakeTensor, functional,
// functorch or legacy-vmap batched tensors), whose data the CPU kernels cannot read directly.
bool plain_cpu(std::initializer_list<OptTensor> tensors) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python,
                                            c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::Functionalize,
                                            c10::DispatchKey::Batched,
                                            c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper});
  for (const OptTensor& t : tensors)
    if (t && t->defined() && (!t->is_cpu() || t->layout() != at::kStrided ||
                              t->key_set().has_any(wrapped)))
      return false;
  return true;
}

// W_ih's or W_hh's own autograd node (lstm.h, "gradients apart"). Its forward returns a token, a
// 0-dim tensor that the LSTM node takes in the weight's place (the LSTM node reads the weight
// detached); its backward, which runs after the LSTM node's (the token is its input), takes what
// that left at `index` of the shared list: its layer and direction's factors, from which it
// makes the gradient of W_ih (`w_ih`) or W_hh, whose widths are `in` and `out`, or (create_graph,
// batched gradients, another backward) the gradient itself.
struct WeightGradNode : public torch::autograd::Function<WeightGradNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight,
                            const c10::IValue& apart, int64_t index, bool w_ih, int64_t in,
                            int64_t out) {
    ctx->saved_data["apart"] = apart;
    ctx->saved_data["index"] = index;
    ctx->saved_data["sizes"] = weight.sizes().vec();
    ctx->saved_data["dtype"] = weight.scalar_type();
    ctx->saved_data["w_ih"] = w_ih;
    ctx->saved_data["in"] = in;
    ctx->saved_data["out"] = out;
    return at::zeros({}, weight.options());  // (its value is never read)
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    c10::List<at::Tensor> apart = ctx->saved_data["apart"].toTensorList();
    const int64_t index = ctx->saved_data["index"].toInt();
    at::Tensor left = apart.get(index);
    apart.set(index, at::Tensor());  // released as soon as the gradient is made
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    at::Tensor grad;
    if (left.defined())
      grad = left.sizes() == at::IntArrayRef(sizes)
                 ? left
                 : weight_grad_from_factors(left, sizes[0], ctx->saved_data["in"].toInt(),
                                            ctx->saved_data["out"].toInt(),
                                            ctx->saved_data["w_ih"].toBool(),
                                            ctx->saved_data["dtype"].toScalarType());
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct LSTMFunction : public torch::autograd::Function<LSTMFunction> {
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const OptTensor& batch_sizes,
      const OptTensor& hx, const OptTensor& cx, at::TensorList weights,
      const OptTensor& dropout_mask, int64_t num_layers, bool bidirectional, bool has_biases,
      int64_t proj_size, at::TensorList tokens, const c10::IValue& apart,
      const c10::IValue& originals) {
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
    // (With the gradients apart, the weights as the caller gave them, not the detached ones
    // read here: a differentiable gradient, create_graph=True, is made from them.)
    if (originals.isTensorList()) {
      for (const at::Tensor& w : originals.toTensorList()) saved.push_back(w);
    } else {
      saved.insert(saved.end(), weights.begin(), weights.end());
    }
    ctx->save_for_backward(std::move(saved));
    ctx->saved_data["batch_sizes"] = batch_sizes.value_or(at::Tensor());
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["bidirectional"] = bidirectional;
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["proj_size"] = proj_size;
    ctx->saved_data["tokens"] = static_cast<int64_t>(tokens.size());
    ctx->saved_data["apart"] = apart;
    // (Whether h0 needs a gradient: needs_input_grad counts the present tensors only, so its
    // index for hx moves with batch_sizes.)
    ctx->saved_data["h0_grad"] = hx.has_value() && hx->requires_grad();
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

    // W_ih's and W_hh's gradients apart (lstm.h): their nodes' shared list, emptied first (a
    // backward that makes none must not leave the nodes an earlier backward's).
    const c10::IValue& apart_value = ctx->saved_data["apart"];
    c10::List<at::Tensor> apart;
    if (apart_value.isTensorList()) {
      apart = apart_value.toTensorList();
      for (size_t i = 0; i < apart.size(); ++i) apart.set(i, at::Tensor());
    }
    const int64_t tokens = ctx->saved_data["tokens"].toInt();
    const bool h0_grad = ctx->saved_data["h0_grad"].toBool();

    // One entry per flattened forward argument (autograd counts the non-tensor ones too, which
    // get none): input, batch_sizes, hx, cx, the weights, dropout_mask, 4 ints and bools, the
    // weight nodes' tokens, the list, the weights as given.
    variable_list result(4 + weights.size() + 5 + tokens + 2);
    if (!grad_output && !grad_hy && !grad_cy) return result;

    at::Tensor grad_input, grad_hx, grad_cx;
    std::vector<at::Tensor> grad_weights;
    // The plain backward, every weight's gradient returned by the op, except with W_ih and W_hh
    // apart on plain CPU tensors: then theirs are factors (lstm.h cpu_backward).
    const bool factors = !apart.empty() && !at::GradMode::is_enabled() &&
                         plain_cpu({grad_output, grad_hy, grad_cy});
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable gradient
      static const auto op = find_op<CompositeSig>("fused_lstm::lstm_backward_composite");
      std::tie(grad_input, grad_hx, grad_cx, grad_weights) =
          op.call(input, batch_sizes, hx, cx, weights, mask, grad_output, grad_hy, grad_cy,
                  num_layers, bidirectional, has_biases, proj_size);
    } else {
      // Where the input needs no gradient (the usual training call: the data does not require
      // grad), the op computes none: layer 0's dL/dx products are skipped.
      static const auto op = find_op<BackwardSig>("fused_lstm::lstm_backward");
      if (factors)
        std::tie(grad_input, grad_hx, grad_cx, grad_weights) = cpu_backward(
            input, batch_sizes, hx, cx, weights, mask, reserve, grad_output, grad_hy, grad_cy,
            num_layers, bidirectional, has_biases, proj_size, ctx->needs_input_grad(0),
            /*weight_grads_apart=*/true, /*state_grad=*/h0_grad);
      else
        std::tie(grad_input, grad_hx, grad_cx, grad_weights) =
            op.call(input, batch_sizes, hx, cx, weights, mask, reserve, grad_output, grad_hy,
                    grad_cy, num_layers, bidirectional, has_biases, proj_size,
                    ctx->needs_input_grad(0));
    }
    if (ctx->needs_input_grad(0)) result[0] = grad_input;
    if (hx && (h0_grad || !factors)) result[2] = grad_hx;  // (factors: computed if h0_grad)
    if (cx) result[3] = grad_cx;
    for (size_t i = 0; i < grad_weights.size(); ++i) {
      if (!apart.empty() && made_apart(i, has_biases, proj_size))
        apart.set(i, grad_weights[i]);  // for W_ih's or W_hh's node (WeightGradNode)
      else
        result[4 + i] = grad_weights[i];
    }
    if (tokens > 0) {  // each weight node's token: a gradient so that the node runs
      const at::Tensor token_grad = at::zeros({}, weights[0].options());
      for (int64_t i = 0; i < tokens; ++i) result[4 + weights.size() + 5 + i] = token_grad;
    }
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
  // W_ih's and W_hh's gradients apart (lstm.h): a training call on plain CPU tensors, every
  // weight requiring grad, that the CPU plan takes apart (fewer rows than W_ih has: a quick
  // bound first, as the factors of more would outnumber the gradients).
  // (Plain tensors first: a tracer's have symbolic sizes, which numel() refuses.)
  bool apart = at::GradMode::is_enabled() && !weights.empty() && plain_cpu({input, hx, cx});
  for (const at::Tensor& w : weights) apart = apart && w.requires_grad() && plain_cpu({w});
  apart = apart && input.dim() >= 2 && weights[0].dim() == 2 && input.size(-1) > 0 &&
          input.numel() / input.size(-1) < weights[0].size(0) &&
          cpu_weight_grads_apart(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                                 bidirectional, has_biases, proj_size);
  if (!apart) {
    auto out = LSTMFunction::apply(saveable_input(input), batch_sizes, hx, cx, weights,
                                   dropout_mask, num_layers, bidirectional, has_biases, proj_size,
                                   at::TensorList(), c10::IValue(), c10::IValue());
    return {out[0], out[1], out[2], out[3]};
  }
  c10::List<at::Tensor> list;
  std::vector<at::Tensor> tokens, as_read(weights.begin(), weights.end());
  const int64_t per_direction = weights_per_direction(has_biases, proj_size);
  for (size_t i = 0; i < weights.size(); ++i) {
    list.push_back(at::Tensor());
    const int64_t slot = static_cast<int64_t>(i) % per_direction;  // W_ih 0, W_hh 1 (made_apart)
    if (slot < 2) {
      const bool w_ih = slot == 0;
      const size_t ih = i - slot;  // the layer and direction's W_ih, then its W_hh
      tokens.push_back(WeightGradNode::apply(weights[i], c10::IValue(list),
                                             static_cast<int64_t>(i), w_ih,
                                             weights[ih].size(1), weights[ih + 1].size(1)));
      as_read[i] = weights[i].detach();
    }
  }
  // (As TensorLists: autograd counts a std::vector argument as one non-tensor.)
  auto out = LSTMFunction::apply(saveable_input(input), batch_sizes, hx, cx,
                                 at::TensorList(as_read), dropout_mask, num_layers, bidirectional,
                                 has_biases, proj_size, at::TensorList(tokens), c10::IValue(list),
                                 c10::IValue(c10::List<at::Tensor>(weights.vec())));
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) {
  m.impl("lstm_forward", &lstm_forward_autograd);
}

}  // namespace fused_lstm
