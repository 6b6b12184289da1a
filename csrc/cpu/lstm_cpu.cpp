// CPU kernels of fused_lstm::lstm_forward / lstm_backward.
//
// Per layer and direction (Appleyard et al. 2016):
//   forward:  gates[rows, 4H] = x W_ih^T                    (one GEMM over every step)
//             per step t: gates_t += h_{t-1} W_hh^T          (BLAS, straight into the reserve)
//                         one fused pass: + b_ih + b_hh, activations, c_t, h_t (lstm_cell.h)
//                         [proj] h_t = (o * tanh c_t) W_hr^T  (BLAS)
//   backward: per step, in reverse: one fused pass -> d(gates)_t, dh_{t-1} = d(gates)_t W_hh
//             then dW_ih, dW_hh, dW_hr, db, dx as a few large GEMMs over every step.
// Nothing is allocated per time step: buffers are allocated once per call and BLAS is called
// on raw pointers. Everything runs in the math dtype (float for float/bfloat16, double for
// double); bfloat16 tensors are converted at the op's boundary, and on CPUs with AVX512_BF16 a
// bfloat16 model's products take bf16 operands with float32 sums (bf16_gemm.h), forward and
// backward.
#include "../lstm.h"
#include "../lstm_cell.h"
#include "bf16_gemm.h"
#include "fast_math.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

// Vectors (GCC's vector_size) go by value only between always-inline functions here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

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

