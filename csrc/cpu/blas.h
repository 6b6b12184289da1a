// Library glue: the BLAS (MKL's sgemm_/dgemm_ as libtorch_cpu exports them), oneDNN's matmul,
// and oneDNN's brgemm micro-kernel (ATen's cpublas), each reached through weak declarations of
// the symbols libtorch_cpu exports, so a torch build without one keeps the next.
// Which library a product goes to is plan.h's decision (gemm_library).
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "common.h"

#include <ATen/Context.h>
#include <ATen/ops/from_blob.h>

// oneDNN's matmul, exported by libtorch_cpu (ATen/native/mkldnn/Matmul.h is not shipped):
// result = beta * result + alpha * mat1 @ mat2, float32 (and bf16/fp16), any strides. Weak, so
// a torch without it (or without oneDNN) keeps BLAS.
namespace at::native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2,
                             const at::Tensor& result, float beta, float alpha)
    __attribute__((weak));
}

// oneDNN's brgemm micro-kernel as ATen exports it (ATen/native/CPUBlas.h, not shipped):
// single-threaded C[M, N] = A[M, K] B[K, N] (+ C when add_C), row-major with leading dimensions.
namespace at::native::cpublas {
TORCH_API void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c,
                      bool add_C, const float* A, const float* B, float* C, bool is_vnni)
    __attribute__((weak));
TORCH_API void brgemm_release(bool is_vnni) __attribute__((weak));
}  // namespace at::native::cpublas

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

// Where a product goes (plan.h decides, by its sizes, its transposes and the measured rates of
// the libraries: gemm_library).
enum class GemmLibrary { kBlas, kOneDnn, kColumnSplit, kInlineGemv, kSmallAvx512 };
// in_region: called inside a parallel region (a batch slice's thread). library_setting: the
// setting cpu.gemm_library (0 auto, 1 blas, 2 onednn_matmul), small_setting the setting
// cpu.allow_small_products; -1: their current values.
GemmLibrary gemm_library(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                         bool is_float, bool in_region = at::in_parallel_region(),
                         int64_t library_setting = -1, int64_t small_setting = -1);

inline const char* library_name(GemmLibrary l) {
  switch (l) {
    case GemmLibrary::kOneDnn: return "onednn_matmul";
    case GemmLibrary::kColumnSplit: return "blas_column_split";
    case GemmLibrary::kInlineGemv: return "inline_gemv";
    case GemmLibrary::kSmallAvx512: return "small_avx512";
    default: return "blas";
  }
}

// A matrix-vector product (m or n is 1) of at most kSmallProductWork multiply-adds (plan.h
// gemm_library): each element of C a dot product over k, in 8 interleaved partial sums, then
// alpha and beta as BLAS applies them. MKL's sgemv opens an OpenMP parallel region even at the
// tutorial sizes' [12 x 368] x [368 x 1] (the backward's dW_ih and dL/dx of a one-feature input,
// seed-tiny), which cost ~9 us of a ~150 us training call (benchmarks/notes/small-hidden.md,
// "Matrix-vector products without MKL's parallel region").
template <typename T>
void inline_gemv(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  // A(i, p) = a[i * row_a + p * step_a], B(p, j) = b[p * step_b + j * col_b].
  const int64_t step_a = trans_a ? lda : 1, row_a = trans_a ? 1 : lda;
  const int64_t step_b = trans_b ? 1 : ldb, col_b = trans_b ? ldb : 1;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const T* ap = a + i * row_a;
      const T* bp = b + j * col_b;
      T acc[8] = {};
      int64_t p = 0;
      for (; p + 8 <= k; p += 8)
        for (int u = 0; u < 8; ++u) acc[u] += ap[(p + u) * step_a] * bp[(p + u) * step_b];
      T sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; p < k; ++p) sum += ap[p * step_a] * bp[p * step_b];
      c[i * ldc + j] = alpha * sum + (beta == T(0) ? T(0) : beta * c[i * ldc + j]);
    }
}

