// Storage of the run-time settings (settings.h) and the ops that read and write them by name.
#include "settings.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <string>

namespace fused_lstm {
namespace {

#define FUSED_LSTM_SETTING_ATOMIC(field, name, dflt, lo, hi) std::atomic<int64_t> field{dflt};
struct {
  FUSED_LSTM_CPU_SETTINGS(FUSED_LSTM_SETTING_ATOMIC)
} cpu_store;
struct {
  FUSED_LSTM_CUDA_SETTINGS(FUSED_LSTM_SETTING_ATOMIC)
} cuda_store;
#undef FUSED_LSTM_SETTING_ATOMIC

// The atomic named `name` and its range, or null.
struct Slot {
  std::atomic<int64_t>* value;
  int64_t lo, hi;
};

Slot find(const std::string& name) {
#define FUSED_LSTM_SETTING_MATCH(store, field, n, lo, hi) \
  if (name == n) return {&store.field, lo, hi};
#define FUSED_LSTM_SETTING_MATCH_CPU(field, n, dflt, lo, hi) \
  FUSED_LSTM_SETTING_MATCH(cpu_store, field, n, lo, hi)
#define FUSED_LSTM_SETTING_MATCH_CUDA(field, n, dflt, lo, hi) \
  FUSED_LSTM_SETTING_MATCH(cuda_store, field, n, lo, hi)
  FUSED_LSTM_CPU_SETTINGS(FUSED_LSTM_SETTING_MATCH_CPU)
  FUSED_LSTM_CUDA_SETTINGS(FUSED_LSTM_SETTING_MATCH_CUDA)
#undef FUSED_LSTM_SETTING_MATCH_CPU
#undef FUSED_LSTM_SETTING_MATCH_CUDA
#undef FUSED_LSTM_SETTING_MATCH
  return {nullptr, 0, 0};
}

Slot checked(const std::string& name) {
  const Slot s = find(name);
  TORCH_CHECK_VALUE(s.value != nullptr, "fused_lstm: no setting named '", name, "'");
  return s;
}

int64_t get_setting(const std::string& name) {
  return checked(name).value->load(std::memory_order_relaxed);
}

void set_setting(const std::string& name, int64_t value) {
  const Slot s = checked(name);
  TORCH_CHECK_VALUE(value >= s.lo && value <= s.hi, "fused_lstm: setting '", name,
                    "' takes a value in [", s.lo, ", ", s.hi, "]; got ", value);
  s.value->store(value, std::memory_order_relaxed);
}

}  // namespace

#define FUSED_LSTM_SETTING_READ(field, name, dflt, lo, hi) \
  s.field = store.field.load(std::memory_order_relaxed);
CpuSettings cpu_settings() {
  CpuSettings s;
  auto& store = cpu_store;
  FUSED_LSTM_CPU_SETTINGS(FUSED_LSTM_SETTING_READ)
  return s;
}

CudaSettings cuda_settings() {
  CudaSettings s;
  auto& store = cuda_store;
  FUSED_LSTM_CUDA_SETTINGS(FUSED_LSTM_SETTING_READ)
  return s;
}
#undef FUSED_LSTM_SETTING_READ

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  m.def("_get_setting(str name) -> int", &get_setting);
  m.def("_set_setting(str name, int value) -> ()", &set_setting);
}

}  // namespace fused_lstm
