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
enum class GemmLibrary { kBlas, kOneDnn, kColumnSplit, kInlineGemv };
// in_region: called inside a parallel region (a batch slice's thread). library_setting: the
// setting cpu.gemm_library (0 auto, 1 blas, 2 onednn_matmul); -1: its current value.
GemmLibrary gemm_library(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                         bool is_float, bool in_region = at::in_parallel_region(),
                         int64_t library_setting = -1);

inline const char* library_name(GemmLibrary l) {
  switch (l) {
    case GemmLibrary::kOneDnn: return "onednn_matmul";
    case GemmLibrary::kColumnSplit: return "blas_column_split";
    case GemmLibrary::kInlineGemv: return "inline_gemv";
    default: return "blas";
  }
}

// A matrix-vector product (m or n is 1) of at most kInlineGemvWork multiply-adds (plan.h
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
