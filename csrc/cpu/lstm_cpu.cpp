// CPU kernels of fused_lstm::lstm_forward / lstm_inference / lstm_backward: the op entry points.
//
// One translation unit: this file includes the parts below, each one thing (csrc/cpu/):
//   common.h        scratch, row copies, transposes, Operand, GCC vectors
//   blas.h          library glue: BLAS, oneDNN matmul, oneDNN brgemm
//   plan.h          the kernel choice: which variant a call runs, and why
//   floor_rule.h    the nn.LSTM floor: which inference calls may run at::lstm instead
//   cell.h          the cell passes (lstm_cell.h's math over contiguous runs)
//   weights.h       weight preparation (pointers, bias, brgemm packing)
//   small_hidden.h  variant: small hidden sizes, batch-fastest layout (products, forward)
//   small_hidden_backward.h  its backward, and the bias gradient's column sums
//   row_wise.h      variant: row-wise steps (brgemm / bf16_gemm / BLAS products)
//   thin.h          variant: thin-batch inference
//   bf16_products.h variant: bf16 products (weights packed for bf16_gemm, backward jobs)
//   forward.h       forward and inference drivers
//   backward_products.h  the backward's products and recomputed gates
//   backward.h      backward driver
// One unit rather than one per part: the parts share always-inline templates and
// target_clones functions (cell passes, small-hidden products) that the compiler inlines or
// dispatches across part boundaries exactly as when they were one file, so splitting the
// file changed no generated code path (and no result bit).
//
// Per layer and direction (Appleyard et al. 2016):
//   forward:  gates[rows, 4H] = x W_ih^T                    (one GEMM over every step, over
//                                                            chunks of steps, or fused into
//                                                            each step's product)
//             per step t: gates_t += h_{t-1} W_hh^T
//                         one fused pass: + b_ih + b_hh, activations, c_t, h_t (lstm_cell.h)
//                         [proj] h_t = (o * tanh c_t) W_hr^T
//   backward: per step, in reverse: one fused pass -> d(gates)_t, dh_{t-1} = d(gates)_t W_hh
//             then dW_ih, dW_hh, dW_hr, db, dx as a few large GEMMs over every step (or
//             a chunk of steps at a time: the bf16 products, and where the reserve keeps no
//             gates, which the backward recomputes a chunk at a time).
// Nothing is allocated per time step. Everything runs in the math dtype (float for
// float/bfloat16/half, double for double); a bfloat16 model's products take bf16 operands with
// float32 sums on CPUs with AVX512_BF16 (bf16_gemm.h), forward and backward.
#include "backward.h"
#include "describe.h"
#include "forward.h"

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/lstm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <chrono>
#include <optional>

namespace fused_lstm {
namespace {

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// The plan of one op call: the settings are read once, when the call starts; the op boundary
// asks whether a 16-bit call keeps its tensors as given (lstm.h Keep16) before the kernels
// run; the plan is made once, at the first of the questions (the same shape and dtype).
struct CallPlan {
  CpuSettings settings = cpu_settings();
  bool inference = false;
  mutable std::optional<CpuPlan> planned;  // made when the op boundary asked (bf16 calls)

  CpuPlan of(const LSTMShape& s, at::ScalarType dtype) const {
    if (!planned)
      planned = plan_cpu(s, settings, dtype, inference);
    return *planned;
  }
  // The op boundary's question (lstm.h Keep16), answered by the plan's `flag`.
  Keep16 asks(bool CpuPlan::*flag) const {
    return [this, flag](const LSTMShape& s, at::ScalarType dtype) { return of(s, dtype).*flag; };
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
                                  call.asks(&CpuPlan::keep_16bit), /*may_drop_gates=*/true,
                                  /*output_in_dtype=*/nullptr,
                                  call.asks(&CpuPlan::fp16_kept_training));
  const CpuPlan plan = call.of(a.shape, a.dtype);
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_forward_cpu", [&] {
    forward_impl<scalar_t>(plan, a.shape, operand<scalar_t>(a.input), ptr_or_null<scalar_t>(a.hx),
                           ptr_or_null<scalar_t>(a.cx), a.weights,
                           ptr_or_null<scalar_t>(a.dropout_mask), a.hy.mutable_data_ptr<scalar_t>(),
                           a.cy.mutable_data_ptr<scalar_t>(), a.reserve.mutable_data_ptr<scalar_t>());
  });
  return finish_forward(a);
}

