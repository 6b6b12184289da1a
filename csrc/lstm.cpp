// The op boundary every backend shares: the argument checks, and the arguments and results
// in the math dtype (prepare_forward / finish_forward, prepare_backward / finish_backward).
// The schemas are in ops.cpp.
#include "lstm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/SmallVector.h>

#include <cstring>

namespace fused_lstm {

namespace {

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(
      t.scalar_type() == ref.scalar_type(),
      "fused_lstm: ", name, " dtype (", t.scalar_type(), ") does not match input dtype (",
      ref.scalar_type(), ")");
  TORCH_CHECK(
      t.device() == ref.device(),
      "fused_lstm: ", name, " is on ", t.device(), " but input is on ", ref.device());
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(
      t.sizes() == expected,
      "fused_lstm: expected ", name, " of size ", expected, ", got ", t.sizes());
}

}  // namespace

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
    int64_t proj_size) {
  LSTMShape s;
  s.num_layers = num_layers;
  s.num_directions = bidirectional ? 2 : 1;
  s.has_biases = has_biases;
  s.proj_size = proj_size;
  s.packed = batch_sizes.has_value();
  TORCH_CHECK_VALUE(num_layers > 0, "fused_lstm: num_layers must be positive, got ", num_layers);
  TORCH_CHECK_VALUE(proj_size >= 0, "fused_lstm: proj_size must be >= 0, got ", proj_size);
  TORCH_CHECK(
      static_cast<int64_t>(weights.size()) ==
          num_layers * s.num_directions * s.weights_per_direction(),
      "fused_lstm: expected ", num_layers * s.num_directions * s.weights_per_direction(),
      " weight tensors, got ", weights.size());
  TORCH_CHECK_VALUE(
      at::isFloatingType(input.scalar_type()),
      "fused_lstm: input must be a floating point tensor, got ", input.scalar_type());

  const at::Tensor& w_ih0 = weights[0];
  TORCH_CHECK(w_ih0.dim() == 2, "fused_lstm: weight_ih_l0 must be 2-D, got ", w_ih0.dim(), "-D");
  TORCH_CHECK(
      w_ih0.size(0) % 4 == 0 && w_ih0.size(0) > 0,
      "fused_lstm: weight_ih_l0 has ", w_ih0.size(0), " rows, expected 4 * hidden_size");
  s.hidden_size = w_ih0.size(0) / 4;
  s.input_size = w_ih0.size(1);
  TORCH_CHECK_VALUE(
      proj_size < s.hidden_size, "fused_lstm: proj_size (", proj_size,
      ") has to be smaller than hidden_size (", s.hidden_size, ")");
  s.out_size = proj_size > 0 ? proj_size : s.hidden_size;

  // Input: [T, B, I] or packed [rows, I].
  if (s.packed) {
    TORCH_CHECK(input.dim() == 2, "fused_lstm: packed input must have 2 dimensions, got ", input.dim());
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(
        bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
        "fused_lstm: batch_sizes must be a 1-D int64 CPU tensor");
    TORCH_CHECK(bs.numel() > 0, "fused_lstm: batch_sizes must not be empty");
    const at::Tensor bsc = bs.contiguous();
    const int64_t* p = bsc.const_data_ptr<int64_t>();
    s.seq_len = bs.numel();
    s.batch_sizes.assign(p, p + s.seq_len);
    int64_t rows = 0;
    for (int64_t t = 0; t < s.seq_len; ++t) {
      TORCH_CHECK(
          s.batch_sizes[t] > 0 && (t == 0 || s.batch_sizes[t] <= s.batch_sizes[t - 1]),
          "fused_lstm: batch_sizes must be positive and non-increasing; batch_sizes[", t, "] = ",
          s.batch_sizes[t]);
      s.step_offset.push_back(rows);
      rows += s.batch_sizes[t];
    }
    TORCH_CHECK(
        rows == input.size(0), "fused_lstm: batch_sizes sum to ", rows,
        " but packed input has ", input.size(0), " rows");
    s.rows = rows;
    s.batch = s.batch_sizes[0];
  } else {
    TORCH_CHECK(input.dim() == 3, "fused_lstm: input must have 3 dimensions [T, B, I], got ", input.dim());
    s.seq_len = input.size(0);
    s.batch = input.size(1);
    TORCH_CHECK(s.seq_len > 0, "fused_lstm: Expected sequence length to be larger than 0 in RNN, got ", s.seq_len);
    s.batch_sizes.assign(s.seq_len, s.batch);
    for (int64_t t = 0; t < s.seq_len; ++t) s.step_offset.push_back(t * s.batch);
    s.rows = s.seq_len * s.batch;
  }
  TORCH_CHECK(
      input.size(-1) == s.input_size, "fused_lstm: input.size(-1) must be equal to input_size. Expected ",
      s.input_size, ", got ", input.size(-1));

  // Weights, in nn.LSTM's _flat_weights order.
  const int64_t G = 4 * s.hidden_size;
  for (int64_t l = 0; l < num_layers; ++l) {
    for (int64_t d = 0; d < s.num_directions; ++d) {
      const int64_t w = s.weight_index(l, d);
      check_shape(weights[w], {G, s.layer_input_size(l)}, "weight_ih");
      check_shape(weights[w + 1], {G, s.out_size}, "weight_hh");
      int64_t next = w + 2;
      if (has_biases) {
        check_shape(weights[next], {G}, "bias_ih");
        check_shape(weights[next + 1], {G}, "bias_hh");
        next += 2;
      }
      if (proj_size > 0) check_shape(weights[next], {s.out_size, s.hidden_size}, "weight_hr");
    }
  }
  for (const auto& w : weights) check_same(w, input, "weight");

  const int64_t LD = num_layers * s.num_directions;
  if (hx.has_value()) {
    check_same(*hx, input, "hx");
    check_shape(*hx, {LD, s.batch, s.out_size}, "hx");
  }
  if (cx.has_value()) {
    check_same(*cx, input, "cx");
    check_shape(*cx, {LD, s.batch, s.hidden_size}, "cx");
  }
  if (dropout_mask.has_value()) {
    check_same(*dropout_mask, input, "dropout_mask");
    TORCH_CHECK(num_layers > 1, "fused_lstm: dropout_mask given for a single-layer LSTM");
    std::vector<int64_t> mask_shape{num_layers - 1};
    for (int64_t i = 0; i < input.dim() - 1; ++i) mask_shape.push_back(input.size(i));
    mask_shape.push_back(s.num_directions * s.out_size);
    check_shape(*dropout_mask, mask_shape, "dropout_mask");
  }
  return s;
}

