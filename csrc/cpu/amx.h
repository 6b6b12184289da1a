// Library glue: bf16 products on AMX tiles through oneDNN's brgemm micro-kernel as ATen exports
// it (at::native::cpublas: brgemm on bf16 operands with float32 sums, B packed by `pack` into
// oneDNN's VNNI layout; `could_pack(kBFloat16)` is true where the CPU has AMX-BF16 and oneDNN is
// enabled). One thread's step product runs at 175-830 GFLOP/s on an Intel Xeon against
// bf16_gemm's ~115 (benchmarks/notes/bf16.md, "bf16 products on AMX tiles: the rates, measured
// before building"). Whether a call uses it is plan.h's decision (CpuPlan::amx_products).
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "bf16_gemm.h"
#include "blas.h"

#include <c10/util/BFloat16.h>

#include <vector>

namespace at::native::cpublas {
TORCH_API void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c,
                      bool add_C, const c10::BFloat16* A, const c10::BFloat16* B, float* C,
                      bool is_vnni) __attribute__((weak));
TORCH_API void pack(int64_t K, int64_t N, int64_t ld_in, int64_t ld_out, c10::ScalarType dt_in,
                    c10::ScalarType dt_out, const void* in, void* out) __attribute__((weak));
TORCH_API bool could_pack(c10::ScalarType dt_in) __attribute__((weak));
}  // namespace at::native::cpublas

namespace fused_lstm {
namespace {

// Columns per packed panel, and rows of A per micro-kernel call.
constexpr int64_t kAmxPanelN = 64;
constexpr int64_t kAmxBlockM = 64;

using BrgemmBf16 = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool,
                            const c10::BFloat16*, const c10::BFloat16*, float*, bool);

// Whether the exported micro-kernel runs bf16 on this CPU's tiles: the symbols exist, oneDNN
// packs a B as bf16_pack_panels does, and a small product with a tail comes out exact (probed
// once); then, per call, whether oneDNN is enabled
// and still packs bf16 (torch.backends.mkldnn can be turned off at run time).
inline bool amx_bf16_available() {
  namespace cb = at::native::cpublas;
  static const bool works = [] {
    const BrgemmBf16 product = &cb::brgemm;
    if (product == nullptr || cb::pack == nullptr || cb::could_pack == nullptr ||
        cb::brgemm_release == nullptr || !cb::could_pack(at::kBFloat16))
      return false;
    try {
      // bf16_pack_panels' layout is oneDNN's: a narrow panel (21 columns) packed both ways
      constexpr int64_t PK = 6, PN = 21;
      c10::BFloat16 b[PK * PN];
      for (int i = 0; i < PK * PN; ++i) b[i] = c10::BFloat16(float(i % 61) - 30.0f);
      std::vector<uint16_t> ours(bf16_packed_panels_size(PN, PK, kAmxPanelN), 0);
      std::vector<uint16_t> theirs(ours.size(), 0);
      bf16_pack_panels_t(b, PN, PK, PN, kAmxPanelN, ours.data());
      cb::pack(PK, PN, PN, kAmxPanelN, at::kBFloat16, at::kBFloat16, b, theirs.data());
      for (int64_t k = 0; k < PK; ++k)
        for (int64_t n = 0; n < PN; ++n) {
          const int64_t at = k / 2 * 2 * kAmxPanelN + 2 * n + k % 2;
          if (ours[at] != theirs[at]) return false;
        }
      // a product with a tail, exact: small integers and halves
      constexpr int64_t M = 3, N = 7, K = 6;
      c10::BFloat16 a[M * K];
      float c[M * N];
      for (int i = 0; i < M * K; ++i) a[i] = c10::BFloat16(float(i % 4) - 1.5f);
      for (int i = 0; i < K * N; ++i) b[i] = c10::BFloat16(float(i % 3) + 0.5f);
      std::vector<uint16_t> packed(bf16_packed_panels_size(N, K, kAmxPanelN));
      bf16_pack_panels_t(b, N, K, N, kAmxPanelN, packed.data());
      product(M, N, K, K, kAmxPanelN, N, false, a,
              reinterpret_cast<const c10::BFloat16*>(packed.data()), c, true);
      cb::brgemm_release(true);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          float expected = 0;
          for (int64_t k = 0; k < K; ++k) expected += float(a[m * K + k]) * float(b[k * N + n]);
          if (c[m * N + n] != expected) return false;
        }
      return true;
    } catch (...) {
      return false;
    }
  }();
  return works && cb::could_pack(at::kBFloat16);
}