using Results3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Our inference kernels (lstm_inference without the floor).
Results3 fused_inference(
    const CpuSettings& settings, const at::Tensor& input,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& hx,
    const std::optional<at::Tensor>& cx, at::TensorList weights,
    const std::optional<at::Tensor>& dropout_mask, int64_t num_layers, bool bidirectional,
    bool has_biases, int64_t proj_size) {
  const CallPlan call{settings, /*inference=*/true};
  ForwardArgs a = prepare_forward(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                                  bidirectional, has_biases, proj_size, /*with_reserve=*/false,
                                  call.asks(&CpuPlan::keep_16bit), /*may_drop_gates=*/false,
                                  call.asks(&CpuPlan::output_16bit),
                                  call.asks(&CpuPlan::fp16_kept_inference));
  const LSTMShape& s = a.shape;
  const CpuPlan plan = call.of(s, a.dtype);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = s.num_directions * s.out_size;
  // [T, B, D*out] == [rows, D*out]: in the call's 16-bit dtype where the plan says the steps
  // write it so (CpuPlan::output_16bit), else in the math dtype.
  const bool out16 = is_16bit(a.dtype) && plan.output_16bit;
  at::Tensor output = out16 ? at::empty(out_shape, a.hy.options().dtype(a.dtype))
                      : a.output.defined() ? a.output
                                           : at::empty(out_shape, a.hy.options());
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_inference_cpu", [&] {
    inference_impl<scalar_t>(plan, s, operand<scalar_t>(a.input), ptr_or_null<scalar_t>(a.hx),
                             ptr_or_null<scalar_t>(a.cx), a.weights,
                             ptr_or_null<scalar_t>(a.dropout_mask), a.hy.mutable_data_ptr<scalar_t>(),
                             a.cy.mutable_data_ptr<scalar_t>(),
                             out16 ? nullptr : output.mutable_data_ptr<scalar_t>(),
                             out16 ? output.mutable_data_ptr() : nullptr, a.dtype);
  });
  return {out16 ? output : in_dtype(output, a.dtype), in_dtype(a.hy, a.dtype),
          in_dtype(a.cy, a.dtype)};
}

// What nn.LSTM runs for the call in inference: at::lstm, with zeros for a state not given (as
// nn.LSTM makes them), no dropout, time-major; recording nothing for autograd (the op is
// called only where no gradient can flow, and its own kernels record nothing either).
Results3 aten_inference(const LSTMShape& s, const at::Tensor& input,
                        const std::optional<at::Tensor>& hx,
                        const std::optional<at::Tensor>& cx, at::TensorList weights) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t LD = s.num_layers * s.num_directions;
  const at::Tensor h0 = hx ? *hx : at::zeros({LD, s.batch, s.out_size}, input.options());
  const at::Tensor c0 = cx ? *cx : at::zeros({LD, s.batch, s.hidden_size}, input.options());
  auto [output, hy, cy] = at::lstm(input, {h0, c0}, weights, s.has_biases, s.num_layers,
                                   /*dropout=*/0.0, /*train=*/false, s.num_directions == 2,
                                   /*batch_first=*/false);
  // Contiguous, as the fake kernel (fused_lstm/ops.py) and our kernels give them.
  return {output.contiguous(), hy.contiguous(), cy.contiguous()};
}