// ---- Small products on 16 AVX-512 lanes (float32) ----
// The backward's products at the tutorial sizes are tiny and thin: dW as [12 x 368] x [368 x 3]
// and dL/dx as [368 x 12] x [12 x 3] at seed-tiny. MKL's sgemm runs them in its skinny "nocopy"
// kernels at a few GFLOP/s (perf of seed-tiny training: ~6% of the call in six such calls) and
// inline_gemv's scalar loop ~2 us for its two (benchmarks/notes/small-hidden.md, "Small
// products on AVX-512 lanes"). small_gemm computes them along the longer of C's two dimensions,
// 16 rows (or columns) in one masked vector, up to 4 of the other dimension at a time (their
// factors broadcast), over k in two partial sums (even and odd terms, added at the end):
// results within float32 rounding of the BLAS's. The operand along the lanes is loaded where it
// is contiguous and gathered where it is strided (dL/dx's dgates rows).
#if defined(__GNUC__) && defined(__x86_64__)
#define FUSED_LSTM_SMALL_GEMM 1
// The lanes of `mask` from row p of X: x[i], or x[idx[i]] (kGather); the others zero.
template <bool kGather>
__attribute__((target("avx512f"), always_inline)) inline __m512 small_lanes(__mmask16 mask,
                                                                          __m512i idx,
                                                                          const float* x) {
  if constexpr (kGather) return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, x, 4);
  else return _mm512_maskz_loadu_ps(mask, x);
}

// D(i, j) = alpha * sum_p X(p, i) Y(p, j) + beta * D(i, j) for i < rows (the lanes of `mask`)
// and j < kNJ: X(p, i) = x[p * x_p + i] (kGather: x[p * x_p + idx[i]]), Y(p, j) = y[p * y_p +
// j * y_j], D(i, j) = d[i * d_i + j * d_j]. beta == 0 does not read D (as BLAS).
template <int kNJ, bool kGather>
__attribute__((target("avx512f,fma"), always_inline)) inline void small_block(
    int64_t K, __mmask16 mask, int rows, __m512i idx, const float* x, int64_t x_p,
    const float* y, int64_t y_p, int64_t y_j, float alpha, float beta, float* d, int64_t d_i,
    int64_t d_j) {
  __m512 acc0[kNJ], acc1[kNJ];
  for (int j = 0; j < kNJ; ++j) acc0[j] = acc1[j] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 2 <= K; p += 2) {
    const __m512 x0 = small_lanes<kGather>(mask, idx, x + p * x_p);
    const __m512 x1 = small_lanes<kGather>(mask, idx, x + (p + 1) * x_p);
    const float* y0 = y + p * y_p;
    const float* y1 = y0 + y_p;
    for (int j = 0; j < kNJ; ++j) {
      acc0[j] = _mm512_fmadd_ps(x0, _mm512_set1_ps(y0[j * y_j]), acc0[j]);
      acc1[j] = _mm512_fmadd_ps(x1, _mm512_set1_ps(y1[j * y_j]), acc1[j]);
    }
  }
  if (p < K) {
    const __m512 x0 = small_lanes<kGather>(mask, idx, x + p * x_p);
    for (int j = 0; j < kNJ; ++j)
      acc0[j] = _mm512_fmadd_ps(x0, _mm512_set1_ps(y[p * y_p + j * y_j]), acc0[j]);
  }
  for (int j = 0; j < kNJ; ++j) {
    alignas(64) float sum[16];
    _mm512_store_ps(sum, _mm512_add_ps(acc0[j], acc1[j]));
    for (int i = 0; i < rows; ++i) {
      float& out = d[i * d_i + j * d_j];
      out = alpha * sum[i] + (beta == 0.0f ? 0.0f : beta * out);
    }
  }
}

