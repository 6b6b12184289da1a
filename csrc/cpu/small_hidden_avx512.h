// The small-hidden kernel's AVX-512 variant (CpuPlan::small_hidden_avx512, float32): its inline
// products on one 16-lane vector per 16 batch columns with a masked tail, and its narrow
// transposes by in-register permutes: the same arithmetic in the same order as the generic
// code of small_hidden.h (target_clones, Vec<T, V> blocks of 16, 8, 4, 2, 1 lanes; transposes
// by gathers and scatters), so the same bits, with fewer instructions
// (benchmarks/notes/small-hidden.md, "Masked 16-lane products and permute transposes"). And
// the backward's weight gradients summed along each step's rows (CpuPlan::tiny_weight_rows),
// which the generic code computes by products after the step loop instead, summing in another
// order ("The weight gradients along each step's rows").
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace fused_lstm {
namespace {

// Whether this build has these kernels (GCC or Clang, x86-64): plan.h asks.
#if defined(__GNUC__) && defined(__x86_64__)
#define FUSED_LSTM_SMALL_HIDDEN_AVX512 1
constexpr bool kSmallHiddenAvx512Built = true;

// The flat positions [0, count) of a 16-float vector.
inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF)
                     : __mmask16((uint32_t{1} << std::max<int64_t>(count, 0)) - 1);
}

// ---- Products ----
// tiny_product's y[r][b] = y_in[r][b] + sum_i w(r, i) h[i][b] (small_hidden.h) for rows
// [r, r + R) and batch columns [b0, b0 + 16) under mask m: the lanes past the batch are neither
// loaded nor stored. Each element's sum runs over i in order, one fused multiply-add per term
// (as the generic blocks' contracted `acc += w * h`), whatever R is; R only sets how many
// independent chains run at once.
template <int R, bool kT>
__attribute__((target("avx512f,fma"), always_inline)) inline void masked_rows16(
    int64_t r, int64_t b0, __mmask16 m, int64_t rows_w, int64_t cols_w, const float* __restrict w,
    const float* __restrict h, int64_t ld_h, const float* y_in, int64_t ld_in, float* y,
    int64_t ld_y) {
  __m512 acc[R];
  for (int k = 0; k < R; ++k)
    acc[k] = y_in ? _mm512_maskz_loadu_ps(m, y_in + (r + k) * ld_in + b0) : _mm512_setzero_ps();
  const float* __restrict wr = kT ? w + r : w + r * cols_w;
  for (int64_t i = 0; i < cols_w; ++i) {
    const __m512 hi = _mm512_maskz_loadu_ps(m, h + i * ld_h + b0);
    for (int k = 0; k < R; ++k)
      acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(kT ? wr[i * rows_w + k] : wr[k * cols_w + i]), hi,
                               acc[k]);
  }
  for (int k = 0; k < R; ++k) _mm512_mask_storeu_ps(y + (r + k) * ld_y + b0, m, acc[k]);
}

// The whole product: batch columns 16 at a time (the last block masked); rows 8 at a time
// (8 chains cover the FMA latency on two ports) until at most 12 are left (kT; 8 for w as
// rows, below), which go as one group (a tail of 2 rows would be two chains of cols_w
// dependent multiply-adds).
template <bool kT>
__attribute__((target("avx512f,fma"))) void masked_product16(
    int64_t n, int64_t rows_w, int64_t cols_w, const float* w, const float* h, int64_t ld_h,
    const float* y_in, int64_t ld_in, float* y, int64_t ld_y) {
  for (int64_t b0 = 0; b0 < n; b0 += 16) {
    const __mmask16 m = first_lanes(n - b0);
    int64_t r = 0;
    // (w as rows, kT false: each of a group's rows is a pointer of its own, cols_w apart, and
    // more than 8 do not fit the registers: groups of 8, 4, 2, 1.)
    for (; rows_w - r > (kT ? 12 : 8); r += 8)
      masked_rows16<8, kT>(r, b0, m, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);
    if (!kT && rows_w - r > 4 && rows_w - r < 8) {
      masked_rows16<4, kT>(r, b0, m, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);
      r += 4;
    }
    if (!kT && rows_w - r == 3) {
      masked_rows16<2, kT>(r, b0, m, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);
      r += 2;
    }
#define FUSED_LSTM_MASKED_TAIL(R)                                                     \
  case R:                                                                             \
    masked_rows16<R, kT>(r, b0, m, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y); \
    break;
    switch (rows_w - r) {
      FUSED_LSTM_MASKED_TAIL(1) FUSED_LSTM_MASKED_TAIL(2) FUSED_LSTM_MASKED_TAIL(3)
      FUSED_LSTM_MASKED_TAIL(4) FUSED_LSTM_MASKED_TAIL(5) FUSED_LSTM_MASKED_TAIL(6)
      FUSED_LSTM_MASKED_TAIL(7) FUSED_LSTM_MASKED_TAIL(8) FUSED_LSTM_MASKED_TAIL(9)
      FUSED_LSTM_MASKED_TAIL(10) FUSED_LSTM_MASKED_TAIL(11) FUSED_LSTM_MASKED_TAIL(12)
      default: break;  // none left
    }
#undef FUSED_LSTM_MASKED_TAIL
  }
}