// The floor's measurement (floor_rule.h): our call and at::lstm's, interleaved, the least wall time
// of each kept; where `other` is given (measures_other_split), our call with the other split of
// the steps too, and where `fusion` is (measures_other_fusion), with the other choice of the
// input projection, interleaved with them. The call's results are those of the implementation
// chosen, so that every call of the key, this one included, gives the same results.
template <typename Fused, typename Aten, typename Other, typename Fusion>
Results3 measure_floor(const FloorKey& key, const LSTMShape& s, const Fused& fused,
                       const Aten& aten, const Other* other, bool other_hidden,
                       const Fusion* fusion, bool other_fused) {
  FloorTimes t;
  t.batch = s.batch;
  t.seq_len = s.seq_len;
  t.other_split_measured = other != nullptr;
  t.other_split_hidden = other_hidden;
  t.other_fusion_measured = fusion != nullptr;
  t.other_fusion_fused = other_fused;
  Results3 fused_results, aten_results, other_results, fusion_results;
  double best_fused = 1e30, best_aten = 1e30, best_other = 1e30, best_fusion = 1e30;
  auto timed = [](const auto& run, Results3& results, double& best) {
    const auto t0 = std::chrono::steady_clock::now();
    results = run();
    best = std::min(best, wall_seconds_since(t0));
  };
  auto time_fused = [&] { timed(fused, fused_results, best_fused); };
  auto time_aten = [&] { timed(aten, aten_results, best_aten); };
  // The alternatives of ours, each where given.
  auto time_other = [&] {
    if (other != nullptr) timed(*other, other_results, best_other);
    if (fusion != nullptr) timed(*fusion, fusion_results, best_fusion);
  };
  auto best_ours = [&] { return std::min({best_fused, best_other, best_fusion}); };
  // Stops as soon as at::lstm, warm, is far behind (kFloorFarBehind): no further call can
  // change the choice, and a loaded machine can slow at::lstm's per-step parallel regions
  // several times. Not after its first call, which creates oneDNN's primitive and kernels.
  auto far_behind = [&] { return best_aten > kFloorFarBehind * best_ours(); };
  try {
    time_fused();  // the user's call (and the first of the shape: not a warm one)
    time_aten();   // the first of the shape too: creates oneDNN's primitive
    time_other();
    time_aten();
    t.samples = 1;
    t.aten_samples = 2;
    if (!far_behind()) {
      time_fused();
      time_other();
      t.samples = 2;
      if (!far_behind() && best_ours() < kFloorLongCallSeconds) {
        time_other();
        time_fused();
        time_aten();
        // at::lstm warms up over its first 3-4 calls of a shape (bf16 fastrnns on the Intel
        // Xeon, interleaved with ours: 30.9, 25.1, 22.5, 21.6 ms), ours over 2-3: a fourth,
        // then one more of each and two of at::lstm, warm (a quarter of the first-call
        // measurements there still took ours while at::lstm ran 8% faster from its third call
        // on: benchmarks/notes/floor.md, "More warm calls in the measurement").
        time_aten();
        time_fused();
        time_aten();
        time_other();
        time_aten();
        t.samples = 4;
        t.aten_samples = 6;
      }
    } else if (other != nullptr || fusion != nullptr) {
      time_fused();
      time_other();
      t.samples = 2;
    }
  } catch (...) {
    floor_abandon(key);
    throw;
  }
  t.fused_ms = best_fused * 1e3;
  t.aten_ms = best_aten * 1e3;
  t.other_split_ms = other != nullptr ? best_other * 1e3 : 0;
  t.other_fusion_ms = fusion != nullptr ? best_fusion * 1e3 : 0;
  t.measured = true;
  floor_store(key, t);
  if (floor_measured_faster(t)) return aten_results;
  switch (fused_best(t)) {
    case OursRuns::kOtherSplit: return other_results;
    case OursRuns::kOtherFusion: return fusion_results;
    default: return fused_results;
  }
}

