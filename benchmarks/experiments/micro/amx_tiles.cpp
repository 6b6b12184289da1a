// One thread's rate of a bf16 product C[M, N] (+)= A[M, K] B[K, N] with float32 sums on AMX
// tiles, two ways: oneDNN's brgemm micro-kernel as ATen exports it (at::native::cpublas, as
// fused_lstm's amx.h calls it) and a plain hand-written tile kernel (2 x 2 blocks of 16 x 16
// float32 tiles, K in steps of 32), on B packed by ATen's `pack` into panels of 64 columns (the
// VNNI layout amx.h's panels have). Built and driven by amx_tiles.py (a torch extension).
// benchmarks/notes/bf16.md, "A hand-written AMX tile kernel against ATen's brgemm".
#include <torch/extension.h>

#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

namespace at::native::cpublas {
TORCH_API void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c,
                      bool add_C, const c10::BFloat16* A, const c10::BFloat16* B, float* C,
                      bool is_vnni);
TORCH_API void brgemm_release(bool is_vnni);
TORCH_API void pack(int64_t K, int64_t N, int64_t ld_in, int64_t ld_out, c10::ScalarType dt_in,
                    c10::ScalarType dt_out, const void* in, void* out);
}  // namespace at::native::cpublas

namespace {

constexpr int64_t kPanel = 64;

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Eight 16 x 64-byte tiles on this thread (the kernel's A, B and C tiles).
__attribute__((target("amx-tile,amx-bf16"))) void configure_tiles() {
  syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
  alignas(64) TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  asm volatile("" : : "r"(&cfg) : "memory");  // GCC 12 dropped the stores otherwise
  _tile_loadconfig(&cfg);
}

// C[32, 64] (ldc floats) (+)= A[32, K] (lda bf16) B, B one packed panel ([K / 2][64][2] bf16).
__attribute__((target("amx-tile,amx-bf16"))) void kernel_32x64(
    int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B, float* C,
    int64_t ldc, bool add) {
  for (int64_t n0 = 0; n0 < kPanel; n0 += 32) {
    float* c = C + n0;
    if (add) {
      _tile_loadd(4, c, ldc * 4);
      _tile_loadd(5, c + 16, ldc * 4);
      _tile_loadd(6, c + 16 * ldc, ldc * 4);
      _tile_loadd(7, c + 16 * ldc + 16, ldc * 4);
    } else {
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
    }
    for (int64_t k = 0; k < K; k += 32) {
      _tile_loadd(0, A + k, lda * 2);
      _tile_loadd(1, A + 16 * lda + k, lda * 2);
      const c10::BFloat16* b = B + (k / 2) * 2 * kPanel + 2 * n0;
      _tile_loadd(2, b, 2 * kPanel * 2);
      _tile_loadd(3, b + 32, 2 * kPanel * 2);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
    _tile_stored(4, c, ldc * 4);
    _tile_stored(5, c + 16, ldc * 4);
    _tile_stored(6, c + 16 * ldc, ldc * 4);
    _tile_stored(7, c + 16 * ldc + 16, ldc * 4);
  }
}

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

}  // namespace

// B [K, N] bf16 (row-major) packed by ATen into panels of 64 columns, panel n0 at n0 * K.
torch::Tensor pack_b(const torch::Tensor& b) {
  const int64_t K = b.size(0), N = b.size(1);
  TORCH_CHECK(K % 32 == 0 && N % kPanel == 0, "K a multiple of 32, N of 64");
  auto out = torch::zeros({N * K}, b.options());
  for (int64_t n0 = 0; n0 < N; n0 += kPanel)
    at::native::cpublas::pack(K, kPanel, N, kPanel, at::kBFloat16, at::kBFloat16,
                              reinterpret_cast<const c10::BFloat16*>(b.data_ptr()) + n0,
                              reinterpret_cast<c10::BFloat16*>(out.data_ptr()) + n0 * K);
  return out;
}

// Seconds per product C (+)= A B over `reps` repetitions, panel by panel, rows in blocks of
// `mb` (ATen: mb rows per call; ours: 32-row kernel calls, mb ignored). M a multiple of 32.
double product_seconds(const torch::Tensor& a, const torch::Tensor& b_packed, torch::Tensor& c,
                       bool ours, int64_t mb, bool add, int64_t reps) {
  const int64_t M = a.size(0), K = a.size(1), N = c.size(1);
  TORCH_CHECK(M % 32 == 0, "M a multiple of 32");
  const auto* A = reinterpret_cast<const c10::BFloat16*>(a.data_ptr());
  const auto* B = reinterpret_cast<const c10::BFloat16*>(b_packed.data_ptr());
  float* C = c.data_ptr<float>();
  if (ours) configure_tiles();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t n0 = 0; n0 < N; n0 += kPanel)
      for (int64_t m0 = 0; m0 < M; m0 += ours ? 32 : mb) {
        if (ours)
          kernel_32x64(K, A + m0 * K, K, B + n0 * K, C + m0 * N + n0, N, add);
        else
          at::native::cpublas::brgemm(std::min(mb, M - m0), kPanel, K, K, kPanel, N, add,
                                      A + m0 * K, B + n0 * K, C + m0 * N + n0, true);
      }
  const auto t1 = std::chrono::steady_clock::now();
  if (ours) release_tiles();
  else at::native::cpublas::brgemm_release(true);
  return std::chrono::duration<double>(t1 - t0).count() / double(reps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_b", &pack_b);
  m.def("product_seconds", &product_seconds);
}
