// Small hidden sizes (H < kRowWiseHidden): the batch-fastest layout, forward and backward.
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
template <typename T>
void tiny_transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                    int64_t ld_dst) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(__GNUC__) && defined(__x86_64__)
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

// out[j] += the sum over rows r of a[r * lda + j], for j < cols: the bias gradient's sums over
// the rows of dgates at small hidden sizes (backward.h add_bias_grad). Each column summed in row
// order, as the plain loop sums it (the same bits), but in vector registers, 16 columns at a
// time, rows in blocks that stay in cache across the column blocks. The plain loop kept each
// sum in memory (gb may alias dgates for the compiler): at 4H = 12 columns a chain of
// load-add-store per row, ~1.7 us of a seed-tiny training call (benchmarks/notes/
// small-hidden.md, "The bias gradient's sums in registers").
constexpr int64_t kColumnSumsMaxCols = 64;

template <typename T>
__attribute__((always_inline)) inline void column_sums_loop(const T* __restrict a, int64_t lda,
                                                            int64_t rows, int64_t cols,
                                                            T* __restrict out) {
  constexpr int64_t kRowBlock = 256;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t r1 = std::min(rows, r0 + kRowBlock);
    for_width_blocks(cols, [&](auto width, int64_t j0) __attribute__((always_inline)) {
      constexpr int V = decltype(width)::value;
      Vec<T, V> acc = vec_load<T, V>(out + j0);
      for (int64_t r = r0; r < r1; ++r) acc += vec_load<T, V>(a + r * lda + j0);
      vec_store<T, V>(out + j0, acc);
    });
  }
}

#define FUSED_LSTM_DEFINE_COLUMN_SUMS(T)                                                       \
  FUSED_LSTM_SIMD_CLONES void add_column_sums(const T* a, int64_t lda, int64_t rows,          \
                                              int64_t cols, T* out) {                          \
    column_sums_loop<T>(a, lda, rows, cols, out);                                              \
  }
FUSED_LSTM_DEFINE_COLUMN_SUMS(float)
FUSED_LSTM_DEFINE_COLUMN_SUMS(double)
#undef FUSED_LSTM_DEFINE_COLUMN_SUMS

// One step's share of a layer's weight and bias gradients in 16-lane partial sums
// (CpuPlan::tiny_step_weight_grads): for each gate row g of the step's dgates dg [4H][ld] and
// each row k < k_used of f [k_used][ld] (the step's x^T, then h_{t-1}^T), both with their
// columns from bs up to ld (a multiple of 16) zero, lanes[(g * K + k) * 16 + l] += the
// products dg[g][b] f[k][b] of the columns b with b % 16 == l; bias_lanes[g * 16 + l] (if
// given) likewise += dg[g][b]. tiny_weight_sums then adds each element's 16 lanes. Whole
// vectors only: a scalar tail read back a lane just stored as part of a vector, which stalled
// the loads (perf on the AMD EPYC Zen 5). The order of the sums is fixed by the shapes.
template <typename T>
__attribute__((always_inline)) inline void weight_lanes_loop(int64_t G, int64_t K, int64_t k_used,
                                                             int64_t ld, const T* __restrict dg,
                                                             const T* __restrict f,
                                                             T* __restrict lanes,
                                                             T* __restrict bias_lanes) {
  for (int64_t g = 0; g < G; ++g) {
    const T* dgg = dg + g * ld;
    if (bias_lanes) {
      T* bl = bias_lanes + g * 16;
      Vec<T, 16> acc = vec_load<T, 16>(bl);
      for (int64_t b = 0; b < ld; b += 16) acc += vec_load<T, 16>(dgg + b);
      vec_store<T, 16>(bl, acc);
    }
    for (int64_t k = 0; k < k_used; ++k) {
      const T* fk = f + k * ld;
      T* lk = lanes + (g * K + k) * 16;
      Vec<T, 16> acc = vec_load<T, 16>(lk);
      for (int64_t b = 0; b < ld; b += 16) acc += vec_load<T, 16>(dgg + b) * vec_load<T, 16>(fk + b);
      vec_store<T, 16>(lk, acc);
    }
  }
}

