// Small hidden sizes (H < kRowWiseHidden): the backward in the batch-fastest layout of
// small_hidden.h (the reverse recurrence, its scratch layout, dL/dx and, for wide batches, the
// weight gradients a step at a time), and the bias gradient's column sums (backward.h).
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "small_hidden.h"

namespace fused_lstm {
namespace {

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
// (CpuPlan::tiny_weight_lanes): for each gate row g of the step's dgates dg [4H][ld] and
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
      for (int64_t b = 0; b < ld; b += 16)
        acc += vec_load<T, 16>(dgg + b) * vec_load<T, 16>(fk + b);
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

// The small-hidden backward's scratch (tiny_backward_steps' `buf`): where each piece starts, in
// elements, and the total that backward.h allocates; one place for both. A piece of no use for
// the shape has no room.
struct TinyBackwardLayout {
  // the step's vectors: carried dL/dh [out][B] and dL/dc [H][B], dL/dh_t [out][bs] and (with a
  // projection) [H][bs], c_{t-1} pieced together [H][bs], c0^T [H][B], dgates [4H][bs]
  int64_t dhT, dcT, dsum, dhH, cp, c0T, dg;
  // recomputing the gates (no gates in the reserve): the step's input transposed, h_{t-1},
  // c_{t-1}, c_t and h_t (tiny_recompute_gates), and for a narrow batch W_hh^T [out][4H]
  int64_t recompute, w_hh_t;
  int64_t dxT;  // the step's dL/dx transposed [in][bs] (TinyDx)
  // the weight gradients a step at a time (tiny_weight_lanes_fit): partial sums [4H][in +
  // out][16] and the bias's [4H][16], the step's x^T and h_{t-1}^T (f) and dgates (dgp), rows
  // padded to a multiple of 16 (tiny_weight_lanes)
  int64_t lanes, bias_lanes, f, dgp;
  int64_t total;
};

inline TinyBackwardLayout tiny_backward_layout(const LSTMShape& s) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, B = s.batch;
  const int64_t in = s.widest_layer_input(), padded = (B + 15) / 16 * 16;
  const bool recompute = !s.gates_in_reserve, steps = tiny_weight_lanes_fit(s);
  TinyBackwardLayout l;
  int64_t at = 0;
  auto take = [&](int64_t n) {
    const int64_t start = at;
    at += n;
    return start;
  };
  l.dhT = take(out * B);
  l.dcT = take(H * B);
  l.dsum = take(out * B);
  l.dhH = take(H * B);
  l.cp = take(H * B);
  l.c0T = take(H * B);
  l.dg = take(G * B);
  l.recompute = take(recompute ? (in + out + 3 * H) * B : 0);
  l.w_hh_t = take(recompute && B > 0 && B < kTinyNarrowBatch ? G * out : 0);
  l.dxT = take(in * B);
  l.lanes = take(steps ? 16 * G * (in + out) : 0);
  l.bias_lanes = take(steps ? 16 * G : 0);
  l.f = take(steps ? (in + out) * padded : 0);
  l.dgp = take(steps ? G * padded : 0);
  l.total = at;
  return l;
}

// The weight and bias gradients of a layer and direction made a step at a time
// (CpuPlan::tiny_step_weight_grads()), written at the end of tiny_backward_steps; null gw_ih:
// made after the loop from every row's dgates instead (backward.h).
template <typename T>
struct TinyWeightGrads {
  T* gw_ih = nullptr;  // [4H][in]
  T* gw_hh = nullptr;  // [4H][out]
  T* gb = nullptr;     // [4H]: b_ih's (b_hh's is the same); null without biases
  bool rows = false;   // along each step's rows (weight_rows16), not in 16-lane partial sums
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
  T* dx = nullptr;  // null: no dL/dx wanted (layer 0 without input_grad); [rows, rc.in_size]
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
  bool avx512;  // CpuPlan::small_hidden_avx512
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
                   hp, ld, rc.avx512);
  if (p.continuing < bs)
    tiny_transpose(rc.h0 + p.continuing * out, out, bs - p.continuing, out, hp + p.continuing,
                   ld, rc.avx512);
}