void check_lstm_backward_args(
    const LSTMShape& s,
    const at::Tensor& input,
    const at::Tensor& reserve,
    const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy) {
  TORCH_CHECK(
      reserve.dim() == 1 && reserve.numel() == s.reserve_numel(),
      "fused_lstm: reserve has ", reserve.numel(), " elements, expected ", s.reserve_numel(),
      " (was it produced by lstm_forward with the same arguments?)");
  TORCH_CHECK(reserve.device() == input.device(), "fused_lstm: reserve is on the wrong device");
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = s.num_directions * s.out_size;
  const int64_t LD = s.num_layers * s.num_directions;
  if (grad_output.has_value()) check_shape(*grad_output, out_shape, "grad_output");
  if (grad_hy.has_value()) check_shape(*grad_hy, {LD, s.batch, s.out_size}, "grad_hy");
  if (grad_cy.has_value()) check_shape(*grad_cy, {LD, s.batch, s.hidden_size}, "grad_cy");
}

namespace {

at::ScalarType math_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// Tensors usually arrive in the math dtype and contiguous: return them without a dispatcher
// call (`to` and `contiguous` cost ~0.2 us each, and a call converts up to a dozen tensors).
at::Tensor to_math(const at::Tensor& t, at::ScalarType math) {
  if (t.scalar_type() == math && t.is_contiguous()) return t;
  return t.to(math).contiguous();
}

// The TensorImpls of the float views of 16-bit calls' scratch buffers (ToMath), kept per
// thread: a call at the tutorial sizes makes a dozen views (the input, each weight and bias,
// the state and the results), and allocating, constructing and freeing a dozen TensorImpls cost
// ~0.9 us of a ~14 us bf16 call (benchmarks/notes/bf16.md, "Views of the scratch buffer
// reused"). A pooled TensorImpl is reused only while nothing but the pool holds it; its hold on
// the buffer ends with the op call that made the view (ViewLease), so the buffer is freed when
// the call ends, as before.
class ViewPool {
 public:
  // A contiguous float tensor of `sizes` viewing buf from element `offset`, made without a
  // dispatcher call (it shares buf's storage; internal to one op call, never returned).
  at::Tensor take(const at::Tensor& buf, int64_t offset, at::IntArrayRef sizes) {
    c10::TensorImpl* impl = nullptr;
    for (size_t tried = 0; tried < impls_.size() && impl == nullptr; ++tried) {
      next_ = next_ + 1 < impls_.size() ? next_ + 1 : 0;
      if (impls_[next_].use_count() == 1) impl = impls_[next_].get();
    }
    if (impl == nullptr) {
      impls_.push_back(c10::make_intrusive<c10::TensorImpl>(
          c10::Storage(buf.storage()), c10::DispatchKeySet(c10::DispatchKey::CPU), buf.dtype()));
      next_ = impls_.size() - 1;
      impl = impls_.back().get();
    } else {
      impl->set_storage_keep_dtype(buf.storage());
    }
    impl->set_sizes_contiguous(sizes);
    impl->set_storage_offset(buf.storage_offset() + offset);
    return at::Tensor(impls_[next_]);
  }