#define FUSED_LSTM_DEFINE_WEIGHT_LANES(T)                                                      \
  FUSED_LSTM_SIMD_CLONES void tiny_weight_lanes(int64_t G, int64_t K, int64_t k_used,          \
                                                int64_t ld, const T* dg, const T* f, T* lanes,  \
                                                T* bias_lanes) {                                \
    weight_lanes_loop<T>(G, K, k_used, ld, dg, f, lanes, bias_lanes);                          \
  }
FUSED_LSTM_DEFINE_WEIGHT_LANES(float)
FUSED_LSTM_DEFINE_WEIGHT_LANES(double)
#undef FUSED_LSTM_DEFINE_WEIGHT_LANES

// The gradients from tiny_weight_lanes' partial sums: gw_ih [4H][in] and gw_hh [4H][out] (the
// first in and the next out of each gate row's K = in + out elements) and gb [4H] (if given),
// each the sum of its 16 lanes in lane order.
template <typename T>
void tiny_weight_sums(int64_t G, int64_t in, int64_t out, const T* lanes, const T* bias_lanes,
                      T* gw_ih, T* gw_hh, T* gb) {
  auto sum16 = [](const T* l) {
    T sum = T(0);
    for (int i = 0; i < 16; ++i) sum += l[i];
    return sum;
  };
  const int64_t K = in + out;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = 0; i < in; ++i) gw_ih[g * in + i] = sum16(lanes + (g * K + i) * 16);
    for (int64_t o = 0; o < out; ++o) gw_hh[g * out + o] = sum16(lanes + (g * K + in + o) * 16);
    if (gb) gb[g] = sum16(bias_lanes + g * 16);
  }
}

// Batches narrower than this take tiny_product_rows where the caller has w transposed.
constexpr int64_t kTinyNarrowBatch = 8;

// y = y_in + w h (see tiny_product_block), w also given transposed (wT [cols_w][rows_w], or
// null): the narrow-batch kernel where it pays.
template <typename T>
inline void tiny_product(int64_t n, int64_t rows_w, int64_t cols_w, const T* w, const T* wT,
                         const T* h, int64_t ld_h, const T* y_in, int64_t ld_in, T* y,
                         int64_t ld_y) {
  if (wT != nullptr && n < kTinyNarrowBatch)
    tiny_product_rows(n, rows_w, cols_w, wT, h, ld_h, y_in, ld_in, y, ld_y);
  else
    tiny_product_cols(n, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);
}

