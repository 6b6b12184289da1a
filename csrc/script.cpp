// What FusedLSTM's TorchScript forward (fused_lstm/_script.py) asks before calling the fused op:
// TorchScript has no try/except and cannot call Python, so the eager path's checks of the device
// and of autocast are one op here.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/TensorOptions.h>
#include <torch/library.h>

namespace fused_lstm {

namespace {

// Whether the fused op computes an LSTM on `device` now: it has a kernel for the device type
// and no autocast is enabled (for any device type, as torch._C._is_any_autocast_enabled: under
// autocast nn.LSTM follows autocast's own rules, so the scripted forward hands the call to it).
bool runs_fused(c10::Device device) {
  for (const auto device_type : at::autocast::_AUTOCAST_SUPPORTED_DEVICES) {
    if (at::autocast::is_autocast_enabled(device_type)) return false;
  }
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fused_lstm::lstm_forward", "");
  const auto key = c10::computeDispatchKey(std::nullopt, std::nullopt, device);
  return op.hasKernelForDispatchKey(key);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  m.def("runs_fused(Device device) -> bool", &runs_fused);
}

}  // namespace fused_lstm
