// CUDA implementation of fused_lstm::lstm_forward / lstm_backward: the plan of the CPU kernels
// (cpu/lstm_cpu.cpp), with the same semantics and the same reserve layout (LSTMShape in lstm.h).
//
// Per layer and direction:
//   forward:  gates[rows, 4H] = x W_ih^T + (b_ih + b_hh)          one GEMM over every step
//             per step t: gates_t += h_{t-1} W_hh^T                GEMM, straight into the reserve
//                         one fused kernel: activations, c_t, h_t  (lstm_kernels.cu, lstm_cell.h)
//                         [proj] h_t = pre_proj_t W_hr^T           GEMM, then a copy into the output
//   backward: per step, in reverse: [proj] dh_t = carried + from output, dL/d pre_proj = dh_t W_hr;
//             one fused kernel -> dgates_t, dL/dc_{t-1}, and h_{t-1} gathered for dW_hh;
//             dh_{t-1} = dgates_t W_hh                              GEMM
//             then dW_ih, dW_hh, dW_hr, dx as large GEMMs over every step; db = sum over rows.
//
// GEMMs go through ATen (cuBLAS underneath) on views of buffers allocated once per call. Like
// the CPU kernels, everything runs in the math dtype: float16 and bfloat16 tensors are converted
// to float32 at the op's boundary and the GEMMs run in float32 (exact float32 products and
// float32 accumulation; TF32 only if torch.backends.cuda.matmul.allow_tf32 is set), the reserve
// is float32; float64 runs in float64.
//
// Everything is enqueued on the current stream of the input's device. Packed batch sizes are a
// CPU tensor, so every per-step size is a host value: nothing reads device memory on the host,
// there is no synchronisation, and a forward or backward can be captured in a CUDA graph.
// Deterministic: no atomics; the bias gradient is ATen's sum over rows.
//
// Where it fits (no projection; W_hh slices in the shared memory of a co-resident grid; see
// lstm_persistent.h), a layer runs instead as ONE cooperative launch for every step of both
// directions: gpu::choose_cuda_path decides once per call (the setting
// fused_lstm.backends.cuda.path overrides it), forward and backward separately; both paths fill
// the same reserve.
#include "../lstm.h"
#include "lstm_kernels.h"
#include "lstm_persistent.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
// c10's CUDA headers rather than ATen/cuda/CUDAContext.h, which pulls in the cuBLAS headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <vector>

