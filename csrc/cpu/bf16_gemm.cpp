// bfloat16 GEMM on AVX512_BF16 (vdpbf16ps): see bf16_gemm.h for the API and the packed layout.
//
// Compiled with the project's ordinary flags: the AVX-512 code is in functions marked
// BF16_TARGET (a per-function target attribute, no global -mavx512*), reached only through the
// public functions, which check bf16_gemm_available() first. Those functions use intrinsics and
// plain C only: no std:: templates or lambdas are instantiated with the AVX-512 target, so no
// inline function with AVX-512 code can be shared with (and picked by the linker for) code
// that runs on other CPUs.
//
// The product, for one row panel of A (bf16 rows of even length, K rounded up; a float32 A is
// converted kMCBytes at a time into a thread-local buffer with vcvtne2ps2bf16, round to nearest
// even; a bf16 A of even K is read in place):
//   for each K chunk (kKC pairs of k)
//     up to 64 rows: for each group of kNV column blocks, for each group of kMR rows
//     more rows:     for each block of W columns of about kNCBytes (kept in L2),
//                      for each group of kMR rows, for each group of kNV column blocks
//       the micro-kernel, kMR x kNV accumulators (8 x 3 = 24 zmm): per pair of k, kNV loads
//       of W, kMR broadcasts of an A pair, kMR * kNV vdpbf16ps; then C (+)= the
//       accumulators, with masked loads/stores at the column edges.
// Rows left over past a multiple of kMR, when at most kSmallMR, go to kSmallMR x kSmallNV
// kernels (4 x 6) instead, whose wider column groups keep more accumulators in flight (M = 1,
// the batch-1 recurrent product, is bound by reading W from L2).
//
// The packers (bf16_pack_panels_t, under bf16_pack_weight_t) and bf16_transpose_rows build each
// 64-byte line from two source rows: 16 dwords (row k, row k + 1) of 16 columns, rounded with
// integer arithmetic as c10::BFloat16 is (vcvtne2ps2bf16 would flush denormals). The packed
// weight is a sequence of such lines; the transpose turns 16 of them into 16 rows of 16 pairs in
// registers, and bf16_pack_panels (under bf16_pack_weight) turns 16 rows of W's pairs into 16
// lines the same way.
#include "bf16_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FUSED_LSTM_BF16_GEMM_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define FUSED_LSTM_BF16_GEMM_X86 0
#endif

// Blocking (overridable with -D for tuning experiments).
#ifndef FUSED_LSTM_BF16_MR
#define FUSED_LSTM_BF16_MR 8  // rows per micro-kernel
#endif
#ifndef FUSED_LSTM_BF16_NV
#define FUSED_LSTM_BF16_NV 3  // 16-column blocks per micro-kernel
#endif
#ifndef FUSED_LSTM_BF16_SMALL_MR
#define FUSED_LSTM_BF16_SMALL_MR 4  // at most this many rows left over: the small kernels
#endif
#ifndef FUSED_LSTM_BF16_SMALL_NV
#define FUSED_LSTM_BF16_SMALL_NV 6  // their 16-column blocks
#endif
#ifndef FUSED_LSTM_BF16_KC
#define FUSED_LSTM_BF16_KC 256  // pairs of k per K chunk
#endif
#ifndef FUSED_LSTM_BF16_NC_BYTES
#define FUSED_LSTM_BF16_NC_BYTES (512 * 1024)  // W columns per block (many-row panels), bytes
#endif
#ifndef FUSED_LSTM_BF16_MC_BYTES
#define FUSED_LSTM_BF16_MC_BYTES (192 * 1024)  // converted A rows per row panel, in bytes
#endif

