// Small hidden sizes (H < kRowWiseHidden): the batch-fastest layout, its inline products and the
// forward (the backward: small_hidden_backward.h).
// Part of the one translation unit lstm_cpu.cpp.
//
// The small-hidden path's product (see tiny_forward_steps), vectorised along the batch:
//   tiny_product: y[r][b] = y_in[r][b] + sum_i w[r, i] * h[i][b]    r < rows_w, i < cols_w, b < n
// where X[k][b] is X + k * ld_x + b (w is row-major [rows_w, cols_w]); y_in null means zeros,
// and may be y itself (or another buffer: a step adds its product to the input projection and
// writes the sum where its cell pass reads it, with no copy in between). The batch is taken in
// blocks of V columns whose sums stay in registers over i (V a compile-time width, so each block
// is whole vectors): 16, then 8, 4, 2, 1 for what is left (batch 10 = 8 + 2). Accumulating
// into y[r][b] across i instead made every step a load and a store
// (benchmarks/notes/small-hidden.md, "Register accumulators and the tiny input projection").
// Rows go kTinyRowGroup at a time, each h vector loaded once for all of them: one row's sums are
// a single chain of dependent multiply-adds, which ran at the FMA latency
// (benchmarks/notes/small-hidden.md, "Dependency chains in the tiny products").
#pragma once

#include "cell.h"
#include "small_hidden_avx512.h"
#include "weights.h"

namespace fused_lstm {
namespace {

#if defined(__GNUC__) && defined(__x86_64__)
// dst[c * ld_dst + r] = src[r * ld_src + c] for the narrow shapes of the batch-fastest layout
// (a side of at most 16: the hidden size, 4H, or a step's rows), which transpose_block's 8 x 8
// blocks leave to scalar edges: 16 elements of the long side at a time on AVX-512, gathered
// from 16 source rows where the source's rows are narrow, scattered to 16 destination rows
// where the destination's are. False where neither side is narrow or the stride overflows the
// 32-bit indices.
__attribute__((target("avx512f"))) inline bool transpose_narrow16(
    const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  constexpr int64_t kMaxStride = int64_t{1} << 26;  // 15 x the stride fits an int32
  const bool gather = cols <= 16 && rows >= 16 && ld_src < kMaxStride;
  if (!gather && !(rows <= 16 && cols >= 16 && ld_dst < kMaxStride)) return false;
  // Lane i: element b0 + i of the long side, ld_src (gather) or ld_dst (scatter) apart.
  const int64_t n = gather ? rows : cols, narrow = gather ? cols : rows;
  const __m512i idx =
      _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                         _mm512_set1_epi32(int(gather ? ld_src : ld_dst)));
  for (int64_t b0 = 0; b0 < n; b0 += 16) {
    const __mmask16 m = __mmask16((uint32_t{1} << std::min<int64_t>(16, n - b0)) - 1);
    for (int64_t j = 0; j < narrow; ++j) {
      if (gather)
        _mm512_mask_storeu_ps(dst + j * ld_dst + b0, m,
                              _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx,
                                                       src + b0 * ld_src + j, 4));
      else
        _mm512_mask_i32scatter_ps(dst + b0 * ld_dst + j, m, idx,
                                  _mm512_maskz_loadu_ps(m, src + j * ld_src + b0), 4);
    }
  }
  return true;
}
#endif

// transpose() for the batch-fastest layout's per-step copies (gates, cells, states, dgates: a
// few hundred to a few thousand floats, many times per call): float blocks through
// transpose_block's 8 x 8 register transposes (weights.h), narrow ones through
// transpose_narrow16 above, not one element at a time. A pure copy, so the same bits.
// Measured at seed-tiny (callgrind, one thread, AVX2 clone): the
// element-wise copies were ~260k of a training call's ~1.0M instructions
// (benchmarks/notes/python-overhead.md, "Training at the tutorial sizes: where the time goes").
// avx512: the AVX-512 variant's permutes first (CpuPlan::small_hidden_avx512).
template <typename T>
void tiny_transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                    int64_t ld_dst, bool avx512) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (src != nullptr && avx512 && transpose_permute(src, ld_src, rows, cols, dst, ld_dst))
      return;
    if (src != nullptr && cpu_features().avx512 &&
        transpose_narrow16(src, ld_src, rows, cols, dst, ld_dst))
      return;