// From this many multiply-adds on, float32 GEMMs go to oneDNN instead of the BLAS: on the AMD
// EPYC dev box MKL takes its AVX2 kernels while oneDNN's are AVX-512, 1.3x faster from about
// this size on (1 and 2 threads), and its fixed cost per call (~5 us) is lost below it
// (benchmarks/NOTES.md section 5).
constexpr int64_t kOneDnnMinWork = int64_t{1} << 22;
// Products of at most kThinRows rows whose matrix has kThinSplitWork elements or more are split
// by columns over the threads (NOTES.md section 7).
constexpr int64_t kThinRows = 8;
constexpr int64_t kThinSplitWork = int64_t{1} << 17;

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
  if constexpr (std::is_same_v<T, float>) {
    static const bool onednn = at::native::mkldnn_matmul != nullptr && at::hasMKLDNN();
    if (onednn && m * n * k >= kOneDnnMinWork) {
      at::native::mkldnn_matmul(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b),
                                at::from_blob(c, {m, n}, {ldc, 1}, opts), beta, alpha);
      return;
    }
  }
  // A product of a few rows (streaming inference: one sequence, one step) is bound by reading
  // the matrix, and BLAS runs it on one thread: split its columns over the threads instead.
  const int64_t threads = at::get_num_threads();
  if (m <= kThinRows && n * k >= kThinSplitWork && n >= 32 * threads && threads > 1 &&
      !at::in_parallel_region()) {
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
// sgemm reaches 70-80 and oneDNN's matmul 74 (benchmarks/NOTES.md section 8). It needs the
// weight as B[K, N] row-major, so W_hh [4H, out] is transposed once per call.
// FUSED_LSTM_NO_BRGEMM=1 turns it off (BLAS then, as for float64).
constexpr int64_t kBrgemmBlockM = 64;
constexpr int64_t kBrgemmBlockN = 256;

bool brgemm_available() {
  static const bool available = [] {
    namespace cb = at::native::cpublas;
    if (cb::brgemm == nullptr || cb::brgemm_release == nullptr) return false;
    const char* off = std::getenv("FUSED_LSTM_NO_BRGEMM");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
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

// ---- The cell passes: lstm_cell.h's math over n elements whose operands are contiguous. ----
// Loops GCC vectorises (fast_math.h keeps them free of libm calls and branches), compiled for
// baseline x86-64 and, chosen at run time, AVX2+FMA and AVX-512 machines.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSED_LSTM_SIMD_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FUSED_LSTM_SIMD_CLONES
#endif

// gate_{i,f,g,o}: [n] pre-activations in; with kKeep, the activated gates out (the reserve)
// bias (kBias): b_ih + b_hh, gate k's at bias_k, added to the pre-activations here (where the
//   input projection is fused into the steps' products, so the gate rows start without it)
// c: [n] c_{t-1} in, c_t out;  cells (kKeep): [n] c_t (reserve copy);  h: [n] h_t before
// projection. Without kKeep (inference) only c and h are written: 2 stores per element, not 7.
//
// In two loops per block of kCellBlock elements: the four activations (independent of each
// other and of c), then c_t and h_t. One loop did both, and each element's chain through
// tanh(c_t) kept the FMA units waiting (NOTES.md section 18: ~10% faster in two).
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
// vectoriser cannot do). Measured on medium's pass: 1.89 -> 1.35 ns per element (NOTES.md
// section 19). A block's last partial vector goes through masked loads and stores.
using cpu::vec16::Vec16;

// The first k (<= 16) floats at p, zeros after them; and the first k lanes of v stored at p
// (AVX-512 masked moves; plain ones for whole vectors).
__attribute__((target("avx512f"), always_inline)) inline Vec16 load16(const float* p, int64_t k) {
  if (k == 16) return Vec16(_mm512_loadu_ps(p));  // ~5% faster pass (NOTES.md section 20)
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

// Whether this CPU takes cell_forward_vec16 (checked once; FUSED_LSTM_NO_VEC16_CELL=1 turns it
// off, read at the first call: tests run the generic pass in a process started with it).
inline bool use_vec16_cell() {
  static const bool use = [] {
    const char* off = std::getenv("FUSED_LSTM_NO_VEC16_CELL");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  }();
  return use;
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
                              const T* bg, const T* bo, T* c, T* cells, T* h) {
#ifdef FUSED_LSTM_VEC16_MATH
  if constexpr (std::is_same_v<T, float>) {
    if (!use_vec16_cell()) return false;
    cell_forward_vec16(n, gi, gf, gg, go, bi, bf, bg, bo, c, cells, h);
    return true;
  }
#endif
  return false;
}

#define FUSED_LSTM_DEFINE_BLOCKS(T)                                                            \
  /* cells null: inference (only c and h written); bias null: none to add (see the loop) */  \
  FUSED_LSTM_SIMD_CLONES void cell_forward_block(int64_t n, T* gi, T* gf, T* gg, T* go,       \
                                                 const T* bias, int64_t bias_stride, T* c,     \
                                                 T* cells, T* h) {                             \
    const T* bf = bias ? bias + bias_stride : nullptr;                                         \
    const T* bg = bias ? bias + 2 * bias_stride : nullptr;                                     \
    const T* bo = bias ? bias + 3 * bias_stride : nullptr;                                     \
    if (cell_forward_fast(n, gi, gf, gg, go, bias, bf, bg, bo, c, cells, h)) return;           \
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

// The small-hidden path's product (see tiny_forward_steps), vectorised along the batch:
//   tiny_product: y[r][b] = y_in[r][b] + sum_i w[r, i] * h[i][b]    r < rows_w, i < cols_w, b < n
// where X[k][b] is X + k * ld_x + b (w is row-major [rows_w, cols_w]); y_in null means zeros,
// and may be y itself (or another buffer: a step adds its product to the input projection and
// writes the sum where its cell pass reads it, with no copy in between). The batch is taken in
// blocks of V columns whose sums stay in registers over i (V a compile-time width, so each block
// is whole vectors): 16, then 8, 4, 2, 1 for what is left (batch 10 = 8 + 2). Accumulating
// into y[r][b] across i instead made every step a load and a store (NOTES.md section 12).
// Rows go kTinyRowGroup at a time, each h vector loaded once for all of them: one row's sums are
// a single chain of dependent multiply-adds, which ran at the FMA latency (NOTES.md section 18).

// GCC's vectors of V elements (whole registers, or parts of them, on every target the clones
// are built for); passed by value only between always-inline functions (-Wpsabi, off at the top
// of this file, warns about an ABI that no call here goes through).
template <typename T, int V>
using Vec [[gnu::vector_size(V * sizeof(T))]] = T;

template <typename T, int V>
__attribute__((always_inline)) inline Vec<T, V> vec_load(const T* p) {
  Vec<T, V> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, int V>
__attribute__((always_inline)) inline void vec_store(T* p, const Vec<T, V>& v) {
  std::memcpy(p, &v, sizeof(v));
}

constexpr int kTinyRowGroup = 4;

// Rows [r, r + R) of the product for batch columns [b0, b0 + V).
template <typename T, int V, int R>
__attribute__((always_inline)) inline void tiny_product_rows_of(
    int64_t r, int64_t b0, int64_t cols_w, const T* __restrict w, const T* __restrict h,
    int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y) {
  Vec<T, V> acc[R];
  for (int k = 0; k < R; ++k)
    acc[k] = y_in ? vec_load<T, V>(y_in + (r + k) * ld_in + b0) : Vec<T, V>{};
  const T* __restrict wr = w + r * cols_w;
  for (int64_t i = 0; i < cols_w; ++i) {
    const Vec<T, V> hi = vec_load<T, V>(h + i * ld_h + b0);
    for (int k = 0; k < R; ++k) acc[k] += wr[k * cols_w + i] * hi;
  }
  for (int k = 0; k < R; ++k) vec_store<T, V>(y + (r + k) * ld_y + b0, acc[k]);
}

template <typename T, int V>
__attribute__((always_inline)) inline void tiny_product_block(
    int64_t b0, int64_t rows_w, int64_t cols_w, const T* __restrict w, const T* __restrict h,
    int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y) {
  int64_t r = 0;
  for (; r + kTinyRowGroup <= rows_w; r += kTinyRowGroup)
    tiny_product_rows_of<T, V, kTinyRowGroup>(r, b0, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);
  for (; r < rows_w; ++r)
    tiny_product_rows_of<T, V, 1>(r, b0, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);
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

template <typename T>
__attribute__((always_inline)) inline void tiny_product_loop(
    int64_t n, int64_t rows_w, int64_t cols_w, const T* __restrict w, const T* __restrict h,
    int64_t ld_h, const T* y_in, int64_t ld_in, T* y, int64_t ld_y) {
  for_width_blocks(n, [&](auto width, int64_t b0) __attribute__((always_inline)) {
    tiny_product_block<T, decltype(width)::value>(b0, rows_w, cols_w, w, h, ld_h, y_in, ld_in,
                                                  y, ld_y);
  });
}

// The same product for narrow batches, vectorised along w's rows instead: a batch of 3 fills
// no vector along the batch, so the blocks above ran 2 + 1 columns at a time, scalar (NOTES.md
// section 17). Reads w transposed, wT [cols_w][rows_w]; rows in blocks of V whose sums stay in
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

#define FUSED_LSTM_DEFINE_TINY(T)                                                              \
  FUSED_LSTM_SIMD_CLONES void tiny_product_cols(int64_t n, int64_t rows_w, int64_t cols_w,     \
                                                const T* w, const T* h, int64_t ld_h,           \
                                                const T* y_in, int64_t ld_in, T* y,             \
                                                int64_t ld_y) {                                 \
    tiny_product_loop<T>(n, rows_w, cols_w, w, h, ld_h, y_in, ld_in, y, ld_y);                  \
  }                                                                                            \
  FUSED_LSTM_SIMD_CLONES void tiny_product_rows(int64_t n, int64_t rows_w, int64_t cols_w,     \
                                                const T* wT, const T* h, int64_t ld_h,          \
                                                const T* y_in, int64_t ld_in, T* y,             \
                                                int64_t ld_y) {                                 \
    tiny_rows_loop<T>(n, rows_w, cols_w, wT, h, ld_h, y_in, ld_in, y, ld_y);                    \
  }
FUSED_LSTM_DEFINE_TINY(float)
FUSED_LSTM_DEFINE_TINY(double)
#undef FUSED_LSTM_DEFINE_TINY

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

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols; src null: zeros.
template <typename T>
void transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src ? src[r * ld_src + c] : T(0);
}

// Gates are stored row-major, [rows, 4H]: gate k of row b is the run g[b*4H + kH, +H). From
// this hidden size on, each row's runs are long enough to vectorise in place; below it, a layer
// runs in the batch-fastest layout of tiny_forward_steps / tiny_backward_steps.
constexpr int64_t kRowWiseHidden = 16;

// Copies a [rows, cols] block between two row strides. Short rows (a small hidden size) are
// copied column by column: one memcpy call per row would cost more than the copy itself.
template <typename T>
void copy_rows(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t rows,
               int64_t cols) {
  if (cols >= 16) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * dst_stride, src + r * src_stride, sizeof(T) * cols);
    return;
  }
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t r = 0; r < rows; ++r) dst[r * dst_stride + j] = src[r * src_stride + j];
}

// dst = src, or zeros where an optional tensor (initial state, upstream gradient) is absent.
template <typename T>
void copy_or_zero(const T* src, int64_t n, T* dst) {
  if (src) std::memcpy(dst, src, sizeof(T) * n);
  else std::fill_n(dst, n, T(0));
}

// A matrix that the bf16 products may read: rows in the math dtype, or (for a bfloat16 model,
// where the op keeps them as the caller gave them: lstm.h KeepBf16) bf16 rows, which only
// bf16_gemm and the bf16 packing read. bf16_gemm rounds a float operand to bf16 as it reads it,
// so both give the same products. At most one pointer is set.
template <typename T>
struct Operand {
  const T* f = nullptr;
  const c10::BFloat16* b = nullptr;
  Operand at(int64_t offset) const {
    return {f ? f + offset : nullptr, b ? b + offset : nullptr};
  }
  explicit operator bool() const { return f != nullptr || b != nullptr; }
};

template <typename T>
Operand<T> operand(const at::Tensor& t) {
  if (!t.defined()) return {};
  if (t.scalar_type() == at::kBFloat16) return {nullptr, t.const_data_ptr<c10::BFloat16>()};
  return {t.const_data_ptr<T>(), nullptr};
}

// fn(p) with the pointer that is set (for the bf16 products' overloads).
template <typename T, typename F>
void visit(const Operand<T>& o, F&& fn) {
  if (o.b) fn(o.b);
  else fn(o.f);
}

// Weights of one layer and direction, as raw pointers into contiguous tensors: math dtype,
// except W_ih and W_hh where the op kept them bf16 (ih, hh).
template <typename T>
struct DirectionWeights {
  const T* w_ih;  // [4H, I_l]; null where W_ih is bf16 (ih)
  const T* w_hh;  // [4H, out]; null where W_hh is bf16 (hh)
  const T* b_ih;  // [4H] or null
  const T* b_hh;  // [4H] or null
  const T* w_hr;  // [out, H] or null
  // The brgemm path (float32 only; see use_brgemm), else null: [W_ih^T; W_hh^T] ([k_ih + out,
  // 4H]; W_hh^T alone where k_ih = 0) packed in column panels of kBrgemmPanelN columns.
  const T* w_packed = nullptr;
  int64_t k_ih = 0;  // the layer's input size where the input projection is fused (brgemm or
                     // bf16_gemm: each step computes x_t W_ih^T for its rows), else 0
  int64_t out = 0;            // rows of W_hh^T in the panels
  const T* bias = nullptr;    // [4H]: b_ih + b_hh, added by the cell pass (use_bias), or null
  // bfloat16 models on AVX512_BF16 machines (float32 math only): W_ih and W_hh packed for
  // bf16_gemm, which then computes the input projection and the recurrent product from bf16
  // operands with float32 sums, as oneDNN's bf16 LSTM does; null otherwise (and then w_packed
  // may be set instead).
  const uint16_t* w_ih_bf16 = nullptr;
  const uint16_t* w_hh_bf16 = nullptr;
  // W_ih and W_hh as given, in the math dtype or kept bf16 (then w_ih, w_hh are null).
  Operand<T> ih, hh;
  // Whether a step's recurrent product runs at full speed on one thread (brgemm or bf16_gemm),
  // so the batch can be split over threads at any step size (for_each_batch_slice).
  bool single_thread_product() const { return w_packed != nullptr || w_hh_bf16 != nullptr; }
};

template <typename T>
DirectionWeights<T> direction_weights(const LSTMShape& s, const std::vector<at::Tensor>& w,
                                      int64_t layer, int64_t direction) {
  const int64_t k = s.weight_index(layer, direction);
  const Operand<T> ih = operand<T>(w[k]), hh = operand<T>(w[k + 1]);
  DirectionWeights<T> dw{ih.f, hh.f, nullptr, nullptr, nullptr};
  dw.ih = ih;
  dw.hh = hh;
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

// c_{t-1} of rows [r0, r0 + n) of step t as one contiguous [n, H] block: a run of the reserve's
// cells when every row continues a sequence, else pieced together in `buf` (at row r0) with c0
// for the rows that start here (only the reverse direction of a packed batch has both kinds in
// one step).
template <typename T>
const T* step_c_prev(const LSTMShape& s, int64_t direction, int64_t t, int64_t r0, int64_t n,
                     const T* cells, const T* c0, T* buf) {
  const int64_t H = s.hidden_size;
  if (direction == 0) return (t > 0 ? cells + s.step_offset[t - 1] * H : c0) + r0 * H;
  if (t + 1 == s.seq_len) return c0 + r0 * H;
  const int64_t continuing = s.batch_sizes[t + 1];
  const T* prev = cells + s.step_offset[t + 1] * H;
  if (r0 + n <= continuing) return prev + r0 * H;
  if (r0 >= continuing) return c0 + r0 * H;
  T* dst = buf + r0 * H;
  std::memcpy(dst, prev + r0 * H, sizeof(T) * (continuing - r0) * H);
  std::memcpy(dst + (continuing - r0) * H, c0 + continuing * H,
              sizeof(T) * (r0 + n - continuing) * H);
  return dst;
}

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
    if (w.w_ih_bf16) {
      visit(x, [&](auto a) {
        bf16_gemm_parallel(rows, G, in_size, a, in_size, w.w_ih_bf16, gates, G, false);
      });
      return;
    }
  }
  gemm<T>(false, true, rows, G, in_size, T(1), x.f, in_size, w.w_ih, in_size, T(0), gates, G);
}

// w.bias = b_ih + b_hh ([4H], in `holder`, allocated at the first call) where the layer has
// biases. The cell pass adds it, so the products write the gates without first filling them
// with it (NOTES.md section 21).
template <typename T>
void use_bias(DirectionWeights<T>& w, int64_t G, at::Tensor& holder) {
  if (w.b_ih == nullptr) return;
  if (!holder.defined()) holder = cpu_cached_empty(G, c10::CppTypeToScalarType<T>::value);
  T* buf = holder.mutable_data_ptr<T>();
  for (int64_t j = 0; j < G; ++j) buf[j] = w.b_ih[j] + w.b_hh[j];
  w.bias = buf;
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
void forward_step(const LSTMShape& s, const DirectionWeights<T>& w, int64_t bs, T* g_t,
                  const T* h_prev, int64_t ld_prev, T* h_next, int64_t ld_next, T* c_state,
                  T* cells_t, T* pre_proj_t, Operand<T> x_t, int64_t in_size) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size;
  const bool has_proj = s.proj_size > 0;
  if constexpr (std::is_same_v<T, float>) {
    if (w.w_hh_bf16) {  // g_t: the projection unless x_t is given (then computed here)
      if (x_t)
        visit(x_t, [&](auto a) { bf16_gemm(bs, G, in_size, a, in_size, w.w_ih_bf16, g_t, G, false); });
      if (h_prev) bf16_gemm(bs, G, out, h_prev, ld_prev, w.w_hh_bf16, g_t, G, true);
    } else if (x_t) {  // the input projection, fused: g_t = x_t W_ih^T + h_{t-1} W_hh^T
      brgemm_packed(false, bs, G, in_size, x_t.f, in_size, w, 0, g_t, G);
      if (h_prev) brgemm_packed(true, bs, G, out, h_prev, ld_prev, w, in_size, g_t, G);
    } else if (w.w_packed) {
      if (h_prev) brgemm_packed(true, bs, G, out, h_prev, ld_prev, w, 0, g_t, G);
    }
  }
  if (!w.single_thread_product() && h_prev)
    gemm<T>(false, true, bs, G, out, T(1), h_prev, ld_prev, w.w_hh, out, T(1), g_t, G);
  // The cell pass; h goes to h_next (out == H) or to pre_proj_t ([bs, H]).
  T* h_out = has_proj ? pre_proj_t : h_next;
  const int64_t ld_out = has_proj ? H : ld_next;
  for_each_row(bs, G, [&](int64_t b) {
    T* g = g_t + b * G;
    cell_forward_block(H, g, g + H, g + 2 * H, g + 3 * H, w.bias, H,
                       c_state + b * H, cells_t ? cells_t + b * H : nullptr, h_out + b * ld_out);
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
  T* layer_out;
  Operand<T> x = {};  // the step's layer input [.., in_size] when the projection is fused
};

// Whether every step has every row (no packed lengths): batch sizes never increase.
inline bool every_step_full(const LSTMShape& s) {
  return s.batch_sizes[0] == s.batch_sizes[s.seq_len - 1];
}

// Forward steps [first, last] (processing order) of direction d, for the batch rows [r0, r1)
// only. The rows of a batch are independent sequences, so a slice of them runs every step
// without waiting for the others. rows_of(t): step t's StepRows. h_zero: h_state is zero at
// step `first` (no hx, first == 0), so its product is skipped.
// Where every step has every row (no packed lengths), h_t is written once, into the layer
// output, and the next step reads it from there; h_state receives the last step's at the end.
// Otherwise (rows end or start at different steps) h_t goes to h_state, which every step reads,
// and is copied into the layer output.
template <typename T, typename RowsOf>
void forward_steps(const LSTMShape& s, const DirectionWeights<T>& w, int64_t d, int64_t first,
                   int64_t last, int64_t r0, int64_t r1, T* h_state, T* c_state,
                   const RowsOf& rows_of, int64_t in_size, bool h_zero) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size;
  const int64_t out_stride = s.num_directions * out;
  const bool in_output = every_step_full(s);
  const int64_t ld_h = in_output ? out_stride : out;
  const T* h_prev = h_zero ? nullptr : h_state + r0 * out;
  int64_t ld_prev = out, last_bs = 0;
  for (int64_t step = first; step <= last; ++step) {
    const int64_t t = time_of(s, d, step);
    const int64_t bs = std::min(s.batch_sizes[t], r1) - r0;
    if (bs <= 0) continue;
    const StepRows<T> p = rows_of(t);
    T* out_t = p.layer_out + r0 * out_stride;
    T* h_next = in_output ? out_t : h_state + r0 * out;
    forward_step(s, w, bs, p.gates + r0 * G, h_prev, ld_prev, h_next, ld_h, c_state + r0 * H,
                 p.cells ? p.cells + r0 * H : nullptr, p.pre_proj ? p.pre_proj + r0 * H : nullptr,
                 p.x.at(r0 * in_size), in_size);
    if (!in_output) copy_rows(h_next, out, out_t, out_stride, bs, out);
    h_prev = h_next;
    ld_prev = ld_h;
    last_bs = bs;
  }
  if (in_output && last_bs > 0) copy_rows(h_prev, out_stride, h_state + r0 * out, out, last_bs, out);
}

// Multiply-adds of recurrent work from which the batch is split over threads (each thread runs
// all steps for its rows: one parallel region instead of two per step), as long as one step's
// product is below kOneDnnMinWork: larger ones run faster as one GEMM parallel inside
// (measured, 2 threads: fastrnns infer 159 ms unsplit vs 181 ms split; NOTES.md section 6).
constexpr int64_t kSplitBatchWork = int64_t{1} << 20;

// body(r0, r1) over slices of [0, batch): one per thread when the recurrence of `steps` steps
// is worth a parallel region, else the whole batch on this thread.
// With brgemm (`single_thread_fast`) a slice's product runs at full speed at any size.
inline int64_t batch_slices(const LSTMShape& s, int64_t steps, bool single_thread_fast) {
  const int64_t threads = at::get_num_threads();
  const int64_t step_work = s.batch * 4 * s.hidden_size * (s.out_size + 8);
  if (threads > 1 && s.batch > 1 && steps * step_work >= kSplitBatchWork &&
      (single_thread_fast || step_work < kOneDnnMinWork) && !at::in_parallel_region())
    return std::min(threads, s.batch);
  return 1;
}

template <typename F>
void for_each_batch_slice(const LSTMShape& s, int64_t steps, bool single_thread_fast,
                          const F& body) {
  const int64_t slices = batch_slices(s, steps, single_thread_fast);
  if (slices > 1) at::parallel_for(0, s.batch, (s.batch + slices - 1) / slices, body);
  else body(0, s.batch);
}

template <typename T>
T* scratch(at::Tensor& holder, int64_t numel) {
  holder = cpu_cached_empty(numel, c10::CppTypeToScalarType<T>::value);
  return holder.mutable_data_ptr<T>();
}

// The input projection fused into each step's brgemm (g_t = b + x_t W_ih^T + h_{t-1} W_hh^T on
// the thread that runs the step: all of a layer's arithmetic at the micro-kernel's rate in one
// parallel region, no projection GEMM, no chunk buffer), instead of one GEMM over every step
// before them. But each step then streams W_ih as well as W_hh, which a thread's slice of a few
// rows does not pay for once the weights spill out of its L2: fused only where the slice has a
// row per kFuseWeightBytesPerRow of packed weights (measured, 1 thread, hidden 512, 100 steps:
// 16 rows 76 vs 71 ms unfused, 32 rows even, 64 rows 259 vs 271 ms; hidden 256, 2 layers:
// 2 rows 6.7 vs 5.4 ms, 4 rows even, 8 rows 16.0 vs 17.2 ms).
// The same for bf16_gemm's bf16 weights (weight_size: bytes per packed weight, 2 against
// brgemm's 4).
// FUSED_LSTM_UNFUSED_INPUT=1 turns it off (read per call, for A/B measurements and tests).
constexpr int64_t kFuseWeightBytesPerRow = int64_t{1} << 18;

inline bool fuse_input_projection(const LSTMShape& s, int64_t layer, int64_t weight_size) {
  const char* off = std::getenv("FUSED_LSTM_UNFUSED_INPUT");
  if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
  const int64_t slices = batch_slices(s, s.seq_len, true);
  const int64_t slice_rows = (s.batch + slices - 1) / slices;
  const int64_t weight_bytes =
      weight_size * 4 * s.hidden_size * (s.layer_input_size(layer) + s.out_size);
  return slice_rows * kFuseWeightBytesPerRow >= weight_bytes;
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols, in tiles that keep both
// sides' lines in cache.
template <typename T>
void transpose_tiles(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                     int64_t ld_dst) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FUSED_LSTM_AVX2_TRANSPOSE 1
// The same for float in 8 x 8 blocks transposed in AVX2 registers, the edges by transpose_tiles.
// The scalar tiles took ~1.1 ns per float at the fastrnns shape (their 32 source rows, 2 KB
// apart, fall into two L1 sets), these ~0.2 (NOTES.md section 18).
__attribute__((target("avx2"))) void transpose_avx2(const float* src, int64_t ld_src,
                                                    int64_t rows, int64_t cols, float* dst,
                                                    int64_t ld_dst) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < r8; r0 += 8)
    for (int64_t c0 = 0; c0 < c8; c0 += 8) {
      const float* s = src + r0 * ld_src + c0;
      float* d = dst + c0 * ld_dst + r0;
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ld_src);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);  // rows i, i+1 interleaved, low halves
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(d + i * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
  transpose_tiles(src + r8 * ld_src, ld_src, rows - r8, cols, dst + r8, ld_dst);
  transpose_tiles(src + c8, ld_src, r8, cols - c8, dst + c8 * ld_dst, ld_dst);
}
#endif

template <typename T>
void transpose_block(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                     int64_t ld_dst) {
#ifdef FUSED_LSTM_AVX2_TRANSPOSE
  if constexpr (std::is_same_v<T, float>) {
    static const bool avx2 = [] {
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") != 0;
    }();
    if (avx2) return transpose_avx2(src, ld_src, rows, cols, dst, ld_dst);
  }
#endif
  transpose_tiles(src, ld_src, rows, cols, dst, ld_dst);
}

// The brgemm path's weights of layer `layer`, packed into `buf` (see kBrgemmPanelN): each panel
// of columns [n0, n0 + nb) of the gates holds W_ih^T's rows (where the input projection is
// fused) then W_hh^T's, [k_ih + out, nb] row-major, at buf + n0 * (k_ih + out). `buf` is null
// (from brgemm_buffer) where that path does not apply.
template <typename T>
void use_brgemm(const LSTMShape& s, DirectionWeights<T>& w, T* buf, int64_t layer) {
  if constexpr (std::is_same_v<T, float>) {
    if (buf == nullptr) return;
    const int64_t G = 4 * s.hidden_size, out = s.out_size;
    const int64_t k_ih = fuse_input_projection(s, layer, sizeof(float)) ? s.layer_input_size(layer) : 0;
    const int64_t K = k_ih + out;
    const int64_t panels = (G + kBrgemmPanelN - 1) / kBrgemmPanelN;
    auto pack = [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kBrgemmPanelN, nb = std::min(kBrgemmPanelN, G - n0);
        T* panel = buf + n0 * K;
        transpose_block(w.w_ih + n0 * k_ih, k_ih, nb, k_ih, panel, nb);
        transpose_block(w.w_hh + n0 * out, out, nb, out, panel + k_ih * nb, nb);
      }
    };
    if (panels > 1 && !at::in_parallel_region()) at::parallel_for(0, panels, 1, pack);
    else pack(0, panels);
    w.w_packed = buf;
    w.k_ih = k_ih;
    w.out = out;
  }
}

// Scratch for use_brgemm, or null where brgemm is not used: other dtypes, small hidden sizes,
// and a single step (one product does not pay for the transpose).
template <typename T>
T* brgemm_buffer(const LSTMShape& s, at::Tensor& holder) {
  if (!std::is_same_v<T, float> || s.hidden_size < kRowWiseHidden || s.seq_len < 2 ||
      !brgemm_available())
    return nullptr;
  const int64_t in_max = std::max(s.input_size, s.num_directions * s.out_size);
  return scratch<T>(holder, 4 * s.hidden_size * (s.out_size + in_max));
}

// Whether a call's products go through bf16_gemm (forward and backward): bfloat16 models on
// CPUs with AVX512_BF16, not small hidden sizes, not a single step (packing costs a pass over
// the weights).
inline bool use_bf16_products(const LSTMShape& s, bool bf16_model) {
  return bf16_model && s.hidden_size >= kRowWiseHidden && s.seq_len >= 2 && bf16_gemm_available();
}

// Room for one layer and direction's W_ih and W_hh packed for bf16_gemm (the largest), or null
// where the bf16 products are not used.
inline uint16_t* bf16_weight_buffer(const LSTMShape& s, bool bf16_model, at::Tensor& holder) {
  if (!use_bf16_products(s, bf16_model)) return nullptr;
  const int64_t G = 4 * s.hidden_size;
  size_t most = 0;
  for (int64_t l = 0; l < s.num_layers; ++l)
    most = std::max(most, bf16_packed_size(G, s.layer_input_size(l)));
  holder = cpu_cached_empty(static_cast<int64_t>(most + bf16_packed_size(G, s.out_size)),
                            at::kBFloat16);
  return reinterpret_cast<uint16_t*>(holder.mutable_data_ptr());
}

// Packs layer `layer`'s W_ih and W_hh into `buf` (from bf16_weight_buffer) for bf16_gemm: the
// bf16 model's weights as given (kept bf16) or converted to float32, which packs back exactly.
template <typename T>
void use_bf16_gemm(const LSTMShape& s, int64_t layer, DirectionWeights<T>& w, uint16_t* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (buf == nullptr) return;
    const int64_t G = 4 * s.hidden_size, in = s.layer_input_size(layer), out = s.out_size;
    uint16_t* hh = buf + bf16_packed_size(G, in);  // a multiple of 32 elements: 64-byte blocks
    visit(w.ih, [&](auto W) { bf16_pack_weight(W, G, in, in, buf); });
    visit(w.hh, [&](auto W) { bf16_pack_weight(W, G, out, out, hh); });
    w.w_ih_bf16 = buf;
    w.w_hh_bf16 = hh;
    if (fuse_input_projection(s, layer, sizeof(uint16_t))) w.k_ih = in;
  }
}