// ---- Weight gradients along the rows ----
// One step's share of a layer's weight and bias gradients for batches too narrow for
// tiny_weight_lanes' 16-lane partial sums (CpuPlan::tiny_weight_rows): for each gate row g
// of the step's gate-major dgates dg [4H][bs],
//   gw_ih[g][i] += sum_b dg[g][b] x_b[i],  gw_hh[g][o] += sum_b dg[g][b] h_b[o],
//   gb[g] += sum_b dg[g][b],
// each sum in row order, one fused multiply-add per term, into the gradients themselves (no
// partial sums held). x_b: row b of the step's input, x + b * ld_x ([in], in <= 16 * NX);
// h_b: row b of h_{t-1}, h1 + b * ld_h1 for b < n1 (rows continuing from the previous step),
// h2 + (b - n1) * ld_h2 after them (rows starting here, from h0), or zero where h1 and h2 are
// null; out < 16, so lane `out` of h_b's vector holds 1 and its sum is the bias's (gb may be
// null: no biases). Gate rows 4 at a time (4H is a multiple of 4): each x_b and h_b loaded
// once for four rows' 4 (NX + 1) independent chains.
template <int NX>
__attribute__((target("avx512f,fma"))) void weight_rows16(
    int64_t G, int64_t bs, int64_t in, int64_t out, const float* __restrict dg,
    const float* x, int64_t ld_x, const float* h1, int64_t ld_h1, int64_t n1, const float* h2,
    int64_t ld_h2, float* gw_ih, float* gw_hh, float* gb) {
  const __mmask16 m0 = first_lanes(in), m1 = first_lanes(in - 16), mh = first_lanes(out);
  const __mmask16 one = __mmask16(1u << out);
  const __m512 ones = _mm512_set1_ps(1.0f);
  const __m512i lane_out = _mm512_set1_epi32(static_cast<int>(out));
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    // The four gate rows' sums in named registers (GCC kept arrays of them in memory, storing
    // every one on every row).
    float* wi = gw_ih + g0 * in;
    float* wh = gw_hh + g0 * out;
    __m512 a0 = _mm512_maskz_loadu_ps(m0, wi), a1 = _mm512_maskz_loadu_ps(m0, wi + in);
    __m512 a2 = _mm512_maskz_loadu_ps(m0, wi + 2 * in);
    __m512 a3 = _mm512_maskz_loadu_ps(m0, wi + 3 * in);
    __m512 b0 = _mm512_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;  // columns 16-31 (NX 2)
    if constexpr (NX == 2) {
      b0 = _mm512_maskz_loadu_ps(m1, wi + 16);
      b1 = _mm512_maskz_loadu_ps(m1, wi + in + 16);
      b2 = _mm512_maskz_loadu_ps(m1, wi + 2 * in + 16);
      b3 = _mm512_maskz_loadu_ps(m1, wi + 3 * in + 16);
    }
    __m512 h0 = _mm512_maskz_loadu_ps(mh, wh), h1s = _mm512_maskz_loadu_ps(mh, wh + out);
    __m512 h2s = _mm512_maskz_loadu_ps(mh, wh + 2 * out);
    __m512 h3 = _mm512_maskz_loadu_ps(mh, wh + 3 * out);
    if (gb) {  // the bias's running sums in lane `out`
      h0 = _mm512_mask_mov_ps(h0, one, _mm512_set1_ps(gb[g0]));
      h1s = _mm512_mask_mov_ps(h1s, one, _mm512_set1_ps(gb[g0 + 1]));
      h2s = _mm512_mask_mov_ps(h2s, one, _mm512_set1_ps(gb[g0 + 2]));
      h3 = _mm512_mask_mov_ps(h3, one, _mm512_set1_ps(gb[g0 + 3]));
    }
    const float* d = dg + g0 * bs;
    // Rows [r0, r1) whose h_{t-1} rows are hb + (b - r0) * ld_h (hb null: zero).
    auto rows = [&](int64_t r0, int64_t r1, const float* hb, int64_t ld_h)
                    __attribute__((target("avx512f,fma"), always_inline)) {
      for (int64_t b = r0; b < r1; ++b) {
        const __m512 xv = _mm512_maskz_loadu_ps(m0, x + b * ld_x);
        const __m512 xw = NX == 2 ? _mm512_maskz_loadu_ps(m1, x + b * ld_x + 16) : xv;
        __m512 hv = hb ? _mm512_maskz_loadu_ps(mh, hb + (b - r0) * ld_h) : _mm512_setzero_ps();
        hv = _mm512_mask_mov_ps(hv, one, ones);
        const __m512 d0 = _mm512_set1_ps(d[b]), d1 = _mm512_set1_ps(d[bs + b]);
        const __m512 d2 = _mm512_set1_ps(d[2 * bs + b]), d3 = _mm512_set1_ps(d[3 * bs + b]);
        a0 = _mm512_fmadd_ps(d0, xv, a0);
        a1 = _mm512_fmadd_ps(d1, xv, a1);
        a2 = _mm512_fmadd_ps(d2, xv, a2);
        a3 = _mm512_fmadd_ps(d3, xv, a3);
        if constexpr (NX == 2) {
          b0 = _mm512_fmadd_ps(d0, xw, b0);
          b1 = _mm512_fmadd_ps(d1, xw, b1);
          b2 = _mm512_fmadd_ps(d2, xw, b2);
          b3 = _mm512_fmadd_ps(d3, xw, b3);
        }
        h0 = _mm512_fmadd_ps(d0, hv, h0);
        h1s = _mm512_fmadd_ps(d1, hv, h1s);
        h2s = _mm512_fmadd_ps(d2, hv, h2s);
        h3 = _mm512_fmadd_ps(d3, hv, h3);
      }
    };
    rows(0, n1, h1, ld_h1);
    rows(n1, bs, h2, ld_h2);
    _mm512_mask_storeu_ps(wi, m0, a0);
    _mm512_mask_storeu_ps(wi + in, m0, a1);
    _mm512_mask_storeu_ps(wi + 2 * in, m0, a2);
    _mm512_mask_storeu_ps(wi + 3 * in, m0, a3);
    if constexpr (NX == 2) {
      _mm512_mask_storeu_ps(wi + 16, m1, b0);
      _mm512_mask_storeu_ps(wi + in + 16, m1, b1);
      _mm512_mask_storeu_ps(wi + 2 * in + 16, m1, b2);
      _mm512_mask_storeu_ps(wi + 3 * in + 16, m1, b3);
    }
    _mm512_mask_storeu_ps(wh, mh, h0);
    _mm512_mask_storeu_ps(wh + out, mh, h1s);
    _mm512_mask_storeu_ps(wh + 2 * out, mh, h2s);
    _mm512_mask_storeu_ps(wh + 3 * out, mh, h3);
    if (gb) {
      gb[g0] = _mm512_cvtss_f32(_mm512_permutexvar_ps(lane_out, h0));
      gb[g0 + 1] = _mm512_cvtss_f32(_mm512_permutexvar_ps(lane_out, h1s));
      gb[g0 + 2] = _mm512_cvtss_f32(_mm512_permutexvar_ps(lane_out, h2s));
      gb[g0 + 3] = _mm512_cvtss_f32(_mm512_permutexvar_ps(lane_out, h3));
    }
  }
}