namespace fused_lstm {
namespace {

constexpr int kMR = FUSED_LSTM_BF16_MR;
constexpr int kNV = FUSED_LSTM_BF16_NV;
constexpr int64_t kKC = FUSED_LSTM_BF16_KC;
constexpr int64_t kMCBytes = FUSED_LSTM_BF16_MC_BYTES;
constexpr int64_t kNCBytes = FUSED_LSTM_BF16_NC_BYTES;
constexpr int64_t kRowsOuterMinM = 64;  // above this many rows: rows outer (gemm_rows)
constexpr int kSmallMR = FUSED_LSTM_BF16_SMALL_MR;
constexpr int kSmallNV = FUSED_LSTM_BF16_SMALL_NV;
constexpr int64_t kBN = kBf16GemmBlockN;
static_assert(kMR >= 1 && kNV >= 1 && kMR * kNV + kNV <= 32, "micro-kernel exceeds 32 zmm");
static_assert(kSmallMR >= 1 && kSmallMR < kMR && kSmallMR * kSmallNV + kSmallNV <= 32,
              "small micro-kernel exceeds 32 zmm");

std::atomic<bool> portable{false};  // bf16_gemm_force_portable

bool detect_cpu() {
#if FUSED_LSTM_BF16_GEMM_X86
  unsigned eax, ebx, ecx, edx;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid(1, eax, ebx, ecx, edx);
  if (!(ecx & (1u << 27))) return false;  // OSXSAVE: xgetbv usable
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0xE6u) != 0xE6u) return false;  // the OS saves SSE, AVX, opmask and zmm state
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const unsigned f = 1u << 16, bw = 1u << 30, vl = 1u << 31;
  if ((ebx & (f | bw | vl)) != (f | bw | vl)) return false;
  if (eax < 1) return false;  // no subleaf 1
  __cpuid_count(7, 1, eax, ebx, ecx, edx);
  return (eax & (1u << 5)) != 0;  // AVX512_BF16
#else
  return false;
#endif
}

inline uint16_t to_bf16_bits(float f) { return c10::BFloat16(f).x; }  // round to nearest even
inline uint16_t to_bf16_bits(uint16_t b) { return b; }

// The packed layout in panels of `panel` columns from W [N, K] with element (n, k) at
// W[n * sn + k * sk]: sn = ldw, sk = 1 for a row-major W, sn = 1, sk = ldw for its transpose.
// Portable; out is written in order.
template <typename T>
void pack_strided(const T* W, int64_t N, int64_t K, int64_t sn, int64_t sk, int64_t panel,
                  uint16_t* out) {
  const int64_t kp = (K + 1) / 2;
  const int64_t blocks = (N + panel - 1) / panel;
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t p = 0; p < kp; ++p) {
      uint16_t* o = out + (blk * kp + p) * 2 * panel;
      for (int64_t c = 0; c < panel; ++c) {
        const int64_t n = blk * panel + c;
        const T* w = W + n * sn + 2 * p * sk;
        o[2 * c] = n < N ? to_bf16_bits(w[0]) : 0;
        o[2 * c + 1] = n < N && 2 * p + 1 < K ? to_bf16_bits(w[sk]) : 0;
      }
    }
}

#if FUSED_LSTM_BF16_GEMM_X86

// ---- AVX-512 code: intrinsics and plain C only (see the top of the file). ----

BF16_TARGET inline __m512 dot2(__m512 acc, __m512i w, __m512i a) {
  return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)a);
}

BF16_TARGET inline __m512i broadcast_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// C[MR rows, NV blocks of 16] (+)= A[MR, 2 kp] * W-panel, masks[j]: columns of block j to write.
// a: bf16 rows (row stride lda); b: the first block's panel at this K chunk (block stride bs).
template <int MR, int NV>
BF16_TARGET void micro_kernel(int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b,
                              int64_t bs, float* c, int64_t ldc, const __mmask16* masks,
                              bool accumulate) {
  __m512 s[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) s[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    __m512i w[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) w[j] = _mm512_loadu_si512(b + j * bs + p * 2 * kBN);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512i x = broadcast_pair(a + i * lda + 2 * p);
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) s[i][j] = dot2(s[i][j], w[j], x);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
      float* cp = c + i * ldc + j * kBN;
      __m512 v = s[i][j];
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], cp));
      _mm512_mask_storeu_ps(cp, masks[j], v);
    }
}

using KernelFn = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*,
                          int64_t, const __mmask16*, bool);

