// THE LSTM cell: the only place where gate math is written.
//
// Gate order is nn.LSTM's: i (input), f (forget), g (cell candidate), o (output).
// Every function here is a scalar, pointer-free inline template usable from C++ (CPU loops)
// and CUDA (kernels): `scalar_t` is the storage type, `acc_t` the type the math runs in
// (float for float/bfloat16/half, double for double).
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>

// The cell functions are a few arithmetic instructions each: always inline them, so that they
// fuse into the kernels' loops (on the CPU, so that those loops vectorise).
#if defined(__CUDACC__)
#define FUSED_LSTM_INLINE __forceinline__
#elif defined(__GNUC__)
#define FUSED_LSTM_INLINE __attribute__((always_inline)) inline
#else
#define FUSED_LSTM_INLINE inline
#endif

namespace fused_lstm {

// sigmoid from a policy's exp (see CellMath).
template <typename acc_t, typename Math>
C10_HOST_DEVICE FUSED_LSTM_INLINE acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + Math::exp(acc_t(0) - x));
}

// The elementwise functions the cell needs: sigmoid and tanh (and exp, sigmoid's). Every
// function below takes them as a policy (`Math`), so a backend can substitute its own
// implementations (the CPU kernels pass vectorisable ones, csrc/cpu/fast_math.h, including a
// policy whose acc_t is an AVX-512 register of 16 floats) while the gate math stays written
// once, here.
template <typename acc_t>
struct CellMath {
  C10_HOST_DEVICE FUSED_LSTM_INLINE static acc_t exp(acc_t x) { return std::exp(x); }
  C10_HOST_DEVICE FUSED_LSTM_INLINE static acc_t tanh(acc_t x) { return std::tanh(x); }
  C10_HOST_DEVICE FUSED_LSTM_INLINE static acc_t sigmoid(acc_t x) {
    return fused_lstm::sigmoid<acc_t, CellMath>(x);
  }
};

// Activated gates of one (batch row, hidden unit) at one time step.
template <typename acc_t>
struct Gates {
  acc_t i, f, g, o;
};

// Forward of one cell element.
//   pre_*:  gate pre-activations (x W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)
//   c_prev: c_{t-1}
// Returns the activated gates; writes c_t and h_t (h_t before any projection).
// It is two halves, also usable apart (the CPU's cell pass runs them as two loops):
// the activations of the four gates, and the new state from them.
template <typename acc_t, typename Math = CellMath<acc_t>>
C10_HOST_DEVICE FUSED_LSTM_INLINE Gates<acc_t> cell_activations(acc_t pre_i, acc_t pre_f,
                                                               acc_t pre_g, acc_t pre_o) {
  Gates<acc_t> a;
  a.i = Math::sigmoid(pre_i);
  a.f = Math::sigmoid(pre_f);
  a.g = Math::tanh(pre_g);
  a.o = Math::sigmoid(pre_o);
  return a;
}

template <typename acc_t, typename Math = CellMath<acc_t>>
C10_HOST_DEVICE FUSED_LSTM_INLINE void cell_state(const Gates<acc_t>& a, acc_t c_prev, acc_t& c,
                                                  acc_t& h) {
  c = a.f * c_prev + a.i * a.g;
  h = a.o * Math::tanh(c);
}

template <typename acc_t, typename Math = CellMath<acc_t>>
C10_HOST_DEVICE FUSED_LSTM_INLINE Gates<acc_t> cell_forward(
    acc_t pre_i, acc_t pre_f, acc_t pre_g, acc_t pre_o, acc_t c_prev, acc_t& c, acc_t& h) {
  const Gates<acc_t> a = cell_activations<acc_t, Math>(pre_i, pre_f, pre_g, pre_o);
  cell_state<acc_t, Math>(a, c_prev, c, h);
  return a;
}

// Backward of one cell element.
//   a:      the activated gates saved by cell_forward
//   c:      c_t;  c_prev: c_{t-1}
//   dh:     dL/dh_t (h before projection), all paths summed
//   dc:     dL/dc_t arriving from step t+1 (or from c_n)
// Returns dL/d(pre-activation) per gate; writes dL/dc_{t-1}.
template <typename acc_t, typename Math = CellMath<acc_t>>
C10_HOST_DEVICE FUSED_LSTM_INLINE Gates<acc_t> cell_backward(
    const Gates<acc_t>& a, acc_t c, acc_t c_prev, acc_t dh, acc_t dc, acc_t& dc_prev) {
  const acc_t tanh_c = Math::tanh(c);
  const acc_t dc_total = dc + dh * a.o * (acc_t(1) - tanh_c * tanh_c);
  Gates<acc_t> d;
  d.i = dc_total * a.g * a.i * (acc_t(1) - a.i);
  d.f = dc_total * c_prev * a.f * (acc_t(1) - a.f);
  d.g = dc_total * a.i * (acc_t(1) - a.g * a.g);
  d.o = dh * tanh_c * a.o * (acc_t(1) - a.o);
  dc_prev = dc_total * a.f;
  return d;
}

}  // namespace fused_lstm