  // The pool lets go of the buffers of the views that nothing else holds any more.
  void release() {
    for (auto& impl : impls_)
      if (impl.use_count() == 1) impl->set_storage_keep_dtype(empty_.storage());
  }

 private:
  // An empty CPU storage for the views not in use to hold.
  at::Tensor empty_ = at::empty({0}, at::kFloat);
  std::vector<c10::intrusive_ptr<c10::TensorImpl>> impls_;
  size_t next_ = 0;
};

ViewPool& view_pool() {
  thread_local ViewPool pool;
  return pool;
}

// The scratch buffer of a 16-bit call at the tutorial sizes (at most kFloats floats), kept per
// thread: a fresh one is a ~11 KB malloc per call at seed-tiny, which glibc serves from its
// large bins after consolidating the fast ones (~0.3 us of a ~14 us call; benchmarks/notes/
// bf16.md, "Views of the scratch buffer reused"). As the CPU buffer cache does for its blocks
// (buffer_cache.cpp), the profiler is told of the part a call uses when the call takes it and
// when the call ends (release, by the ViewLease), so profiled memory counts it as the call's.
class SmallScratch {
 public:
  static constexpr int64_t kFloats = 16384;

  // The buffer for `numel` floats; undefined where it is too small or still in use (a call
  // made while another call's views of it are alive on this thread).
  at::Tensor take(int64_t numel) {
    if (numel > kFloats || bytes_ > 0) return {};
    if (!buf_.defined())
      buf_ = at::from_blob(
          c10::alloc_cpu(kFloats * sizeof(float)), {kFloats}, [](void* p) { c10::free_cpu(p); },
          at::TensorOptions().dtype(at::kFloat));
    bytes_ = numel * static_cast<int64_t>(sizeof(float));
    report(+bytes_);
    return buf_;
  }

  // The call that took the buffer has ended: free for the next, once no view of it is left
  // (ViewPool::release has run; a view held elsewhere keeps it taken).
  void release() {
    if (bytes_ == 0 || buf_.storage().use_count() != 1) return;
    report(-bytes_);
    bytes_ = 0;
  }

