// FusedLSTM.forward's plain call in C++: the library's only Python binding.
//
// At tutorial sizes the kernel is a few microseconds and the call around it was most of the
// time: the module's Python checks, the weights' currency check, and `torch.ops`' boxing of ten
// arguments (a schema parse of each into an IValue, then an unboxing wrapper) cost ~7 us of a
// ~20 us call (benchmarks/notes/python-overhead.md, "Less per call around the kernel" and "A C++
// entry for the module call"). Here one METH_FASTCALL function takes
// the module, input and hx, decides in C++ whether the call is a plain one, and calls
// fused_lstm::lstm's kernel (ops.cpp) directly, without that op's own dispatcher call: it
// chooses lstm_forward when a gradient can flow (its autograd kernel records the graph), else
// lstm_inference, and calls that op through the dispatcher (so devices, profiler and autograd
// see the same op as for the Python path's torch.ops.fused_lstm.lstm call). Under
// torch.jit.trace it returns None: the Python path calls fused_lstm::lstm through torch.ops, so
// the trace records it (or, in ONNX export, nn.LSTM's call).
//
// It returns None whenever anything is not plain, and FusedLSTM.forward then takes its Python
// path, which decides everything (and raises nn.LSTM's exceptions). Plain means: no autocast,
// no torch function or dispatch mode, no functorch transform (torch.func, vmap: the C++
// autograd kernel is refused there, fused_lstm/_functorch.py takes those calls), input and hx
// (absent, or a tuple of two) exactly Tensors on the CPU or a CUDA device without forward-AD
// tangents (dual tensors: nn.LSTM takes those), a 3-D input, no dropout mask to draw, and
// weights that are the module's current Parameters (as nn.LSTM's _weights_have_changed()
// checks them), without tangents either. When the op
// rejects a plain call, the op's own exception is raised (as torch.ops would raise it): the
// Python path then takes it as the op's answer for the call and does not ask the op again.
//
// current_weights(module) is the same weights check for the Python path: self._flat_weights
// when they are current, else None (nn.LSTM's _update_flat_weights() then refreshes them).
//
// The module is built by torch's extension machinery, which defines TORCH_EXTENSION_NAME (the
// AOT `_C` and the JIT `fused_lstm_jit` both); fused_lstm/_loader.py imports it after loading
// the library. Without the macro (a build of the sources by other means) there is no binding
// and FusedLSTM keeps its Python path.
#ifdef TORCH_EXTENSION_NAME

#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/TracerMode.h>
#include <ATen/record_function.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "lstm.h"