// ---- Small hidden sizes (H < kRowWiseHidden): a batch-fastest working layout ----
// Rows of 3 or 10 floats are too short to vectorise, and a BLAS call costs more than a whole
// step's arithmetic. So below kRowWiseHidden a layer and direction runs with every per-step
// quantity laid out [feature][batch] ("T" below): the input projection is computed transposed
// (gT [4H, rows] = W_ih x^T + b), the state is kept as hT [out, B] and cT [H, B], the recurrent
// product is an inline loop vectorised along the batch, and the cell pass runs per hidden unit
// over the step's rows. Only what leaves the loop is written row-major: the reserve's gates,
// cells and pre_proj (training) and the layer output. The reserve layout is the common one.
template <typename T>
struct TinyBuffers {
  T* gT;        // [4H][ld_g]: the input projection of rows [row0, row0 + ld_g), then gates
  int64_t ld_g;
  int64_t row0;
  T* hT;        // [out][B] h state
  T* cT;        // [H][B]   c state
  T* hnew;      // [H][B]   o * tanh(c_t) before the projection (projection only)
  T* cnew;      // [H][B]   c_t of the step
  T* gstep;     // [4H][bs] one step's gates, compact (a batch slice [r0, r1) at 4H * r0)
  T* xT;        // [kTinyProjectionInput][ld_g] the layer input, transposed (tiny_input_projection)
};