// ---- Transposes ----
// dst[c * ld_dst + r] = src[r * ld_src + c] (small_hidden.h tiny_transpose) where the row-major
// side is at most kPermuteStride floats per row: each 16 rows of it are at most 8 vectors,
// loaded or stored whole (masked at the ends), and each vector of the other side is put
// together from them by masked permutes (vpermps), instead of one 16-element gather or scatter
// per column, which the AMD EPYC Zen 5 runs slowly (transpose_narrow16 took 5.6% of a seed-tiny
// training call there). The permutes' indices and masks depend only on the stride: built once.
constexpr int64_t kPermuteStride = 8;

struct PermuteTables {
  // Interleaved rows of stride s (flat position p = 16 * k + l of vector k, lane l, holds row
  // p / s, column p % s) and lanes (lane b of column j's vector holds row b):
  //   lanes from rows: column j's lane b is lane (b s + j) % 16 of row vector (b s + j) / 16;
  //   rows from lanes: row vector k's lane l is lane (16 k + l) / s of column (16 k + l) % s's.
  alignas(64) int32_t from_rows[kPermuteStride + 1][kPermuteStride][16];  // [s][j][b]
  __mmask16 from_rows_mask[kPermuteStride + 1][kPermuteStride][kPermuteStride];  // [s][j][k]
  alignas(64) int32_t to_rows[kPermuteStride + 1][kPermuteStride][16];    // [s][k][l]
  __mmask16 to_rows_mask[kPermuteStride + 1][kPermuteStride][kPermuteStride];    // [s][k][j]
};

