"""FusedLSTM through the ways people deploy and transform an nn.LSTM (issue 19): the same
model with nn.LSTM and with FusedLSTM (``fused_lstm.convert``, same Parameters) goes through
each transform; the results, gradients, exceptions and warnings must be nn.LSTM's."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fused_lstm
from fused_lstm import FusedLSTM

from helpers import randn

F32, F64 = torch.float32, torch.float64


class Model(nn.Module):
    """An LSTM (2 layers, batch_first) with a linear head: what a user deploys."""

    def __init__(self, dtype=F64):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True, dtype=dtype)
        self.head = nn.Linear(4, 2, dtype=dtype)

    def forward(self, x):
        output, (h_n, c_n) = self.lstm(x)
        return self.head(output), h_n, c_n


def pair(dtype=F64):
    """(the nn.LSTM model, the same model converted), sharing no Parameters."""
    plain = Model(dtype)
    fused = fused_lstm.convert(copy.deepcopy(plain))
    assert type(fused.lstm) is FusedLSTM
    return plain, fused


def outputs_and_grads(module, x):
    """The module's outputs, and the gradients of a loss of all of them w.r.t. x and every
    parameter (None where none flows)."""
    x = x.detach().requires_grad_()
    params = [x, *module.parameters()] if isinstance(module, nn.Module) else [x]
    outs = module(x)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def trace_warnings(model, x, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x, **kwargs)
    return traced, sorted(f"{w.category.__name__}: {w.message}" for w in caught)


def traced_fused_ops(traced):
    return [n.kind() for n in traced.inlined_graph.nodes() if n.kind().startswith("fused_lstm::")]


def test_jit_trace_with_defaults_passes_its_check():
    """torch.jit.trace(model, x) with its defaults (check_trace=True re-traces and compares):
    the trace records the deciding op fused_lstm::lstm, so the re-run records the same graph;
    the traced model gives nn.LSTM's and eager FusedLSTM's outputs and gradients, and the
    trace warns nothing that nn.LSTM's does not (nn.LSTM's Python checks add TracerWarnings)."""
    plain, fused = pair()
    x = randn(2, 5, 3)
    traced_plain, plain_warnings = trace_warnings(plain, x)
    traced, fused_warnings = trace_warnings(fused, x)  # TracingCheckError before the fix
    assert set(fused_warnings) <= set(plain_warnings), fused_warnings
    assert traced_fused_ops(traced) == ["fused_lstm::lstm"]
    other = randn(3, 6, 3)  # another batch and length
    expected_outs, expected_grads = outputs_and_grads(plain, other)
    for module in (fused, traced):
        outs, grads = outputs_and_grads(module, other)
        assert_close(outs, expected_outs)
        assert_close(grads, expected_grads)
    with torch.no_grad():
        assert_close(traced(other), fused(other))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit's own
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)  # the op is found: fused_lstm is imported
    outs, grads = outputs_and_grads(loaded, other)
    assert_close(outs, expected_outs)
    assert_close(grads[0], expected_grads[0])
    assert all(p.grad is None for p in loaded.parameters())
    assert all(g is not None for g in torch.autograd.grad(loaded(other)[0].sum(),
                                                          list(loaded.parameters())))


def test_jit_trace_under_no_grad_trains():
    """A graph traced under torch.no_grad trains when its inputs and weights require grad
    (the traced fused_lstm::lstm chooses lstm_forward at run time): every gradient is
    nn.LSTM's, none is None, and no warning beyond nn.LSTM's."""
    plain, fused = pair()
    x = randn(2, 5, 3)
    with torch.no_grad():
        traced_plain, plain_warnings = trace_warnings(plain, x)
        traced, fused_warnings = trace_warnings(fused, x)
    assert set(fused_warnings) <= set(plain_warnings), fused_warnings
    expected_outs, expected_grads = outputs_and_grads(traced_plain, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs, grads = outputs_and_grads(traced, x)
        # the traced module's own parameters are the converted model's
        weights = torch.autograd.grad(traced(x)[0].sum(), list(fused.lstm.parameters()))
    assert all(g is not None for g in grads) and all(w is not None for w in weights)
    assert_close(outs, expected_outs)
    assert_close(grads, expected_grads)
    assert_close(list(weights), list(torch.autograd.grad(
        plain(x)[0].sum(), list(plain.lstm.parameters()))))


def test_fx_symbolic_trace_and_graph_mode_quantization():
    """torch.fx.symbolic_trace sees FusedLSTM as it sees nn.LSTM: one call_module node (a
    leaf), so FX graph-mode quantization (prepare_fx / convert_fx, the default qconfig
    mapping) runs, and both models come out alike (the LSTM stays float, the head is
    quantized) with the same values."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    plain, fused = pair(F32)
    plain.eval(), fused.eval()
    x = randn(2, 5, 3, dtype=F32)

    def nodes(graph_module):
        return [(n.op, n.target if n.op != "call_function" else str(n.target))
                for n in graph_module.graph.nodes]

    traced = torch.fx.symbolic_trace(fused)  # TraceError before the fix
    assert nodes(traced) == nodes(torch.fx.symbolic_trace(plain))
    assert traced.lstm is fused.lstm
    with torch.no_grad():
        assert_close(traced(x), fused(x), rtol=0, atol=0)
        quantized = []
        for model in (plain, fused):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's own deprecation notices, for both
                prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(), (x,))
                prepared(x)
                quantized.append(convert_fx(prepared))
        assert type(quantized[1].lstm) is FusedLSTM and type(quantized[0].lstm) is nn.LSTM
        assert type(quantized[1].head) is type(quantized[0].head)
        assert nodes(quantized[1]) == nodes(quantized[0])
        assert_close(quantized[1](x), quantized[0](x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["nn.LSTM-qint8", "default-qint8", "nn.LSTM-float16"])
def test_quantize_dynamic_quantizes_fused_lstm_as_nn_lstm(spec):
    """quantize_dynamic turns a converted model's FusedLSTM into PyTorch's dynamic quantized
    LSTM, as it turns nn.LSTM: {nn.LSTM} with qint8 and float16, and the default spec; the
    quantized models give the same values, bit for bit."""
    from torch.ao.nn.quantized.dynamic import LSTM as DynamicQuantizedLSTM
    from torch.ao.quantization import quantize_dynamic

    plain, fused = pair(F32)
    kwargs = {"nn.LSTM-qint8": {"qconfig_spec": {nn.LSTM}, "dtype": torch.qint8},
              "default-qint8": {},
              "nn.LSTM-float16": {"qconfig_spec": {nn.LSTM}, "dtype": torch.float16}}[spec]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notice, for both
        expected_model = quantize_dynamic(plain, **kwargs)
        got_model = quantize_dynamic(fused, **kwargs)
    assert type(expected_model.lstm) is DynamicQuantizedLSTM
    assert type(got_model.lstm) is DynamicQuantizedLSTM  # left float32 before the fix
    assert type(got_model.head) is type(expected_model.head)
    assert type(fused.lstm) is FusedLSTM  # not in place: the original model is unchanged
    x = randn(2, 5, 3, dtype=F32)
    with torch.no_grad():
        for e, g in zip(expected_model(x), got_model(x)):
            assert torch.equal(g, e)


def _fx_quantized(model, qconfig_mapping, x, qat=False):
    """``model`` (copied) through FX graph-mode quantization: prepare_fx (prepare_qat_fx),
    one calibration call, convert_fx; with the warnings it gave (messages)."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

    model = copy.deepcopy(model).train(qat)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = (prepare_qat_fx if qat else prepare_fx)(model, qconfig_mapping, (x,))
        prepared(x)
        quantized = convert_fx(prepared).eval()
    return quantized, {str(w.message) for w in caught}


@pytest.mark.parametrize("lstm_class", ["FusedLSTM", "ScriptableFusedLSTM"])
@pytest.mark.parametrize("qconfig", ["qint8-global", "qint8-nn.LSTM", "float16-global",
                                     "float16-nn.LSTM", "qint8-nn.LSTM-qat"])
def test_fx_dynamic_quantization_quantizes_fused_lstm_as_nn_lstm(qconfig, lstm_class):
    """FX graph-mode dynamic quantization (prepare_fx / convert_fx with a dynamic qconfig:
    qint8 and float16, global and set_object_type(nn.LSTM, ...), and prepare_qat_fx) turns a
    converted model's FusedLSTM (or the ScriptableFusedLSTM torch.jit.script leaves) into
    PyTorch's dynamic quantized LSTM, as it turns nn.LSTM (left float32 before the fix): the
    same module types, graph and values, bit for bit, and no warning beyond nn.LSTM's."""
    from torch.ao.nn.quantized.dynamic import LSTM as DynamicQuantizedLSTM
    from torch.ao.quantization import (QConfigMapping, default_dynamic_qconfig,
                                       float16_dynamic_qconfig)

    from fused_lstm._script import ScriptableFusedLSTM, scriptable

    dtype, scope, *qat = qconfig.split("-")
    dynamic_qconfig = {"qint8": default_dynamic_qconfig,
                       "float16": float16_dynamic_qconfig}[dtype]
    mapping = QConfigMapping()
    if scope == "global":
        mapping.set_global(dynamic_qconfig)
    else:
        mapping.set_object_type(nn.LSTM, dynamic_qconfig)
    plain, fused = pair(F32)
    if lstm_class == "ScriptableFusedLSTM":
        fused.lstm = scriptable(fused.lstm)  # what torch.jit.script(fused) leaves
        assert type(fused.lstm) is ScriptableFusedLSTM
    x = randn(2, 5, 3, dtype=F32)
    expected_model, expected_warnings = _fx_quantized(plain, mapping, x, qat=bool(qat))
    got_model, got_warnings = _fx_quantized(fused, mapping, x, qat=bool(qat))
    assert type(expected_model.lstm) is DynamicQuantizedLSTM
    assert type(got_model.lstm) is DynamicQuantizedLSTM  # left float32 before the fix
    assert type(got_model.head) is type(expected_model.head)
    assert str(got_model.graph) == str(expected_model.graph)
    assert got_warnings <= expected_warnings, got_warnings - expected_warnings
    assert type(fused.lstm).__name__ == lstm_class  # the original model is unchanged
    x = randn(4, 7, 3, dtype=F32)
    with torch.no_grad():
        expected, got = expected_model(x), got_model(x)
    for e, g in zip(expected, got):
        assert torch.equal(g, e)


def test_fx_quantization_fused_lstm_qconfig_of_its_own_wins():
    """A QConfigMapping entry for FusedLSTM itself wins over the global dynamic qconfig (and
    over an nn.LSTM entry): set_object_type(FusedLSTM, None) keeps it float32."""
    from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig

    plain, fused = pair(F32)
    x = randn(2, 5, 3, dtype=F32)
    mapping = (QConfigMapping().set_global(default_dynamic_qconfig)
               .set_object_type(nn.LSTM, default_dynamic_qconfig)
               .set_object_type(FusedLSTM, None))
    got_model, _ = _fx_quantized(fused, mapping, x)
    assert type(got_model.lstm) is FusedLSTM
    with torch.no_grad():
        for e, g in zip(fused(x)[1:], got_model(x)[1:]):  # h_n, c_n: the LSTM's, float32
            assert torch.equal(g, e)


@pytest.mark.parametrize("backend", ["native", "fbgemm", "qnnpack", "x86", "onednn"])
def test_fx_quantization_backend_configs_configure_fused_lstm_as_nn_lstm(backend):
    """Each BackendConfig torch builds with its RNN pattern configs (the default of
    prepare_fx / convert_fx is native) configures FusedLSTM and ScriptableFusedLSTM as it
    configures nn.LSTM: same observation type, dtype configs and reference quantized module,
    the class as its root module. Fails loudly if torch's internals moved (then FX graph-mode
    quantization would leave FusedLSTM float32 again)."""
    import importlib

    from fused_lstm._script import ScriptableFusedLSTM

    module = importlib.import_module(f"torch.ao.quantization.backend_config.{backend}")
    config = getattr(module, f"get_{backend}_backend_config")()
    by_pattern = {c.pattern: c for c in config.configs}
    lstm = by_pattern[nn.LSTM]
    for fused_class in (FusedLSTM, ScriptableFusedLSTM):
        got = by_pattern[fused_class]
        assert got.root_module is fused_class
        assert got.reference_quantized_module is lstm.reference_quantized_module is not None
        assert got.observation_type == lstm.observation_type
        assert ([d.to_dict() for d in got.dtype_configs]
                == [d.to_dict() for d in lstm.dtype_configs] != [])
