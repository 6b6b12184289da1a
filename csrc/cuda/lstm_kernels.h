// The CUDA kernels of fused_lstm, apart from the framework glue (lstm_cuda.cu): one fused
// pointwise pass per time step, forward and backward, both built on lstm_cell.h.
//
// Every pointer is device memory in the math dtype T (float for float32/float16/bfloat16, double
// for float64); matrices are row-major with the row stride named `ld*` (elements). Sizes are
// int64 and indexing is int64 throughout. A launcher with no rows launches nothing; it launches
// on `stream` and checks the launch (c10::Error on failure), never synchronising.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fused_lstm {
namespace gpu {

// Forward pass of one time step, for the step's `batch` rows:
//   gates:   [batch, 4H]        in: pre-activations (x W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T);
//                               out: activated i, f, g, o (the reserve's gates)
//   c_state: [batch, H]         in: c_{t-1}; out: c_t
//   cells:   [batch, H]         out: c_t (the reserve's cells)
//   h_out:   [batch, ld_h_out]  out: h_t in the first H columns (layer output, or pre_proj)
//   h_state: [batch, H]         out: h_t, the next step's GEMM operand; null when projected
template <typename T>
void lstm_forward_step(int64_t batch, int64_t hidden, T* gates, T* c_state, T* cells, T* h_out,
                       int64_t ld_h_out, T* h_state, cudaStream_t stream);

// Arguments of the backward pass of one time step t (kept in a struct: there are many).
// "prev" rows are those that continue from the step processed just before t in forward order
// (t-1 forward, t+1 reverse): rows [0, prev_batch); the others start from h0/c0.
template <typename T>
struct BackwardStep {
  int64_t batch = 0;       // rows of step t
  int64_t hidden = 0;      // H
  int64_t out_size = 0;    // columns of h: proj_size, or H
  const T* gates = nullptr;       // [batch, 4H]        activated gates of step t
  const T* cells = nullptr;       // [batch, H]         c_t
  int64_t prev_batch = 0;         // rows with a previous step (<= batch)
  const T* cells_prev = nullptr;  // [prev_batch, H]    c_{t-1} of those rows; null if prev_batch == 0
  const T* c0 = nullptr;          // [batch, H]         initial c; null means zeros
  const T* dh = nullptr;          // [batch, ld_dh]     dL/dh_t (carried dh, or dL/d pre_proj)
  int64_t ld_dh = 0;
  const T* dy = nullptr;          // [batch, ld_dy]     dL/dh_t from the output, added to dh; or null
  int64_t ld_dy = 0;
  T* dc_state = nullptr;          // [batch, H]         in: dL/dc_t; out: dL/dc_{t-1}
  T* dgates = nullptr;            // [batch, 4H]        out: dL/d(gate pre-activations)
  const T* h_prev_src = nullptr;  // [prev_batch, ld_h_prev_src]  h_{t-1} of the prev rows
  int64_t ld_h_prev_src = 0;
  const T* h0 = nullptr;          // [batch, out_size]  initial h; null means zeros
  T* h_prev = nullptr;            // [batch, out_size]  out: h_{t-1} of every row, for dW_hh
};

template <typename T>
void lstm_backward_step(const BackwardStep<T>& step, cudaStream_t stream);

}  // namespace gpu
}  // namespace fused_lstm