// Inputs up to this size are projected by tiny_product (x transposed into TinyBuffers::xT
// first); larger ones by a GEMM. At tutorial sizes a BLAS call costs more than the arithmetic.
constexpr int64_t kTinyProjectionInput = 32;

// gT [4H, rows] = W_ih x^T + b, x: [rows, in_size]; xT: room for [kTinyProjectionInput, rows].
template <typename T>
void tiny_input_projection(const DirectionWeights<T>& w, const T* x, int64_t rows,
                           int64_t in_size, int64_t G, T* gT, T* xT) {
  if (w.b_ih)
    for (int64_t r = 0; r < G; ++r) std::fill_n(gT + r * rows, rows, w.b_ih[r] + w.b_hh[r]);
  if (in_size <= kTinyProjectionInput) {
    transpose(x, in_size, rows, in_size, xT, rows);
    tiny_product<T>(rows, G, in_size, w.w_ih, nullptr, xT, rows, w.b_ih ? gT : nullptr, rows, gT,
                    rows);
    return;
  }
  gemm<T>(false, true, G, rows, in_size, T(1), w.w_ih, in_size, x, in_size, w.b_ih ? T(1) : T(0),
          gT, rows);
}

// W_hh^T [out][4H] and, with a projection, W_hr^T [H][out], into `dst` (room for
// (4H + H) * out): the other layout of the small-hidden products' weights (tiny_product's w
// and wT), used by the forward's narrow batches and by the backward. Returns W_hh^T, W_hr^T
// (null without a projection).
template <typename T>
std::pair<const T*, const T*> transpose_recurrent_weights(const LSTMShape& s,
                                                          const DirectionWeights<T>& w, T* dst) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size;
  transpose(w.w_hh, out, G, out, dst, G);
  if (s.proj_size == 0) return {dst, nullptr};
  transpose(w.w_hr, H, out, H, dst + G * out, out);
  return {dst, dst + G * out};
}

// Forward steps [first, last] (processing order) of direction d for batch rows [r0, r1).
// gates/cells/pre_proj: the reserve's (null for inference); layer_out: this direction's first
// column of the layer output, row stride D*out. h_zero: hT is zero at step `first` (no hx).
template <typename T>
void tiny_forward_steps(const LSTMShape& s, const DirectionWeights<T>& w, int64_t d,
                        int64_t first, int64_t last, int64_t r0, int64_t r1,
                        const TinyBuffers<T>& tb, T* gates, T* cells, T* pre_proj,
                        T* layer_out, bool h_zero) {
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
    // The step's gates, compact [4H][bs]: its input projection plus the recurrent product.
    T* g = tb.gstep + G * r0;
    const T* projected = tb.gT + (off - tb.row0) + r0;
    T* hT = tb.hT + r0;
    T* cT = tb.cT + r0;
    T* hnew = tb.hnew + r0;
    T* cnew = tb.cnew + r0;
    if (h_zero && step == first)  // h_{t-1} = 0 (no hx): the gates are the projection
      copy_rows(projected, ld, g, bs, G, bs);
    else
      tiny_product(bs, G, out, w.w_hh, w_hh_t, hT, B, projected, ld, g, bs);
    if (bs == B) {  // the whole batch: [H][B] state and [H][bs] gates line up, one long pass
      cell_forward_block(H * bs, g, g + H * bs, g + 2 * H * bs, g + 3 * H * bs, nullptr, 0, cT,
                         gates ? cnew : nullptr, has_proj ? hnew : hT);
    } else {
      for (int64_t j = 0; j < H; ++j)
        cell_forward_block(bs, g + j * bs, g + (H + j) * bs, g + (2 * H + j) * bs,
                           g + (3 * H + j) * bs, nullptr, 0, cT + j * B,
                           gates ? cnew + j * B : nullptr, has_proj ? hnew + j * B : hT + j * B);
    }
    if (has_proj) tiny_product<T>(bs, out, H, w.w_hr, w_hr_t, hnew, B, nullptr, 0, hT, B);
    const int64_t row = off + r0;
    if (gates) {
      transpose(g, bs, G, bs, gates + row * G, G);
      transpose(cnew, B, H, bs, cells + row * H, H);
      if (has_proj) transpose(hnew, B, H, bs, pre_proj + row * H, H);
    }
    transpose(hT, B, out, bs, layer_out + row * out_stride, out_stride);
  }
}

// Allocates the small-hidden path's buffers (gT for `g_rows` rows) in `holder`.
template <typename T>
TinyBuffers<T> tiny_buffers(const LSTMShape& s, int64_t g_rows, at::Tensor& holder) {
  const int64_t H = s.hidden_size, B = s.batch;
  const int64_t state = (s.out_size + 3 * H) * B;
  T* p = scratch<T>(holder, 4 * H * g_rows + state + 4 * H * B + kTinyProjectionInput * g_rows);
  T* st = p + 4 * H * g_rows;
  return TinyBuffers<T>{p, g_rows, 0, st, st + s.out_size * B, st + (s.out_size + H) * B,
                        st + (s.out_size + 2 * H) * B, st + state, st + state + 4 * H * B};
}

template <typename T>
void forward_impl(const LSTMShape& s, Operand<T> input, const T* hx, const T* cx,
                  const std::vector<at::Tensor>& weights, const T* mask, T* hy, T* cy,
                  T* reserve, bool bf16_model) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, D = s.num_directions;
  const int64_t out_stride = D * out;  // row stride of layer_out
  at::Tensor tiny_buf, dropped_buf;
  const bool tiny = H < kRowWiseHidden;
  const TinyBuffers<T> tb = tiny ? tiny_buffers<T>(s, s.rows, tiny_buf) : TinyBuffers<T>{};
  at::Tensor w_packed_buf, bf16_buf, bias_buf;
  uint16_t* bf16_weights = bf16_weight_buffer(s, bf16_model, bf16_buf);
  T* w_packed = bf16_weights ? nullptr : brgemm_buffer<T>(s, w_packed_buf);
  T* dropped = (mask && s.num_layers > 1) ? scratch<T>(dropped_buf, s.rows * out_stride) : nullptr;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const Operand<T> x = layer_input(
        s, l, input, l > 0 ? reserve + s.layer_out_offset(l - 1) : nullptr, mask, dropped);
    T* layer_out = reserve + s.layer_out_offset(l);
    for (int64_t d = 0; d < D; ++d) {
      auto w = direction_weights<T>(s, weights, l, d);
      T* gates = reserve + s.gates_offset(l, d);
      T* cells = reserve + s.cells_offset(l, d);
      T* pre_proj = reserve + s.pre_proj_offset(l, d);  // used only with projection
      // State lives directly in the h_n / c_n outputs.
      const int64_t ld = l * D + d;
      T* h_state = hy + ld * s.batch * out;
      T* c_state = cy + ld * s.batch * H;
      copy_or_zero(hx ? hx + ld * s.batch * out : nullptr, s.batch * out, h_state);
      copy_or_zero(cx ? cx + ld * s.batch * H : nullptr, s.batch * H, c_state);
      if (tiny) {
        tiny_input_projection(w, x.f, s.rows, s.layer_input_size(l), G, tb.gT, tb.xT);
        transpose(hx ? hx + ld * s.batch * out : nullptr, out, s.batch, out, tb.hT, s.batch);
        transpose(cx ? cx + ld * s.batch * H : nullptr, H, s.batch, H, tb.cT, s.batch);
        for_each_batch_slice(s, s.seq_len, false, [&](int64_t r0, int64_t r1) {
          tiny_forward_steps(s, w, d, 0, s.seq_len - 1, r0, r1, tb, gates, cells, pre_proj,
                             layer_out + d * out, hx == nullptr);
        });
        transpose(tb.hT, s.batch, out, s.batch, h_state, out);
        transpose(tb.cT, s.batch, H, s.batch, c_state, H);
        continue;
      }
      const int64_t in_size = s.layer_input_size(l);
      use_bf16_gemm(s, l, w, bf16_weights);
      use_brgemm(s, w, w_packed, l);
      use_bias(w, G, bias_buf);
      const bool fused = w.k_ih > 0;  // else every step's projection at once, here
      if (!fused) input_projection(w, x, s.rows, in_size, G, gates);
      auto rows_of = [&](int64_t t) {
        const int64_t off = s.step_offset[t];
        return StepRows<T>{gates + off * G, cells + off * H,
                           s.proj_size > 0 ? pre_proj + off * H : nullptr,
                           layer_out + off * out_stride + d * out,
                           fused ? x.at(off * in_size) : Operand<T>{}};
      };
      for_each_batch_slice(s, s.seq_len, w.single_thread_product(), [&](int64_t r0, int64_t r1) {
        forward_steps(s, w, d, 0, s.seq_len - 1, r0, r1, h_state, c_state, rows_of, in_size,
                      hx == nullptr);
      });
    }
  }
}

// ---- Thin batches (streaming inference): one parallel region per layer and step ----
// A step of a few rows (one sequence, one step per call) does little besides reading every
// weight once: it is bound by reading W_ih and W_hh (3.4 MB at stream-step, in L3 between
// calls). The row-wise path spends two parallel regions per layer on it (the input projection
// and the recurrent product, each split by columns, gemm) plus a cell pass on one thread.
// Here, each thread owns a contiguous range of hidden units (of every direction of the layer),
// hence their four gate rows of W_ih and W_hh: it computes their pre-activations as dot
// products vectorised along the weight rows (the four gates of a unit and up to four batch rows
// at a time, one set of accumulators for both products), runs the cell for its units
// (cell_forward_block) and writes h_t and c_t, with no synchronisation inside the layer. Steps
// and layers are separated by the end of the region (h_{t-1} needs every unit). OpenMP hands
// chunk i to thread i, so a thread keeps its units, and re-reads the same weight slice, from
// call to call. No projection; float32 and float64.
// Measured (stream-step op, loaded 2-core box, minimum of many samples): ~61-73 -> ~35-41 us
// on 2 threads, ~95 -> ~55 us on 1 (benchmarks/NOTES.md section 7).
//
// Each step re-reads W_ih (the row-wise path projects every step's input in one GEMM): still
// measured faster than that path up to 32 steps (input 64, hidden 256, 2 layers, batch 1..8,
// 1 and 2 threads; with and without brgemm), so several steps take this kernel up to
// kThinMaxSteps while the input is not larger than twice the hidden size.
constexpr int64_t kThinMaxSteps = 32;
// Units go to threads in blocks of this many.
constexpr int64_t kThinUnitBlock = 16;

// One step of one layer (every direction), as the threads read it. Per direction d:
template <typename T>
struct ThinStep {
  int64_t H = 0, in_size = 0;
  int64_t bs[2] = {0, 0};                  // rows active at the step
  const T* w_ih[2] = {};                   // [4H, in_size]
  const T* w_hh[2] = {};                   // [4H, H]
  const T* b_ih[2] = {};                   // [4H] or null
  const T* b_hh[2] = {};
  const T* x[2][kThinRows] = {};           // x_t of each row
  const T* h[2][kThinRows] = {};           // h_{t-1} of each row; null: zero for every row
  T* h_out[2][kThinRows] = {};             // receive h_t (the layer output's rows)
  T* h_state[2] = {};                      // [B, H] receive h_t (h_n)
  T* c_state[2] = {};                      // [B, H] c_{t-1} in, c_t out
  T* gates = nullptr;                      // scratch [2][kThinRows][4H]: pre-activations
};