// lstm_inference: our kernels, or at::lstm where the floor (floor_rule.h) runs the call.
Results3 lstm_inference_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size) {
  const CpuSettings settings = cpu_settings();
  const at::ScalarType dtype = input.scalar_type();
  // The floor's cheap conditions first: most calls skip the rest.
  if (settings.nn_lstm_floor != 1 && !batch_sizes.has_value() && !dropout_mask.has_value() &&
      proj_size == 0 && floor_dtype(dtype)) {
    const LSTMShape s = check_lstm_args(input, batch_sizes, hx, cx, weights, dropout_mask,
                                        num_layers, bidirectional, has_biases, proj_size);
    const CallPlan call{settings, /*inference=*/true};
    const CpuPlan plan = call.of(s, dtype);
    const FloorChoice c = floor_choice(plan, s, dtype, false, /*claim=*/true);
    auto fused_with = [&](const CpuSettings& st) {
      return fused_inference(st, input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                             bidirectional, has_biases, proj_size);
    };
    auto fused = [&] { return fused_with(settings); };
    auto aten = [&] { return aten_inference(s, input, hx, cx, weights); };
    if (c.run == FloorRun::kAten) return aten();
    if (c.run == FloorRun::kMeasure) {
      bool other_hidden = false, other_fused = false;
      const bool other_split = measures_other_split(plan, s, other_hidden);
      const bool other_fusion = measures_other_fusion(plan, s, other_fused);
      const CpuSettings split_settings = other_split_settings(settings, other_hidden);
      const CpuSettings fusion_settings = other_fusion_settings(settings, other_fused);
      auto other = [&] { return fused_with(split_settings); };
      auto fusion = [&] { return fused_with(fusion_settings); };
      return measure_floor(c.key, s, fused, aten, other_split ? &other : nullptr, other_hidden,
                           other_fusion ? &fusion : nullptr, other_fused);
    }
    if (fused_best(c.times) != OursRuns::kRule)
      return fused_with(settings_that_run(settings, c.times));
  }
  return fused_inference(settings, input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                         bidirectional, has_biases, proj_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_backward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& reserve, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
    int64_t num_layers, bool bidirectional, bool has_biases, int64_t proj_size,
    bool input_grad) {
  return cpu_backward(input, batch_sizes, hx, cx, weights, dropout_mask, reserve, grad_output,
                      grad_hy, grad_cy, num_layers, bidirectional, has_biases, proj_size,
                      input_grad, /*weight_grads_apart=*/false);
}

// The sizes of an LSTM and of a call's steps (batch_sizes: one per step, every step's batch or
// a packed sequence's batch sizes), for the ops below that plan a call from sizes alone.
LSTMShape shape_of_sizes(int64_t input_size, int64_t hidden_size, int64_t proj_size,
                         int64_t num_layers, bool bidirectional, bool has_biases,
                         std::vector<int64_t> batch_sizes) {
  LSTMShape s;
  s.num_layers = num_layers;
  s.num_directions = bidirectional ? 2 : 1;
  s.input_size = input_size;
  s.hidden_size = hidden_size;
  s.proj_size = proj_size;
  s.out_size = proj_size > 0 ? proj_size : hidden_size;
  s.has_biases = has_biases;
  s.seq_len = static_cast<int64_t>(batch_sizes.size());
  s.batch = batch_sizes.empty() ? 0 : batch_sizes[0];
  for (const int64_t b : batch_sizes) {
    s.step_offset.push_back(s.rows);
    s.rows += b;
  }
  s.packed = !batch_sizes.empty() && batch_sizes.front() != batch_sizes.back();
  s.batch_sizes = std::move(batch_sizes);
  return s;
}

// fused_lstm::cpu_plan: the plan of a call of these sizes, as describe() writes it
// (fused_lstm.explain reads it). batch_sizes: one per step (every step's batch, or a packed
// sequence's batch sizes).
std::string cpu_plan_op(int64_t input_size, int64_t hidden_size, int64_t proj_size,
                        int64_t num_layers, bool bidirectional, bool has_biases,
                        std::vector<int64_t> batch_sizes, at::ScalarType dtype, bool inference,
                        bool dropout) {
  TORCH_CHECK_VALUE(input_size >= 1 && hidden_size >= 1 && proj_size >= 0 &&
                        proj_size < hidden_size + (proj_size == 0) && num_layers >= 1 &&
                        !batch_sizes.empty(),
                    "fused_lstm::cpu_plan: bad sizes");
  LSTMShape s = shape_of_sizes(input_size, hidden_size, proj_size, num_layers, bidirectional,
                               has_biases, std::move(batch_sizes));
  s.gates_in_reserve = gates_in_reserve(s, dtype, /*cpu=*/true);
  const CpuSettings settings = cpu_settings();
  const CallPlan call{settings, inference};
  const CpuPlan plan = call.of(s, dtype);
  // Where the floor's measurement found the other split of the steps, or the other choice of
  // the input projection, faster, the call runs it (lstm_inference_cpu): described as it runs.
  const FloorChoice c = floor_choice(plan, s, dtype, dropout, /*claim=*/false);
  if (c.run == FloorRun::kFused && fused_best(c.times) != OursRuns::kRule) {
    const bool hidden = c.times.other_split_hidden;
    const CpuPlan runs = CallPlan{settings_that_run(settings, c.times), inference}.of(s, dtype);
    // The other choice of the projection runs the batch split in every layer
    // (other_fusion_settings turns the hidden split off, so `runs` names no split): named here
    // wherever the hidden split applies to the call.
    const bool other_split = other_split_measured_faster(c.times);
    const char* split = other_split                     ? (hidden ? "hidden" : "batch")
                        : hidden_split_applies(plan, s) ? "batch"
                                                        : nullptr;
    const char* why = other_split
        ? "measured faster end to end than the rule's split: step_split_times"
        : "the input projection's other choice, measured faster end to end "
          "(input_projection_times), runs the batch split";
    return describe(runs, s, split, why) + "\n" + describe_floor(plan, s, dtype, dropout);
  }
  return describe(plan, s) + "\n" + describe_floor(plan, s, dtype, dropout);
}

// Test hooks of the floor (tests/test_cpu_variants.py): _floor_record stores times for the key
// of a call of these sizes under the current settings and threads, as if measured (explain
// reports them as recorded by a test); _floor_forget empties the table.
void floor_record_op(int64_t input_size, int64_t hidden_size, int64_t num_layers,
                     bool bidirectional, bool has_biases, int64_t batch, int64_t seq_len,
                     at::ScalarType dtype, double fused_ms, double aten_ms,
                     double other_split_ms, double other_fusion_ms) {
  const LSTMShape s = shape_of_sizes(input_size, hidden_size, /*proj_size=*/0, num_layers,
                                     bidirectional, has_biases,
                                     std::vector<int64_t>(seq_len, batch));
  FloorTimes t;
  const CpuPlan plan = CallPlan{cpu_settings(), /*inference=*/true}.of(s, dtype);
  // As measured: a time of ours with another choice (ms >= 0) only where the measurement
  // times that choice.
  auto record_other = [](double ms, bool timed, const char* what, bool& measured, double& out) {
    if (ms < 0) return;
    TORCH_CHECK_VALUE(timed, "fused_lstm::_floor_record: the floor does not time ", what,
                      " for these sizes and settings");
    measured = true;
    out = ms;
  };
  record_other(other_split_ms, measures_other_split(plan, s, t.other_split_hidden),
               "the other split of the steps", t.other_split_measured, t.other_split_ms);
  record_other(other_fusion_ms, measures_other_fusion(plan, s, t.other_fusion_fused),
               "the other choice of the input projection", t.other_fusion_measured,
               t.other_fusion_ms);
  t.measured = t.injected = true;
  t.samples = t.aten_samples = 1;
  t.fused_ms = fused_ms;
  t.aten_ms = aten_ms;
  t.batch = batch;
  t.seq_len = seq_len;
  floor_store(floor_key(s, dtype, cpu_settings()), t);
}

int64_t hidden_split_chunks_op() { return hidden_split_chunks().load(); }
int64_t fused_projection_layers_op() { return fused_projection_layers().load(); }

// Test hooks (convert_16bit.h set_isa_level_cap): cap the vector ISA of the float16 conversions and the
// thin kernel, returning the cap before; the levels now in effect of the conversions and of the
// thin kernel (2 AVX-512, 1 AVX2, 0 baseline).
int64_t set_isa_level_cap_op(int64_t level) { return set_isa_level_cap(int(level)); }
int64_t isa_levels_op(int64_t which) {
  return which == 0 ? half_conversion_isa() : thin::pre_level();
}

// Test hook of the op boundary's conversions (convert_16bit.h): a bfloat16 or float16 CPU tensor (any
// strides) widened to float32 by widen_to_float, or a float32 one rounded to `dtype` by round_to.
at::Tensor convert_16bit_op(const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.is_cpu(), "fused_lstm::_convert_16bit: a CPU tensor");
  if (is_16bit(t.scalar_type())) {
    TORCH_CHECK_VALUE(dtype == at::kFloat, "fused_lstm::_convert_16bit: widens to float32");
    at::Tensor out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
    widen_to_float(t, out.mutable_data_ptr<float>());
    return out;
  }
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && is_16bit(dtype),
                    "fused_lstm::_convert_16bit: rounds float32 to bfloat16 or float16");
  const at::Tensor src = t.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(dtype));
  round_to(src.const_data_ptr<float>(), src.numel(), dtype, out.mutable_data_ptr());
  return out;
}