// fn[mr - 1][nv - 1] = micro_kernel<mr, nv>, for mr <= MR, nv <= NV.
template <int MR, int NV>
struct Kernels {
  KernelFn fn[MR][NV];
  Kernels() { fill<MR, NV>(); }
  template <int R, int V>
  void fill() {
    fn[R - 1][V - 1] = &micro_kernel<R, V>;
    if constexpr (V > 1) fill<R, V - 1>();
    if constexpr (V == NV && R > 1) fill<R - 1, NV>();
  }
};

using MainKernels = Kernels<kMR, kNV>;
using SmallKernels = Kernels<kSmallMR, kSmallNV>;

const MainKernels& main_kernels() {
  static const MainKernels k;
  return k;
}
const SmallKernels& small_kernels() {
  static const SmallKernels k;
  return k;
}

// Write masks of the nv 16-column blocks from block g on, for columns [n0, n1).
BF16_TARGET inline void group_masks(int64_t g, int nv, int64_t n0, int64_t n1, __mmask16* masks) {
  for (int j = 0; j < nv; ++j) {
    const int64_t lo0 = (g + j) * kBN;
    const int64_t lo = n0 > lo0 ? n0 - lo0 : 0;
    const int64_t hi = n1 < lo0 + kBN ? n1 - lo0 : kBN;
    masks[j] = (__mmask16)((((uint32_t)1 << hi) - 1) & ~(((uint32_t)1 << lo) - 1));
  }
}

// C[M rows, columns n0..n1) (+)= A * W^T with the MR x NV kernels (any M: the last row group
// uses a kernel of fewer rows); a: bf16 rows with kp pairs readable, stride lda.
// Per K chunk: with few rows, column groups outer and rows inner (a group's W micro-panel is
// reused by all rows from L1/L2); with many rows, W in blocks of about kNCBytes (kept in L2),
// rows outer inside a block, so each row group's C tile rows are written left to right.
template <int MR, int NV>
BF16_TARGET void gemm_rows(int64_t M, int64_t kp, const uint16_t* a, int64_t lda,
                           const uint16_t* w, int64_t n0, int64_t n1, float* c, int64_t ldc,
                           bool accumulate, const Kernels<MR, NV>& ks) {
  const int64_t bs = kp * 2 * kBN;  // uint16 per packed 16-column block
  const int64_t blk0 = n0 / kBN, blk1 = (n1 + kBN - 1) / kBN;
  __mmask16 masks[NV];
  for (int64_t k0 = 0; k0 < kp; k0 += kKC) {
    const int64_t kc = kp - k0 < kKC ? kp - k0 : kKC;
    const bool acc = accumulate || k0 > 0;
    const uint16_t* wk = w + k0 * 2 * kBN;
    const uint16_t* ak = a + 2 * k0;
    if (M <= kRowsOuterMinM) {
      for (int64_t g = blk0; g < blk1; g += NV) {
        const int nv = (int)(blk1 - g < NV ? blk1 - g : NV);
        group_masks(g, nv, n0, n1, masks);
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
          const int mr = (int)(M - m0 < MR ? M - m0 : MR);
          ks.fn[mr - 1][nv - 1](kc, ak + m0 * lda, lda, wk + g * bs, bs, c + m0 * ldc + g * kBN,
                                ldc, masks, acc);
        }
      }
      continue;
    }
    int64_t ncb = kNCBytes / (kc * 4 * kBN) / NV * NV;
    if (ncb < NV) ncb = NV;
    for (int64_t gb = blk0; gb < blk1; gb += ncb) {
      const int64_t ge = blk1 - gb < ncb ? blk1 : gb + ncb;
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int mr = (int)(M - m0 < MR ? M - m0 : MR);
        for (int64_t g = gb; g < ge; g += NV) {
          const int nv = (int)(ge - g < NV ? ge - g : NV);
          group_masks(g, nv, n0, n1, masks);
          ks.fn[mr - 1][nv - 1](kc, ak + m0 * lda, lda, wk + g * bs, bs, c + m0 * ldc + g * kBN,
                                ldc, masks, acc);
        }
      }
    }
  }
}

