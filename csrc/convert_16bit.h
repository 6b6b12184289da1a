// bfloat16 / float16 <-> float32 on the CPU (convert_16bit.cpp).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace at {
class Tensor;
}

namespace fused_lstm {

// The 16-bit floating types, which the CPU kernels compute in float32.
inline bool is_16bit(at::ScalarType st) { return st == at::kBFloat16 || st == at::kHalf; }

// Without an ATen conversion op per tensor: a call at the small sizes converts a dozen tensors, and each `to` cost ~1 us, more
// than the kernels (benchmarks/notes/bf16.md, "bf16 at the small sizes: one conversion pass per
// call"; benchmarks/notes/fp16.md).
// widen_to_float: the bfloat16 or float16 CPU tensor `src` (any strides) as src.numel() floats,
// in src's element order, at dst (exact: every bf16 and fp16 value is a float32 value).
void widen_to_float(const at::Tensor& src, float* dst);
// widen_16bit: n contiguous bf16 or fp16 values at src (c10::BFloat16 / c10::Half) to floats at
// dst, on this thread (the kernels' widening of kept weights, a row or a layer at a time).
void widen_16bit(const c10::BFloat16* src, int64_t n, float* dst);
void widen_16bit(const c10::Half* src, int64_t n, float* dst);
// round_bf16: n floats rounded to bf16 as round_to rounds them, on this thread (an A operand's
// rows for the AMX tiles).
void round_bf16(const float* src, int64_t n, c10::BFloat16* dst);
// round_to: n floats rounded to `dtype` as torch's .to(dtype) rounds them on the CPU. bfloat16
// bit for bit: to nearest even, denormals kept, every NaN to 0xFFFF. float16: F16C's vcvtps2ph
// where the CPU has it, as torch's vectorised conversion (to nearest even, denormals kept,
// overflow to infinity). Split over threads when long.
void round_to(const float* src, int64_t n, at::ScalarType dtype, void* dst);
// Test hooks, so that each version is checked on a CPU that would pick a wider one: cap the
// vector ISA of the versions chosen at run time by CPU feature (the float16 conversions here
// and the thin kernel's dot products, cpu/thin.h) at `level`: 0 the baseline (x86-64, scalar
// float16 conversions), 1 AVX2 (x86-64-v3, with F16C), 2 AVX-512 (x86-64-v4); a cap above
// this CPU's level runs this CPU's; -1 removes the cap. Returns the cap before (-1: none).
// half_conversion_isa: the level of the float16 conversions now in effect.
int set_isa_level_cap(int level);
int isa_level_cap();
int half_conversion_isa();

}  // namespace fused_lstm