namespace thin {

template <typename T, int kBytes>
using VecOf = Vec<T, int(kBytes / sizeof(T))>;

template <typename T, int kBytes>
FUSED_LSTM_INLINE T hsum(VecOf<T, kBytes> v) {
  if constexpr (kBytes == 2 * sizeof(T)) {
    return v[0] + v[1];
  } else {
    using Half = VecOf<T, kBytes / 2>;
    Half lo, hi;
    std::memcpy(&lo, &v, sizeof(Half));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return hsum<T, kBytes / 2>(lo + hi);
  }
}

// acc[r][b] (vector part) and tail[r][b] (the last K % lanes elements) += the dot product of
// row r of w (rows row_stride apart, K long) with x[b], for r < kR and b < kNB.
template <typename T, int kBytes, int kR, int kNB>
FUSED_LSTM_INLINE void dots(const T* w, int64_t row_stride, int64_t K, const T* const* x,
                            VecOf<T, kBytes> (&acc)[kR][kNB],
                            T (&tail)[kR][kNB]) {
  using V = VecOf<T, kBytes>;
  constexpr int64_t kLanes = kBytes / sizeof(T);
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    V xv[kNB];
    for (int b = 0; b < kNB; ++b) xv[b] = vec_load<T, kLanes>(x[b] + k);
    for (int r = 0; r < kR; ++r) {
      const V wv = vec_load<T, kLanes>(w + r * row_stride + k);
      for (int b = 0; b < kNB; ++b) acc[r][b] += wv * xv[b];
    }
  }
  for (; k < K; ++k)
    for (int r = 0; r < kR; ++r)
      for (int b = 0; b < kNB; ++b) tail[r][b] += w[r * row_stride + k] * x[b][k];
}

// Pre-activations of hidden unit j of direction d for the rows [b0, b0 + kNB).
template <typename T, int kBytes, int kNB>
FUSED_LSTM_INLINE void unit_rows(const ThinStep<T>& a, int64_t d, int64_t j, int64_t b0) {
  using V = VecOf<T, kBytes>;
  const int64_t H = a.H, I = a.in_size;
  V acc[4][kNB];
  T tail[4][kNB];
  for (int g = 0; g < 4; ++g)
    for (int b = 0; b < kNB; ++b) {
      acc[g][b] = V{};
      tail[g][b] = T(0);
    }
  dots<T, kBytes, 4, kNB>(a.w_ih[d] + j * I, H * I, I, a.x[d] + b0, acc, tail);
  if (a.h[d][0] != nullptr)
    dots<T, kBytes, 4, kNB>(a.w_hh[d] + j * H, H * H, H, a.h[d] + b0, acc, tail);
  for (int g = 0; g < 4; ++g) {
    const T bias = a.b_ih[d] ? a.b_ih[d][g * H + j] + a.b_hh[d][g * H + j] : T(0);
    for (int b = 0; b < kNB; ++b)
      a.gates[(d * kThinRows + b0 + b) * 4 * H + g * H + j] =
          (hsum<T, kBytes>(acc[g][b]) + tail[g][b]) + bias;
  }
}

// Pre-activations of the units [j0, j1) of direction d, every row of the step; kBytes: the
// vector width, kMaxNB: rows at a time (accumulators: 4 * kMaxNB vectors).
template <typename T, int kBytes, int kMaxNB>
FUSED_LSTM_INLINE void units_pre(const ThinStep<T>& a, int64_t d, int64_t j0, int64_t j1) {
  const int64_t bs = a.bs[d];
  for (int64_t j = j0; j < j1; ++j) {
    int64_t b0 = 0;
    for (; b0 + kMaxNB <= bs; b0 += kMaxNB) unit_rows<T, kBytes, kMaxNB>(a, d, j, b0);
    const int64_t rest = bs - b0;
    if (rest >= 3) unit_rows<T, kBytes, 3>(a, d, j, b0);
    else if (rest == 2) unit_rows<T, kBytes, 2>(a, d, j, b0);
    else if (rest == 1) unit_rows<T, kBytes, 1>(a, d, j, b0);
  }
}

// One version per instruction set (vector width and accumulator count differ, so not
// target_clones of one body), chosen at run time by pre_fn.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSED_LSTM_THIN_ISAS 1
#define FUSED_LSTM_DEFINE_THIN(T)                                                         \
  __attribute__((target("arch=x86-64-v4"))) void pre_v4(const ThinStep<T>& a, int64_t d,  \
                                                        int64_t j0, int64_t j1) {         \
    units_pre<T, 64, 4>(a, d, j0, j1);                                                    \
  }                                                                                       \
  __attribute__((target("arch=x86-64-v3"))) void pre_v3(const ThinStep<T>& a, int64_t d,  \
                                                        int64_t j0, int64_t j1) {         \
    units_pre<T, 32, 2>(a, d, j0, j1);                                                    \
  }                                                                                       \
  void pre_base(const ThinStep<T>& a, int64_t d, int64_t j0, int64_t j1) {                \
    units_pre<T, 16, 2>(a, d, j0, j1);                                                    \
  }
#else
#define FUSED_LSTM_DEFINE_THIN(T)                                                         \
  void pre_base(const ThinStep<T>& a, int64_t d, int64_t j0, int64_t j1) {                \
    units_pre<T, 16, 2>(a, d, j0, j1);                                                    \
  }
#endif
FUSED_LSTM_DEFINE_THIN(float)
FUSED_LSTM_DEFINE_THIN(double)
#undef FUSED_LSTM_DEFINE_THIN

template <typename T>
using PreFn = void (*)(const ThinStep<T>&, int64_t, int64_t, int64_t);

template <typename T>
PreFn<T> pre_fn() {
  static const PreFn<T> fn = [] {
    PreFn<T> f = pre_base;
#ifdef FUSED_LSTM_THIN_ISAS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) f = pre_v4;
    else if (__builtin_cpu_supports("x86-64-v3")) f = pre_v3;
#endif
    return f;
  }();
  return fn;
}

}  // namespace thin

// A thread's share of a step: the units [u0, u1) of the layer's D * H (direction-major).
template <typename T>
void thin_step_units(const ThinStep<T>& a, int64_t D, int64_t u0, int64_t u1) {
  const int64_t H = a.H, G = 4 * H;
  const thin::PreFn<T> pre = thin::pre_fn<T>();
  for (int64_t d = 0; d < D; ++d) {
    const int64_t j0 = std::max<int64_t>(u0 - d * H, 0), j1 = std::min<int64_t>(u1 - d * H, H);
    if (j0 >= j1) continue;
    pre(a, d, j0, j1);
    const int64_t n = j1 - j0;
    for (int64_t b = 0; b < a.bs[d]; ++b) {
      T* g = a.gates + (d * kThinRows + b) * G + j0;
      T* h = a.h_out[d][b] + j0;
      cell_forward_block(n, g, g + H, g + 2 * H, g + 3 * H, nullptr, 0, a.c_state[d] + b * H + j0,
                         nullptr, h);
      std::memcpy(a.h_state[d] + b * H + j0, h, sizeof(T) * n);
    }
  }
}

// Where thin_inference runs: batches of at most kThinRows rows, hidden sizes of the row-wise
// path, no projection; one step, or up to kThinMaxSteps steps with input_size <= 2 * hidden.
// FUSED_LSTM_NO_THIN=1 turns it off (read once).
bool thin_enabled() {
  static const bool enabled = [] {
    const char* off = std::getenv("FUSED_LSTM_NO_THIN");
    return off == nullptr || off[0] == '\0' || off[0] == '0';
  }();
  return enabled;
}

bool thin_applies(const LSTMShape& s) {
  return s.proj_size == 0 && s.hidden_size >= kRowWiseHidden && s.batch >= 1 &&
      s.batch <= kThinRows && s.seq_len >= 1 &&
      (s.seq_len == 1 || (s.seq_len <= kThinMaxSteps && s.input_size <= 2 * s.hidden_size)) &&
      thin_enabled();
}

// inference_impl for thin_applies shapes (same arguments).
template <typename T>
void thin_inference(const LSTMShape& s, const T* input, const T* hx, const T* cx,
                    const std::vector<at::Tensor>& weights, const T* mask, T* hy, T* cy,
                    T* output) {
  const int64_t H = s.hidden_size, D = s.num_directions, B = s.batch;
  const int64_t out_stride = D * H, layer_numel = s.rows * out_stride;
  at::Tensor buf_t, dropped_buf;
  const int64_t gates_numel = 2 * kThinRows * 4 * H;
  T* buf = scratch<T>(buf_t, gates_numel + H + (s.num_layers > 1 ? 2 * layer_numel : 0));
  T* zeros = buf + gates_numel;  // h_{t-1} of rows that start without hx
  std::fill_n(zeros, H, T(0));
  T* layer_buf = zeros + H;
  T* dropped = (mask && s.num_layers > 1) ? scratch<T>(dropped_buf, layer_numel) : nullptr;
  const bool split = at::get_num_threads() > 1 && !at::in_parallel_region();
  const int64_t units = D * H, blocks = (units + kThinUnitBlock - 1) / kThinUnitBlock;
  const T* prev = nullptr;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const int64_t in_size = s.layer_input_size(l);
    const T* x = layer_input(s, l, Operand<T>{input}, prev, mask, dropped).f;
    T* layer_out = l + 1 == s.num_layers ? output : layer_buf + (l % 2) * layer_numel;
    ThinStep<T> a;
    a.H = H;
    a.in_size = in_size;
    a.gates = buf;
    for (int64_t d = 0; d < D; ++d) {
      const auto w = direction_weights<T>(s, weights, l, d);
      a.w_ih[d] = w.w_ih;
      a.w_hh[d] = w.w_hh;
      a.b_ih[d] = w.b_ih;
      a.b_hh[d] = w.b_hh;
      const int64_t ld = l * D + d;
      a.h_state[d] = hy + ld * B * H;
      a.c_state[d] = cy + ld * B * H;
      copy_or_zero(cx ? cx + ld * B * H : nullptr, B * H, a.c_state[d]);
    }
    const bool parallel = split && blocks > 1 && D * 4 * H * (in_size + H) >= kThinSplitWork;
    for (int64_t step = 0; step < s.seq_len; ++step) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t t = time_of(s, d, step);
        const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
        const int64_t prev_t = d == 0 ? t - 1 : t + 1;
        // Rows that continue from the previous step read its output; the others h0.
        const int64_t continuing = step == 0 ? 0 : s.batch_sizes[prev_t];
        const T* h0 = hx ? hx + (l * D + d) * B * H : nullptr;
        a.bs[d] = bs;
        for (int64_t b = 0; b < bs; ++b) {
          a.x[d][b] = x + (off + b) * in_size;
          a.h_out[d][b] = layer_out + (off + b) * out_stride + d * H;
          a.h[d][b] = b < continuing ? layer_out + (s.step_offset[prev_t] + b) * out_stride + d * H
                                     : (h0 ? h0 + b * H : (step == 0 ? nullptr : zeros));
        }
      }
      if (parallel) {
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          thin_step_units(a, D, b0 * kThinUnitBlock, std::min(b1 * kThinUnitBlock, units));
        });
      } else {
        thin_step_units(a, D, 0, units);
      }
    }
    prev = layer_out;
  }
}