 private:
  void report(int64_t delta) const {
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(buf_.data_ptr(), delta, 0, 0, c10::Device(c10::kCPU));
  }
  at::Tensor buf_;
  int64_t bytes_ = 0;  // taken by a call (its size), else 0
};

SmallScratch& small_scratch() {
  thread_local SmallScratch scratch;
  return scratch;
}

// A call's tensors in the math dtype (contiguous), as to_math gives them, except that CPU
// bfloat16 and float16 tensors bound for float32 are not converted one ATen op each (~1 us per
// tensor, a dozen per call: at the small sizes more than the kernels): they are queued, and
// finish() widens all of them by one loop each into one scratch buffer that their results
// view. The same values as to_math's (widening is exact).
class ToMath {
 public:
  explicit ToMath(at::ScalarType math) : math_(math) {}

  // out = t in the math dtype, now or at finish(); `t` and `out` must outlive finish().
  void operator()(const at::Tensor& t, at::Tensor& out) {
    if (is_16bit(t.scalar_type()) && math_ == at::kFloat && t.is_cpu()) {
      pending_.emplace_back(&t, &out);
      numel_ += t.numel();
      return;
    }
    out = to_math(t, math_);
  }
  void operator()(const std::optional<at::Tensor>& t, at::Tensor& out) {
    if (t.has_value()) (*this)(*t, out);
  }

  // Whether finish() makes a scratch buffer (there are CPU 16-bit tensors to widen).
  bool widens() const { return !pending_.empty(); }

  // Where widens(): out = uninitialised floats of `sizes` in finish()'s scratch buffer too. For
  // the results that the kernels fill in float32 and the op returns rounded (a copy,
  // in_dtype), so they cost no allocation of their own.
  void scratch_result(at::Tensor& out, at::IntArrayRef sizes) {
    TORCH_INTERNAL_ASSERT(widens());
    int64_t numel = 1;
    for (const int64_t n : sizes) numel *= n;
    results_.emplace_back(&out, Sizes(sizes.begin(), sizes.end()));
    numel_ += numel;
  }

  void finish() {
    if (pending_.empty()) return;
    at::Tensor buf = small_scratch().take(numel_);
    if (!buf.defined()) buf = cpu_cached_empty(numel_, at::kFloat);
    float* p = buf.mutable_data_ptr<float>();
    int64_t offset = 0;
    for (const auto& [src, out] : pending_) {
      widen_to_float(*src, p + offset);
      *out = view_pool().take(buf, offset, src->sizes());
      offset += src->numel();
    }
    for (const auto& [out, sizes] : results_) {
      *out = view_pool().take(buf, offset, sizes);
      offset += out->numel();
    }
    pending_.clear();
    results_.clear();
  }

 private:
  // Inline room for a call's tensors (up to a dozen, and up to a dozen results in the
  // backward): no heap allocation per entry (a 16-bit call at the tutorial sizes is a few us).
  using Sizes = c10::SmallVector<int64_t, 4>;
  at::ScalarType math_;
  c10::SmallVector<std::pair<const at::Tensor*, at::Tensor*>, 16> pending_;
  c10::SmallVector<std::pair<at::Tensor*, Sizes>, 16> results_;
  int64_t numel_ = 0;
};

// Whether a call keeps its 16-bit tensors as given (lstm.h, Keep16).
bool keeps_16bit(const LSTMShape& s, const at::Tensor& input, const Keep16& keep) {
  return is_16bit(input.scalar_type()) && input.is_cpu() && keep != nullptr &&
         keep(s, input.scalar_type());
}

// The input and W_ih / W_hh as the kernels read them: kept as given (contiguous) where `keep`
// (W_ih / W_hh also where `keep_weights`), else in the math dtype (through `convert`). A kept
// input that is not contiguous (batch_first) is widened with the rest rather than copied by an
// ATen op: the kernels that read 16-bit operands read float32 ones too (Operand), with the same
// products (widening is exact).
void convert_input_and_weights(const LSTMShape& s, const at::Tensor& input,
                               at::TensorList weights, ToMath& convert, bool keep,
                               bool keep_weights, at::Tensor& input_out,
                               std::vector<at::Tensor>& weights_out) {
  if (keep && input.is_contiguous()) input_out = input;
  else convert(input, input_out);
  // Sized first: `convert` may fill an element at its finish().
  weights_out.resize(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    if ((keep || keep_weights) && s.is_w_ih_or_w_hh(i)) weights_out[i] = weights[i].contiguous();
    else convert(weights[i], weights_out[i]);
  }
}

void check_supported_dtype(const at::Tensor& input) {
  const auto st = input.scalar_type();
  TORCH_CHECK_VALUE(
      st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
      "fused_lstm: supported dtypes are float32, float64, bfloat16 and float16, got ", st);
}

}  // namespace

