// exp and tanh for the CPU cell passes, written so that GCC vectorises the loops that call
// them: inline, branch-free (selects instead of branches), no libm call. glibc's scalar expf /
// tanhf were 58% of the instructions of a tiny forward (benchmarks/notes/cell-pass.md, "Vectorised
// transcendentals").
//
// float (errors against double precision over every float in [-20, 20];
// benchmarks/notes/cell-pass.md,
// "A cheaper exp"):
//   exp_fast: round-to-nearest range reduction and a degree-6 minimax polynomial; <= 0.91 ulp in
//     the FMA clones (x86-64-v3, -v4), <= 1.17 ulp without FMA (every 101st float of
//     [-87.3, 88.3]: the same). Outside that range: +inf from x >= 88.38 (expf overflows only
//     at 88.72), 0 for x <= -87.68 (the true value is subnormal there), subnormals between.
//   tanh_fast: a rational function (degree 9 over 8) on [-9, 9]; <= 5.21 ulp in the FMA
// clones, <= 5.76 without FMA (every 7th float; 0.13% of them above 2 ulp;
// benchmarks/notes/cell-pass.md, "A table exp and a rational tanh").
//   NaN in gives NaN out; +-inf give the limits (exp: inf, 0; tanh: +-1; lstm_cell.h's
//   sigmoid: 1, 0). That sigmoid, 1 / (1 + exp(-x)), rounds twice more itself: <= 2.49 ulp;
//   a correctly rounded exp gives the same maximum (every 13th float). The AVX-512 versions
//   (vec16:: below): exp <= 1.69 ulp, sigmoid <= 3.79 ulp, tanh as tanh_fast.
// double: std::exp / std::tanh (double is the gradcheck dtype, where exactness matters more
// than speed).
//
// The range reduction relies on IEEE round-to-nearest arithmetic as written: build without
// -ffast-math / -fassociative-math (which would fold (t + C) - C away).
#pragma once

#include "../lstm_cell.h"

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

namespace detail {
// tanh(x) = x P(x^2) / Q(x^2) on [-9, 9] (clamped outside: tanh(9) is within an ulp of 1),
// P and Q of degree 4 with P(0) = Q(0) = 1: fitted here (minimax relative error, Loeb's
// linearisation with Lawson's weights, benchmarks/notes/cell-pass.md, "A table exp and a rational
// tanh"), 2.1e-8 before float
// rounding. Coefficients from degree 1 up.
constexpr float kTanhP[4] = {1.338397413e-01f, 3.498988692e-03f, 2.066113848e-05f,
                             1.341964584e-08f};
constexpr float kTanhQ[4] = {4.671729505e-01f, 2.589017898e-02f, 3.291026223e-04f,
                             7.804658253e-07f};
constexpr float kTanhClamp = 9.0f;
}  // namespace detail

// tanh as a rational function: no exp, no branch, one division. Odd and exact at 0 (x * 1 / 1);
// NaN in gives NaN out (both clamps' comparisons are false). V: float, or a GCC vector of floats
// (vec16::tanh below): the same operations.
template <typename V>
__attribute__((always_inline)) inline V tanh_rational(V x) {
  using namespace detail;
  V xc = x > kTanhClamp ? kTanhClamp : x;
  xc = xc < -kTanhClamp ? -kTanhClamp : xc;
  const V z = xc * xc;
  V p = kTanhP[3] * z + kTanhP[2], q = kTanhQ[3] * z + kTanhQ[2];
  p = p * z + kTanhP[1];
  q = q * z + kTanhQ[1];
  p = p * z + kTanhP[0];
  q = q * z + kTanhQ[0];
  p = p * z + 1.0f;
  q = q * z + 1.0f;
  return xc * p / q;
}