// A row panel: rows in groups of kMR, except a last group of at most kSmallMR rows, which
// goes to the kSmallMR x kSmallNV kernels (more columns, so more accumulators in flight).
BF16_TARGET void gemm_panel(int64_t M, int64_t kp, const uint16_t* a, int64_t lda,
                            const uint16_t* w, int64_t n0, int64_t n1, float* c, int64_t ldc,
                            bool accumulate) {
  const int64_t rest = M % kMR <= kSmallMR ? M % kMR : 0;
  if (M > rest)
    gemm_rows(M - rest, kp, a, lda, w, n0, n1, c, ldc, accumulate, main_kernels());
  if (rest > 0)
    gemm_rows(rest, kp, a + (M - rest) * lda, lda, w, n0, n1, c + (M - rest) * ldc, ldc,
              accumulate, small_kernels());
}

// bf16 rows (stride ldo, even length kpad >= K, zero past K) from float32 rows, rounded to
// nearest even (vcvtne2ps2bf16).
BF16_TARGET void convert_rows(int64_t M, int64_t K, const float* A, int64_t lda, uint16_t* out,
                              int64_t ldo, int64_t kpad) {
  for (int64_t m = 0; m < M; ++m) {
    const float* x = A + m * lda;
    uint16_t* o = out + m * ldo;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512 lo = _mm512_loadu_ps(x + k), hi = _mm512_loadu_ps(x + k + 16);
      _mm512_storeu_si512(o + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    if (k < kpad) {
      const int64_t rest = K - k;  // 0..31 floats left
      const __mmask16 mlo = (__mmask16)(rest >= 16 ? 0xFFFF : ((1u << rest) - 1));
      const __mmask16 mhi = (__mmask16)(rest <= 16 ? 0 : ((1u << (rest - 16)) - 1));
      const __m512 lo = _mm512_maskz_loadu_ps(mlo, x + k);
      const __m512 hi = _mm512_maskz_loadu_ps(mhi, x + k + 16);
      const __mmask32 mo = (__mmask32)((((uint64_t)1) << (kpad - k)) - 1);
      _mm512_mask_storeu_epi16(o + k, mo, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

// bf16 bits of 16 floats in the low halves of 16 dwords, rounded as c10::BFloat16 (to nearest
// even, NaN to 0x7FC0, denormals kept), not as vcvtne2ps2bf16 (which flushes denormals): the
// packers give torch's bits on every CPU.
BF16_TARGET inline __m512i bf16_bits(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 16),
                                                         _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, bias), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7FC0));
}

// The first n (<= 16) elements of a row from p, as bf16 bits in the low halves of 16 dwords
// (zero past n).
BF16_TARGET inline __m512i row_bits(const float* p, __mmask16 n) {
  return bf16_bits(_mm512_maskz_loadu_ps(n, p));
}
BF16_TARGET inline __m512i row_bits(const uint16_t* p, __mmask16 n) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(n, p));
}

// Dword j = (row k [j], row k + 1 [j]) as bf16 bits: a line of the packed layout; `second`
// false for a missing row k + 1 (odd K).
template <typename T>
BF16_TARGET inline __m512i pair_line(const T* row, int64_t ld, __mmask16 n, bool second) {
  const __m512i lo = row_bits(row, n);
  return second ? _mm512_or_si512(lo, _mm512_slli_epi32(row_bits(row + ld, n), 16)) : lo;
}

BF16_TARGET inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

// The first n elements of 16 (n <= 0: none).
BF16_TARGET inline __mmask16 mask16(int64_t n) {
  return n <= 0 ? (__mmask16)0 : first_n(n);
}

// In-register transpose of a 16 x 16 dword matrix (r[i] is row i).
BF16_TARGET inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // b[4i + c]: per 128-bit lane L, rows 4i..4i+3 of column 4L + col[c]
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 4)
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      b[i + j] = _mm512_unpacklo_epi64(a[i + j], a[i + 2 + j]);
      b[i + 2 + j] = _mm512_unpackhi_epi64(a[i + j], a[i + 2 + j]);
    }
  const int col[4] = {0, 2, 1, 3};
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of 128-bit lanes of b[c], b[4 + c], ...
    const __m512i s0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[col[c]] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    r[4 + col[c]] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    r[8 + col[c]] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    r[12 + col[c]] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}