namespace fused_lstm {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Interned attribute names of nn.LSTM (filled at module init).
struct Names {
  PyObject* training;
  PyObject* dropout;
  PyObject* num_layers;
  PyObject* bidirectional;
  PyObject* bias;
  PyObject* proj_size;
  PyObject* batch_first;
  PyObject* flat_weights;
  PyObject* flat_weights_names;
  PyObject* parameters;
};
Names names;

bool intern_names() {
  const std::array<std::pair<PyObject**, const char*>, 10> all{{
      {&names.training, "training"},
      {&names.dropout, "dropout"},
      {&names.num_layers, "num_layers"},
      {&names.bidirectional, "bidirectional"},
      {&names.bias, "bias"},
      {&names.proj_size, "proj_size"},
      {&names.batch_first, "batch_first"},
      {&names.flat_weights, "_flat_weights"},
      {&names.flat_weights_names, "_flat_weights_names"},
      {&names.parameters, "_parameters"},
  }};
  for (const auto& [slot, text] : all) {
    *slot = PyUnicode_InternFromString(text);
    if (*slot == nullptr) return false;
  }
  return true;
}

// An owned reference, released on every way out.
struct Ref {
  PyObject* p;
  explicit Ref(PyObject* o) : p(o) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
};

// The GIL released while the op runs (as torch.ops does); reacquired on every way out.
struct WithoutGil {
  PyThreadState* state = PyEval_SaveThread();
  WithoutGil() = default;
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;
  ~WithoutGil() { PyEval_RestoreThread(state); }
};

// torch._C._is_any_autocast_enabled's device list.
bool any_autocast() {
  for (const auto type : {at::kCPU, at::kCUDA, at::kXPU, at::kIPU, at::kHPU, at::kXLA,
                          at::kPrivateUse1, at::kMPS}) {
    if (at::autocast::is_autocast_enabled(type)) return true;
  }
  return false;
}

bool plain_tensor(PyObject* obj) {  // Tensor or Parameter, not a subclass
  return THPVariable_CheckExact(obj);
}

// Whether a functorch transform is active: functorch includes its front and back mode keys in
// the thread's dispatch keys while its layer stack is not empty.
bool functorch_active() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// Whether the tensor carries a forward-AD tangent (a dual tensor of torch.autograd.forward_ad):
// one pointer test for a tensor that never had one.
bool has_tangent(const at::Tensor& t) {
  const auto* meta = torch::autograd::impl::get_autograd_meta(t);
  return meta != nullptr && meta->fw_grad_ && !meta->fw_grad_->empty();
}

// The value of an attribute read as an int (-1 on failure, with the error cleared).
int64_t int_attr(PyObject* self, PyObject* name) {
  Ref value(PyObject_GetAttr(self, name));
  if (value.p == nullptr || !PyLong_Check(value.p)) return -1;
  const long long v = PyLong_AsLongLong(value.p);
  return v < 0 ? -1 : v;
}

// The value of an attribute read as a truth value (-1 on failure).
int bool_attr(PyObject* self, PyObject* name) {
  Ref value(PyObject_GetAttr(self, name));
  return value.p == nullptr ? -1 : PyObject_IsTrue(value.p);
}

// self._flat_weights (a new reference) when they are the module's current Parameters, else
// nullptr with no error set. Exactly when nn.LSTM's _weights_have_changed() is False for
// plain Parameters: every weight is found in _parameters (as getattr would find it) and is
// the object held in _flat_weights. Anything else (parametrized weights, functional_call,
// weights reassigned behind nn.LSTM's back) is left to nn.LSTM's _update_flat_weights().
PyObject* current_flat_weights(PyObject* self) {
  Ref flat(PyObject_GetAttr(self, names.flat_weights));
  Ref flat_names(PyObject_GetAttr(self, names.flat_weights_names));
  Ref params(PyObject_GetAttr(self, names.parameters));
  bool current = flat.p != nullptr && flat_names.p != nullptr && params.p != nullptr &&
      PyList_CheckExact(flat.p) && PyList_CheckExact(flat_names.p) && PyDict_Check(params.p) &&
      PyList_GET_SIZE(flat_names.p) == PyList_GET_SIZE(flat.p);
  for (Py_ssize_t i = 0; current && i < PyList_GET_SIZE(flat.p); ++i) {
    PyObject* name = PyList_GET_ITEM(flat_names.p, i);
    current = PyDict_GetItemWithError(params.p, name) == PyList_GET_ITEM(flat.p, i);
  }
  if (!current) {
    PyErr_Clear();
    return nullptr;
  }
  PyObject* result = flat.p;
  flat.p = nullptr;
  return result;
}

// current_flat_weights as tensors, or false when they are not current or not all exactly
// Tensors (Parameters).
bool current_weights(PyObject* self, std::vector<at::Tensor>& out) {
  Ref flat(current_flat_weights(self));
  if (flat.p == nullptr) return false;
  const Py_ssize_t n = PyList_GET_SIZE(flat.p);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* weight = PyList_GET_ITEM(flat.p, i);
    if (!plain_tensor(weight)) return false;
    out.push_back(THPVariable_Unpack(weight));
    if (has_tangent(out.back())) return false;
  }
  return true;
}

PyObject* wrap(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }

