// CPU kernels of fused_lstm::lstm_forward / lstm_backward.
//
// Per layer and direction (Appleyard et al. 2016):
//   forward:  gates[rows, 4H] = x W_ih^T + b_ih + b_hh      (one GEMM over every step)
//             per step t: gates_t += h_{t-1} W_hh^T          (BLAS, straight into the reserve)
//                         one fused pass: activations, c_t, h_t (lstm_cell.h)
//                         [proj] h_t = (o * tanh c_t) W_hr^T  (BLAS)
//   backward: per step, in reverse: one fused pass -> d(gates)_t, dh_{t-1} = d(gates)_t W_hh
//             then dW_ih, dW_hh, dW_hr, db, dx as a few large GEMMs over every step.
// Nothing is allocated per time step: buffers are allocated once per call and BLAS is called
// on raw pointers. Everything runs in the math dtype (float for float/bfloat16, double for
// double); bfloat16 tensors are converted at the op's boundary.
#include "../lstm.h"
#include "../lstm_cell.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace fused_lstm {
namespace {

// BLAS: libtorch_cpu exports the Fortran sgemm_/dgemm_ of the BLAS it links (MKL on x86).
// Declared weak: a torch build that does not export them falls back to ATen's addmm_.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

inline bool fits_int(std::initializer_list<int64_t> v) {
  for (int64_t x : v)
    if (x > std::numeric_limits<int>::max()) return false;
  return true;
}

template <typename T>
bool fortran_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                  int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (!fits_int({m, n, k, lda, ldb, ldc})) return false;
  const int m_ = m, n_ = n, k_ = k, lda_ = lda, ldb_ = ldb, ldc_ = ldc;
  if constexpr (std::is_same_v<T, float>) {
    if (!sgemm_) return false;
    sgemm_(&ta, &tb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
  } else {
    if (!dgemm_) return false;
    dgemm_(&ta, &tb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
  }
  return true;
}

// Row-major C[m, n] = alpha * op(A)[m, k] op(B)[k, n] + beta * C, with op(X) = X or X^T as
// stored (trans_a: A is stored [k, m]). Row-major C is column-major C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // nothing to multiply; BLAS implementations disagree on this edge
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if (fortran_gemm<T>(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', n, m, k, alpha, b, ldb, a, lda,
                      beta, c, ldc))
    return;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols},
                                 {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  at::Tensor cv = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  cv.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
}

// The fused passes are parallel over batch rows once a step has enough work to pay for it.
constexpr int64_t kParallelElements = 1 << 14;

template <typename F>
void for_each_row(int64_t rows, int64_t row_elements, const F& body) {
  if (rows * row_elements >= kParallelElements && rows > 1) {
    const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, row_elements));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) body(b);
    });
  } else {
    for (int64_t b = 0; b < rows; ++b) body(b);
  }
}

// Weights of one layer and direction, as raw pointers into contiguous math-dtype tensors.
template <typename T>
struct DirectionWeights {
  const T* w_ih;  // [4H, I_l]
  const T* w_hh;  // [4H, out]
  const T* b_ih;  // [4H] or null
  const T* b_hh;  // [4H] or null
  const T* w_hr;  // [out, H] or null
};

template <typename T>
DirectionWeights<T> direction_weights(const LSTMShape& s, const std::vector<at::Tensor>& w,
                                      int64_t layer, int64_t direction) {
  const int64_t k = s.weight_index(layer, direction);
  DirectionWeights<T> dw{w[k].const_data_ptr<T>(), w[k + 1].const_data_ptr<T>(), nullptr, nullptr,
                         nullptr};
  int64_t next = k + 2;
  if (s.has_biases) {
    dw.b_ih = w[next].const_data_ptr<T>();
    dw.b_hh = w[next + 1].const_data_ptr<T>();
    next += 2;
  }
  if (s.proj_size > 0) dw.w_hr = w[next].const_data_ptr<T>();
  return dw;
}

// Step t in processing order `step` of direction d.
inline int64_t time_of(const LSTMShape& s, int64_t direction, int64_t step) {
  return direction == 0 ? step : s.seq_len - 1 - step;
}

// Row b of step t's "previous state" (the step processed just before t in direction d), or -1
// when that state is the initial one (h0/c0): forward t-1; reverse t+1, where only the first
// batch_sizes[t+1] rows exist (packed sequences join the reverse direction late).
inline int64_t prev_row(const LSTMShape& s, int64_t direction, int64_t t, int64_t b) {
  if (direction == 0) return t > 0 ? s.step_offset[t - 1] + b : -1;
  if (t + 1 < s.seq_len && b < s.batch_sizes[t + 1]) return s.step_offset[t + 1] + b;
  return -1;
}