template <bool kGather>
__attribute__((target("avx512f,fma"))) void small_gemm_lanes(
    int64_t M, int64_t N, int64_t K, float alpha, const float* x, int64_t x_p, int64_t x_i,
    const float* y, int64_t y_p, int64_t y_j, float beta, float* d, int64_t d_i, int64_t d_j) {
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int>(x_i)));
  for (int64_t i0 = 0; i0 < M; i0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, M - i0));
    const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);
    const float* xb = x + i0 * x_i;
    for (int64_t j0 = 0; j0 < N; j0 += 4) {
      const float* yb = y + j0 * y_j;
      float* db = d + i0 * d_i + j0 * d_j;
#define FUSED_LSTM_SMALL_BLOCK(NJ) \
  small_block<NJ, kGather>(K, mask, rows, idx, xb, x_p, yb, y_p, y_j, alpha, beta, db, d_i, d_j)
      switch (std::min<int64_t>(4, N - j0)) {
        case 4: FUSED_LSTM_SMALL_BLOCK(4); break;
        case 3: FUSED_LSTM_SMALL_BLOCK(3); break;
        case 2: FUSED_LSTM_SMALL_BLOCK(2); break;
        default: FUSED_LSTM_SMALL_BLOCK(1);
      }
#undef FUSED_LSTM_SMALL_BLOCK
    }
  }
}
#endif

// Row-major C[m, n] = alpha * op(A)[m, k] op(B)[k, n] + beta * C by small_gemm_lanes, along m
// where m >= n, else along n (C^T = op(B)^T op(A)^T). False (nothing done) where this build
// has no AVX-512 version or a strided operand's 16 offsets do not fit the gather's int32 index;
// the caller checks the CPU (plan.h gemm_library).
inline bool small_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                       float* c, int64_t ldc) {
#ifdef FUSED_LSTM_SMALL_GEMM
  const int64_t a_i = trans_a ? 1 : lda, a_p = trans_a ? lda : 1;  // op(A)(i, p) = a[i a_i + p a_p]
  const int64_t b_p = trans_b ? 1 : ldb, b_j = trans_b ? ldb : 1;  // op(B)(p, j) = b[p b_p + j b_j]
  const bool along_m = m >= n;
  const int64_t x_i = along_m ? a_i : b_j;
  if (x_i > (int64_t{1} << 26)) return false;
  auto run = [&](auto gather) {
    constexpr bool kGather = decltype(gather)::value;
    if (along_m)
      small_gemm_lanes<kGather>(m, n, k, alpha, a, a_p, a_i, b, b_p, b_j, beta, c, ldc, 1);
    else
      small_gemm_lanes<kGather>(n, m, k, alpha, b, b_p, b_j, a, a_p, a_i, beta, c, 1, ldc);
  };
  if (x_i == 1) run(std::false_type{});
  else run(std::true_type{});
  return true;
#else
  return false;
#endif
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
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols},
                                 {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  const GemmLibrary library = gemm_library(trans_a, trans_b, m, n, k, std::is_same_v<T, float>);
  if (library == GemmLibrary::kInlineGemv) {
    inline_gemv(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (library == GemmLibrary::kSmallAvx512 &&
        small_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc))
      return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (library == GemmLibrary::kOneDnn) {
      at::native::mkldnn_matmul(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b),
                                at::from_blob(c, {m, n}, {ldc, 1}, opts), beta, alpha);
      return;
    }
  }
  if (library == GemmLibrary::kColumnSplit) {  // columns over the threads, each a BLAS call
    const int64_t threads = at::get_num_threads();
    const int64_t grain = ((n + threads - 1) / threads + 15) / 16 * 16;
    at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
      gemm<T>(trans_a, trans_b, m, n1 - n0, k, alpha, a, lda, trans_b ? b + n0 * ldb : b + n0,
              ldb, beta, c + n0, ldc);
    });
    return;
  }
  if (fortran_gemm<T>(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', n, m, k, alpha, b, ldb, a, lda,
                      beta, c, ldc))
    return;
  at::Tensor cv = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  cv.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
}

