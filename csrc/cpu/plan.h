// The kernel choice of a CPU call, in one place: which variant runs it and why.
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "bf16_gemm.h"
#include "blas.h"
#include "fast_math.h"

namespace fused_lstm {
namespace {

// Gates are stored row-major, [rows, 4H]: gate k of row b is the run g[b*4H + kH, +H). From
// this hidden size on, each row's runs are long enough to vectorise in place; below it, a layer
// runs in the batch-fastest layout of tiny_forward_steps / tiny_backward_steps.
constexpr int64_t kRowWiseHidden = 16;

// Multiply-adds of recurrent work from which the batch is split over threads (each thread runs
// all steps for its rows: one parallel region instead of two per step), as long as one step's
// product is below kOneDnnMinWork: larger ones run faster as one GEMM parallel inside
// (measured, 2 threads: fastrnns infer 159 ms unsplit vs 181 ms split; NOTES.md section 6).
constexpr int64_t kSplitBatchWork = int64_t{1} << 20;

// body(r0, r1) over slices of [0, batch): one per thread when the recurrence of `steps` steps
// is worth a parallel region, else the whole batch on this thread.
// With brgemm (`single_thread_fast`) a slice's product runs at full speed at any size.
inline int64_t batch_slices(const LSTMShape& s, int64_t steps, bool single_thread_fast) {
  const int64_t threads = at::get_num_threads();
  const int64_t step_work = s.batch * 4 * s.hidden_size * (s.out_size + 8);
  if (threads > 1 && s.batch > 1 && steps * step_work >= kSplitBatchWork &&
      (single_thread_fast || step_work < kOneDnnMinWork) && !at::in_parallel_region())
    return std::min(threads, s.batch);
  return 1;
}

template <typename F>
void for_each_batch_slice(const LSTMShape& s, int64_t steps, bool single_thread_fast,
                          const F& body) {
  const int64_t slices = batch_slices(s, steps, single_thread_fast);
  if (slices > 1) at::parallel_for(0, s.batch, (s.batch + slices - 1) / slices, body);
  else body(0, s.batch);
}

// The input projection fused into each step's brgemm (g_t = b + x_t W_ih^T + h_{t-1} W_hh^T on
// the thread that runs the step: all of a layer's arithmetic at the micro-kernel's rate in one
// parallel region, no projection GEMM, no chunk buffer), instead of one GEMM over every step
// before them. But each step then streams W_ih as well as W_hh, which a thread's slice of a few
// rows does not pay for once the weights spill out of its L2: fused only where the slice has a
// row per kFuseWeightBytesPerRow of packed weights (measured, 1 thread, hidden 512, 100 steps:
// 16 rows 76 vs 71 ms unfused, 32 rows even, 64 rows 259 vs 271 ms; hidden 256, 2 layers:
// 2 rows 6.7 vs 5.4 ms, 4 rows even, 8 rows 16.0 vs 17.2 ms).
// The same for bf16_gemm's bf16 weights (weight_size: bytes per packed weight, 2 against
// brgemm's 4).
// FUSED_LSTM_UNFUSED_INPUT=1 turns it off (read per call, for A/B measurements and tests).
constexpr int64_t kFuseWeightBytesPerRow = int64_t{1} << 18;

inline bool fuse_input_projection(const LSTMShape& s, int64_t layer, int64_t weight_size) {
  const char* off = std::getenv("FUSED_LSTM_UNFUSED_INPUT");
  if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
  const int64_t slices = batch_slices(s, s.seq_len, true);
  const int64_t slice_rows = (s.batch + slices - 1) / slices;
  const int64_t weight_bytes =
      weight_size * 4 * s.hidden_size * (s.layer_input_size(layer) + s.out_size);
  return slice_rows * kFuseWeightBytesPerRow >= weight_bytes;
}

// Scratch for use_brgemm, or null where brgemm is not used: other dtypes, small hidden sizes,
// and a single step (one product does not pay for the transpose).
template <typename T>
T* brgemm_buffer(const LSTMShape& s, at::Tensor& holder) {
  if (!std::is_same_v<T, float> || s.hidden_size < kRowWiseHidden || s.seq_len < 2 ||
      !brgemm_available())
    return nullptr;
  const int64_t in_max = std::max(s.input_size, s.num_directions * s.out_size);
  return scratch<T>(holder, 4 * s.hidden_size * (s.out_size + in_max));
}

// Whether a call's products go through bf16_gemm (forward and backward): bfloat16 models on
// CPUs with AVX512_BF16, not small hidden sizes, not a single step (packing costs a pass over
// the weights).
inline bool use_bf16_products(const LSTMShape& s, bool bf16_model) {
  return bf16_model && s.hidden_size >= kRowWiseHidden && s.seq_len >= 2 && bf16_gemm_available();
}

// 1 and 2 threads; with and without brgemm), so several steps take this kernel up to
// kThinMaxSteps while the input is not larger than twice the hidden size.
constexpr int64_t kThinMaxSteps = 32;
// Units go to threads in blocks of this many.
constexpr int64_t kThinUnitBlock = 16;

// Where thin_inference runs: batches of at most kThinRows rows, hidden sizes of the row-wise
// path, no projection; one step, or up to kThinMaxSteps steps with input_size <= 2 * hidden.
// FUSED_LSTM_NO_THIN=1 turns it off (read once).
bool thin_enabled() {
  static const bool enabled = [] {
    const char* off = std::getenv("FUSED_LSTM_NO_THIN");
    return off == nullptr || off[0] == '\0' || off[0] == '0';
  }();
  return enabled;
}

bool thin_applies(const LSTMShape& s) {
  return s.proj_size == 0 && s.hidden_size >= kRowWiseHidden && s.batch >= 1 &&
      s.batch <= kThinRows && s.seq_len >= 1 &&
      (s.seq_len == 1 || (s.seq_len <= kThinMaxSteps && s.input_size <= 2 * s.hidden_size)) &&
      thin_enabled();
}

#ifdef FUSED_LSTM_VEC16_MATH
// Whether this CPU takes cell_forward_vec16 (checked once; FUSED_LSTM_NO_VEC16_CELL=1 turns it
// off, read at the first call: tests run the generic pass in a process started with it).
inline bool use_vec16_cell() {
  static const bool use = [] {
    const char* off = std::getenv("FUSED_LSTM_NO_VEC16_CELL");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  }();
  return use;
}
#endif

// A bfloat16 call's input, W_ih and W_hh stay bf16 (no float copies: lstm.h, KeepBf16) where
// every product that reads them is a bf16 one: the bf16 products, and not the thin kernel
// (float32 dot products; inference only, but the forward and backward ops decide alike).
bool keep_bf16_cpu(const LSTMShape& s) { return use_bf16_products(s, true) && !thin_applies(s); }

}  // namespace
}  // namespace fused_lstm
