// Test hooks for csrc/cpu/bf16_gemm.{h,cpp}: plain C functions on raw pointers, called through
// ctypes. tests/test_bf16_gemm.py builds this file with csrc/cpu/bf16_gemm.cpp into a shared
// library (torch.utils.cpp_extension.load, is_python_module=False): no torch/extension.h, so
// the build takes seconds. Each function returns 0, or 1 after a C++ exception (its message in
// fl_bf16_last_error).
#include "../csrc/cpu/bf16_gemm.h"

#include <cstdint>
#include <exception>
#include <string>

namespace {
std::string last_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}
}  // namespace

extern "C" {

const char* fl_bf16_last_error() { return last_error.c_str(); }

int fl_bf16_available() { return fused_lstm::bf16_gemm_available() ? 1 : 0; }

void fl_bf16_force_portable(int on) { fused_lstm::bf16_gemm_force_portable(on != 0); }

int64_t fl_bf16_packed_size(int64_t N, int64_t K) {
  return (int64_t)fused_lstm::bf16_packed_size(N, K);
}

// dtype: 0 float32, 1 bfloat16
int fl_bf16_pack(int dtype, const void* W, int64_t N, int64_t K, int64_t ldw, uint16_t* out) {
  return guarded([&] {
    if (dtype == 0)
      fused_lstm::bf16_pack_weight(static_cast<const float*>(W), N, K, ldw, out);
    else
      fused_lstm::bf16_pack_weight(static_cast<const c10::BFloat16*>(W), N, K, ldw, out);
  });
}

// dtype: 0 float32, 1 bfloat16; W given transposed ([K, N], row stride ldw)
int fl_bf16_pack_t(int dtype, const void* Wt, int64_t N, int64_t K, int64_t ldw, uint16_t* out) {
  return guarded([&] {
    if (dtype == 0)
      fused_lstm::bf16_pack_weight_t(static_cast<const float*>(Wt), N, K, ldw, out);
    else
      fused_lstm::bf16_pack_weight_t(static_cast<const c10::BFloat16*>(Wt), N, K, ldw, out);
  });
}

int64_t fl_bf16_packed_panels_size(int64_t N, int64_t K, int64_t panel) {
  return fused_lstm::bf16_packed_panels_size(N, K, panel);
}

// dtype: 0 float32, 1 bfloat16; given_t: W given transposed ([K, N], row stride ldw)
int fl_bf16_pack_panels(int dtype, const void* W, int64_t N, int64_t K, int64_t ldw,
                        int64_t panel, int given_t, uint16_t* out) {
  return guarded([&] {
    if (dtype == 0 && given_t)
      fused_lstm::bf16_pack_panels_t(static_cast<const float*>(W), N, K, ldw, panel, out);
    else if (dtype == 0)
      fused_lstm::bf16_pack_panels(static_cast<const float*>(W), N, K, ldw, panel, out);
    else if (given_t)
      fused_lstm::bf16_pack_panels_t(static_cast<const c10::BFloat16*>(W), N, K, ldw, panel, out);
    else
      fused_lstm::bf16_pack_panels(static_cast<const c10::BFloat16*>(W), N, K, ldw, panel, out);
  });
}

int64_t fl_bf16_row_stride(int64_t K) { return fused_lstm::bf16_row_stride(K); }

int fl_bf16_transpose_rows(const float* At, int64_t K, int64_t M, int64_t ldat, uint16_t* out,
                           int64_t ldo) {
  return guarded([&] {
    fused_lstm::bf16_transpose_rows(At, K, M, ldat, reinterpret_cast<c10::BFloat16*>(out), ldo);
  });
}

// At given in bf16 (copied, not rounded)
int fl_bf16_transpose_rows_bf16(const uint16_t* At, int64_t K, int64_t M, int64_t ldat,
                                uint16_t* out, int64_t ldo) {
  return guarded([&] {
    fused_lstm::bf16_transpose_rows(reinterpret_cast<const c10::BFloat16*>(At), K, M, ldat,
                                    reinterpret_cast<c10::BFloat16*>(out), ldo);
  });
}

// parallel: 0 bf16_gemm (columns [n0, n1)), 1 bf16_gemm_parallel (all columns)
int fl_bf16_gemm(int dtype, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
                 const uint16_t* W, float* C, int64_t ldc, int accumulate, int64_t n0, int64_t n1,
                 int parallel) {
  return guarded([&] {
    if (dtype == 0) {
      const auto* a = static_cast<const float*>(A);
      if (parallel)
        fused_lstm::bf16_gemm_parallel(M, N, K, a, lda, W, C, ldc, accumulate != 0);
      else
        fused_lstm::bf16_gemm(M, N, K, a, lda, W, C, ldc, accumulate != 0, n0, n1);
    } else {
      const auto* a = static_cast<const c10::BFloat16*>(A);
      if (parallel)
        fused_lstm::bf16_gemm_parallel(M, N, K, a, lda, W, C, ldc, accumulate != 0);
      else
        fused_lstm::bf16_gemm(M, N, K, a, lda, W, C, ldc, accumulate != 0, n0, n1);
    }
  });
}

}  // extern "C"