// alpha * op(A) op(B) + beta * C by small_gemm (blas.h), for the tests: A, B and C float32
// CPU matrices with unit column stride (their row strides as the leading dimensions). The
// result is a new [m, n] view with C's row stride, the columns past n of its rows NaN (the
// kernel must leave them so). Raises where this CPU or build has no such kernel.
at::Tensor small_gemm_op(const at::Tensor& a, bool trans_a, const at::Tensor& b, bool trans_b,
                         const at::Tensor& c, double alpha, double beta) {
  for (const at::Tensor* t : {&a, &b, &c})
    TORCH_CHECK_VALUE(t->is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 &&
                          t->stride(1) == 1,
                      "fused_lstm::_small_gemm: float32 CPU matrices with unit column stride");
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t n = trans_b ? b.size(0) : b.size(1);
  TORCH_CHECK_VALUE((trans_b ? b.size(1) : b.size(0)) == k && c.size(0) == m && c.size(1) == n,
                    "fused_lstm::_small_gemm: shapes do not agree");
  TORCH_CHECK(cpu_features().avx512, "fused_lstm::_small_gemm: this CPU has no AVX-512");
  const int64_t ldc = std::max<int64_t>(n, c.stride(0));
  at::Tensor out = at::full({m, ldc}, std::numeric_limits<float>::quiet_NaN(), c.options())
                       .narrow(1, 0, n);
  out.copy_(c);
  if (m == 0 || n == 0) return out;
  TORCH_CHECK(k > 0, "fused_lstm::_small_gemm: k = 0 is gemm's own case");
  TORCH_CHECK(small_gemm(trans_a, trans_b, m, n, k, static_cast<float>(alpha),
                         a.const_data_ptr<float>(), a.stride(0), b.const_data_ptr<float>(),
                         b.stride(0), static_cast<float>(beta), out.mutable_data_ptr<float>(),
                         out.stride(0)),
              "fused_lstm::_small_gemm: this build has no AVX-512 version, or an operand's "
              "stride is too large for it");
  return out;
}