__attribute__((always_inline)) inline float tanh_fast(float x) { return tanh_rational(x); }

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSED_LSTM_VEC16_MATH 1
// The same activations on 16 floats at a time, in GCC's generic vectors (acc_t = Vec16, whose
// + - * / and ?: GCC provides), for the forward cell pass of AVX-512 CPUs (lstm_cpu.cpp's
// cell_forward_vec16, compiled for AVX-512 only). GCC vectorises the scalar functions above
// well but cannot look up a table: here exp reduces by ln 2 / 16 and takes 2^(j/16) from a
// 16-entry table in one register permute (__builtin_shuffle), leaving a degree-3 polynomial;
// sigmoid is 1 / (1 + exp(-x)) on it; tanh is tanh_fast's rational function, the same
// operations. No intrinsics and no target attributes, so lstm_cell.h's templates inline them.
// Measured errors and speed: benchmarks/notes/cell-pass.md, "A table exp and a rational tanh".
namespace vec16 {
using Vec16 = float __attribute__((vector_size(64)));
using Int16 = int32_t __attribute__((vector_size(64)));
#define FUSED_LSTM_VEC16_FN __attribute__((always_inline)) inline

// exp(x) = 2^n 2^(j/16) exp(r), k = 16 n + j = round(16 x / ln 2), |r| <= ln 2 / 32. Limits as
// exp_fast's: x clamped to [-88, 88.8] (kLowerClamp false: x known >= 0), 2^n built from n's
// bits is +inf for n = 128 and +0 for n = -127; a NaN fails the clamps' comparisons and flows
// through.
template <bool kLowerClamp>
FUSED_LSTM_VEC16_FN Vec16 exp(Vec16 x) {
  constexpr Vec16 k2j = {1.0f,        1.04427378f, 1.09050773f, 1.13878863f,
                         1.18920712f, 1.24185781f, 1.29683955f, 1.35425555f,
                         1.41421356f, 1.47682615f, 1.54221083f, 1.61049033f,
                         1.68179283f, 1.75625216f, 1.83400809f, 1.91520656f};  // 2^(j/16)
  Vec16 xc = x > 88.8f ? 88.8f : x;
  if (kLowerClamp) xc = xc < -88.0f ? -88.0f : xc;
  // Adding 1.5 * 2^23 rounds 16 x / ln 2 to the integer k, left in t's low mantissa bits.
  const Vec16 t = xc * 23.0831206542234f + 12582912.0f;
  const Vec16 fk = t - 12582912.0f;
  // r = x - k ln 2 / 16, ln 2 / 16 in two parts (k * 0.0433349609375 is exact).
  const Vec16 r = xc - fk * 0.0433349609375f + fk * 1.326215250e-05f;
  // exp(r) ~ 1 + r + r^2 / 2 + r^3 / 6: 9.2e-9 relative at |r| = ln 2 / 32.
  const Vec16 p = ((r * (1.0f / 6.0f) + 0.5f) * r + 1.0f) * r + 1.0f;
  const Int16 ti = reinterpret_cast<const Int16&>(t);
  const Vec16 tj = __builtin_shuffle(k2j, ti & 15);  // j = k mod 16
  const Int16 n = (ti << 10) >> 14;                   // k >> 4, k = t's low 22 bits, signed
  const Int16 scale_bits = (n + 127) << 23;
  return tj * p * reinterpret_cast<const Vec16&>(scale_bits);
}

FUSED_LSTM_VEC16_FN Vec16 sigmoid(Vec16 x) { return 1.0f / (1.0f + exp<true>(-x)); }

FUSED_LSTM_VEC16_FN Vec16 tanh(Vec16 x) { return tanh_rational(x); }

// lstm_cell.h's policy on 16 floats.
struct Math {
  FUSED_LSTM_VEC16_FN static Vec16 sigmoid(Vec16 x) { return vec16::sigmoid(x); }
  FUSED_LSTM_VEC16_FN static Vec16 tanh(Vec16 x) { return vec16::tanh(x); }
};

#undef FUSED_LSTM_VEC16_FN
}  // namespace vec16
#endif

// The math policy handed to lstm_cell.h's templates by the CPU kernels.
template <typename acc_t>
struct FastMath {
  static acc_t exp(acc_t x) { return std::exp(x); }
  static acc_t tanh(acc_t x) { return std::tanh(x); }
  static acc_t sigmoid(acc_t x) { return fused_lstm::sigmoid<acc_t, FastMath>(x); }
};

template <>
struct FastMath<float> {
  __attribute__((always_inline)) static float exp(float x) { return exp_fast(x); }
  __attribute__((always_inline)) static float tanh(float x) { return tanh_fast(x); }
  __attribute__((always_inline)) static float sigmoid(float x) {
    return fused_lstm::sigmoid<float, FastMath>(x);
  }
};

}  // namespace cpu
}  // namespace fused_lstm