// x for layer l: the op's input, or the previous layer's output with dropout applied.
// Returns a pointer to [rows, I_l]; `dropped` is a scratch buffer of [rows, D*out].
template <typename T>
const T* layer_input(const LSTMShape& s, int64_t layer, const T* input, const T* reserve,
                     const T* mask, T* dropped) {
  if (layer == 0) return input;
  const T* prev = reserve + s.layer_out_offset(layer - 1);
  if (mask == nullptr) return prev;
  const int64_t n = s.rows * s.num_directions * s.out_size;
  const T* m = mask + (layer - 1) * n;
  at::parallel_for(0, n, kParallelElements, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dropped[i] = prev[i] * m[i];
  });
  return dropped;
}

template <typename T>
void forward_impl(const LSTMShape& s, const T* input, const T* hx, const T* cx,
                  const std::vector<at::Tensor>& weights, const T* mask, T* hy, T* cy,
                  T* reserve) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, D = s.num_directions;
  const int64_t out_stride = D * out;  // row stride of layer_out
  at::Tensor dropped_buf;
  T* dropped = nullptr;
  if (mask != nullptr && s.num_layers > 1) {
    dropped_buf = at::empty({s.rows * out_stride}, c10::CppTypeToScalarType<T>::value);
    dropped = dropped_buf.mutable_data_ptr<T>();
  }
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const int64_t in_size = s.layer_input_size(l);
    const T* x = layer_input(s, l, input, reserve, mask, dropped);
    T* layer_out = reserve + s.layer_out_offset(l);
    for (int64_t d = 0; d < D; ++d) {
      const auto w = direction_weights<T>(s, weights, l, d);
      T* gates = reserve + s.gates_offset(l, d);
      T* cells = reserve + s.cells_offset(l, d);
      T* pre_proj = s.proj_size > 0 ? reserve + s.pre_proj_offset(l, d) : nullptr;
      // State lives directly in the h_n / c_n outputs.
      const int64_t ld = l * D + d;
      T* h_state = hy + ld * s.batch * out;
      T* c_state = cy + ld * s.batch * H;
      if (hx) std::memcpy(h_state, hx + ld * s.batch * out, sizeof(T) * s.batch * out);
      else std::fill_n(h_state, s.batch * out, T(0));
      if (cx) std::memcpy(c_state, cx + ld * s.batch * H, sizeof(T) * s.batch * H);
      else std::fill_n(c_state, s.batch * H, T(0));

      // Input projection of every step at once: gates = x W_ih^T + (b_ih + b_hh).
      if (w.b_ih) {
        for_each_row(s.rows, G, [&](int64_t r) {
          T* g = gates + r * G;
          for (int64_t j = 0; j < G; ++j) g[j] = w.b_ih[j] + w.b_hh[j];
        });
      }
      gemm<T>(false, true, s.rows, G, in_size, T(1), x, in_size, w.w_ih, in_size,
              w.b_ih ? T(1) : T(0), gates, G);

      for (int64_t step = 0; step < s.seq_len; ++step) {
        const int64_t t = time_of(s, d, step);
        const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
        T* g_t = gates + off * G;
        gemm<T>(false, true, bs, G, out, T(1), h_state, out, w.w_hh, out, T(1), g_t, G);
        for_each_row(bs, G, [&](int64_t b) {
          T* g = g_t + b * G;
          T* c_out = cells + (off + b) * H;
          T* c_st = c_state + b * H;
          T* h_dst = pre_proj ? pre_proj + (off + b) * H : layer_out + (off + b) * out_stride + d * out;
          T* h_st = pre_proj ? nullptr : h_state + b * out;
          for (int64_t j = 0; j < H; ++j) {
            T c, h;
            const Gates<T> a = cell_forward<T>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c_st[j], c, h);
            g[j] = a.i;
            g[H + j] = a.f;
            g[2 * H + j] = a.g;
            g[3 * H + j] = a.o;
            c_out[j] = c;
            c_st[j] = c;
            h_dst[j] = h;
            if (h_st) h_st[j] = h;
          }
        });
        if (pre_proj) {
          gemm<T>(false, true, bs, out, H, T(1), pre_proj + off * H, H, w.w_hr, H, T(0), h_state, out);
          for (int64_t b = 0; b < bs; ++b)
            std::memcpy(layer_out + (off + b) * out_stride + d * out, h_state + b * out, sizeof(T) * out);
        }
      }
    }
  }
}

