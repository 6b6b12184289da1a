// What one block of the persistent kernels does in one phase of one step, written once for the
// GPU (lstm_persistent.cu) and for the CPU emulation (tests/test_cuda_compile.py), which runs
// "every block of a phase, then the next phase" to check the index arithmetic and the algorithm
// against the CPU kernels where no GPU is present. The cell math is lstm_step.cuh's per-element
// functions, i.e. lstm_cell.h's.
//
// `Block` is how the threads of one block are run (lstm_persistent.cu's DeviceBlock on the GPU,
// the emulation's HostBlock on the CPU):
//   blk.nthreads                           threads of the block
//   blk.sync()                             __syncthreads()
//   blk.for_each_thread(f)                 f(tid) for this thread (GPU) / every thread (CPU)
//   blk.for_each_team<Acc>(k_split, items, partial, finish)
//       teams of k_split consecutive lanes take work items round-robin; per item every lane
//       runs partial(item, lane, acc) on a zeroed acc, the team sums acc over its lanes (a
//       butterfly: every lane then holds the same sum, bit for bit), every lane runs
//       finish(item, lane, acc). Every lane of a warp takes part in every round.
// The grid barrier is not here: the kernels (and the emulation's loops) put it between calls.
#pragma once

#include "../lstm_cell.h"
#include "lstm_kernels.h"
#include "lstm_persistent.h"
#include "lstm_step.cuh"

#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_LSTM_PERSISTENT_FN __device__ __forceinline__
#define FUSED_LSTM_UNROLL _Pragma("unroll")
#else
#define FUSED_LSTM_PERSISTENT_FN inline
#define FUSED_LSTM_UNROLL
#endif