namespace fused_lstm {
namespace {

using at::Tensor;

// The [rows, cols] matrix stored at `offset` of the flat reserve (a view, no copy).
Tensor reserve_matrix(const Tensor& reserve, int64_t offset, int64_t rows, int64_t cols) {
  return reserve.narrow(0, offset, rows * cols).view({rows, cols});
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// Weights of one layer and direction, contiguous math-dtype tensors.
struct DirectionWeights {
  Tensor w_ih;  // [4H, I_l]
  Tensor w_hh;  // [4H, out]
  Tensor b_ih;  // [4H] or undefined
  Tensor b_hh;  // [4H] or undefined
  Tensor w_hr;  // [out, H] or undefined
};

DirectionWeights direction_weights(const LSTMShape& s, const std::vector<Tensor>& w,
                                   int64_t layer, int64_t direction) {
  const int64_t k = s.weight_index(layer, direction);
  DirectionWeights dw{w[k], w[k + 1], Tensor(), Tensor(), Tensor()};
  int64_t next = k + 2;
  if (s.has_biases) {
    dw.b_ih = w[next];
    dw.b_hh = w[next + 1];
    next += 2;
  }
  if (s.proj_size > 0) dw.w_hr = w[next];
  return dw;
}

// Step t in processing order `step` of direction d.
inline int64_t time_of(const LSTMShape& s, int64_t direction, int64_t step) {
  return direction == 0 ? step : s.seq_len - 1 - step;
}

// The rows of step t that continue from the step processed just before t in direction d: rows
// [0, count), found at rows [offset, offset + count) of that step; the other rows of step t start
// from h0/c0. Forward: step t-1 (it has at least as many rows). Reverse: step t+1, of which only
// the first batch_sizes[t+1] rows exist (packed sequences join the reverse direction late).
// lstm_cpu.cpp's prev_row, one step at a time.
struct PrevRows {
  int64_t offset = 0;
  int64_t count = 0;
};

PrevRows prev_rows(const LSTMShape& s, int64_t direction, int64_t t) {
  if (direction == 0) {
    if (t > 0) return {s.step_offset[t - 1], s.batch_sizes[t]};
  } else if (t + 1 < s.seq_len) {
    return {s.step_offset[t + 1], s.batch_sizes[t + 1]};
  }
  return {};
}

// x of layer l: the op's input [rows, I], or the previous layer's output [rows, D*out] with its
// dropout mask applied (into `dropped`).
Tensor layer_input(const LSTMShape& s, int64_t layer, const Tensor& input, const Tensor& reserve,
                   const Tensor& mask, Tensor& dropped) {
  if (layer == 0) return input;
  const int64_t width = s.num_directions * s.out_size;
  Tensor prev = reserve_matrix(reserve, s.layer_out_offset(layer - 1), s.rows, width);
  if (!mask.defined()) return prev;
  at::mul_out(dropped, prev, mask.select(0, layer - 1));
  return dropped;
}

// input: [rows, I]; hx, cx: [L*D, B, out], [L*D, B, H] or undefined; mask: [L-1, rows, D*out]
// or undefined; hy, cy: outputs like hx, cx; reserve: [reserve_numel]. All math dtype T.
template <typename T>
void forward_impl(const LSTMShape& s, const Tensor& input, const Tensor& hx, const Tensor& cx,
                  const std::vector<Tensor>& weights, const Tensor& mask, const Tensor& hy,
                  const Tensor& cy, const Tensor& reserve, cudaStream_t stream,
                  const gpu::PersistentPlan* persistent) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, D = s.num_directions;
  const int64_t out_stride = D * out;  // row stride of layer_out
  const bool proj = s.proj_size > 0;
  Tensor dropped;
  if (mask.defined() && s.num_layers > 1) dropped = at::empty({s.rows, out_stride}, input.options());

  for (int64_t l = 0; l < s.num_layers; ++l) {
    const Tensor x = layer_input(s, l, input, reserve, mask, dropped);  // [rows, I_l]
    if (persistent != nullptr) {  // every step of both directions in one launch
      gpu::persistent_forward_layer<T>(s, l, x, hx, cx, weights, hy, cy, reserve, *persistent,
                                       stream);
      continue;
    }
    const Tensor layer_out = reserve_matrix(reserve, s.layer_out_offset(l), s.rows, out_stride);
    for (int64_t d = 0; d < D; ++d) {
      const DirectionWeights w = direction_weights(s, weights, l, d);
      Tensor gates = reserve_matrix(reserve, s.gates_offset(l, d), s.rows, G);
      const Tensor cells = reserve_matrix(reserve, s.cells_offset(l, d), s.rows, H);
      const Tensor pre_proj =
          proj ? reserve_matrix(reserve, s.pre_proj_offset(l, d), s.rows, H) : Tensor();
      // The running state lives in the h_n / c_n outputs: [B, out], [B, H].
      const int64_t ld = l * D + d;
      Tensor h_state = hy.select(0, ld);
      Tensor c_state = cy.select(0, ld);
      if (hx.defined()) h_state.copy_(hx.select(0, ld));
      else h_state.zero_();
      if (cx.defined()) c_state.copy_(cx.select(0, ld));
      else c_state.zero_();

      // Input projection of every step at once: gates = x W_ih^T + (b_ih + b_hh).
      if (s.has_biases) {
        at::addmm_out(gates, at::add(w.b_ih, w.b_hh), x, w.w_ih.t());
      } else {
        at::mm_out(gates, x, w.w_ih.t());
      }

      for (int64_t step = 0; step < s.seq_len; ++step) {
        const int64_t t = time_of(s, d, step);
        const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
        if (bs == 0) continue;  // zero batch size: nothing to compute, nothing to launch
        Tensor gates_t = gates.narrow(0, off, bs);
        Tensor h_prev = h_state.narrow(0, 0, bs);
        // The first step of a zero initial state adds nothing.
        if (step > 0 || hx.defined()) gates_t.addmm_(h_prev, w.w_hh.t());
        T* h_out;
        int64_t ld_h_out;
        if (proj) {
          h_out = pre_proj.mutable_data_ptr<T>() + off * H;
          ld_h_out = H;
        } else {
          h_out = layer_out.mutable_data_ptr<T>() + off * out_stride + d * out;
          ld_h_out = out_stride;
        }
        gpu::lstm_forward_step<T>(bs, H, gates_t.mutable_data_ptr<T>(),
                                  c_state.mutable_data_ptr<T>(),
                                  cells.mutable_data_ptr<T>() + off * H, h_out, ld_h_out,
                                  proj ? nullptr : h_state.mutable_data_ptr<T>(), stream);
        if (proj) {
          at::mm_out(h_prev, pre_proj.narrow(0, off, bs), w.w_hr.t());
          layer_out.narrow(0, off, bs).narrow(1, d * out, out).copy_(h_prev);
        }
      }
    }
  }
}

// As forward_impl, plus: reserve from the forward; grad_output [rows, D*out], grad_hy, grad_cy
// or undefined (zeros); outputs grad_input [rows, I], grad_hx, grad_cx (like hx, cx) and
// grad_weights (like the weights). All math dtype T.
template <typename T>
void backward_impl(const LSTMShape& s, const Tensor& input, const Tensor& hx, const Tensor& cx,
                   const std::vector<Tensor>& weights, const Tensor& mask, const Tensor& reserve,
                   const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy,
                   const Tensor& grad_input, const Tensor& grad_hx, const Tensor& grad_cx,
                   std::vector<Tensor>& grad_weights, cudaStream_t stream,
                   const gpu::PersistentPlan* persistent) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, D = s.num_directions;
  const int64_t out_stride = D * out;
  const bool proj = s.proj_size > 0;
  const auto opts = input.options();
  // Scratch, allocated once per call.
  Tensor dgates = at::empty({s.rows, G}, opts);
  Tensor h_prev = at::empty({s.rows, out}, opts);       // h_{t-1} of every row
  Tensor dy = at::empty({s.rows, out_stride}, opts);    // grad of the current layer's output
  Tensor dx = s.num_layers > 1 ? at::empty({s.rows, out_stride}, opts) : Tensor();
  Tensor dropped = (mask.defined() && s.num_layers > 1) ? at::empty({s.rows, out_stride}, opts)
                                                        : Tensor();
  Tensor dh_all, dr;
  if (proj) {
    dh_all = at::empty({s.rows, out}, opts);  // dL/dh_t of every row (after projection)
    dr = at::empty({s.batch, H}, opts);       // dL/d pre_proj of one step
  }
  if (grad_output.defined()) dy.copy_(grad_output);
  else dy.zero_();
  // The persistent path's scratch per direction: the one above, then the reverse direction's.
  std::array<Tensor, 2> persistent_dgates{dgates, Tensor()}, persistent_h_prev{h_prev, Tensor()};

