// exp and tanh for the CPU cell passes, written so that GCC vectorises the loops that call
// them: inline, branch-free (selects instead of branches), no libm call. glibc's scalar expf /
// tanhf were 58% of the instructions of a tiny forward (benchmarks/NOTES.md).
//
// float: Cephes' expf / tanhf polynomials, within 2 ulp of the correctly rounded result over
// the whole range (tests/test_ops.py holds the kernels to nn.LSTM at float32 tolerances);
// NaN in gives NaN out, +-inf give the limits. double: std::exp / std::tanh (double is the
// gradcheck dtype, where exactness matters more than speed).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fused_lstm {
namespace cpu {

__attribute__((always_inline)) inline float pow2i(int32_t n) {  // 2^n for n in [-126, 127]
  const int32_t bits = (n + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

__attribute__((always_inline)) inline float exp_fast(float x) {
  // Clamp only to keep n in range: beyond ln(FLT_MAX) = 88.72 the product below overflows to
  // inf, below ln(2^-150) = -103.97 it underflows to 0, exactly as expf does. A NaN fails both
  // comparisons and flows through every step to a NaN result. (Plain value selects: std::min /
  // std::max select references, and selects of constants block GCC's vectoriser.)
  float xc = x > 89.5f ? 89.5f : x;
  xc = xc < -104.5f ? -104.5f : xc;
  // exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split for precision).
  const float fx = xc * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(fx);
  n -= static_cast<float>(n) > fx ? 1 : 0;  // floor
  const float fn = static_cast<float>(n);
  const float r = xc - fn * 0.693359375f + fn * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  // 2^n in two factors, each a normal float for n in [-151, 129].
  const int32_t n1 = n >> 1;
  return p * pow2i(n1) * pow2i(n - n1);
}

__attribute__((always_inline)) inline float tanh_fast(float x) {
  const float ax = std::fabs(x);
  // Small |x|: odd polynomial (no cancellation); otherwise 1 - 2 / (exp(2|x|) + 1).
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float large = 1.0f - 2.0f / (exp_fast(2.0f * ax) + 1.0f);
  const float signed_large = x < 0.0f ? -large : large;
  return ax < 0.625f ? small : signed_large;  // NaN: comparison false -> large path -> NaN
}

// The math policy handed to lstm_cell.h's templates by the CPU kernels.
template <typename acc_t>
struct FastMath {
  static acc_t exp(acc_t x) { return std::exp(x); }
  static acc_t tanh(acc_t x) { return std::tanh(x); }
};

template <>
struct FastMath<float> {
  __attribute__((always_inline)) static float exp(float x) { return exp_fast(x); }
  __attribute__((always_inline)) static float tanh(float x) { return tanh_fast(x); }
};

}  // namespace cpu
}  // namespace fused_lstm
