// bfloat16 GEMM with float32 accumulation on AVX512_BF16 (vdpbf16ps), for the LSTM's bf16 path.
//
//   C[M, N] (+)= A[M, K] * W^T,   W row-major [N, K] (an LSTM weight: W_ih [4H, I], W_hh [4H, H])
//
// Operands are bfloat16 (a float32 A is rounded to bf16, round-to-nearest-even, as it is read),
// products are exact and are summed in float32, C is float32: the numerics of oneDNN's bf16 LSTM.
// vdpbf16ps adds a_{2p} b_{2p} + a_{2p+1} b_{2p+1} into the accumulator; it treats denormal
// inputs as zero and flushes denormal results to zero (as oneDNN's bf16 kernels do).
//
// W is packed once (bf16_pack_weight) into blocks of kBf16GemmBlockN = 16 columns:
//   packed[((n / 16) * Kp + k / 2) * 32 + (n % 16) * 2 + k % 2] = bf16(W[n, k]),  Kp = ceil(K / 2)
// i.e. per 16-column block, for each pair of k, 16 columns x 2 consecutive k (one zmm register,
// one 64-byte line); columns past N and the k past an odd K are zero. A block is Kp * 32 uint16.
//
// Only usable where bf16_gemm_available(): the functions below throw (c10::Error) otherwise,
// except the size, packing and conversion functions, which are portable C++ (vectorised where
// bf16_gemm_available(), with the same results).
// The gemm functions are single-threaded and reentrant (each thread keeps its own scratch), so
// they may be called from inside at::parallel_for, each thread on its own rows of A and C or on
// its own column range [n0, n1); bf16_gemm_parallel splits one product over at::parallel_for.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstddef>
#include <cstdint>