// bf16_pack_panels_t: per 16 columns of a panel, one pair_line per pair of k.
template <typename T>
BF16_TARGET void pack_panels_t_avx512(const T* Wt, int64_t N, int64_t K, int64_t ldw,
                                      int64_t panel, uint16_t* out) {
  const int64_t kp = (K + 1) / 2;
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    uint16_t* o = out + n0 * 2 * kp;
    for (int64_t p = 0; p < kp; ++p)
      for (int64_t j = 0; j < panel; j += kBN)
        _mm512_storeu_si512(o + p * 2 * panel + 2 * j,
                            pair_line(Wt + 2 * p * ldw + n0 + j, ldw, mask16(N - n0 - j),
                                      2 * p + 1 < K));
  }
}

// 16 dwords of row w's pairs (w[2i], w[2i + 1]), i < 16, as bf16 bits; zero from element
// `left` on.
BF16_TARGET inline __m512i row_pairs(const float* w, int64_t left) {
  const __m512i lo = bf16_bits(_mm512_maskz_loadu_ps(mask16(left), w));
  const __m512i hi = bf16_bits(_mm512_maskz_loadu_ps(mask16(left - 16), w + 16));
  const __m512i even_words = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40,
                                              38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16,
                                              14, 12, 10, 8, 6, 4, 2, 0);
  return _mm512_permutex2var_epi16(lo, even_words, hi);  // the low half of each dword
}
BF16_TARGET inline __m512i row_pairs(const uint16_t* w, int64_t left) {
  const __mmask32 m = left <= 0    ? (__mmask32)0
                      : left >= 32 ? (__mmask32)0xFFFFFFFFu
                                   : (__mmask32)((1u << left) - 1);
  return _mm512_maskz_loadu_epi16(m, w);
}

// bf16_pack_panels: W's rows hold pairs of k; tiles of 16 rows (columns n of B) x 16 pairs,
// transposed in registers into 16 lines of the layout.
template <typename T>
BF16_TARGET void pack_panels_avx512(const T* W, int64_t N, int64_t K, int64_t ldw, int64_t panel,
                                    uint16_t* out) {
  const int64_t kp = (K + 1) / 2;
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    uint16_t* o = out + n0 * 2 * kp;
    for (int64_t j = 0; j < panel; j += kBN)
      for (int64_t p0 = 0; p0 < kp; p0 += 16) {
        __m512i r[16];
#pragma GCC unroll 16
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t n = n0 + j + i;
          r[i] = n < N ? row_pairs(W + n * ldw + 2 * p0, K - 2 * p0) : _mm512_setzero_si512();
        }
        transpose16(r);
        const int64_t np = kp - p0 < 16 ? kp - p0 : 16;
        for (int64_t i = 0; i < np; ++i)
          _mm512_storeu_si512(o + (p0 + i) * 2 * panel + 2 * j, r[i]);
      }
  }
}

// bf16_transpose_rows in tiles of 16 columns of At x 16 pairs of its rows: 16 pair_lines (line
// i: pair i of 16 columns) transposed are 16 output rows of 16 pairs (32 bf16, one store each).
// Tiles go down strips of kTransposeStrip columns: strips of 16 columns (64 bytes of each row
// of At, rows 4 KB apart at 1024 columns: a new page per row) ran 2.1x slower (3200 x 1024,
// 1 thread, minimum of 7: 3.6 ms against 1.7; strips of 512 as 128).
constexpr int64_t kTransposeStrip = 128;