// Step t's gates [4H][bs] into g as tiny_forward_steps computed them for the whole batch in
// one slice: the step's input projection (tiny_input_projection on its rows, bias first), the
// recurrent product on h_{t-1} (narrow batches through W_hh^T, as there), and the cell pass on
// a copy of c_{t-1} (c_prev, [H][bs]), whose c_t and h_t go to scratch. The same arithmetic on
// the same values, so the same gates (test_fp16_small_hidden_training_recomputes_the_gates;
// lstm.h gates_in_reserve drops them only for inputs the forward, too, projects with
// tiny_product: a GEMM's sums over a step's rows may round otherwise than over every row).
// `scratch`: (widest layer input + out + 3H) x B elements (no input wider than
// kTinyProjectionInput: lstm.h gates_in_reserve, backward.h). `given`: the step's x^T and, after
// its in_size rows, h_{t-1}^T (row stride ld_given) where the caller has them already (the
// weight gradients a step at a time), else null: transposed here.
template <typename T>
void tiny_recompute_gates(const LSTMShape& s, const DirectionWeights<T>& w, const T* w_hh_t,
                          const TinyRecompute<T>& rc, int64_t d, int64_t step, const T* c_prev,
                          T* g, T* scratch, const T* given = nullptr, int64_t ld_given = 0) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, B = s.batch;
  const int64_t t = time_of(s, d, step);
  const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
  T* xT = scratch;                            // [in][bs]
  T* hp = xT + s.widest_layer_input() * B;    // [out][bs]: h_{t-1}
  T* c = hp + out * B;                        // [H][bs]: c_{t-1}, then c_t
  T* c_new = c + H * B;                       // [H][bs]
  T* h = c_new + H * B;                       // [H][bs]
  tiny_input_projection(w, rc.x + off * rc.in_size, bs, rc.in_size, G, g, xT, rc.avx512, given,
                        ld_given);
  if (!(rc.h_zero && step == 0)) {
    const T* h_prev = given ? given + rc.in_size * ld_given : hp;
    if (!given) tiny_h_prev_t(s, d, t, bs, rc, hp);
    tiny_product(bs, G, out, w.w_hh, B < kTinyNarrowBatch ? w_hh_t : nullptr, h_prev,
                 given ? ld_given : bs, g, bs, g, bs, rc.avx512);
  }
  std::copy_n(c_prev, H * bs, c);
  tiny_cell_step(H, bs, B, g, bs, c, c_new, h, bs, rc.vec16);
}

// Step t's share of the weight and bias gradients along its rows (TinyWeightGrads::rows:
// small_hidden_avx512.h weight_rows16), from its dgates dg [4H][bs], the layer input's rows
// and h_{t-1}'s: the previous step's output rows for the rows that continue, h0's for those
// that start here (none where h_zero: h_{t-1} = 0).
template <typename T>
void tiny_weight_rows(const LSTMShape& s, int64_t d, int64_t t, int64_t bs,
                      const TinyRecompute<T>& rc, bool h_zero, const T* dg,
                      const TinyWeightGrads<T>& wg) {
#ifdef FUSED_LSTM_SMALL_HIDDEN_AVX512
  if constexpr (std::is_same_v<T, float>) {
    const int64_t in = rc.in_size, out = s.out_size, out_stride = s.num_directions * out;
    const PrevStep p = prev_step(s, d, t);
    const T* h1 = h_zero || p.continuing == 0
                      ? nullptr : rc.layer_out + s.step_offset[p.t] * out_stride;
    const T* h2 = h_zero ? nullptr : rc.h0 + p.continuing * out;
    const int64_t n1 = h_zero ? bs : p.continuing;
    auto run = [&](auto nx) {
      weight_rows16<decltype(nx)::value>(4 * s.hidden_size, bs, in, out, dg,
                                         rc.x + s.step_offset[t] * in, in, h1, out_stride, n1,
                                         h2, out, wg.gw_ih, wg.gw_hh, wg.gb);
    };
    if (in <= 16) run(std::integral_constant<int, 1>{});
    else run(std::integral_constant<int, 2>{});
    return;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "the small-hidden weight gradients along rows need AVX-512");
}

