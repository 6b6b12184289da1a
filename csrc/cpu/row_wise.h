// Hidden sizes from kRowWiseHidden on: gates row-major [rows, 4H], one step at a time over the
// step's rows (products through brgemm, bf16_gemm or the BLAS; plan.h decides which).
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "cell.h"
#include "weights.h"

namespace fused_lstm {
namespace {

// x for layer l: the op's input, or the previous layer's output ([rows, D*out]) with dropout
// applied into `dropped` (a scratch buffer of the same size).
template <typename T>
Operand<T> layer_input(const LSTMShape& s, int64_t layer, Operand<T> input,
                       const T* prev_layer_out, const T* mask, T* dropped) {
  if (layer == 0) return input;
  if (mask == nullptr) return {prev_layer_out};
  const int64_t n = s.rows * s.num_directions * s.out_size;
  const T* m = mask + (layer - 1) * n;
  at::parallel_for(0, n, kParallelElements, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dropped[i] = prev_layer_out[i] * m[i];
  });
  return {dropped};
}

// gates[rows, 4H] = x W_ih^T, x: [rows, in_size] (the bias is the cell pass's: use_bias).
template <typename T>
void input_projection(const DirectionWeights<T>& w, Operand<T> x, int64_t rows, int64_t in_size,
                      int64_t G, T* gates) {
  if constexpr (std::is_same_v<T, float>) {
    if (w.amx_ih) {  // blocks of rows over the threads, each on its thread's tiles
      at::parallel_for(0, (rows + kAmxBlockM - 1) / kAmxBlockM, 1, [&](int64_t b0, int64_t b1) {
        const int64_t r0 = b0 * kAmxBlockM, r1 = std::min(rows, b1 * kAmxBlockM);
        visit(x.at(r0 * in_size), [&](auto a) {
          amx_product(false, r1 - r0, G, in_size, a, in_size, w.amx_ih, gates + r0 * G, G);
        });
        amx_release();
      });
      return;
    }
    if (w.w_ih_bf16) {
      visit(x, [&](auto a) {
        bf16_gemm_parallel(rows, G, in_size, a, in_size, w.w_ih_bf16, gates, G, false);
      });
      return;
    }
  }
  gemm<T>(false, true, rows, G, in_size, T(1), x.f, in_size, w.w_ih, in_size, T(0), gates, G);
}

// One time step of one layer and direction, for the bs rows active at it.
//   g_t:         [bs, 4H] the input projection on entry, without the bias (the cell pass
//                adds w.bias), or anything where x_t is given (then the step adds x_t W_ih^T
//                itself); the activated gates on exit (left as pre-activations without cells_t)
//   h_prev:      h_{t-1}, rows ld_prev apart, or null where it is zero (the first step without
//                hx: no product then)
//   h_next:      receives h_t, rows ld_next apart (may be h_prev: the product has read it)
//   c_state:     [B, H] c_{t-1} in, c_t out
//   cells_t:     [bs, H] receives c_t, or null (inference: nothing kept);  pre_proj_t: [bs, H] receives o * tanh(c_t) (proj only)
// Hidden sizes from kRowWiseHidden on (smaller ones take tiny_forward_steps).
template <typename T>
void forward_step(const CpuPlan& plan, const LSTMShape& s, const DirectionWeights<T>& w,
                  int64_t bs, T* g_t, const T* h_prev, int64_t ld_prev, T* h_next,
                  int64_t ld_next, T* c_state, T* cells_t, T* pre_proj_t, Operand<T> x_t,
                  int64_t in_size) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size;
  const bool has_proj = s.proj_size > 0;
  if constexpr (std::is_same_v<T, float>) {
    if (w.amx_cat) {  // the fused step on the tiles: [x_t | h_{t-1}] [W_ih^T; W_hh^T], one B
      const int64_t k = in_size + out;
      TORCH_INTERNAL_ASSERT(x_t, "fused_lstm: a fused AMX step without its x_t");
      visit(x_t, [&](auto x) {
        const c10::BFloat16* a = amx_cat_rows(x, in_size, in_size, h_prev, ld_prev, out, bs);
        amx_product(false, bs, G, h_prev ? k : in_size, a, k, w.amx_cat, g_t, G, k);
      });
    } else if (w.amx_hh) {  // as bf16_gemm below, on this thread's AMX tiles
      if (x_t)
        visit(x_t, [&](auto a) { amx_product(false, bs, G, in_size, a, in_size, w.amx_ih, g_t, G); });
      if (h_prev) amx_product(true, bs, G, out, h_prev, ld_prev, w.amx_hh, g_t, G);
    } else if (w.w_hh_bf16) {  // g_t: the projection unless x_t is given (then computed here)
      if (x_t)
        visit(x_t, [&](auto a) { bf16_gemm(bs, G, in_size, a, in_size, w.w_ih_bf16, g_t, G, false); });
      if (h_prev) bf16_gemm(bs, G, out, h_prev, ld_prev, w.w_hh_bf16, g_t, G, true);
    } else if (x_t) {  // the input projection, fused: g_t = x_t W_ih^T + h_{t-1} W_hh^T
      TORCH_INTERNAL_ASSERT(x_t.f != nullptr || x_t.h != nullptr);
      const float* x = x_t.f ? x_t.f  // else float16 rows kept by the op (fp16_kept_*)
                             : widened_on_this_thread(x_t.h, bs * in_size);
      brgemm_packed(false, bs, G, in_size, x, in_size, w, 0, g_t, G);
      if (h_prev) brgemm_packed(true, bs, G, out, h_prev, ld_prev, w, in_size, g_t, G);
    } else if (w.w_packed) {
      if (h_prev) brgemm_packed(true, bs, G, out, h_prev, ld_prev, w, 0, g_t, G);
    }
  }
  if (!w.single_thread_product() && h_prev) {
    TORCH_INTERNAL_ASSERT(w.w_hh != nullptr, "fused_lstm: a library step needs W_hh in float");
    gemm<T>(false, true, bs, G, out, T(1), h_prev, ld_prev, w.w_hh, out, T(1), g_t, G);
  }
  // The cell pass; h goes to h_next (out == H) or to pre_proj_t ([bs, H]).
  T* h_out = has_proj ? pre_proj_t : h_next;
  const int64_t ld_out = has_proj ? H : ld_next;
  for_each_row(bs, G, [&](int64_t b) {
    T* g = g_t + b * G;
    cell_forward_block(H, g, g + H, g + 2 * H, g + 3 * H, w.bias, H,
                       c_state + b * H, cells_t ? cells_t + b * H : nullptr, h_out + b * ld_out,
                       plan.vec16_cell);
  });
  if (has_proj)
    gemm<T>(false, true, bs, out, H, T(1), pre_proj_t, H, w.w_hr, H, T(0), h_next, ld_next);
}