// y = y_in + w h as tiny_product, given only wT [cols_w][rows_w] (a weight as stored, used
// transposed: the backward's dL/dh_{t-1} and dL/dx products): no transposed copy of it needed.
template <typename T>
inline void tiny_product_t(int64_t n, int64_t rows_w, int64_t cols_w, const T* wT, const T* h,
                           int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y) {
  if (n < kTinyNarrowBatch)
    tiny_product_rows(n, rows_w, cols_w, wT, h, ld_h, y_in, ld_in, y, ld_y);
  else
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
                           int64_t in_size, int64_t G, T* gT, T* xT, const T* x_t = nullptr,
                           int64_t ld_x_t = 0) {
  if (w.b_ih)
    for (int64_t r = 0; r < G; ++r) std::fill_n(gT + r * rows, rows, w.b_ih[r] + w.b_hh[r]);
  if (in_size <= kTinyProjectionInput) {
    if (x_t == nullptr) {
      tiny_transpose(x, in_size, rows, in_size, xT, rows);
      x_t = xT;
      ld_x_t = rows;
    }
    tiny_product<T>(rows, G, in_size, w.w_ih, nullptr, x_t, ld_x_t, w.b_ih ? gT : nullptr, rows,
                    gT, rows);
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
                                                          const DirectionWeights<T>& w, T* dst) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size;
  tiny_transpose(w.w_hh, out, G, out, dst, G);
  if (s.proj_size == 0) return {dst, nullptr};
  tiny_transpose(w.w_hr, H, out, H, dst + G * out, out);
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
  // A narrow slice's products read W_hh (and W_hr) transposed: this thread's copy, on its stack.
  T w_t[5 * kRowWiseHidden * kRowWiseHidden];
  const auto [w_hh_t, w_hr_t] = r1 - r0 < kTinyNarrowBatch
      ? transpose_recurrent_weights(s, w, w_t)
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
      tiny_product(bs, G, out, w.w_hh, w_hh_t, hT, B, projected, ld, g, ldg);
    tiny_cell_step(H, bs, B, g, ldg, cT, c_out, has_proj ? hnew : hT, B, plan.vec16_cell);
    if (has_proj) tiny_product<T>(bs, out, H, w.w_hr, w_hr_t, hnew, B, nullptr, 0, hT, B);
    const int64_t row = off + r0;
    if (gates && has_proj) tiny_transpose(hnew, B, H, bs, pre_proj + row * H, H);
    if (ld_out_t > 0) copy_rows(hT, B, layer_out + row, ld_out_t, out, bs);
    else tiny_transpose(hT, B, out, bs, layer_out + row * out_stride, out_stride);
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

// c_{t-1} of step t's bs rows (direction d) as a compact [H][bs] block, from the reserve's cells
// in the small-hidden layout (lstm.h) and c0T ([H][B], c0 transposed): the previous step's
// block itself where it has exactly these rows, else its first columns and c0T's for the rows
// that start at t (a packed batch), pieced together in `buf` [H][bs].
template <typename T>
const T* tiny_c_prev(const LSTMShape& s, int64_t d, int64_t t, int64_t bs, const T* cells,
                     const T* c0T, T* buf) {
  const int64_t H = s.hidden_size, B = s.batch;
  const PrevStep p = prev_step(s, d, t);
  const int64_t prev_bs = p.t >= 0 ? s.batch_sizes[p.t] : 0;
  const int64_t continuing = std::min(bs, prev_bs);
  const T* prev = p.t >= 0 ? cells + s.step_offset[p.t] * H : nullptr;
  if (continuing == bs && prev_bs == bs) return prev;
  if (continuing == 0 && bs == B) return c0T;
  if (continuing > 0) copy_rows(prev, prev_bs, buf, bs, H, continuing);
  if (continuing < bs) copy_rows(c0T + continuing, B, buf + continuing, bs, H, bs - continuing);
  return buf;
}

// The reverse recurrence of one layer and direction for small hidden sizes, in the same
// batch-fastest layout as tiny_forward_steps: carried dL/dh and dL/dc kept as dhT [out, B] and
// dcT [H, B], the step's gates and cells read in place from the reserve (the small-hidden
// layout, lstm.h: each step's [4H][bs] and [H][bs] blocks), one cell pass over the step, and
// dL/dh_{t-1} and dL/dx (TinyDx) as inline products. dgates leaves row-major, as the
// weight-gradient products after the loop read it. `buf`: tiny_backward_numel(s) elements.
// Where the reserve keeps no gates (lstm.h gates_in_reserve: float16 training, packed
// bfloat16 training with inputs of at most kTinyProjectionInput: backward.h), each step's
// are recomputed first, as tiny_forward_steps computed them (TinyRecompute below), into the
// step's dgates block, which the cell pass then overwrites with the gradients.
template <typename T>
int64_t tiny_backward_numel(const LSTMShape& s) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size;
  // The step's vectors; then, recomputing the gates, the step's input transposed, h_{t-1},
  // c_{t-1}, c_t and h_t, and for a narrow batch W_hh^T (the forward's narrow-batch product);
  // then the step's dL/dx transposed (TinyDx). (The backward's own products read the weights as
  // stored: tiny_product_t.)
  const int64_t in = s.widest_layer_input();
  const int64_t recompute =
      s.gates_in_reserve
          ? 0
          : (in + out + 3 * H) * s.batch +
                (s.batch > 0 && s.batch < kTinyNarrowBatch ? G * out : 0);
  // With the weight gradients a step at a time (tiny_step_weight_grads): the partial sums, and
  // the step's x^T and h_{t-1}^T and its dgates, their rows padded to a multiple of 16.
  const int64_t step_weights =
      tiny_step_weight_grads(s)
          ? 16 * G * (in + out + 1) + (in + out + G) * ((s.batch + 15) / 16 * 16)
          : 0;
  return (2 * out + 4 * H + G) * s.batch + recompute + in * s.batch + step_weights;
}

