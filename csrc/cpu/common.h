// Small helpers every CPU kernel uses: scratch buffers, row copies and transposes, the
// parallel row loop, GCC vectors, and Operand (a matrix in the math dtype or kept bf16).
// Part of the one translation unit lstm_cpu.cpp (see the top of that file).
#pragma once

#include "../lstm.h"

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

// Vectors (GCC's vector_size) go by value only between always-inline functions here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <algorithm>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace fused_lstm {
namespace {

// The fused passes are parallel over batch rows once a step has enough work to pay for it.
constexpr int64_t kParallelElements = 1 << 14;

template <typename F>
void for_each_row(int64_t rows, int64_t row_elements, const F& body) {
  if (rows * row_elements >= kParallelElements && rows > 1) {
    const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, row_elements));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) body(b);
    });
  } else {
    for (int64_t b = 0; b < rows; ++b) body(b);
  }
}

// target_clones: compiled for baseline x86-64 and, chosen at run time, AVX2+FMA and AVX-512.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSED_LSTM_SIMD_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FUSED_LSTM_SIMD_CLONES
#endif

// GCC's vectors of V elements (whole registers, or parts of them, on every target the clones
// are built for); passed by value only between always-inline functions (-Wpsabi, off at the top
// of this file, warns about an ABI that no call here goes through).
template <typename T, int V>
using Vec [[gnu::vector_size(V * sizeof(T))]] = T;

template <typename T, int V>
__attribute__((always_inline)) inline Vec<T, V> vec_load(const T* p) {
  Vec<T, V> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, int V>
__attribute__((always_inline)) inline void vec_store(T* p, const Vec<T, V>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols; src null: zeros.
template <typename T>
void transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src ? src[r * ld_src + c] : T(0);
}

// Copies a [rows, cols] block between two row strides. Short rows (a small hidden size) are
// copied column by column: one memcpy call per row would cost more than the copy itself.
template <typename T>
void copy_rows(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t rows,
               int64_t cols) {
  if (cols >= 16) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * dst_stride, src + r * src_stride, sizeof(T) * cols);
    return;
  }
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t r = 0; r < rows; ++r) dst[r * dst_stride + j] = src[r * src_stride + j];
}

// dst = src, or zeros where an optional tensor (initial state, upstream gradient) is absent.
template <typename T>
void copy_or_zero(const T* src, int64_t n, T* dst) {
  if (src) std::memcpy(dst, src, sizeof(T) * n);
  else std::fill_n(dst, n, T(0));
}

// A matrix that the bf16 products may read: rows in the math dtype, or (for a bfloat16 model,
// where the op keeps them as the caller gave them: lstm.h Keep16) bf16 rows, which only
// bf16_gemm and the bf16 packing read. bf16_gemm rounds a float operand to bf16 as it reads it,
// so both give the same products. Or, for a float16 model's W_ih and W_hh kept as given (the
// thin kernel, the backward's widening a layer at a time), float16 rows, which only those read.
// At most one pointer is set.
template <typename T>
struct Operand {
  const T* f = nullptr;
  const c10::BFloat16* b = nullptr;
  const c10::Half* h = nullptr;
  Operand at(int64_t offset) const {
    return {f ? f + offset : nullptr, b ? b + offset : nullptr, h ? h + offset : nullptr};
  }
  explicit operator bool() const { return f != nullptr || b != nullptr || h != nullptr; }
};

template <typename T>
Operand<T> operand(const at::Tensor& t) {
  if (!t.defined()) return {};
  if (t.scalar_type() == at::kBFloat16) return {nullptr, t.const_data_ptr<c10::BFloat16>()};
  if (t.scalar_type() == at::kHalf) return {nullptr, nullptr, t.const_data_ptr<c10::Half>()};
  return {t.const_data_ptr<T>()};
}

// fn(p) with the pointer that is set (for the bf16 products' overloads: never float16).
template <typename T, typename F>
void visit(const Operand<T>& o, F&& fn) {
  TORCH_INTERNAL_ASSERT(o.h == nullptr);
  if (o.b) fn(o.b);
  else fn(o.f);
}

// fn(p) with the kept 16-bit pointer (bf16 or fp16) of an operand that holds one.
template <typename T, typename F>
void with_kept_16bit(const Operand<T>& o, F&& fn) {
  TORCH_INTERNAL_ASSERT(o.b != nullptr || o.h != nullptr);
  if (o.b) fn(o.b);
  else fn(o.h);
}

// The pointer of a kept 16-bit operand, as W (c10::BFloat16 or c10::Half).
template <typename W, typename T>
const W* kept_16bit(const Operand<T>& o) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) return o.b;
  else return o.h;
}

// n values given bf16 or fp16 (a kept weight or operand), widened into `buf` (float, exact),
// over the threads outside a parallel region.
template <typename T, typename S>
const T* widened(const S* w, int64_t n, T* buf) {
  at::parallel_for(0, n, kParallelElements, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, float>) widen_16bit(w + begin, end - begin, buf + begin);
    else
      for (int64_t i = begin; i < end; ++i) buf[i] = static_cast<T>(w[i]);
  });
  return buf;
}

// The same into this thread's buffer, for a few rows that one product reads right away (the
// buffer is reused by the thread's next call).
template <typename W>  // c10::Half or c10::BFloat16
const float* widened_on_this_thread(const W* w, int64_t n) {
  static thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  widen_16bit(w, n, buf.data());
  return buf.data();
}