  for (int64_t l = s.num_layers - 1; l >= 0; --l) {
    const Tensor x = layer_input(s, l, input, reserve, mask, dropped);
    const Tensor layer_out = reserve_matrix(reserve, s.layer_out_offset(l), s.rows, out_stride);
    // Gradient w.r.t. this layer's input: the op's grad_input, or the previous layer's output.
    Tensor dx_l = l == 0 ? grad_input : dx;
    if (persistent != nullptr) {  // every step of both directions in one launch
      gpu::persistent_backward_layer<T>(s, l, x, hx, cx, weights, reserve, dy, grad_hy, grad_cy,
                                        dx_l, grad_hx, grad_cx, grad_weights, persistent_dgates,
                                        persistent_h_prev, *persistent, stream);
      if (l > 0) {  // as below
        if (mask.defined()) at::mul_out(dy, dx, mask.select(0, l - 1));
        else dy.copy_(dx);
      }
      continue;
    }
    for (int64_t d = 0; d < D; ++d) {
      const DirectionWeights w = direction_weights(s, weights, l, d);
      const Tensor gates = reserve_matrix(reserve, s.gates_offset(l, d), s.rows, G);
      const Tensor cells = reserve_matrix(reserve, s.cells_offset(l, d), s.rows, H);
      const Tensor pre_proj =
          proj ? reserve_matrix(reserve, s.pre_proj_offset(l, d), s.rows, H) : Tensor();
      const int64_t ld = l * D + d;
      const Tensor c0 = cx.defined() ? cx.select(0, ld) : Tensor();
      const Tensor h0 = hx.defined() ? hx.select(0, ld) : Tensor();
      Tensor dh_state = grad_hx.select(0, ld);  // [B, out]
      Tensor dc_state = grad_cx.select(0, ld);  // [B, H]
      if (grad_hy.defined()) dh_state.copy_(grad_hy.select(0, ld));
      else dh_state.zero_();
      if (grad_cy.defined()) dc_state.copy_(grad_cy.select(0, ld));
      else dc_state.zero_();

      for (int64_t step = s.seq_len - 1; step >= 0; --step) {
        const int64_t t = time_of(s, d, step);
        const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
        if (bs == 0) continue;
        const PrevRows prev = prev_rows(s, d, t);
        gpu::BackwardStep<T> p;
        p.batch = bs;
        p.hidden = H;
        p.out_size = out;
        p.gates = gates.const_data_ptr<T>() + off * G;
        p.cells = cells.const_data_ptr<T>() + off * H;
        p.prev_batch = prev.count;
        p.cells_prev = prev.count > 0 ? cells.const_data_ptr<T>() + prev.offset * H : nullptr;
        p.c0 = c0.defined() ? c0.const_data_ptr<T>() : nullptr;
        if (proj) {
          // dL/dh_t = carried + from the output; dL/d pre_proj = dL/dh_t W_hr.
          Tensor dh_t = dh_all.narrow(0, off, bs);
          at::add_out(dh_t, dh_state.narrow(0, 0, bs), dy.narrow(0, off, bs).narrow(1, d * out, out));
          Tensor dr_t = dr.narrow(0, 0, bs);
          at::mm_out(dr_t, dh_t, w.w_hr);
          p.dh = dr.const_data_ptr<T>();
          p.ld_dh = H;
        } else {
          p.dh = dh_state.const_data_ptr<T>();
          p.ld_dh = out;
          p.dy = dy.const_data_ptr<T>() + off * out_stride + d * out;
          p.ld_dy = out_stride;
        }
        p.dc_state = dc_state.mutable_data_ptr<T>();
        p.dgates = dgates.mutable_data_ptr<T>() + off * G;
        p.h_prev_src = prev.count > 0
            ? layer_out.const_data_ptr<T>() + prev.offset * out_stride + d * out
            : nullptr;
        p.ld_h_prev_src = out_stride;
        p.h0 = h0.defined() ? h0.const_data_ptr<T>() : nullptr;
        p.h_prev = h_prev.mutable_data_ptr<T>() + off * out;
        gpu::lstm_backward_step<T>(p, stream);
        // dL/dh_{t-1} for the rows active at t; the others keep what they carry.
        Tensor dh_prev = dh_state.narrow(0, 0, bs);
        at::mm_out(dh_prev, dgates.narrow(0, off, bs), w.w_hh);
      }

      const int64_t k = s.weight_index(l, d);
      at::mm_out(grad_weights[k], dgates.t(), x);            // dW_ih [4H, I_l]
      at::mm_out(grad_weights[k + 1], dgates.t(), h_prev);   // dW_hh [4H, out]
      int64_t next = k + 2;
      if (s.has_biases) {
        const int64_t rows_dim[] = {0};
        at::sum_out(grad_weights[next], dgates, at::IntArrayRef(rows_dim));  // db_ih [4H]
        grad_weights[next + 1].copy_(grad_weights[next]);                     // db_hh
        next += 2;
      }
      if (proj) at::mm_out(grad_weights[next], dh_all.t(), pre_proj);  // dW_hr [out, H]
      // dL/dx of this layer, summed over directions.
      if (d == 0) at::mm_out(dx_l, dgates, w.w_ih);
      else dx_l.addmm_(dgates, w.w_ih);
    }
    if (l > 0) {
      // Through the dropout mask into the previous layer's output gradient.
      if (mask.defined()) at::mul_out(dy, dx, mask.select(0, l - 1));
      else dy.copy_(dx);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_cuda(
    const Tensor& input, const std::optional<Tensor>& batch_sizes,
    const std::optional<Tensor>& hx, const std::optional<Tensor>& cx, at::TensorList weights,
    const std::optional<Tensor>& dropout_mask, int64_t num_layers, bool bidirectional,
    bool has_biases, int64_t proj_size) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  ForwardArgs a = prepare_forward(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                                  bidirectional, has_biases, proj_size);
  const LSTMShape& s = a.shape;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t out_stride = s.num_directions * s.out_size;
  const Tensor x = a.input.view({s.rows, s.input_size});
  Tensor mask = a.dropout_mask;
  if (mask.defined()) mask = mask.view({s.num_layers - 1, s.rows, out_stride});
  const gpu::PathChoice path = gpu::choose_cuda_path(
      gpu::path_query(s, a.math == at::kDouble, /*backward=*/false), input.get_device());
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_forward_cuda", [&] {
    forward_impl<scalar_t>(s, x, a.hx, a.cx, a.weights, mask, a.hy, a.cy, a.reserve, stream,
                           path.persistent ? &path.plan : nullptr);
  });
  return finish_forward(a);
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_backward_cuda(
    const Tensor& input, const std::optional<Tensor>& batch_sizes,
    const std::optional<Tensor>& hx, const std::optional<Tensor>& cx, at::TensorList weights,
    const std::optional<Tensor>& dropout_mask, const Tensor& reserve,
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_hy,
    const std::optional<Tensor>& grad_cy, int64_t num_layers, bool bidirectional,
    bool has_biases, int64_t proj_size, bool input_grad) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  BackwardArgs a = prepare_backward(input, batch_sizes, hx, cx, weights, dropout_mask, reserve,
                                    grad_output, grad_hy, grad_cy, num_layers, bidirectional,
                                    has_biases, proj_size);
  const LSTMShape& s = a.shape;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t out_stride = s.num_directions * s.out_size;
  const Tensor x = a.input.view({s.rows, s.input_size});
  Tensor mask = a.dropout_mask;
  if (mask.defined()) mask = mask.view({s.num_layers - 1, s.rows, out_stride});
  Tensor gy = a.grad_output;
  if (gy.defined()) gy = gy.view({s.rows, out_stride});
  const gpu::PathChoice path = gpu::choose_cuda_path(
      gpu::path_query(s, a.math == at::kDouble, /*backward=*/true), input.get_device());
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_backward_cuda", [&] {
    backward_impl<scalar_t>(s, x, a.hx, a.cx, a.weights, mask, a.reserve, gy, a.grad_hy,
                            a.grad_cy, a.grad_input.view({s.rows, s.input_size}), a.grad_hx,
                            a.grad_cx, a.grad_weights, stream,
                            path.persistent ? &path.plan : nullptr);
  });
  // (The CUDA kernels compute dL/dx anyway; without input_grad the schema's empty [0] result.)
  if (!input_grad) a.grad_input = at::empty({0}, a.grad_input.options());
  return finish_backward(a, weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) {
  m.impl("lstm_forward", &lstm_forward_cuda);
  m.impl("lstm_backward", &lstm_backward_cuda);
}

}  // namespace fused_lstm