// Test hooks of the libraries' rates on several threads (tests/test_cpu_variants.py):
// _library_rates_record stores rates for a thread count as if measured (GFLOP/s per class:
// A*B^T, A^T*B, A*B); _library_rates_forget empties the table (the next need measures again).
// (Forgetting frees entries a call in flight may be reading: for tests between calls only.)
void library_rates_record_op(int64_t threads, c10::ArrayRef<double> blas,
                             c10::ArrayRef<double> onednn) {
  TORCH_CHECK_VALUE(threads > 1 && blas.size() == kGemmClasses &&
                        onednn.size() == kGemmClasses,
                    "fused_lstm::_library_rates_record: threads > 1 and 3 rates each");
  LibraryRates r;
  for (int c = 0; c < kGemmClasses; ++c) {
    r.blas[c] = blas[c];
    r.onednn[c] = onednn[c];
  }
  r.measured = true;
  ThreadsRatesTable& table = threads_rates_table();
  std::lock_guard<std::mutex> lock(table.mutex);
  table.values[threads] = r;
}

void library_rates_forget_op() {
  ThreadsRatesTable& table = threads_rates_table();
  std::lock_guard<std::mutex> lock(table.mutex);
  table.values.clear();
}

void floor_forget_op() {
  FloorTable& table = floor_table();
  std::lock_guard<std::mutex> lock(table.mutex);
  table.times.clear();
}

}  // namespace

