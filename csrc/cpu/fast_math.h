// exp and tanh for the CPU cell passes, written so that GCC vectorises the loops that call
// them: inline, branch-free (selects instead of branches), no libm call. glibc's scalar expf /
// tanhf were 58% of the instructions of a tiny forward (benchmarks/NOTES.md).
//
// float (errors against double precision over every float in [-20, 20]; benchmarks/NOTES.md,
// section 2):
//   exp_fast: round-to-nearest range reduction and a degree-6 minimax polynomial; <= 0.91 ulp in
//     the FMA clones (x86-64-v3, -v4), <= 1.17 ulp without FMA (every 101st float of
//     [-87.3, 88.3]: the same). Outside that range: +inf from x >= 88.38 (expf overflows only
//     at 88.72), 0 for x <= -87.68 (the true value is subnormal there), subnormals between.
//   tanh_fast: odd polynomial for |x| < 0.625, 1 - 2 / (exp(2|x|) + 1) above; <= 1.37 ulp.
//   NaN in gives NaN out; +-inf give the limits (exp: inf, 0; tanh: +-1; lstm_cell.h's
//   sigmoid: 1, 0). That sigmoid, 1 / (1 + exp(-x)), rounds twice more itself: <= 2.49 ulp;
//   a correctly rounded exp gives the same maximum (every 13th float).
// double: std::exp / std::tanh (double is the gradcheck dtype, where exactness matters more
// than speed).
//
// The range reduction relies on IEEE round-to-nearest arithmetic as written: build without
// -ffast-math / -fassociative-math (which would fold (t + C) - C away).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fused_lstm {
namespace cpu {

namespace detail {

__attribute__((always_inline)) inline uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

__attribute__((always_inline)) inline float bits_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2].
// kLowerClamp = false is for arguments known to be >= 0 (or NaN).
template <bool kLowerClamp>
__attribute__((always_inline)) inline float exp_core(float x) {
  // Clamp so that n stays in [-127, 128]: 2^n is then the float whose exponent field is n + 127,
  // which for n = 128 reads as +inf and for n = -127 as +0. A NaN fails both comparisons and
  // flows through every step to a NaN result. (Plain value selects: std::min / std::max select
  // references, and selects of constants block GCC's vectoriser.)
  float xc = x > 88.8f ? 88.8f : x;
  if (kLowerClamp) xc = xc < -88.0f ? -88.0f : xc;
  // Adding 1.5 * 2^23 rounds x / ln 2 to the nearest integer n, left in t's low mantissa bits.
  const float t = xc * 1.44269504088896341f + 12582912.0f;
  const float fn = t - 12582912.0f;
  // r = x - n ln 2, ln 2 split in two (n * 0.693359375 is exact) for precision.
  const float r = xc - fn * 0.693359375f + fn * 2.12194440e-4f;
  // exp(r): degree-6 minimax polynomial for relative error on [-ln2/2, ln2/2] (3.1e-9 before
  // float rounding).
  float p = 1.381461275741458e-3f;
  p = p * r + 8.368710055947304e-3f;
  p = p * r + 4.166838899254799e-2f;
  p = p * r + 1.666652113199234e-1f;
  p = p * r + 4.999999403953552e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n: t's low bits hold n (two's complement), shifted into the exponent field.
  return p * bits_float((float_bits(t) << 23) + 0x3f800000u);
}

}  // namespace detail

__attribute__((always_inline)) inline float exp_fast(float x) { return detail::exp_core<true>(x); }

__attribute__((always_inline)) inline float tanh_fast(float x) {
  const float ax = std::fabs(x);
  // Small |x|: odd polynomial (no cancellation); otherwise 1 - 2 / (exp(2|x|) + 1), where exp's
  // inf for |x| >= 44.2 gives exactly 1.
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float large = 1.0f - 2.0f / (detail::exp_core<false>(ax + ax) + 1.0f);
  return ax < 0.625f ? small : std::copysign(large, x);  // NaN: comparison false -> NaN
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