#endif
    if (src != nullptr) return transpose_block(src, ld_src, rows, cols, dst, ld_dst);
  }
  transpose(src, ld_src, rows, cols, dst, ld_dst);
}

// body(std::integral_constant<int, V>, i0) over [0, n) in blocks of V = 16, then 8, 4, 2, 1:
// whole vectors for what fits, narrower ones for what is left (10 = 8 + 2).
template <typename Body>
__attribute__((always_inline)) inline void for_width_blocks(int64_t n, const Body& body) {
  int64_t i0 = 0;
  for (; i0 + 16 <= n; i0 += 16) body(std::integral_constant<int, 16>{}, i0);
  if (i0 + 8 <= n) {
    body(std::integral_constant<int, 8>{}, i0);
    i0 += 8;
  }
  if (i0 + 4 <= n) {
    body(std::integral_constant<int, 4>{}, i0);
    i0 += 4;
  }
  if (i0 + 2 <= n) {
    body(std::integral_constant<int, 2>{}, i0);
    i0 += 2;
  }
  if (i0 < n) body(std::integral_constant<int, 1>{}, i0);
}

// Rows of the product at a time (see the top of the file).
constexpr int kTinyRowGroup = 4;

// Rows [r, r + R) of the product for batch columns [b0, b0 + V). kT: w stored transposed,
// [cols_w][rows_w] (element (r, i) at w[i * rows_w + r]: a weight as stored, used as its
// transpose), not [rows_w][cols_w]; the same products in the same order.
template <typename T, int V, int R, bool kT>
__attribute__((always_inline)) inline void tiny_product_rows_of(
    int64_t r, int64_t b0, int64_t rows_w, int64_t cols_w, const T* __restrict w,
    const T* __restrict h, int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y) {
  Vec<T, V> acc[R];
  for (int k = 0; k < R; ++k)
    acc[k] = y_in ? vec_load<T, V>(y_in + (r + k) * ld_in + b0) : Vec<T, V>{};
  const T* __restrict wr = kT ? w + r : w + r * cols_w;
  for (int64_t i = 0; i < cols_w; ++i) {
    const Vec<T, V> hi = vec_load<T, V>(h + i * ld_h + b0);
    for (int k = 0; k < R; ++k) acc[k] += (kT ? wr[i * rows_w + k] : wr[k * cols_w + i]) * hi;
  }
  for (int k = 0; k < R; ++k) vec_store<T, V>(y + (r + k) * ld_y + b0, acc[k]);
}

template <typename T, int V, bool kT>
__attribute__((always_inline)) inline void tiny_product_block(
    int64_t b0, int64_t rows_w, int64_t cols_w, const T* __restrict w, const T* __restrict h,
    int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y) {
  int64_t r = 0;
  for (; r + kTinyRowGroup <= rows_w; r += kTinyRowGroup)
    tiny_product_rows_of<T, V, kTinyRowGroup, kT>(r, b0, rows_w, cols_w, w, h, ld_h, y_in,
                                                  ld_in, y, ld_y);
  for (; r < rows_w; ++r)
    tiny_product_rows_of<T, V, 1, kT>(r, b0, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);
}

template <typename T, bool kT>
__attribute__((always_inline)) inline void tiny_product_loop(
    int64_t n, int64_t rows_w, int64_t cols_w, const T* __restrict w, const T* __restrict h,
    int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y) {
  for_width_blocks(n, [&](auto width, int64_t b0) __attribute__((always_inline)) {
    tiny_product_block<T, decltype(width)::value, kT>(b0, rows_w, cols_w, w, h, ld_h, y_in,
                                                      ld_in, y, ld_y);
  });
}