// Forward without storing anything for backward (no grad needed): the input projection runs
// over chunks of steps into one reused buffer (or is fused into the steps), the cell pass keeps
// no gates and no c_t copies, each step's pre-projection goes to scratch,
// and layer outputs alternate between two buffers (the last layer writes `output`). Besides
// the work, this saves the first-touch page faults of a fresh reserve on every call
// (benchmarks/NOTES.md section 3).
// Gate elements per input-projection chunk (4 MB in float32). Measured: 2^18 cost fastrnns a
// quarter of its speed in small GEMMs; 2^22 was slower again than 2^20 (NOTES.md).
constexpr int64_t kChunkElements = 1 << 20;

template <typename T>
void inference_impl(const LSTMShape& s, Operand<T> input, const T* hx, const T* cx,
                    const std::vector<at::Tensor>& weights, const T* mask, T* hy, T* cy,
                    T* output, bool bf16_model) {
  if (thin_applies(s)) return thin_inference(s, input.f, hx, cx, weights, mask, hy, cy, output);
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, D = s.num_directions;
  const int64_t out_stride = D * out;
  const int64_t chunk_steps = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, s.batch * G));
  at::Tensor dropped_buf, chunk_buf, gates_buf, pre_proj_buf, layer_buf[2];
  T* dropped = (mask && s.num_layers > 1) ? scratch<T>(dropped_buf, s.rows * out_stride) : nullptr;
  const int64_t chunk_rows = std::min(chunk_steps, s.seq_len) * s.batch;
  const bool tiny = H < kRowWiseHidden;
  TinyBuffers<T> tb = tiny ? tiny_buffers<T>(s, chunk_rows, chunk_buf) : TinyBuffers<T>{};
  at::Tensor w_packed_buf, bf16_buf, bias_buf;
  uint16_t* bf16_weights = bf16_weight_buffer(s, bf16_model, bf16_buf);
  T* w_packed = bf16_weights ? nullptr : brgemm_buffer<T>(s, w_packed_buf);
  // The gates of `rows` rows: one step's where the projection is fused into the steps (every
  // layer at medium and fastrnns), a chunk's otherwise; allocated at the first need.
  auto gates_for = [&](int64_t rows) {
    if (!gates_buf.defined() || gates_buf.numel() < rows * G) scratch<T>(gates_buf, rows * G);
    return gates_buf.mutable_data_ptr<T>();
  };
  T* pre_proj = (s.proj_size > 0 && !tiny) ? scratch<T>(pre_proj_buf, s.batch * H) : nullptr;
  const T* prev = nullptr;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const int64_t in_size = s.layer_input_size(l);
    const Operand<T> x = layer_input(s, l, input, prev, mask, dropped);
    T* layer_out = l + 1 == s.num_layers
        ? output
        : (layer_buf[l % 2].defined() ? layer_buf[l % 2].mutable_data_ptr<T>()
                                      : scratch<T>(layer_buf[l % 2], s.rows * out_stride));
    for (int64_t d = 0; d < D; ++d) {
      auto w = direction_weights<T>(s, weights, l, d);
      const int64_t ld = l * D + d;
      T* h_state = hy + ld * s.batch * out;
      T* c_state = cy + ld * s.batch * H;
      copy_or_zero(hx ? hx + ld * s.batch * out : nullptr, s.batch * out, h_state);
      copy_or_zero(cx ? cx + ld * s.batch * H : nullptr, s.batch * H, c_state);
      if (!tiny) {
        use_bf16_gemm(s, l, w, bf16_weights);
        use_brgemm(s, w, w_packed, l);
        use_bias(w, G, bias_buf);
      }
      if (w.k_ih > 0) {  // the projection fused into the steps: one pass over every step
        T* step_gates = gates_for(s.batch);
        auto rows_of = [&](int64_t t) {
          const int64_t off = s.step_offset[t];
          return StepRows<T>{step_gates, nullptr, pre_proj,
                             layer_out + off * out_stride + d * out, x.at(off * in_size)};
        };
        for_each_batch_slice(s, s.seq_len, true, [&](int64_t r0, int64_t r1) {
          forward_steps(s, w, d, 0, s.seq_len - 1, r0, r1, h_state, c_state, rows_of, in_size,
                        hx == nullptr);
        });
        continue;
      }
      for (int64_t first = 0; first < s.seq_len; first += chunk_steps) {
        const int64_t last = std::min(first + chunk_steps, s.seq_len) - 1;
        // The chunk's steps are consecutive in time, so their rows are one contiguous block.
        const int64_t t_lo = std::min(time_of(s, d, first), time_of(s, d, last));
        const int64_t t_hi = std::max(time_of(s, d, first), time_of(s, d, last));
        const int64_t row0 = s.step_offset[t_lo];
        const int64_t rows = s.step_offset[t_hi] + s.batch_sizes[t_hi] - row0;
        if (tiny) {
          if (first == 0) {
            transpose(hx ? hx + ld * s.batch * out : nullptr, out, s.batch, out, tb.hT, s.batch);
            transpose(cx ? cx + ld * s.batch * H : nullptr, H, s.batch, H, tb.cT, s.batch);
          }
          tb.ld_g = rows;
          tb.row0 = row0;
          tiny_input_projection(w, x.f + row0 * in_size, rows, in_size, G, tb.gT, tb.xT);
          for_each_batch_slice(s, last - first + 1, false, [&](int64_t r0, int64_t r1) {
            tiny_forward_steps<T>(s, w, d, first, last, r0, r1, tb, nullptr, nullptr, nullptr,
                                  layer_out + d * out, hx == nullptr && first == 0);
          });
          if (last + 1 == s.seq_len) {
            transpose(tb.hT, s.batch, out, s.batch, h_state, out);
            transpose(tb.cT, s.batch, H, s.batch, c_state, H);
          }
          continue;
        }
        T* chunk = gates_for(chunk_rows);
        input_projection(w, x.at(row0 * in_size), rows, in_size, G, chunk);
        // The pre-projection goes to per-row scratch ([B, H]) that each step overwrites.
        auto rows_of = [&](int64_t t) {
          const int64_t off = s.step_offset[t];
          return StepRows<T>{chunk + (off - row0) * G, nullptr, pre_proj,
                             layer_out + off * out_stride + d * out};
        };
        for_each_batch_slice(s, last - first + 1, w.single_thread_product(), [&](int64_t r0, int64_t r1) {
          forward_steps(s, w, d, first, last, r0, r1, h_state, c_state, rows_of, 0,
                        hx == nullptr && first == 0);
        });
      }
    }
    prev = layer_out;
  }
}

// ---- The backward's products of bfloat16 models through bf16_gemm ----
// As in the forward (and in oneDNN's bf16 LSTM): bf16 operands, float32 sums. Per layer and
// direction, with G = 4H:
//   per step   dL/dh_{t-1} = dgates_t W_hh    A = dgates_t, W' = W_hh^T (packed from W_hh)
//   then       dL/dx       = dgates W_ih      A = dgates,   W' = W_ih^T (packed from W_ih)
//              dW_ih       = dgates^T x       A = dgates^T, W' = x^T    (packed from x)
//              dW_hh       = dgates^T h_prev  A = dgates^T, W' = h_prev^T
// Every W' is packed from the matrix as it is stored, [K, N] (bf16_pack_weight_t). The weight
// gradients need A = dgates^T, stored the other way round: it is converted once into bf16 rows
// (bf16_transpose_rows) that both products read in place; the alternative, dW^T = x^T dgates,
// would pack dgates (as large) and transpose x, h_prev and both results. dW_hr stays float32.
// The weight gradients sum over kBf16GradRows rows at a time (float32 sums carried in dW), so
// that the bf16 copies of dgates^T, x and h_prev are those rows' only: whole, they put bf16
// training's peak memory above nn.LSTM's (medium: 89.3 vs 88.2 MB; NOTES.md section 16).
constexpr int64_t kBf16GradRows = 1024;

struct Bf16Backward {
  uint16_t* w_hh_t = nullptr;  // W_hh^T [out, G] packed; null where the bf16 products are off
  uint16_t* w_ih_t = nullptr;  // W_ih^T [in, G]
  uint16_t* x = nullptr;       // x^T [in, chunk] for a chunk of at most kBf16GradRows rows
  uint16_t* h_prev = nullptr;  // h_prev^T [out, chunk]
  c10::BFloat16* dgates_t = nullptr;  // dgates^T [G, chunk] as bf16 rows, row stride ld
  int64_t ld = 0;
};

inline Bf16Backward bf16_backward_buffers(const LSTMShape& s, bool bf16_model,
                                          at::Tensor& holder) {
  Bf16Backward b;
  if (!use_bf16_products(s, bf16_model)) return b;
  const int64_t G = 4 * s.hidden_size, out = s.out_size;
  const int64_t rows = std::min(s.rows, kBf16GradRows);
  const int64_t in_max = std::max(s.input_size, s.num_directions * out);
  // Packed sizes are multiples of 32 elements: each part starts on a 64-byte boundary.
  const size_t sizes[] = {bf16_packed_size(out, G), bf16_packed_size(in_max, G),
                          bf16_packed_size(in_max, rows), bf16_packed_size(out, rows)};
  b.ld = bf16_row_stride(rows);
  holder = cpu_cached_empty(static_cast<int64_t>(sizes[0] + sizes[1] + sizes[2] + sizes[3]) +
                                G * b.ld,
                            at::kBFloat16);
  uint16_t* p = reinterpret_cast<uint16_t*>(holder.mutable_data_ptr());
  b.w_hh_t = p;
  b.w_ih_t = b.w_hh_t + sizes[0];
  b.x = b.w_ih_t + sizes[1];
  b.h_prev = b.x + sizes[2];
  b.dgates_t = reinterpret_cast<c10::BFloat16*>(b.h_prev + sizes[3]);
  return b;
}

// Part of the work of a parallel region: f(i0, i1) over pieces of [0, n) cut at multiples of
// kBf16GemmBlockN.
struct Piecewise {
  int64_t n;
  std::function<void(int64_t, int64_t)> f;
};

// Every job split evenly over the threads, in ONE parallel region (each thread runs its piece of
// each job): a region per job adds a barrier each, and on a loaded machine a barrier can cost a
// time slice.
inline void split_over_threads(std::initializer_list<Piecewise> jobs) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  auto piece = [&](int64_t t) {
    for (const Piecewise& j : jobs) {
      const int64_t units = (j.n + kBf16GemmBlockN - 1) / kBf16GemmBlockN;
      const int64_t i0 = units * t / threads * kBf16GemmBlockN;
      const int64_t i1 = std::min(j.n, units * (t + 1) / threads * kBf16GemmBlockN);
      if (i0 < i1) j.f(i0, i1);
    }
  };
  if (threads > 1) {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) piece(t);
    });
  } else {
    piece(0);
  }
}

// bf16_pack_weight_t as a Piecewise job: 16-column blocks are packed independently.
inline Piecewise pack_t_job(Operand<float> Wt, int64_t N, int64_t K, int64_t ldw,
                            uint16_t* out) {
  return {N, [=](int64_t n0, int64_t n1) {
            visit(Wt.at(n0), [&](auto W) {
              bf16_pack_weight_t(W, n1 - n0, K, ldw, out + bf16_packed_size(n0, K));
            });
          }};
}