namespace fused_lstm {

constexpr int64_t kBf16GemmBlockN = 16;

// True when this CPU has AVX512F/BW/VL and AVX512_BF16 (and the OS saves the zmm state; probed
// once), unless bf16_gemm_force_portable(true) is in effect. Whether an LSTM uses these products
// is the CPU plan's decision (cpu/plan.h, the setting allow_bf16_products).
bool bf16_gemm_available();

// For tests: true makes bf16_gemm_available() false, so the packing functions take their
// portable code (what CPUs without AVX512_BF16 run) and bf16_gemm refuses; false undoes it.
void bf16_gemm_force_portable(bool on);

// Number of uint16_t elements of the packed form of an [N, K] weight (64-byte aligned storage
// is best; any alignment works).
size_t bf16_packed_size(int64_t N, int64_t K);

// Packs W [N, K] (row stride ldw elements) into `out` (bf16_packed_size(N, K) elements).
// A float32 W is rounded to bf16 to nearest even, NaN kept, as torch's .to(torch.bfloat16).
void bf16_pack_weight(const uint16_t* W, int64_t N, int64_t K, int64_t ldw, uint16_t* out);
void bf16_pack_weight(const c10::BFloat16* W, int64_t N, int64_t K, int64_t ldw, uint16_t* out);
void bf16_pack_weight(const float* W, int64_t N, int64_t K, int64_t ldw, uint16_t* out);

// The same packed form of W [N, K], given as its transpose Wt = W^T: [K, N] row-major, row
// stride ldw >= N. For operands stored with k along rows: the LSTM backward's W_hh and W_ih in
// dL/dh = dgates W_hh and dL/dx = dgates W_ih, and x or h in the weight gradients
// dW = dgates^T x. The layout's natural direction (a packed line is 16 consecutive n of two
// consecutive k rows). Rounded as bf16_pack_weight.
void bf16_pack_weight_t(const uint16_t* Wt, int64_t N, int64_t K, int64_t ldw, uint16_t* out);
void bf16_pack_weight_t(const c10::BFloat16* Wt, int64_t N, int64_t K, int64_t ldw,
                        uint16_t* out);
void bf16_pack_weight_t(const float* Wt, int64_t N, int64_t K, int64_t ldw, uint16_t* out);

// The same pairs-of-k layout in panels of `panel` columns (a multiple of 16): panel n0 (a
// multiple of `panel`) at out + n0 * 2 * Kp, pair p of its k at + p * 2 * panel, column n at
// + 2 * (n - n0) + k % 2; columns past N (a last panel is written whole) and the k past an odd K
// are zero. bf16_packed_panels_size(N, K, panel) elements. Panel 16 is bf16_gemm's layout;
// panels of 16 to 64 columns are the VNNI layout oneDNN's brgemm reads a bf16 B in on AMX
// (ld_b = panel; amx.h checks the two agree before using its tiles). W [N, K] (row stride ldw)
// as B = W^T, or Wt [K, N] (row stride ldw, n contiguous) as B = Wt. Single-threaded.
int64_t bf16_packed_panels_size(int64_t N, int64_t K, int64_t panel);
void bf16_pack_panels(const float* W, int64_t N, int64_t K, int64_t ldw, int64_t panel,
                      uint16_t* out);
void bf16_pack_panels(const c10::BFloat16* W, int64_t N, int64_t K, int64_t ldw, int64_t panel,
                      uint16_t* out);
void bf16_pack_panels_t(const float* Wt, int64_t N, int64_t K, int64_t ldw, int64_t panel,
                        uint16_t* out);
void bf16_pack_panels_t(const c10::BFloat16* Wt, int64_t N, int64_t K, int64_t ldw,
                        int64_t panel, uint16_t* out);

// A row stride (elements) for bf16 rows of K elements: even, at least K, and not a multiple of
// 4 KB (rows a power of two apart share cache sets).
int64_t bf16_row_stride(int64_t K);

// bf16 rows of A = At^T [M, K] from At [K, M] row-major (row stride ldat >= M), as the bfloat16
// A of bf16_gemm: out[m * ldo + k] = bf16(At[k, m]) for k < K, and 0 at k = K when K is odd
// (ldo >= K rounded up to even; bf16_row_stride(K) is a good one). For products whose A is
// stored transposed: the weight gradients dW = dgates^T x with dgates [rows, 4H] (converted
// once for dW_ih and dW_hh, then read in place). Rounded as bf16_pack_weight. Single-threaded
// (split M over threads: the rows of out are independent).
void bf16_transpose_rows(const float* At, int64_t K, int64_t M, int64_t ldat, c10::BFloat16* out,
                         int64_t ldo);
// The same from an At already in bf16 (copied, not rounded): the AMX backward's dgates, whose
// bf16 rows the step's dL/dh product has made.
void bf16_transpose_rows(const c10::BFloat16* At, int64_t K, int64_t M, int64_t ldat,
                         c10::BFloat16* out, int64_t ldo);

// M rows of K floats (row stride lda) rounded to bf16 rows (row stride ldo) to nearest even
// with vcvtne2ps2bf16, as bf16_gemm rounds its float32 A: an operand for the bf16 products,
// which treat denormal inputs as zero, so the instruction's flushing of denormals changes no
// product (a NaN stays a NaN, with other payload bits than c10's rounding gives). Needs
// bf16_gemm_available(). Single-threaded.
void bf16_round_rows(int64_t M, int64_t K, const float* A, int64_t lda, c10::BFloat16* out,
                     int64_t ldo);

// C[m, n] = (accumulate ? C[m, n] : 0) + sum_k bf16(A[m, k]) * W[n, k], for m < M and
// n0 <= n < n1 (n1 < 0 means N); other columns of C are neither read nor written. C points at
// column 0 of row 0 (not at column n0). Row strides lda, ldc in elements. Single-threaded.
// Column ranges starting at multiples of 16 waste no work.
void bf16_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
               const uint16_t* packedW, float* C, int64_t ldc, bool accumulate,
               int64_t n0 = 0, int64_t n1 = -1);
void bf16_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
               const uint16_t* packedW, float* C, int64_t ldc, bool accumulate,
               int64_t n0 = 0, int64_t n1 = -1);

// The same product over all of C, split over at::parallel_for (rows when M is large, column
// blocks otherwise). Do not call from inside a parallel region (it would run on one thread).
void bf16_gemm_parallel(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                        const uint16_t* packedW, float* C, int64_t ldc, bool accumulate);
void bf16_gemm_parallel(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                        const uint16_t* packedW, float* C, int64_t ldc, bool accumulate);

}  // namespace fused_lstm
