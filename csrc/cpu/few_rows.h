// The backward's products for a call of a few rows (at most kThinMaxBatch rows in all: one
// streaming step of a few sequences), against the weights as the model holds them.
// Part of the one translation unit lstm_cpu.cpp.
//
// With one to eight rows, dL/dh_{t-1} = dgates W_hh and dL/dx = dgates W_ih read each weight
// once and use it a few times: they are bound by reading the weights, as the thin forward is.
// The general backward packs W_hh into brgemm's panels (a copy of it, worth it over many steps)
// and, for a 16-bit model, widens W_hh and W_ih to float32 first (a float32 copy written and
// read back); at these sizes those copies cost more than the products
// (benchmarks/notes/fp16.md, "Few-row training"). Here the products read the weights in
// place, float32, bfloat16 or float16, widening 16-bit ones in registers (exact), and the weight
// gradients dW = dgates^T x are the rows' outer products summed in registers, one pass over
// dW. Each element's sum runs over k (or the rows) in order, one fused multiply-add per term,
// whatever the weights' dtype: a 16-bit model's results are the float32 model's on the widened
// weights, bit for bit, at each instruction-set level.
#pragma once

#include "thin.h"

namespace fused_lstm {
namespace {
namespace few {

// Rows at a time (each pass reads the weights once).
constexpr int kPassRows = 4;

// 2 * L weights of row k from column c, widened to float32: lo and hi are columns [c, c + L) and
// [c + L, c + 2L) (float32, float16), or the even and odd columns of [c, c + 2L) (bfloat16: one
// load of L 32-bit words, a shift and a mask; interleaved back by store_pair).
template <int kBytes, typename W>
FUSED_LSTM_INLINE void load_pair(const W* p, thin::VecOf<float, kBytes>& lo,
                                 thin::VecOf<float, kBytes>& hi) {
  using V = thin::VecOf<float, kBytes>;
  constexpr int L = kBytes / 4;
  if constexpr (std::is_same_v<W, float>) {
    lo = vec_load<float, L>(p);
    hi = vec_load<float, L>(p + L);
  } else if constexpr (std::is_same_v<W, c10::Half>) {
    lo = thin::widen_half<kBytes>(p);
    hi = thin::widen_half<kBytes>(p + L);
  } else {
    using U = Vec<uint32_t, L>;
    const U bits = vec_load<uint32_t, L>(reinterpret_cast<const uint32_t*>(p));
    lo = thin::bit_cast_vec<V>(U(bits << 16));
    hi = thin::bit_cast_vec<V>(U(bits & (U{} + 0xFFFF0000u)));
  }
}

// Element i of the columns [half * L, half * L + L) from the even (e) and odd (o) columns.
template <int kHalf, int L, size_t... kI>
FUSED_LSTM_INLINE Vec<float, L> interleave(Vec<float, L> e, Vec<float, L> o,
                                           std::index_sequence<kI...>) {
  return __builtin_shufflevector(
      e, o, (kI % 2 == 0 ? kHalf * L / 2 + kI / 2 : L + kHalf * L / 2 + kI / 2)...);
}

// c[0, 2L) (+)= the pair's sums, in column order.
template <int kBytes, typename W>
FUSED_LSTM_INLINE void store_pair(float* c, thin::VecOf<float, kBytes> lo,
                                  thin::VecOf<float, kBytes> hi, bool add) {
  using V = thin::VecOf<float, kBytes>;
  constexpr int L = kBytes / 4;
  V a = lo, b = hi;
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    a = interleave<0, L>(lo, hi, std::make_index_sequence<L>{});
    b = interleave<1, L>(lo, hi, std::make_index_sequence<L>{});
  }
  if (add) {
    a += vec_load<float, L>(c);
    b += vec_load<float, L>(c + L);
  }
  vec_store<float, L>(c, a);
  vec_store<float, L>(c + L, b);
}

// c[r, c0 + j] (+)= sum over k of a[r, k] w[k, c0 + j] for r < kM and j < 2 * L * kP.
template <int kBytes, typename W, int kM, int kP>
FUSED_LSTM_INLINE void product_block(const float* a, int64_t lda, int64_t K, const W* w,
                                     int64_t ldw, int64_t c0, float* c, int64_t ldc, bool add) {
  using V = thin::VecOf<float, kBytes>;
  constexpr int L = kBytes / 4;
  V acc[kM][kP][2];
  for (int r = 0; r < kM; ++r)
    for (int p = 0; p < kP; ++p) acc[r][p][0] = acc[r][p][1] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V wv[kP][2];
    for (int p = 0; p < kP; ++p) load_pair<kBytes, W>(w + k * ldw + c0 + 2 * L * p, wv[p][0], wv[p][1]);
    for (int r = 0; r < kM; ++r) {
      const V av = V{} + a[r * lda + k];
      for (int p = 0; p < kP; ++p) {
        acc[r][p][0] += av * wv[p][0];
        acc[r][p][1] += av * wv[p][1];
      }
    }
  }
  for (int r = 0; r < kM; ++r)
    for (int p = 0; p < kP; ++p)
      store_pair<kBytes, W>(c + r * ldc + c0 + 2 * L * p, acc[r][p][0], acc[r][p][1], add);
}

// Columns [n0, n1) of kM rows: blocks of kP pairs, then single pairs, then one column at a time.
template <int kBytes, typename W, int kM, int kP>
FUSED_LSTM_INLINE void product_rows(const float* a, int64_t lda, int64_t K, const W* w,
                                    int64_t ldw, float* c, int64_t ldc, bool add, int64_t n0,
                                    int64_t n1) {
  constexpr int64_t kPair = 2 * (kBytes / 4);
  int64_t j = n0;
  for (; j + kP * kPair <= n1; j += kP * kPair)
    product_block<kBytes, W, kM, kP>(a, lda, K, w, ldw, j, c, ldc, add);
  for (; j + kPair <= n1; j += kPair) product_block<kBytes, W, kM, 1>(a, lda, K, w, ldw, j, c, ldc, add);
  for (; j < n1; ++j)
    for (int r = 0; r < kM; ++r) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k)
        sum = std::fma(a[r * lda + k], static_cast<float>(w[k * ldw + j]), sum);
      c[r * ldc + j] = add ? c[r * ldc + j] + sum : sum;
    }
}