// The same product for narrow batches, vectorised along w's rows instead: a batch of 3 fills
// no vector along the batch, so the blocks above ran 2 + 1 columns at a time, scalar
// (benchmarks/notes/small-hidden.md,
// "Narrow batches: products along the weight's rows"). Reads w transposed, wT [cols_w][rows_w]; rows in blocks of V whose sums stay in
// registers over i, for 4 batch columns at a time (then 2, 1).
// Batch columns [b, b + R) for rows [r0, r0 + V): each wT vector loaded once for all R.
template <typename T, int V, int R>
__attribute__((always_inline)) inline void tiny_rows_cols_of(
    int64_t b, int64_t r0, int64_t rows_w, int64_t cols_w, const T* __restrict wT,
    const T* __restrict h, int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y) {
  Vec<T, V> acc[R];
  for (int k = 0; k < R; ++k)
    for (int j = 0; j < V; ++j) acc[k][j] = y_in ? y_in[(r0 + j) * ld_in + b + k] : T(0);
  for (int64_t i = 0; i < cols_w; ++i) {
    const Vec<T, V> wi = vec_load<T, V>(wT + i * rows_w + r0);
    for (int k = 0; k < R; ++k) acc[k] += wi * h[i * ld_h + b + k];
  }
  for (int k = 0; k < R; ++k)
    for (int j = 0; j < V; ++j) y[(r0 + j) * ld_y + b + k] = acc[k][j];
}

template <typename T, int V>
__attribute__((always_inline)) inline void tiny_rows_block(
    int64_t r0, int64_t n, int64_t rows_w, int64_t cols_w, const T* __restrict wT,
    const T* __restrict h, int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y) {
  int64_t b = 0;
  for (; b + kTinyRowGroup <= n; b += kTinyRowGroup)
    tiny_rows_cols_of<T, V, kTinyRowGroup>(b, r0, rows_w, cols_w, wT, h, ld_h, y_in, ld_in, y, ld_y);
  if (b + 2 <= n) {
    tiny_rows_cols_of<T, V, 2>(b, r0, rows_w, cols_w, wT, h, ld_h, y_in, ld_in, y, ld_y);
    b += 2;
  }
  if (b < n) tiny_rows_cols_of<T, V, 1>(b, r0, rows_w, cols_w, wT, h, ld_h, y_in, ld_in, y, ld_y);
}
template <typename T>
__attribute__((always_inline)) inline void tiny_rows_loop(
    int64_t n, int64_t rows_w, int64_t cols_w, const T* __restrict wT, const T* __restrict h,
    int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y) {
  for_width_blocks(rows_w, [&](auto width, int64_t r0) __attribute__((always_inline)) {
    tiny_rows_block<T, decltype(width)::value>(r0, n, rows_w, cols_w, wT, h, ld_h, y_in, ld_in,
                                               y, ld_y);
  });
}

// The inline products' entry points, one per kernel and dtype (AVX-512 and AVX2 clones):
// tiny_product_cols (w [rows_w][cols_w]), tiny_product_cols_t (w given as stored, wT
// [cols_w][rows_w]), tiny_product_rows (narrow batches, wT).
#define FUSED_LSTM_TINY_PRODUCT(T, NAME, LOOP)                                                 \
  FUSED_LSTM_SIMD_CLONES void NAME(int64_t n, int64_t rows_w, int64_t cols_w, const T* w,      \
                                   const T* h, int64_t ld_h, const T* y_in, int64_t ld_in,     \
                                   T* y, int64_t ld_y) {                                       \
    LOOP(n, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);                                 \
  }
#define FUSED_LSTM_DEFINE_TINY(T)                                                              \
  FUSED_LSTM_TINY_PRODUCT(T, tiny_product_cols, (tiny_product_loop<T, false>))                 \
  FUSED_LSTM_TINY_PRODUCT(T, tiny_product_cols_t, (tiny_product_loop<T, true>))                \
  FUSED_LSTM_TINY_PRODUCT(T, tiny_product_rows, tiny_rows_loop<T>)
FUSED_LSTM_DEFINE_TINY(float)
FUSED_LSTM_DEFINE_TINY(double)
#undef FUSED_LSTM_DEFINE_TINY
#undef FUSED_LSTM_TINY_PRODUCT

