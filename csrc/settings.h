// Run-time settings of the kernels: what fused_lstm.backends.cpu / .cuda set from Python
// (fused_lstm/backends.py). Each kernel call takes a snapshot (cpu_settings(), cuda_settings()),
// so a setting changed between calls applies from the next call, and one call never sees two
// values of a setting. Stored as relaxed atomics: a call reads a handful of words.
//
// The settings are declared once, in the table below: name (as Python spells it), default,
// and the range of its value. The ops fused_lstm::_get_setting / _set_setting (settings.cpp)
// read and write them by name.
#pragma once

#include <cstdint>

namespace fused_lstm {

// X(field, python name, default, min, max)
#define FUSED_LSTM_CPU_SETTINGS(X)                                          \
  X(brgemm, "cpu.allow_brgemm", 1, 0, 1)                                    \
  X(vec16_cell, "cpu.allow_vec16_cell", 1, 0, 1)                            \
  X(fused_input_projection, "cpu.allow_fused_input_projection", 1, 0, 1)    \
  X(thin, "cpu.allow_thin", 1, 0, 1)                                        \
  X(bf16_products, "cpu.allow_bf16_products", 1, 0, 1)                      \
  X(amx, "cpu.allow_amx", 1, 0, 1)                                          \
  X(gemm_library, "cpu.gemm_library", 0, 0, 2)                              \
  X(fuse_by_rates, "cpu.fuse_by_measured_rates", 1, 0, 1)                  \
  X(nn_lstm_floor, "cpu.nn_lstm_floor", 0, 0, 2)                          \
  X(hidden_split, "cpu.allow_hidden_split", 1, 0, 1)                        \
  X(hidden_split_by_rates, "cpu.hidden_split_by_measured_rates", 1, 0, 1)   \
  X(few_rows, "cpu.allow_few_rows", 1, 0, 1)                                \
  X(weight_grads_apart, "cpu.allow_weight_grads_apart", 1, 0, 1)            \
  X(small_products, "cpu.allow_small_products", 1, 0, 1)                    \
  X(small_hidden_avx512, "cpu.allow_small_hidden_avx512", 1, 0, 1)
// gemm_library: 0 auto (the measured rates choose), 1 the BLAS, 2 oneDNN's matmul.
// nn_lstm_floor: 0 auto (measured, plan.h's floor rule), 1 never, 2 always (where possible).
// hidden_split: on; plan.h takes it only where one thread's measured step wins by 10% (float32-bound.md,
// "The hidden split on the Intel Xeon, float32 and bf16").
// path: 0 auto, 1 persistent, 2 step; 0 for units, tile and k_split: the plan chooses.
#define FUSED_LSTM_CUDA_SETTINGS(X)                                         \
  X(path, "cuda.path", 0, 0, 2)                                             \
  X(persistent_units, "cuda.persistent_units", 0, 0, int64_t{1} << 20)      \
  X(persistent_tile, "cuda.persistent_tile", 0, 0, 64)                      \
  X(persistent_k_split, "cuda.persistent_k_split", 0, 0, 32)

#define FUSED_LSTM_SETTING_FIELD(field, name, dflt, lo, hi) int64_t field = dflt;
struct CpuSettings {
  FUSED_LSTM_CPU_SETTINGS(FUSED_LSTM_SETTING_FIELD)
};
struct CudaSettings {
  FUSED_LSTM_CUDA_SETTINGS(FUSED_LSTM_SETTING_FIELD)
};
#undef FUSED_LSTM_SETTING_FIELD

// The current values (one snapshot per kernel call).
CpuSettings cpu_settings();
CudaSettings cuda_settings();

}  // namespace fused_lstm