// Rows of K rounded up to pairs: the VNNI layout interleaves two rows of B. oneDNN is never
// given an odd K (packing one stopped the process with an illegal instruction in torch 2.13):
// amx_pack pads B with a row of zeros, which a product may use only where A has a zero column
// there too (dgates^T's bf16 rows have one); the forward's A operands do not, so the plan takes
// the tiles only where every K of the forward is even (amx_sizes).
inline int64_t amx_k_even(int64_t K) { return (K + 1) / 2 * 2; }

// Whether every product of the forward has an even K: each layer's input size and out_size.
inline bool amx_sizes(const LSTMShape& s) {
  if (s.out_size % 2 != 0) return false;
  for (int64_t l = 0; l < s.num_layers; ++l)
    if (s.layer_input_size(l) % 2 != 0) return false;
  return true;
}

// Elements of W^T [K, N] packed in panels of kAmxPanelN columns, each as wide as a whole panel
// (the micro-kernel's B has a row stride of 16, 32, 48 or 64; a last, narrower panel is padded):
// panel n0 at n0 * amx_k_even(K).
inline int64_t amx_packed_size(int64_t N, int64_t K) {
  return amx_k_even(K) * ((N + kAmxPanelN - 1) / kAmxPanelN * kAmxPanelN);
}

// B packed into `out` by panels (bf16_pack_panels' layout, panel kAmxPanelN; the probe in
// amx_bf16_available checks that oneDNN's packing gives the same), from B [K, N] stored
// row-major with row stride ldb (`rows_of_b`: the backward's W_hh and W_ih as stored, x,
// h_prev) or from W = B^T [N, K] with row stride ldb (the forward's weights); float or bf16,
// rounded to bf16. An odd K gets a row of zeros (a product then takes amx_k_even(K) and an A
// whose column K is zero). Panels over the threads outside a parallel region. panel_k: the K
// the panels are spaced for (panel n0 at out + n0 * panel_k), where B is K of the rows of a
// taller packed B (amx_pack_cat_t); else amx_k_even(K).
template <typename W>
void amx_pack(const W* w, int64_t N, int64_t K, int64_t ldb, bool rows_of_b,
              c10::BFloat16* out, int64_t panel_k = -1) {
  const int64_t k_even = panel_k >= 0 ? panel_k : amx_k_even(K);
  const int64_t panels = (N + kAmxPanelN - 1) / kAmxPanelN;
  auto pack = [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kAmxPanelN, nb = std::min(kAmxPanelN, N - n0);
      auto* o = reinterpret_cast<uint16_t*>(out + n0 * k_even);
      if (rows_of_b) bf16_pack_panels_t(w + n0, nb, K, ldb, kAmxPanelN, o);
      else bf16_pack_panels(w + n0 * ldb, nb, K, ldb, kAmxPanelN, o);
    }
  };
  if (panels > 1 && !at::in_parallel_region()) at::parallel_for(0, panels, 1, pack);
  else pack(0, panels);
}

// W [N, K] (rows ldw apart) as B = W^T [K, N]: the forward's weights.
template <typename W>
void amx_pack_weight_t(const W* w, int64_t N, int64_t K, int64_t ldw, c10::BFloat16* out) {
  amx_pack(w, N, K, ldw, false, out);
}

// [W_ih^T; W_hh^T] ([k_ih + k_hh, N], W_ih [N, k_ih] and W_hh [N, k_hh] as stored, both K even)
// packed as one B by panels: a fused step's two products in one call per panel (each call to
// the micro-kernel looks its kernel up in ATen's cache, ~16% of a bf16 medium inference call
// when the two products were apart: benchmarks/notes/bf16.md, "One micro-kernel call per panel
// for the fused step"). A panel's k pairs come first (amx_pack's layout), so W_hh^T's rows
// follow W_ih^T's in each panel.
template <typename W>
void amx_pack_cat_t(const W* w_ih, int64_t k_ih, const W* w_hh, int64_t k_hh, int64_t N,
                    c10::BFloat16* out) {
  TORCH_INTERNAL_ASSERT(k_ih % 2 == 0 && k_hh % 2 == 0);
  amx_pack(w_ih, N, k_ih, k_ih, false, out, k_ih + k_hh);
  amx_pack(w_hh, N, k_hh, k_hh, false, out + k_ih * kAmxPanelN, k_ih + k_hh);
}

