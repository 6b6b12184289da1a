// Thin batches (streaming inference): one parallel region per layer and step.
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "cell.h"
#include "row_wise.h"

namespace fused_lstm {
namespace {

// ---- Thin batches (streaming inference): one parallel region per layer and step ----
// A step of a few rows (one sequence, one step per call) does little besides reading every
// weight once: it is bound by reading W_ih and W_hh (3.4 MB at stream-step, in L3 between
// calls). The row-wise path spends two parallel regions per layer on it (the input projection
// and the recurrent product, each split by columns, gemm) plus a cell pass on one thread.
// Here, each thread owns a contiguous range of hidden units (of every direction of the layer),
// hence their four gate rows of W_ih and W_hh: it computes their pre-activations as dot
// products vectorised along the weight rows (the four gates of a unit and up to four batch rows
// at a time, one set of accumulators for both products), runs the cell for its units
// (cell_forward_block) and writes h_t and c_t, with no synchronisation inside the layer. Steps
// and layers are separated by the end of the region (h_{t-1} needs every unit). OpenMP hands
// chunk i to thread i, so a thread keeps its units, and re-reads the same weight slice, from
// call to call. No projection; float32 and float64, and bfloat16 and float16 models in float32
// arithmetic on the weights as the model holds them: each dot product loads 16-bit weights and
// widens them to float32 (exact), so no float32 copy of the weights is made and half the bytes
// are read. The results are those of the float32 kernel on the weights converted to float32:
// bit for bit for float16, up to the order of the sums for bfloat16 (`dots`).
// Measured (stream-step op, loaded 2-core box, minimum of many samples): ~61-73 -> ~35-41 us
// on 2 threads, ~95 -> ~55 us on 1 (benchmarks/notes/thin-batch.md, "The thin-batch inference
// kernel").
// Which calls take it: plan.h (thin_sizes, kThinMaxBatch, kThinMaxSteps).

// Units go to threads in blocks of this many.
constexpr int64_t kThinUnitBlock = 16;
// A layer's step is split over the threads from this many weights (W_ih and W_hh) on.
constexpr int64_t kThinParallelWork = int64_t{1} << 17;

// One step of one layer (every direction), as the threads read it. W: the weights' storage
// type (T, or bf16 where T is float). Per direction d:
template <typename T, typename W = T>
struct ThinStep {
  int64_t H = 0, in_size = 0;
  int64_t bs[2] = {0, 0};                  // rows active at the step
  const W* w_ih[2] = {};                   // [4H, in_size]
  const W* w_hh[2] = {};                   // [4H, H]
  const T* b_ih[2] = {};                   // [4H] or null
  const T* b_hh[2] = {};
  const T* x[2][kThinMaxRows] = {};            // x_t of each row
  const T* h[2][kThinMaxRows] = {};            // h_{t-1} of each row; null: zero for every row
  T* h_out[2][kThinMaxRows] = {};              // receive h_t (the layer output's rows)
  T* h_state[2] = {};                      // [B, H] receive h_t (h_n)
  T* c_state[2] = {};                      // [B, H] c_{t-1} in, c_t out
  T* gates[2][kThinMaxRows] = {};              // [4H] each: pre-activations, then (training)
                                               // the activated gates: the reserve's rows
  T* cells[2][kThinMaxRows] = {};              // [H] each: receive c_t (training), or null
  bool vec16_cell = false;                 // the plan's
};

namespace thin {

template <typename T, int kBytes>
using VecOf = Vec<T, int(kBytes / sizeof(T))>;

template <typename T, int kBytes>
FUSED_LSTM_INLINE T hsum(VecOf<T, kBytes> v) {
  if constexpr (kBytes == 2 * sizeof(T)) {
    return v[0] + v[1];
  } else {
    using Half = VecOf<T, kBytes / 2>;
    Half lo, hi;
    std::memcpy(&lo, &v, sizeof(Half));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return hsum<T, kBytes / 2>(lo + hi);
  }
}

// The even (kOdd 0) or odd (1) elements of the 2 * kLanes floats lo, hi.
template <int kOdd, int kLanes, size_t... kI>
FUSED_LSTM_INLINE Vec<float, kLanes> deinterleave(Vec<float, kLanes> lo, Vec<float, kLanes> hi,
                                                   std::index_sequence<kI...>) {
  return __builtin_shufflevector(lo, hi, (2 * kI + kOdd)...);
}
template <typename V, typename U>
FUSED_LSTM_INLINE V bit_cast_vec(U u) {
  static_assert(sizeof(V) == sizeof(U));
  V v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSED_LSTM_THIN_ISAS 1
#endif

// kBytes / 4 float16 weights at p widened to float32 (exact) by F16C's vcvtph2ps, as inline
// assembly: dots is compiled for the baseline ISA and inlined into pre_v4 / pre_v3 only, and
// GCC refuses to inline the intrinsics into a function without their target (and GCC 12's
// __builtin_convertvector of _Float16 vectors converts one element at a time). The 64- and
// 32-byte versions run only inside pre_v4 (AVX-512) and pre_v3 (AVX2, which implies F16C); the
// baseline's 16 bytes convert one by one (c10's conversion, the same values).
template <int kBytes>
FUSED_LSTM_INLINE VecOf<float, kBytes> widen_half(const c10::Half* p) {
  VecOf<float, kBytes> v;
#ifdef FUSED_LSTM_THIN_ISAS
  if constexpr (kBytes == 64) {
    asm("vcvtph2ps %1, %0" : "=v"(v) : "m"(*reinterpret_cast<const char(*)[32]>(p)));
    return v;
  } else if constexpr (kBytes == 32) {
    asm("vcvtph2ps %1, %0" : "=x"(v) : "m"(*reinterpret_cast<const char(*)[16]>(p)));
    return v;
  }
#endif
  for (int i = 0; i < kBytes / 4; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}

// acc[r][b] (vector part) and tail[r][b] (the last elements) += the dot product of row r of the
// weights (at w[r], K long) with x[b], for r < kR and b < kNB.
// float16 weights go kLanes at a time, each widened by one vcvtph2ps (widen_half), in the
// float32 kernel's order of sums: the results are the float32 model's on the widened weights,
// bit for bit.
// bf16 weights go 2 * kLanes at a time: one load of kLanes 32-bit words holds an even and an odd
// bf16 each, which a shift (even) and a mask (odd) widen to float32 exactly, against the even
// and odd elements of x (two shuffles per row of x, shared by the kR weight rows): two integer
// operations per 2 * kLanes weights. GCC lowers __builtin_convertvector of 16 bf16 to 32-bit
// lanes as two 256-bit halves (vpmovzxwd twice, vextracti128, vinserti64x4) and a shift, and the
// thin bf16 step was bound by those shuffles, slower than float32 on twice the bytes; a
// two-source word shuffle (vpermt2w) per 16 weights instead was a third slower than this
// (benchmarks/notes/thin-batch.md, "bf16 weights"). The sums go in another order than the
// float32 kernel's on the widened weights (lane i of the even sums holds the elements
// 2i mod 2 * kLanes), so the results are within float32 summation error of it, not equal.
template <typename T, int kBytes, int kR, int kNB, typename W>
FUSED_LSTM_INLINE void dots(const W* const (&w)[kR], int64_t K, const T* const* x,
                            VecOf<T, kBytes> (&acc)[kR][kNB],
                            T (&tail)[kR][kNB]) {
  using V = VecOf<T, kBytes>;
  constexpr int64_t kLanes = kBytes / sizeof(T);
  int64_t k = 0;
  if constexpr (std::is_same_v<T, W> || std::is_same_v<W, c10::Half>) {
    for (; k + kLanes <= K; k += kLanes) {
      V xv[kNB];
      for (int b = 0; b < kNB; ++b) xv[b] = vec_load<T, kLanes>(x[b] + k);
      for (int r = 0; r < kR; ++r) {
        V wv;
        if constexpr (std::is_same_v<T, W>) wv = vec_load<T, kLanes>(w[r] + k);
        else wv = widen_half<kBytes>(w[r] + k);
        for (int b = 0; b < kNB; ++b) acc[r][b] += wv * xv[b];
      }
    }
  } else {
    using U = Vec<uint32_t, kLanes>;
    const U odd_mask = U{} + 0xFFFF0000u;
    for (; k + 2 * kLanes <= K; k += 2 * kLanes) {
      V xe[kNB], xo[kNB];
      for (int b = 0; b < kNB; ++b) {
        const V lo = vec_load<T, kLanes>(x[b] + k), hi = vec_load<T, kLanes>(x[b] + k + kLanes);
        xe[b] = deinterleave<0, kLanes>(lo, hi, std::make_index_sequence<kLanes>{});
        xo[b] = deinterleave<1, kLanes>(lo, hi, std::make_index_sequence<kLanes>{});
      }
      for (int r = 0; r < kR; ++r) {
        const U bits = vec_load<uint32_t, kLanes>(reinterpret_cast<const uint32_t*>(w[r] + k));
        const V we = bit_cast_vec<V>(U(bits << 16)), wo = bit_cast_vec<V>(U(bits & odd_mask));
        for (int b = 0; b < kNB; ++b) {
          acc[r][b] += we * xe[b];
          acc[r][b] += wo * xo[b];
        }
      }
    }
  }
  for (; k < K; ++k)
    for (int r = 0; r < kR; ++r)
      for (int b = 0; b < kNB; ++b) tail[r][b] = std::fma(static_cast<T>(w[r][k]), x[b][k], tail[r][b]);
}

// Pre-activations of the hidden units [j, j + kU) of direction d for the rows [b0, b0 + kNB):
// 4 * kU weight rows against kNB inputs, 4 * kU * kNB independent sums (a few rows take several
// units at once, so that enough sums are in flight to hide the FMA latency).
template <typename T, int kBytes, int kU, int kNB, typename W>
FUSED_LSTM_INLINE void unit_rows(const ThinStep<T, W>& a, int64_t d, int64_t j, int64_t b0) {
  using V = VecOf<T, kBytes>;
  constexpr int kR = 4 * kU;
  const int64_t H = a.H, I = a.in_size;
  V acc[kR][kNB];
  T tail[kR][kNB];
  for (int r = 0; r < kR; ++r)
    for (int b = 0; b < kNB; ++b) {
      acc[r][b] = V{};
      tail[r][b] = T(0);
    }
  // Row r = g * kU + u: gate g of unit j + u.
  const W* w[kR];
  for (int g = 0; g < 4; ++g)
    for (int u = 0; u < kU; ++u) w[g * kU + u] = a.w_ih[d] + (g * H + j + u) * I;
  dots<T, kBytes, kR, kNB, W>(w, I, a.x[d] + b0, acc, tail);
  if (a.h[d][0] != nullptr) {
    for (int g = 0; g < 4; ++g)
      for (int u = 0; u < kU; ++u) w[g * kU + u] = a.w_hh[d] + (g * H + j + u) * H;
    dots<T, kBytes, kR, kNB, W>(w, H, a.h[d] + b0, acc, tail);
  }
  for (int g = 0; g < 4; ++g)
    for (int u = 0; u < kU; ++u) {
      const int64_t col = g * H + j + u;
      const T bias = a.b_ih[d] ? a.b_ih[d][col] + a.b_hh[d][col] : T(0);
      for (int b = 0; b < kNB; ++b)
        a.gates[d][b0 + b][col] =
            (hsum<T, kBytes>(acc[g * kU + u][b]) + tail[g * kU + u][b]) + bias;
    }
}

// The units [j0, j1) of direction d for the rows [b0, b0 + kNB), kU units at a time while kU
// remain.
template <typename T, int kBytes, int kU, int kNB, typename W>
FUSED_LSTM_INLINE void units_of_rows(const ThinStep<T, W>& a, int64_t d, int64_t j0, int64_t j1,
                                     int64_t b0) {
  int64_t j = j0;
  for (; j + kU <= j1; j += kU) unit_rows<T, kBytes, kU, kNB, W>(a, d, j, b0);
  for (; j < j1; ++j) unit_rows<T, kBytes, 1, kNB, W>(a, d, j, b0);
}

// Pre-activations of the units [j0, j1) of direction d, every row of the step; kBytes: the
// vector width, kMaxNB: rows at a time (accumulators: 4 * kMaxNB vectors; one or two rows take
// several units at once instead). Each unit's weights are read once from L2 while its rows go
// through them in blocks.
template <typename T, int kBytes, int kMaxNB, typename W>
FUSED_LSTM_INLINE void units_pre(const ThinStep<T, W>& a, int64_t d, int64_t j0, int64_t j1) {
  const int64_t bs = a.bs[d];
  // One row: bf16 weights, four units at a time where 16 sums fit (the widening's integer
  // operations leave the FMAs' latency exposed with fewer); float32, two (four lost 7% at
  // stream-step: 16 weight rows streamed at once from L3 on top of L2); float16, two (four
  // measured the same at stream-step, within noise).
  constexpr int kOneRowUnits =
      std::is_same_v<W, c10::BFloat16> ? kMaxNB : std::max(1, kMaxNB / 2);
  if (bs == 1) return units_of_rows<T, kBytes, kOneRowUnits, 1, W>(a, d, j0, j1, 0);
  if (kMaxNB >= 4 && bs == 2) return units_of_rows<T, kBytes, kMaxNB / 2, 2, W>(a, d, j0, j1, 0);
  for (int64_t j = j0; j < j1; ++j) {
    int64_t b0 = 0;
    for (; b0 + kMaxNB <= bs; b0 += kMaxNB) unit_rows<T, kBytes, 1, kMaxNB, W>(a, d, j, b0);
    const int64_t rest = bs - b0;
    if (rest >= 3) unit_rows<T, kBytes, 1, 3, W>(a, d, j, b0);
    else if (rest == 2) unit_rows<T, kBytes, 1, 2, W>(a, d, j, b0);
    else if (rest == 1) unit_rows<T, kBytes, 1, 1, W>(a, d, j, b0);
  }
}

// One version per instruction set (vector width and accumulator count differ, so not
// target_clones of one body), chosen at run time by pre_fn.
#ifdef FUSED_LSTM_THIN_ISAS
#define FUSED_LSTM_DEFINE_THIN(T, W)                                                         \
  __attribute__((target("arch=x86-64-v4"))) void pre_v4(const ThinStep<T, W>& a, int64_t d,  \
                                                        int64_t j0, int64_t j1) {         \
    units_pre<T, 64, 4, W>(a, d, j0, j1);                                                    \
  }                                                                                       \
  __attribute__((target("arch=x86-64-v3"))) void pre_v3(const ThinStep<T, W>& a, int64_t d,  \
                                                        int64_t j0, int64_t j1) {         \
    units_pre<T, 32, 2, W>(a, d, j0, j1);                                                    \
  }                                                                                       \
  void pre_base(const ThinStep<T, W>& a, int64_t d, int64_t j0, int64_t j1) {                \
    units_pre<T, 16, 2, W>(a, d, j0, j1);                                                    \
  }
#else
#define FUSED_LSTM_DEFINE_THIN(T, W)                                                         \
  void pre_base(const ThinStep<T, W>& a, int64_t d, int64_t j0, int64_t j1) {                \
    units_pre<T, 16, 2, W>(a, d, j0, j1);                                                    \
  }
#endif
FUSED_LSTM_DEFINE_THIN(float, float)
FUSED_LSTM_DEFINE_THIN(double, double)
FUSED_LSTM_DEFINE_THIN(float, c10::BFloat16)
FUSED_LSTM_DEFINE_THIN(float, c10::Half)
#undef FUSED_LSTM_DEFINE_THIN

template <typename T, typename W>
using PreFn = void (*)(const ThinStep<T, W>&, int64_t, int64_t, int64_t);

// The level of the versions pre_fn picks: 2 pre_v4, 1 pre_v3, 0 pre_base; this CPU's, or
// lower under the tests' cap (convert_16bit.h set_isa_level_cap).
inline int pre_level() {
  static const int best = [] {
#ifdef FUSED_LSTM_THIN_ISAS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 2;
    if (__builtin_cpu_supports("x86-64-v3")) return 1;
#endif
    return 0;
  }();
  const int cap = isa_level_cap();
  return cap >= 0 ? std::min(cap, best) : best;
}

template <typename T, typename W>
PreFn<T, W> pre_fn() {
#ifdef FUSED_LSTM_THIN_ISAS
  switch (pre_level()) {
    case 2: return pre_v4;
    case 1: return pre_v3;
    default: break;
  }
#endif
  return pre_base;
}

}  // namespace thin

// A thread's share of a step: the units [u0, u1) of the layer's D * H (direction-major).
template <typename T, typename W>
void thin_step_units(const ThinStep<T, W>& a, int64_t D, int64_t u0, int64_t u1) {
  const int64_t H = a.H;
  const thin::PreFn<T, W> pre = thin::pre_fn<T, W>();
  for (int64_t d = 0; d < D; ++d) {
    const int64_t j0 = std::max<int64_t>(u0 - d * H, 0), j1 = std::min<int64_t>(u1 - d * H, H);
    if (j0 >= j1) continue;
    pre(a, d, j0, j1);
    const int64_t n = j1 - j0;
    for (int64_t b = 0; b < a.bs[d]; ++b) {
      T* g = a.gates[d][b] + j0;
      T* h = a.h_out[d][b] + j0;
      T* cells = a.cells[d][b] ? a.cells[d][b] + j0 : nullptr;
      cell_forward_block(n, g, g + H, g + 2 * H, g + 3 * H, nullptr, 0, a.c_state[d] + b * H + j0,
                         cells, h, a.vec16_cell);
      std::memcpy(a.h_state[d] + b * H + j0, h, sizeof(T) * n);
    }
  }
}


// inference_impl for the plan's thin variant (same arguments), or with a `reserve` (not null:
// a training call, then `output` is unused) forward_impl's: each layer's output, the activated
// gates and c_t go to the reserve's rows (lstm.h's layout, gates kept), where the backward reads
// them. W: the storage type of W_ih and W_hh (thin_forward below). A bf16 input (kept as given
// with the weights) is widened to float32 into scratch first: [rows, input_size], a few hundred
// elements at most steps.
template <typename T, typename W>
void thin_forward_of(const CpuPlan& plan, const LSTMShape& s, Operand<T> input, const T* hx,
                     const T* cx, const std::vector<at::Tensor>& weights, const T* mask, T* hy,
                     T* cy, T* output, T* reserve) {
  const int64_t H = s.hidden_size, D = s.num_directions, B = s.batch;
  const int64_t out_stride = D * H, layer_numel = s.rows * out_stride;
  at::Tensor buf_t, dropped_buf;
  const int64_t gates_numel = 2 * kThinMaxBatch * 4 * H;
  const int64_t input_numel = input.b ? s.rows * s.input_size : 0;
  T* buf = scratch<T>(buf_t, gates_numel + H + input_numel +
                                 (s.num_layers > 1 && !reserve ? 2 * layer_numel : 0));
  T* zeros = buf + gates_numel;  // h_{t-1} of rows that start without hx
  std::fill_n(zeros, H, T(0));
  if (input.b) {
    T* widened = zeros + H;
    for (int64_t i = 0; i < input_numel; ++i) widened[i] = static_cast<T>(input.b[i]);
    input = Operand<T>{widened};
  }
  T* layer_buf = zeros + H + input_numel;
  T* dropped = (mask && s.num_layers > 1) ? scratch<T>(dropped_buf, layer_numel) : nullptr;
  const bool split = at::get_num_threads() > 1 && !at::in_parallel_region();
  const int64_t units = D * H, blocks = (units + kThinUnitBlock - 1) / kThinUnitBlock;
  const T* prev = nullptr;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const int64_t in_size = s.layer_input_size(l);
    const T* x = layer_input(s, l, input, prev, mask, dropped).f;
    T* layer_out = reserve                 ? reserve + s.layer_out_offset(l)
                   : l + 1 == s.num_layers ? output
                                           : layer_buf + (l % 2) * layer_numel;
    ThinStep<T, W> a;
    a.H = H;
    a.in_size = in_size;
    a.vec16_cell = plan.vec16_cell;
    for (int64_t d = 0; d < D; ++d) {
      const auto w = direction_weights<T>(s, weights, l, d);
      if constexpr (std::is_same_v<T, W>) {
        a.w_ih[d] = w.w_ih;
        a.w_hh[d] = w.w_hh;
      } else {
        a.w_ih[d] = kept_16bit<W>(w.ih);
        a.w_hh[d] = kept_16bit<W>(w.hh);
      }
      TORCH_INTERNAL_ASSERT(a.w_ih[d] != nullptr && a.w_hh[d] != nullptr);
      a.b_ih[d] = w.b_ih;
      a.b_hh[d] = w.b_hh;
      const int64_t ld = l * D + d;
      a.h_state[d] = hy + ld * B * H;
      a.c_state[d] = cy + ld * B * H;
      copy_or_zero(cx ? cx + ld * B * H : nullptr, B * H, a.c_state[d]);
    }
    const bool parallel = split && blocks > 1 && D * 4 * H * (in_size + H) >= kThinParallelWork;
    for (int64_t step = 0; step < s.seq_len; ++step) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t t = time_of(s, d, step);
        const int64_t bs = s.batch_sizes[t], off = s.step_offset[t];
        const int64_t prev_t = d == 0 ? t - 1 : t + 1;
        // Rows that continue from the previous step read its output; the others h0.
        const int64_t continuing = step == 0 ? 0 : s.batch_sizes[prev_t];
        const T* h0 = hx ? hx + (l * D + d) * B * H : nullptr;
        a.bs[d] = bs;
        for (int64_t b = 0; b < bs; ++b) {
          a.gates[d][b] = reserve ? reserve + s.gates_offset(l, d) + (off + b) * 4 * H
                                  : buf + (d * kThinMaxBatch + b) * 4 * H;
          a.cells[d][b] = reserve ? reserve + s.cells_offset(l, d) + (off + b) * H : nullptr;
          a.x[d][b] = x + (off + b) * in_size;
          a.h_out[d][b] = layer_out + (off + b) * out_stride + d * H;
          a.h[d][b] = b < continuing ? layer_out + (s.step_offset[prev_t] + b) * out_stride + d * H
                                     : (h0 ? h0 + b * H : (step == 0 ? nullptr : zeros));
        }
      }
      if (parallel) {
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          thin_step_units(a, D, b0 * kThinUnitBlock, std::min(b1 * kThinUnitBlock, units));
        });
      } else {
        thin_step_units(a, D, 0, units);
      }
    }
    prev = layer_out;
  }
}

// thin_forward_of for the plan's thin variant: W_ih and W_hh in the math dtype, or, for a
// bfloat16 or float16 model (float32 math), kept as the model holds them (plan.keep_16bit),
// which the dot products widen as they read them. `reserve`: null for inference.
template <typename T>
void thin_forward(const CpuPlan& plan, const LSTMShape& s, Operand<T> input, const T* hx,
                  const T* cx, const std::vector<at::Tensor>& weights, const T* mask, T* hy,
                  T* cy, T* output, T* reserve) {
  if constexpr (std::is_same_v<T, float>) {
    if (plan.keep_16bit && weights[0].scalar_type() == at::kHalf)
      return thin_forward_of<T, c10::Half>(plan, s, input, hx, cx, weights, mask, hy, cy,
                                           output, reserve);
    if (plan.keep_16bit)
      return thin_forward_of<T, c10::BFloat16>(plan, s, input, hx, cx, weights, mask, hy, cy,
                                               output, reserve);
  }
  thin_forward_of<T, T>(plan, s, input, hx, cx, weights, mask, hy, cy, output, reserve);
}

}  // namespace
}  // namespace fused_lstm