bool cpu_weight_grads_apart(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size) {
  const CpuSettings settings = cpu_settings();
  if (!settings.weight_grads_apart || !input.is_cpu()) return false;
  LSTMShape s;
  try {
    s = check_lstm_args(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                        bidirectional, has_biases, proj_size);
  } catch (const c10::Error&) {
    return false;  // the op's forward raises its own error for these arguments, in its order
  }
  s.gates_in_reserve = gates_in_reserve(s, input.scalar_type(), /*cpu=*/true);
  return plan_cpu(s, settings, input.scalar_type(), /*inference=*/false).weight_grads_apart;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> cpu_backward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& reserve, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
    int64_t num_layers, bool bidirectional, bool has_biases, int64_t proj_size,
    bool input_grad, bool weight_grads_apart, bool state_grad) {
  const CallPlan call{cpu_settings(), /*inference=*/false};
  // (Factors only where the plan, as made now, says so.)
  BackwardArgs a = prepare_backward(input, batch_sizes, hx, cx, weights, dropout_mask, reserve,
                                    grad_output, grad_hy, grad_cy, num_layers, bidirectional,
                                    has_biases, proj_size, call.asks(&CpuPlan::keep_16bit),
                                    call.asks(&CpuPlan::backward_widens_16bit),
                                    /*may_drop_gates=*/true, call.asks(&CpuPlan::grads_16bit),
                                    call.asks(&CpuPlan::fp16_kept_training), input_grad,
                                    weight_grads_apart ? call.asks(&CpuPlan::weight_grads_apart)
                                                       : nullptr);
  const CpuPlan plan = call.of(a.shape, a.dtype);
  // A float16 grad_input (prepare_backward: written by the kernels in chunks) or the math
  // dtype's; or none (input_grad false: the kernels get null and compute no dL/dx of layer 0).
  const bool grad_input_16bit = input_grad && a.grad_input.scalar_type() != a.math;
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_backward_cpu", [&] {
    backward_impl<scalar_t>(
        plan, a.shape, operand<scalar_t>(a.input), ptr_or_null<scalar_t>(a.hx),
        ptr_or_null<scalar_t>(a.cx), a.weights, ptr_or_null<scalar_t>(a.dropout_mask),
        a.reserve.const_data_ptr<scalar_t>(), operand<scalar_t>(a.grad_output),
        ptr_or_null<scalar_t>(a.grad_hy), ptr_or_null<scalar_t>(a.grad_cy),
        grad_input_16bit || !input_grad ? nullptr : a.grad_input.mutable_data_ptr<scalar_t>(),
        a.grad_hx.mutable_data_ptr<scalar_t>(), a.grad_cx.mutable_data_ptr<scalar_t>(),
        a.grad_weights, grad_input_16bit ? a.grad_input.mutable_data_ptr() : nullptr,
        a.weight_grads_apart, state_grad);
  });
  return finish_backward(a, weights);
}

// The float32 sums a 16-bit gradient made from its factors holds per thread (64 KB): a block
// of its rows at a time (at hidden 256, 64 of W_hh's 1,024 rows).
constexpr int64_t kApartBlockFloats = 1 << 14;