// The weight and bias gradients of a layer and direction made a step at a time
// (CpuPlan::tiny_step_weight_grads), written at the end of tiny_backward_steps; null gw_ih:
// made after the loop from every row's dgates instead (backward.h).
template <typename T>
struct TinyWeightGrads {
  T* gw_ih = nullptr;  // [4H][in]
  T* gw_hh = nullptr;  // [4H][out]
  T* gb = nullptr;     // [4H]: b_ih's (b_hh's is the same); null without biases
};

// dL/dx of a layer and direction, computed a step at a time by tiny_backward_steps from the
// step's dgates block as the cell pass leaves it ([4H][bs]: dxT [in][bs] = W_ih^T dgates_t, an
// inline product along the batch as dL/dh_{t-1}'s), then written into the step's rows of dx
// ([rows, in_size] row-major; added where `add`: a second direction). Not as one product over
// every row's dgates after the loop: that product reads dgates across its rows (a gather of 16
// rows 4H floats apart per multiply-add) and took ~5 us of a ~77 us seed-tiny training call on
// the AMD EPYC Zen 5 (benchmarks/notes/small-hidden.md, "What the backward's products after
// the loop cost").
template <typename T>
struct TinyDx {
  T* dx = nullptr;  // null: no dL/dx wanted (layer 0 without input_grad)
  int64_t in_size = 0;
  bool add = false;
};

// What recomputing a step's gates reads (tiny_backward_steps without gates in the reserve):
// the layer input x [rows, in_size] row-major, its output in the reserve (this direction's
// first column, row stride D * out), h0 [B, out] (zeros without hx), h_zero: no hx (the first
// step's gates are its projection, as tiny_forward_steps has them), and the cell pass's setting.
template <typename T>
struct TinyRecompute {
  const T* x;
  int64_t in_size;
  const T* layer_out;
  const T* h0;
  bool h_zero;
  bool vec16;
};

// h_{t-1} of step t's bs rows (direction d) as hp [out][bs]: the previous step's output (the
// reserve's layer output, rc.layer_out) for the rows that continue, h0 for those that start.
// (hp's row stride: ld, or bs where 0.)
template <typename T>
void tiny_h_prev_t(const LSTMShape& s, int64_t d, int64_t t, int64_t bs,
                   const TinyRecompute<T>& rc, T* hp, int64_t ld = 0) {
  if (ld == 0) ld = bs;
  const int64_t out = s.out_size, out_stride = s.num_directions * out;
  const PrevStep p = prev_step(s, d, t);
  if (p.continuing > 0)
    tiny_transpose(rc.layer_out + s.step_offset[p.t] * out_stride, out_stride, p.continuing, out,
                   hp, ld);
  if (p.continuing < bs)
    tiny_transpose(rc.h0 + p.continuing * out, out, bs - p.continuing, out, hp + p.continuing,
                   ld);
}