// forward(module, input, hx) -> (output, (h_n, c_n)), or None (see the top of the file).
PyObject* forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "fused_lstm forward entry: expected (module, input, hx)");
    return nullptr;
  }
  PyObject* self = args[0];
  PyObject* input_obj = args[1];
  PyObject* hx_obj = args[2];
  // Under torch.jit.trace (also the legacy ONNX exporter's trace) the Python path decides:
  // it records fused_lstm::lstm through torch.ops, or nn.LSTM's call when exporting to ONNX.
  if (any_autocast() || at::impl::torch_function_mode_enabled() ||
      c10::impl::dispatch_mode_enabled() || at::tracer::impl::is_dispatch_enabled() ||
      !plain_tensor(input_obj) || functorch_active())
    Py_RETURN_NONE;
  try {
    const at::Tensor& input = THPVariable_Unpack(input_obj);
    const auto device_type = input.device().type();
    if (input.dim() != 3 || (device_type != at::kCPU && device_type != at::kCUDA) ||
        has_tangent(input))
      Py_RETURN_NONE;
    OptTensor h0, c0;
    if (hx_obj != Py_None) {
      if (!PyTuple_CheckExact(hx_obj) || PyTuple_GET_SIZE(hx_obj) != 2) Py_RETURN_NONE;
      PyObject* h = PyTuple_GET_ITEM(hx_obj, 0);
      PyObject* c = PyTuple_GET_ITEM(hx_obj, 1);
      if (!plain_tensor(h) || !plain_tensor(c)) Py_RETURN_NONE;
      h0 = THPVariable_Unpack(h);
      c0 = THPVariable_Unpack(c);
      if (has_tangent(*h0) || has_tangent(*c0)) Py_RETURN_NONE;
    }
    const int64_t num_layers = int_attr(self, names.num_layers);
    const int64_t proj_size = int_attr(self, names.proj_size);
    const int training = bool_attr(self, names.training);
    const int bidirectional = bool_attr(self, names.bidirectional);
    const int bias = bool_attr(self, names.bias);
    const int batch_first = bool_attr(self, names.batch_first);
    if (num_layers < 1 || proj_size < 0 || training < 0 || bidirectional < 0 || bias < 0 ||
        batch_first < 0) {
      PyErr_Clear();
      Py_RETURN_NONE;
    }
    if (training && num_layers > 1) {  // a dropout mask to draw when dropout > 0
      Ref dropout(PyObject_GetAttr(self, names.dropout));
      const double p = dropout.p == nullptr ? -1.0 : PyFloat_AsDouble(dropout.p);
      if (p != 0.0) {
        PyErr_Clear();
        Py_RETURN_NONE;
      }
    }
    std::vector<at::Tensor> weights;
    if (!current_weights(self, weights)) {
      PyErr_Clear();
      Py_RETURN_NONE;
    }
    at::Tensor output, h_n, c_n;
    {
      WithoutGil no_gil;
      const at::Tensor x = batch_first ? input.transpose(0, 1) : input;
      // The op's kernel itself, without its dispatcher call; the profiler sees the same
      // fused_lstm::lstm event as for a call through torch.ops.
      RECORD_FUNCTION("fused_lstm::lstm", c10::ArrayRef<const c10::IValue>{});
      std::tie(output, h_n, c_n) = lstm(x, std::nullopt, h0, c0, weights, std::nullopt,
                                        num_layers, bidirectional, bias, proj_size);
      if (batch_first) output = output.transpose(0, 1);
    }
    Ref out(wrap(std::move(output)));
    Ref hy(wrap(std::move(h_n)));
    Ref cy(wrap(std::move(c_n)));
    if (out.p == nullptr || hy.p == nullptr || cy.p == nullptr) return nullptr;
    Ref state(PyTuple_Pack(2, hy.p, cy.p));
    if (state.p == nullptr) return nullptr;
    return PyTuple_Pack(2, out.p, state.p);
  } catch (...) {
    // The op rejected the arguments: its exception, as torch.ops raises it. FusedLSTM.forward
    // hands it to the Python path, which decides what to raise (nn.LSTM's exception).
    torch::translate_exception_to_python(std::current_exception());
    return nullptr;
  }
}

// current_weights(module) -> module._flat_weights when current, else None (see the top).
PyObject* current_weights_entry(PyObject*, PyObject* module) {
  PyObject* flat = current_flat_weights(module);
  if (flat == nullptr) Py_RETURN_NONE;
  return flat;
}

PyMethodDef methods[] = {
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&forward)),
     METH_FASTCALL,
     "forward(module, input, hx): FusedLSTM's call, or None when it is not a plain one."},
    {"current_weights", &current_weights_entry, METH_O,
     "current_weights(module): module._flat_weights when they are current, else None."},
    {nullptr, nullptr, 0, nullptr}};

#define FUSED_LSTM_STR2(x) #x
#define FUSED_LSTM_STR(x) FUSED_LSTM_STR2(x)
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, FUSED_LSTM_STR(TORCH_EXTENSION_NAME),
                          "fused_lstm's Python entry points (see csrc/python_entry.cpp).", -1,
                          methods};

}  // namespace
}  // namespace fused_lstm

#define FUSED_LSTM_CONCAT2(a, b) a##b
#define FUSED_LSTM_CONCAT(a, b) FUSED_LSTM_CONCAT2(a, b)
PyMODINIT_FUNC FUSED_LSTM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  if (!fused_lstm::intern_names()) return nullptr;
  return PyModule_Create(&fused_lstm::module_def);
}

#endif  // TORCH_EXTENSION_NAME