template <typename T>
BF16_TARGET void transpose_rows_avx512(const T* At, int64_t K, int64_t M, int64_t ldat,
                                       uint16_t* out, int64_t ldo) {
  const int64_t kp = (K + 1) / 2;
  for (int64_t s0 = 0; s0 < M; s0 += kTransposeStrip) {
    const int64_t s1 = M - s0 < kTransposeStrip ? M : s0 + kTransposeStrip;
    for (int64_t p0 = 0; p0 < kp; p0 += 16) {
      const int64_t np = kp - p0 < 16 ? kp - p0 : 16;
      const __mmask32 keep = np == 16 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (2 * np)) - 1);
      for (int64_t m0 = s0; m0 < s1; m0 += kBN) {
        const __mmask16 n = first_n(s1 - m0);
        __m512i r[16];
#pragma GCC unroll 16
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t k = 2 * (p0 + i);
          r[i] = i < np ? pair_line(At + k * ldat + m0, ldat, n, k + 1 < K) : _mm512_setzero_si512();
        }
        transpose16(r);
        const int64_t rows = s1 - m0 < kBN ? s1 - m0 : kBN;
        for (int64_t j = 0; j < rows; ++j)
          _mm512_mask_storeu_epi16(out + (m0 + j) * ldo + 2 * p0, keep, r[j]);
      }
    }
  }
}

std::vector<uint16_t>& scratch() {
  thread_local std::vector<uint16_t> buffer;
  return buffer;
}

void copy_rows(int64_t M, int64_t K, const c10::BFloat16* A, int64_t lda, uint16_t* out,
               int64_t ldo, int64_t kpad) {
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(out + m * ldo, A + m * lda, K * sizeof(uint16_t));
    for (int64_t k = K; k < kpad; ++k) out[m * ldo + k] = 0;
  }
}

#endif  // FUSED_LSTM_BF16_GEMM_X86

template <typename T>
void gemm_impl(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const uint16_t* W,
               float* C, int64_t ldc, bool accumulate, int64_t n0, int64_t n1) {
  TORCH_CHECK(bf16_gemm_available(),
              "bf16_gemm: this CPU lacks AVX512_BF16 (or bf16_gemm_force_portable is on); check "
              "bf16_gemm_available() first");
  if (n1 < 0) n1 = N;
  TORCH_CHECK(M >= 0 && N >= 0 && K >= 0 && 0 <= n0 && n0 <= n1 && n1 <= N,
              "bf16_gemm: bad sizes M=", M, " N=", N, " K=", K, " columns [", n0, ", ", n1, ")");
  if (M == 0 || n0 == n1) return;
  TORCH_CHECK(ldc >= n1 || M == 1, "bf16_gemm: ldc=", ldc, " < ", n1);
  if (K == 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::memset(C + m * ldc + n0, 0, (n1 - n0) * sizeof(float));
    return;
  }
  TORCH_CHECK(lda >= K || M == 1, "bf16_gemm: lda=", lda, " < K=", K);
#if FUSED_LSTM_BF16_GEMM_X86
  const int64_t kp = (K + 1) / 2, kpad = 2 * kp;
  constexpr bool is_bf16 = std::is_same_v<T, c10::BFloat16>;
  const bool in_place = is_bf16 && K % 2 == 0;  // bf16 rows read where they are
  // Row panels of about kMCBytes of bf16 A, kept in L2 while every column group sweeps them;
  // converted rows get a row stride off multiples of 4 KB.
  const int64_t ldo = bf16_row_stride(K);
  int64_t mc = kMCBytes / (ldo * 2);
  mc = mc < kMR ? kMR : mc / kMR * kMR;
  if (mc > M) mc = M;
  uint16_t* buf = nullptr;
  if (!in_place) {
    std::vector<uint16_t>& b = scratch();
    if (b.size() < (size_t)(mc * ldo)) b.resize(mc * ldo);
    buf = b.data();
  }
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t rows = M - m0 < mc ? M - m0 : mc;
    if (in_place) {
      gemm_panel(rows, kp, reinterpret_cast<const uint16_t*>(A + m0 * lda), lda, W, n0, n1,
                 C + m0 * ldc, ldc, accumulate);
      continue;
    }
    if constexpr (is_bf16) {
      copy_rows(rows, K, A + m0 * lda, lda, buf, ldo, kpad);
    } else {
      convert_rows(rows, K, A + m0 * lda, lda, buf, ldo, kpad);
    }
    gemm_panel(rows, kp, buf, ldo, W, n0, n1, C + m0 * ldc, ldc, accumulate);
  }