template <typename T>
void backward_impl(const LSTMShape& s, const T* input, const T* hx, const T* cx,
                   const std::vector<at::Tensor>& weights, const T* mask, const T* reserve,
                   const T* grad_output, const T* grad_hy, const T* grad_cy, T* grad_input,
                   T* grad_hx, T* grad_cx, std::vector<at::Tensor>& grad_weights) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, D = s.num_directions;
  const int64_t out_stride = D * out;
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  // Scratch, allocated once per call.
  at::Tensor dgates_buf = at::empty({s.rows * G}, dtype);
  at::Tensor h_prev_buf = at::empty({s.rows * out}, dtype);
  at::Tensor dy_buf = at::empty({s.rows * out_stride}, dtype);  // grad of current layer's output
  at::Tensor dx_buf = s.num_layers > 1 ? at::empty({s.rows * out_stride}, dtype) : at::Tensor();
  at::Tensor dropped_buf = (mask && s.num_layers > 1) ? at::empty({s.rows * out_stride}, dtype) : at::Tensor();
  at::Tensor dh_all_buf, dr_buf;
  if (s.proj_size > 0) {
    dh_all_buf = at::empty({s.rows * out}, dtype);
    dr_buf = at::empty({s.batch * H}, dtype);
  }
  T* dgates = dgates_buf.mutable_data_ptr<T>();
  T* h_prev = h_prev_buf.mutable_data_ptr<T>();
  T* dy = dy_buf.mutable_data_ptr<T>();
  T* dx = dx_buf.defined() ? dx_buf.mutable_data_ptr<T>() : nullptr;
  T* dropped = dropped_buf.defined() ? dropped_buf.mutable_data_ptr<T>() : nullptr;
  T* dh_all = dh_all_buf.defined() ? dh_all_buf.mutable_data_ptr<T>() : nullptr;
  T* dr = dr_buf.defined() ? dr_buf.mutable_data_ptr<T>() : nullptr;

  if (grad_output) std::memcpy(dy, grad_output, sizeof(T) * s.rows * out_stride);
  else std::fill_n(dy, s.rows * out_stride, T(0));

  for (int64_t l = s.num_layers - 1; l >= 0; --l) {
    const int64_t in_size = s.layer_input_size(l);
    const T* x = layer_input(s, l, input, reserve, mask, dropped);
    const T* layer_out = reserve + s.layer_out_offset(l);
    // Gradient w.r.t. this layer's input: the op's grad_input, or the previous layer's output.
    T* dx_l = l == 0 ? grad_input : dx;
    for (int64_t d = 0; d < D; ++d) {
      const auto w = direction_weights<T>(s, weights, l, d);
      const T* gates = reserve + s.gates_offset(l, d);
      const T* cells = reserve + s.cells_offset(l, d);
      const T* pre_proj = s.proj_size > 0 ? reserve + s.pre_proj_offset(l, d) : nullptr;
      const int64_t ld = l * D + d;
      const T* c0 = cx ? cx + ld * s.batch * H : nullptr;
      T* dh_state = grad_hx + ld * s.batch * out;
      T* dc_state = grad_cx + ld * s.batch * H;
      if (grad_hy) std::memcpy(dh_state, grad_hy + ld * s.batch * out, sizeof(T) * s.batch * out);
      else std::fill_n(dh_state, s.batch * out, T(0));
      if (grad_cy) std::memcpy(dc_state, grad_cy + ld * s.batch * H, sizeof(T) * s.batch * H);
      else std::fill_n(dc_state, s.batch * H, T(0));

      for (int64_t step = s.seq_len - 1; step >= 0; --step) {
        const int64_t t = time_of(s, d, step);
        const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
        const T* dy_t = dy + off * out_stride + d * out;
        if (pre_proj) {
          // dL/dh_t = carried + from output; dL/d(pre_proj) = dL/dh_t W_hr.
          T* dh_t = dh_all + off * out;
          for (int64_t b = 0; b < bs; ++b)
            for (int64_t j = 0; j < out; ++j) dh_t[b * out + j] = dh_state[b * out + j] + dy_t[b * out_stride + j];
          gemm<T>(false, false, bs, H, out, T(1), dh_t, out, w.w_hr, H, T(0), dr, H);
        }
        for_each_row(bs, G, [&](int64_t b) {
          const T* g = gates + (off + b) * G;
          const T* c = cells + (off + b) * H;
          const int64_t pr = prev_row(s, d, t, b);
          const T* c_prev = pr >= 0 ? cells + pr * H : (c0 ? c0 + b * H : nullptr);
          T* dg = dgates + (off + b) * G;
          T* dc = dc_state + b * H;
          for (int64_t j = 0; j < H; ++j) {
            const T dh = pre_proj ? dr[b * H + j] : dh_state[b * out + j] + dy_t[b * out_stride + j];
            const Gates<T> a{g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
            T dc_prev;
            const Gates<T> da = cell_backward<T>(a, c[j], c_prev ? c_prev[j] : T(0), dh, dc[j], dc_prev);
            dg[j] = da.i;
            dg[H + j] = da.f;
            dg[2 * H + j] = da.g;
            dg[3 * H + j] = da.o;
            dc[j] = dc_prev;
          }
        });
        // dL/dh_{t-1} for the rows active at t; the others keep what they carry.
        gemm<T>(false, false, bs, out, G, T(1), dgates + off * G, G, w.w_hh, out, T(0), dh_state, out);
      }

      // h_{t-1} of every row, for dW_hh as one GEMM.
      const T* h0 = hx ? hx + ld * s.batch * out : nullptr;
      for (int64_t t = 0; t < s.seq_len; ++t) {
        const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
        for (int64_t b = 0; b < bs; ++b) {
          const int64_t pr = prev_row(s, d, t, b);
          T* dst = h_prev + (off + b) * out;
          if (pr >= 0) std::memcpy(dst, layer_out + pr * out_stride + d * out, sizeof(T) * out);
          else if (h0) std::memcpy(dst, h0 + b * out, sizeof(T) * out);
          else std::fill_n(dst, out, T(0));
        }
      }

      const int64_t k = s.weight_index(l, d);
      T* gw_ih = grad_weights[k].mutable_data_ptr<T>();
      T* gw_hh = grad_weights[k + 1].mutable_data_ptr<T>();
      gemm<T>(true, false, G, in_size, s.rows, T(1), dgates, G, x, in_size, T(0), gw_ih, in_size);
      gemm<T>(true, false, G, out, s.rows, T(1), dgates, G, h_prev, out, T(0), gw_hh, out);
      int64_t next = k + 2;
      if (s.has_biases) {
        T* gb_ih = grad_weights[next].mutable_data_ptr<T>();
        T* gb_hh = grad_weights[next + 1].mutable_data_ptr<T>();
        std::fill_n(gb_ih, G, T(0));
        for (int64_t r = 0; r < s.rows; ++r)
          for (int64_t j = 0; j < G; ++j) gb_ih[j] += dgates[r * G + j];
        std::memcpy(gb_hh, gb_ih, sizeof(T) * G);
        next += 2;
      }
      if (pre_proj) {
        T* gw_hr = grad_weights[next].mutable_data_ptr<T>();
        gemm<T>(true, false, out, H, s.rows, T(1), dh_all, out, pre_proj, H, T(0), gw_hr, H);
      }
      // dL/dx of this layer, summed over directions.
      gemm<T>(false, false, s.rows, in_size, G, T(1), dgates, G, w.w_ih, in_size, d == 0 ? T(0) : T(1),
              dx_l, in_size);
    }
    if (l > 0) {
      // Through the dropout mask into the previous layer's output gradient.
      const int64_t n = s.rows * out_stride;
      const T* m = mask ? mask + (l - 1) * n : nullptr;
      at::parallel_for(0, n, kParallelElements, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) dy[i] = m ? dx[i] * m[i] : dx[i];
      });
    }
  }
}