// Batches narrower than this take tiny_product_rows where the caller has w transposed.
constexpr int64_t kTinyNarrowBatch = 8;

// The AVX-512 variant's masked 16-lane product (small_hidden_avx512.h masked_product16; kT: w
// given as stored, [cols_w][rows_w]) where `avx512` (CpuPlan::small_hidden_avx512: float32):
// true when it ran.
template <bool kT, typename T>
inline bool masked_product(bool avx512, int64_t n, int64_t rows_w, int64_t cols_w, const T* w,
                           const T* h, int64_t ld_h, const T* y_in, int64_t ld_in, T* y,
                           int64_t ld_y) {
#ifdef FUSED_LSTM_SMALL_HIDDEN_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (avx512) masked_product16<kT>(n, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);
    return avx512;
  }
#endif
  return false;
}

// y = y_in + w h (see tiny_product_block), w also given transposed (wT [cols_w][rows_w], or
// null): the narrow-batch kernel where it pays. avx512: the AVX-512 variant's masked 16-lane
// blocks (the same bits).
template <typename T>
inline void tiny_product(int64_t n, int64_t rows_w, int64_t cols_w, const T* w, const T* wT,
                         const T* h, int64_t ld_h, const T* y_in, int64_t ld_in, T* y,
                         int64_t ld_y, bool avx512) {
  if (wT != nullptr && n < kTinyNarrowBatch)
    return tiny_product_rows(n, rows_w, cols_w, wT, h, ld_h, y_in, ld_in, y, ld_y);
  if (!masked_product<false>(avx512, n, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y))
    tiny_product_cols(n, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);
}

// y = y_in + w h as tiny_product, given only wT [cols_w][rows_w] (a weight as stored, used
// transposed: the backward's dL/dh_{t-1} and dL/dx products): no transposed copy of it needed.
template <typename T>
inline void tiny_product_t(int64_t n, int64_t rows_w, int64_t cols_w, const T* wT, const T* h,
                           int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y,
                           bool avx512) {
  if (n < kTinyNarrowBatch)
    return tiny_product_rows(n, rows_w, cols_w, wT, h, ld_h, y_in, ld_in, y, ld_y);
  if (!masked_product<true>(avx512, n, rows_w, cols_w, wT, h, ld_h, y_in, ld_in, y, ld_y))
    tiny_product_cols_t(n, rows_w, cols_w, wT, h, ld_h, y_in, ld_in, y, ld_y);
}

// ---- Small hidden sizes (H < kRowWiseHidden): a batch-fastest working layout ----
// Rows of 3 or 10 floats are too short to vectorise, and a BLAS call costs more than a whole
// step's arithmetic. So below kRowWiseHidden a layer and direction runs with every per-step
// quantity laid out [feature][batch] ("T" below): the input projection is computed transposed
// (gT [4H, rows] = W_ih x^T + b), the state is kept as hT [out, B] and cT [H, B], the recurrent
// product is an inline loop vectorised along the batch, and the cell pass runs per hidden unit
// over the step's rows. In training each step's gates and cells go to the reserve as computed,
// in the small-hidden variant's reserve layout (lstm.h: [feature][row of the step] per step),
// which tiny_backward_steps reads in place; only the layer output and pre_proj are written
// row-major (transposed from the working layout).
template <typename T>
struct TinyBuffers {
  T* gT;        // [4H][ld_g]: the input projection of rows [row0, row0 + ld_g), then gates
  int64_t ld_g;
  int64_t row0;
  T* hT;        // [out][B] h state
  T* cT;        // [H][B]   c state
  T* hnew;      // [H][B]   o * tanh(c_t) before the projection (projection only)
  T* gstep;     // [4H][bs] one step's gates in inference, compact (a slice [r0, r1) at 4H * r0)
  T* xT;        // [widest input, at most kTinyProjectionInput][ld_g] the layer input,
                //   transposed (tiny_input_projection)
};