// ---- The recurrent product through oneDNN's brgemm micro-kernel (float32) ----
// A step's product is small (M = batch rows), and called from inside a parallel region (each
// thread runs its rows); the micro-kernel runs it on the calling thread at close to the machine's
// peak: 100-110 GFLOP/s per core here for [16..64, 256..512] x [.., 1024..2048], where MKL's
// sgemm reaches 70-80 and oneDNN's matmul 74 (benchmarks/notes/cpu-kernels.md, "The recurrent
// product through brgemm"). It needs the
// weight as B[K, N] row-major, so W_hh [4H, out] is transposed once per call.
// The setting allow_brgemm = False turns it off (BLAS then, as for float64).
constexpr int64_t kBrgemmBlockM = 64;
constexpr int64_t kBrgemmBlockN = 256;

// Whether the micro-kernel is exported and serves this CPU (probed once; plan.h's
// cpu_features() asks).
bool brgemm_works() {
  static const bool available = [] {
    namespace cb = at::native::cpublas;
    if (cb::brgemm == nullptr || cb::brgemm_release == nullptr) return false;
    try {  // a CPU the micro-kernel does not serve raises; check once, on a product with a tail
      float a[3 * 5], b[5 * 7], c[3 * 7];
      for (int i = 0; i < 15; ++i) a[i] = float(i % 4) - 1.5f;
      for (int i = 0; i < 35; ++i) b[i] = float(i % 3) + 0.5f;
      cb::brgemm(3, 7, 5, 5, 7, 7, false, a, b, c, false);
      cb::brgemm_release(false);
      for (int m = 0; m < 3; ++m)
        for (int n = 0; n < 7; ++n) {
          float expected = 0;
          for (int k = 0; k < 5; ++k) expected += a[m * 5 + k] * b[k * 7 + n];
          if (c[m * 7 + n] != expected) return false;  // exact: small integers and halves
        }
      return true;
    } catch (...) {
      return false;
    }
  }();
  return available;
}

// C[m, n] = A[m, k] B[k, n] (+ C when `add`) on this thread, in blocks the micro-kernel is
// built for.
void brgemm_product(bool add, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t m0 = 0; m0 < m; m0 += kBrgemmBlockM)
    for (int64_t n0 = 0; n0 < n; n0 += kBrgemmBlockN)
      at::native::cpublas::brgemm(std::min(kBrgemmBlockM, m - m0), std::min(kBrgemmBlockN, n - n0),
                                  k, lda, ldb, ldc, add, a + m0 * lda, b + n0, c + m0 * ldc + n0,
                                  false);
}

// The forward's weights for brgemm are packed in column panels of kBrgemmPanelN columns, each
// panel a contiguous row-major block (use_brgemm), rather than as one [K, 4H] matrix: a row
// stride of 4H floats (a power of two at the usual sizes) maps a column block's rows onto a few
// cache sets, so the micro-kernel re-read them from L3. Measured (1 thread, CPU time, min of
// 7-9): fastrnns-sized recurrence unfused 318 -> 283 ms, medium 69 -> 66 ms with W_hh packed
// alone. Panels of 64, 128 and 256 columns measured alike except 128 at hidden 512 (~15%
// slower); 64 is the micro-kernel's widest register block.
constexpr int64_t kBrgemmPanelN = 64;

// C[m, n] = A[m, k] B[k, n] (+ C when `add`) on this thread, B being rows [k0, k0 + k) of the
// packed weights of `w` (DirectionWeights::w_packed).
template <typename W>
void brgemm_packed(bool add, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                   const W& w, int64_t k0, float* c, int64_t ldc) {
  const int64_t k_total = w.k_ih + w.out;
  for (int64_t m0 = 0; m0 < m; m0 += kBrgemmBlockM)
    for (int64_t n0 = 0; n0 < n; n0 += kBrgemmPanelN) {
      const int64_t nb = std::min(kBrgemmPanelN, n - n0);
      at::native::cpublas::brgemm(std::min(kBrgemmBlockM, m - m0), nb, k, lda, nb, ldc, add,
                                  a + m0 * lda, w.w_packed + n0 * k_total + k0 * nb,
                                  c + m0 * ldc + n0, false);
    }
}

}  // namespace
}  // namespace fused_lstm
