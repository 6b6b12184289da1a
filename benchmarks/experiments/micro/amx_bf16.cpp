// One thread's rate of an LSTM step's bf16 product, C[M, N] (+)= A[M, K] B[K, N] with float32
// sums, two ways: oneDNN's brgemm micro-kernel as ATen exports it (at::native::cpublas, B packed
// for it once; AMX tiles where the CPU has them) and fused_lstm's own bf16_gemm (AVX512_BF16 dot
// products, csrc/cpu/bf16_gemm.h). Built and driven by amx_bf16.py (plain C functions, ctypes).
#include "../../../csrc/cpu/bf16_gemm.h"

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

#include <chrono>
#include <cstdint>
#include <random>
#include <vector>

// Exported by libtorch_cpu (ATen/native/CPUBlas.h is not shipped).
namespace at::native::cpublas {
void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c,
            bool add_C, const c10::BFloat16* A, const c10::BFloat16* B, float* C, bool is_vnni);
void brgemm_release(bool is_vnni);
void pack(int64_t K, int64_t N, int64_t ld_in, int64_t ld_out, c10::ScalarType dt_in,
          c10::ScalarType dt_out, const void* in, void* out);
bool could_pack(c10::ScalarType dt_in);
}  // namespace at::native::cpublas

namespace {

namespace cb = at::native::cpublas;

std::vector<c10::BFloat16> random_bf16(int64_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<c10::BFloat16> v(n);
  for (auto& x : v) x = c10::BFloat16(u(gen));
  return v;
}

template <typename F>
double seconds_per_call(F&& f) {
  f();  // warm: kernels generated, data in cache
  int64_t reps = 1;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < reps; ++r) f();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s > 0.2) return s / reps;
    reps *= 2;
  }
}

}  // namespace

extern "C" {

int amx_could_pack() { return cb::could_pack(c10::ScalarType::BFloat16) ? 1 : 0; }

// GFLOP/s of brgemm over N in panels of nb columns (B packed per panel), or -1 where it
// cannot run here.
double brgemm_gflops(int64_t M, int64_t N, int64_t K, int64_t nb) {
  if (!cb::could_pack(c10::ScalarType::BFloat16)) return -1;
  const auto A = random_bf16(M * K, 1), B = random_bf16(K * N, 2);
  const int64_t k_even = (K + 1) / 2 * 2;
  std::vector<c10::BFloat16> packed(k_even * N);
  for (int64_t n0 = 0; n0 < N; n0 += nb)
    cb::pack(K, nb, N, nb, c10::ScalarType::BFloat16, c10::ScalarType::BFloat16, B.data() + n0,
             packed.data() + n0 * k_even);
  std::vector<float> C(M * N, 0.0f);
  const double s = seconds_per_call([&] {
    for (int64_t n0 = 0; n0 < N; n0 += nb)
      cb::brgemm(M, nb, K, K, nb, N, true, A.data(), packed.data() + n0 * k_even, C.data() + n0,
                 true);
  });
  cb::brgemm_release(true);
  return 2.0 * M * N * K / s * 1e-9;
}

// GFLOP/s of fused_lstm's bf16_gemm (W = B^T packed once), or -1 where it cannot run here.
double bf16_gemm_gflops(int64_t M, int64_t N, int64_t K) {
  if (!fused_lstm::bf16_gemm_available()) return -1;
  const auto A = random_bf16(M * K, 1), W = random_bf16(N * K, 2);
  std::vector<uint16_t> packed(fused_lstm::bf16_packed_size(N, K));
  fused_lstm::bf16_pack_weight(W.data(), N, K, K, packed.data());
  std::vector<float> C(M * N, 0.0f);
  const double s = seconds_per_call(
      [&] { fused_lstm::bf16_gemm(M, N, K, A.data(), K, packed.data(), C.data(), N, true); });
  return 2.0 * M * N * K / s * 1e-9;
}

}  // extern "C"