// m rows of k floats (lda apart) rounded to bf16 rows (ldd apart) on this thread: an A operand
// for the tiles or bf16_gemm (vcvtne2ps2bf16: bf16_round_rows; ~5% of a bf16 medium inference
// call as a scalar-dispatched loop per row: benchmarks/notes/bf16.md, "Rounding the A rows
// with vcvtne2ps2bf16").
inline void round_bf16_rows(const float* a, int64_t lda, int64_t m, int64_t k, c10::BFloat16* d,
                            int64_t ldd) {
  if (bf16_gemm_available()) return bf16_round_rows(m, k, a, lda, d, ldd);
  for (int64_t r = 0; r < m; ++r) round_bf16(a + r * lda, k, d + r * ldd);  // as c10 rounds
}

// This thread's buffer of at least n bf16 for an A operand (amx_rows, amx_cat_rows; each
// product consumes its A before the next is built).
inline c10::BFloat16* amx_row_buffer(int64_t n) {
  static thread_local std::vector<c10::BFloat16> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// This thread's rows of bf16 for an A operand given as float.
inline c10::BFloat16* amx_rows(const float* a, int64_t lda, int64_t m, int64_t k) {
  c10::BFloat16* d = amx_row_buffer(m * k);
  round_bf16_rows(a, lda, m, k, d, k);
  return d;
}

// C[m, n] = A[m, k] B[k, n] (+ C when `add`) on this thread, B packed by amx_pack (k even, or
// B's and A's padding zero). Panel by panel, each over every block of rows: a panel is read
// from memory once per call rather than once per 64 rows (the input projection's chunks of
// rows).
// k_packed: the packed B's K where the product takes only its first k rows (else k).
inline void amx_product(bool add, int64_t m, int64_t n, int64_t k, const c10::BFloat16* a,
                        int64_t lda, const c10::BFloat16* packed, float* c, int64_t ldc,
                        int64_t k_packed = -1) {
  const BrgemmBf16 product = &at::native::cpublas::brgemm;
  const int64_t k_even = amx_k_even(k_packed >= 0 ? k_packed : k);
  for (int64_t n0 = 0; n0 < n; n0 += kAmxPanelN)
    for (int64_t m0 = 0; m0 < m; m0 += kAmxBlockM) {
      const int64_t nb = std::min(kAmxPanelN, n - n0);
      product(std::min(kAmxBlockM, m - m0), nb, k, lda, kAmxPanelN, ldc, add, a + m0 * lda,
              packed + n0 * k_even, c + m0 * ldc + n0, true);
    }
}

// The same with A as float rows (converted to bf16 on this thread first).
inline void amx_product(bool add, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                        const c10::BFloat16* packed, float* c, int64_t ldc) {
  amx_product(add, m, n, k, amx_rows(a, lda, m, k), k, packed, c, ldc);
}

// A fused step's A operand for amx_pack_cat_t's B: this thread's m rows [x_t | h_{t-1}] as
// bf16 (ld = k_x + k_h), x as given (bf16 rows copied, float rows rounded), h rounded as
// amx_rows rounds it; h null: x's columns only.
template <typename X>
const c10::BFloat16* amx_cat_rows(const X* x, int64_t ldx, int64_t k_x, const float* h,
                                  int64_t ldh, int64_t k_h, int64_t m) {
  const int64_t ld = k_x + k_h;
  c10::BFloat16* d = amx_row_buffer(m * ld);
  if constexpr (std::is_same_v<X, c10::BFloat16>) {
    for (int64_t r = 0; r < m; ++r)
      std::memcpy(d + r * ld, x + r * ldx, sizeof(c10::BFloat16) * k_x);
  } else {
    round_bf16_rows(x, ldx, m, k_x, d, ld);
  }
  if (h) round_bf16_rows(h, ldh, m, k_h, d + k_x, ld);
  return d;
}

// Hands this thread's tiles back (after a thread's last product of a call).
inline void amx_release() { at::native::cpublas::brgemm_release(true); }

}  // namespace
}  // namespace fused_lstm