// dL/dh_{t-1} [bs, out] = dg_t [bs, G] W_hh, on this thread: bf16_gemm where `bb` is set, else
// brgemm (`brgemm`: float32 with the micro-kernel), else BLAS.
template <typename T>
void step_dh_product(const Bf16Backward& bb, bool brgemm, int64_t bs, int64_t out, int64_t G,
                     const T* dg_t, const T* w_hh, T* dh) {
  if constexpr (std::is_same_v<T, float>) {
    if (bb.w_hh_t) {
      bf16_gemm(bs, out, G, dg_t, G, bb.w_hh_t, dh, out, false);
      return;
    }
    if (brgemm) {
      brgemm_product(false, bs, out, G, dg_t, G, w_hh, out, dh, out);
      return;
    }
  }
  gemm<T>(false, false, bs, out, G, T(1), dg_t, G, w_hh, out, T(0), dh, out);
}

// h_{t-1} of rows [r0, r1) of a layer and direction (the rows of dgates): row r0's at h, the
// next rows `ld` elements apart. dW_hh = dgates^T h_prev sums over one or two such segments.
template <typename T>
struct HPrevSegment {
  const T* h;
  int64_t ld, r0, r1;
};

template <typename T>
struct HPrev {
  HPrevSegment<T> seg[2];
  int n = 0;
};

// h_{t-1} of every row of direction d. Where every step has every row, read in place: the
// layer output shifted by one step (its direction's columns), and h0 for the first step
// processed (time 0 forward, time T-1 backward). Otherwise gathered into `buf` [rows, out]:
// per step, the rows that continue from the previous step, then those that start from h0.
template <typename T>
HPrev<T> h_prev_rows(const LSTMShape& s, int64_t d, const T* layer_out, const T* h0, T* buf) {
  const int64_t out = s.out_size, out_stride = s.num_directions * out, B = s.batch;
  const int64_t rows = s.rows;
  HPrev<T> hp;
  if (every_step_full(s)) {
    const T* shifted = layer_out + d * out;  // row r of layer_out: h at row r's step
    if (d == 0) {
      hp.seg[0] = {h0, out, 0, B};
      hp.seg[1] = {shifted, out_stride, B, rows};
    } else {
      hp.seg[0] = {shifted + B * out_stride, out_stride, 0, rows - B};
      hp.seg[1] = {h0, out, rows - B, rows};
    }
    hp.n = 2;
    return hp;
  }
  for (int64_t t = 0; t < s.seq_len; ++t) {
    const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
    const int64_t prev_t = d == 0 ? t - 1 : t + 1;
    const int64_t continuing =
        (prev_t >= 0 && prev_t < s.seq_len) ? std::min(bs, s.batch_sizes[prev_t]) : 0;
    T* dst = buf + off * out;
    if (continuing > 0)
      copy_rows(layer_out + s.step_offset[prev_t] * out_stride + d * out, out_stride, dst, out,
                continuing, out);
    copy_rows(h0 + continuing * out, out, dst + continuing * out, out, bs - continuing, out);
  }
  hp.seg[0] = {buf, out, 0, rows};
  hp.n = 1;
  return hp;
}

// A layer and direction's products after its recurrence: dW_ih = dgates^T x,
// dW_hh = dgates^T h_prev, and dL/dx = dgates W_ih (added to dx when `add_dx`: the other
// direction's). bf16 operands where `bb` is set (its W_ih^T packed already).
template <typename T>
void backward_products(const LSTMShape& s, const Bf16Backward& bb, const T* dgates, Operand<T> x,
                       int64_t in_size, const HPrev<T>& h_prev, const T* w_ih, T* gw_ih,
                       T* gw_hh, T* dx, bool add_dx) {
  const int64_t G = 4 * s.hidden_size, out = s.out_size, rows = s.rows;
  if constexpr (std::is_same_v<T, float>) {
    if (bb.w_hh_t) {
      const int64_t ld = bb.ld;
      if (rows == 0) {  // an empty batch: zero weight gradients, no dL/dx
        std::fill_n(gw_ih, G * in_size, 0.0f);
        std::fill_n(gw_hh, G * out, 0.0f);
        return;
      }
      // The rows summed over, a chunk at a time, no chunk across two segments of h_prev.
      int64_t k0 = 0;
      for (int i = 0; i < h_prev.n; ++i) {
        const HPrevSegment<float>& seg = h_prev.seg[i];
        while (k0 < seg.r1) {
          const int64_t kn = std::min(kBf16GradRows, seg.r1 - k0);
          const bool first = k0 == 0, last = k0 + kn == rows;
          split_over_threads({pack_t_job(x.at(k0 * in_size), in_size, kn, in_size, bb.x),
                              pack_t_job({seg.h + (k0 - seg.r0) * seg.ld}, out, kn, seg.ld,
                                         bb.h_prev),
                              {G, [&](int64_t m0, int64_t m1) {
                                 bf16_transpose_rows(dgates + k0 * G + m0, kn, m1 - m0, G,
                                                     bb.dgates_t + m0 * ld, ld);
                               }}});
          const Piecewise weight_grads{G, [&](int64_t m0, int64_t m1) {  // rows of dW_ih, dW_hh
            const c10::BFloat16* a = bb.dgates_t + m0 * ld;
            bf16_gemm(m1 - m0, in_size, kn, a, ld, bb.x, gw_ih + m0 * in_size, in_size, !first);
            bf16_gemm(m1 - m0, out, kn, a, ld, bb.h_prev, gw_hh + m0 * out, out, !first);
          }};
          const Piecewise data_grads{last ? rows : 0, [&](int64_t r0, int64_t r1) {  // of dL/dx
            bf16_gemm(r1 - r0, in_size, G, dgates + r0 * G, G, bb.w_ih_t, dx + r0 * in_size,
                      in_size, add_dx);
          }};
          split_over_threads({weight_grads, data_grads});
          k0 += kn;
        }
      }
      return;
    }
  }
  gemm<T>(true, false, G, in_size, rows, T(1), dgates, G, x.f, in_size, T(0), gw_ih, in_size);
  for (int i = 0; i < h_prev.n; ++i) {  // also for an empty batch: gemm zero-fills when k == 0
    const HPrevSegment<T>& seg = h_prev.seg[i];
    gemm<T>(true, false, G, out, seg.r1 - seg.r0, T(1), dgates + seg.r0 * G, G, seg.h, seg.ld,
            i == 0 ? T(0) : T(1), gw_hh, out);
  }
  gemm<T>(false, false, rows, in_size, G, T(1), dgates, G, w_ih, in_size, add_dx ? T(1) : T(0),
          dx, in_size);
}

// The reverse recurrence of one layer and direction for small hidden sizes, in the same
// batch-fastest layout as tiny_forward_steps: carried dL/dh and dL/dc kept as dhT [out, B] and
// dcT [H, B], the step's gates, cells and c_{t-1} transposed into compact [.., bs] blocks, one
// cell pass over the step, and dL/dh_{t-1} as an inline product. dgates leaves row-major, as
// the weight-gradient GEMMs after the loop read it. `buf`: tiny_backward_numel(s) elements.
template <typename T>
int64_t tiny_backward_numel(const LSTMShape& s) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size;
  return (2 * out + 5 * H + 2 * G) * s.batch + 2 * G * out + H * out;
}

template <typename T>
void tiny_backward_steps(const LSTMShape& s, const DirectionWeights<T>& w, int64_t d,
                         const T* gates, const T* cells, const T* c0, const T* dy, T* dh_all,
                         T* dgates, T* dh_state, T* dc_state, T* c_prev_buf, T* buf) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, B = s.batch;
  const int64_t out_stride = s.num_directions * out;
  const bool has_proj = s.proj_size > 0;
  T* dhT = buf;               // [out][B]
  T* dcT = dhT + out * B;     // [H][B]
  T* dsum = dcT + H * B;      // [out][bs]
  T* dhH = dsum + out * B;    // [H][bs]
  T* ct = dhH + H * B;        // [H][bs]
  T* cp = ct + H * B;         // [H][bs]
  T* gm = cp + H * B;         // [4H][bs]
  T* dg = gm + G * B;         // [4H][bs]
  const auto [w_hh_t, w_hr_t] = transpose_recurrent_weights(s, w, dg + G * B);
  transpose(dh_state, out, B, out, dhT, B);  // grad_hy (or zeros), as the caller filled it
  transpose(dc_state, H, B, H, dcT, B);
  for (int64_t step = s.seq_len - 1; step >= 0; --step) {
    const int64_t t = time_of(s, d, step);
    const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
    if (bs == 0) continue;
    const T* dy_t = dy + off * out_stride + d * out;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t b = 0; b < bs; ++b) dsum[o * bs + b] = dhT[o * B + b] + dy_t[b * out_stride + o];
    T* dh_t = dsum;
    if (has_proj) {
      transpose(dsum, bs, out, bs, dh_all + off * out, out);
      tiny_product<T>(bs, H, out, w_hr_t, w.w_hr, dsum, bs, nullptr, 0, dhH, bs);
      dh_t = dhH;
    }
    transpose(gates + off * G, G, bs, G, gm, bs);
    transpose(cells + off * H, H, bs, H, ct, bs);
    transpose(step_c_prev(s, d, t, 0, bs, cells, c0, c_prev_buf), H, bs, H, cp, bs);
    if (bs == B) {
      const int64_t n = H * bs;
      cell_backward_block(n, gm, gm + n, gm + 2 * n, gm + 3 * n, ct, cp, dh_t, dcT, dg, dg + n,
                          dg + 2 * n, dg + 3 * n);
    } else {
      for (int64_t j = 0; j < H; ++j)
        cell_backward_block(bs, gm + j * bs, gm + (H + j) * bs, gm + (2 * H + j) * bs,
                            gm + (3 * H + j) * bs, ct + j * bs, cp + j * bs, dh_t + j * bs,
                            dcT + j * B, dg + j * bs, dg + (H + j) * bs, dg + (2 * H + j) * bs,
                            dg + (3 * H + j) * bs);
    }
    transpose(dg, bs, G, bs, dgates + off * G, G);
    tiny_product<T>(bs, out, G, w_hh_t, w.w_hh, dg, bs, nullptr, 0, dhT, B);  // dL/dh_{t-1}, rows < bs
  }
  transpose(dhT, B, out, B, dh_state, out);
  transpose(dcT, B, H, B, dc_state, H);
}