#else
  (void)A, (void)W;  // unreachable: bf16_gemm_available() is false
#endif
}

template <typename T>
void gemm_parallel_impl(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                        const uint16_t* W, float* C, int64_t ldc, bool accumulate) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || at::in_parallel_region() || (int64_t)M * N * K < 64 * 64 * 64) {
    gemm_impl(M, N, K, A, lda, W, C, ldc, accumulate, 0, N);
    return;
  }
  if (M >= 64 * threads) {  // rows, in whole micro-kernel row groups
    const int64_t groups = (M + kMR - 1) / kMR;
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      const int64_t m0 = g0 * kMR, m1 = g1 * kMR < M ? g1 * kMR : M;
      gemm_impl(m1 - m0, N, K, A + m0 * lda, lda, W, C + m0 * ldc, ldc, accumulate, 0, N);
    });
  } else {  // column blocks: each thread reads only its part of W
    const int64_t blocks = (N + kBN - 1) / kBN;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      gemm_impl(M, N, K, A, lda, W, C, ldc, accumulate, b0 * kBN, b1 * kBN < N ? b1 * kBN : N);
    });
  }
}

// bf16_pack_panels (W [N, K], given_t false) and bf16_pack_panels_t (W = Wt [K, N]).
template <typename T>
void pack_panels_impl(const T* W, int64_t N, int64_t K, int64_t ldw, int64_t panel, bool given_t,
                      uint16_t* out) {
  TORCH_CHECK(N >= 0 && K >= 0 && (N == 0 || K == 0 || ldw >= (given_t ? N : K)) && panel > 0 &&
                  panel % kBN == 0,
              given_t ? "bf16_pack_panels_t" : "bf16_pack_panels", ": bad sizes N=", N, " K=", K,
              " ldw=", ldw, " panel=", panel);
#if FUSED_LSTM_BF16_GEMM_X86
  if (bf16_gemm_available()) {
    if (given_t) pack_panels_t_avx512(W, N, K, ldw, panel, out);
    else pack_panels_avx512(W, N, K, ldw, panel, out);
    return;
  }
#endif
  if (given_t) pack_strided(W, N, K, 1, ldw, panel, out);
  else pack_strided(W, N, K, ldw, 1, panel, out);
}

template <typename T>
void transpose_rows_impl(const T* At, int64_t K, int64_t M, int64_t ldat, c10::BFloat16* out,
                         int64_t ldo) {
  TORCH_CHECK(K >= 0 && M >= 0 && (K == 0 || M == 0 || (ldat >= M && ldo >= K + (K & 1))),
              "bf16_transpose_rows: bad sizes K=", K, " M=", M, " ldat=", ldat, " ldo=", ldo);
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
#if FUSED_LSTM_BF16_GEMM_X86
  if (bf16_gemm_available()) {
    transpose_rows_avx512(At, K, M, ldat, o, ldo);
    return;
  }
#endif
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) o[m * ldo + k] = to_bf16_bits(At[k * ldat + m]);
    if (K & 1) o[m * ldo + K] = 0;
  }
}

}  // namespace

bool bf16_gemm_available() {
  static const bool cpu = detect_cpu();
  return cpu && !portable.load(std::memory_order_relaxed);
}

void bf16_gemm_force_portable(bool on) { portable.store(on, std::memory_order_relaxed); }

size_t bf16_packed_size(int64_t N, int64_t K) {
  return (size_t)((N + kBN - 1) / kBN) * (size_t)((K + 1) / 2) * 2 * kBN;
}

void bf16_pack_weight(const uint16_t* W, int64_t N, int64_t K, int64_t ldw, uint16_t* out) {
  pack_panels_impl(W, N, K, ldw, kBN, false, out);
}
void bf16_pack_weight(const c10::BFloat16* W, int64_t N, int64_t K, int64_t ldw, uint16_t* out) {
  pack_panels_impl(reinterpret_cast<const uint16_t*>(W), N, K, ldw, kBN, false, out);
}
void bf16_pack_weight(const float* W, int64_t N, int64_t K, int64_t ldw, uint16_t* out) {
  pack_panels_impl(W, N, K, ldw, kBN, false, out);
}