// The reverse recurrence of one layer and direction for small hidden sizes, in the same
// batch-fastest layout as tiny_forward_steps: carried dL/dh and dL/dc kept as dhT [out, B] and
// dcT [H, B], the step's gates and cells read in place from the reserve (the small-hidden
// layout, lstm.h: each step's [4H][bs] and [H][bs] blocks), one cell pass over the step, and
// dL/dh_{t-1} and dL/dx (TinyDx) as inline products. dgates leaves row-major, as the
// weight-gradient products after the loop read it. `buf`: tiny_backward_layout(s).total elements.
// Where the reserve keeps no gates (lstm.h gates_in_reserve: float16 training, packed
// bfloat16 training with inputs of at most kTinyProjectionInput: backward.h), each step's
// are recomputed first, as tiny_forward_steps computed them (TinyRecompute below), into the
// step's dgates block, which the cell pass then overwrites with the gradients.
// gates: the reserve's, or null to recompute each step's (rc).
template <typename T>
void tiny_backward_steps(const LSTMShape& s, const DirectionWeights<T>& w, int64_t d,
                         const T* gates, const T* cells, const T* c0, const T* dy, T* dh_all,
                         T* dgates, T* dh_state, T* dc_state, T* buf, const TinyDx<T>& dx,
                         const TinyWeightGrads<T>& wg, const TinyRecompute<T>& rc) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, B = s.batch;
  const int64_t out_stride = s.num_directions * out;
  const bool has_proj = s.proj_size > 0;
  const TinyBackwardLayout l = tiny_backward_layout(s);
  T* dhT = buf + l.dhT;
  T* dcT = buf + l.dcT;
  T* dsum = buf + l.dsum;
  T* dhH = buf + l.dhH;
  T* cp = buf + l.cp;
  T* c0T = buf + l.c0T;
  T* dg = buf + l.dg;
  T* recompute_buf = buf + l.recompute;
  T* dxT = buf + l.dxT;
  T* w_hh_t = l.w_hh_t < l.dxT ? buf + l.w_hh_t : nullptr;  // recomputing a narrow batch's gates
  const bool avx512 = rc.avx512;
  if (w_hh_t) tiny_transpose(w.w_hh, out, G, out, w_hh_t, G, avx512);
  const int64_t in = rc.in_size, K = in + out;  // (lanes: [4H][K][16] for this layer)
  T* lanes = buf + l.lanes;
  T* bias_lanes = buf + l.bias_lanes;
  T* f = buf + l.f;
  T* dgp = buf + l.dgp;
  // The weight and bias gradients a step at a time (wg): in 16-lane partial sums, or (rows)
  // straight into the gradients along each step's rows (float32 on AVX-512: plan.h).
  const bool lanes_mode = wg.gw_ih && !wg.rows, rows_mode = wg.gw_ih && wg.rows;
  if (lanes_mode) {
    std::fill_n(lanes, 16 * G * K, T(0));
    std::fill_n(bias_lanes, 16 * G, T(0));
  }
  if (rows_mode) {
    std::fill_n(wg.gw_ih, G * in, T(0));
    std::fill_n(wg.gw_hh, G * out, T(0));
    if (wg.gb) std::fill_n(wg.gb, G, T(0));
  }
  // grad_hy (or zeros), as the caller filled it
  tiny_transpose(dh_state, out, B, out, dhT, B, avx512);
  tiny_transpose(dc_state, H, B, H, dcT, B, avx512);
  tiny_transpose(c0, H, B, H, c0T, B, avx512);
  for (int64_t step = s.seq_len - 1; step >= 0; --step) {
    const int64_t t = time_of(s, d, step);
    const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
    if (bs == 0) continue;
    const T* dy_t = dy + off * out_stride + d * out;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t b = 0; b < bs; ++b) dsum[o * bs + b] = dhT[o * B + b] + dy_t[b * out_stride + o];
    T* dh_t = dsum;
    if (has_proj) {
      tiny_transpose(dsum, bs, out, bs, dh_all + off * out, out, avx512);
      tiny_product_t<T>(bs, H, out, w.w_hr, dsum, bs, nullptr, 0, dhH, bs, avx512);
      dh_t = dhH;
    }
    const T* ct = cells + off * H;  // [H][bs]
    const T* cpv = tiny_c_prev(s, d, t, bs, cells, c0T, cp);
    // The step's activated gates [4H][bs]: the reserve's, or recomputed into dg, whose cell
    // pass then writes each gradient over its gate (cell_backward_in_place: the same bits).
    const T* gm = gates ? gates + off * G : dg;
    // The step's x^T and h_{t-1}^T for its share of the weight gradients (wg), rows padded to
    // ld (tiny_weight_lanes); the recomputed gates read them too.
    const int64_t ld = (bs + 15) / 16 * 16;
    const bool h_zero = rc.h_zero && step == 0;  // h_{t-1} = 0: no share of W_hh's
    const int64_t k_used = h_zero ? in : K;
    if (lanes_mode) {
      tiny_transpose(rc.x + off * in, in, bs, in, f, ld, avx512);
      if (!h_zero) tiny_h_prev_t(s, d, t, bs, rc, f + in * ld, ld);
      if (ld > bs)
        for (int64_t k = 0; k < k_used; ++k) std::fill(f + k * ld + bs, f + (k + 1) * ld, T(0));
    }
    if (!gates)
      tiny_recompute_gates(s, w, w_hh_t, rc, d, step, cpv, dg, recompute_buf,
                           lanes_mode ? f : nullptr, ld);
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
    if (rows_mode) {  // this step's share of the weight and bias gradients (TinyWeightGrads)
      tiny_weight_rows(s, d, t, bs, rc, h_zero, dg, wg);
    } else if (lanes_mode) {
      for (int64_t g = 0; g < G; ++g) {
        std::copy_n(dg + g * bs, bs, dgp + g * ld);
        std::fill(dgp + g * ld + bs, dgp + (g + 1) * ld, T(0));
      }
      tiny_weight_lanes(G, K, k_used, ld, dgp, f, lanes, wg.gb ? bias_lanes : nullptr);
    } else {
      tiny_transpose(dg, bs, G, bs, dgates + off * G, G, avx512);
    }
    // dL/dh_{t-1}, rows < bs
    tiny_product_t<T>(bs, out, G, w.w_hh, dg, bs, nullptr, 0, dhT, B, avx512);
    if (dx.dx) {  // dL/dx of the step's rows (TinyDx)
      tiny_product_t<T>(bs, in, G, w.w_ih, dg, bs, nullptr, 0, dxT, bs, avx512);
      T* rows_dx = dx.dx + off * in;
      if (!dx.add) {
        tiny_transpose(dxT, bs, in, bs, rows_dx, in, avx512);
      } else {
        for (int64_t b = 0; b < bs; ++b)
          for (int64_t i = 0; i < in; ++i) rows_dx[b * in + i] += dxT[i * bs + b];
      }
    }
  }
  tiny_transpose(dhT, B, out, B, dh_state, out, avx512);
  tiny_transpose(dcT, B, H, B, dc_state, H, avx512);
  if (lanes_mode) tiny_weight_sums(G, in, out, lanes, bias_lanes, wg.gw_ih, wg.gw_hh, wg.gb);
}

}  // namespace
}  // namespace fused_lstm