inline const PermuteTables& permute_tables() {
  static const PermuteTables t = [] {
    PermuteTables p{};
    for (int s = 1; s <= kPermuteStride; ++s)
      for (int a = 0; a < s; ++a)
        for (int l = 0; l < 16; ++l) {
          const int q = l * s + a;  // lanes from rows: column a, lane l
          p.from_rows[s][a][l] = q % 16;
          p.from_rows_mask[s][a][q / 16] |= __mmask16(1u << l);
          const int f = 16 * a + l;  // rows from lanes: row vector a, lane l
          p.to_rows[s][a][l] = f / s;
          p.to_rows_mask[s][a][f % s] |= __mmask16(1u << l);
        }
    return p;
  }();
  return t;
}

// Rows of stride S (at most kPermuteStride) into `cols` vectors of lanes, or back (kToRows);
// S a compile-time constant, so that the 16 rows' vectors stay in registers and the loops over
// them unroll. See transpose_permute.
template <int S, bool kToRows>
__attribute__((target("avx512f"))) void transpose_permute_s(const float* src, int64_t ld_src,
                                                            int64_t rows, int64_t cols,
                                                            float* dst, int64_t ld_dst) {
  const PermuteTables& t = permute_tables();
  if constexpr (!kToRows) {
    // src: rows of `cols` floats, S apart; dst: `cols` rows of `rows` lanes. Only the floats of
    // the `cols` columns are read (not those between them, which may be another thread's: a
    // bidirectional layer output's other half).
    __mmask16 needed[S];
    for (int k = 0; k < S; ++k) {
      needed[k] = 0;
      for (int64_t j = 0; j < cols; ++j) needed[k] |= t.to_rows_mask[S][k][j];
    }
    for (int64_t b0 = 0; b0 < rows; b0 += 16) {
      const int64_t count = std::min<int64_t>(16, rows - b0);
      const float* block = src + b0 * S;
      const int64_t flat = (count - 1) * S + cols;  // the floats this block reads
      __m512 v[S];
      for (int k = 0; k < S; ++k)
        v[k] = _mm512_maskz_loadu_ps(needed[k] & first_lanes(flat - 16 * k), block + 16 * k);
      for (int64_t j = 0; j < cols; ++j) {
        const __m512i idx = _mm512_load_si512(t.from_rows[S][j]);
        __m512 out = _mm512_setzero_ps();
        for (int k = 0; k < S; ++k)
          out = _mm512_mask_permutexvar_ps(out, t.from_rows_mask[S][j][k], idx, v[k]);
        _mm512_mask_storeu_ps(dst + j * ld_dst + b0, first_lanes(count), out);
      }
    }
  } else {
    // src: `rows` rows of `cols` lanes; dst: rows of `rows` floats, S apart (the floats
    // between them are left as they are).
    __mmask16 store[S];
    __m512i idx[S];
    for (int k = 0; k < S; ++k) {
      store[k] = 0;
      for (int64_t j = 0; j < rows; ++j) store[k] |= t.to_rows_mask[S][k][j];
      idx[k] = _mm512_load_si512(t.to_rows[S][k]);
    }
    for (int64_t b0 = 0; b0 < cols; b0 += 16) {
      const int64_t count = std::min<int64_t>(16, cols - b0);
      __m512 u[S];
      for (int j = 0; j < S; ++j)
        u[j] = j < rows ? _mm512_maskz_loadu_ps(first_lanes(count), src + j * ld_src + b0)
                        : _mm512_setzero_ps();
      float* block = dst + b0 * S;
      for (int k = 0; k < S; ++k) {
        if (16 * k >= count * S) break;
        __m512 out = _mm512_setzero_ps();
        for (int j = 0; j < S; ++j)
          if (j < rows)
            out = _mm512_mask_permutexvar_ps(out, t.to_rows_mask[S][k][j], idx[k], u[j]);
        _mm512_mask_storeu_ps(block + 16 * k, store[k] & first_lanes(count * S - 16 * k), out);
      }
    }
  }
}

// False (nothing done) where neither side's rows are at most kPermuteStride floats apart.
__attribute__((target("avx512f"))) inline bool transpose_permute(
    const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  const bool to_lanes = ld_src <= kPermuteStride && cols <= ld_src;
  if (!to_lanes && !(ld_dst <= kPermuteStride && rows <= ld_dst)) return false;
  if (rows == 0 || cols == 0) return true;
  const int64_t stride = to_lanes ? ld_src : ld_dst;
  auto run = [&](auto stride_c) {
    constexpr int S = decltype(stride_c)::value;
    if (to_lanes) transpose_permute_s<S, false>(src, ld_src, rows, cols, dst, ld_dst);
    else transpose_permute_s<S, true>(src, ld_src, rows, cols, dst, ld_dst);
  };
  switch (stride) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    case 6: run(std::integral_constant<int, 6>{}); break;
    case 7: run(std::integral_constant<int, 7>{}); break;
    default: run(std::integral_constant<int, 8>{});
  }
  return true;
}
#else
constexpr bool kSmallHiddenAvx512Built = false;
#endif

}  // namespace
}  // namespace fused_lstm