void bf16_pack_weight_t(const uint16_t* Wt, int64_t N, int64_t K, int64_t ldw, uint16_t* out) {
  pack_panels_impl(Wt, N, K, ldw, kBN, true, out);
}
void bf16_pack_weight_t(const c10::BFloat16* Wt, int64_t N, int64_t K, int64_t ldw,
                        uint16_t* out) {
  pack_panels_impl(reinterpret_cast<const uint16_t*>(Wt), N, K, ldw, kBN, true, out);
}
void bf16_pack_weight_t(const float* Wt, int64_t N, int64_t K, int64_t ldw, uint16_t* out) {
  pack_panels_impl(Wt, N, K, ldw, kBN, true, out);
}

int64_t bf16_packed_panels_size(int64_t N, int64_t K, int64_t panel) {
  return (N + panel - 1) / panel * panel * ((K + 1) / 2 * 2);
}
void bf16_pack_panels(const float* W, int64_t N, int64_t K, int64_t ldw, int64_t panel,
                      uint16_t* out) {
  pack_panels_impl(W, N, K, ldw, panel, false, out);
}
void bf16_pack_panels(const c10::BFloat16* W, int64_t N, int64_t K, int64_t ldw, int64_t panel,
                      uint16_t* out) {
  pack_panels_impl(reinterpret_cast<const uint16_t*>(W), N, K, ldw, panel, false, out);
}
void bf16_pack_panels_t(const float* Wt, int64_t N, int64_t K, int64_t ldw, int64_t panel,
                        uint16_t* out) {
  pack_panels_impl(Wt, N, K, ldw, panel, true, out);
}
void bf16_pack_panels_t(const c10::BFloat16* Wt, int64_t N, int64_t K, int64_t ldw,
                        int64_t panel, uint16_t* out) {
  pack_panels_impl(reinterpret_cast<const uint16_t*>(Wt), N, K, ldw, panel, true, out);
}

int64_t bf16_row_stride(int64_t K) {
  const int64_t even = K + (K & 1);
  return even % 2048 == 0 ? even + 32 : even;
}

void bf16_transpose_rows(const float* At, int64_t K, int64_t M, int64_t ldat, c10::BFloat16* out,
                         int64_t ldo) {
  transpose_rows_impl(At, K, M, ldat, out, ldo);
}
void bf16_transpose_rows(const c10::BFloat16* At, int64_t K, int64_t M, int64_t ldat,
                         c10::BFloat16* out, int64_t ldo) {
  transpose_rows_impl(reinterpret_cast<const uint16_t*>(At), K, M, ldat, out, ldo);
}

void bf16_round_rows(int64_t M, int64_t K, const float* A, int64_t lda, c10::BFloat16* out,
                     int64_t ldo) {
  TORCH_INTERNAL_ASSERT(bf16_gemm_available(), "fused_lstm: bf16_round_rows needs AVX512_BF16");
  convert_rows(M, K, A, lda, reinterpret_cast<uint16_t*>(out), ldo, K);
}

void bf16_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* W,
               float* C, int64_t ldc, bool accumulate, int64_t n0, int64_t n1) {
  gemm_impl(M, N, K, A, lda, W, C, ldc, accumulate, n0, n1);
}
void bf16_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
               const uint16_t* W, float* C, int64_t ldc, bool accumulate, int64_t n0, int64_t n1) {
  gemm_impl(M, N, K, A, lda, W, C, ldc, accumulate, n0, n1);
}

void bf16_gemm_parallel(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                        const uint16_t* W, float* C, int64_t ldc, bool accumulate) {
  gemm_parallel_impl(M, N, K, A, lda, W, C, ldc, accumulate);
}
void bf16_gemm_parallel(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                        const uint16_t* W, float* C, int64_t ldc, bool accumulate) {
  gemm_parallel_impl(M, N, K, A, lda, W, C, ldc, accumulate);
}

}  // namespace fused_lstm