// Step t in processing order `step` of direction d.
inline int64_t time_of(const LSTMShape& s, int64_t direction, int64_t step) {
  return direction == 0 ? step : s.seq_len - 1 - step;
}

// The step before time t in direction d's processing order (t - 1 forward, t + 1 backward),
// and how many of t's rows continue from it (rows that start at t read the initial state):
// prev.t is -1 where t is the direction's first step, and then prev.continuing is 0.
struct PrevStep {
  int64_t t = -1, continuing = 0;
};
inline PrevStep prev_step(const LSTMShape& s, int64_t direction, int64_t t) {
  const int64_t prev_t = direction == 0 ? t - 1 : t + 1;
  if (prev_t < 0 || prev_t >= s.seq_len) return {};
  return {prev_t, std::min(s.batch_sizes[t], s.batch_sizes[prev_t])};
}

// c_{t-1} of rows [r0, r0 + n) of step t as one contiguous [n, H] block: a run of the reserve's
// cells when every row continues a sequence, else pieced together in `buf` (at row r0) with c0
// for the rows that start here (only the reverse direction of a packed batch has both kinds in
// one step).
template <typename T>
const T* step_c_prev(const LSTMShape& s, int64_t direction, int64_t t, int64_t r0, int64_t n,
                     const T* cells, const T* c0, T* buf) {
  const int64_t H = s.hidden_size;
  if (direction == 0) return (t > 0 ? cells + s.step_offset[t - 1] * H : c0) + r0 * H;
  if (t + 1 == s.seq_len) return c0 + r0 * H;
  const int64_t continuing = s.batch_sizes[t + 1];
  const T* prev = cells + s.step_offset[t + 1] * H;
  if (r0 + n <= continuing) return prev + r0 * H;
  if (r0 >= continuing) return c0 + r0 * H;
  T* dst = buf + r0 * H;
  std::memcpy(dst, prev + r0 * H, sizeof(T) * (continuing - r0) * H);
  std::memcpy(dst + (continuing - r0) * H, c0 + continuing * H,
              sizeof(T) * (r0 + n - continuing) * H);
  return dst;
}

// Whether every step has every row (no packed lengths): batch sizes never increase.
inline bool every_step_full(const LSTMShape& s) {
  return s.batch_sizes[0] == s.batch_sizes[s.seq_len - 1];
}

template <typename T>
T* scratch(at::Tensor& holder, int64_t numel) {
  holder = cpu_cached_empty(numel, c10::CppTypeToScalarType<T>::value);
  return holder.mutable_data_ptr<T>();
}

// n float16 values widened into `holder` (allocated at the first need, at least n; exact).
template <typename T>
const T* widened_into(const c10::Half* src, int64_t n, at::Tensor& holder) {
  if (!holder.defined() || holder.numel() < n) scratch<T>(holder, n);
  return widened(src, n, holder.mutable_data_ptr<T>());
}

// Rows [row0, row0 + rows) of an operand of n columns as a product reads them: a float16 one
// kept by the op widened into `holder`, any other (float, or bf16 for the bf16 products) in
// place.
template <typename T>
Operand<T> rows_for_product(const Operand<T>& x, int64_t row0, int64_t rows, int64_t n,
                            at::Tensor& holder) {
  if (x.h) return {widened_into<T>(x.h + row0 * n, rows * n, holder)};
  return x.at(row0 * n);
}

// A call's scratch buffers: add() each piece with its pointer, then allocate() sets every
// pointer (a piece of 0 elements gets nullptr); the pieces live as long as this object. Pieces
// under kOwnBlockBytes share one allocation (each on a 64-byte boundary), larger ones get a
// block each (scratch() above, recycled as before). At the tutorial sizes every piece is small,
// and each allocation saved is ~0.2-0.4 us of a ~100 us training call; from 64 KB a piece's
// own allocation is far below the work that writes it, and the separate blocks keep what the
// memory tests see of the large buffers (benchmarks/notes/python-overhead.md, "Allocations
// and copies per training call").
template <typename T>
class ScratchPieces {
 public:
  void add(T** ptr, int64_t numel) {
    *ptr = nullptr;
    if (numel > 0) pieces_.push_back({ptr, numel});
  }
  void allocate() {
    int64_t shared = 0;
    for (const Piece& p : pieces_)
      if (!own_block(p.numel)) shared += aligned(p.numel);
    T* base = shared > 0 ? scratch<T>(holders_.emplace_back(), shared) : nullptr;
    for (const Piece& p : pieces_) {
      if (own_block(p.numel)) {
        *p.ptr = scratch<T>(holders_.emplace_back(), p.numel);
      } else {
        *p.ptr = base;
        base += aligned(p.numel);
      }
    }
  }

 private:
  static constexpr int64_t kOwnBlockBytes = int64_t{64} << 10;
  static constexpr int64_t kAlign = std::max<int64_t>(1, 64 / int64_t(sizeof(T)));
  static bool own_block(int64_t numel) { return numel * int64_t(sizeof(T)) >= kOwnBlockBytes; }
  static int64_t aligned(int64_t numel) { return (numel + kAlign - 1) / kAlign * kAlign; }
  struct Piece {
    T** ptr;
    int64_t numel;
  };
  c10::SmallVector<Piece, 16> pieces_;
  c10::SmallVector<at::Tensor, 8> holders_;
};

}  // namespace
}  // namespace fused_lstm