ViewLease::~ViewLease() {
  if (!active_) return;
  view_pool().release();
  small_scratch().release();
}

ForwardArgs prepare_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size, bool with_reserve,
    Keep16 keep, bool may_drop_gates, Keep16 output_in_dtype, Keep16 keep_half_input) {
  ForwardArgs a;
  a.shape = check_lstm_args(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                            bidirectional, has_biases, proj_size);
  if (may_drop_gates)
    a.shape.gates_in_reserve = gates_in_reserve(a.shape, input.scalar_type(), input.is_cpu());
  check_supported_dtype(input);
  const LSTMShape& s = a.shape;
  a.dtype = input.scalar_type();
  a.math = math_type(a.dtype);
  ToMath convert(a.math);
  // A float16 call keeps its weights only (lstm.h), and its input where `keep_half_input`.
  const bool kept = keeps_16bit(s, input, keep), half = a.dtype == at::kHalf;
  const bool keep_input = kept && (!half || keeps_16bit(s, input, keep_half_input));
  convert_input_and_weights(s, input, weights, convert, keep_input, kept && half, a.input,
                            a.weights);
  convert(hx, a.hx);
  convert(cx, a.cx);
  convert(dropout_mask, a.dropout_mask);
  const int64_t LD = s.num_layers * s.num_directions;
  if (convert.widens()) {  // a CPU 16-bit call: its float32 results returned rounded
    TORCH_INTERNAL_ASSERT(is_16bit(a.dtype));
    convert.scratch_result(a.hy, {LD, s.batch, s.out_size});
    convert.scratch_result(a.cy, {LD, s.batch, s.hidden_size});
    if (!with_reserve && !keeps_16bit(s, input, output_in_dtype)) {
      c10::SmallVector<int64_t, 4> out_shape(input.sizes().begin(), input.sizes().end());
      out_shape.back() = s.num_directions * s.out_size;
      convert.scratch_result(a.output, out_shape);
    }
  }
  if (convert.widens()) a.lease.hold();  // the views' TensorImpls go back at the call's end
  convert.finish();
  const auto opts = input.options().dtype(a.math);
  if (!a.hy.defined()) a.hy = at::empty({LD, s.batch, s.out_size}, opts);
  if (!a.cy.defined()) a.cy = at::empty({LD, s.batch, s.hidden_size}, opts);
  if (with_reserve)
    a.reserve = input.is_cpu() ? cpu_cached_empty(s.reserve_numel(), a.math)
                               : at::empty({s.reserve_numel()}, opts);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_forward(const ForwardArgs& a) {
  const LSTMShape& s = a.shape;
  std::vector<int64_t> out_shape(a.input.sizes().begin(), a.input.sizes().end());
  out_shape.back() = s.num_directions * s.out_size;
  const int64_t offset = s.layer_out_offset(s.num_layers - 1);
  const int64_t numel = s.rows * s.num_directions * s.out_size;
  // A copy even in the math dtype: an output must not alias the reserve.
  at::Tensor output;
  if (is_16bit(a.dtype) && a.math == at::kFloat && a.reserve.is_cpu()) {
    output = at::empty(out_shape, a.reserve.options().dtype(a.dtype));
    round_to(a.reserve.const_data_ptr<float>() + offset, numel, a.dtype,
             output.mutable_data_ptr());
  } else if (a.reserve.is_cpu() && a.dtype == a.math) {
    // A plain copy: `to(copy=true)` dispatches four ops (to, _to_copy, empty_strided, copy_),
    // ~1 us of a ~100 us training call at the tutorial sizes
    // (benchmarks/notes/python-overhead.md, "Allocations and copies per training call").
    output = at::empty(out_shape, a.reserve.options());
    std::memcpy(output.mutable_data_ptr(),
                static_cast<const char*>(a.reserve.const_data_ptr()) +
                    offset * a.reserve.element_size(),
                static_cast<size_t>(numel) * a.reserve.element_size());
  } else {
    output = a.reserve.narrow(0, offset, numel)
                 .view(out_shape)
                 .to(a.dtype, /*non_blocking=*/false, /*copy=*/true);
  }
  return {output, in_dtype(a.hy, a.dtype), in_dtype(a.cy, a.dtype), a.reserve};
}

BackwardArgs prepare_backward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& reserve, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
    int64_t num_layers, bool bidirectional, bool has_biases, int64_t proj_size,
    Keep16 keep_16bit, Keep16 keep_16bit_weights, bool may_drop_gates, Keep16 grads_16bit,
    Keep16 keep_half_input, bool input_grad, Keep16 weight_grads_apart) {
  BackwardArgs a;
  a.shape = check_lstm_args(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                            bidirectional, has_biases, proj_size);
  if (may_drop_gates)
    a.shape.gates_in_reserve = gates_in_reserve(a.shape, input.scalar_type(), input.is_cpu());
  check_supported_dtype(input);
  check_lstm_backward_args(a.shape, input, reserve, grad_output, grad_hy, grad_cy);
  const LSTMShape& s = a.shape;
  a.dtype = input.scalar_type();
  a.math = math_type(a.dtype);
  TORCH_CHECK(reserve.scalar_type() == a.math, "fused_lstm: reserve has dtype ",
              reserve.scalar_type(), ", expected ", a.math);
  // (A float16 call keeps its weights: keep_16bit_weights, or keep_16bit as in
  // prepare_forward; and its input and upstream gradient only where keep_half_input.)
  const bool keep = keeps_16bit(s, input, keep_16bit) &&
                    (a.dtype == at::kBFloat16 || keeps_16bit(s, input, keep_half_input));
  ToMath convert(a.math);
  const bool keep_weights = keeps_16bit(s, input, keep_16bit_weights) ||
                            (a.dtype == at::kHalf && keeps_16bit(s, input, keep_16bit));
  convert_input_and_weights(s, input, weights, convert, keep, keep_weights, a.input, a.weights);
  convert(hx, a.hx);
  convert(cx, a.cx);
  convert(dropout_mask, a.dropout_mask);
  a.reserve = reserve.contiguous();
  if (keep && grad_output.has_value() && grad_output->is_contiguous()) a.grad_output = *grad_output;
  else convert(grad_output, a.grad_output);
  convert(grad_hy, a.grad_hy);
  convert(grad_cy, a.grad_cy);
  const int64_t LD = s.num_layers * s.num_directions;
  a.grad_weights.resize(weights.size());
  // W_ih's and W_hh's gradients in the model's 16-bit dtype, written so by the kernels
  // (grads_16bit: returned as they are, no float32 copy).
  const bool grads_in_dtype = keeps_16bit(s, input, grads_16bit);
  // W_ih's and W_hh's factors instead of their gradients (weight_grads_apart, where the backend
  // says so for this shape): one float32 tensor per layer and direction, which its W_ih and
  // W_hh entries share (lstm.h apart_factors_numel).
  a.weight_grads_apart = weight_grads_apart != nullptr && weight_grads_apart(s, a.dtype);
  if (a.weight_grads_apart) {
    for (int64_t l = 0; l < s.num_layers; ++l)
      for (int64_t d = 0; d < s.num_directions; ++d) {
        const int64_t k = s.weight_index(l, d);
        a.grad_weights[k] = a.grad_weights[k + 1] =
            at::empty({apart_factors_numel(s, l)}, input.options().dtype(at::kFloat));
      }
  } else if (grads_in_dtype) {
    for (size_t i = 0; i < weights.size(); ++i)
      if (s.is_w_ih_or_w_hh(i))
        a.grad_weights[i] = at::empty(weights[i].sizes(), weights[i].options());
  }
  // A CPU 16-bit call: its float32 results returned rounded, in the scratch buffer. Except
  // where the op keeps bf16 operands (the bf16 products: sizes where an allocation per result
  // costs nothing that shows): there each gradient keeps a tensor of its own, one allocation of
  // its size, which tests/test_production.py counts to show that no float copy of the input or
  // the weights is made.
  const bool widens = convert.widens();
  if (widens && !keep) {
    TORCH_INTERNAL_ASSERT(is_16bit(a.dtype));
    if (!keep_weights)  // else each its own buffer, released one by one in finish_backward
      for (size_t i = 0; i < weights.size(); ++i)
        if (!a.grad_weights[i].defined())
          convert.scratch_result(a.grad_weights[i], weights[i].sizes());
    if (input_grad) convert.scratch_result(a.grad_input, input.sizes());
    convert.scratch_result(a.grad_hx, {LD, s.batch, s.out_size});
    convert.scratch_result(a.grad_cx, {LD, s.batch, s.hidden_size});
  }
  if (convert.widens()) a.lease.hold();  // the views' TensorImpls go back at the call's end
  convert.finish();
  const auto opts = input.options().dtype(a.math);
  // The float32 weight gradients that a CPU 16-bit call rounds and releases one by one
  // (keep_weights): recycled blocks, not fresh pages faulted in on every call
  // (benchmarks/notes/fp16.md, "Few-row training").
  const bool recycle = widens && keep_weights && !keep;
  for (size_t i = 0; i < weights.size(); ++i)
    if (!a.grad_weights[i].defined())
      a.grad_weights[i] = recycle ? cpu_cached_empty(weights[i].numel(), a.math)
                                        .view(weights[i].sizes())
                                  : at::empty(weights[i].sizes(), opts);
  // grad_input: none without input_grad (the schema's empty [0]); in float16 for a
  // one-direction float16 call whose input the op keeps (the CPU kernels round a chunk of rows
  // at a time into it; two directions add into float32 sums first).
  if (!input_grad) a.grad_input = at::empty({0}, opts);
  else if (keep && a.dtype == at::kHalf && s.num_directions == 1)
    a.grad_input = at::empty(input.sizes(), input.options());  // (contiguous)
  if (!a.grad_input.defined()) a.grad_input = at::empty(input.sizes(), opts);
  if (!a.grad_hx.defined()) a.grad_hx = at::empty({LD, s.batch, s.out_size}, opts);
  if (!a.grad_cx.defined()) a.grad_cx = at::empty({LD, s.batch, s.hidden_size}, opts);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> finish_backward(
    BackwardArgs& a, at::TensorList weights) {
  // The converted inputs are done with; each math-dtype weight gradient is released as soon as
  // it is converted, so that the conversions never hold every gradient twice (a bfloat16
  // model's float32 gradients and their bf16 copies: benchmarks/notes/memory.md, "bf16
  // training at the small sizes").
  a.input = a.hx = a.cx = a.dropout_mask = a.reserve = a.grad_output = a.grad_hy = a.grad_cy =
      at::Tensor();
  a.weights.clear();
  std::vector<at::Tensor> grad_weights;
  grad_weights.reserve(a.grad_weights.size());
  for (size_t i = 0; i < a.grad_weights.size(); ++i) {
    const bool factors = a.weight_grads_apart && a.shape.is_w_ih_or_w_hh(i);
    grad_weights.push_back(factors ? a.grad_weights[i]
                                   : in_dtype(a.grad_weights[i], weights[i].scalar_type()));
    a.grad_weights[i] = at::Tensor();
  }
  return {in_dtype(a.grad_input, a.dtype), in_dtype(a.grad_hx, a.dtype),
          in_dtype(a.grad_cx, a.dtype), grad_weights};
}

}  // namespace fused_lstm