// One step's buffers at its first row (row r of the step is `rows` further on; strides: gates
// 4H, cells and pre_proj H, layer_out D*out).
template <typename T>
struct StepRows {
  T* gates;
  T* cells;     // null in inference (no reserve: the cell pass writes only c_t and h_t)
  T* pre_proj;  // null without projection
  T* layer_out;  // null where the step's h_t goes to out16 instead
  Operand<T> x = {};  // the step's layer input [.., in_size] when the projection is fused
  uint16_t* out16 = nullptr;  // the step's rows of a 16-bit output (forward_steps' out_dtype)
};

// rows of n floats (ld_src apart) rounded to `dtype` (bfloat16 or float16, as torch rounds)
// into rows ld_dst elements apart; row by row, so on this thread (round_to splits only runs
// far longer than a row).
inline void round_rows_to(const float* src, int64_t ld_src, int64_t rows, int64_t n,
                          at::ScalarType dtype, uint16_t* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) round_to(src + r * ld_src, n, dtype, dst + r * ld_dst);
}



// Forward steps [first, last] (processing order) of direction d, for the batch rows [r0, r1)
// only. The rows of a batch are independent sequences, so a slice of them runs every step
// without waiting for the others. rows_of(t): step t's StepRows. h_zero: h_state is zero at
// step `first` (no hx, first == 0), so its product is skipped.
// Where every step has every row (no packed lengths), h_t is written once, into the layer
// output, and the next step reads it from there; h_state receives the last step's at the end.
// Otherwise (rows end or start at different steps) h_t goes to h_state, which every step reads,
// and is copied into the layer output; so also where the layer output is 16-bit (out_dtype
// bfloat16 or float16: StepRows::out16, CpuPlan::output_16bit), rounded into it, while the
// steps carry h_t in float32.
template <typename T, typename RowsOf>
void forward_steps(const CpuPlan& plan, const LSTMShape& s, const DirectionWeights<T>& w,
                   int64_t d, int64_t first, int64_t last, int64_t r0, int64_t r1, T* h_state, T* c_state,
                   const RowsOf& rows_of, int64_t in_size, bool h_zero,
                   at::ScalarType out_dtype = at::kFloat) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size;
  const int64_t out_stride = s.num_directions * out;
  const bool out16 = is_16bit(out_dtype);
  const bool in_output = every_step_full(s) && !out16;
  const int64_t ld_h = in_output ? out_stride : out;
  const T* h_prev = h_zero ? nullptr : h_state + r0 * out;
  int64_t ld_prev = out, last_bs = 0;
  for (int64_t step = first; step <= last; ++step) {
    const int64_t t = time_of(s, d, step);
    const int64_t bs = std::min(s.batch_sizes[t], r1) - r0;
    if (bs <= 0) continue;
    const StepRows<T> p = rows_of(t);
    T* out_t = out16 ? nullptr : p.layer_out + r0 * out_stride;
    T* h_next = in_output ? out_t : h_state + r0 * out;
    forward_step(plan, s, w, bs, p.gates + r0 * G, h_prev, ld_prev, h_next, ld_h, c_state + r0 * H,
                 p.cells ? p.cells + r0 * H : nullptr, p.pre_proj ? p.pre_proj + r0 * H : nullptr,
                 p.x.at(r0 * in_size), in_size);
    if constexpr (std::is_same_v<T, float>) {
      if (out16) round_rows_to(h_next, out, bs, out, out_dtype, p.out16 + r0 * out_stride, out_stride);
    }
    if (!in_output && !out16) copy_rows(h_next, out, out_t, out_stride, bs, out);
    h_prev = h_next;
    ld_prev = ld_h;
    last_bs = bs;
  }
  if (in_output && last_bs > 0) copy_rows(h_prev, out_stride, h_state + r0 * out, out, last_bs, out);
  if (w.amx_steps()) amx_release();  // this thread's last product of the direction
}

}  // namespace
}  // namespace fused_lstm