// Inputs up to this size are projected by tiny_product (x transposed into TinyBuffers::xT
// first); larger ones by a GEMM. At tutorial sizes a BLAS call costs more than the arithmetic.
constexpr int64_t kTinyProjectionInput = 32;
// (A float16 call keeps no gates only where its inputs take that product: lstm.h gates_in_reserve.)
static_assert(kTinyProjectionInput == kDropGatesMaxSmallInput);

// gT [4H, rows] = W_ih x^T + b, x: [rows, in_size]; xT: room for [in_size, rows] where in_size <=
// kTinyProjectionInput (tiny_buffers: the widest layer input's).
// Or, where `x_t` is given (in_size <= kTinyProjectionInput), the input already transposed:
// x_t [in_size][ld_x_t], these rows from column 0 (x unused).
template <typename T>
void tiny_input_projection(const DirectionWeights<T>& w, const T* x, int64_t rows,
                           int64_t in_size, int64_t G, T* gT, T* xT, bool avx512,
                           const T* x_t = nullptr, int64_t ld_x_t = 0) {
  if (w.b_ih)
    for (int64_t r = 0; r < G; ++r) std::fill_n(gT + r * rows, rows, w.b_ih[r] + w.b_hh[r]);
  if (in_size <= kTinyProjectionInput) {
    if (x_t == nullptr) {
      tiny_transpose(x, in_size, rows, in_size, xT, rows, avx512);
      x_t = xT;
      ld_x_t = rows;
    }
    tiny_product<T>(rows, G, in_size, w.w_ih, nullptr, x_t, ld_x_t, w.b_ih ? gT : nullptr, rows,
                    gT, rows, avx512);
    return;
  }
  gemm<T>(false, true, G, rows, in_size, T(1), w.w_ih, in_size, x, in_size, w.b_ih ? T(1) : T(0),
          gT, rows);
}

// W_hh^T [out][4H] and, with a projection, W_hr^T [H][out], into `dst` (room for
// (4H + H) * out): the other layout of the small-hidden products' weights (tiny_product's w
// and wT), used by the forward's narrow batches. Returns W_hh^T, W_hr^T (null without a
// projection).
template <typename T>
std::pair<const T*, const T*> transpose_recurrent_weights(const LSTMShape& s,
                                                          const DirectionWeights<T>& w, T* dst,
                                                          bool avx512) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size;
  tiny_transpose(w.w_hh, out, G, out, dst, G, avx512);
  if (s.proj_size == 0) return {dst, nullptr};
  tiny_transpose(w.w_hr, H, out, H, dst + G * out, out, avx512);
  return {dst, dst + G * out};
}

// One step's cell pass in the small-hidden layout, bs of the batch's B rows: gates [4H][ldg]
// (activated in place), c [H][ldc] (c_{t-1} in, c_t out), c_out [H][ldg] (c_t for the reserve,
// or null) and h [H][ldc] (h_t). One pass over every element where the step has the whole batch
// (then ldg == ldc == bs), else one per hidden unit. The vectorised passes' bounds follow this
// grouping, so the backward's recompute (tiny_recompute_gates) calls it too: the same bits.
template <typename T>
void tiny_cell_step(int64_t H, int64_t bs, int64_t B, T* g, int64_t ldg, T* c, T* c_out, T* h,
                    int64_t ldc, bool vec16) {
  if (bs == B) {
    cell_forward_block(H * bs, g, g + H * bs, g + 2 * H * bs, g + 3 * H * bs, nullptr, 0, c,
                       c_out, h, vec16);
    return;
  }
  for (int64_t j = 0; j < H; ++j)
    cell_forward_block(bs, g + j * ldg, g + (H + j) * ldg, g + (2 * H + j) * ldg,
                       g + (3 * H + j) * ldg, nullptr, 0, c + j * ldc,
                       c_out ? c_out + j * ldg : nullptr, h + j * ldc, vec16);
}