template <typename T>
void backward_impl(const LSTMShape& s, Operand<T> input, const T* hx, const T* cx,
                   const std::vector<at::Tensor>& weights, const T* mask, const T* reserve,
                   Operand<T> grad_output, const T* grad_hy, const T* grad_cy, T* grad_input,
                   T* grad_hx, T* grad_cx, std::vector<at::Tensor>& grad_weights,
                   bool bf16_model) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, D = s.num_directions;
  const int64_t out_stride = D * out;
  const bool has_proj = s.proj_size > 0;
  // Scratch, allocated once per call.
  at::Tensor dgates_buf, h_prev_buf, dy_buf, dx_buf, dx2_buf, dropped_buf, dh_all_buf, dh_buf_t,
      c_prev_buf_t, zeros_buf, tiny_buf_t, bf16_buf;
  T* dgates = scratch<T>(dgates_buf, s.rows * G);
  // h_{t-1} of every row gathered, only where steps have different rows (h_prev_rows).
  T* h_prev_buf_ptr = every_step_full(s) ? nullptr : scratch<T>(h_prev_buf, s.rows * out);
  // dy: the gradient of the current layer's output, read only. The top layer's is grad_output
  // itself (zeros when it is None; bf16 as the caller gave it where the op keeps it: lstm.h
  // KeepBf16); a lower layer's is the dL/dx of the layer above, written into one of two
  // buffers used in turn (layer l writes dx_bufs[l % 2], which the layer below reads as its
  // dy; a second buffer only from three layers on) and masked in place.
  const int64_t dy_numel = s.rows * out_stride;
  Operand<T> dy = grad_output;
  if (!dy) {
    T* zero = scratch<T>(dy_buf, dy_numel);
    std::fill_n(zero, dy_numel, T(0));
    dy = {zero};
  }
  T* dx_bufs[2] = {nullptr, nullptr};
  if (s.num_layers > 1) dx_bufs[(s.num_layers - 1) % 2] = scratch<T>(dx_buf, dy_numel);
  if (s.num_layers > 2) dx_bufs[s.num_layers % 2] = scratch<T>(dx2_buf, dy_numel);
  T* dropped = (mask && s.num_layers > 1) ? scratch<T>(dropped_buf, s.rows * out_stride) : nullptr;
  T* dh_all = has_proj ? scratch<T>(dh_all_buf, s.rows * out) : nullptr;
  T* dh_buf = scratch<T>(dh_buf_t, s.batch * H);           // dL/dh_t, [bs, H]
  T* c_prev_buf = scratch<T>(c_prev_buf_t, s.batch * H);   // c_{t-1} when pieced together
  T* zeros_mut = scratch<T>(zeros_buf, s.batch * std::max(H, out));  // h0 / c0 when None
  std::fill_n(zeros_mut, s.batch * std::max(H, out), T(0));
  const T* zeros = zeros_mut;
  T* tiny_buf = H < kRowWiseHidden ? scratch<T>(tiny_buf_t, tiny_backward_numel<T>(s)) : nullptr;
  const Bf16Backward bb = bf16_backward_buffers(s, bf16_model, bf16_buf);
  // dL/dh_{t-1} = dgates_t W_hh through brgemm (W_hh is already its B[4H, out]).
  const bool brgemm = std::is_same_v<T, float> && H >= kRowWiseHidden && brgemm_available();

  for (int64_t l = s.num_layers - 1; l >= 0; --l) {
    const int64_t in_size = s.layer_input_size(l);
    const Operand<T> x = layer_input(
        s, l, input, l > 0 ? reserve + s.layer_out_offset(l - 1) : nullptr, mask, dropped);
    const T* layer_out = reserve + s.layer_out_offset(l);
    // Gradient w.r.t. this layer's input: the op's grad_input, or the previous layer's output.
    T* dx_l = l == 0 ? grad_input : dx_bufs[l % 2];
    for (int64_t d = 0; d < D; ++d) {
      const auto w = direction_weights<T>(s, weights, l, d);
      const T* gates = reserve + s.gates_offset(l, d);
      const T* cells = reserve + s.cells_offset(l, d);
      const T* pre_proj = reserve + s.pre_proj_offset(l, d);  // used only when has_proj
      const int64_t ld = l * D + d;
      const T* c0 = cx ? cx + ld * s.batch * H : zeros;
      T* dh_state = grad_hx + ld * s.batch * out;
      T* dc_state = grad_cx + ld * s.batch * H;
      copy_or_zero(grad_hy ? grad_hy + ld * s.batch * out : nullptr, s.batch * out, dh_state);
      copy_or_zero(grad_cy ? grad_cy + ld * s.batch * H : nullptr, s.batch * H, dc_state);
      if constexpr (std::is_same_v<T, float>) {
        if (bb.w_hh_t) {
          split_over_threads({pack_t_job(w.hh, out, G, out, bb.w_hh_t),
                              pack_t_job(w.ih, in_size, G, in_size, bb.w_ih_t)});
        }
      }

      if (H < kRowWiseHidden) {
        tiny_backward_steps(s, w, d, gates, cells, c0, dy.f, dh_all, dgates, dh_state, dc_state,
                            c_prev_buf, tiny_buf);
      } else {
      // The reverse recurrence, for batch rows [r0, r1) (rows are independent sequences).
      auto steps = [&](int64_t r0, int64_t r1) {
        for (int64_t step = s.seq_len - 1; step >= 0; --step) {
          const int64_t t = time_of(s, d, step);
          const int64_t bs = std::min(s.batch_sizes[t], r1) - r0;
          if (bs <= 0) continue;
          const int64_t off = s.step_offset[t] + r0;  // first row of the slice at step t
          const Operand<T> dy_t = dy.at(off * out_stride + d * out);
          T* dh_carried = dh_state + r0 * out;
          T* dc = dc_state + r0 * H;
          T* dh_t = dh_buf + r0 * H;
          // dL/dh_t before projection, [bs, H]: carried + from the output (through W_hr).
          T* dh_sum = has_proj ? dh_all + off * out : dh_t;
          visit(dy_t, [&](auto y) {
            for (int64_t b = 0; b < bs; ++b)
              for (int64_t j = 0; j < out; ++j)
                dh_sum[b * out + j] = dh_carried[b * out + j] + static_cast<T>(y[b * out_stride + j]);
          });
          if (has_proj) gemm<T>(false, false, bs, H, out, T(1), dh_sum, out, w.w_hr, H, T(0), dh_t, H);
          const T* c_prev = step_c_prev(s, d, t, r0, bs, cells, c0, c_prev_buf);
          const T* c_t = cells + off * H;
          T* dg_t = dgates + off * G;
          const T* g_t = gates + off * G;
          for_each_row(bs, G, [&](int64_t b) {
            const T* g = g_t + b * G;
            T* dg = dg_t + b * G;
            cell_backward_block(H, g, g + H, g + 2 * H, g + 3 * H, c_t + b * H, c_prev + b * H,
                                dh_t + b * H, dc + b * H, dg, dg + H, dg + 2 * H, dg + 3 * H);
          });
          // dL/dh_{t-1} for the rows active at t; the others keep what they carry.
          step_dh_product(bb, brgemm, bs, out, G, dg_t, w.w_hh, dh_carried);
        }
      };
      for_each_batch_slice(s, s.seq_len, brgemm || bb.w_hh_t, steps);
      }

      const T* h0 = hx ? hx + ld * s.batch * out : zeros;
      const HPrev<T> h_prev = h_prev_rows(s, d, layer_out, h0, h_prev_buf_ptr);

      const int64_t k = s.weight_index(l, d);
      T* gw_ih = grad_weights[k].mutable_data_ptr<T>();
      T* gw_hh = grad_weights[k + 1].mutable_data_ptr<T>();
      // dL/dx of this layer is summed over directions.
      backward_products(s, bb, dgates, x, in_size, h_prev, w.w_ih, gw_ih, gw_hh, dx_l, d > 0);
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
      if (has_proj) {  // also for an empty batch: gemm zero-fills when k == 0
        T* gw_hr = grad_weights[next].mutable_data_ptr<T>();
        gemm<T>(true, false, out, H, s.rows, T(1), dh_all, out, pre_proj, H, T(0), gw_hr, H);
      }
    }
    if (l > 0) {
      // Through the dropout mask into the previous layer's output gradient, in place.
      if (mask) {
        const T* m = mask + (l - 1) * dy_numel;
        at::parallel_for(0, dy_numel, kParallelElements, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) dx_l[i] *= m[i];
        });
      }
      dy = {dx_l};
    }
  }
}

// ---- Op entry points: the shared boundary (lstm.h) around the kernels above. ----

// A bfloat16 call's input, W_ih and W_hh stay bf16 (no float copies: lstm.h, KeepBf16) where
// every product that reads them is a bf16 one: the bf16 products, and not the thin kernel
// (float32 dot products; inference only, but the forward and backward ops decide alike).
bool keep_bf16_cpu(const LSTMShape& s) { return use_bf16_products(s, true) && !thin_applies(s); }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size) {
  ForwardArgs a = prepare_forward(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                                  bidirectional, has_biases, proj_size, /*with_reserve=*/true,
                                  keep_bf16_cpu);
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_forward_cpu", [&] {
    forward_impl<scalar_t>(a.shape, operand<scalar_t>(a.input), ptr_or_null<scalar_t>(a.hx),
                           ptr_or_null<scalar_t>(a.cx), a.weights,
                           ptr_or_null<scalar_t>(a.dropout_mask), a.hy.mutable_data_ptr<scalar_t>(),
                           a.cy.mutable_data_ptr<scalar_t>(), a.reserve.mutable_data_ptr<scalar_t>(),
                           a.dtype == at::kBFloat16);
  });
  return finish_forward(a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_inference_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, int64_t proj_size) {
  ForwardArgs a = prepare_forward(input, batch_sizes, hx, cx, weights, dropout_mask, num_layers,
                                  bidirectional, has_biases, proj_size, /*with_reserve=*/false,
                                  keep_bf16_cpu);
  const LSTMShape& s = a.shape;
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = s.num_directions * s.out_size;
  at::Tensor output = at::empty(out_shape, a.hy.options());  // [T, B, D*out] == [rows, D*out]
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_inference_cpu", [&] {
    inference_impl<scalar_t>(s, operand<scalar_t>(a.input), ptr_or_null<scalar_t>(a.hx),
                             ptr_or_null<scalar_t>(a.cx), a.weights,
                             ptr_or_null<scalar_t>(a.dropout_mask), a.hy.mutable_data_ptr<scalar_t>(),
                             a.cy.mutable_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
                             a.dtype == at::kBFloat16);
  });
  return {in_dtype(output, a.dtype), in_dtype(a.hy, a.dtype), in_dtype(a.cy, a.dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_backward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& reserve, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
    int64_t num_layers, bool bidirectional, bool has_biases, int64_t proj_size) {
  BackwardArgs a = prepare_backward(input, batch_sizes, hx, cx, weights, dropout_mask, reserve,
                                    grad_output, grad_hy, grad_cy, num_layers, bidirectional,
                                    has_biases, proj_size, keep_bf16_cpu);
  AT_DISPATCH_FLOATING_TYPES(a.math, "fused_lstm_backward_cpu", [&] {
    backward_impl<scalar_t>(
        a.shape, operand<scalar_t>(a.input), ptr_or_null<scalar_t>(a.hx),
        ptr_or_null<scalar_t>(a.cx), a.weights, ptr_or_null<scalar_t>(a.dropout_mask),
        a.reserve.const_data_ptr<scalar_t>(), operand<scalar_t>(a.grad_output),
        ptr_or_null<scalar_t>(a.grad_hy), ptr_or_null<scalar_t>(a.grad_cy),
        a.grad_input.mutable_data_ptr<scalar_t>(), a.grad_hx.mutable_data_ptr<scalar_t>(),
        a.grad_cx.mutable_data_ptr<scalar_t>(), a.grad_weights, a.dtype == at::kBFloat16);
  });
  return finish_backward(a, weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_inference", &lstm_inference_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace fused_lstm
