// The cell passes: lstm_cell.h's math over n elements whose operands are contiguous, forward
// (with or without keeping the activations for backward) and backward. Loops GCC vectorises
// (fast_math.h keeps them free of libm calls and branches), built as target_clones.
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "../lstm_cell.h"
#include "fast_math.h"
#include "plan.h"

namespace fused_lstm {
namespace {

// gate_{i,f,g,o}: [n] pre-activations in; with kKeep, the activated gates out (the reserve)
// bias (kBias): b_ih + b_hh, gate k's at bias_k, added to the pre-activations here (where the
//   input projection is fused into the steps' products, so the gate rows start without it)
// c: [n] c_{t-1} in, c_t out;  cells (kKeep): [n] c_t (reserve copy);  h: [n] h_t before
// projection. Without kKeep (inference) only c and h are written: 2 stores per element, not 7.
//
// In two loops per block of kCellBlock elements: the four activations (independent of each
// other and of c), then c_t and h_t. One loop did both, and each element's chain through
// tanh(c_t) kept the FMA units waiting (benchmarks/notes/cell-pass.md, "Two loops: activations,
// then c and h": ~10% faster in two).
constexpr int64_t kCellBlock = 128;

template <typename T, bool kBias, bool kKeep>
__attribute__((always_inline)) inline void cell_forward_loop(
    int64_t n, T* __restrict gi, T* __restrict gf, T* __restrict gg, T* __restrict go,
    const T* __restrict bias_i, const T* __restrict bias_f, const T* __restrict bias_g,
    const T* __restrict bias_o, T* __restrict c, T* __restrict cells, T* __restrict h) {
  using Math = cpu::FastMath<T>;
  for (int64_t e0 = 0; e0 < n; e0 += kCellBlock) {
    const int64_t m = std::min(kCellBlock, n - e0);
    T ai[kCellBlock], af[kCellBlock], ag[kCellBlock], ao[kCellBlock];
    for (int64_t e = 0; e < m; ++e) {
      const int64_t k = e0 + e;
      const Gates<T> a = kBias
          ? cell_activations<T, Math>(gi[k] + bias_i[k], gf[k] + bias_f[k], gg[k] + bias_g[k],
                                      go[k] + bias_o[k])
          : cell_activations<T, Math>(gi[k], gf[k], gg[k], go[k]);
      ai[e] = a.i;
      af[e] = a.f;
      ag[e] = a.g;
      ao[e] = a.o;
    }
    for (int64_t e = 0; e < m; ++e) {
      const int64_t k = e0 + e;
      T c_new, h_new;
      cell_state<T, Math>(Gates<T>{ai[e], af[e], ag[e], ao[e]}, c[k], c_new, h_new);
      if (kKeep) {
        gi[k] = ai[e];
        gf[k] = af[e];
        gg[k] = ag[e];
        go[k] = ao[e];
        cells[k] = c_new;
      }
      c[k] = c_new;
      h[k] = h_new;
    }
  }
}

#ifdef FUSED_LSTM_VEC16_MATH
// The same pass for float on CPUs with AVX-512: lstm_cell.h's functions on 16 elements at a
// time (acc_t = Vec16) with fast_math.h's vec16::Math (exp through a 16-entry table, which GCC's
// vectoriser cannot do). Measured on medium's pass: 1.89 -> 1.35 ns per element
// (benchmarks/notes/cell-pass.md,
// "A table exp and a rational tanh"). A block's last partial vector goes through masked loads and stores.
using cpu::vec16::Vec16;

// The first k (<= 16) floats at p, zeros after them; and the first k lanes of v stored at p
// (AVX-512 masked moves; plain ones for whole vectors).
__attribute__((target("avx512f"), always_inline)) inline Vec16 load16(const float* p, int64_t k) {
  // Plain loads for whole vectors: a ~5% faster pass (benchmarks/notes/cell-pass.md, "Plain
  // moves for whole vectors").
  if (k == 16) return Vec16(_mm512_loadu_ps(p));
  return Vec16(_mm512_maskz_loadu_ps(__mmask16((1u << k) - 1), p));
}

__attribute__((target("avx512f"), always_inline)) inline void store16(float* p, Vec16 v,
                                                                     int64_t k) {
  if (k == 16) return _mm512_storeu_ps(p, __m512(v));
  _mm512_mask_storeu_ps(p, __mmask16((1u << k) - 1), __m512(v));
}

// The bias is added where bias_i is given, the activations and c_t kept where cells is (as
// cell_forward_loop's kBias and kKeep; here branches once per 16 elements, not template copies).
__attribute__((target("avx512f,fma"))) void cell_forward_vec16(
    int64_t n, float* gi, float* gf, float* gg, float* go, const float* bias_i,
    const float* bias_f, const float* bias_g, const float* bias_o, float* c, float* cells,
    float* h) {
  const bool kBias = bias_i != nullptr, kKeep = cells != nullptr;
  using Math = cpu::vec16::Math;
  for (int64_t e0 = 0; e0 < n; e0 += kCellBlock) {
    const int64_t m = std::min(kCellBlock, n - e0);
    Vec16 ai[kCellBlock / 16], af[kCellBlock / 16], ag[kCellBlock / 16], ao[kCellBlock / 16];
    for (int64_t v = 0; v * 16 < m; ++v) {
      const int64_t q = e0 + v * 16, k = std::min<int64_t>(16, m - v * 16);
      Vec16 pi = load16(gi + q, k), pf = load16(gf + q, k), pg = load16(gg + q, k),
            po = load16(go + q, k);
      if (kBias) {
        pi += load16(bias_i + q, k);
        pf += load16(bias_f + q, k);
        pg += load16(bias_g + q, k);
        po += load16(bias_o + q, k);
      }
      const Gates<Vec16> a = cell_activations<Vec16, Math>(pi, pf, pg, po);
      ai[v] = a.i;
      af[v] = a.f;
      ag[v] = a.g;
      ao[v] = a.o;
      if (kKeep) {
        store16(gi + q, a.i, k);
        store16(gf + q, a.f, k);
        store16(gg + q, a.g, k);
        store16(go + q, a.o, k);
      }
    }
    for (int64_t v = 0; v * 16 < m; ++v) {
      const int64_t q = e0 + v * 16, k = std::min<int64_t>(16, m - v * 16);
      Vec16 c_new, h_new;
      cell_state<Vec16, Math>(Gates<Vec16>{ai[v], af[v], ag[v], ao[v]}, load16(c + q, k), c_new,
                              h_new);
      if (kKeep) store16(cells + q, c_new, k);
      store16(c + q, c_new, k);
      store16(h + q, h_new, k);
    }
  }
}


#endif

// a_{i,f,g,o}: [n] activated gates;  c, c_prev: [n] c_t, c_{t-1};  dh: [n] dL/dh_t
// dc: [n] dL/dc_t in, dL/dc_{t-1} out;  d_{i,f,g,o}: [n] dL/d(pre-activation) out
template <typename T>
__attribute__((always_inline)) inline void cell_backward_loop(
    int64_t n, const T* __restrict ai, const T* __restrict af, const T* __restrict ag,
    const T* __restrict ao, const T* __restrict c, const T* __restrict c_prev,
    const T* __restrict dh, T* __restrict dc, T* __restrict di, T* __restrict df,
    T* __restrict dg, T* __restrict d_o) {
  for (int64_t e = 0; e < n; ++e) {
    T dc_prev;
    const Gates<T> d = cell_backward<T, cpu::FastMath<T>>(Gates<T>{ai[e], af[e], ag[e], ao[e]}, c[e],
                                                        c_prev[e], dh[e], dc[e], dc_prev);
    di[e] = d.i;
    df[e] = d.f;
    dg[e] = d.g;
    d_o[e] = d.o;
    dc[e] = dc_prev;
  }
}

// cell_forward_block's pass through cell_forward_vec16 where it applies (float, AVX-512);
// false: the generic loops run.
template <typename T>
inline bool cell_forward_fast(int64_t n, T* gi, T* gf, T* gg, T* go, const T* bi, const T* bf,
                              const T* bg, const T* bo, T* c, T* cells, T* h, bool vec16) {
#ifdef FUSED_LSTM_VEC16_MATH
  if constexpr (std::is_same_v<T, float>) {
    if (!vec16) return false;
    cell_forward_vec16(n, gi, gf, gg, go, bi, bf, bg, bo, c, cells, h);
    return true;
  }
#endif
  return false;
}

#define FUSED_LSTM_DEFINE_BLOCKS(T)                                                            \
  /* cells null: inference (only c and h written); bias null: none to add (see the loop); */\
  /* vec16: the 16-lane pass where it applies (the plan's vec16_cell) */                     \
  FUSED_LSTM_SIMD_CLONES void cell_forward_block(int64_t n, T* gi, T* gf, T* gg, T* go,       \
                                                 const T* bias, int64_t bias_stride, T* c,     \
                                                 T* cells, T* h, bool vec16) {                 \
    const T* bf = bias ? bias + bias_stride : nullptr;                                         \
    const T* bg = bias ? bias + 2 * bias_stride : nullptr;                                     \
    const T* bo = bias ? bias + 3 * bias_stride : nullptr;                                     \
    if (cell_forward_fast(n, gi, gf, gg, go, bias, bf, bg, bo, c, cells, h, vec16)) return;    \
    if (bias != nullptr && cells != nullptr)                                                   \
      cell_forward_loop<T, true, true>(n, gi, gf, gg, go, bias, bf, bg, bo, c, cells, h);      \
    else if (bias != nullptr)                                                                  \
      cell_forward_loop<T, true, false>(n, gi, gf, gg, go, bias, bf, bg, bo, c, cells, h);     \
    else if (cells != nullptr)                                                                 \
      cell_forward_loop<T, false, true>(n, gi, gf, gg, go, bias, bf, bg, bo, c, cells, h);     \
    else                                                                                       \
      cell_forward_loop<T, false, false>(n, gi, gf, gg, go, bias, bf, bg, bo, c, cells, h);    \
  }                                                                                            \
  FUSED_LSTM_SIMD_CLONES void cell_backward_block(                                             \
      int64_t n, const T* ai, const T* af, const T* ag, const T* ao, const T* c,               \
      const T* c_prev, const T* dh, T* dc, T* di, T* df, T* dg, T* d_o) {                      \
    cell_backward_loop<T>(n, ai, af, ag, ao, c, c_prev, dh, dc, di, df, dg, d_o);             \
  }
FUSED_LSTM_DEFINE_BLOCKS(float)
FUSED_LSTM_DEFINE_BLOCKS(double)
#undef FUSED_LSTM_DEFINE_BLOCKS

// cell_backward_block with each gate's gradient written over its activated gate (g_i.. hold
// the activated gates on entry, their pre-activation gradients on exit), so that the backward
// needs no buffer of gates beside its dgates (backward_products.h, recompute_chunk_gates). The gates of a
// block of elements are copied aside first, then cell_backward_block runs on the copies: the
// same arithmetic, so the same bits, without aliasing its restrict arguments. Blocks of whole
// 16-lane vectors, so its vector body and tail see the elements they see in one call.
template <typename T>
void cell_backward_in_place(int64_t n, T* gi, T* gf, T* gg, T* go, const T* c, const T* c_prev,
                            const T* dh, T* dc) {
  constexpr int64_t kBlock = 256;
  alignas(64) T a[4][kBlock];
  for (int64_t e = 0; e < n; e += kBlock) {
    const int64_t m = std::min(kBlock, n - e);
    std::copy_n(gi + e, m, a[0]);
    std::copy_n(gf + e, m, a[1]);
    std::copy_n(gg + e, m, a[2]);
    std::copy_n(go + e, m, a[3]);
    cell_backward_block(m, a[0], a[1], a[2], a[3], c + e, c_prev + e, dh + e, dc + e, gi + e,
                        gf + e, gg + e, go + e);
  }
}

}  // namespace
}  // namespace fused_lstm