// Forward steps [first, last] (processing order) of direction d for batch rows [r0, r1).
// gates/cells/pre_proj: the reserve's (null for inference), gates and cells in the small-hidden
// reserve layout (lstm.h), pre_proj row-major; layer_out: this direction's first column of the
// layer output, row stride D*out; or, where ld_out_t > 0 (inference, for the next layer's
// input projection: tiny_input_projection's x_t), this direction's first row of the layer
// output transposed, [D*out][ld_out_t]. h_zero: hT is zero at step `first` (no hx).
template <typename T>
void tiny_forward_steps(const CpuPlan& plan, const LSTMShape& s, const DirectionWeights<T>& w,
                        int64_t d, int64_t first, int64_t last, int64_t r0, int64_t r1,
                        const TinyBuffers<T>& tb, T* gates, T* cells, T* pre_proj,
                        T* layer_out, bool h_zero, int64_t ld_out_t = 0) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, B = s.batch;
  const int64_t out_stride = s.num_directions * out;
  const bool has_proj = s.proj_size > 0;
  const int64_t ld = tb.ld_g;
  const bool avx512 = plan.small_hidden_avx512;
  // A narrow slice's products read W_hh (and W_hr) transposed: this thread's copy, on its stack.
  T w_t[5 * kRowWiseHidden * kRowWiseHidden];
  const auto [w_hh_t, w_hr_t] = r1 - r0 < kTinyNarrowBatch
      ? transpose_recurrent_weights(s, w, w_t, avx512)
      : std::pair<const T*, const T*>{nullptr, nullptr};
  for (int64_t step = first; step <= last; ++step) {
    const int64_t t = time_of(s, d, step);
    const int64_t bs = std::min(s.batch_sizes[t], r1) - r0;
    if (bs <= 0) continue;
    const int64_t off = s.step_offset[t];
    // The step's gates, [4H][ldg] from column r0: its input projection plus the recurrent
    // product. In training the reserve's block of the step (ldg: the step's rows), else compact.
    const int64_t ldg = gates ? s.batch_sizes[t] : bs;
    T* g = gates ? gates + off * G + r0 : tb.gstep + G * r0;
    T* c_out = gates ? cells + off * H + r0 : nullptr;  // c_t, [H][ldg]
    const T* projected = tb.gT + (off - tb.row0) + r0;
    T* hT = tb.hT + r0;
    T* cT = tb.cT + r0;
    T* hnew = tb.hnew + r0;
    if (h_zero && step == first)  // h_{t-1} = 0 (no hx): the gates are the projection
      copy_rows(projected, ld, g, ldg, G, bs);
    else
      tiny_product(bs, G, out, w.w_hh, w_hh_t, hT, B, projected, ld, g, ldg, avx512);
    tiny_cell_step(H, bs, B, g, ldg, cT, c_out, has_proj ? hnew : hT, B, plan.vec16_cell);
    if (has_proj)
      tiny_product<T>(bs, out, H, w.w_hr, w_hr_t, hnew, B, nullptr, 0, hT, B, avx512);
    const int64_t row = off + r0;
    if (gates && has_proj) tiny_transpose(hnew, B, H, bs, pre_proj + row * H, H, avx512);
    if (ld_out_t > 0) copy_rows(hT, B, layer_out + row, ld_out_t, out, bs);
    else tiny_transpose(hT, B, out, bs, layer_out + row * out_stride, out_stride, avx512);
  }
}

// Allocates the small-hidden path's buffers (gT for `g_rows` rows) in `holder`.
template <typename T>
TinyBuffers<T> tiny_buffers(const LSTMShape& s, int64_t g_rows, at::Tensor& holder) {
  const int64_t H = s.hidden_size, B = s.batch;
  const int64_t state = (s.out_size + 2 * H) * B;
  // xT: room for the widest layer input that tiny_input_projection transposes (at most
  // kTinyProjectionInput wide), not for kTinyProjectionInput columns whatever the input.
  const int64_t x_cols = std::min(s.widest_layer_input(), kTinyProjectionInput);
  T* p = scratch<T>(holder, 4 * H * g_rows + state + 4 * H * B + x_cols * g_rows);
  T* st = p + 4 * H * g_rows;
  return TinyBuffers<T>{p, g_rows, 0, st, st + s.out_size * B, st + (s.out_size + H) * B,
                        st + state, st + state + 4 * H * B};
}

}  // namespace
}  // namespace fused_lstm