// c[r, n0..n1) (+)= a[r, :] w for r < M, in passes of at most kPassRows rows.
template <int kBytes, int kP, typename W>
FUSED_LSTM_INLINE void product_cols(int64_t M, int64_t K, const float* a, int64_t lda, const W* w,
                                    int64_t ldw, float* c, int64_t ldc, bool add, int64_t n0,
                                    int64_t n1) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4)
    product_rows<kBytes, W, 4, kP>(a + r * lda, lda, K, w, ldw, c + r * ldc, ldc, add, n0, n1);
  const int64_t rest = M - r;
  a += r * lda;
  c += r * ldc;
  if (rest == 3) product_rows<kBytes, W, 3, kP>(a, lda, K, w, ldw, c, ldc, add, n0, n1);
  else if (rest == 2) product_rows<kBytes, W, 2, kP>(a, lda, K, w, ldw, c, ldc, add, n0, n1);
  else if (rest == 1) product_rows<kBytes, W, 1, kP>(a, lda, K, w, ldw, c, ldc, add, n0, n1);
}

// gw[g, n0..n1) = sum over r < rows of dg[r, g] x[r][n0..n1), for g in [g0, g1).
template <int kBytes>
FUSED_LSTM_INLINE void outer_rows(int64_t rows, const float* dg, int64_t ldg, const float* const* x,
                                  float* gw, int64_t ldw, int64_t g0, int64_t g1, int64_t N) {
  using V = thin::VecOf<float, kBytes>;
  constexpr int L = kBytes / 4;
  for (int64_t g = g0; g < g1; ++g) {
    float* out = gw + g * ldw;
    int64_t j = 0;
    for (; j + 2 * L <= N; j += 2 * L) {
      V s0{}, s1{};
      for (int64_t r = 0; r < rows; ++r) {
        const V a = V{} + dg[r * ldg + g];
        s0 += a * vec_load<float, L>(x[r] + j);
        s1 += a * vec_load<float, L>(x[r] + j + L);
      }
      vec_store<float, L>(out + j, s0);
      vec_store<float, L>(out + j + L, s1);
    }
    for (; j < N; ++j) {
      float sum = 0.0f;
      for (int64_t r = 0; r < rows; ++r) sum = std::fma(dg[r * ldg + g], x[r][j], sum);
      out[j] = sum;
    }
  }
}