// ---- Op entry points: dtype handling, contiguity, output allocation. ----

at::Tensor to_math(const at::Tensor& t, at::ScalarType math) {
  return t.to(math).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor opt_to_math(const std::optional<at::Tensor>& t, at::ScalarType math) {
  return t.has_value() ? to_math(*t, math) : at::Tensor();
}

at::ScalarType math_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu_dtype(const at::Tensor& input) {
  const auto st = input.scalar_type();
  TORCH_CHECK_VALUE(
      st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
      "fused_lstm: CPU kernels support float32, float64, bfloat16 and float16, got ", st);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size) {
  const LSTMShape s = check_lstm_args(input, batch_sizes, hx, cx, weights, dropout_mask,
                                      num_layers, bidirectional, has_biases, proj_size);
  check_cpu_dtype(input);
  const auto math = math_type(input.scalar_type());
  const auto mopts = input.options().dtype(math);
  at::Tensor x = to_math(input, math);
  at::Tensor h0 = opt_to_math(hx, math), c0 = opt_to_math(cx, math);
  at::Tensor mask = opt_to_math(dropout_mask, math);
  std::vector<at::Tensor> w;
  w.reserve(weights.size());
  for (const auto& t : weights) w.push_back(to_math(t, math));

  const int64_t LD = s.num_layers * s.num_directions;
  at::Tensor hy = at::empty({LD, s.batch, s.out_size}, mopts);
  at::Tensor cy = at::empty({LD, s.batch, s.hidden_size}, mopts);
  at::Tensor reserve = at::empty({s.reserve_numel()}, mopts);
  AT_DISPATCH_FLOATING_TYPES(math, "fused_lstm_forward_cpu", [&] {
    forward_impl<scalar_t>(s, x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(h0),
                           ptr_or_null<scalar_t>(c0), w, ptr_or_null<scalar_t>(mask),
                           hy.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(),
                           reserve.mutable_data_ptr<scalar_t>());
  });
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = s.num_directions * s.out_size;
  // The last layer's output, as stored in the reserve, in the caller's dtype.
  at::Tensor output = reserve.narrow(0, s.layer_out_offset(s.num_layers - 1),
                                     s.rows * s.num_directions * s.out_size)
                          .view(out_shape)
                          .to(input.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  const auto st = input.scalar_type();
  return {output, hy.to(st), cy.to(st), reserve};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_backward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& reserve, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
    int64_t num_layers, bool bidirectional, bool has_biases, int64_t proj_size) {
  const LSTMShape s = check_lstm_args(input, batch_sizes, hx, cx, weights, dropout_mask,
                                      num_layers, bidirectional, has_biases, proj_size);
  check_cpu_dtype(input);
  check_lstm_backward_args(s, input, reserve, grad_output, grad_hy, grad_cy);
  const auto st = input.scalar_type();
  const auto math = math_type(st);
  TORCH_CHECK(reserve.scalar_type() == math, "fused_lstm: reserve has dtype ", reserve.scalar_type(),
              ", expected ", math);
  const auto mopts = input.options().dtype(math);
  at::Tensor x = to_math(input, math);
  at::Tensor h0 = opt_to_math(hx, math), c0 = opt_to_math(cx, math);
  at::Tensor mask = opt_to_math(dropout_mask, math);
  at::Tensor res = reserve.contiguous();
  at::Tensor gy = opt_to_math(grad_output, math);
  at::Tensor ghy = opt_to_math(grad_hy, math), gcy = opt_to_math(grad_cy, math);
  std::vector<at::Tensor> w;
  std::vector<at::Tensor> gw;
  w.reserve(weights.size());
  gw.reserve(weights.size());
  for (const auto& t : weights) {
    w.push_back(to_math(t, math));
    gw.push_back(at::empty(t.sizes(), mopts));
  }
  const int64_t LD = s.num_layers * s.num_directions;
  at::Tensor grad_input = at::empty(x.sizes(), mopts);
  at::Tensor grad_hx = at::empty({LD, s.batch, s.out_size}, mopts);
  at::Tensor grad_cx = at::empty({LD, s.batch, s.hidden_size}, mopts);
  AT_DISPATCH_FLOATING_TYPES(math, "fused_lstm_backward_cpu", [&] {
    backward_impl<scalar_t>(
        s, x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(h0), ptr_or_null<scalar_t>(c0), w,
        ptr_or_null<scalar_t>(mask), res.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(gy),
        ptr_or_null<scalar_t>(ghy), ptr_or_null<scalar_t>(gcy),
        grad_input.mutable_data_ptr<scalar_t>(), grad_hx.mutable_data_ptr<scalar_t>(),
        grad_cx.mutable_data_ptr<scalar_t>(), gw);
  });
  std::vector<at::Tensor> grad_weights;
  grad_weights.reserve(gw.size());
  for (size_t i = 0; i < gw.size(); ++i) grad_weights.push_back(gw[i].to(weights[i].scalar_type()));
  return {grad_input.to(st), grad_hx.to(st), grad_cx.to(st), grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace fused_lstm
