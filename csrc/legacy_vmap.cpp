// fused_lstm::lstm_backward under PyTorch's legacy vmap (torch._vmap_internals, the Batched
// dispatch key): what torch.autograd.grad(..., is_grads_batched=True),
// torch.autograd.functional.jacobian(vectorize=True) and gradcheck(check_batched_grad=True) use
// to run the backward of the C++ autograd kernel (autograd.cpp) for a batch of upstream
// gradients. The legacy fallback cannot loop over an op returning Tensor[]; this kernel does:
// one fused backward call per vmap element (each element's weight gradients are its own, so
// they cannot come from one call over a folded batch), results stacked. torch.func's vmap
// (FuncTorchBatched) has its rules in fused_lstm/_functorch.py.
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/LegacyVmapTransforms.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <vector>

#include "lstm.h"

namespace fused_lstm {
namespace {

using OptTensor = std::optional<at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;
using BackwardSig = BackwardResult(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, at::TensorList,
    const OptTensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    int64_t, bool, bool, int64_t, bool);

// The tensor arguments in one list (absent optionals as undefined tensors); the batched ones
// are replaced by physical tensors whose leading dimension is the (flattened) vmap batch.
struct Unbatched {
  std::vector<at::Tensor> tensors;
  std::vector<bool> batched;
  int64_t size = 0;
  std::vector<int64_t> batch_shape;
  std::optional<at::VmapPhysicalToLogicalMap> to_logical;

  at::Tensor at(size_t i, int64_t n) const {
    return batched[i] ? tensors[i].select(0, n) : tensors[i];
  }
};

Unbatched unbatch(std::vector<at::Tensor> tensors) {
  Unbatched u;
  u.batched.assign(tensors.size(), false);
  std::vector<at::Tensor> logical;
  std::vector<size_t> where;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].defined() && at::isBatchedTensor(tensors[i])) {
      logical.push_back(tensors[i]);
      where.push_back(i);
    }
  }
  TORCH_INTERNAL_ASSERT(!logical.empty());
  auto physical = at::MultiBatchVmapTransform::logicalToPhysical(logical);
  const int64_t batch_dims = physical[0].numBatchDims();
  const auto sizes = physical[0].tensor().sizes();
  u.batch_shape.assign(sizes.begin(), sizes.begin() + batch_dims);
  u.size = 1;
  for (const int64_t s : u.batch_shape) u.size *= s;
  u.to_logical = physical[0].getPhysicalToLogicalMap();
  for (size_t k = 0; k < where.size(); ++k) {
    // Every batch dimension to its full size (an argument not batched at some level has size
    // 1 there), then flattened into one.
    at::Tensor t = physical[k].tensor();
    std::vector<int64_t> full(u.batch_shape);
    full.insert(full.end(), t.sizes().begin() + batch_dims, t.sizes().end());
    t = t.expand(full);
    std::vector<int64_t> flat{u.size};
    flat.insert(flat.end(), t.sizes().begin() + batch_dims, t.sizes().end());
    tensors[where[k]] = t.reshape(flat);
    u.batched[where[k]] = true;
  }
  u.tensors = std::move(tensors);
  return u;
}

at::Tensor stacked(std::vector<at::Tensor>& per_element, const Unbatched& u) {
  at::Tensor t = at::stack(per_element);
  std::vector<int64_t> shape(u.batch_shape);
  shape.insert(shape.end(), t.sizes().begin() + 1, t.sizes().end());
  return u.to_logical->apply(t.reshape(shape));
}

BackwardResult lstm_backward_batched(
    const at::Tensor& input, const OptTensor& batch_sizes, const OptTensor& hx,
    const OptTensor& cx, at::TensorList weights, const OptTensor& dropout_mask,
    const at::Tensor& reserve, const OptTensor& grad_output, const OptTensor& grad_hy,
    const OptTensor& grad_cy, int64_t num_layers, bool bidirectional, bool has_biases,
    int64_t proj_size, bool input_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_lstm::lstm_backward", "")
                             .typed<BackwardSig>();
  auto value = [](const OptTensor& t) { return t.value_or(at::Tensor()); };
  // Order: input, batch_sizes, hx, cx, dropout_mask, reserve, grad_output, grad_hy, grad_cy,
  // then the weights.
  std::vector<at::Tensor> all{input, value(batch_sizes), value(hx), value(cx),
                              value(dropout_mask), reserve, value(grad_output), value(grad_hy),
                              value(grad_cy)};
  all.insert(all.end(), weights.begin(), weights.end());
  const Unbatched u = unbatch(std::move(all));
  auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };

  const size_t num_weights = weights.size();
  std::vector<at::Tensor> grad_input, grad_hx, grad_cx;
  std::vector<std::vector<at::Tensor>> grad_weights(num_weights);
  for (int64_t n = 0; n < u.size; ++n) {
    std::vector<at::Tensor> w;
    w.reserve(num_weights);
    for (size_t i = 0; i < num_weights; ++i) w.push_back(u.at(9 + i, n));
    auto [gi, ghx, gcx, gw] =
        op.call(u.at(0, n), opt(u.at(1, n)), opt(u.at(2, n)), opt(u.at(3, n)), w,
                opt(u.at(4, n)), u.at(5, n), opt(u.at(6, n)), opt(u.at(7, n)), opt(u.at(8, n)),
                num_layers, bidirectional, has_biases, proj_size, input_grad);
    grad_input.push_back(gi);
    grad_hx.push_back(ghx);
    grad_cx.push_back(gcx);
    for (size_t i = 0; i < num_weights; ++i) grad_weights[i].push_back(gw[i]);
  }
  std::vector<at::Tensor> weights_out;
  weights_out.reserve(num_weights);
  for (auto& g : grad_weights) weights_out.push_back(stacked(g, u));
  return {stacked(grad_input, u), stacked(grad_hx, u), stacked(grad_cx, u), weights_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Batched, m) {
  m.impl("lstm_backward", &lstm_backward_batched);
}

}  // namespace fused_lstm
