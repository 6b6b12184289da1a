"""Eager-mode quantization treats a FusedLSTM as the nn.LSTM it replaces.

``torch.ao.quantization.quantize_dynamic(model, {nn.LSTM})`` (and its default spec, and
``dtype=torch.float16``) finds the modules to quantize by exact type: ``_propagate_qconfig_helper``
looks up ``type_before_parametrizations(module)`` in the spec, and ``convert`` swaps a module
whose exact type is in the mapping. A FusedLSTM would be left float32 without a word.
:func:`install` makes both see it as an nn.LSTM:

* the mapping: ``FusedLSTM -> _DynamicQuantizedLSTM`` in torch's default dynamic quantization
  mappings (``get_default_dynamic_quant_module_mappings()`` returns that dict), whose
  ``from_float`` gives torch's dynamic quantized LSTM (``torch.ao.nn.quantized.dynamic.LSTM``),
  built from an nn.LSTM that shares the FusedLSTM's parameters: exactly what nn.LSTM becomes;
* the spec: ``_propagate_qconfig_helper`` is wrapped so that a spec naming ``nn.LSTM`` but not
  FusedLSTM gives FusedLSTM nn.LSTM's qconfig (an entry for FusedLSTM itself wins).

The quantized module is PyTorch's: it does not run the fused kernels. Should torch's internals
differ (no ``_propagate_qconfig_helper``), nothing is wrapped and only a spec that names
FusedLSTM (``{FusedLSTM}``) quantizes it.
"""

from __future__ import annotations

import sys

from torch import nn

_MARK = "_fused_lstm_qconfig_hook"


class _DynamicQuantizedLSTM:
    """The mapping's target for FusedLSTM: ``from_float`` as torch's dynamic quantized LSTM
    has it, for the nn.LSTM that the FusedLSTM replaces (same Parameters and qconfig)."""

    @staticmethod
    def from_float(mod, use_precomputed_fake_quant=False):
        from torch.ao.nn.quantized.dynamic import LSTM

        from .module import revert

        return LSTM.from_float(revert(mod), use_precomputed_fake_quant=use_precomputed_fake_quant)


# The classes install() registered (FusedLSTM; the ScriptableFusedLSTM torch.jit.script leaves).
_classes: list = []


def install(fused_class: type) -> None:
    """Registers ``fused_class`` with eager-mode quantization (see the module docstring).
    Idempotent; never raises."""
    from torch.ao.quantization import quantization_mappings

    quantization_mappings.get_default_dynamic_quant_module_mappings().setdefault(
        fused_class, _DynamicQuantizedLSTM)
    if fused_class not in _classes:
        _classes.append(fused_class)
    quantize = sys.modules.get("torch.ao.quantization.quantize")
    original = getattr(quantize, "_propagate_qconfig_helper", None)
    if original is None or getattr(original, _MARK, False):
        return

    def _propagate_qconfig_helper(module, qconfig_dict, *args, **kwargs):
        if nn.LSTM in qconfig_dict and any(c not in qconfig_dict for c in _classes):
            qconfig_dict = {**{c: qconfig_dict[nn.LSTM] for c in _classes}, **qconfig_dict}
        return original(module, qconfig_dict, *args, **kwargs)

    _propagate_qconfig_helper.__wrapped__ = original
    _propagate_qconfig_helper.__doc__ = original.__doc__
    setattr(_propagate_qconfig_helper, _MARK, True)
    quantize._propagate_qconfig_helper = _propagate_qconfig_helper