template <typename W>
using ProductFn = void (*)(int64_t, int64_t, const float*, int64_t, const W*, int64_t, float*,
                           int64_t, bool, int64_t, int64_t);
using OuterFn = void (*)(int64_t, const float*, int64_t, const float* const*, float*, int64_t,
                         int64_t, int64_t, int64_t);

// One version per instruction set, as the thin kernel's (thin::pre_level picks, under the
// tests' cap): AVX-512 with two pairs of accumulators per row (16 for four rows), AVX2 and the
// baseline with one (16 registers).
#ifdef FUSED_LSTM_THIN_ISAS
#define FUSED_LSTM_DEFINE_FEW(W, NAME)                                                        \
  __attribute__((target("arch=x86-64-v4"))) void NAME##_v4(                                   \
      int64_t M, int64_t K, const float* a, int64_t lda, const W* w, int64_t ldw, float* c,   \
      int64_t ldc, bool add, int64_t n0, int64_t n1) {                                        \
    product_cols<64, 2, W>(M, K, a, lda, w, ldw, c, ldc, add, n0, n1);                        \
  }                                                                                           \
  __attribute__((target("arch=x86-64-v3"))) void NAME##_v3(                                   \
      int64_t M, int64_t K, const float* a, int64_t lda, const W* w, int64_t ldw, float* c,   \
      int64_t ldc, bool add, int64_t n0, int64_t n1) {                                        \
    product_cols<32, 1, W>(M, K, a, lda, w, ldw, c, ldc, add, n0, n1);                        \
  }                                                                                           \
  void NAME##_base(int64_t M, int64_t K, const float* a, int64_t lda, const W* w, int64_t ldw, \
                   float* c, int64_t ldc, bool add, int64_t n0, int64_t n1) {                 \
    product_cols<16, 1, W>(M, K, a, lda, w, ldw, c, ldc, add, n0, n1);                        \
  }
__attribute__((target("arch=x86-64-v4"))) void outer_v4(int64_t rows, const float* dg,
                                                        int64_t ldg, const float* const* x,
                                                        float* gw, int64_t ldw, int64_t g0,
                                                        int64_t g1, int64_t N) {
  outer_rows<64>(rows, dg, ldg, x, gw, ldw, g0, g1, N);
}
__attribute__((target("arch=x86-64-v3"))) void outer_v3(int64_t rows, const float* dg,
                                                        int64_t ldg, const float* const* x,
                                                        float* gw, int64_t ldw, int64_t g0,
                                                        int64_t g1, int64_t N) {
  outer_rows<32>(rows, dg, ldg, x, gw, ldw, g0, g1, N);
}
#else
#define FUSED_LSTM_DEFINE_FEW(W, NAME)                                                        \
  void NAME##_base(int64_t M, int64_t K, const float* a, int64_t lda, const W* w, int64_t ldw, \
                   float* c, int64_t ldc, bool add, int64_t n0, int64_t n1) {                 \
    product_cols<16, 1, W>(M, K, a, lda, w, ldw, c, ldc, add, n0, n1);                        \
  }
#endif
void outer_base(int64_t rows, const float* dg, int64_t ldg, const float* const* x, float* gw,
                int64_t ldw, int64_t g0, int64_t g1, int64_t N) {
  outer_rows<16>(rows, dg, ldg, x, gw, ldw, g0, g1, N);
}
FUSED_LSTM_DEFINE_FEW(float, product_f32)
FUSED_LSTM_DEFINE_FEW(c10::BFloat16, product_bf16)
FUSED_LSTM_DEFINE_FEW(c10::Half, product_f16)
#undef FUSED_LSTM_DEFINE_FEW

// NAME's version for thin::pre_level (the versions defined above).
#ifdef FUSED_LSTM_THIN_ISAS
template <typename Fn>
Fn by_level(Fn v4, Fn v3, Fn base) {
  const int level = thin::pre_level();
  return level == 2 ? v4 : level == 1 ? v3 : base;
}
#define FUSED_LSTM_FEW_BY_LEVEL(NAME) by_level(NAME##_v4, NAME##_v3, NAME##_base)
#else
#define FUSED_LSTM_FEW_BY_LEVEL(NAME) NAME##_base
#endif