at::Tensor weight_grad_from_factors(const at::Tensor& factors, int64_t G, int64_t in,
                                    int64_t out, bool w_ih, at::ScalarType dtype) {
  const int64_t columns = G + in + out;
  TORCH_INTERNAL_ASSERT(factors.scalar_type() == at::kFloat && factors.is_contiguous() &&
                        factors.dim() == 1 && factors.numel() % columns == 0);
  const int64_t rows = factors.numel() / columns, N = w_ih ? in : out;
  const float* dg = factors.const_data_ptr<float>();  // [rows, G]
  const float* x = dg + rows * G + (w_ih ? 0 : rows * in);  // [rows, N]
  at::Tensor grad = at::empty({G, N}, factors.options().dtype(dtype));
  if (rows <= kThinMaxBatch) {  // the few-row backward's outer products (the same bits)
    const float* x_rows[kThinMaxBatch];
    for (int64_t r = 0; r < rows; ++r) x_rows[r] = x + r * N;
    few_rows_outer(rows, G, N, dg, G, x_rows, grad);
    return grad;
  }
  // From 9 rows only a float16 model takes its gradients apart (plan.h apart_rows): blocks of
  // the gradient's rows summed in float32 into a small buffer and rounded (round_to, as
  // finish_backward rounds the op's), not a float32 gradient of every row.
  TORCH_INTERNAL_ASSERT(is_16bit(dtype));
  auto* out16 = static_cast<uint16_t*>(grad.mutable_data_ptr());
  const int64_t block = std::max<int64_t>(16, std::min<int64_t>(G, kApartBlockFloats / N));
  auto blocks = [&](int64_t b0, int64_t b1) {
    std::vector<float> sums(static_cast<size_t>(block * N));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g0 = b * block, gb = std::min(block, G - g0);
      gemm<float>(true, false, gb, N, rows, 1.0f, dg + g0, G, x, N, 0.0f, sums.data(), N);
      round_to(sums.data(), gb * N, dtype, out16 + g0 * N);
    }
  };
  const int64_t n_blocks = (G + block - 1) / block;
  if (n_blocks > 1 && G * N * rows >= kParallelElements && !at::in_parallel_region())
    at::parallel_for(0, n_blocks, 1, blocks);
  else
    blocks(0, n_blocks);
  return grad;
}

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  m.def("cpu_plan(int input_size, int hidden_size, int proj_size, int num_layers, "
        "bool bidirectional, bool has_biases, int[] batch_sizes, ScalarType dtype, "
        "bool inference, bool dropout=False) -> str",
        &cpu_plan_op);
  m.def("_floor_record(int input_size, int hidden_size, int num_layers, bool bidirectional, "
        "bool has_biases, int batch, int seq_len, ScalarType dtype, float fused_ms, "
        "float aten_ms, float other_split_ms=-1, float other_fusion_ms=-1) -> ()",
        &floor_record_op);
  m.def("_floor_forget() -> ()", &floor_forget_op);
  m.def("_library_rates_record(int threads, float[] blas, float[] onednn) -> ()",
        &library_rates_record_op);
  m.def("_library_rates_forget() -> ()", &library_rates_forget_op);
  m.def("_hidden_split_chunks() -> int", &hidden_split_chunks_op);
  m.def("_fused_projection_layers() -> int", &fused_projection_layers_op);
  m.def("_set_isa_level_cap(int level) -> int", &set_isa_level_cap_op);
  m.def("_isa_level(int which) -> int", &isa_levels_op);
  m.def("_convert_16bit(Tensor t, ScalarType dtype) -> Tensor", &convert_16bit_op);
  m.def("_empty_buffer_cache() -> ()", &empty_buffer_cache);
  m.def("_small_gemm(Tensor a, bool trans_a, Tensor b, bool trans_b, Tensor c, float alpha, "
        "float beta) -> Tensor",
        &small_gemm_op);
}

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_inference", &lstm_inference_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace fused_lstm