namespace fused_lstm {
namespace gpu {

// Accumulators of one lane: kPersistentRowsPerThread rows x N outputs.
template <typename T, int N>
struct Acc {
  T v[N];
};

// A value written by another block during this launch (before the last grid barrier): read
// through L2 (ld.global.cg), never from a possibly stale L1 line.
template <typename T>
FUSED_LSTM_PERSISTENT_FN T load_from_grid(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// f(r, c) for e = first, first + stride, ... < rows * cols, with (r, c) = (e / cols, e % cols)
// kept up to date by additions: no division per element (64-bit division is dozens of
// instructions on a GPU, and these loops run every step).
template <typename F>
FUSED_LSTM_PERSISTENT_FN void for_each_2d(int first, int stride, int rows, int cols, F&& f) {
  int r = first / cols, c = first - r * cols;
  const int dr = stride / cols, dc = stride - dr * cols;
  while (r < rows) {
    f(r, c);
    r += dr;
    c += dc;
    if (c >= cols) {
      c -= cols;
      ++r;
    }
  }
}

// acc[g * R + r] += sum over k = k0, k0 + k_step, ... < K of w[g * gate_stride + k] * x[r * xs + k]
// (R = kPersistentRowsPerThread rows of x, kGates rows of w).
template <typename T, int kGates, int N>
FUSED_LSTM_PERSISTENT_FN void partial_dot(const T* w, int64_t gate_stride, const T* x,
                                          int64_t x_stride, int K, int k0, int k_step,
                                          Acc<T, N>& acc) {
  constexpr int R = kPersistentRowsPerThread;
  static_assert(N == kGates * R, "accumulator size");
  for (int k = k0; k < K; k += k_step) {
    T wv[kGates];
    FUSED_LSTM_UNROLL
    for (int g = 0; g < kGates; ++g) wv[g] = w[g * gate_stride + k];
    FUSED_LSTM_UNROLL
    for (int r = 0; r < R; ++r) {
      const T xv = x[r * x_stride + k];
      FUSED_LSTM_UNROLL
      for (int g = 0; g < kGates; ++g) acc.v[g * R + r] += wv[g] * xv;
    }
  }
}

// ---- Forward -------------------------------------------------------------------------------------

// Once per launch: the block's W_hh rows into shared memory, gate-major:
//   w_s[(g*U + u) * w_stride + k] = W_hh[g*H + j0 + u, k]   (zero beyond H in u and k).
template <typename T, typename Block>
FUSED_LSTM_PERSISTENT_FN void forward_stage_weights(const PersistentForward<T>& p, int d,
                                                    int block, T* smem, const Block& blk) {
  const int64_t H = p.hidden, U = p.plan.units, ws = p.plan.w_stride;
  const int64_t j0 = block * U, n = p.plan.w_rows * ws;
  const T* w = p.w_hh[d];
  blk.for_each_thread([&](int tid) {
    for (int64_t e = tid; e < n; e += blk.nthreads) {
      const int64_t row = e / ws, k = e - row * ws;
      const int64_t g = row / U, j = j0 + (row - g * U);
      smem[e] = (j < H && k < H) ? w[(g * H + j) * H + k] : T(0);
    }
  });
}

// Step `step` (processing order) of direction d for the block's units: t = step forward,
// T-1-step reverse. Before it: the grid barrier after the previous step (h_{t-1} written).
template <typename T, typename Block>
FUSED_LSTM_PERSISTENT_FN void forward_block_step(const PersistentForward<T>& p, int d, int block,
                                                 int64_t step, T* smem, const Block& blk) {
  constexpr int R = kPersistentRowsPerThread;
  const PersistentPlan& plan = p.plan;
  const int64_t H = p.hidden, G = 4 * H, os = p.out_stride;
  const int64_t t = d == 0 ? step : p.steps.seq_len - 1 - step;
  const StepRows rows = step_rows(p.steps, t);
  if (rows.count <= 0) return;
  const StepRows prev = prev_step_rows(p.steps, d, t);
  const T* h0 = p.h0[d];
  // As the step path: the first step from a zero initial state adds no recurrent product.
  const bool recurrent = step > 0 || h0 != nullptr;
  const int U = plan.units, ks = plan.k_split;
  const int64_t j0 = int64_t{block} * U, bt = plan.batch_tile, ws = plan.w_stride,
                xs = plan.x_stride;
  const T* w_s = smem;
  T* x_s = smem + int64_t{plan.w_rows} * ws;
  T* gates = p.gates[d] + rows.offset * G;  // this step's rows
  T* cells = p.cells[d] + rows.offset * H;
  T* h_out = p.layer_out + rows.offset * os + d * H;
  const T* h_prev = p.layer_out + prev.offset * os + d * H;

  for (int64_t row0 = 0; row0 < rows.count; row0 += bt) {
    const int64_t tile_rows = rows.count - row0 < bt ? rows.count - row0 : bt;
    if (recurrent) {
      blk.sync();  // every read of x_s (previous tile) and the weight staging are done
      // h_{t-1} of rows [row0, row0 + tile_rows) of step t: x_s[r * xs + k] (zeros elsewhere).
      blk.for_each_thread([&](int tid) {
        for_each_2d(tid, blk.nthreads, static_cast<int>(bt), static_cast<int>(xs),
                    [&](int r, int k) {
                      const int64_t b = row0 + r;
                      T v = T(0);
                      if (r < tile_rows && k < H) {
                        if (b < prev.count) v = load_from_grid(h_prev + b * os + k);
                        else if (h0 != nullptr) v = h0[b * H + k];
                      }
                      x_s[r * xs + k] = v;
                    });
      });
      blk.sync();
    }
    // Work item = (row group rg of R rows, unit u); the unit varies fastest.
    const int64_t items = (tile_rows + R - 1) / R * U;
    blk.template for_each_team<Acc<T, 4 * R>>(
        ks, items,
        [&](int64_t item, int lane, Acc<T, 4 * R>& acc) {
          const int64_t rg = item / U, u = item - rg * U;
          if (!recurrent || j0 + u >= H) return;
          partial_dot<T, 4>(w_s + u * ws, U * ws, x_s + rg * R * xs, xs, static_cast<int>(H),
                            lane, ks, acc);
        },
        [&](int64_t item, int lane, const Acc<T, 4 * R>& acc) {
          const int64_t rg = item / U, u = item - rg * U, j = j0 + u;
          if (j >= H) return;
          // Lanes share the team's rows: row r is lane r % ks's (static indices into acc).
          FUSED_LSTM_UNROLL
          for (int r = 0; r < R; ++r) {
            const int64_t b = row0 + rg * R + r;
            if (r % ks != lane || b >= row0 + tile_rows) continue;
            if (recurrent) {
              T* g = gates + b * G;
              FUSED_LSTM_UNROLL
              for (int gate = 0; gate < 4; ++gate) g[gate * H + j] += acc.v[gate * R + r];
            }
            forward_step_element<T>(b * H + j, H, gates, p.c_state[d], cells, h_out, os,
                                    p.h_state[d]);
          }
        });
  }
}

// ---- Backward ------------------------------------------------------------------------------------

// Once per launch: the block's W_hh columns, transposed:
//   w_s[u * w_stride + k] = W_hh[k, j0 + u]   for u < U, k < 4H (zero beyond, up to w_rows).
template <typename T, typename Block>
FUSED_LSTM_PERSISTENT_FN void backward_stage_weights(const PersistentBackward<T>& p, int d,
                                                     int block, T* smem, const Block& blk) {
  const int64_t H = p.hidden, G = 4 * H, U = p.plan.units, ws = p.plan.w_stride;
  const int64_t j0 = block * U, n = p.plan.w_rows * ws;
  const T* w = p.w_hh[d];
  blk.for_each_thread([&](int tid) {
    for (int64_t e = tid; e < n; e += blk.nthreads) {
      const int64_t u = e / ws, k = e - u * ws, j = j0 + u;
      smem[e] = (u < U && j < H && k < G) ? w[k * H + j] : T(0);
    }
  });
}

// Backward step `step` (processing order: the reverse of the forward's) of direction d: the time
// step t = T-1-step forward, step reverse.
inline C10_HOST_DEVICE int64_t backward_time(int64_t seq_len, int d, int64_t step) {
  return d == 0 ? seq_len - 1 - step : step;
}

// The step kernel's arguments for time step t of direction d (lstm_kernels.h's BackwardStep).
template <typename T>
FUSED_LSTM_PERSISTENT_FN BackwardStep<T> backward_step_args(const PersistentBackward<T>& p, int d,
                                                            int64_t t) {
  const int64_t H = p.hidden, G = 4 * H, os = p.out_stride;
  const StepRows rows = step_rows(p.steps, t);
  const StepRows prev = prev_step_rows(p.steps, d, t);
  BackwardStep<T> s;
  s.batch = rows.count;
  s.hidden = H;
  s.out_size = H;
  s.gates = p.gates[d] + rows.offset * G;
  s.cells = p.cells[d] + rows.offset * H;
  s.prev_batch = prev.count;
  s.cells_prev = prev.count > 0 ? p.cells[d] + prev.offset * H : nullptr;
  s.c0 = p.c0[d];
  s.dh = p.dh_state[d];
  s.ld_dh = H;
  s.dy = p.dy + rows.offset * os + d * H;
  s.ld_dy = os;
  s.dc_state = p.dc_state[d];
  s.dgates = p.dgates[d] + rows.offset * G;
  s.h_prev_src = prev.count > 0 ? p.layer_out + prev.offset * os + d * H : nullptr;
  s.ld_h_prev_src = os;
  s.h0 = p.h0[d];
  s.h_prev = p.h_prev[d] + rows.offset * H;
  return s;
}

// Phase A: dgates_t, dc_{t-1} and h_{t-1} of the block's units, every row of step t. Reads
// dh_state (this block's units, written by its own phase B of the previous step).
template <typename T, typename Block>
FUSED_LSTM_PERSISTENT_FN void backward_block_phase_a(const PersistentBackward<T>& p, int d,
                                                     int block, int64_t step, const Block& blk) {
  const int64_t t = backward_time(p.steps.seq_len, d, step);
  const BackwardStep<T> s = backward_step_args(p, d, t);
  const int64_t H = p.hidden, U = p.plan.units, j0 = int64_t{block} * U;
  blk.for_each_thread([&](int tid) {
    for_each_2d(tid, blk.nthreads, static_cast<int>(s.batch), static_cast<int>(U),
                [&](int b, int u) {
                  if (j0 + u < H) backward_step_element<T>(s, b * H + j0 + u);
                });
  });
}

// Phase B, after the grid barrier (every block's dgates_t written):
//   dh_state[b, j] = sum over k < 4H of dgates_t[b, k] * W_hh[k, j], the block's units j, every
//   row b of step t (the rows not in step t keep what they carry, as in the step path).
// A team computes kPersistentUnitsPerTeam units x R rows: each weight and dgates value it loads
// from shared memory feeds 4 multiply-adds.
template <typename T, typename Block>
FUSED_LSTM_PERSISTENT_FN void backward_block_phase_b(const PersistentBackward<T>& p, int d,
                                                     int block, int64_t step, T* smem,
                                                     const Block& blk) {
  constexpr int R = kPersistentRowsPerThread;
  const PersistentPlan& plan = p.plan;
  const int64_t H = p.hidden, G = 4 * H;
  const int64_t t = backward_time(p.steps.seq_len, d, step);
  const StepRows rows = step_rows(p.steps, t);
  if (rows.count <= 0) return;
  const int U = plan.units, ks = plan.k_split;
  const int64_t j0 = int64_t{block} * U, bt = plan.batch_tile, ws = plan.w_stride,
                xs = plan.x_stride;
  const T* w_s = smem;
  T* x_s = smem + int64_t{plan.w_rows} * ws;
  const T* dgates = p.dgates[d] + rows.offset * G;
  T* dh = p.dh_state[d];

  for (int64_t row0 = 0; row0 < rows.count; row0 += bt) {
    const int64_t tile_rows = rows.count - row0 < bt ? rows.count - row0 : bt;
    blk.sync();  // every read of x_s (previous tile) and the weight staging are done
    blk.for_each_thread([&](int tid) {
      for_each_2d(tid, blk.nthreads, static_cast<int>(bt), static_cast<int>(xs),
                  [&](int r, int k) {
                    x_s[r * xs + k] = (r < tile_rows && k < G)
                        ? load_from_grid(dgates + (row0 + r) * G + k)
                        : T(0);
                  });
    });
    blk.sync();
    // Work item = (row group rg of R rows, unit group ug of UT units); ug varies fastest.
    constexpr int UT = kPersistentUnitsPerTeam;
    const int64_t groups_u = (U + UT - 1) / UT;
    const int64_t items = (tile_rows + R - 1) / R * groups_u;
    blk.template for_each_team<Acc<T, UT * R>>(
        ks, items,
        [&](int64_t item, int lane, Acc<T, UT * R>& acc) {
          const int64_t rg = item / groups_u, u0 = (item - rg * groups_u) * UT;
          if (j0 + u0 >= H) return;
          // Rows u0 .. u0 + UT - 1 of w_s exist (w_rows is U rounded up to UT; zeros past U).
          partial_dot<T, UT>(w_s + u0 * ws, ws, x_s + rg * R * xs, xs, static_cast<int>(G),
                             lane, ks, acc);
        },
        [&](int64_t item, int lane, const Acc<T, UT * R>& acc) {
          const int64_t rg = item / groups_u, u0 = (item - rg * groups_u) * UT;
          FUSED_LSTM_UNROLL
          for (int g = 0; g < UT; ++g) {
            const int64_t u = u0 + g, j = j0 + u;
            FUSED_LSTM_UNROLL
            for (int r = 0; r < R; ++r) {
              const int64_t b = row0 + rg * R + r;
              if (r % ks == lane && u < U && j < H && b < row0 + tile_rows)
                dh[b * H + j] = acc.v[g * R + r];
            }
          }
        });
  }
}

}  // namespace gpu
}  // namespace fused_lstm
