// The hidden split of the row-wise inference steps: instead of each thread running every step
// for its slice of the batch against all 4H gate columns (for_each_batch_slice, reading all of
// W_hh^T every step), each thread owns a slice of the hidden units: their four gates' columns
// of W_hh^T (a slice that can stay in the core's L2 from step to step) and every batch row.
// It runs the recurrent product for those columns and the cell pass for its units, then waits
// for the other threads (h_t must be complete before step t+1 reads it): one barrier per step.
// Inference only, every step with every row (no packed lengths), no projection (proj_size 0),
// the projection unfused (one GEMM per chunk of steps, before them); float32 on brgemm's packed
// panels, or a bfloat16 model's products on AMX tiles. Which calls take it: plan.h
// (hidden_split_layer; the setting allow_hidden_split). Measured: benchmarks/notes/float32-bound.md, "The hidden split on the
// Intel Xeon, float32 and bf16".
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "row_wise.h"

#include <atomic>
#include <thread>

namespace fused_lstm {
namespace {

// A spin barrier for the threads of one parallel region. A thread may run several slices of
// the work (a smaller team than asked for): it arrives for all of them at once (`weight`), and
// the barrier opens when every slice has arrived. Spins with pause, then yields: on a shared
// machine the other thread may be descheduled, and spinning would only take its core.
struct SliceBarrier {
  explicit SliceBarrier(int64_t slices) : total(slices) {}
  void arrive_and_wait(int64_t weight) {
    const int64_t gen = generation.load(std::memory_order_acquire);
    if (arrived.fetch_add(weight, std::memory_order_acq_rel) + weight == total) {
      arrived.store(0, std::memory_order_relaxed);
      generation.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int64_t spins = 0; generation.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < kSpinsBeforeYield) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }
  // A pause is ~40-140 cycles (by core): this many spin for ~1-10 us, about the barrier's
  // wait on a quiet machine, before a wait that long means the other thread is not running.
  static constexpr int64_t kSpinsBeforeYield = 256;
  std::atomic<int64_t> arrived{0};
  std::atomic<int64_t> generation{0};
  const int64_t total;
};

// The units [u0, u1) of slice `slice` of `slices`.
inline std::pair<int64_t, int64_t> hidden_slice_units(int64_t H, int64_t slice, int64_t slices) {
  const int64_t blocks = (H + kHiddenSplitUnitBlock - 1) / kHiddenSplitUnitBlock;
  const int64_t b0 = slice * blocks / slices, b1 = (slice + 1) * blocks / slices;
  return {std::min(H, b0 * kHiddenSplitUnitBlock), std::min(H, b1 * kHiddenSplitUnitBlock)};
}

// C[m, c0:c1] += A[m, k] B[k, c0:c1], B being rows [k0, k0 + k) of brgemm's packed weights
// (use_brgemm: panels of kBrgemmPanelN of the G columns), for any column range.
inline void brgemm_columns(int64_t m, int64_t c0, int64_t c1, int64_t G, int64_t k,
                           const float* a, int64_t lda, const DirectionWeights<float>& w,
                           int64_t k0, float* c, int64_t ldc) {
  const int64_t k_total = w.k_ih + w.out;
  for (int64_t n0 = c0 / kBrgemmPanelN * kBrgemmPanelN; n0 < c1; n0 += kBrgemmPanelN) {
    const int64_t nb = std::min(kBrgemmPanelN, G - n0);
    const int64_t lo = std::max(c0, n0), hi = std::min(c1, n0 + nb);
    for (int64_t m0 = 0; m0 < m; m0 += kBrgemmBlockM)
      at::native::cpublas::brgemm(std::min(kBrgemmBlockM, m - m0), hi - lo, k, lda, nb, ldc, true,
                                  a + m0 * lda, w.w_packed + n0 * k_total + k0 * nb + (lo - n0),
                                  c + m0 * ldc + lo, false);
  }
}

// The same on AMX tiles: B packed by amx_pack (panels of kAmxPanelN columns in oneDNN's VNNI
// layout, pairs of rows interleaved, so column j of a panel starts 2 j elements in).
inline void amx_columns(int64_t m, int64_t c0, int64_t c1, int64_t k, const c10::BFloat16* a,
                        int64_t lda, const c10::BFloat16* packed, float* c, int64_t ldc) {
  const BrgemmBf16 product = &at::native::cpublas::brgemm;
  const int64_t k_even = amx_k_even(k);
  for (int64_t n0 = c0 / kAmxPanelN * kAmxPanelN; n0 < c1; n0 += kAmxPanelN) {
    const int64_t lo = std::max(c0, n0), hi = std::min(c1, n0 + kAmxPanelN);
    for (int64_t m0 = 0; m0 < m; m0 += kAmxBlockM)
      product(std::min(kAmxBlockM, m - m0), hi - lo, k, lda, kAmxPanelN, ldc, true,
              a + m0 * lda, packed + n0 * k_even + 2 * (lo - n0), c + m0 * ldc + lo, true);
  }
}

// Chunks of steps that ran hidden_steps in this process (the test hook
// fused_lstm::_hidden_split_chunks reads it: which split a call ran leaves no other trace, the
// two giving the same results).
inline std::atomic<int64_t>& hidden_split_chunks() {
  static std::atomic<int64_t> n{0};
  return n;
}

// Room for hidden_steps' bf16 copies of h (AMX only): two [B, H] buffers.
inline int64_t hidden_split_scratch(const LSTMShape& s) { return 2 * s.batch * s.out_size; }

// Forward steps [first, last] of direction d for every row, the units split over the threads
// (see the top of this file). As forward_steps (row_wise.h) with r0 = 0, r1 = batch, where every
// step has every row: h_t goes into the layer output, h_state receives the last step's, and
// c_state is updated in place. rows_of(t): step t's StepRows (gates: the projection, without
// the bias). h_zero: h_state is zero at step `first` (no product then). hb: hidden_split_scratch
// bf16 elements (AMX), else null.
template <typename RowsOf>
void hidden_steps(const CpuPlan& plan, const LSTMShape& s, const DirectionWeights<float>& w,
                  int64_t d, int64_t first, int64_t last, float* h_state, float* c_state,
                  const RowsOf& rows_of, bool h_zero, c10::BFloat16* hb) {
  hidden_split_chunks().fetch_add(1, std::memory_order_relaxed);
  const int64_t H = s.hidden_size, G = 4 * H, B = s.batch;
  const int64_t out_stride = s.num_directions * H;
  const bool amx = w.amx_hh != nullptr;
  const int64_t slices = std::min<int64_t>(at::get_num_threads(),
                                           (H + kHiddenSplitUnitBlock - 1) / kHiddenSplitUnitBlock);
  SliceBarrier barrier(slices);
  // h as bf16 rows for the tiles: this slice's units of h (rows ld apart) into hb's buffer `which`.
  auto to_bf16 = [&](const float* h, int64_t ld, int64_t u0, int64_t u1, int which) {
    round_bf16_rows(h + u0, ld, B, u1 - u0, hb + which * B * H + u0, H);
  };
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    const int64_t weight = s1 - s0;
    const float* h_prev = h_zero ? nullptr : h_state;
    int64_t ld_prev = H;
    int which = 0;  // hb's buffer holding h_prev
    if (amx && h_prev) {
      for (int64_t sl = s0; sl < s1; ++sl) {
        const auto [u0, u1] = hidden_slice_units(H, sl, slices);
        to_bf16(h_prev, ld_prev, u0, u1, which);
      }
      barrier.arrive_and_wait(weight);
    }
    for (int64_t step = first; step <= last; ++step) {
      const int64_t t = time_of(s, d, step);
      const StepRows<float> p = rows_of(t);
      for (int64_t sl = s0; sl < s1; ++sl) {
        const auto [u0, u1] = hidden_slice_units(H, sl, slices);
        if (h_prev)
          for (int64_t k = 0; k < 4; ++k) {
            if (amx)
              amx_columns(B, k * H + u0, k * H + u1, H, hb + which * B * H, H, w.amx_hh, p.gates, G);
            else
              brgemm_columns(B, k * H + u0, k * H + u1, G, H, h_prev, ld_prev, w, 0, p.gates, G);
          }
        for (int64_t b = 0; b < B; ++b) {
          float* g = p.gates + b * G;
          cell_forward_block(u1 - u0, g + u0, g + H + u0, g + 2 * H + u0, g + 3 * H + u0,
                             w.bias ? w.bias + u0 : nullptr, H, c_state + b * H + u0, nullptr,
                             p.layer_out + b * out_stride + u0, plan.vec16_cell);
        }
        if (amx && step < last) to_bf16(p.layer_out, out_stride, u0, u1, 1 - which);
      }
      h_prev = p.layer_out;
      ld_prev = out_stride;
      which = 1 - which;
      if (step < last) barrier.arrive_and_wait(weight);
    }
    // h_n: this slice's units of the last step's h (no other thread reads them in this region).
    for (int64_t sl = s0; sl < s1 && h_prev != nullptr && h_prev != h_state; ++sl) {
      const auto [u0, u1] = hidden_slice_units(H, sl, slices);
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(h_state + b * H + u0, h_prev + b * ld_prev + u0, (u1 - u0) * sizeof(float));
    }
    if (amx) amx_release();
  });
}

}  // namespace
}  // namespace fused_lstm
