// What one (row b, hidden unit j) element of a step kernel computes, with idx = b * H + j.
// Host-and-device functions: the kernels in lstm_kernels.cu run them on the GPU, and
// tests/test_cuda_compile.py runs them on the CPU (with the host code of lstm_cuda.cu) to check
// the CUDA path's indexing against the CPU kernels where no GPU is present. The gate math itself
// is lstm_cell.h's.
#pragma once

#include "../lstm_cell.h"
#include "lstm_kernels.h"

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fused_lstm {
namespace gpu {

// Shapes as lstm_forward_step's (lstm_kernels.h).
template <typename T>
C10_HOST_DEVICE inline void forward_step_element(int64_t idx, int64_t hidden, T* __restrict__ gates,
                                                 T* __restrict__ c_state, T* __restrict__ cells,
                                                 T* __restrict__ h_out, int64_t ld_h_out,
                                                 T* __restrict__ h_state) {
  const int64_t b = idx / hidden;
  const int64_t j = idx - b * hidden;
  T* g = gates + b * 4 * hidden;
  T c, h;
  const Gates<T> a =
      cell_forward<T>(g[j], g[hidden + j], g[2 * hidden + j], g[3 * hidden + j], c_state[idx], c, h);
  g[j] = a.i;
  g[hidden + j] = a.f;
  g[2 * hidden + j] = a.g;
  g[3 * hidden + j] = a.o;
  c_state[idx] = c;
  cells[idx] = c;
  h_out[b * ld_h_out + j] = h;
  if (h_state != nullptr) h_state[idx] = h;
}

// Shapes as BackwardStep's (lstm_kernels.h).
template <typename T>
C10_HOST_DEVICE inline void backward_step_element(const BackwardStep<T>& p, int64_t idx) {
  const int64_t H = p.hidden;
  const int64_t b = idx / H;
  const int64_t j = idx - b * H;
  const bool has_prev = b < p.prev_batch;
  const T c_prev = has_prev ? p.cells_prev[idx] : (p.c0 != nullptr ? p.c0[idx] : T(0));
  T dh = p.dh[b * p.ld_dh + j];
  if (p.dy != nullptr) dh = dh + p.dy[b * p.ld_dy + j];
  const T* g = p.gates + b * 4 * H;
  const Gates<T> a{g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
  T dc_prev;
  const Gates<T> da = cell_backward<T>(a, p.cells[idx], c_prev, dh, p.dc_state[idx], dc_prev);
  T* dg = p.dgates + b * 4 * H;
  dg[j] = da.i;
  dg[H + j] = da.f;
  dg[2 * H + j] = da.g;
  dg[3 * H + j] = da.o;
  p.dc_state[idx] = dc_prev;
  // h_{t-1} of this row, gathered for the dW_hh GEMM (out_size <= H: one element per column).
  if (j < p.out_size) {
    const int64_t o = p.out_size;
    p.h_prev[b * o + j] = has_prev ? p.h_prev_src[b * p.ld_h_prev_src + j]
                                   : (p.h0 != nullptr ? p.h0[b * o + j] : T(0));
  }
}

}  // namespace gpu
}  // namespace fused_lstm
