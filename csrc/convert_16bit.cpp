// bfloat16 / float16 <-> float32 on the CPU (convert_16bit.h): the op boundary's conversions
// and the kernels' widening of kept 16-bit weights.
#include "convert_16bit.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#ifdef __x86_64__
#include <immintrin.h>
#endif

namespace fused_lstm {

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSED_LSTM_X86_GCC 1
#endif

// target_clones: baseline x86-64, AVX2 and AVX-512 versions of the loops, chosen at run time.
#ifdef FUSED_LSTM_X86_GCC
#define FUSED_LSTM_CONVERT_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FUSED_LSTM_CONVERT_CLONES
#endif

FUSED_LSTM_CONVERT_CLONES void widen_bf16_run(const uint16_t* __restrict src, int64_t n,
                                              float* __restrict dst) {
  auto* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = uint32_t{src[i]} << 16;
}

// As torch 2.13's CPU conversion (cvtfp32_bf16 in ATen's vectorised bf16): add 0x7FFF plus
// the lowest kept bit, keep the upper half; a NaN of either sign becomes 0xFFFF.
FUSED_LSTM_CONVERT_CLONES void round_bf16_run(const float* __restrict src, int64_t n,
                                              uint16_t* __restrict dst) {
  const auto* in = reinterpret_cast<const uint32_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = in[i];
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    dst[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0xFFFF} : rounded;
  }
}

// float16: F16C's vcvtph2ps (exact) and vcvtps2ph to nearest even, the instructions torch's
// vectorised CPU conversion uses, 16 at a time on AVX-512F and 8 with AVX + F16C; else c10's
// scalar conversion (the same values; a NaN may keep other payload bits).
void widen_half_scalar(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::detail::fp16_ieee_to_fp32_value(src[i]);
}
void round_half_scalar(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::detail::fp16_ieee_from_fp32_value(src[i]);
}
#ifdef FUSED_LSTM_X86_GCC
__attribute__((target("avx512f,f16c"))) void widen_half_avx512(const uint16_t* src, int64_t n,
                                                               float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
__attribute__((target("avx,f16c"))) void widen_half_f16c(const uint16_t* src, int64_t n,
                                                         float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
__attribute__((target("avx512f,f16c"))) void round_half_avx512(const float* src, int64_t n,
                                                               uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
__attribute__((target("avx,f16c"))) void round_half_f16c(const float* src, int64_t n,
                                                         uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

using WidenRun = void (*)(const uint16_t*, int64_t, float*);
using RoundRun = void (*)(const float*, int64_t, uint16_t*);

// The widest of the float16 loops this CPU runs: 2 AVX-512F, 1 AVX + F16C, 0 scalar.
int half_isa() {
  static const int isa = [] {
#ifdef FUSED_LSTM_X86_GCC
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c")) return 2;
    if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c")) return 1;
#endif
    return 0;
  }();
  return isa;
}
// The cap set by the test hook (lstm.h isa_level_cap; -1: none).
std::atomic<int> forced_isa_cap{-1};

int half_isa_now() {
  const int cap = forced_isa_cap.load(std::memory_order_relaxed);
  return cap >= 0 ? std::min(cap, half_isa()) : half_isa();
}
WidenRun widen_half_run() {
#ifdef FUSED_LSTM_X86_GCC
  switch (half_isa_now()) {
    case 2: return widen_half_avx512;
    case 1: return widen_half_f16c;
    default: break;
  }
#endif
  return widen_half_scalar;
}
RoundRun round_half_run() {
#ifdef FUSED_LSTM_X86_GCC
  switch (half_isa_now()) {
    case 2: return round_half_avx512;
    case 1: return round_half_f16c;
    default: break;
  }
#endif
  return round_half_scalar;
}

// Elements per thread from which the conversions split over threads (ATen's copy grain).
constexpr int64_t kConvertGrain = int64_t{1} << 15;

void round_with(RoundRun run, const float* src, int64_t n, uint16_t* dst) {
  if (n < 2 * kConvertGrain) return run(src, n, dst);
  at::parallel_for(0, n, kConvertGrain, [&](int64_t begin, int64_t end) {
    run(src + begin, end - begin, dst + begin);
  });
}

}  // namespace

void widen_to_float(const at::Tensor& src, float* dst) {
  TORCH_INTERNAL_ASSERT(is_16bit(src.scalar_type()) && src.is_cpu());
  const WidenRun run = src.scalar_type() == at::kBFloat16 ? widen_bf16_run : widen_half_run();
  const auto* p = static_cast<const uint16_t*>(src.const_data_ptr());
  const int64_t n = src.numel();
  if (n == 0) return;
  if (src.is_contiguous()) {
    if (n < 2 * kConvertGrain) return run(p, n, dst);
    at::parallel_for(0, n, kConvertGrain, [&](int64_t begin, int64_t end) {
      run(p + begin, end - begin, dst + begin);
    });
    return;
  }
  // Strided (a batch_first input seen time-major): row by row of the last dimension.
  const int64_t dim = src.dim();
  const at::IntArrayRef sizes = src.sizes(), strides = src.strides();
  const int64_t inner = sizes[dim - 1], inner_stride = strides[dim - 1];
  auto rows = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t offset = 0;
      for (int64_t d = dim - 2, rest = r; d >= 0; --d) {
        offset += (rest % sizes[d]) * strides[d];
        rest /= sizes[d];
      }
      if (inner_stride == 1) {
        run(p + offset, inner, dst + r * inner);
      } else {
        for (int64_t i = 0; i < inner; ++i) run(p + offset + i * inner_stride, 1, dst + r * inner + i);
      }
    }
  };
  const int64_t row_count = n / inner;
  if (n < 2 * kConvertGrain) return rows(0, row_count);
  at::parallel_for(0, row_count, std::max<int64_t>(1, kConvertGrain / inner), rows);
}

void widen_16bit(const c10::BFloat16* src, int64_t n, float* dst) {
  widen_bf16_run(reinterpret_cast<const uint16_t*>(src), n, dst);
}

void widen_16bit(const c10::Half* src, int64_t n, float* dst) {
  widen_half_run()(reinterpret_cast<const uint16_t*>(src), n, dst);
}

void round_bf16(const float* src, int64_t n, c10::BFloat16* dst) {
  round_bf16_run(src, n, reinterpret_cast<uint16_t*>(dst));
}

void round_to(const float* src, int64_t n, at::ScalarType dtype, void* dst) {
  TORCH_INTERNAL_ASSERT(is_16bit(dtype));
  round_with(dtype == at::kBFloat16 ? round_bf16_run : round_half_run(), src, n,
             static_cast<uint16_t*>(dst));
}

int set_isa_level_cap(int level) { return forced_isa_cap.exchange(level < 0 ? -1 : level); }

int isa_level_cap() { return forced_isa_cap.load(std::memory_order_relaxed); }

int half_conversion_isa() { return half_isa_now(); }

}  // namespace fused_lstm