template <typename W>
ProductFn<W> product_fn() {
  if constexpr (std::is_same_v<W, float>) return FUSED_LSTM_FEW_BY_LEVEL(product_f32);
  else if constexpr (std::is_same_v<W, c10::Half>) return FUSED_LSTM_FEW_BY_LEVEL(product_f16);
  else return FUSED_LSTM_FEW_BY_LEVEL(product_bf16);
}

inline OuterFn outer_fn() { return FUSED_LSTM_FEW_BY_LEVEL(outer); }
#undef FUSED_LSTM_FEW_BY_LEVEL

// Work (multiply-adds) from which a product is split over the threads.
constexpr int64_t kParallelWork = kThinParallelWork;
// Columns or rows of the weights per thread's share: whole blocks of the AVX-512 version.
constexpr int64_t kShareGrain = 64;

// [begin, end) of n split into the threads' shares of whole grains (serially where small, or
// already inside a parallel region).
template <typename F>
void split(int64_t n, int64_t work, F&& fn) {
  const int64_t grains = (n + kShareGrain - 1) / kShareGrain;
  if (work < kParallelWork || grains < 2 || at::get_num_threads() < 2 || at::in_parallel_region())
    return fn(int64_t{0}, n);
  at::parallel_for(0, grains, 1, [&](int64_t g0, int64_t g1) {
    fn(g0 * kShareGrain, std::min(n, g1 * kShareGrain));
  });
}

}  // namespace few

// fn(p) with the pointer that is set: float32, bfloat16 or float16 weights.
template <typename F>
void visit_weights(const Operand<float>& o, F&& fn) {
  if (o.h) fn(o.h);
  else if (o.b) fn(o.b);
  else fn(o.f);
}

// c [M, N] (+ c where `add`) = a [M, K] (row stride lda) times w [K, N] as stored (row stride
// ldw), W float32, bfloat16 or float16; float32 sums in k's order.
template <typename W>
void few_rows_product(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const W* w,
                      int64_t ldw, float* c, int64_t ldc, bool add) {
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    if (!add)
      for (int64_t r = 0; r < M; ++r) std::fill_n(c + r * ldc, N, 0.0f);
    return;
  }
  const few::ProductFn<W> fn = few::product_fn<W>();
  few::split(N, M * N * K,
             [&](int64_t n0, int64_t n1) { fn(M, K, a, lda, w, ldw, c, ldc, add, n0, n1); });
}

// gw [G, N] (contiguous) = dg^T x: sum over the rows r < rows of dg[r, :]^T x[r][:] (dg row
// stride ldg; x[r]: row r's N values); zero where rows == 0. gw float32, or bfloat16 / float16
// (a 16-bit model's gradient, CpuPlan::grads_16bit): then each row is summed in float32 and
// rounded as torch rounds (round_to), the same values as the float32 gradient rounded after,
// without a float32 gradient in memory.
inline void few_rows_outer(int64_t rows, int64_t G, int64_t N, const float* dg, int64_t ldg,
                           const float* const* x, at::Tensor& gw) {
  const few::OuterFn fn = few::outer_fn();
  TORCH_INTERNAL_ASSERT(gw.is_contiguous() && gw.numel() == G * N);
  const at::ScalarType dtype = gw.scalar_type();
  if (dtype == at::kFloat) {
    float* out = gw.mutable_data_ptr<float>();
    few::split(G, rows * G * N + G * N, [&](int64_t g0, int64_t g1) {
      fn(rows, dg, ldg, x, out, N, g0, g1, N);
    });
    return;
  }
  TORCH_INTERNAL_ASSERT(is_16bit(dtype));
  auto* out = static_cast<uint16_t*>(gw.mutable_data_ptr());
  few::split(G, rows * G * N + G * N, [&](int64_t g0, int64_t g1) {
    std::vector<float> row(static_cast<size_t>(N));
    for (int64_t g = g0; g < g1; ++g) {  // row g: dg's column g against x
      fn(rows, dg + g, ldg, x, row.data(), N, 0, 1, N);
      round_to(row.data(), N, dtype, out + g * N);
    }
  });
}

}  // namespace
}  // namespace fused_lstm