// Step t's gates [4H][bs] into g as tiny_forward_steps computed them for the whole batch in
// one slice: the step's input projection (tiny_input_projection on its rows, bias first), the
// recurrent product on h_{t-1} (narrow batches through W_hh^T, as there), and the cell pass on
// a copy of c_{t-1} (c_prev, [H][bs]), whose c_t and h_t go to scratch. The same arithmetic on
// the same values, so the same gates (test_fp16_small_hidden_training_recomputes_the_gates;
// lstm.h gates_in_reserve drops them only for inputs the forward, too, projects with
// tiny_product: a GEMM's sums over a step's rows may round otherwise than over every row).
// `scratch`: (widest layer input + out + 3H) x B elements (no input wider than
// kTinyProjectionInput: lstm.h gates_in_reserve, backward.h).
template <typename T>
void tiny_recompute_gates(const LSTMShape& s, const DirectionWeights<T>& w, const T* w_hh_t,
                          const TinyRecompute<T>& rc, int64_t d, int64_t step, const T* c_prev,
                          T* g, T* scratch) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, B = s.batch;
  const int64_t t = time_of(s, d, step);
  const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
  T* xT = scratch;                            // [in][bs]
  T* hp = xT + s.widest_layer_input() * B;    // [out][bs]: h_{t-1}
  T* c = hp + out * B;                        // [H][bs]: c_{t-1}, then c_t
  T* c_new = c + H * B;                       // [H][bs]
  T* h = c_new + H * B;                       // [H][bs]
  tiny_input_projection(w, rc.x + off * rc.in_size, bs, rc.in_size, G, g, xT);
  if (!(rc.h_zero && step == 0)) {
    tiny_h_prev_t(s, d, t, bs, rc, hp);
    tiny_product(bs, G, out, w.w_hh, B < kTinyNarrowBatch ? w_hh_t : nullptr, hp, bs, g, bs, g,
                 bs);
  }
  std::copy_n(c_prev, H * bs, c);
  tiny_cell_step(H, bs, B, g, bs, c, c_new, h, bs, rc.vec16);
}

// gates: the reserve's, or null to recompute each step's (rc).
template <typename T>
void tiny_backward_steps(const LSTMShape& s, const DirectionWeights<T>& w, int64_t d,
                         const T* gates, const T* cells, const T* c0, const T* dy, T* dh_all,
                         T* dgates, T* dh_state, T* dc_state, T* buf, const TinyDx<T>& dx,
                         const TinyWeightGrads<T>& wg, const TinyRecompute<T>& rc) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, B = s.batch;
  const int64_t out_stride = s.num_directions * out;
  const bool has_proj = s.proj_size > 0;
  T* dhT = buf;               // [out][B]
  T* dcT = dhT + out * B;     // [H][B]
  T* dsum = dcT + H * B;      // [out][bs]
  T* dhH = dsum + out * B;    // [H][bs]
  T* cp = dhH + H * B;        // [H][bs]
  T* c0T = cp + H * B;        // [H][B]
  T* dg = c0T + H * B;        // [4H][bs]
  T* recompute_buf = dg + G * B;
  const int64_t in = dx.in_size;
  T* dxT = recompute_buf;     // [in][bs]
  T* w_hh_t = nullptr;        // W_hh^T [out][4H]: recomputing a narrow batch's gates
  if (!s.gates_in_reserve) {  // (as tiny_backward_numel; an empty batch's gates are null too)
    dxT += (s.widest_layer_input() + out + 3 * H) * B;
    if (B > 0 && B < kTinyNarrowBatch) {
      w_hh_t = dxT;
      dxT += G * out;
      tiny_transpose(w.w_hh, out, G, out, w_hh_t, G);
    }
  }
  // The weight gradients a step at a time (wg): partial sums, then the step's x^T and
  // h_{t-1}^T (f) and dgates (dgp), rows of a multiple of 16 (tiny_weight_lanes), after dxT.
  const int64_t K = in + out;
  T* lanes = dxT + s.widest_layer_input() * B;
  T* bias_lanes = lanes + 16 * G * K;
  T* f = bias_lanes + 16 * G;
  T* dgp = f + (s.widest_layer_input() + out) * ((B + 15) / 16 * 16);
  if (wg.gw_ih) std::fill_n(lanes, 16 * G * (K + 1), T(0));
  tiny_transpose(dh_state, out, B, out, dhT, B);  // grad_hy (or zeros), as the caller filled it
  tiny_transpose(dc_state, H, B, H, dcT, B);
  tiny_transpose(c0, H, B, H, c0T, B);
  for (int64_t step = s.seq_len - 1; step >= 0; --step) {
    const int64_t t = time_of(s, d, step);
    const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
    if (bs == 0) continue;
    const T* dy_t = dy + off * out_stride + d * out;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t b = 0; b < bs; ++b) dsum[o * bs + b] = dhT[o * B + b] + dy_t[b * out_stride + o];
    T* dh_t = dsum;
    if (has_proj) {
      tiny_transpose(dsum, bs, out, bs, dh_all + off * out, out);
      tiny_product_t<T>(bs, H, out, w.w_hr, dsum, bs, nullptr, 0, dhH, bs);
      dh_t = dhH;
    }
    const T* ct = cells + off * H;  // [H][bs]
    const T* cpv = tiny_c_prev(s, d, t, bs, cells, c0T, cp);
    // The step's activated gates [4H][bs]: the reserve's, or recomputed into dg, whose cell
    // pass then writes each gradient over its gate (cell_backward_in_place: the same bits).
    const T* gm = gates ? gates + off * G : dg;
    if (!gates) tiny_recompute_gates(s, w, w_hh_t, rc, d, step, cpv, dg, recompute_buf);
    const int64_t n = H * bs;  // a gate's elements in the step's block
    auto cell_pass = [&](int64_t m, int64_t e, T* dc) {  // m elements of each gate from e
      if (gates)
        cell_backward_block(m, gm + e, gm + n + e, gm + 2 * n + e, gm + 3 * n + e, ct + e,
                            cpv + e, dh_t + e, dc, dg + e, dg + n + e, dg + 2 * n + e,
                            dg + 3 * n + e);
      else
        cell_backward_in_place(m, dg + e, dg + n + e, dg + 2 * n + e, dg + 3 * n + e, ct + e,
                               cpv + e, dh_t + e, dc);
    };
    if (bs == B) {
      cell_pass(n, 0, dcT);
    } else {
      for (int64_t j = 0; j < H; ++j) cell_pass(bs, j * bs, dcT + j * B);
    }
    if (wg.gw_ih) {  // this step's share of the weight and bias gradients (TinyWeightGrads)
      const int64_t ld = (bs + 15) / 16 * 16;
      const bool h_zero = rc.h_zero && step == 0;  // h_{t-1} = 0: no share of W_hh's
      const int64_t k_used = h_zero ? in : K;
      tiny_transpose(rc.x + off * in, in, bs, in, f, ld);
      if (!h_zero) tiny_h_prev_t(s, d, t, bs, rc, f + in * ld, ld);
      for (int64_t g = 0; g < G; ++g) std::copy_n(dg + g * bs, bs, dgp + g * ld);
      if (ld > bs) {
        for (int64_t k = 0; k < k_used; ++k) std::fill(f + k * ld + bs, f + (k + 1) * ld, T(0));
        for (int64_t g = 0; g < G; ++g) std::fill(dgp + g * ld + bs, dgp + (g + 1) * ld, T(0));
      }
      tiny_weight_lanes(G, K, k_used, ld, dgp, f, lanes, wg.gb ? bias_lanes : nullptr);
    } else {
      tiny_transpose(dg, bs, G, bs, dgates + off * G, G);
    }
    tiny_product_t<T>(bs, out, G, w.w_hh, dg, bs, nullptr, 0, dhT, B);  // dL/dh_{t-1}, rows < bs
    if (dx.dx) {  // dL/dx of the step's rows (TinyDx)
      tiny_product_t<T>(bs, in, G, w.w_ih, dg, bs, nullptr, 0, dxT, bs);
      T* rows_dx = dx.dx + off * in;
      if (!dx.add) {
        tiny_transpose(dxT, bs, in, bs, rows_dx, in);
      } else {
        for (int64_t b = 0; b < bs; ++b)
          for (int64_t i = 0; i < in; ++i) rows_dx[b * in + i] += dxT[i * bs + b];
      }
    }
  }
  tiny_transpose(dhT, B, out, B, dh_state, out);
  tiny_transpose(dcT, B, H, B, dc_state, H);
  if (wg.gw_ih) tiny_weight_sums(G, in, out, lanes, bias_lanes, wg.gw_ih, wg.gw_hh, wg.gb);
}

}  // namespace
}  // namespace fused_lstm
